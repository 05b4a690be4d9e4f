//! The store is root-only: what it writes is 0600 (files) and 0700 (directories) from the
//! moment it exists, and opening a store made before that tightens it.

use si_proto::manifest::{Entry, Kind, Manifest};
use si_store::Store;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Every path under `root` with its mode, root included.
fn modes(root: &Path) -> Vec<(String, u32, bool)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        out.push((
            p.display().to_string(),
            md.permissions().mode() & 0o7777,
            md.is_dir(),
        ));
        if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
    }
    out
}

fn fill(store: &Store) {
    let mut w = store.pack_writer().unwrap();
    let d = w.add_raw(b"root:$6$secret:19000:0:99999:7:::\n").unwrap();
    w.finish().unwrap();
    let m = Manifest {
        entries: vec![
            Entry {
                path: vec![],
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                xattrs: vec![],
            },
            Entry {
                path: b"shadow".to_vec(),
                kind: Kind::File {
                    size: 34,
                    chunks: vec![si_proto::Chunk {
                        offset: 0,
                        len: 34,
                        digest: d,
                    }],
                },
                mode: 0o600,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                xattrs: vec![],
            },
        ],
    };
    store
        .record_version("img", &m, Default::default(), Some("layout = 1"))
        .unwrap();
    store.copy("img", "img2").unwrap();
}

#[test]
fn what_the_store_writes_is_root_only() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    let store = Store::open(&root).unwrap();
    fill(&store);
    let _lock = store.writer_lock().unwrap();
    let all = modes(&root);
    assert!(all.iter().any(|(p, _, _)| p.ends_with(".pack")));
    assert!(all.iter().any(|(p, _, _)| p.ends_with("img2/1/manifest")));
    for (p, mode, dir) in &all {
        let want = if *dir { 0o700 } else { 0o600 };
        assert_eq!(*mode & 0o077, 0, "{p} is {mode:o}");
        assert_eq!(*mode, want, "{p} is {mode:o}");
    }
}

#[test]
fn opening_an_older_store_tightens_it() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    let store = Store::open(&root).unwrap();
    fill(&store);
    drop(store);
    // As a store made before looked: world-readable files, open directories.
    for (p, _, dir) in modes(&root) {
        let m = if dir { 0o755 } else { 0o644 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    let store = Store::open(&root).unwrap();
    for (p, mode, _) in modes(&root) {
        assert_eq!(mode & 0o077, 0, "{p} still {mode:o}");
    }
    // And it still reads.
    assert_eq!(store.manifest("img2", 1).unwrap().entries.len(), 2);
}
