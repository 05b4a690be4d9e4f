//! Trust end to end through the real image service (TLS, the master's gate over a real
//! inventory), in-process on loopback: enrollment once per armed install, and per-request
//! authorisation — the regression tests of issue 13's probing list.

use si_agent::pull::Client;
use si_imaging::getimage as capture;
use si_inventory::{Inventory, ListCatalog, Node};
use si_store::Store;
use si_trust::ca::Authority;
use si_trust::{Connector, NodeIdentity};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

struct Master {
    addr: String,
    inv: Arc<Inventory>,
    ca: Arc<Authority>,
    _t: tempfile::TempDir,
}

const MAC1: &str = "52:54:00:aa:00:01";
const MAC2: &str = "52:54:00:aa:00:02";

fn master() -> Master {
    let t = tempfile::tempdir().unwrap();
    let store_dir = t.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    for img in ["web", "db"] {
        let src = t.path().join(img);
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("secret"), format!("{img} shadow")).unwrap();
        capture::commit(&store, &src, img, &[], None).unwrap();
    }
    let inv = Arc::new(Inventory::open(&t.path().join("inventory.db")).unwrap());
    let cat = ListCatalog(vec!["web".into(), "db".into()]);
    for (name, mac, image) in [("n1", MAC1, "web"), ("n2", MAC2, "db")] {
        inv.add_node(
            &Node {
                name: name.into(),
                macs: vec![mac.into()],
                image: Some(image.into()),
                ..Default::default()
            },
            &cat,
        )
        .unwrap();
    }
    let ca = Arc::new(Authority::open_or_create(&t.path().join("ca"), &[]).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let (inv2, ca2) = (inv.clone(), ca.clone());
    let store = Arc::new(store);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap().to_string()).unwrap();
            let mut cfg = si_imageserver::service::ServeConfig::new(si_trust::Acceptor::tls(
                ca2.server_config().unwrap(),
            ));
            let signer_ca = ca2.clone();
            cfg.signer = Some(Arc::new(move |i: &str, v: u32, d: &si_proto::Digest| {
                signer_ca.sign_version(i, v, d)
            }));
            cfg.gate = Arc::new(si_server::gate::InventoryGate {
                inv: inv2.clone(),
                ca: ca2,
            });
            let hook: si_imageserver::service::ReportHook =
                Arc::new(move |node: &str, state: &str, _: &str| {
                    if state == "installed" {
                        inv2.mark_installed(node)?;
                    }
                    Ok(())
                });
            si_imageserver::service::run(l, store, cfg, Some(hook), std::future::pending())
                .await
                .unwrap();
        });
    });
    Master {
        addr: rx.recv().unwrap(),
        inv,
        ca,
        _t: t,
    }
}

impl Master {
    fn arm(&self, node: &str) -> String {
        self.inv.set_boot_install(node).unwrap();
        si_server::gate::enrollment_token(&self.inv, &self.ca, node)
            .unwrap()
            .expect("an open enrollment")
    }
    fn enroll(&self, node: &str, token: &str, mac: &str) -> anyhow::Result<NodeIdentity> {
        si_trust::enroll::enroll(
            &self.addr,
            self.ca.fingerprint(),
            node,
            token,
            mac,
            "UUID-1",
        )
    }
    fn client(&self, id: Option<&NodeIdentity>) -> Client {
        let c = Connector::master(self.ca.fingerprint(), id).unwrap();
        Client::connect(&self.addr, Duration::from_secs(5), &c).unwrap()
    }
}

fn refused(r: anyhow::Result<impl std::fmt::Debug>) -> String {
    let e = r.expect_err("refused");
    let s = format!("{e:#}");
    assert!(s.contains("refused") || s.contains("Refused"), "{s}");
    s
}

#[test]
fn an_unenrolled_host_gets_no_image_content() {
    let m = master();
    let mut c = m.client(None);
    assert!(
        c.list().unwrap().is_empty(),
        "an anonymous listing shows no image"
    );
    let mut c = m.client(None);
    let e = refused(c.manifest("web", None));
    assert!(e.contains("not enrolled"), "{e}");
    let mut c = m.client(None);
    let d = si_proto::Digest::of(b"web shadow");
    let e = refused(c.fetch(&[(d, 10)], 1, &|_, _| Ok(())));
    assert!(e.contains("not enrolled"), "{e}");
    let mut c = m.client(None);
    refused(c.report("n1", "installed", ""));
    assert_ne!(m.inv.node("n1").unwrap().unwrap().state, "installed");
}

