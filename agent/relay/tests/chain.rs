//! The chain on loopback, unprivileged and in one process (`--insecure`: the TLS link is tested
//! as root in tests/tests/relay.rs and in si-trust): a master serving a small version from a
//! store, relays started by `si_relay::run`, and upstreams that stop sending half way.

use si_imageserver::service::{self, ObjectFinder, ServeConfig};
use si_proto::manifest::{Entry, Kind, Manifest};
use si_proto::{Chunk, Digest};
use si_relay::RelayConfig;
use si_store::Store;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn entry(path: &[u8], kind: Kind, mode: u32) -> Entry {
    Entry {
        path: path.to_vec(),
        kind,
        mode,
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
        mtime: 1_700_000_000,
        mtime_nsec: 0,
        xattrs: vec![],
    }
}

/// A version of two files of 24 objects (128 KiB of noise each) in a store; the files' bytes.
fn version(store: &Store) -> (Manifest, Vec<(String, Vec<u8>)>) {
    let mut w = store.pack_writer().unwrap();
    let mut files = Vec::new();
    let mut entries = vec![entry(b"", Kind::Dir, 0o755)];
    for (f, name) in ["a", "b"].iter().enumerate() {
        let mut content = Vec::new();
        let mut chunks = Vec::new();
        for i in 0..12u64 {
            let data = noise(128 << 10, f as u64 * 100 + i);
            let digest = w.add_raw(&data).unwrap();
            chunks.push(Chunk {
                offset: content.len() as u64,
                len: data.len() as u32,
                digest,
            });
            content.extend_from_slice(&data);
        }
        entries.push(entry(
            name.as_bytes(),
            Kind::File {
                size: content.len() as u64,
                chunks,
            },
            0o644,
        ));
        files.push((name.to_string(), content));
    }
    w.finish().unwrap();
    let m = Manifest { entries };
    store
        .record_version("img", &m, Default::default(), None)
        .unwrap();
    (m, files)
}

/// The master: the store's image service over plain TCP, every version signed by a dummy
/// signer (an `--insecure` node does not check signatures) before it starts, as si-server does
/// (signing on the fly while several nodes ask at once races in the store: two writers of one
/// signature file).
fn master(store: Arc<Store>) -> SocketAddr {
    let signer: service::Signer = Arc::new(|_: &str, _: u32, d: &Digest| Ok(d.0.to_vec()));
    service::sign_unsigned(&store, &signer).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            let mut cfg = ServeConfig::new(si_trust::Acceptor::Insecure);
            cfg.signer = Some(signer);
            service::run(l, store, cfg, None, std::future::pending())
                .await
                .unwrap();
        });
    });
    rx.recv().unwrap()
}

/// An upstream that serves the first `good` objects it is asked for, then sends nothing more
/// (a relay that stopped making progress). It reads objects in 1 MiB groups (8 of these) and
/// sends a group once it has it all.
struct Stalls {
    objects: HashMap<Digest, (u32, Vec<u8>)>,
    good: usize,
    served: std::sync::Mutex<usize>,
}

impl ObjectFinder for Stalls {
    fn object(&self, d: &Digest) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut n = self.served.lock().unwrap();
        if *n >= self.good {
            drop(n);
            std::thread::sleep(Duration::from_secs(30));
            anyhow::bail!("stalled");
        }
        *n += 1;
        self.objects
            .get(d)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("not here"))
    }

    /// A hung relay sends nothing, not even `Waiting` (a relay waiting on its upstream says
    /// so and is not left: the relay's own tests show that).
    fn may_wait(&self) -> bool {
        false
    }
}

fn stalling_upstream(store: &Store, m: &Manifest, good: usize) -> SocketAddr {
    serve(Arc::new(Stalls {
        objects: objects_of(store, m),
        good,
        served: std::sync::Mutex::new(0),
    }))
}

/// An upstream that takes `delay` over each of its first `slow_for` objects: as a relay
/// behind a slow link when `may_wait` is false (it has the objects and sends them, slowly, in
/// groups), as a relay waiting on its own upstream when it is true (it says `Waiting` meanwhile).
struct Paced {
    objects: HashMap<Digest, (u32, Vec<u8>)>,
    delay: Duration,
    slow_for: usize,
    served: std::sync::Mutex<usize>,
    may_wait: bool,
}

impl ObjectFinder for Paced {
    fn object(&self, d: &Digest) -> anyhow::Result<(u32, Vec<u8>)> {
        let n = {
            let mut n = self.served.lock().unwrap();
            *n += 1;
            *n
        };
        if n <= self.slow_for {
            // The upstream's pace, not a synchronisation: the test measures what the node
            // does about it.
            std::thread::sleep(self.delay);
        }
        self.objects
            .get(d)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("not here"))
    }

    fn may_wait(&self) -> bool {
        self.may_wait
    }
}

fn objects_of(store: &Store, m: &Manifest) -> HashMap<Digest, (u32, Vec<u8>)> {
    let mut objects = HashMap::new();
    for e in &m.entries {
        if let Kind::File { chunks, .. } = &e.kind {
            for c in chunks {
                objects.insert(c.digest, store.get_compressed(&c.digest).unwrap());
            }
        }
    }
    objects
}

