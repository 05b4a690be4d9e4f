//! Invariant: errors are fine, panics are bugs. Whatever bytes a client sends on one
//! connection, the HTTP server answers with a well-formed status line or closes, and never
//! serves a file outside its root (the fixture keeps a secret beside the root, and a
//! root-only file inside it).
#![no_main]
use libfuzzer_sys::fuzz_target;
use si_boot::bootcfg::Generated;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::LazyLock;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

static FIX: LazyLock<Fixture> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::write(root.join("vmlinuz"), b"kernel-bytes").unwrap();
    std::fs::write(root.join("boot/x.ipxe"), b"#!ipxe\n").unwrap();
    std::fs::write(dir.path().join("secret"), b"SECRET-OUTSIDE").unwrap();
    std::fs::write(root.join("private"), b"SECRET-INSIDE").unwrap();
    std::fs::set_permissions(root.join("private"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("../secret", root.join("out")).unwrap();
    let root = std::fs::canonicalize(root).unwrap();
    Fixture { _dir: dir, root }
});

fuzz_target!(|data: &[u8]| {
    let gen = Generated::new([("boot/n1.ipxe".to_string(), "#!ipxe\nchain x\n".to_string())].into());
    let out = si_boot::http::answer_bytes(&FIX.root, gen, data);
    if !out.is_empty() {
        assert!(out.starts_with(b"HTTP/1."), "{:?}", String::from_utf8_lossy(&out[..out.len().min(64)]));
    }
    let has = |needle: &[u8]| out.windows(needle.len()).any(|w| w == needle);
    assert!(!has(b"SECRET-OUTSIDE") && !has(b"SECRET-INSIDE"));
});
