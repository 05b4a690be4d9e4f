//! Deploy and update through the real image service, in-process, over loopback.

use si_agent::update::{self, OptionArgs};
use si_imaging::getimage as capture;
use si_store::Store;
use si_tests::rand_bytes;
use std::path::Path;
use std::sync::Arc;

/// The master's CA for this test process (in-process, like the service).
fn authority() -> &'static si_trust::ca::Authority {
    static CA: std::sync::OnceLock<si_trust::ca::Authority> = std::sync::OnceLock::new();
    CA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        si_trust::ca::Authority::open_or_create(&dir.join("ca"), &[]).unwrap()
    })
}

fn pin() -> String {
    authority().fingerprint().to_string()
}

fn connector() -> si_trust::Connector {
    si_trust::Connector::master(authority().fingerprint(), None).unwrap()
}

/// Starts the image service (TLS) on an ephemeral port; returns its address.
fn start_server(store: &Path) -> String {
    start_server_with(store, None)
}

fn start_server_with(store: &Path, report: Option<si_imageserver::service::ReportHook>) -> String {
    start_server_over(store, report, true)
}

fn start_server_over(
    store: &Path,
    report: Option<si_imageserver::service::ReportHook>,
    tls: bool,
) -> String {
    let store = Arc::new(Store::open(store).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap().to_string()).unwrap();
            let tls = if tls {
                si_trust::Acceptor::tls(authority().server_config().unwrap())
            } else {
                si_trust::Acceptor::Insecure
            };
            let mut cfg = si_imageserver::service::ServeConfig::new(tls);
            cfg.signer = Some(Arc::new(|i: &str, v: u32, d: &si_proto::Digest| {
                authority().sign_version(i, v, d)
            }));
            si_imageserver::service::run(l, store, cfg, report, std::future::pending())
                .await
                .unwrap();
        });
    });
    rx.recv().unwrap()
}

fn args(server: &str, image: &str, root: &Path) -> OptionArgs {
    OptionArgs {
        server: server.into(),
        image: Some(image.into()),
        root: root.into(),
        no_default_excludes: true,
        ca_fingerprint: Some(pin()),
        ..Default::default()
    }
}

fn run(a: OptionArgs) -> anyhow::Result<update::UpdateSummary> {
    let o = update::options(a)?;
    update::update(&o, &mut std::io::sink())
}

/// Compares two trees by their scanned manifests (root metadata aside).
fn same_tree(a: &Path, b: &Path, ignore: &[&str]) {
    let scan = |p: &Path| {
        let mut cfg = si_tree::scan::ScanConfig::new(p);
        cfg.excludes = si_tree::exclude::Excludes::new(ignore).unwrap();
        struct D;
        impl si_tree::scan::BlobSink for D {
            fn blob(&mut self, _: si_proto::Digest, _: u32, _: Vec<u8>) -> anyhow::Result<()> {
                Ok(())
            }
        }
        si_tree::scan::scan(&cfg, &Default::default(), &mut D)
            .unwrap()
            .manifest
            .entries
    };
    let (x, y) = (scan(a), scan(b));
    assert_eq!(x.len(), y.len(), "entry counts differ");
    for (e, f) in x.iter().zip(&y).skip(1) {
        assert_eq!(e, f, "{} differs", e.path_lossy());
    }
}