fn serve(finder: Arc<dyn ObjectFinder>) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            let cfg = si_relay::serve_config(si_trust::Acceptor::Insecure, true);
            service::run_objects(l, finder, cfg, std::future::pending())
                .await
                .unwrap();
        });
    });
    rx.recv().unwrap()
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn config(
    server: SocketAddr,
    root: &Path,
    from: &[String],
    listen: Option<SocketAddr>,
) -> RelayConfig {
    std::fs::create_dir_all(root).unwrap();
    RelayConfig {
        server: server.to_string(),
        image: "img".into(),
        version: None,
        root: root.to_path_buf(),
        state_dir: Some(root.with_extension("state")),
        relay_from: from.to_vec(),
        relay_listen: listen.map(|a| a.to_string()),
        buffer_mib: 1,
        stall_secs: 1,
        min_rate_kbit: 0,
        wait_secs: 20,
        linger_secs: 2,
        serve_installed: false,
        multicast: false,
        threads: 2,
        summary_json: None,
        trust: si_agent::pull::TrustArgs {
            insecure: true,
            ..Default::default()
        },
    }
}

fn exact(root: &Path, files: &[(String, Vec<u8>)]) {
    for (name, content) in files {
        let got = std::fs::read(root.join(name)).unwrap();
        assert!(got == *content, "{name} differs in {}", root.display());
    }
}

/// Three nodes in a chain: node0 from the master, node1 from node0, node2 from node1; each
/// ends with the version's bytes, each object came once, and from its predecessor. A 1 MiB
/// buffer holds fewer objects than the version (3 MiB compressed at least): the rest is read
/// back from the tree.
#[test]
fn three_nodes_in_a_chain() {
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&t.path().join("store")).unwrap());
    let (_, files) = version(&store);
    let m = master(store);
    let ports: Vec<SocketAddr> = (0..2).map(|_| free_port()).collect();
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let from: Vec<String> = (0..i).rev().map(|j| ports[j].to_string()).collect();
            let cfg = config(
                m,
                &t.path().join(format!("n{i}")),
                &from,
                ports.get(i).copied(),
            );
            std::thread::spawn(move || si_relay::run(&cfg))
        })
        .collect();
    let sums: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    for (i, s) in sums.iter().enumerate() {
        exact(&t.path().join(format!("n{i}")), &files);
        assert_eq!(s.objects, 24);
        assert_eq!(s.reattaches, 0, "{s:?}");
        assert_eq!(s.from.len(), 1, "{s:?}");
        assert_eq!(s.from[0].objects, 24, "{s:?}");
        let want = if i == 0 {
            format!("master {m}")
        } else {
            ports[i - 1].to_string()
        };
        assert_eq!(s.from[0].upstream, want);
        if i < 2 {
            assert_eq!(s.served_objects, 24, "node{i}: {s:?}");
        }
    }
    assert!(t.path().join("n2.state/installed.toml").exists());
}

/// An upstream that sends 8 objects and then nothing: after the stall the node moves to the
/// next candidate (the master), asks only for what it lacks, and ends exact.
#[test]
fn a_stalled_upstream_is_left_and_nothing_is_fetched_twice() {
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&t.path().join("store")).unwrap());
    let (manifest, files) = version(&store);
    let stall = stalling_upstream(&store, &manifest, 8);
    let m = master(store);
    let cfg = config(m, &t.path().join("n"), &[stall.to_string()], None);
    let start = std::time::Instant::now();
    let s = si_relay::run(&cfg).unwrap();
    exact(&t.path().join("n"), &files);
    assert_eq!(s.reattaches, 1, "{s:?}");
    assert_eq!(s.from.len(), 2, "{s:?}");
    // What came before the stall (a whole group of the 8) is not asked for again.
    assert!((1..=8).contains(&s.from[0].objects), "{s:?}");
    assert_eq!(s.from[0].objects + s.from[1].objects, 24, "{s:?}");
    let why = s.from[0].left.as_deref().unwrap_or("");
    assert!(why.starts_with("stalled"), "{s:?}");
    assert!(s.from[1].upstream.starts_with("master"), "{s:?}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
}

/// A node with a floor of 16 Mbit/s (`--min-rate-kbit 16000`) and `stall_secs` behind a
/// [`Paced`] upstream, the master last; checks the node ends exact and returns its summary.
fn behind_paced(
    delay: Duration,
    slow_for: usize,
    may_wait: bool,
    stall_secs: u64,
) -> si_relay::RelaySummary {
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&t.path().join("store")).unwrap());
    let (manifest, files) = version(&store);
    let up = serve(Arc::new(Paced {
        objects: objects_of(&store, &manifest),
        delay,
        slow_for,
        served: Default::default(),
        may_wait,
    }));
    let m = master(store);
    let mut cfg = config(m, &t.path().join("n"), &[up.to_string()], None);
    cfg.min_rate_kbit = 16_000;
    cfg.stall_secs = stall_secs;
    let s = si_relay::run(&cfg).unwrap();
    exact(&t.path().join("n"), &files);
    s
}

