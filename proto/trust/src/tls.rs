//! rustls configurations: a client that trusts only the pinned CA, the master's server with
//! optional client certificates, and a blocking stream that is TLS or (with `--insecure`) TCP.

use crate::{Fingerprint, NodeIdentity};
use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

/// Verifies a server against the CA whose certificate has the pinned fingerprint. The server
/// sends that CA certificate in its chain; it becomes the only trust anchor for the handshake,
/// and the chain is then verified by webpki as usual (signatures, validity, server-auth usage,
/// and the name: `master.si` for the master, whatever address was dialled).
#[derive(Debug)]
pub struct PinnedVerifier {
    pin: Fingerprint,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedVerifier {
    pub fn new(pin: Fingerprint) -> PinnedVerifier {
        PinnedVerifier {
            pin,
            provider: crate::provider(),
        }
    }

    fn anchored(
        &self,
        ca: &CertificateDer<'_>,
    ) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("building the pinned verifier: {e}")))
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| Fingerprint::of(c.as_ref()) == self.pin)
        else {
            tracing::warn!(pin = %self.pin, "the server's chain does not contain the pinned CA");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ));
        };
        self.anchored(ca)?
            .verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    crate::handshake_signatures!();
}

/// A client config that trusts only the CA pinned by `pin`, presenting `identity` (a node's
/// certificate) when given.
pub fn client_config(
    pin: Fingerprint,
    identity: Option<&NodeIdentity>,
) -> Result<Arc<ClientConfig>> {
    let b = ClientConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier::new(pin)));
    let cfg = match identity {
        Some(id) => {
            let (chain, key) = id.rustls();
            b.with_client_auth_cert(chain, key)
                .context("loading the node certificate")?
        }
        None => b.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// How a blocking client reaches an si server: TLS with a pinned CA (the default), or plain
/// TCP when the operator said `--insecure`.
#[derive(Clone)]
pub enum Connector {
    Tls {
        config: Arc<ClientConfig>,
        pin: Fingerprint,
        /// The name the server's certificate must carry (`master.si` for the master).
        name: String,
        /// The node this client presents itself as, when it has an identity.
        node: Option<String>,
    },
    Insecure,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connector::Tls { pin, name, .. } => write!(f, "Tls({name}, {pin})"),
            Connector::Insecure => f.write_str("Insecure"),
        }
    }
}

impl Connector {
    /// TLS to the master, trusting the pinned CA, with an optional node identity.
    pub fn master(pin: Fingerprint, identity: Option<&NodeIdentity>) -> Result<Connector> {
        Ok(Connector::Tls {
            config: client_config(pin, identity)?,
            pin,
            name: crate::MASTER_NAME.to_string(),
            node: identity.map(|i| i.name.clone()),
        })
    }

    /// TLS to another node's relay: the peer must present node `peer`'s certificate from the
    /// pinned CA (a node certificate carries server-auth usage and `NAME.node.si`); this node
    /// presents its own identity, which the relay requires.
    pub fn node_peer(pin: Fingerprint, identity: &NodeIdentity, peer: &str) -> Result<Connector> {
        Ok(Connector::Tls {
            config: client_config(pin, Some(identity))?,
            pin,
            name: crate::Peer::Node(peer.to_string()).san(),
            node: Some(identity.name.clone()),
        })
    }

    /// From the usual client options: `--insecure` wins (and is logged loudly), otherwise a pin
    /// is required; a node identity in `identity_dir` is used when one is there.
    pub fn from_options(
        pin: Option<Fingerprint>,
        insecure: bool,
        identity_dir: Option<&std::path::Path>,
    ) -> Result<Connector> {
        if insecure {
            tracing::warn!("--insecure: talking to the si server over plain TCP; anyone on the path reads and alters what is sent");
            return Ok(Connector::Insecure);
        }
        let pin = pin.ok_or_else(|| {
            anyhow!("no CA fingerprint: pass --ca-fingerprint (si-server ca show prints it) or --insecure")
        })?;
        let identity = match identity_dir {
            Some(d) if d.join(crate::identity::KEY_FILE).exists() => {
                Some(NodeIdentity::load(d, &pin)?)
            }
            _ => None,
        };
        Connector::master(pin, identity.as_ref())
    }