#[test]
fn deploy_update_resume_and_safety() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("d/sub")).unwrap();
    std::fs::create_dir_all(src.join("becomes-link")).unwrap();
    std::fs::write(src.join("becomes-link/x"), b"x").unwrap();
    for i in 0..200 {
        std::fs::write(
            src.join(format!("d/f{i}")),
            rand_bytes(2000 + i * 10, i as u64),
        )
        .unwrap();
    }
    std::fs::write(src.join("big"), rand_bytes(16 << 20, 7)).unwrap();
    std::fs::write(src.join("becomes-dir"), b"file").unwrap();
    std::fs::write(src.join("gone"), b"bye").unwrap();
    std::os::unix::fs::symlink("d/f1", src.join("link")).unwrap();
    std::fs::hard_link(src.join("d/f2"), src.join("hard")).unwrap();
    let store_dir = t.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let server = start_server(&store_dir);

    // Fresh deploy into an empty root.
    let node = t.path().join("node");
    let s = run(args(&server, "img", &node)).unwrap();
    assert_eq!(s.version, 1);
    // The summary counts what moved: every distinct object once.
    let distinct: std::collections::HashSet<_> = store
        .manifest("img", 1)
        .unwrap()
        .digests()
        .map(|c| c.digest)
        .collect();
    assert!(distinct.len() > 200);
    assert_eq!(s.fetched_objects, distinct.len() as u64);
    same_tree(&src, &node, &["/var"]);
    assert!(node.join("var/lib/si/installed.toml").exists());

    // Version 2: add, change (a 1 MiB region inside the big file), delete, file -> dir,
    // dir -> symlink, a mode change only.
    std::fs::write(src.join("new"), b"new file").unwrap();
    let mut big = std::fs::read(src.join("big")).unwrap();
    big[8 << 20..9 << 20].copy_from_slice(&rand_bytes(1 << 20, 99));
    std::fs::write(src.join("big"), &big).unwrap();
    std::fs::remove_file(src.join("gone")).unwrap();
    std::fs::remove_file(src.join("becomes-dir")).unwrap();
    std::fs::create_dir(src.join("becomes-dir")).unwrap();
    std::fs::write(src.join("becomes-dir/inside"), b"in").unwrap();
    std::fs::remove_dir_all(src.join("becomes-link")).unwrap();
    std::os::unix::fs::symlink("d", src.join("becomes-link")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(src.join("d/f3"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(src.join("d/f4"), b"changed").unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();

    // Dry run lists and changes nothing.
    let o = update::options(args(&server, "img", &node)).unwrap();
    let mut out = Vec::new();
    update::update(
        &update::UpdateOptions {
            dry_run: true,
            ..o.clone()
        },
        &mut out,
    )
    .unwrap();
    let listing = String::from_utf8(out).unwrap();
    for l in [
        "+ /new",
        "~ /big",
        "- /gone",
        "~ /becomes-dir",
        "~ /becomes-link",
        "m /d/f3",
        "~ /d/f4",
    ] {
        assert!(listing.contains(l), "{l} missing from:\n{listing}");
    }
    assert!(node.join("gone").exists());

    let s = run(args(&server, "img", &node)).unwrap();
    assert_eq!(s.version, 2);
    same_tree(&src, &node, &["/var"]);
    assert!(
        s.fetched_bytes < 3 << 20,
        "1 MiB changed inside 16 MiB moved {} bytes",
        s.fetched_bytes
    );
    assert!(s.wire_bytes < 4 << 20, "{} bytes on the wire", s.wire_bytes);
    assert!(
        s.local_objects > 0,
        "unchanged chunks of the big file come from the node"
    );

    // Nothing to do the second time.
    let s = run(args(&server, "img", &node)).unwrap();
    assert_eq!(
        (s.created, s.replaced, s.deleted, s.fetched_objects),
        (0, 0, 0, 0)
    );

    // Local drift: same size and mtime, different bytes; only --verify sees and repairs it.
    let f = node.join("d/f10");
    let md = std::fs::metadata(&f).unwrap();
    let mut data = std::fs::read(&f).unwrap();
    data[0] ^= 1;
    std::fs::write(&f, &data).unwrap();
    let mt = filetime_of(&md);
    rustix::fs::utimensat(rustix::fs::CWD, &f, &mt, rustix::fs::AtFlags::empty()).unwrap();
    let s = run(args(&server, "img", &node)).unwrap();
    assert_eq!(s.replaced, 0);
    let s = run(OptionArgs {
        verify: true,
        ..args(&server, "img", &node)
    })
    .unwrap();
    assert_eq!(s.replaced, 1);
    same_tree(&src, &node, &["/var"]);

    // A wrong image that would wipe most of the node is refused unless forced.
    let other = t.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("only"), b"1").unwrap();
    capture::commit(&store, &other, "tiny", &[], None).unwrap();
    let err = run(args(&server, "tiny", &node)).unwrap_err();
    assert!(format!("{err:#}").contains("--force"), "{err:#}");
    assert!(node.join("big").exists());

    // A missing image is a clear error.
    let err = run(args(&server, "nope", &node)).unwrap_err();
    assert!(format!("{err:#}").contains("no image named"), "{err:#}");
}

/// `installed.digests` only decides what is fetched early: a stale list is ignored, a lying
/// one (claiming objects the node lacks) or a missing one still gives an exact update.
#[test]
fn installed_digest_list_is_only_a_hint() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..50 {
        std::fs::write(src.join(format!("d/f{i}")), rand_bytes(3000, i)).unwrap();
    }
    let store_dir = t.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let server = start_server(&store_dir);
    let node = t.path().join("node");
    run(args(&server, "img", &node)).unwrap();
    let state = node.join("var/lib/si");
    let list = state.join("installed.digests");
    assert!(list.exists(), "a deploy records the digest list");

    let installed_digest = || -> si_proto::Digest {
        let i = update::read_installed(&state).unwrap();
        si_proto::Digest::from_hex(&i.manifest).unwrap()
    };
    let list_of = |manifest: si_proto::Digest, m: &si_proto::Manifest| -> Vec<u8> {
        let mut ds: Vec<[u8; 32]> = m.digests().map(|c| c.digest.0).collect();
        ds.sort();
        ds.dedup();
        let mut out = b"SIDG".to_vec();
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&manifest.0);
        ds.iter().for_each(|d| out.extend_from_slice(d));
        out
    };
    let change = |v: u64| {
        for i in 0..5 {
            std::fs::write(src.join(format!("d/f{i}")), rand_bytes(3000, 1000 * v + i)).unwrap();
        }
        std::fs::write(src.join(format!("new{v}")), rand_bytes(5000, v)).unwrap();
        capture::commit(&store, &src, "img", &[], None)
            .unwrap()
            .version
    };

    // A list naming the installed manifest but claiming every object of the next version:
    // nothing is fetched early, the walk finds what is missing.
    let v2 = change(2);
    let m2 = store.manifest("img", v2).unwrap();
    std::fs::write(&list, list_of(installed_digest(), &m2)).unwrap();
    let s = run(args(&server, "img", &node)).unwrap();
    assert_eq!((s.version, s.replaced, s.created), (v2, 5, 1));
    same_tree(&src, &node, &["/var"]);

    // A list made for another manifest is ignored (stale), and so is a missing one.
    let v3 = change(3);
    std::fs::write(&list, list_of(si_proto::Digest::of(b"other"), &m2)).unwrap();
    let s = run(args(&server, "img", &node)).unwrap();
    assert_eq!((s.version, s.fetched_objects), (v3, 6));
    same_tree(&src, &node, &["/var"]);
    let v4 = change(4);
    std::fs::remove_file(&list).unwrap();
    let s = run(args(&server, "img", &node)).unwrap();
    assert_eq!((s.version, s.fetched_objects), (v4, 6));
    same_tree(&src, &node, &["/var"]);
    assert!(list.exists(), "rewritten after the update");
}

