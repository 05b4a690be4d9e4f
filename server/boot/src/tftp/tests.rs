//! In-process tests: a small TFTP client against the server on 127.0.0.1, and fuzzing.

use super::packet::{self, Packet};
use super::transfer::{ack_to_abs, negotiate};
use super::*;
use std::net::SocketAddr;

/// Deterministic xorshift PRNG for fuzzing.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

async fn start(
    root: &std::path::Path,
    generated: Generated,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    start_with(root, generated, 256).await
}

async fn start_with(
    root: &std::path::Path,
    generated: Generated,
    max_transfers: usize,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    start_cfg(
        TftpConfig {
            root: root.to_path_buf(),
            timeout: Duration::from_millis(300),
            max_transfers,
            ..TftpConfig::default()
        },
        generated,
    )
    .await
}

async fn start_cfg(
    cfg: TftpConfig,
    generated: Generated,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        serve(sock, cfg, generated, async {
            let _ = rx.await;
        })
        .await
        .unwrap()
    });
    (addr, tx)
}

fn rrq(name: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    let mut v = vec![0, 1];
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(b"\0octet\0");
    for (k, val) in opts {
        v.extend_from_slice(k.as_bytes());
        v.push(0);
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

/// Fetches a file; `Err(msg)` carries the server's ERROR message. Acks each window's last
/// block (or every block when `drop_every` simulates loss by ignoring some blocks).
async fn fetch(server: SocketAddr, name: &str, opts: &[(&str, &str)]) -> Result<Vec<u8>, String> {
    fetch_from("127.0.0.1", server, name, opts).await
}

/// [`fetch`] from another loopback address (another source for the per-source cap).
async fn fetch_from(
    src: &str,
    server: SocketAddr,
    name: &str,
    opts: &[(&str, &str)],
) -> Result<Vec<u8>, String> {
    let sock = UdpSocket::bind((src, 0)).await.unwrap();
    sock.send_to(&rrq(name, opts), server).await.unwrap();
    let mut buf = vec![0u8; 70000];
    let mut data = Vec::new();
    let mut blksize = 512usize;
    let mut window = 1u64;
    let mut expect: u16 = 1;
    let mut in_window = 0u64;
    let mut tid = None;
    loop {
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .map_err(|_| "client timeout".to_string())?
            .unwrap();
        if *tid.get_or_insert(from) != from {
            continue;
        }
        match packet::parse(&buf[..n]) {
            Ok(Packet::Oack) => {
                let s = String::from_utf8_lossy(&buf[2..n]).to_string();
                let parts: Vec<&str> = s.split('\0').collect();
                for kv in parts.chunks(2) {
                    if kv.len() == 2 {
                        match kv[0] {
                            "blksize" => blksize = kv[1].parse().unwrap(),
                            "windowsize" => window = kv[1].parse().unwrap(),
                            _ => {}
                        }
                    }
                }
                sock.send_to(&[0, 4, 0, 0], from).await.unwrap();
            }
            Ok(Packet::Data { block, len }) => {
                if block != expect {
                    // Out of order: re-ack the last good block.
                    sock.send_to(
                        &[&[0u8, 4][..], &expect.wrapping_sub(1).to_be_bytes()].concat(),
                        from,
                    )
                    .await
                    .unwrap();
                    in_window = 0;
                    continue;
                }
                data.extend_from_slice(&buf[4..4 + len]);
                expect = expect.wrapping_add(1);
                in_window += 1;
                let last = len < blksize;
                if last || in_window == window {
                    sock.send_to(&[&[0u8, 4][..], &block.to_be_bytes()].concat(), from)
                        .await
                        .unwrap();
                    in_window = 0;
                }
                if last {
                    return Ok(data);
                }
            }
            Ok(Packet::Error { message, .. }) => return Err(message),
            other => return Err(format!("unexpected {other:?}")),
        }
    }
}

fn content(len: usize) -> Vec<u8> {
    let mut r = Rng(len as u64 + 1);
    (0..len).map(|_| r.next() as u8).collect()
}

#[tokio::test]
async fn serves_files_with_options() {
    let dir = tempfile::tempdir().unwrap();
    for len in [0, 511, 512, 513, 100_000] {
        std::fs::write(dir.path().join(format!("f{len}")), content(len)).unwrap();
    }
    let (addr, _stop) = start(dir.path(), Generated::default()).await;
    for len in [0, 511, 512, 513, 100_000] {
        let name = format!("f{len}");
        let want = content(len);
        assert_eq!(fetch(addr, &name, &[]).await.unwrap(), want, "{name} plain");
        for opts in [
            vec![("blksize", "1432"), ("tsize", "0")],
            vec![("blksize", "1468"), ("windowsize", "4")],
            vec![("blksize", "1024"), ("windowsize", "16"), ("timeout", "2")],
            vec![("BLKSIZE", "8")],
        ] {
            assert_eq!(
                fetch(addr, &name, &opts).await.unwrap(),
                want,
                "{name} {opts:?}"
            );
        }
    }
}

#[tokio::test]
async fn rolls_block_numbers_over() {
    let dir = tempfile::tempdir().unwrap();
    let want = content(8 * 70_000 + 3);
    std::fs::write(dir.path().join("big"), &want).unwrap();
    let (addr, _stop) = start(dir.path(), Generated::default()).await;
    let got = fetch(addr, "big", &[("blksize", "8"), ("windowsize", "64")])
        .await
        .unwrap();
    assert_eq!(got.len(), want.len());
    assert!(got == want);
}

#[tokio::test]
async fn serves_generated_and_refuses_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(dir.path().join("secret"), b"secret").unwrap();
    std::os::unix::fs::symlink("../secret", root.join("link")).unwrap();
    let gen = Generated::new(
        [(
            "pxelinux.cfg/default".to_string(),
            "DEFAULT x\n".to_string(),
        )]
        .into(),
    );
    let (addr, _stop) = start(&root, gen).await;
    assert_eq!(
        fetch(addr, "/pxelinux.cfg/default", &[]).await.unwrap(),
        b"DEFAULT x\n"
    );
    for bad in [
        "../secret",
        "/../secret",
        "a/../../secret",
        "link",
        "/etc/passwd",
        "nope",
    ] {
        assert!(fetch(addr, bad, &[]).await.is_err(), "{bad} was served");
    }
    // Write requests are refused.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut w = rrq("x", &[]);
    w[1] = 2;
    sock.send_to(&w, addr).await.unwrap();
    let mut buf = [0u8; 100];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..4], &[0, 5, 0, 2], "{:?}", &buf[..n]);
}