    /// Wraps a connected TCP stream; the TLS handshake happens on the first read or write.
    pub fn wrap(&self, tcp: TcpStream) -> Result<ClientStream> {
        match self {
            Connector::Insecure => {
                tracing::warn!(peer = ?tcp.peer_addr().ok(), "--insecure: plain TCP connection");
                Ok(ClientStream::Plain(tcp))
            }
            Connector::Tls { config, name, .. } => {
                let sn = ServerName::try_from(name.clone())
                    .map_err(|e| anyhow!("{name} is not a server name: {e}"))?;
                let conn = rustls::ClientConnection::new(config.clone(), sn)
                    .context("starting a TLS session")?;
                Ok(ClientStream::Tls(Box::new(rustls::StreamOwned::new(
                    conn,
                    ReadAhead::new(tcp),
                ))))
            }
        }
    }

    /// The node name of the identity presented, if any.
    pub fn node(&self) -> Option<&str> {
        match self {
            Connector::Tls { node, .. } => node.as_deref(),
            Connector::Insecure => None,
        }
    }

    /// The pinned CA fingerprint (None when insecure).
    pub fn pin(&self) -> Option<Fingerprint> {
        match self {
            Connector::Tls { pin, .. } => Some(*pin),
            Connector::Insecure => None,
        }
    }
}

/// A node's server config for its relay listener: its own chain (node certificate, then the
/// CA's, so the peer finds its pin), and client certificates verified against that CA when sent.
/// A client certificate stays optional at the TLS layer, as on the master: the relay's gate
/// refuses every request from a peer without one, so the refusal is an answer, not a reset.
pub fn node_server_config(identity: &NodeIdentity) -> Result<Arc<rustls::ServerConfig>> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(identity.ca().to_vec()))
        .context("adding the CA as a root")?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        crate::provider(),
    )
    .allow_unauthenticated()
    .build()
    .context("building the client verifier")?;
    let (chain, key) = identity.rustls();
    let cfg = rustls::ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("loading the node certificate")?;
    Ok(Arc::new(cfg))
}

/// The socket under a client's TLS session, read in large pieces. rustls asks its transport
/// for at most 4 KiB at a time, one system call each, so a 16 KiB record took four or five;
/// here one `read` takes whatever the socket holds (up to [`READ_AHEAD`]) and rustls's small
/// reads are served from memory. Writes go straight through. Nothing is read before rustls
/// asks for it, so a read never blocks where the bare socket would not have.
pub struct ReadAhead {
    sock: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

/// How much a [`ReadAhead`] takes from the socket at once.
pub const READ_AHEAD: usize = 256 << 10;

impl ReadAhead {
    pub fn new(sock: TcpStream) -> ReadAhead {
        ReadAhead {
            sock,
            buf: vec![0; READ_AHEAD].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.sock
    }
}

impl Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.end {
            if out.len() >= self.buf.len() {
                return self.sock.read(out);
            }
            self.end = self.sock.read(&mut self.buf)?;
            self.pos = 0;
        }
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for ReadAhead {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.sock.write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// A client's connection: TLS, or TCP under `--insecure`.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, ReadAhead>>),
}

impl ClientStream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(s) => s.get_ref().get_ref(),
        }
    }

    /// Completes the TLS handshake now (so a wrong CA fails here, with a clear error).
    pub fn handshake(&mut self) -> std::io::Result<()> {
        if let ClientStream::Tls(s) = self {
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock)?;
            }
        }
        Ok(())
    }

    /// The cipher suite the handshake settled on (None under `--insecure` or before it).
    pub fn cipher_suite(&self) -> Option<rustls::CipherSuite> {
        match self {
            ClientStream::Plain(_) => None,
            ClientStream::Tls(s) => s.conn.negotiated_cipher_suite().map(|c| c.suite()),
        }
    }

    /// This session's binding ([`crate::capture::binding`]); `None` under `--insecure`.
    pub fn binding(&self) -> Result<Option<[u8; 32]>> {
        match self {
            ClientStream::Plain(_) => Ok(None),
            ClientStream::Tls(s) => crate::capture::binding(&s.conn).map(Some),
        }
    }

    /// TLS to a golden client ([`crate::capture::master_client_config`]) on `tcp`, handshake
    /// done.
    pub fn capture(tcp: TcpStream, master: Option<crate::capture::Chain>) -> Result<ClientStream> {
        let name = ServerName::try_from(crate::capture::GOLDEN_NAME).expect("a valid name");
        let conn =
            rustls::ClientConnection::new(crate::capture::master_client_config(master)?, name)
                .context("starting a TLS session")?;
        let mut s = ClientStream::Tls(Box::new(rustls::StreamOwned::new(
            conn,
            ReadAhead::new(tcp),
        )));
        s.handshake()
            .context("TLS handshake with the golden client")?;
        Ok(s)
    }

    /// The CA certificate the server sent whose fingerprint is `pin` (the key that signs
    /// versions), once the handshake is done.
    pub fn pinned_ca(&self, pin: &Fingerprint) -> Option<Vec<u8>> {
        let ClientStream::Tls(s) = self else {
            return None;
        };
        s.conn
            .peer_certificates()?
            .iter()
            .find(|c| Fingerprint::of(c.as_ref()) == *pin)
            .map(|c| c.to_vec())
    }
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.read(buf),
            ClientStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.write(buf),
            ClientStream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ClientStream::Plain(s) => s.flush(),
            ClientStream::Tls(s) => s.flush(),
        }
    }
}