fn filetime_of(md: &std::fs::Metadata) -> rustix::fs::Timestamps {
    use std::os::unix::fs::MetadataExt;
    let t = rustix::fs::Timespec {
        tv_sec: md.mtime(),
        tv_nsec: md.mtime_nsec() as _,
    };
    rustix::fs::Timestamps {
        last_access: t,
        last_modification: t,
    }
}

#[test]
fn default_update_excludes_keep_node_state() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::create_dir_all(src.join("var/log")).unwrap();
    std::fs::write(src.join("etc/hostname"), b"golden\n").unwrap();
    std::fs::write(src.join("etc/passwd"), b"root\n").unwrap();
    std::fs::write(src.join("etc/fstab"), b"golden fstab\n").unwrap();
    let store_dir = t.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let server = start_server(&store_dir);
    let node = t.path().join("node");
    std::fs::create_dir_all(node.join("etc")).unwrap();
    std::fs::create_dir_all(node.join("var/log")).unwrap();
    std::fs::write(node.join("etc/hostname"), b"node01\n").unwrap();
    std::fs::write(node.join("var/log/syslog"), b"log\n").unwrap();
    std::fs::write(node.join("etc/stale"), b"remove me\n").unwrap();
    let s = run(OptionArgs {
        no_default_excludes: false,
        force: true,
        ..args(&server, "img", &node)
    })
    .unwrap();
    assert_eq!(
        std::fs::read(node.join("etc/hostname")).unwrap(),
        b"node01\n"
    );
    assert_eq!(
        std::fs::read(node.join("var/log/syslog")).unwrap(),
        b"log\n"
    );
    assert!(!node.join("etc/fstab").exists(), "fstab is the node's own");
    assert_eq!(std::fs::read(node.join("etc/passwd")).unwrap(), b"root\n");
    assert!(!node.join("etc/stale").exists());
    assert_eq!(s.deleted, 1);
}

/// Node state two and more levels below an excluded directory (`/var/cache/*`, `/var/log/*`,
/// `/var/spool/*`) is neither overwritten, recreated nor fetched by an update, and the dry run
/// lists exactly what the update then does.
#[test]
fn update_excludes_cover_every_depth_below() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let deep = [
        "var/cache/debconf/config.dat",
        "var/log/apt/history.log",
        "var/spool/cron/crontabs/root",
    ];
    for p in deep {
        std::fs::create_dir_all(src.join(p).parent().unwrap()).unwrap();
        std::fs::write(src.join(p), format!("golden v1 {p}\n")).unwrap();
    }
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/passwd"), b"root v1\n").unwrap();
    let store_dir = t.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let server = start_server(&store_dir);
    // Version 1 everywhere (no excludes), as the installer leaves it.
    let node = t.path().join("node");
    run(args(&server, "img", &node)).unwrap();
    for p in deep {
        assert_eq!(
            std::fs::read_to_string(node.join(p)).unwrap(),
            format!("golden v1 {p}\n")
        );
    }

    // The node's own edits and deletions below the excluded directories.
    std::fs::write(node.join(deep[0]), b"node's debconf\n").unwrap();
    std::fs::write(node.join(deep[1]), b"node's log\n").unwrap();
    std::fs::remove_file(node.join(deep[2])).unwrap();
    // Version 2 changes those files, adds new ones below them, and changes one file outside.
    for p in deep {
        std::fs::write(src.join(p), format!("golden v2 {p}\n")).unwrap();
    }
    std::fs::create_dir_all(src.join("var/cache/apt/archives")).unwrap();
    std::fs::write(
        src.join("var/cache/apt/archives/big.deb"),
        rand_bytes(3 << 20, 11),
    )
    .unwrap();
    std::fs::write(src.join("etc/passwd"), b"root v2\n").unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();

    let with_defaults = || OptionArgs {
        no_default_excludes: false,
        ..args(&server, "img", &node)
    };
    let o = update::options(with_defaults()).unwrap();
    let mut out = Vec::new();
    update::update(
        &update::UpdateOptions {
            dry_run: true,
            ..o.clone()
        },
        &mut out,
    )
    .unwrap();
    let listing = String::from_utf8(out).unwrap();
    assert!(listing.contains("~ /etc/passwd"), "{listing}");
    for l in listing.lines() {
        assert!(
            !["/var/cache/", "/var/log/", "/var/spool/"]
                .iter()
                .any(|d| l.contains(d)),
            "dry run would touch excluded state: {l}\nin:\n{listing}"
        );
    }

    let s = run(with_defaults()).unwrap();
    assert_eq!(s.version, 2);
    assert_eq!((s.created, s.replaced, s.deleted), (0, 1, 0), "{s:?}");
    assert_eq!(s.fetched_objects, 1, "only /etc/passwd's new object: {s:?}");
    assert!(s.fetched_bytes < 1 << 20, "{s:?}");
    assert_eq!(
        std::fs::read(node.join("etc/passwd")).unwrap(),
        b"root v2\n"
    );
    assert_eq!(
        std::fs::read(node.join(deep[0])).unwrap(),
        b"node's debconf\n"
    );
    assert_eq!(std::fs::read(node.join(deep[1])).unwrap(), b"node's log\n");
    assert!(!node.join(deep[2]).exists(), "deleted node state recreated");
    assert!(
        !node.join("var/cache/apt").exists(),
        "excluded tree created"
    );
}

