//! Invariant: errors are fine, panics are bugs. Any tar stream imports as a valid version
//! (its manifest validates and reads back) or is refused with an error; nothing is left
//! half-recorded.
#![no_main]
use libfuzzer_sys::fuzz_target;
use si_store::Store;
use std::sync::LazyLock;

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
}

static FIX: LazyLock<Fixture> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    Fixture { dir, store }
});

fuzz_target!(|data: &[u8]| {
    let input = FIX.dir.path().join("input.tar");
    std::fs::write(&input, data).unwrap();
    match si_imaging::tarball::import(&FIX.store, &input, "fuzz") {
        Ok(s) => {
            let m = FIX.store.manifest("fuzz", s.version).unwrap();
            m.validate().unwrap();
            FIX.store.remove("fuzz", None).unwrap();
        }
        Err(_) => assert!(FIX.store.versions("fuzz").map_or(true, |v| v.is_empty())),
    }
});
