//! The trust layer against itself over real loopback TLS: pinning, client certificates from
//! the right and wrong CA, expired ones, version signatures.

use si_trust::ca::Authority;
use si_trust::{Connector, Fingerprint, NodeIdentity, Peer};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

fn ca(t: &tempfile::TempDir, name: &str) -> Authority {
    Authority::open_or_create(&t.path().join(name), &["127.0.0.1".into()]).unwrap()
}

fn node(a: &Authority, name: &str) -> NodeIdentity {
    let key = NodeIdentity::generate_key().unwrap();
    let spki = NodeIdentity::public_key_der(&key).unwrap();
    let cert = a
        .issue_node(name, &spki, Duration::from_secs(3600))
        .unwrap();
    NodeIdentity {
        name: name.into(),
        key,
        chain: vec![cert, a.ca_der().to_vec()],
    }
}

/// A blocking TLS server on loopback with `a`'s config that answers one line per connection:
/// the peer it saw ("anon", "master", "node NAME") or the handshake error.
fn serve(a: &Authority) -> (String, std::thread::JoinHandle<Vec<String>>) {
    serve_with(a.server_config().unwrap())
}

/// [`serve`] with any server config (a node's relay listener).
fn serve_with(cfg: Arc<rustls::ServerConfig>) -> (String, std::thread::JoinHandle<Vec<String>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..1 {
            let (s, _) = l.accept().unwrap();
            let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, s);
            let mut b = [0u8; 1];
            let said = match tls.read(&mut b) {
                Ok(_) => match tls.conn.peer_certificates().and_then(|c| c.first()) {
                    Some(c) => Peer::from_cert(c.as_ref()).unwrap().to_string(),
                    None => "anon".into(),
                },
                Err(e) => format!("error: {e}"),
            };
            let _ = tls.write_all(said.as_bytes());
            tls.conn.send_close_notify();
            let _ = tls.flush();
            seen.push(said);
        }
        seen
    });
    (addr, h)
}

fn talk(addr: &str, c: &Connector) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut s = c.wrap(tcp).unwrap();
    s.write_all(b"x").map_err(|e| e.to_string())?;
    s.flush().map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

#[test]
fn pinning_accepts_the_right_ca_and_refuses_another() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (ca(&t, "a"), ca(&t, "b"));
    assert_ne!(a.fingerprint(), b.fingerprint());
    let (addr, h) = serve(&a);
    assert_eq!(
        talk(&addr, &Connector::master(a.fingerprint(), None).unwrap()).unwrap(),
        "anon"
    );
    h.join().unwrap();
    let (addr, h) = serve(&a);
    let e = talk(&addr, &Connector::master(b.fingerprint(), None).unwrap()).unwrap_err();
    assert!(e.contains("UnknownIssuer") || e.contains("issuer"), "{e}");
    assert!(h.join().unwrap()[0].starts_with("error"));
}

/// A node's relay listener runs on the node's own certificate: another node of the CA dials it
/// by its node name and is seen as that node; dialling it under another name, or presenting a
/// certificate from another CA, fails the handshake.
#[test]
fn a_node_serves_another_node_on_its_own_certificate() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (ca(&t, "a"), ca(&t, "b"));
    let (n1, n2) = (node(&a, "n1"), node(&a, "n2"));
    let cfg = si_trust::tls::node_server_config(&n1).unwrap();
    let (addr, h) = serve_with(cfg.clone());
    let c = Connector::node_peer(a.fingerprint(), &n2, "n1").unwrap();
    assert_eq!(talk(&addr, &c).unwrap(), "node n2");
    h.join().unwrap();

    let (addr, h) = serve_with(cfg.clone());
    let c = Connector::node_peer(a.fingerprint(), &n2, "n3").unwrap();
    let e = talk(&addr, &c).unwrap_err();
    assert!(e.contains("NotValidForName") || e.contains("name"), "{e}");
    h.join().unwrap();

    let foreign = node(&b, "n2");
    let (addr, h) = serve_with(cfg.clone());
    let c = Connector::node_peer(a.fingerprint(), &foreign, "n1").unwrap();
    assert!(talk(&addr, &c).is_err());
    let seen = h.join().unwrap();
    assert!(seen[0].starts_with("error"), "{seen:?}");
}

#[test]
fn reopening_keeps_the_ca_and_its_fingerprint() {
    let t = tempfile::tempdir().unwrap();
    let f = ca(&t, "a").fingerprint();
    let a = ca(&t, "a");
    assert_eq!(a.fingerprint(), f);
    assert_eq!(
        Fingerprint::of(&std::fs::read(t.path().join("a/ca.crt")).unwrap()),
        f
    );
    // A node certificate issued after the reopen chains to the pinned CA.
    let n = node(&a, "n1");
    let (addr, h) = serve(&a);
    let c = Connector::master(f, Some(&n)).unwrap();
    assert_eq!(talk(&addr, &c).unwrap(), "node n1");
    h.join().unwrap();
}

#[test]
fn a_ca_key_with_loose_mode_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    ca(&t, "a");
    let key = t.path().join("a/ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = format!(
        "{:#}",
        Authority::open_or_create(&t.path().join("a"), &[]).unwrap_err()
    );
    assert!(e.contains("group or others"), "{e}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(t.path().join("a"), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(Authority::open_or_create(&t.path().join("a"), &[]).is_err());
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (ca(&t, "a"), ca(&t, "b"));
    let foreign = node(&b, "n1");
    let (addr, h) = serve(&a);
    let c = Connector::master(a.fingerprint(), Some(&foreign)).unwrap();
    assert!(talk(&addr, &c).is_err());
    let seen = h.join().unwrap();
    assert!(seen[0].starts_with("error"), "{seen:?}");
}