#[test]
fn hooks_and_triggers_run_around_the_swap() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let log = t.path().join("log");
    std::fs::create_dir_all(src.join("etc/si")).unwrap();
    std::fs::create_dir_all(src.join("etc/svc")).unwrap();
    std::fs::write(src.join("etc/svc/conf"), b"v1").unwrap();
    std::fs::write(src.join("etc/other"), b"v1").unwrap();
    let trig = format!(
        "[[trigger]]\npaths = [\"/etc/svc/**\"]\nservice = \"svc\"\nstop = \"echo stop $SI_VERSION >> {0}\"\nstart = \"echo start >> {0}\"\n",
        log.display()
    );
    std::fs::write(src.join("etc/si/triggers.toml"), trig).unwrap();
    let store_dir = t.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let server = start_server(&store_dir);
    let node = t.path().join("node");
    run(args(&server, "img", &node)).unwrap();
    std::fs::write(src.join("etc/other"), b"v2").unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let hooks = |a: OptionArgs| OptionArgs {
        pre_hook: vec![format!("echo pre >> {}", log.display())],
        post_hook: vec![format!("echo post >> {}", log.display())],
        ..a
    };
    run(hooks(args(&server, "img", &node))).unwrap();
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "pre\npost\n",
        "no trigger for an unrelated change"
    );
    std::fs::write(src.join("etc/svc/conf"), b"v3").unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    std::fs::remove_file(&log).unwrap();
    run(hooks(args(&server, "img", &node))).unwrap();
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "pre\nstop 3\nstart\npost\n"
    );
}

/// A report the master could not store is answered with an error the node sees, and a report
/// it stored with Ok; a server at its cap answers Busy, which the client retries.
#[test]
fn reports_are_acknowledged_only_when_stored() {
    let t = tempfile::tempdir().unwrap();
    let hook: si_imageserver::service::ReportHook = Arc::new(|node: &str, _: &str, _: &str| {
        if node == "known" {
            Ok(())
        } else {
            anyhow::bail!("no node {node:?} in the inventory")
        }
    });
    let server = start_server_with(&t.path().join("store"), Some(hook));
    let timeout = std::time::Duration::from_secs(5);
    let mut c = si_agent::pull::Client::connect(&server, timeout, &connector()).unwrap();
    c.report("known", "installed", "").unwrap();
    let mut c = si_agent::pull::Client::connect(&server, timeout, &connector()).unwrap();
    let e = c.report("stranger", "installed", "").unwrap_err();
    assert!(format!("{e:#}").contains("report not stored"), "{e:#}");
}

