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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub max_connections: usize,
    /// Connections one source address may hold at once; the one past it gets `Error{Busy}`.
    pub per_source: usize,
    /// A message, once its first byte has arrived, must be whole within this.
    pub message_deadline: Duration,
    /// A connection with no request for this long (after its Hello, between requests) is closed.
    pub idle_timeout: Duration,
    /// A peer that takes none of the bytes it asked for in this long is dropped (slow reader).
    pub write_stall: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_connections: 512,
            per_source: 16,
            message_deadline: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            write_stall: Duration::from_secs(60),
        }
    }
}

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
    let sem = Arc::new(Semaphore::new(cfg.max_connections));
    let sources = PerSource::new(cfg.per_source);
    let cache = Arc::new(ManifestCache::default());
    let objects: Arc<dyn ObjectFinder> = store.clone();
    // The delta to each image's newest version is ready before the first node asks.
    // Dropping the set (when this returns) stops the warmer.
    let mut background = tokio::task::JoinSet::new();
    {
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
            r = listener.accept() => r.context("accepting a connection")?,
            _ = &mut shutdown => return Ok(()),
        };
        let store = store.clone();
        let objects = objects.clone();
        let cache = cache.clone();
        let report = report.clone();
        let cfg = cfg.clone();
        let slot = sources.try_take(peer.ip());
        if slot.is_none() {
            tracing::warn!(%peer, cap = sources.max(), "source holds its cap of connections");
        }
        match (slot, sem.clone().try_acquire_owned()) {
            (Some(slot), Ok(permit)) => {
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = handle(sock, peer, store, objects, cache, report, &cfg).await {
                        tracing::warn!(%peer, error = format!("{e:#}"), "session failed");
                    }
                    drop(permit);
                });
            }
            _ => {
                tokio::spawn(async move {
                    let mut sock = Stalling::new(sock, Duration::from_secs(5));
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
    image: &str,
    version: Option<u32>,
    base: Option<(String, u32)>,
) -> Result<(Msg, Arc<Vec<u8>>)> {
    let v = store.resolve(image, version)?;
    let target = cache.stored(store, image, v)?;
    let info = info(store, image, v)?;
    let (digest, len) = (target.digest, target.len);
    if let Some(Ok(base)) = base.map(|(bi, bv)| cache.stored(store, &bi, bv)) {
        let delta = cache.delta(&base, &target)?;
        let head = Msg::ManifestDeltaIs {
            info,
            digest,
            bytes: len,
            delta_bytes: delta.len() as u64,
        };
        return Ok((head, delta));
    }
    Ok((
        Msg::ManifestIs {
            info,
            digest,
            bytes: len,
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

async fn handle(
    sock: TcpStream,
    peer: SocketAddr,
    store: Arc<Store>,
    objects: Arc<dyn ObjectFinder>,
    cache: Arc<ManifestCache>,
    report: Option<ReportHook>,
    cfg: &ServeConfig,
) -> Result<()> {
    sock.set_nodelay(true).ok();
    let mut sock = Stalling::new(sock, cfg.write_stall);
    let policy = Policy {
        roles: vec![Role::Deploy],
        token: None,
        server: si_tree::fsutil::hostname(),
    };
    let peer_hello = tokio::time::timeout(
        cfg.message_deadline,
        handshake::accept_async(&mut sock, &policy),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no hello within {:?}", cfg.message_deadline))?
    .context("handshake")?;
    tracing::debug!(%peer, client = %peer_hello.client, version = peer_hello.version, "session open");
    let (r, w) = tokio::io::split(sock);
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
    let mut w = BufWriter::with_capacity(1 << 20, w);
    loop {
        // Idle between requests: wait for the first byte of the next one.
        match tokio::time::timeout(cfg.idle_timeout, r.fill_buf()).await {
            Err(_) => {
                tracing::debug!(%peer, idle = ?cfg.idle_timeout, "closing an idle connection");
                return Ok(());
            }
            Ok(got) => {
                if got.context("reading a request")?.is_empty() {
                    return Ok(());
                }
            }
        }
        let Some(frame) = tokio::time::timeout(cfg.message_deadline, read_frame_async(&mut r))
            .await
            .map_err(|_| anyhow::anyhow!("no whole message within {:?}", cfg.message_deadline))??
        else {
            return Ok(());
        };
        let Frame::Msg(m) = frame else {
            bail!("unexpected data frame")
        };
        let res: Result<()> = match m {
            Msg::Bye => return Ok(()),
            Msg::ListImages => {
                let st = store.clone();
                let list = tokio::task::spawn_blocking(move || -> Result<Vec<ImageVersionInfo>> {
                    let mut out = Vec::new();
                    for n in st.images()? {
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
                let (st, c) = (store.clone(), cache.clone());
                let got = tokio::task::spawn_blocking(move || {
                    manifest_reply(&st, &c, &image, version, base)
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
                let mut rest = &ds[..];
                while !rest.is_empty() {
                    let src = objects.clone();
                    let todo = rest.to_vec();
                    let (objs, taken) =
                        tokio::task::spawn_blocking(move || read_group(&*src, &todo, GROUP_BYTES))
                            .await?;
                    rest = &rest[taken..];
                    match objs {
                        Ok(objs) => {
                            for (d, raw, z) in objs {
                                write_msg_async(
                                    &mut w,
                                    &Msg::Blob {
                                        digest: d,
                                        raw_len: raw,
                                    },
                                )
                                .await?;
                                write_data_async(&mut w, &z).await?;
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
                let node = clean_report_text(&node, MAX_REPORT_NAME);
                let state = clean_report_text(&state, MAX_REPORT_NAME);
                let detail = clean_report_text(&detail, MAX_REPORT_DETAIL);
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
            ServeConfig::default(),
            Some(hook),
            std::future::pending(),
        ));
        let mut c = TcpStream::connect(addr).await.unwrap();
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
        let (head, _) =
            manifest_reply(&store, &cache, "img", None, Some(("img".into(), 1))).unwrap();
        assert!(matches!(head, Msg::ManifestDeltaIs { .. }), "{head:?}");
        let abs = t.path().join("planted").to_str().unwrap().to_string();
        for bad in ["../../planted".to_string(), abs, "a/b".into(), "".into()] {
            let (head, data) =
                manifest_reply(&store, &cache, "img", None, Some((bad.clone(), 1))).unwrap();
            assert!(matches!(head, Msg::ManifestIs { .. }), "{bad:?}: {head:?}");
            assert_eq!(*data, store.manifest_bytes("img", 1).unwrap());
        }
        // The image asked for is checked the same way.
        assert!(manifest_reply(&store, &cache, "../../planted", Some(1), None).is_err());
    }
}