/// A site's own file under a generated name: served by default (root first), shadowed with
/// `generated-first`; a generated file the root lacks is served either way.
#[tokio::test]
async fn operator_files_and_generated_files_by_precedence() {
    use crate::bootcfg::{GenerateConfig, Precedence};
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pxelinux.cfg")).unwrap();
    std::fs::write(dir.path().join("pxelinux.cfg/default"), b"SITE\n").unwrap();
    let files: std::collections::BTreeMap<String, String> = [
        ("pxelinux.cfg/default".to_string(), "SI\n".to_string()),
        ("pxelinux.cfg/01-aa".to_string(), "NODE\n".to_string()),
    ]
    .into();
    for (precedence, want) in [
        (Precedence::RootFirst, &b"SITE\n"[..]),
        (Precedence::GeneratedFirst, b"SI\n"),
    ] {
        let cfg = GenerateConfig {
            boot_files: precedence,
            no_generate: vec![],
        };
        let gen = Generated::with_config(cfg, files.clone());
        let (addr, _stop) = start(dir.path(), gen).await;
        let got = fetch(addr, "pxelinux.cfg/default", &[]).await.unwrap();
        assert_eq!(got, want, "{precedence:?}");
        let got = fetch(addr, "/pxelinux.cfg/01-aa", &[]).await.unwrap();
        assert_eq!(got, b"NODE\n", "{precedence:?}");
    }
}

#[tokio::test]
async fn retransmits_after_timeout() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), content(2000)).unwrap();
    let (addr, _stop) = start(dir.path(), Generated::default()).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&rrq("f", &[]), addr).await.unwrap();
    let mut buf = [0u8; 600];
    let (n1, from) = sock.recv_from(&mut buf).await.unwrap();
    let first = buf[..n1].to_vec();
    // Say nothing: the same block must come again.
    let (n2, from2) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((from, &first[..]), (from2, &buf[..n2]));
    assert_eq!(&first[..4], &[0, 3, 0, 1]);
}