/// Hundreds of idle and half-sent connections against the image service: a real node is still
/// served at normal speed while they are open, a source past its cap is refused at once, and the
/// service closes every one of them by its deadlines (before, they held their slots forever).
/// Loopback only: the hostile connections come from 127.0.0.2-127.0.0.39 (Linux routes all of
/// 127/8 to `lo`), the node from 127.0.0.1.
#[test]
fn idle_and_half_sent_connections_do_not_starve_a_node() {
    use si_proto::frame::MAX_FRAME;
    use si_proto::handshake::{self, Credentials};
    use si_proto::msg::Role;
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..300 {
        std::fs::write(src.join(format!("d/f{i}")), rand_bytes(4000 + i, i as u64)).unwrap();
    }
    std::fs::write(src.join("big"), rand_bytes(24 << 20, 3)).unwrap();
    let store_dir = t.path().join("store");
    let store = Arc::new(Store::open(&store_dir).unwrap());
    capture::commit(&store, &src, "img", &[], None).unwrap();

    let per_source = 8;
    // Long enough that the load stays open through the loaded deploy (checked below).
    const DEADLINE: Duration = Duration::from_secs(8);
    let mut cfg = si_imageserver::service::ServeConfig::new(si_trust::Acceptor::tls(
        authority().server_config().unwrap(),
    ));
    cfg.max_connections = 400;
    cfg.per_source = per_source;
    cfg.message_deadline = DEADLINE;
    cfg.idle_timeout = DEADLINE;
    cfg.signer = Some(Arc::new(|i: &str, v: u32, d: &si_proto::Digest| {
        authority().sign_version(i, v, d)
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let l = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = l.local_addr().unwrap();
    rt.spawn(si_imageserver::service::run(
        l,
        store.clone(),
        cfg,
        None,
        std::future::pending(),
    ));
    let server = addr.to_string();

    let deploy = |name: &str| {
        let node = t.path().join(name);
        let start = Instant::now();
        let s = run(args(&server, "img", &node)).unwrap();
        let took = start.elapsed();
        assert_eq!(s.version, 1);
        same_tree(&src, &node, &["/var"]);
        took
    };
    let unloaded = deploy("node-unloaded");

    // A TCP connection from a chosen loopback source address (blocking).
    let dial = |src_ip: std::net::IpAddr| -> std::net::TcpStream {
        rt.block_on(async {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind((src_ip, 0).into()).unwrap();
            let c = sock.connect(addr).await.unwrap().into_std().unwrap();
            c.set_nonblocking(false).unwrap();
            c
        })
    };
    // 300 hostile connections, three kinds in turn: silent (not even a TLS hello), Hello then
    // nothing, Hello then a frame header claiming 8 MiB followed by 1000 bytes and silence (the
    // last two inside TLS, as a real client speaks).
    let creds = Credentials {
        token: String::new(),
        client: "hostile".into(),
    };
    enum Hostile {
        Raw(std::net::TcpStream),
        Tls(Box<si_trust::ClientStream>),
    }
    let mut hostile = Vec::new();
    for i in 0..300usize {
        let src_ip: std::net::IpAddr = format!("127.0.0.{}", 2 + i / per_source).parse().unwrap();
        let c = dial(src_ip);
        if i % 3 == 0 {
            hostile.push(Hostile::Raw(c));
            continue;
        }
        let mut c = connector().wrap(c).unwrap();
        handshake::connect(&mut c, Role::Deploy, &creds).unwrap();
        if i % 3 == 2 {
            let mut h = (MAX_FRAME as u32).to_le_bytes().to_vec();
            h.push(1);
            h.extend_from_slice(&[0u8; 1000]);
            c.write_all(&h).unwrap();
            c.flush().unwrap();
        }
        hostile.push(Hostile::Tls(Box::new(c)));
    }
    let opened = Instant::now();

    // One more from a source at its cap is refused at once.
    {
        let mut c = connector().wrap(dial([127, 0, 0, 2].into())).unwrap();
        c.tcp()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let m = si_proto::frame::recv_msg(&mut c);
        assert!(
            matches!(
                m,
                Err(si_proto::frame::FrameError::Peer {
                    kind: si_proto::msg::ErrorKind::Busy,
                    ..
                })
            ),
            "a source past its cap is answered Busy at once: {m:?}"
        );
    }

    // A real node while all 300 are open.
    let loaded = deploy("node-loaded");
    assert!(
        opened.elapsed() < DEADLINE,
        "the load must stay open through the deploy for the figure to mean anything"
    );
    eprintln!(
        "deploy of 24 MiB + 300 files: unloaded {unloaded:?}, with 300 idle/half-sent connections open {loaded:?}"
    );
    assert!(
        loaded < unloaded * 2 + Duration::from_secs(1),
        "loaded {loaded:?} against unloaded {unloaded:?}"
    );

    // Every hostile connection is closed by the service within its deadlines (idle, message,
    // Hello, TLS handshake), not held: reading reaches the end within a bounded time.
    let until = opened + DEADLINE * 2;
    for (i, h) in hostile.into_iter().enumerate() {
        let left = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let mut sink = Vec::new();
        let r = match h {
            Hostile::Raw(mut c) => {
                c.set_read_timeout(Some(left)).unwrap();
                c.read_to_end(&mut sink)
            }
            Hostile::Tls(mut c) => {
                c.tcp().set_read_timeout(Some(left)).unwrap();
                c.read_to_end(&mut sink)
            }
        };
        // Closed means the end of the stream or a reset, never a read timing out.
        if let Err(e) = &r {
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "hostile connection {i} (kind {}) still open {:?} after the load was opened",
                i % 3,
                opened.elapsed()
            );
        }
    }
    eprintln!(
        "all 300 closed by the service {:?} after they were opened",
        opened.elapsed()
    );
    // The slots came back: a third node is served.
    deploy("node-after");
}

/// TLS is what a node speaks unless told otherwise: a node pinning another CA is refused at the
/// handshake, at once (not retried as if the server were busy); one given no pin is told how to
/// get one.
#[test]
fn a_wrong_or_missing_pin_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let server = start_server(&t.path().join("store"));
    let other = si_trust::ca::Authority::open_or_create(&t.path().join("other-ca"), &[]).unwrap();
    let timeout = std::time::Duration::from_secs(5);
    let started = std::time::Instant::now();
    let wrong = si_trust::Connector::master(other.fingerprint(), None).unwrap();
    let e = si_agent::pull::Client::connect(&server, timeout, &wrong)
        .err()
        .expect("a wrong CA is refused");
    assert!(format!("{e:#}").contains("TLS handshake"), "{e:#}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let none = si_agent::pull::TrustArgs {
        identity_dir: Some(t.path().join("no-identity")),
        ..Default::default()
    };
    let e = none.connector().unwrap_err();
    assert!(format!("{e:#}").contains("--ca-fingerprint"), "{e:#}");
    // The right pin lists.
    let mut c = si_agent::pull::Client::connect(&server, timeout, &connector()).unwrap();
    assert!(c.list().unwrap().is_empty());
    assert!(c.ca().is_some());
}

/// `--insecure` on both sides still deploys over plain TCP, and says so loudly: the real
/// si-updateclient logs a warning for it.
#[test]
fn insecure_still_works_and_warns() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"plain").unwrap();
    capture::commit(&Store::open(&store).unwrap(), &src, "img", &[], None).unwrap();
    let server = start_server_over(&store, None, false);
    let node = t.path().join("node");
    std::fs::create_dir_all(&node).unwrap();
    let out = std::process::Command::new(si_tests::bin("si-updateclient"))
        .args([
            "--server",
            &server,
            "--image",
            "img",
            "--no-default-excludes",
            "--insecure",
        ])
        .arg("--root")
        .arg(&node)
        .env_remove("SI_CA_FINGERPRINT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("WARN") && err.contains("--insecure"), "{err}");
    assert_eq!(std::fs::read(node.join("f")).unwrap(), b"plain");
    // Without --insecure the same client refuses to speak plain TCP to it.
    let out = std::process::Command::new(si_tests::bin("si-updateclient"))
        .args([
            "--server",
            &server,
            "--image",
            "img",
            "--no-default-excludes",
        ])
        .args(["--ca-fingerprint", &pin()])
        .arg("--root")
        .arg(&node)
        .output()
        .unwrap();
    assert!(!out.status.success());
    // And a client given --insecure against a TLS master is told to use TLS, at once, not
    // retried as if the master were down.
    let tls = start_server(&store);
    let started = std::time::Instant::now();
    let out = std::process::Command::new(si_tests::bin("si-updateclient"))
        .args(["--server", &tls, "--image", "img", "--no-default-excludes"])
        .arg("--insecure")
        .arg("--root")
        .arg(&node)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("speaks TLS only"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "refused at once, not retried: {:?}",
        started.elapsed()
    );
}

