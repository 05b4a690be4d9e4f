//! One chunking rule (`si_tree::chunker`): the same file content with the same hole map chunks
//! identically through capture (a scan of a directory), tar import (plain, GNU tar's sparse
//! formats, si's own export) and the update's re-chunking of a local file.

use si_proto::manifest::{Chunk, Kind, Manifest};
use si_proto::Digest;
use si_store::Store;
use si_tests::rand_bytes;
use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

const MIB: u64 = 1 << 20;
const T: u64 = si_proto::limits::CHUNK_THRESHOLD;

/// The files every path chunks: around the threshold, a multi-MiB random file with a run of
/// zeros (data, not a hole), and a sparse file with holes between data extents small and large,
/// ending in a hole.
fn make_files(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
    std::fs::write(dir.join("small"), rand_bytes(5000, 1)).unwrap();
    std::fs::write(dir.join("under"), rand_bytes(T as usize - 1, 2)).unwrap();
    std::fs::write(dir.join("at"), rand_bytes(T as usize, 3)).unwrap();
    std::fs::write(dir.join("over"), rand_bytes(T as usize + 1, 4)).unwrap();
    let mut big = rand_bytes(9 * MIB as usize + 4321, 5);
    big[3 << 20..5 << 20].fill(0);
    std::fs::write(dir.join("big"), big).unwrap();
    let f = std::fs::File::create(dir.join("sparse")).unwrap();
    f.set_len(64 * MIB).unwrap();
    f.write_all_at(&rand_bytes(3 * MIB as usize, 6), 0).unwrap();
    f.write_all_at(b"data in the middle", 32 * MIB).unwrap();
    f.write_all_at(&rand_bytes(2 * MIB as usize, 7), 40 * MIB)
        .unwrap();
    f.sync_all().unwrap();
    let md = f.metadata().unwrap();
    assert!(md.blocks() * 512 < md.len(), "the filesystem keeps holes");
}

/// Chunk lists by file name.
fn chunks_of(m: &Manifest) -> BTreeMap<String, (u64, Vec<Chunk>)> {
    m.entries
        .iter()
        .filter_map(|e| match &e.kind {
            Kind::File { size, chunks } => Some((e.path_lossy(), (*size, chunks.clone()))),
            _ => None,
        })
        .collect()
}

fn capture(dir: &Path) -> BTreeMap<String, (u64, Vec<Chunk>)> {
    struct Discard;
    impl si_tree::scan::BlobSink for Discard {
        fn blob(&mut self, _: Digest, _: u32, _: Vec<u8>) -> anyhow::Result<()> {
            Ok(())
        }
    }
    let cfg = si_tree::scan::ScanConfig::new(dir);
    chunks_of(
        &si_tree::scan::scan(&cfg, &Default::default(), &mut Discard)
            .unwrap()
            .manifest,
    )
}

fn import(store: &Store, tar: &Path, image: &str) -> BTreeMap<String, (u64, Vec<Chunk>)> {
    si_imaging::tarball::import(store, tar, image).unwrap();
    chunks_of(&store.manifest(image, 1).unwrap())
}

fn gnu_tar(dir: &Path, out: &Path, args: &[&str]) {
    let st = std::process::Command::new("tar")
        .args(args)
        .arg("-cf")
        .arg(out)
        .arg("-C")
        .arg(dir)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success(), "tar {args:?}");
}

#[test]
fn same_content_chunks_the_same_through_every_path() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("files");
    make_files(&dir);
    let want = capture(&dir);
    assert_eq!(want.len(), 7);
    let (_, sparse) = &want["sparse"];
    assert!(
        sparse.len() > 4 && sparse.iter().map(|c| c.len as u64).sum::<u64>() < 6 * MIB,
        "capture keeps the holes: {sparse:?}"
    );
    assert_eq!(want["at"].1.len(), 1);
    assert!(want["over"].1.len() > 1);
    let store = Store::open(&t.path().join("store")).unwrap();

    // Tar with sparse maps: GNU tar's pax formats and its old GNU format, and si's own export.
    let sparse_tars: &[(&str, &[&str])] = &[
        (
            "pax00",
            &["--sparse", "--format=posix", "--sparse-version=0.0"],
        ),
        (
            "pax01",
            &["--sparse", "--format=posix", "--sparse-version=0.1"],
        ),
        (
            "pax10",
            &["--sparse", "--format=posix", "--sparse-version=1.0"],
        ),
        ("gnu", &["--sparse", "--format=gnu"]),
    ];
    for (name, args) in sparse_tars {
        let tarf = t.path().join(format!("{name}.tar"));
        gnu_tar(&dir, &tarf, args);
        assert_eq!(import(&store, &tarf, name), want, "tar {args:?}");
    }
    let exported = t.path().join("export.tar");
    si_imaging::tarball::export(&store, "pax10", 1, &exported).unwrap();
    assert_eq!(import(&store, &exported, "reimported"), want, "si's export");
    // GNU tar reads si's sparse members back to the same files, holes included.
    let out = t.path().join("extracted");
    std::fs::create_dir(&out).unwrap();
    let st = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&exported)
        .arg("-C")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(capture(&out), want, "GNU tar's extraction of si's export");

    // Tar without sparse maps: the sparse file is one extent, zeros and all. It chunks as a
    // dense copy of it captures.
    let plain = t.path().join("plain.tar");
    gnu_tar(&dir, &plain, &["--format=posix"]);
    let got = import(&store, &plain, "plain");
    let dense = t.path().join("dense");
    std::fs::create_dir(&dense).unwrap();
    std::fs::write(
        dense.join("sparse"),
        std::fs::read(dir.join("sparse")).unwrap(),
    )
    .unwrap();
    let dense = capture(&dense);
    for (name, c) in &got {
        let expect = if name == "sparse" {
            &dense["sparse"]
        } else {
            &want[name]
        };
        assert_eq!(c, expect, "plain tar: {name}");
    }

    // The update's re-chunking of a local file (the old version of a changed file).
    for (name, (_, chunks)) in &want {
        let local = si_agent::update::local_chunks(&dir.join(name)).unwrap();
        assert_eq!(&local, chunks, "update's local chunks of {name}");
    }
}