/// An upstream that has every object but sends about 3 Mbit/s (300 ms an object, in 1 MiB
/// groups) against a floor of 16: after `SLOW_WINDOW` the node leaves it, says why, and
/// fetches only the rest from the master (nothing twice). Without the floor the whole version
/// would come from the slow upstream.
#[test]
fn an_upstream_slower_than_the_floor_is_left() {
    // It sends a group every 2.4 s: slow, not stalled.
    let s = behind_paced(Duration::from_millis(300), usize::MAX, false, 10);
    assert_eq!(s.reattaches, 1, "{s:?}");
    assert_eq!(s.from.len(), 2, "{s:?}");
    let why = s.from[0].left.as_deref().unwrap_or("");
    assert!(why.starts_with("too slow"), "{s:?}");
    assert!(s.from[1].upstream.starts_with("master"), "{s:?}");
    assert!(s.from[1].objects > 0, "{s:?}");
    assert_eq!(s.from[0].objects + s.from[1].objects, 24, "{s:?}");
    assert!(s.from[1].left.is_none(), "{s:?}");
}

/// An upstream that is slow because it waits for its own upstream (700 ms for each of its
/// first 8 objects, saying `Waiting` meanwhile) is not the bottleneck and is not left, though
/// fewer than 16 Mbit/s arrive over the window.
#[test]
fn an_upstream_that_waits_is_not_left_for_being_slow() {
    let s = behind_paced(Duration::from_millis(700), 8, true, 1);
    assert_eq!(s.reattaches, 0, "{s:?}");
    assert_eq!(s.from.len(), 1, "{s:?}");
    assert_eq!(s.from[0].objects, 24, "{s:?}");
    assert!(s.from[0].left.is_none(), "{s:?}");
}

/// A late joiner: node n0 deployed and finished (its relay ended); it then serves its installed
/// version (`--serve-installed`), and n1, joining late, takes every object from it and none
/// from the master. n2 joins once a file on n0 has drifted: the drifted object is refused (it
/// no longer matches its digest), n2 leaves n0 and takes the rest from the master, and ends
/// exact all the same. Serving needs an installed record of the image asked for.
#[test]
fn a_late_joiner_attaches_to_a_finished_node() {
    let t = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&t.path().join("store")).unwrap());
    let (_, files) = version(&store);
    let m = master(store);
    let n0 = t.path().join("n0");
    si_relay::run(&config(m, &n0, &[], None)).unwrap();
    let serve_n0 = |linger: u64| {
        let port = free_port();
        let mut cfg = config(m, &n0, &[], Some(port));
        cfg.serve_installed = true;
        cfg.linger_secs = linger;
        (port, std::thread::spawn(move || si_relay::run(&cfg)))
    };

    let (port, served) = serve_n0(2);
    let s1 = si_relay::run(&config(m, &t.path().join("n1"), &[port.to_string()], None)).unwrap();
    exact(&t.path().join("n1"), &files);
    assert_eq!(s1.from.len(), 1, "{s1:?}");
    assert_eq!(s1.from[0].upstream, port.to_string());
    assert_eq!(s1.from[0].objects, 24, "{s1:?}");
    let sv = served.join().unwrap().unwrap();
    assert_eq!((sv.served_objects, sv.objects), (24, 0), "{sv:?}");
    assert_eq!(sv.image, "img");

    // A byte of n0's file "b" changes: its objects there no longer match their digests.
    let mut b = std::fs::read(n0.join("b")).unwrap();
    b[5] ^= 0xff;
    std::fs::write(n0.join("b"), &b).unwrap();
    let (port, served) = serve_n0(2);
    let s2 = si_relay::run(&config(m, &t.path().join("n2"), &[port.to_string()], None)).unwrap();
    exact(&t.path().join("n2"), &files);
    assert_eq!(s2.reattaches, 1, "{s2:?}");
    assert!(s2.from[1].upstream.starts_with("master"), "{s2:?}");
    assert_eq!(s2.from[0].objects + s2.from[1].objects, 24, "{s2:?}");
    // Everything of "a" came from n0; the drifted object of "b" (and what followed) from the
    // master.
    assert!((12..24).contains(&s2.from[0].objects), "{s2:?}");
    served.join().unwrap().unwrap();

    // Serving needs the image asked for installed on the root.
    let mut cfg = config(m, &n0, &[], Some(free_port()));
    cfg.serve_installed = true;
    cfg.image = "other".into();
    let e = format!("{:#}", si_relay::run(&cfg).unwrap_err());
    assert!(e.contains("img@1 installed, not other@any"), "{e}");
    let mut cfg = config(m, &t.path().join("empty"), &[], Some(free_port()));
    cfg.serve_installed = true;
    let e = format!("{:#}", si_relay::run(&cfg).unwrap_err());
    assert!(e.contains("nothing is recorded as installed"), "{e}");
}