/// Versions are signed by the master's CA; a node checks the signature before it uses a
/// manifest. A signature replayed from another version, one made by another CA, or one
/// flipped by a bit is refused with a clear error, and the node keeps the version it has.
#[test]
fn tampered_signatures_are_refused_and_the_node_keeps_its_version() {
    let t = tempfile::tempdir().unwrap();
    let store_dir = t.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"one").unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let server = start_server(&store_dir);
    let node = t.path().join("node");
    std::fs::create_dir_all(&node).unwrap();
    run(args(&server, "img", &node)).unwrap();
    assert_eq!(std::fs::read(node.join("f")).unwrap(), b"one");
    // The service signed version 1 when it was first asked for, and stored the signature.
    let sig1 = store.signature("img", 1).unwrap().expect("v1 signed");
    std::fs::write(src.join("f"), b"two").unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let digest2 = si_imageserver::service::manifest_digest(&store, "img", 2).unwrap();
    let other = si_trust::ca::Authority::open_or_create(&t.path().join("other-ca"), &[]).unwrap();
    let good2 = authority().sign_version("img", 2, &digest2).unwrap();
    let mut flipped = good2.clone();
    flipped[0] ^= 0x40;
    for (what, bad) in [
        ("replayed from v1", sig1),
        (
            "another CA's",
            other.sign_version("img", 2, &digest2).unwrap(),
        ),
        ("flipped", flipped),
    ] {
        store.write_signature("img", 2, &bad).unwrap();
        let e = run(args(&server, "img", &node)).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("signature") && msg.contains("refusing"),
            "{what}: {msg}"
        );
        assert_eq!(std::fs::read(node.join("f")).unwrap(), b"one", "{what}");
        let inst = std::fs::read_to_string(node.join("var/lib/si/installed.toml")).unwrap();
        assert!(inst.contains("version = 1"), "{what}: {inst}");
    }
    store.write_signature("img", 2, &good2).unwrap();
    run(args(&server, "img", &node)).unwrap();
    assert_eq!(std::fs::read(node.join("f")).unwrap(), b"two");
}

/// Rewrites `image@v`'s record as builds before the manifest digest wrote it: only the BLAKE3
/// of the compressed manifest file.
fn downgrade_version(store: &Store, image: &str, v: u32) {
    let mut meta = store.meta(image, v).unwrap();
    meta.manifest_digest.clear();
    meta.manifest = si_proto::Digest::of(&store.manifest_bytes(image, v).unwrap()).to_hex();
    let p = store.root().join(format!("images/{image}/{v}/meta.toml"));
    let text = toml::to_string_pretty(&meta).unwrap();
    assert!(!text.contains("manifest-digest"), "{text}");
    std::fs::write(p, text).unwrap();
}

