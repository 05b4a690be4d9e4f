//! The installer's side of enrollment: make a key, present the one-time token, receive the node
//! certificate, keep both (outside the image: `/etc/si` is excluded from every capture).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let pin: si_trust::Fingerprint = "sha256:...".parse()?;
//! let id = si_trust::enroll::enroll("10.213.0.1:7811", pin, "n1", "TOKEN", "52:54:00:00:00:01", "UUID")?;
//! id.save(std::path::Path::new("/target/etc/si"))?;
//! # Ok(()) }
//! ```

use crate::{Connector, Fingerprint, NodeIdentity, Peer};
use anyhow::{anyhow, bail, Context, Result};
use si_proto::frame::{recv_msg, write_msg};
use si_proto::handshake::{self, Credentials};
use si_proto::msg::{Msg, Role};
use si_proto::stream::BufStream;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Enrolls node `node` with the master at `server` (HOST or HOST:PORT, 7811 by default), whose
/// CA is pinned by `pin`: a fresh key is made here, the token, MAC and SMBIOS UUID go with its
/// public key, and the answer must be a certificate for `node` from the pinned CA. Refusals
/// (a spent token, a wrong MAC...) come back as errors with the master's reason.
pub fn enroll(
    server: &str,
    pin: Fingerprint,
    node: &str,
    token: &str,
    mac: &str,
    uuid: &str,
) -> Result<NodeIdentity> {
    let server = if server.contains(':') {
        server.to_string()
    } else {
        format!("{server}:7811")
    };
    let addr = server
        .to_socket_addrs()
        .with_context(|| format!("resolving {server}"))?
        .next()
        .ok_or_else(|| anyhow!("{server} resolves to nothing"))?;
    let key = NodeIdentity::generate_key()?;
    let public_key = NodeIdentity::public_key_der(&key)?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))
        .context("setting a read timeout")?;
    let mut s = Connector::master(pin, None)?.wrap(tcp)?;
    s.handshake()
        .with_context(|| format!("TLS handshake with {addr}"))?;
    let mut conn = BufStream::new(s);
    let creds = Credentials {
        token: String::new(),
        client: node.to_string(),
    };
    handshake::connect(&mut conn, Role::Deploy, &creds).context("si handshake")?;
    write_msg(
        &mut conn,
        &Msg::Enroll {
            node: node.into(),
            token: token.into(),
            mac: mac.into(),
            uuid: uuid.into(),
            public_key,
        },
    )
    .context("sending the enrollment")?;
    conn.flush().context("sending the enrollment")?;
    let chain = match recv_msg(&mut conn).map_err(|e| anyhow!("enrolling {node}: {e}"))? {
        Msg::Enrolled { chain } => chain,
        m => bail!("enrolling {node}: unexpected answer {}", m.name()),
    };
    let _ = write_msg(&mut conn, &Msg::Bye);
    let _ = conn.flush();
    if chain.len() != 2 || Fingerprint::of(&chain[1]) != pin {
        bail!("the master's answer does not end in the pinned CA");
    }
    if Peer::from_cert(&chain[0])? != Peer::Node(node.to_string()) {
        bail!("the certificate the master sent is not for {node}");
    }
    Ok(NodeIdentity {
        name: node.to_string(),
        key,
        chain,
    })
}