#[test]
fn enrollment_once_then_entitled_reads_and_own_reports_only() {
    let m = master();
    let token = m.arm("n1");
    // A wrong MAC or a wrong token does not spend the token.
    assert!(format!("{:#}", m.enroll("n1", &token, MAC2).unwrap_err()).contains("MAC"));
    assert!(format!("{:#}", m.enroll("n1", "0000", MAC1).unwrap_err()).contains("token"));
    let id = m.enroll("n1", &token, MAC1).unwrap();
    assert_eq!(id.name, "n1");
    // Saved like the installer saves it, loaded like node clients load it.
    let dir = m._t.path().join("n1-etc-si");
    id.save(&dir).unwrap();
    let id = NodeIdentity::load(&dir, &m.ca.fingerprint()).unwrap();
    let mut c = m.client(Some(&id));
    let list = c.list().unwrap();
    assert_eq!(
        list.iter().map(|i| i.image.as_str()).collect::<Vec<_>>(),
        ["web"]
    );
    let mut c = m.client(Some(&id));
    let (_, man, _) = c.manifest("web", None).unwrap();
    let wants: Vec<_> = man
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            si_proto::manifest::Kind::File { chunks, .. } => {
                Some((chunks[0].digest, chunks[0].len))
            }
            _ => None,
        })
        .collect();
    let got = std::sync::Mutex::new(Vec::new());
    c.fetch(&wants, 1, &|_, data| {
        got.lock().unwrap().push(data);
        Ok(())
    })
    .unwrap();
    assert_eq!(got.into_inner().unwrap(), vec![b"web shadow".to_vec()]);
    // Another node's image: refused.
    let mut c = m.client(Some(&id));
    let e = refused(c.manifest("db", None));
    assert!(e.contains("not entitled"), "{e}");
    // A report about another node: refused; about itself: stored.
    let mut c = m.client(Some(&id));
    refused(c.report("n2", "installed", ""));
    assert_ne!(m.inv.node("n2").unwrap().unwrap().state, "installed");
    let mut c = m.client(Some(&id));
    c.report("n1", "installed", "").unwrap();
    assert_eq!(m.inv.node("n1").unwrap().unwrap().state, "installed");
    // The spent token replayed: refused, and an alarm raised that si-node show displays.
    let e = format!("{:#}", m.enroll("n1", &token, MAC1).unwrap_err());
    assert!(e.contains("already used") && e.contains("alarm"), "{e}");
    let alarm = m.inv.enrollment("n1").unwrap().unwrap().alarm;
    assert!(alarm.is_some_and(|a| a.contains("second enrollment")));
    // No token is open any more.
    assert!(si_server::gate::enrollment_token(&m.inv, &m.ca, "n1")
        .unwrap()
        .is_none());
}

#[test]
fn revoked_replaced_expired_foreign_and_borrowed_certificates_are_refused() {
    let m = master();
    let t1 = m.arm("n1");
    let id1 = m.enroll("n1", &t1, MAC1).unwrap();
    // An open session is cut off at its next request after si-node revoke.
    let mut c = m.client(Some(&id1));
    c.manifest("web", None).unwrap();
    m.inv.revoke("n1").unwrap();
    let e = refused(c.manifest("web", None));
    assert!(e.contains("revoked"), "{e}");
    // Re-armed and enrolled again: the new certificate works, the old one (still valid and
    // from the right CA) is refused.
    let t2 = m.arm("n1");
    let id2 = m.enroll("n1", &t2, MAC1).unwrap();
    m.client(Some(&id2)).manifest("web", None).unwrap();
    let e = refused(m.client(Some(&id1)).manifest("web", None));
    assert!(e.contains("not its current one"), "{e}");
    // A certificate for n1 issued by the CA but never enrolled (as if copied from another
    // node's disk, or minted for a stolen key): refused, it is not the current one.
    let key = NodeIdentity::generate_key().unwrap();
    let spki = NodeIdentity::public_key_der(&key).unwrap();
    let stray = NodeIdentity {
        name: "n1".into(),
        key,
        chain: vec![
            m.ca.issue_node("n1", &spki, Duration::from_secs(3600))
                .unwrap(),
            m.ca.ca_der().to_vec(),
        ],
    };
    refused(m.client(Some(&stray)).manifest("web", None));
    // n2's certificate presented for n1's image and n1's reports: refused.
    let t3 = m.arm("n2");
    let id_n2 = m.enroll("n2", &t3, MAC2).unwrap();
    refused(m.client(Some(&id_n2)).manifest("web", None));
    refused(m.client(Some(&id_n2)).report("n1", "installed", ""));
    // An expired certificate: the TLS handshake refuses it.
    let now = time::OffsetDateTime::now_utc();
    let key = NodeIdentity::generate_key().unwrap();
    let spki = NodeIdentity::public_key_der(&key).unwrap();
    let expired = NodeIdentity {
        name: "n1".into(),
        key,
        chain: vec![
            m.ca.issue_node_between(
                "n1",
                &spki,
                now - time::Duration::days(9),
                now - time::Duration::days(1),
            )
            .unwrap(),
            m.ca.ca_der().to_vec(),
        ],
    };
    let c = Connector::master(m.ca.fingerprint(), Some(&expired)).unwrap();
    let e = Client::connect(&m.addr, Duration::from_secs(5), &c)
        .err()
        .unwrap();
    assert!(!format!("{e:#}").is_empty());
    // A certificate from another CA: refused at the handshake.
    let other = Authority::open_or_create(&m._t.path().join("other-ca"), &[]).unwrap();
    let key = NodeIdentity::generate_key().unwrap();
    let spki = NodeIdentity::public_key_der(&key).unwrap();
    let foreign = NodeIdentity {
        name: "n1".into(),
        key,
        chain: vec![
            other
                .issue_node("n1", &spki, Duration::from_secs(3600))
                .unwrap(),
            other.ca_der().to_vec(),
        ],
    };
    let c = Connector::master(m.ca.fingerprint(), Some(&foreign)).unwrap();
    assert!(Client::connect(&m.addr, Duration::from_secs(5), &c)
        .and_then(|mut c| c.manifest("web", None).map(|_| ()))
        .is_err());
    let _ = Path::new("");
}