/// A store and a node written before the manifest digest (digests of compressed bytes) keep
/// working: the old versions deploy, the old installed state updates (by a delta), and the
/// node then records the new form.
#[test]
fn old_format_store_and_installed_state_still_deploy_and_update() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..40 {
        std::fs::write(src.join(format!("d/f{i}")), rand_bytes(3000, i)).unwrap();
    }
    let store_dir = t.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    downgrade_version(&store, "img", 1);
    let server = start_server(&store_dir);
    let node = t.path().join("node");
    let s = run(args(&server, "img", &node)).unwrap();
    assert_eq!(s.version, 1);
    same_tree(&src, &node, &["/var"]);

    // The node's state as an older build wrote it: installed.toml without digest-format and
    // with the compressed file's BLAKE3; installed.digests naming the same.
    let state = node.join("var/lib/si");
    let file_digest =
        si_proto::Digest::of(&std::fs::read(state.join("installed.manifest")).unwrap());
    let toml_path = state.join("installed.toml");
    let mut inst: toml::Table =
        toml::from_str(&std::fs::read_to_string(&toml_path).unwrap()).unwrap();
    assert_eq!(
        inst.remove("digest-format").and_then(|v| v.as_integer()),
        Some(2)
    );
    inst.insert("manifest".into(), file_digest.to_hex().into());
    std::fs::write(&toml_path, toml::to_string(&inst).unwrap()).unwrap();
    let list = state.join("installed.digests");
    let mut digests = std::fs::read(&list).unwrap();
    digests[8..40].copy_from_slice(&file_digest.0);
    std::fs::write(&list, &digests).unwrap();
    let old = update::read_installed(&state).unwrap();
    assert_eq!((old.digest_format, old.manifest), (1, file_digest.to_hex()));

    for i in 0..4 {
        std::fs::write(src.join(format!("d/f{i}")), rand_bytes(3000, 500 + i)).unwrap();
    }
    let v2 = capture::commit(&store, &src, "img", &[], None)
        .unwrap()
        .version;
    downgrade_version(&store, "img", v2);
    let s = run(args(&server, "img", &node)).unwrap();
    assert_eq!((s.version, s.replaced, s.fetched_objects), (v2, 4, 4));
    same_tree(&src, &node, &["/var"]);
    let now = update::read_installed(&state).unwrap();
    assert_eq!(now.digest_format, update::DIGEST_FORMAT);
    assert_eq!(
        now.manifest,
        store.manifest_digest("img", v2).unwrap().to_hex()
    );
    assert_eq!(
        store.manifest_digest("img", v2).unwrap(),
        store.manifest("img", v2).unwrap().digest()
    );

    // A new version beside the old ones (a store upgraded in place) updates the same way.
    std::fs::write(src.join("d/f0"), rand_bytes(3000, 900)).unwrap();
    let v3 = capture::commit(&store, &src, "img", &[], None)
        .unwrap()
        .version;
    let s = run(args(&server, "img", &node)).unwrap();
    assert_eq!((s.version, s.replaced, s.fetched_objects), (v3, 1, 1));
    same_tree(&src, &node, &["/var"]);
    assert!(store.fsck().unwrap().problems.is_empty());
}

/// An object corrupted on the master's disk: fsck names it; a node updating to the version
/// that holds it refuses the object, says which one, and keeps its old version whole.
#[test]
fn an_object_corrupted_on_the_master_is_refused_and_the_node_keeps_its_version() {
    let t = tempfile::tempdir().unwrap();
    let store_dir = t.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"one").unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let packs_v1 = store.list_packs().unwrap();
    // Version 2 adds 1 MiB of content of its own: its objects are in a pack of their own.
    let data = rand_bytes(1 << 20, 7);
    std::fs::write(src.join("big"), &data).unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let new_pack = store
        .list_packs()
        .unwrap()
        .into_iter()
        .find(|p| !packs_v1.contains(p))
        .expect("version 2 wrote a pack");
    let server = start_server(&store_dir);
    let node = t.path().join("node");
    std::fs::create_dir_all(&node).unwrap();
    run(OptionArgs {
        version: Some(1),
        ..args(&server, "img", &node)
    })
    .unwrap();

    // One byte flipped in the middle of version 2's pack.
    let p = store.pack_path(&new_pack, "pack");
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&p, &bytes).unwrap();
    let rep = Store::open(&store_dir).unwrap().fsck().unwrap();
    // fsck names the pack and the object.
    let corrupt = rep
        .problems
        .iter()
        .find_map(|m| {
            let rest = m.strip_prefix(&format!("pack {}: object ", new_pack.to_hex()))?;
            rest.split_once(" is corrupt").map(|(d, _)| d.to_string())
        })
        .unwrap_or_else(|| panic!("fsck names no corrupt object: {:?}", rep.problems));
    let big_chunks: Vec<String> = match &store.manifest("img", 2).unwrap().get(b"big").unwrap().kind
    {
        si_proto::manifest::Kind::File { chunks, .. } => {
            chunks.iter().map(|c| c.digest.to_hex()).collect()
        }
        k => panic!("big is a {}", k.name()),
    };
    assert!(big_chunks.contains(&corrupt), "{corrupt} is not big's");
    assert!(
        rep.problems.iter().any(|m| m.contains("img@2")),
        "fsck names the version: {:?}",
        rep.problems
    );
    // The node refuses that object, by name.
    let e = format!("{:#}", run(args(&server, "img", &node)).unwrap_err());
    assert!(
        e.contains(&format!("object {corrupt} is corrupt")),
        "the error names the object: {e}"
    );
    // The node still has version 1, whole.
    assert!(!node.join("big").exists());
    assert_eq!(std::fs::read(node.join("f")).unwrap(), b"one");
    let inst = std::fs::read_to_string(node.join("var/lib/si/installed.toml")).unwrap();
    assert!(inst.contains("version = 1"), "{inst}");
}