#[test]
fn an_expired_node_certificate_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let a = ca(&t, "a");
    let key = NodeIdentity::generate_key().unwrap();
    let spki = NodeIdentity::public_key_der(&key).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let cert = a
        .issue_node_between(
            "n1",
            &spki,
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        )
        .unwrap();
    let n = NodeIdentity {
        name: "n1".into(),
        key,
        chain: vec![cert, a.ca_der().to_vec()],
    };
    let (addr, h) = serve(&a);
    let _ = talk(
        &addr,
        &Connector::master(a.fingerprint(), Some(&n)).unwrap(),
    );
    let seen = h.join().unwrap();
    assert!(
        seen[0].starts_with("error") && seen[0].contains("xpired"),
        "{seen:?}"
    );
}

#[test]
fn a_node_certificate_cannot_pose_as_the_master() {
    // A node's key and certificate used as a server: clients check the name master.si.
    let t = tempfile::tempdir().unwrap();
    let a = ca(&t, "a");
    let n = node(&a, "n1");
    let (chain, key) = n.rustls();
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(si_trust::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(cfg).unwrap(), s);
        let mut b = [0u8; 1];
        tls.read(&mut b).is_err()
    });
    let e = talk(&addr, &Connector::master(a.fingerprint(), None).unwrap()).unwrap_err();
    assert!(e.to_lowercase().contains("name"), "{e}");
    assert!(h.join().unwrap());
}

#[test]
fn identities_save_and_load_and_check_the_pin() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (ca(&t, "a"), ca(&t, "b"));
    let n = node(&a, "n7");
    let dir = t.path().join("etc-si");
    n.save(&dir).unwrap();
    let back = NodeIdentity::load(&dir, &a.fingerprint()).unwrap();
    assert_eq!(back.name, "n7");
    assert!(NodeIdentity::load(&dir, &b.fingerprint()).is_err());
}

#[test]
fn version_signatures_verify_and_tampering_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (ca(&t, "a"), ca(&t, "b"));
    let d = si_proto::Digest::of(b"manifest");
    let sig = a.sign_version("img", 3, &d).unwrap();
    si_trust::sign::verify_version(a.ca_der(), "img", 3, &d, &sig).unwrap();
    let other = si_proto::Digest::of(b"manifest2");
    for (ca_der, img, v, dg, s) in [
        (a.ca_der(), "img", 3, other, sig.clone()),
        (a.ca_der(), "img", 4, d, sig.clone()),
        (a.ca_der(), "img2", 3, d, sig.clone()),
        (b.ca_der(), "img", 3, d, sig.clone()),
        (a.ca_der(), "img", 3, d, vec![]),
        (a.ca_der(), "img", 3, d, {
            let mut s = sig.clone();
            s[5] ^= 1;
            s
        }),
    ] {
        let e = si_trust::sign::verify_version(ca_der, img, v, &dg, &s).unwrap_err();
        assert!(format!("{e:#}").contains("sign"), "{e:#}");
    }
}

/// A large transfer through the client's read-ahead arrives exact, whatever the sizes the
/// server writes and the client reads in (one byte, a record's worth, more than the
/// read-ahead holds), and the session runs the suite first in si's order (AES-128-GCM on a CPU
/// with AES instructions, else ChaCha20-Poly1305).
#[test]
fn a_large_transfer_arrives_exact_through_the_read_ahead() {
    let t = tempfile::tempdir().unwrap();
    let a = ca(&t, "a");
    let cfg = a.server_config().unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let data: Vec<u8> = (0..(3u32 << 20) + 12345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let sent = data.clone();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(cfg).unwrap(), s);
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).unwrap();
        let mut at = 0;
        for (i, n) in [1usize, 7, 16_384, 100_000, 1 << 20]
            .iter()
            .cycle()
            .enumerate()
        {
            if at == sent.len() {
                break;
            }
            let n = (*n + i).min(sent.len() - at);
            tls.write_all(&sent[at..at + n]).unwrap();
            at += n;
        }
        tls.conn.send_close_notify();
        tls.flush().unwrap();
    });
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut s = Connector::master(a.fingerprint(), None)
        .unwrap()
        .wrap(tcp)
        .unwrap();
    s.write_all(b"x").unwrap();
    s.flush().unwrap();
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; si_trust::tls::READ_AHEAD + 4096];
    for n in [1usize, 4096, 16_389, si_trust::tls::READ_AHEAD + 4096]
        .iter()
        .cycle()
    {
        let k = s.read(&mut buf[..*n]).unwrap();
        if k == 0 {
            break;
        }
        got.extend_from_slice(&buf[..k]);
    }
    h.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the bytes differ");
    assert_eq!(
        s.cipher_suite(),
        Some(si_trust::provider().cipher_suites[0].suite())
    );
}

/// si's cipher order: AES-128-GCM first where the CPU has AES instructions (this test cannot
/// turn them off, so it checks the order this machine gets and that every suite ring offers is
/// still there).
#[test]
fn the_fast_cipher_for_this_cpu_comes_first() {
    let p = si_trust::provider();
    let ring = rustls::crypto::ring::default_provider();
    assert_eq!(p.cipher_suites.len(), ring.cipher_suites.len());
    let first = p.cipher_suites[0].suite();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("pclmulqdq")
    {
        assert_eq!(first, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    } else {
        assert_eq!(first, rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    }
}