#[test]
fn negotiates_within_limits() {
    let cfg = TftpConfig {
        max_windowsize: 8,
        max_blksize: 1468,
        ..TftpConfig::default()
    };
    let o = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    };
    let n = negotiate(
        &cfg,
        &o(&[
            ("blksize", "65464"),
            ("windowsize", "100"),
            ("tsize", "0"),
            ("x", "y"),
        ]),
        77,
    );
    assert_eq!((n.blksize, n.windowsize), (1468, 8));
    assert_eq!(
        n.reply,
        o(&[("blksize", "1468"), ("windowsize", "8"), ("tsize", "77")])
    );
    // A timeout up to max_timeout is granted as asked; a longer one is not granted at all
    // (RFC 2349 lets the server only echo the client's value or leave it out).
    let n = negotiate(&cfg, &o(&[("timeout", "5")]), 1);
    assert_eq!(
        (n.timeout, n.reply.clone()),
        (Duration::from_secs(5), o(&[("timeout", "5")]))
    );
    for long in ["6", "255"] {
        let n = negotiate(&cfg, &o(&[("timeout", long)]), 1);
        assert_eq!(n.timeout, cfg.timeout, "timeout {long}");
        assert!(n.reply.is_empty(), "timeout {long}: {:?}", n.reply);
    }
    let n = negotiate(
        &cfg,
        &o(&[("blksize", "7"), ("timeout", "0"), ("windowsize", "abc")]),
        1,
    );
    assert!(n.reply.is_empty());
    assert_eq!(n.blksize, 512);
    // At most 1 MiB in flight: the window shrinks for big blocks.
    let cfg = TftpConfig {
        max_windowsize: 64,
        ..TftpConfig::default()
    };
    let n = negotiate(&cfg, &o(&[("windowsize", "64"), ("blksize", "65464")]), 1);
    assert_eq!(n.windowsize, 16);
    assert_eq!(n.reply, o(&[("windowsize", "16"), ("blksize", "65464")]));
}

#[test]
fn maps_acks_across_rollover() {
    assert_eq!(ack_to_abs(5, 0, 10), Some(5));
    assert_eq!(ack_to_abs(11, 0, 10), None);
    assert_eq!(ack_to_abs(0, 65530, 65540), Some(65536));
    assert_eq!(ack_to_abs(65529, 65530, 65540), None);
}

#[test]
fn parser_survives_random_and_mutated_packets() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let seeds: Vec<Vec<u8>> = vec![
        rrq("pxelinux.0", &[("blksize", "1408"), ("tsize", "0")]),
        rrq("a", &[("windowsize", "4")]),
        vec![0, 4, 0, 1],
        vec![0, 5, 0, 1, b'x', 0],
        vec![0, 3, 0, 1, 1, 2, 3],
    ];
    for i in 0..200_000 {
        let pkt: Vec<u8> = if i % 2 == 0 {
            let len = rng.below(700) as usize;
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            let mut p = seeds[rng.below(seeds.len() as u64) as usize].clone();
            for _ in 0..=rng.below(4) {
                match rng.below(3) {
                    0 if !p.is_empty() => {
                        let j = rng.below(p.len() as u64) as usize;
                        p[j] = rng.next() as u8;
                    }
                    1 if !p.is_empty() => p.truncate(rng.below(p.len() as u64) as usize),
                    _ => p.push(rng.next() as u8),
                }
            }
            p
        };
        // Errors are fine, panics are bugs.
        let _ = packet::parse(&pkt);
    }
}

