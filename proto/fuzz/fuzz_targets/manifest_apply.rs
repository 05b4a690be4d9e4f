//! Invariant: errors are fine, panics are bugs, and nothing is written outside the target.
//! Manifest bytes from anywhere either fail to decode or are applied beneath a scratch root;
//! a sibling directory beside the root (what a hostile path would reach with `..` or a
//! symlink) stays empty, and nothing else appears beside the root.
#![no_main]
use libfuzzer_sys::fuzz_target;
use si_proto::Digest;
use std::sync::LazyLock;

/// Content for any digest: bounded zeros (a file whose digest does not match is refused by
/// the real sources; here the invariant is about where things are written, not what).
struct Zeros;
impl si_tree::apply::ObjectSource for Zeros {
    fn get(&self, _d: &Digest, raw_len: u32) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(raw_len <= 1 << 16, "object too large for the fuzz source");
        Ok(vec![0; raw_len as usize])
    }
}

static BOX: LazyLock<tempfile::TempDir> = LazyLock::new(|| tempfile::tempdir().unwrap());

fuzz_target!(|data: &[u8]| {
    let Ok(m) = si_proto::Manifest::decode(data) else {
        return;
    };
    // Keep each run small: the invariant is about paths, not volume.
    if m.entries.len() > 256 || m.total_bytes() > 4 << 20 {
        return;
    }
    let b = BOX.path();
    let target = b.join("root");
    let outside = b.join("outside");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let _ = si_tree::apply::apply_fresh(&m, &target, &Zeros, 1);
    let beside: Vec<_> = std::fs::read_dir(b)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        beside.iter().all(|n| n == "root" || n == "outside"),
        "written beside the root: {beside:?}"
    );
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "written outside the root"
    );
    // Make the tree removable whatever modes the manifest set, then remove it.
    let _ = std::process::Command::new("chmod")
        .args(["-R", "u+rwx"])
        .arg(&target)
        .status();
    std::fs::remove_dir_all(&target).unwrap();
});
