//! `si-server`'s image service: nodes fetch manifests and objects over the si protocol.
//!
//! One task per connection, a semaphore caps connections (the one past the cap gets
//! `Error{Busy}`, which nodes retry with backoff). Whatever a `Want` asks for, a connection
//! holds at most [`GROUP_BYTES`] of compressed objects plus one object (objects are at most
//! one chunk, 1 MiB) read from the store at a time, and its 1 MiB write buffer: about 3 MiB,
//! 1.5 GiB at the default cap of 512 connections. Objects go out compressed exactly as
//! stored; the node verifies them.

use crate::manifest_cache::ManifestCache;
use anyhow::{bail, Context, Result};
use si_proto::frame::{read_frame_async, write_data_async, write_msg_async, Frame, MAX_FRAME};
use si_proto::handshake::{self, Policy};
use si_proto::msg::{self, ErrorKind, ImageVersionInfo, Msg, Role};
use si_proto::persource::PerSource;
use si_store::Store;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskCx, Poll};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufWriter};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

#[derive(Clone)]
pub struct ServeConfig {
    pub max_connections: usize,
    /// Connections one source address may hold at once; the one past it gets `Error{Busy}`.
    pub per_source: usize,
    /// A message (the Hello included), once its first byte has arrived, must be whole within this.
    pub message_deadline: Duration,
    /// A connection with no request for this long (after its Hello, between requests) is closed.
    pub idle_timeout: Duration,
    /// A peer that takes none of the bytes it asked for in this long is dropped (slow reader).
    pub write_stall: Duration,
    /// TLS with the master's certificate (the default everywhere), or plain TCP under
    /// `--insecure`.
    pub transport: si_trust::Acceptor,
    /// Signs a version that has no signature yet (the master holds the key; a relay has none
    /// and serves the signatures it was given).
    pub signer: Option<Signer>,
    /// Who may do what, asked at every request.
    pub gate: Arc<dyn Gate>,
    /// Answers an installer's `GetPlan{node}` (a name or a MAC): the install plan as TOML, or
    /// None for a node the master does not know. Asked of the gate first (a node's plan goes
    /// only to that node); without a hook the service answers NotFound.
    pub plans: Option<PlanHook>,
    /// Multicast sessions nodes may join (`McastJoin`); None: answered NotFound.
    pub multicast: Option<Arc<crate::multicast::Multicast>>,
}

/// See [`ServeConfig::plans`].
pub type PlanHook = Arc<dyn Fn(&str) -> Result<Option<String>> + Send + Sync>;

/// Who is asking, as the session established it.
#[derive(Clone, Debug)]
pub struct Caller {
    pub addr: SocketAddr,
    /// The identity its certificate names (None: no certificate, or `--insecure`).
    pub peer: Option<si_trust::Peer>,
    /// The fingerprint of the certificate it presented.
    pub cert: Option<si_trust::Fingerprint>,
}

/// What each caller may do. Asked at every request, so a revocation takes effect on an open
/// session's next request. An `Err` is the refusal the caller is told (and the session ends).
pub trait Gate: Send + Sync + 'static {
    /// Manifests of `image` (and whether the image shows in a listing).
    fn may_read_image(&self, c: &Caller, image: &str) -> Result<()>;
    /// Objects (content-addressed: a caller learns digests from the manifests it may read).
    fn may_fetch_objects(&self, c: &Caller) -> Result<()>;
    /// A report about `node`.
    fn may_report(&self, c: &Caller, node: &str) -> Result<()>;
    /// The install plan of `node` (its overrides, settings and network): only the node itself
    /// (or the master), as for its reports.
    fn may_read_plan(&self, c: &Caller, node: &str) -> Result<()> {
        self.may_report(c, node)
    }
    /// Enrollment: the node certificate chain for the key, or the refusal.
    fn enroll(&self, c: &Caller, req: &EnrollRequest) -> Result<Vec<Vec<u8>>>;
}

/// An `Enroll` request as it arrived.
#[derive(Clone, Debug)]
pub struct EnrollRequest {
    pub node: String,
    pub token: String,
    pub mac: String,
    pub uuid: String,
    pub public_key: Vec<u8>,
}

/// Everyone may read and report; nobody enrolls. For `--insecure` labs and tests of other
/// concerns: it authorises nothing, so the master never runs TLS with it.
pub struct Open;

impl Gate for Open {
    fn may_read_image(&self, _: &Caller, _: &str) -> Result<()> {
        Ok(())
    }
    fn may_fetch_objects(&self, _: &Caller) -> Result<()> {
        Ok(())
    }
    fn may_report(&self, _: &Caller, _: &str) -> Result<()> {
        Ok(())
    }
    fn enroll(&self, _: &Caller, _: &EnrollRequest) -> Result<Vec<Vec<u8>>> {
        bail!("this server does not enroll nodes")
    }
}