/// si-agentd accepts pushes from the master's certificate only: the master's push updates the
/// node; a node's certificate, no certificate, plain TCP with the old shared token, and a
/// master that expects another node are all refused, and the node's tree is left alone.
#[test]
fn the_push_agent_accepts_only_the_master() {
    let m = master();
    let token = m.arm("n1");
    let id = m.enroll("n1", &token, MAC1).unwrap();
    let iddir = m._t.path().join("n1-etc-si");
    id.save(&iddir).unwrap();
    let root = m._t.path().join("n1-root");
    std::fs::create_dir(&root).unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = l.local_addr().unwrap().to_string();
    let cfg = si_agent::agentd::AgentConfig {
        listen: l.local_addr().unwrap(),
        master: vec![],
        token_file: m._t.path().join("no-token"),
        root: root.clone(),
        state_dir: Some(m._t.path().join("n1-state")),
        ca_fingerprint: None,
        insecure: false,
        identity_dir: Some(iddir.clone()),
    };
    std::thread::spawn(move || si_agent::agentd::serve_on(l, cfg));

    let push_cfg = |insecure: bool| {
        use clap::Parser;
        let mut args = vec!["si-pushupdate", "--server", &m.addr, "--image", "web"];
        args.extend(["--timeout", "20"]);
        if insecure {
            args.push("--insecure");
        }
        si_imageserver::push::PushConfig::parse_from(args)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let push = |trust: si_imageserver::push::Trust, insecure: bool| {
        rt.block_on(si_imageserver::push::push(
            std::slice::from_ref(&agent),
            &push_cfg(insecure),
            &trust,
        ))
        .remove(0)
    };

    // Plain TCP with a token: the agent speaks TLS only.
    let r = push(si_imageserver::push::Trust::Token("s3cret".into()), true);
    assert!(!r.ok, "{r:?}");
    assert!(!root.join("secret").exists());

    // TLS, but without a certificate, or with a node's: refused before the si handshake.
    let node_verifier = || {
        Arc::new(si_trust::tls::NodeVerifier::new(m.ca.ca_der(), None).unwrap())
            as Arc<dyn rustls::client::danger::ServerCertVerifier>
    };
    let base = || {
        rustls::ClientConfig::builder_with_provider(si_trust::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(node_verifier())
    };
    let (chain, key) = id.rustls();
    for (what, config) in [
        ("no certificate", base().with_no_client_auth()),
        (
            "a node's certificate",
            base().with_client_auth_cert(chain, key).unwrap(),
        ),
    ] {
        let e = si_hello(Arc::new(config), &agent).expect_err(what);
        assert!(
            e.contains("closed") || e.contains("alert") || e.contains("reset") || e.contains("EOF"),
            "{what}: {e}"
        );
    }
    assert!(!root.join("secret").exists());

    // The master, expecting another node: the agent's certificate names n1.
    let e =
        si_hello(m.ca.agent_client_config(Some("n2")).unwrap(), &agent).expect_err("wrong node");
    assert!(e.contains("the peer is node n1, not n2"), "{e}");

    // The master: the push runs, and the node updates from the master as n1.
    let r = push(si_imageserver::push::Trust::Tls(m.ca.clone()), false);
    assert!(r.ok, "{r:?}");
    assert_eq!(
        std::fs::read(root.join("secret")).unwrap(),
        b"web shadow".to_vec()
    );
}

/// Opens TLS to `addr` with `config` and says Hello as a pusher (no token): the error, if any.
fn si_hello(config: Arc<rustls::ClientConfig>, addr: &str) -> Result<(), String> {
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("n1.node.si").unwrap();
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut s = si_proto::stream::BufStream::new(rustls::StreamOwned::new(conn, tcp));
    let creds = si_proto::handshake::Credentials {
        token: String::new(),
        client: "test".into(),
    };
    si_proto::handshake::connect(&mut s, si_proto::msg::Role::Push, &creds)
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}