/// The accepting side of a service: TLS with the master's config, or plain TCP under
/// `--insecure`.
#[cfg(feature = "async")]
#[derive(Clone)]
pub enum Acceptor {
    Tls(tokio_rustls::TlsAcceptor),
    Insecure,
}

#[cfg(feature = "async")]
impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Acceptor::Tls(_) => "Tls",
            Acceptor::Insecure => "Insecure",
        })
    }
}

#[cfg(feature = "async")]
impl Acceptor {
    pub fn tls(config: Arc<rustls::ServerConfig>) -> Acceptor {
        Acceptor::Tls(tokio_rustls::TlsAcceptor::from(config))
    }

    /// Runs the TLS handshake (bounded by `deadline`) and says who the peer is: `None` for a
    /// peer without a certificate (and for every peer under `--insecure`).
    pub async fn accept(
        &self,
        tcp: tokio::net::TcpStream,
        deadline: std::time::Duration,
    ) -> Result<(ServerStream, Option<crate::Peer>)> {
        match self {
            Acceptor::Insecure => {
                tracing::warn!(peer = ?tcp.peer_addr().ok(), "--insecure: plain TCP session; the peer is not authenticated");
                Ok((ServerStream::Plain(tcp), None))
            }
            Acceptor::Tls(a) => {
                // A client that speaks plain si (it was given --insecure) is told so at once,
                // as a permanent refusal it can read, instead of seeing a broken connection
                // it would retry as if the master were down.
                let mut first = [0u8; 1];
                let n = tokio::time::timeout(deadline, tcp.peek(&mut first))
                    .await
                    .map_err(|_| anyhow!("TLS handshake timed out"))?
                    .context("reading the first byte")?;
                if n == 1 && first[0] != TLS_HANDSHAKE_RECORD {
                    refuse_plain(tcp).await;
                    bail!("a plain TCP client (--insecure?) on the TLS service: refused");
                }
                let s = tokio::time::timeout(deadline, a.accept(tcp))
                    .await
                    .map_err(|_| anyhow!("TLS handshake timed out"))?
                    .context("TLS handshake")?;
                let peer = match s.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                    Some(c) => Some(crate::Peer::from_cert(c.as_ref())?),
                    None => None,
                };
                Ok((ServerStream::Tls(Box::new(s)), peer))
            }
        }
    }
}

/// The first byte of every TLS connection (a handshake record carrying the ClientHello).
#[cfg(feature = "async")]
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Answers a plain si client on a TLS port with an si refusal it can read, then drains what
/// it sent (closing with unread bytes would reset the connection and lose the answer).
#[cfg(feature = "async")]
async fn refuse_plain(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let msg = si_proto::msg::Msg::Error {
        kind: si_proto::msg::ErrorKind::Refused,
        message: "this si server speaks TLS only: pin its CA (--ca-fingerprint; si-server ca show prints it) instead of --insecure".into(),
    };
    let mut out = Vec::new();
    if si_proto::frame::write_msg(&mut out, &msg).is_err() {
        return;
    }
    tracing::warn!(peer = ?tcp.peer_addr().ok(), "a plain TCP client on the TLS service: told to use TLS");
    let _ = tcp.write_all(&out).await;
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left = 64usize << 10;
        while left > 0 {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
}

/// The fingerprint of the certificate a server-side peer presented (the inventory keeps each
/// node's current one: a replaced or revoked certificate is refused even while it is valid).
#[cfg(feature = "async")]
pub fn peer_cert_fingerprint(s: &ServerStream) -> Option<Fingerprint> {
    match s {
        ServerStream::Plain(_) => None,
        ServerStream::Tls(t) => t
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| Fingerprint::of(c.as_ref())),
    }
}