/// Signs (image, version, manifest digest); the master's is its CA key (si-trust `sign`).
pub type Signer = Arc<dyn Fn(&str, u32, &si_proto::Digest) -> Result<Vec<u8>> + Send + Sync>;

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("max_connections", &self.max_connections)
            .field("per_source", &self.per_source)
            .field("message_deadline", &self.message_deadline)
            .field("idle_timeout", &self.idle_timeout)
            .field("write_stall", &self.write_stall)
            .field("transport", &self.transport)
            .field("signer", &self.signer.is_some())
            .field("plans", &self.plans.is_some())
            .field("multicast", &self.multicast)
            .field("gate", &"..")
            .finish()
    }
}

/// The digest a version's signature covers: the version's manifest digest
/// (`si_proto::manifest::digest`, over the plain encoding; the store reads old records too).
/// Every signature is made and checked over this one value.
pub fn manifest_digest(store: &Store, image: &str, v: u32) -> Result<si_proto::Digest> {
    store
        .manifest_digest(image, v)
        .with_context(|| format!("reading the manifest digest of {image}@{v}"))
}

/// The signature on `image@v`: the stored one, else (where this server holds the key) made now
/// and stored beside the version.
pub fn version_signature(
    store: &Store,
    signer: Option<&Signer>,
    image: &str,
    v: u32,
) -> Result<Vec<u8>> {
    if let Some(s) = store.signature(image, v)? {
        return Ok(s);
    }
    let Some(sign) = signer else {
        bail!("{image}@{v} is not signed and this server holds no signing key");
    };
    let digest = manifest_digest(store, image, v)?;
    let sig = sign(image, v, &digest)?;
    store.write_signature(image, v, &sig)?;
    tracing::info!(%image, version = v, "signed a version");
    Ok(sig)
}