/// `--max-rate-kbit` caps what an update reads: 1.5 MB of incompressible content through a
/// 4 Mbit/s cap cannot arrive in less than its bytes at the cap (less the reader's 0.1 s of
/// burst); the tree still ends exact.
#[test]
fn a_bandwidth_cap_paces_the_pull() {
    let t = tempfile::tempdir().unwrap();
    let (store_dir, src) = (t.path().join("store"), t.path().join("src"));
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..6 {
        std::fs::write(src.join(format!("d/f{i}")), rand_bytes(250_000, i)).unwrap();
    }
    capture::commit(&Store::open(&store_dir).unwrap(), &src, "img", &[], None).unwrap();
    let server = start_server(&store_dir);
    let node = t.path().join("node");
    let kbit = 4_000;
    let start = std::time::Instant::now();
    let s = run(OptionArgs {
        max_rate_kbit: kbit,
        ..args(&server, "img", &node)
    })
    .unwrap();
    let took = start.elapsed().as_secs_f64();
    same_tree(&src, &node, &["/var"]);
    assert!(s.fetched_bytes >= 1_500_000, "{} bytes", s.fetched_bytes);
    let floor = s.fetched_bytes as f64 / (kbit as f64 * 125.0) - 0.1;
    assert!(
        took >= floor,
        "{} bytes in {took:.2} s through a {kbit} kbit/s cap (at least {floor:.2} s)",
        s.fetched_bytes
    );
}

/// A filesystem mounted on the node (a separate /srv of its layout) and versions that drop or
/// replace that directory. Dropped: what lies in it goes, the mount point stays (removing it
/// would fail half way, busy, after its content was gone). Replaced by a symlink: refused
/// before anything is changed, with the path and why; the node keeps its version.
#[test]
fn mount_points_are_kept_and_never_replaced() {
    si_tests::require_root!();
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store_dir, src) = (t.path().join("store"), t.path().join("src"));
    let store = Store::open(&store_dir).unwrap();
    std::fs::create_dir_all(src.join("srv/www")).unwrap();
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("srv/www/index.html"), b"v1\n").unwrap();
    std::fs::write(src.join("etc/role"), b"v1\n").unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let server = start_server(&store_dir);
    let node = t.path().join("node");
    std::fs::create_dir_all(node.join("srv")).unwrap();
    let m = node.join("srv");
    // An ext4 filesystem of its own, as a layout's /srv would be (the update descends into
    // local disk filesystems only).
    let img = t.path().join("srv.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    si_tests::run(std::process::Command::new("mkfs.ext4").arg("-q").arg(&img)).unwrap();
    si_tests::run(
        std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&m),
    )
    .unwrap();
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(m.clone());
    run(args(&server, "img", &node)).unwrap();
    assert_eq!(std::fs::read(m.join("www/index.html")).unwrap(), b"v1\n");

    // Version 2 has no /srv: its content goes, the mount point stays, still mounted.
    std::fs::remove_dir_all(src.join("srv")).unwrap();
    std::fs::write(src.join("etc/role"), b"v2\n").unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let s = run(args(&server, "img", &node)).unwrap();
    assert_eq!(s.version, 2);
    assert!(
        m.is_dir() && !m.join("www").exists(),
        "/srv kept and emptied"
    );
    assert!(
        m.join("lost+found").is_dir(),
        "the filesystem's lost+found is kept"
    );
    let mounted = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mounted.contains(&format!(" {} ", m.display())),
        "still mounted"
    );
    assert_eq!(std::fs::read(node.join("etc/role")).unwrap(), b"v2\n");

    // Version 3 makes /srv a symlink: refused, nothing changed.
    std::os::unix::fs::symlink("/var/www", src.join("srv")).unwrap();
    std::fs::write(src.join("etc/role"), b"v3\n").unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let e = format!("{:#}", run(args(&server, "img", &node)).unwrap_err());
    assert!(
        e.contains("/srv is a mount point on this node") && e.contains("a symlink"),
        "{e}"
    );
    assert_eq!(std::fs::read(node.join("etc/role")).unwrap(), b"v2\n");
    let inst = std::fs::read_to_string(node.join("var/lib/si/installed.toml")).unwrap();
    assert!(inst.contains("version = 2"), "{inst}");
}