/// A server-side session stream.
#[cfg(feature = "async")]
pub enum ServerStream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

#[cfg(feature = "async")]
mod server_io {
    use super::ServerStream;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    impl AsyncRead for ServerStream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                ServerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
                ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            }
        }
    }

    impl AsyncWrite for ServerStream {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            match self.get_mut() {
                ServerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
                ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            }
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                ServerStream::Plain(s) => Pin::new(s).poll_flush(cx),
                ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            }
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                ServerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
                ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            }
        }
    }
}

/// Verifies a node agent's certificate for the master: issued by the CA, naming a node, and
/// the node `expect` when the master dialled a node by name (by address, any node of the CA
/// is accepted and the caller learns which from the certificate). The name the master dialled
/// is not what is checked: a node's certificate carries only `NODE.node.si`.
#[derive(Debug)]
pub struct NodeVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expect: Option<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl NodeVerifier {
    pub fn new(ca_der: &[u8], expect: Option<&str>) -> Result<NodeVerifier> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_der.to_vec()))
            .context("loading the CA certificate")?;
        let provider = crate::provider();
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .context("building the node verifier")?;
        Ok(NodeVerifier {
            inner,
            expect: expect.map(str::to_string),
            provider,
        })
    }
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let node = match crate::Peer::from_cert(end_entity.as_ref()) {
            Ok(crate::Peer::Node(n)) => n,
            Ok(crate::Peer::Master) => {
                return Err(rustls::Error::General(
                    "the peer presented the master's certificate, not a node's".into(),
                ))
            }
            Err(e) => return Err(rustls::Error::General(format!("{e:#}"))),
        };
        if let Some(want) = &self.expect {
            if *want != node {
                return Err(rustls::Error::General(format!(
                    "the peer is node {node}, not {want}"
                )));
            }
        }
        let name = ServerName::try_from(crate::Peer::Node(node).san())
            .map_err(|e| rustls::Error::General(format!("not a node name: {e}")))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
    }

    crate::handshake_signatures!();
}

/// A node agent's server config (si-agentd): it presents the node's certificate and requires
/// a client certificate from the same CA; the caller then accepts only the master's
/// ([`accept_master`]).
pub fn agent_server_config(id: &NodeIdentity) -> Result<Arc<rustls::ServerConfig>> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(id.ca().to_vec()))
        .context("loading the CA certificate")?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        crate::provider(),
    )
    .build()
    .context("building the client verifier")?;
    let (chain, key) = id.rustls();
    let cfg = rustls::ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("loading the node certificate")?;
    Ok(Arc::new(cfg))
}

/// A blocking server-side TLS session (si-agentd's).
pub struct TlsServerStream(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>);

impl TlsServerStream {
    pub fn tcp(&self) -> &TcpStream {
        self.0.get_ref()
    }
}

impl Read for TlsServerStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsServerStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Runs the TLS handshake on `tcp` (bounded by the socket's read timeout, which the caller
/// sets), whoever the peer is: the caller authenticates it otherwise (the capture's token
/// proofs, [`crate::capture`]).
pub fn accept_any(config: &Arc<rustls::ServerConfig>, tcp: TcpStream) -> Result<TlsServerStream> {
    let conn = rustls::ServerConnection::new(config.clone()).context("starting a TLS session")?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).context("TLS handshake")?;
    }
    Ok(TlsServerStream(Box::new(s)))
}

impl TlsServerStream {
    /// This session's binding ([`crate::capture::binding`]).
    pub fn binding(&self) -> Result<[u8; 32]> {
        crate::capture::binding(&self.0.conn)
    }
}

/// Runs the TLS handshake on `tcp` (bounded by the socket's read timeout, which the caller
/// sets) and accepts the peer only if its certificate, verified against the CA, is the
/// master's: a node's certificate, a certificate from another CA or none at all is refused.
pub fn accept_master(
    config: &Arc<rustls::ServerConfig>,
    tcp: TcpStream,
) -> Result<TlsServerStream> {
    let s = accept_any(config, tcp)?;
    let cert =
        s.0.conn
            .peer_certificates()
            .and_then(|c| c.first())
            .context("the peer presented no certificate")?;
    match crate::Peer::from_cert(cert.as_ref())? {
        crate::Peer::Master => Ok(s),
        p => bail!("refused: {p} is not the master"),
    }
}