/// Signs every version that has no signature yet (the migration si-server runs at start);
/// returns how many it signed.
pub fn sign_unsigned(store: &Store, signer: &Signer) -> Result<usize> {
    let mut n = 0;
    for image in store.images()? {
        for v in store.versions(&image)? {
            if store.signature(&image, v)?.is_none() {
                version_signature(store, Some(signer), &image, v)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

impl ServeConfig {
    /// The default limits over `transport`.
    pub fn new(transport: si_trust::Acceptor) -> ServeConfig {
        ServeConfig {
            max_connections: 512,
            per_source: 16,
            message_deadline: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            write_stall: Duration::from_secs(60),
            transport,
            signer: None,
            gate: Arc::new(Open),
            plans: None,
            multicast: None,
        }
    }
}

/// How long a client has to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest node name, state and report detail the service keeps; past it, text is cut with a
/// marker.
pub const MAX_REPORT_NAME: usize = 256;
pub const MAX_REPORT_DETAIL: usize = 4096;

/// Report text as the service logs and stores it: control characters (newlines included, which
/// would forge log lines) escaped as `\n`, `\u{1b}`..., a backslash doubled, and cut at `max`
/// bytes with a marker saying how much was dropped.
pub fn clean_report_text(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 32);
    for (i, c) in s.char_indices() {
        let piece: String = if c == '\\' {
            "\\\\".into()
        } else if c.is_control() {
            c.escape_default().collect()
        } else {
            c.into()
        };
        if out.len() + piece.len() > max {
            out.push_str(&format!("…[{} bytes cut]", s.len() - i));
            return out;
        }
        out.push_str(&piece);
    }
    out
}

/// Called when a node reports install/update progress or completion.
/// Its error reaches the node: a report that was not stored is never acknowledged.
pub type ReportHook = Arc<dyn Fn(&str, &str, &str) -> Result<()> + Send + Sync>;

/// Where the service finds the objects it sends: the master's store, and later a node's own
/// tree when it relays to its neighbours. Objects go out compressed as the source holds them;
/// the receiver verifies every one against its digest, so a source need not be trusted.
pub trait ObjectFinder: Send + Sync + 'static {
    /// The object's uncompressed length and its zstd-compressed bytes.
    fn object(&self, d: &si_proto::Digest) -> Result<(u32, Vec<u8>)>;

    /// Whether `object` may wait for an object that has not arrived yet (a relay forwarding
    /// as it fetches). Then the service sends each object as soon as it has it: one object per
    /// read, flushed before the next read, so nothing it has waits behind one it has not.
    fn may_wait(&self) -> bool {
        false
    }

    /// The object, if it is at hand without waiting or reading a disk (a relay's memory
    /// buffer): the service then sends it from its own thread, together with the others at
    /// hand, in one flush. None sends it the `object` way.
    fn at_hand(&self, _d: &si_proto::Digest) -> Option<(u32, Vec<u8>)> {
        None
    }
}

impl ObjectFinder for Store {
    fn object(&self, d: &si_proto::Digest) -> Result<(u32, Vec<u8>)> {
        self.get_compressed(d)
    }
}

/// Serves until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    store: Arc<Store>,
    cfg: ServeConfig,
    report: Option<ReportHook>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let objects: Arc<dyn ObjectFinder> = store.clone();
    serve(listener, Some(store), objects, cfg, report, shutdown).await
}

/// The object path alone, as a relaying node runs it: the same sessions, limits, transport and
/// gate as the master's service, objects from `objects`, and no store behind it (manifests,
/// listings and plans are answered NotFound: they always come from the master, signed).
pub async fn run_objects(
    listener: TcpListener,
    objects: Arc<dyn ObjectFinder>,
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    serve(listener, None, objects, cfg, None, shutdown).await
}

async fn serve(
    listener: TcpListener,
    store: Option<Arc<Store>>,
    objects: Arc<dyn ObjectFinder>,
    cfg: ServeConfig,
    report: Option<ReportHook>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let sem = Arc::new(Semaphore::new(cfg.max_connections));
    let sources = PerSource::new(cfg.per_source);
    if matches!(cfg.transport, si_trust::Acceptor::Insecure) {
        tracing::warn!("--insecure: the image service accepts plain TCP; anyone who reaches it reads every image");
    }
    let transport = cfg.transport.clone();
    let signer = cfg.signer.clone();
    let gate = cfg.gate.clone();
    let plans = cfg.plans.clone();
    let multicast = cfg.multicast.clone();
    let cache = Arc::new(ManifestCache::default());
    // The delta to each image's newest version is ready before the first node asks.
    // Dropping the set (when this returns) stops the warmer.
    let mut background = tokio::task::JoinSet::new();
    if let Some(store) = &store {
        let (store, cache) = (store.clone(), cache.clone());
        background.spawn(async move {
            loop {
                let (store, cache) = (store.clone(), cache.clone());
                let _ = tokio::task::spawn_blocking(move || cache.warm(&store)).await;
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        });
    }
    tokio::pin!(shutdown);
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => {
                let (s, p) = r.context("accepting a connection")?;
                s.set_nodelay(true).ok();
                (s, p)
            }
            _ = &mut shutdown => return Ok(()),
        };
        let store = store.clone();
        let objects = objects.clone();
        let cache = cache.clone();
        let report = report.clone();
        let transport = transport.clone();
        let signer = signer.clone();
        let gate = gate.clone();
        let plans = plans.clone();
        let multicast = multicast.clone();
        let limits = Limits::of(&cfg);
        let slot = sources.try_take(peer.ip());
        if slot.is_none() {
            tracing::warn!(%peer, cap = sources.max(), "source holds its cap of connections");
        }
        match (slot, sem.clone().try_acquire_owned()) {
            (Some(slot), Ok(permit)) => {
                tokio::spawn(async move {
                    let _slot = slot;
                    let res = match transport.accept(sock, TLS_HANDSHAKE_TIMEOUT).await {
                        Ok((sock, who)) => {
                            let caller = Caller {
                                addr: peer,
                                peer: who,
                                cert: si_trust::tls::peer_cert_fingerprint(&sock),
                            };
                            let ctx = Session {
                                store,
                                objects,
                                cache,
                                report,
                                signer,
                                gate,
                                caller,
                                limits,
                                plans,
                                multicast,
                            };
                            handle(sock, ctx).await
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = res {
                        tracing::warn!(%peer, error = format!("{e:#}"), "session failed");
                    }
                    drop(permit);
                });
            }
            _ => {
                tokio::spawn(async move {
                    // The refusal travels inside TLS: that is what the client speaks.
                    let Ok((mut sock, _)) = transport.accept(sock, TLS_HANDSHAKE_TIMEOUT).await
                    else {
                        return;
                    };
                    let mut sock = Stalling::new(&mut sock, Duration::from_secs(5));
                    if let Err(e) = handshake::refuse_busy_async(&mut sock).await {
                        tracing::debug!(%peer, error = %e, "telling a client we are busy");
                    }
                });
            }
        }
    }
}

/// A stream whose writes fail with `TimedOut` when the peer takes no bytes for `stall`: a
/// slow or stopped reader cannot hold a connection (and its buffers) forever. Reads pass through.
struct Stalling<S> {
    inner: S,
    stall: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Stalling<S> {
    fn new(inner: S, stall: Duration) -> Self {
        Stalling {
            inner,
            stall,
            timer: None,
        }
    }

    /// Called when the inner write is pending: arms the timer once, fails when it fires.
    fn pending(&mut self, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        let stall = self.stall;
        let t = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match t.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("peer took no bytes for {stall:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Stalling<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stalling<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                self.timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.pending(cx).map(|r| r.map(|()| 0)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(r) => {
                self.timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.pending(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn info(store: &Store, image: &str, v: u32) -> Result<ImageVersionInfo> {
    let m = store.meta(image, v)?;
    Ok(ImageVersionInfo {
        image: image.into(),
        version: v,
        created: m.created,
        entries: m.entries,
        bytes: m.bytes,
    })
}

/// The answer to a manifest request: the whole manifest, or the difference from the base the
/// node has when the store still holds that base; the header and the bytes that follow it.
fn manifest_reply(
    store: &Store,
    cache: &ManifestCache,
    signer: Option<&Signer>,
    image: &str,
    version: Option<u32>,
    base: Option<(String, u32)>,
) -> Result<(Msg, Arc<Vec<u8>>)> {
    let v = store.resolve(image, version)?;
    let target = cache.stored(store, image, v)?;
    let info = info(store, image, v)?;
    let signature = version_signature(store, signer, image, v)?;
    let (digest, len) = (target.digest, target.len);
    if let Some(Ok(base)) = base.map(|(bi, bv)| cache.stored(store, &bi, bv)) {
        let delta = cache.delta(&base, &target)?;
        let head = Msg::ManifestDeltaIs {
            info,
            digest,
            bytes: len,
            delta_bytes: delta.len() as u64,
            signature,
        };
        return Ok((head, delta));
    }
    Ok((
        Msg::ManifestIs {
            info,
            digest,
            bytes: len,
            signature,
        },
        Arc::new(target.bytes()?),
    ))
}

/// Compressed object bytes one connection reads from the store in one trip: small objects
/// travel in groups (one blocking call for many), and a connection never holds more than this
/// plus one object.
const GROUP_BYTES: usize = 1 << 20;

/// An object as it goes out: digest, uncompressed length, compressed bytes.
type Outgoing = (si_proto::Digest, u32, Vec<u8>);

/// Reads objects from the front of `want` until their compressed bytes reach `budget` (at
/// least one object); returns them and how many digests of `want` they cover.
fn read_group(
    source: &dyn ObjectFinder,
    want: &[si_proto::Digest],
    budget: usize,
) -> (Result<Vec<Outgoing>>, usize) {
    let mut out = Vec::new();
    let mut held = 0;
    for (i, d) in want.iter().enumerate() {
        if held >= budget {
            return (Ok(out), i);
        }
        match source.object(d) {
            Ok((raw, z)) => {
                held += z.len();
                out.push((*d, raw, z));
            }
            Err(e) => return (Err(e), i + 1),
        }
    }
    (Ok(out), want.len())
}

/// What one session works with.
struct Session {
    /// None on a relay: it serves objects only.
    store: Option<Arc<Store>>,
    objects: Arc<dyn ObjectFinder>,
    cache: Arc<ManifestCache>,
    report: Option<ReportHook>,
    signer: Option<Signer>,
    gate: Arc<dyn Gate>,
    caller: Caller,
    limits: Limits,
    plans: Option<PlanHook>,
    multicast: Option<Arc<crate::multicast::Multicast>>,
}

/// The per-connection deadlines a session runs under (from [`ServeConfig`]).
#[derive(Clone, Copy, Debug)]
struct Limits {
    message_deadline: Duration,
    idle_timeout: Duration,
    write_stall: Duration,
}

impl Limits {
    fn of(cfg: &ServeConfig) -> Limits {
        Limits {
            message_deadline: cfg.message_deadline,
            idle_timeout: cfg.idle_timeout,
            write_stall: cfg.write_stall,
        }
    }
}

/// Asks the gate (blocking: it reads the inventory); a refusal is logged with who asked.
async fn allowed(
    gate: &Arc<dyn Gate>,
    caller: &Caller,
    what: &'static str,
    f: impl FnOnce(&dyn Gate, &Caller) -> Result<()> + Send + 'static,
) -> Result<()> {
    let (g, c) = (gate.clone(), caller.clone());
    let r = tokio::task::spawn_blocking(move || f(&*g, &c)).await?;
    if let Err(e) = &r {
        tracing::warn!(peer = %caller.addr, who = ?caller.peer, what, error = format!("{e:#}"), "request refused");
    }
    r
}

/// One object as it goes out: its Blob message, then its compressed bytes.
async fn write_blob<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    digest: si_proto::Digest,
    raw_len: u32,
    z: &[u8],
) -> Result<()> {
    write_msg_async(w, &Msg::Blob { digest, raw_len }).await?;
    write_data_async(w, z).await?;
    Ok(())
}

async fn refuse<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, e: anyhow::Error) -> Result<()> {
    write_msg_async(
        w,
        &Msg::Error {
            kind: ErrorKind::Refused,
            message: format!("{e:#}"),
        },
    )
    .await?;
    w.flush().await?;
    bail!("refused: {e:#}")
}

async fn handle(sock: si_trust::ServerStream, ctx: Session) -> Result<()> {
    let Session {
        store,
        objects,
        cache,
        report,
        signer,
        gate,
        caller,
        limits,
        plans,
        multicast,
    } = ctx;
    let peer = caller.addr;
    let mut sock = Stalling::new(sock, limits.write_stall);
    let policy = Policy {
        roles: vec![Role::Deploy],
        token: None,
        server: si_tree::fsutil::hostname(),
    };
    let peer_hello = tokio::time::timeout(
        limits.message_deadline,
        handshake::accept_async(&mut sock, &policy),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no hello within {:?}", limits.message_deadline))?
    .context("handshake")?;
    tracing::debug!(%peer, client = %peer_hello.client, version = peer_hello.version, "session open");
    let (r, w) = tokio::io::split(sock);
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
    let mut w = BufWriter::with_capacity(1 << 20, w);
    loop {
        // Idle between requests: wait for the first byte of the next one.
        match tokio::time::timeout(limits.idle_timeout, r.fill_buf()).await {
            Err(_) => {
                tracing::debug!(%peer, idle = ?limits.idle_timeout, "closing an idle connection");
                return Ok(());
            }
            Ok(got) => {
                if got.context("reading a request")?.is_empty() {
                    return Ok(());
                }
            }
        }
        let Some(frame) = tokio::time::timeout(limits.message_deadline, read_frame_async(&mut r))
            .await
            .map_err(|_| {
                anyhow::anyhow!("no whole message within {:?}", limits.message_deadline)
            })??
        else {
            return Ok(());
        };
        let Frame::Msg(m) = frame else {
            bail!("unexpected data frame")
        };
        let res: Result<()> = match m {
            Msg::Bye => return Ok(()),
            Msg::ListImages | Msg::GetManifest { .. } | Msg::GetManifestDelta { .. }
                if store.is_none() =>
            {
                let m = Msg::Error {
                    kind: ErrorKind::NotFound,
                    message: "this relay serves objects only; manifests come from the master"
                        .into(),
                };
                write_msg_async(&mut w, &m).await.map_err(Into::into)
            }
            Msg::ListImages => {
                let Some(st) = store.clone() else {
                    bail!("no store behind this service")
                };
                let (g, c) = (gate.clone(), caller.clone());
                let list = tokio::task::spawn_blocking(move || -> Result<Vec<ImageVersionInfo>> {
                    let mut out = Vec::new();
                    for n in st.images()? {
                        // A caller sees only the images it may read.
                        if g.may_read_image(&c, &n).is_err() {
                            continue;
                        }
                        for v in st.versions(&n)? {
                            out.push(info(&st, &n, v)?);
                        }
                    }
                    Ok(out)
                })
                .await??;
                write_msg_async(&mut w, &Msg::Images(list))
                    .await
                    .map_err(Into::into)
            }
            m @ (Msg::GetManifest { .. } | Msg::GetManifestDelta { .. }) => {
                let (image, version, base) = match m {
                    Msg::GetManifestDelta {
                        image,
                        version,
                        base_image,
                        base_version,
                    } => (image, version, Some((base_image, base_version))),
                    Msg::GetManifest { image, version } => (image, version, None),
                    _ => unreachable!("matched above"),
                };
                let img = image.clone();
                if let Err(e) = allowed(&gate, &caller, "manifest", move |g, c| {
                    g.may_read_image(c, &img)
                })
                .await
                {
                    return refuse(&mut w, e).await;
                }
                let Some(st) = store.clone() else {
                    bail!("no store behind this service")
                };
                let (c, sg) = (cache.clone(), signer.clone());
                let got = tokio::task::spawn_blocking(move || {
                    manifest_reply(&st, &c, sg.as_ref(), &image, version, base)
                })
                .await?;
                match got {
                    Ok((head, data)) => {
                        write_msg_async(&mut w, &head).await?;
                        for part in data.chunks(MAX_FRAME / 2) {
                            write_data_async(&mut w, part).await?;
                        }
                    }
                    Err(e) => {
                        let m = Msg::Error {
                            kind: ErrorKind::NotFound,
                            message: format!("{e:#}"),
                        };
                        write_msg_async(&mut w, &m).await?;
                    }
                }
                Ok(())
            }
            Msg::Want(ds) => {
                if ds.len() > msg::MAX_WANT {
                    bail!("Want of {} digests exceeds {}", ds.len(), msg::MAX_WANT);
                }
                if let Err(e) =
                    allowed(&gate, &caller, "objects", |g, c| g.may_fetch_objects(c)).await
                {
                    return refuse(&mut w, e).await;
                }
                let mut rest = &ds[..];
                let streaming = objects.may_wait();
                let budget = if streaming { 1 } else { GROUP_BYTES };
                while !rest.is_empty() {
                    if streaming {
                        // What the relay holds already goes out at once, a group in one
                        // flush: a round trip to a blocking thread and a flush per object
                        // held a chain to about 1 ms an object.
                        let (mut n, mut bytes) = (0, 0);
                        while n < rest.len() && bytes < GROUP_BYTES {
                            let Some((raw, z)) = objects.at_hand(&rest[n]) else {
                                break;
                            };
                            write_blob(&mut w, rest[n], raw, &z).await?;
                            bytes += z.len();
                            n += 1;
                        }
                        if n > 0 {
                            w.flush().await?;
                            rest = &rest[n..];
                            continue;
                        }
                    }
                    let src = objects.clone();
                    let todo =
                        rest[..rest.len().min(if streaming { 1 } else { rest.len() })].to_vec();
                    let mut job =
                        tokio::task::spawn_blocking(move || read_group(&*src, &todo, budget));
                    // A relay may wait for the object to arrive from its upstream: it says so
                    // while it waits, so the successor does not take it for dead.
                    let (objs, taken) = if streaming {
                        let mut tick = tokio::time::interval(msg::WAITING_EVERY);
                        tick.tick().await; // the first tick is immediate
                        loop {
                            tokio::select! {
                                done = &mut job => break done?,
                                _ = tick.tick() => {
                                    write_msg_async(&mut w, &Msg::Waiting).await?;
                                    w.flush().await?;
                                }
                            }
                        }
                    } else {
                        job.await?
                    };
                    rest = &rest[taken..];
                    match objs {
                        Ok(objs) => {
                            for (d, raw, z) in objs {
                                write_blob(&mut w, d, raw, &z).await?;
                            }
                            if streaming {
                                w.flush().await?;
                            }
                        }
                        Err(e) => {
                            write_msg_async(
                                &mut w,
                                &Msg::Error {
                                    kind: ErrorKind::NotFound,
                                    message: format!("{e:#}"),
                                },
                            )
                            .await?;
                            w.flush().await?;
                            bail!("{e:#}");
                        }
                    }
                }
                Ok(())
            }
            Msg::Report {
                node,
                state,
                detail,
            } => {
                // Cleaned first: neither the refusal nor the report may forge log lines.
                let node = clean_report_text(&node, MAX_REPORT_NAME);
                let state = clean_report_text(&state, MAX_REPORT_NAME);
                let detail = clean_report_text(&detail, MAX_REPORT_DETAIL);
                let n = node.clone();
                if let Err(e) =
                    allowed(&gate, &caller, "report", move |g, c| g.may_report(c, &n)).await
                {
                    return refuse(&mut w, e).await;
                }
                tracing::info!(%peer, %node, %state, %detail, "node report");
                if let Some(h) = &report {
                    if let Err(e) = h(&node, &state, &detail) {
                        tracing::error!(%node, %state, error = format!("{e:#}"), "report not stored");
                        let m = Msg::Error {
                            kind: ErrorKind::Internal,
                            message: format!("report not stored: {e:#}"),
                        };
                        write_msg_async(&mut w, &m).await?;
                        w.flush().await?;
                        bail!("report from {node} not stored: {e:#}");
                    }
                }
                write_msg_async(&mut w, &Msg::Ok).await.map_err(Into::into)
            }
            Msg::McastJoin { image, version } => {
                let img = image.clone();
                if let Err(e) = allowed(&gate, &caller, "multicast", move |g, c| {
                    g.may_read_image(c, &img)?;
                    g.may_fetch_objects(c)
                })
                .await
                {
                    return refuse(&mut w, e).await;
                }
                let reply = match &multicast {
                    None => Msg::Error {
                        kind: ErrorKind::NotFound,
                        message: "this server offers no multicast".into(),
                    },
                    Some(mc) => match mc.join(&image, version) {
                        Ok(m) => m,
                        Err(e) => Msg::Error {
                            kind: ErrorKind::NotFound,
                            message: format!("{e:#}"),
                        },
                    },
                };
                tracing::info!(%peer, image, joined = matches!(reply, Msg::McastSession { .. }), "multicast join");
                write_msg_async(&mut w, &reply).await.map_err(Into::into)
            }
            Msg::McastReady { session } => {
                if let Err(e) =
                    allowed(&gate, &caller, "multicast", |g, c| g.may_fetch_objects(c)).await
                {
                    return refuse(&mut w, e).await;
                }
                let reply = match multicast.as_ref().map(|mc| mc.ready(session)) {
                    Some(Ok(())) => Msg::Ok,
                    Some(Err(e)) => Msg::Error {
                        kind: ErrorKind::NotFound,
                        message: format!("{e:#}"),
                    },
                    None => Msg::Error {
                        kind: ErrorKind::NotFound,
                        message: "this server offers no multicast".into(),
                    },
                };
                write_msg_async(&mut w, &reply).await.map_err(Into::into)
            }
            Msg::GetPlan { node } => {
                let n = node.clone();
                if let Err(e) =
                    allowed(&gate, &caller, "plan", move |g, c| g.may_read_plan(c, &n)).await
                {
                    return refuse(&mut w, e).await;
                }
                let answer = match &plans {
                    Some(h) => {
                        let h = h.clone();
                        let n = node.clone();
                        tokio::task::spawn_blocking(move || h(&n)).await?
                    }
                    None => Ok(None),
                };
                let m = match answer {
                    Ok(Some(plan)) => Msg::Plan(plan),
                    Ok(None) => Msg::Error {
                        kind: ErrorKind::NotFound,
                        message: format!("no install plan for {node}"),
                    },
                    Err(e) => {
                        tracing::error!(%node, error = format!("{e:#}"), "assembling an install plan");
                        Msg::Error {
                            kind: ErrorKind::Internal,
                            message: format!("assembling the install plan of {node}: {e:#}"),
                        }
                    }
                };
                tracing::info!(%peer, %node, found = matches!(m, Msg::Plan(_)), "install plan asked");
                write_msg_async(&mut w, &m).await.map_err(Into::into)
            }
            Msg::Enroll {
                node,
                token,
                mac,
                uuid,
                public_key,
            } => {
                let req = EnrollRequest {
                    node,
                    token,
                    mac,
                    uuid,
                    public_key,
                };
                let (g, c) = (gate.clone(), caller.clone());
                let got = tokio::task::spawn_blocking(move || g.enroll(&c, &req)).await?;
                match got {
                    Ok(chain) => write_msg_async(&mut w, &Msg::Enrolled { chain })
                        .await
                        .map_err(Into::into),
                    Err(e) => return refuse(&mut w, e).await,
                }
            }
            other => {
                write_msg_async(
                    &mut w,
                    &Msg::Error {
                        kind: ErrorKind::BadRequest,
                        message: format!("unexpected {:?}", std::mem::discriminant(&other)),
                    },
                )
                .await?;
                w.flush().await?;
                bail!("unexpected message");
            }
        };
        res?;
        w.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use si_proto::manifest::{Entry, Kind, Manifest};

    fn test_signer() -> Signer {
        Arc::new(|_: &str, _: u32, d: &si_proto::Digest| Ok(d.0.to_vec()))
    }

    /// A report's text cannot forge log lines or fill the disk: control characters come out
    /// escaped, the length is bounded with a marker, and the hook stores what was logged.
    #[tokio::test]
    async fn report_text_is_escaped_and_bounded() {
        assert_eq!(
            clean_report_text("ok\nFAKE level=ERROR\x1b[31m\\n", 100),
            "ok\\nFAKE level=ERROR\\u{1b}[31m\\\\n"
        );
        let long = "é".repeat(10_000);
        let c = clean_report_text(&long, MAX_REPORT_DETAIL);
        assert!(c.len() <= MAX_REPORT_DETAIL + 32, "{}", c.len());
        assert!(c.ends_with("bytes cut]"), "{}", &c[c.len() - 40..]);

        // Through the service: a real report, as a node sends it.
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let hook: ReportHook = {
            let got = got.clone();
            Arc::new(move |n: &str, s: &str, d: &str| {
                got.lock()
                    .unwrap()
                    .push((n.to_string(), s.to_string(), d.to_string()));
                Ok(())
            })
        };
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(run(
            l,
            store,
            ServeConfig::new(si_trust::Acceptor::Insecure),
            Some(hook),
            std::future::pending(),
        ));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let creds = handshake::Credentials {
            client: "n1".into(),
            token: String::new(),
        };
        handshake::connect_async(&mut c, Role::Deploy, &creds)
            .await
            .unwrap();
        let detail = format!(
            "done\n2026-01-01T00:00:00Z ERROR forged{}",
            "x".repeat(3 << 20)
        );
        write_msg_async(
            &mut c,
            &Msg::Report {
                node: "n1\nroot".into(),
                state: "installed".into(),
                detail,
            },
        )
        .await
        .unwrap();
        c.flush().await.unwrap();
        let reply = si_proto::frame::recv_msg_async(&mut c).await.unwrap();
        assert!(matches!(reply, Msg::Ok), "{reply:?}");
        let got = got.lock().unwrap();
        let (n, s, d) = &got[0];
        assert_eq!(n, "n1\\nroot");
        assert_eq!(s, "installed");
        assert!(
            !d.contains('\n') && d.len() <= MAX_REPORT_DETAIL + 32,
            "{}",
            d.len()
        );
        assert!(d.starts_with("done\\n2026"), "{d:.40}");
    }

    /// A peer that stops taking bytes is dropped after `write_stall`, not held for ever; a peer
    /// that reads gets everything.
    #[tokio::test]
    async fn a_stalled_reader_times_out_its_writes() {
        let (ours, theirs) = tokio::io::duplex(4096);
        let mut w = Stalling::new(ours, Duration::from_millis(300));
        let start = std::time::Instant::now();
        let e = w.write_all(&vec![1u8; 1 << 20]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
        let (ours, theirs2) = tokio::io::duplex(4096);
        let mut w = Stalling::new(ours, Duration::from_millis(300));
        let reader = tokio::spawn(async move {
            let mut theirs2 = theirs2;
            let mut v = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut theirs2, &mut v)
                .await
                .unwrap();
            v.len()
        });
        w.write_all(&vec![1u8; 1 << 20]).await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        assert_eq!(reader.await.unwrap(), 1 << 20);
        drop(theirs);
    }

    /// The bound holds whatever a Want asks for: a group stops once its bytes reach the
    /// budget, and the groups together cover the request in order.
    #[test]
    fn object_groups_are_bounded_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.pack_writer().unwrap();
        let mut want = Vec::new();
        let mut x = 7u64;
        for i in 0..40u32 {
            // 100 KiB of noise each: zstd cannot shrink it much.
            let data: Vec<u8> = (0..100 << 10)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8 ^ i as u8
                })
                .collect();
            want.push(w.add_raw(&data).unwrap());
        }
        w.finish().unwrap();
        let budget = 256 << 10;
        let mut rest = &want[..];
        let mut sent = Vec::new();
        while !rest.is_empty() {
            let (objs, taken) = read_group(&store, rest, budget);
            let objs = objs.unwrap();
            let held: usize = objs.iter().map(|o| o.2.len()).sum();
            let largest = objs.iter().map(|o| o.2.len()).max().unwrap();
            assert!(held < budget + largest, "{held} bytes held");
            assert_eq!(objs.len(), taken);
            sent.extend(objs.into_iter().map(|o| o.0));
            rest = &rest[taken..];
        }
        assert_eq!(sent, want);
    }

    /// A node's `GetManifestDelta{base_image}` names a base the service looks up in the store:
    /// a name that climbs out of `images/` finds nothing there, even when a version waits at the
    /// place it points to, and the node gets the whole manifest.
    #[test]
    fn delta_base_name_cannot_leave_the_store() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("store")).unwrap();
        let m = Manifest {
            entries: vec![Entry {
                path: vec![],
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                xattrs: vec![],
            }],
        };
        store
            .record_version("img", &m, Default::default(), None)
            .unwrap();
        let planted = t.path().join("planted/1");
        std::fs::create_dir_all(&planted).unwrap();
        std::fs::copy(
            store.manifest_path("img", 1).unwrap(),
            planted.join("manifest"),
        )
        .unwrap();
        let cache = ManifestCache::default();
        // The control: a real base gets a delta.
        let (head, _) = manifest_reply(
            &store,
            &cache,
            Some(&test_signer()),
            "img",
            None,
            Some(("img".into(), 1)),
        )
        .unwrap();
        assert!(matches!(head, Msg::ManifestDeltaIs { .. }), "{head:?}");
        let abs = t.path().join("planted").to_str().unwrap().to_string();
        for bad in ["../../planted".to_string(), abs, "a/b".into(), "".into()] {
            let (head, data) = manifest_reply(
                &store,
                &cache,
                Some(&test_signer()),
                "img",
                None,
                Some((bad.clone(), 1)),
            )
            .unwrap();
            assert!(matches!(head, Msg::ManifestIs { .. }), "{bad:?}: {head:?}");
            assert_eq!(*data, store.manifest_bytes("img", 1).unwrap());
        }
        // The image asked for is checked the same way.
        assert!(manifest_reply(&store, &cache, None, "../../planted", Some(1), None).is_err());
    }
}