#[tokio::test]
async fn server_survives_fuzzed_datagrams() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), content(5000)).unwrap();
    let (addr, _stop) = start(dir.path(), Generated::default()).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = Rng(42);
    for i in 0..3000 {
        let mut p = if i % 3 == 0 {
            rrq("f", &[("blksize", "1432")])
        } else {
            vec![0, (rng.below(8)) as u8]
        };
        let extra = rng.below(40);
        for _ in 0..extra {
            p.push(rng.next() as u8);
        }
        if !p.is_empty() {
            let j = rng.below(p.len() as u64) as usize;
            p[j] ^= rng.next() as u8 & if i % 3 == 0 { 0 } else { 0xff };
        }
        sock.send_to(&p, addr).await.unwrap();
    }
    // Also garbage at a transfer's own port, mid-transfer (from another source: the requests
    // above hold 127.0.0.1's cap of transfers until they time out).
    let t = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    t.send_to(&rrq("f", &[]), addr).await.unwrap();
    let mut buf = [0u8; 1000];
    let (_, tid) = t.recv_from(&mut buf).await.unwrap();
    for _ in 0..500 {
        let len = rng.below(30) as usize;
        let p: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        t.send_to(&p, tid).await.unwrap();
    }
    // The server still serves a good client correctly.
    assert_eq!(
        fetch_from(
            "127.0.0.4",
            addr,
            "f",
            &[("blksize", "1432"), ("windowsize", "4")]
        )
        .await
        .unwrap(),
        content(5000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_many_transfers_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), content(300_000)).unwrap();
    // All from 127.0.0.1: this test is about concurrency, not the per-source cap.
    let (addr, _stop) = start_cfg(
        TftpConfig {
            root: dir.path().to_path_buf(),
            timeout: Duration::from_millis(300),
            per_source: 64,
            ..TftpConfig::default()
        },
        Generated::default(),
    )
    .await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            tokio::spawn(async move {
                let opts: &[(&str, &str)] = if i % 2 == 0 {
                    &[("blksize", "1432")]
                } else {
                    &[("windowsize", "8")]
                };
                fetch(addr, "f", opts).await
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().unwrap() == content(300_000));
    }
}

#[tokio::test]
async fn refuses_beyond_max_transfers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), content(5000)).unwrap();
    let (addr, _stop) = start_with(dir.path(), Generated::default(), 1).await;
    // A client that never acks holds the only slot until its retries run out.
    let stalled = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stalled.send_to(&rrq("f", &[]), addr).await.unwrap();
    let mut buf = [0u8; 600];
    stalled.recv_from(&mut buf).await.unwrap();
    let err = fetch(addr, "f", &[]).await.unwrap_err();
    assert_eq!(err, "server busy");
}

/// Requests asking for a 255 s timeout and never acknowledged cannot lock TFTP out: the long
/// timeout is not granted, so each holds its slot a few seconds, and a real client is served
/// soon after. Before, every slot stayed taken for 255 s × (retries + 1).
#[tokio::test]
async fn never_acknowledged_long_timeout_requests_do_not_lock_tftp_out() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), content(5000)).unwrap();
    let cfg = TftpConfig {
        root: dir.path().to_path_buf(),
        timeout: Duration::from_millis(200),
        retries: 2,
        max_transfers: 8,
        per_source: 8,
        ..TftpConfig::default()
    };
    let (addr, _stop) = start_cfg(cfg, Generated::default()).await;
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(&rrq("f", &[("timeout", "255")]), addr)
            .await
            .unwrap();
        let mut buf = [0u8; 600];
        let (n, _) = s.recv_from(&mut buf).await.unwrap();
        // The answer is DATA 1 (the option was not granted, so no OACK).
        assert_eq!(&buf[..4], &[0, 3, 0, 1], "{:?}", &buf[..n]);
        stalled.push(s);
    }
    assert_eq!(fetch(addr, "f", &[]).await.unwrap_err(), "server busy");
    // Slots come back after timeout × (retries + 1) = 0.6 s; poll for at most 10 s.
    let start = std::time::Instant::now();
    loop {
        match fetch(addr, "f", &[]).await {
            Ok(d) => {
                assert_eq!(d, content(5000));
                break;
            }
            Err(e) if e == "server busy" && start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("still refused after {:?}: {e}", start.elapsed()),
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

/// One source address cannot take every slot: past its cap it is told "busy" while another
/// address is served.
#[tokio::test]
async fn one_source_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), content(5000)).unwrap();
    let cfg = TftpConfig {
        root: dir.path().to_path_buf(),
        timeout: Duration::from_secs(2),
        per_source: 2,
        ..TftpConfig::default()
    };
    let (addr, _stop) = start_cfg(cfg, Generated::default()).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(&rrq("f", &[]), addr).await.unwrap();
        let mut buf = [0u8; 600];
        s.recv_from(&mut buf).await.unwrap();
        held.push(s);
    }
    assert_eq!(fetch(addr, "f", &[]).await.unwrap_err(), "server busy");
    // 127.0.0.2 is another source (all of 127/8 is loopback on Linux).
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    other.send_to(&rrq("f", &[]), addr).await.unwrap();
    let mut buf = [0u8; 600];
    let (n, _) = other.recv_from(&mut buf).await.unwrap();
    assert_eq!(&buf[..4], &[0, 3, 0, 1], "{:?}", &buf[..n]);
}
