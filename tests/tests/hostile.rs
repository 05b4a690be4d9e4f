//! A hostile or compromised master cannot make a node write outside its target root: the real
//! `si-updateclient` against a hand-written adversary speaking the si protocol on loopback,
//! which serves manifests with `..` and absolute paths, entries under a symlink, and a tree
//! meant to be written through a symlink the node already has.

use si_proto::frame::{read_frame, write_data, write_msg, Frame};
use si_proto::manifest::{Chunk, Entry, Kind, Manifest};
use si_proto::msg::{ImageVersionInfo, Msg};
use si_proto::stream::BufStream;
use si_proto::Digest;
use si_tests::bin;
use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;

fn entry(path: &[u8], kind: Kind) -> Entry {
    Entry {
        path: path.to_vec(),
        kind,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        mtime_nsec: 0,
        xattrs: vec![],
    }
}

fn file(path: &[u8], data: &[u8], objects: &mut HashMap<Digest, Vec<u8>>) -> Entry {
    let d = Digest::of(data);
    objects.insert(d, data.to_vec());
    entry(
        path,
        Kind::File {
            size: data.len() as u64,
            chunks: vec![Chunk {
                offset: 0,
                len: data.len() as u32,
                digest: d,
            }],
        },
    )
}

/// The adversary is a compromised master: it holds the CA the node pins (so TLS and, later,
/// signatures pass), and what it serves is all that stands between the node and its root.
fn authority() -> &'static si_trust::ca::Authority {
    static CA: std::sync::OnceLock<si_trust::ca::Authority> = std::sync::OnceLock::new();
    CA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        si_trust::ca::Authority::open_or_create(&dir.join("ca"), &[]).unwrap()
    })
}

/// Serves `entries` (encoded as given, never validated) as image "evil" version 1 to one
/// connection after another, over TLS, with the objects it is asked for.
fn adversary(entries: Vec<Entry>, objects: HashMap<Digest, Vec<u8>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (bytes, manifest_digest) = Manifest { entries }.encode_with_digest();
    let tls = authority().server_config().unwrap();
    std::thread::spawn(move || {
        for sock in l.incoming() {
            let Ok(sock) = sock else { return };
            let conn = rustls::ServerConnection::new(tls.clone()).unwrap();
            let mut w = BufStream::new(rustls::StreamOwned::new(conn, sock));
            let _ = (|| -> anyhow::Result<()> {
                loop {
                    let Some(Frame::Msg(m)) = read_frame(&mut w)? else {
                        return Ok(());
                    };
                    match m {
                        Msg::Hello { .. } => write_msg(
                            &mut w,
                            &Msg::Welcome {
                                version: si_proto::msg::PROTOCOL_VERSION,
                                server: "adversary".into(),
                            },
                        )?,
                        Msg::GetManifest { .. } | Msg::GetManifestDelta { .. } => {
                            write_msg(
                                &mut w,
                                &Msg::ManifestIs {
                                    info: ImageVersionInfo {
                                        image: "evil".into(),
                                        version: 1,
                                        created: "2026-01-01T00:00:00Z".into(),
                                        entries: 0,
                                        bytes: 0,
                                    },
                                    digest: manifest_digest,
                                    bytes: bytes.len() as u64,
                                    signature: authority()
                                        .sign_version("evil", 1, &manifest_digest)
                                        .unwrap(),
                                },
                            )?;
                            write_data(&mut w, &bytes)?;
                        }
                        Msg::Want(ds) => {
                            for d in ds {
                                let data = objects.get(&d).cloned().unwrap_or_default();
                                write_msg(
                                    &mut w,
                                    &Msg::Blob {
                                        digest: d,
                                        raw_len: data.len() as u32,
                                    },
                                )?;
                                write_data(&mut w, &zstd::encode_all(&data[..], 1)?)?;
                            }
                        }
                        Msg::Report { .. } => write_msg(&mut w, &Msg::Ok)?,
                        _ => return Ok(()),
                    }
                    w.flush()?;
                }
            })();
        }
    });
    addr
}

fn update(server: &str, root: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("si-updateclient"))
        .env("SI_CA_FINGERPRINT", authority().fingerprint().to_string())
        .args([
            "--server",
            server,
            "--image",
            "evil",
            "--no-default-excludes",
        ])
        .arg("--root")
        .arg(root)
        .arg("--state-dir")
        .arg(root.with_extension("state"))
        .args(extra)
        .output()
        .unwrap()
}

/// Every regular file under `dir`, as paths relative to it.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

#[test]
fn hostile_manifests_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let mut objects = HashMap::new();
    let cases: Vec<(&str, Vec<Entry>)> = vec![
        (
            "dot-dot",
            vec![
                entry(b"", Kind::Dir),
                file(b"../outside/pwned", b"x", &mut objects),
            ],
        ),
        (
            "absolute",
            vec![
                entry(b"", Kind::Dir),
                file(b"/tmp/pwned", b"x", &mut objects),
            ],
        ),
        (
            "dot-dot inside",
            vec![
                entry(b"", Kind::Dir),
                entry(b"a", Kind::Dir),
                file(b"a/../../outside/pwned", b"x", &mut objects),
            ],
        ),
        (
            "under a symlink",
            vec![
                entry(b"", Kind::Dir),
                entry(
                    b"link",
                    Kind::Symlink {
                        target: outside.as_os_str().as_encoded_bytes().to_vec(),
                    },
                ),
                file(b"link/pwned", b"x", &mut objects),
            ],
        ),
        (
            "hard link out",
            vec![
                entry(b"", Kind::Dir),
                entry(
                    b"h",
                    Kind::Hardlink {
                        target: b"../outside/victim".to_vec(),
                    },
                ),
            ],
        ),
    ];
    std::fs::write(outside.join("victim"), b"keep").unwrap();
    for (name, entries) in cases {
        let server = adversary(entries, objects.clone());
        let root = t.path().join(format!("node-{}", name.replace(' ', "-")));
        let out = update(&server, &root, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted:\n{err}");
        assert!(
            err.contains("manifest entry"),
            "{name}: the error does not name the entry:\n{err}"
        );
        assert_eq!(
            files(&outside),
            vec!["victim".to_string()],
            "{name}: wrote outside"
        );
        assert!(!Path::new("/tmp/pwned").exists(), "{name}");
    }
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
}

/// A valid image whose directory `etc` is, on the node, a symlink pointing outside: the
/// update replaces the symlink with a real directory and writes nothing through it.
#[test]
fn node_symlinks_are_not_followed() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let mut objects = HashMap::new();
    let entries = vec![
        entry(b"", Kind::Dir),
        entry(b"etc", Kind::Dir),
        file(b"etc/passwd", b"root:x:0:0::/root:/bin/sh\n", &mut objects),
        entry(b"var", Kind::Dir),
        file(b"var/x", b"x", &mut objects),
    ];
    let server = adversary(entries, objects);
    let root = t.path().join("node");
    std::fs::create_dir_all(root.join("var")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("etc")).unwrap();
    // var/x is a symlink out too: the file must replace the link, not write through it.
    std::os::unix::fs::symlink(outside.join("x"), root.join("var/x")).unwrap();
    let out = update(&server, &root, &["--force"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        files(&outside).is_empty(),
        "wrote through a symlink: {:?}",
        files(&outside)
    );
    assert!(root.join("etc").symlink_metadata().unwrap().is_dir());
    assert_eq!(
        std::fs::read(root.join("etc/passwd")).unwrap(),
        b"root:x:0:0::/root:/bin/sh\n"
    );
    assert!(root.join("var/x").symlink_metadata().unwrap().is_file());
}
