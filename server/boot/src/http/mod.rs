//! Read-only HTTP/1.1 server for kernels, initrds and iPXE scripts.
//!
//! `GET` and `HEAD` only. Files come from [`Generated`] first (per-node boot scripts), then
//! from beneath the root (same rules as TFTP, see [`crate::tftp::root`]). Single byte ranges
//! (`Range: bytes=a-b`, `a-`, `-n`) are answered with 206. Connections are capped, in all and
//! per source address; each has one deadline for its request header and for taking its answer
//! (see [`HttpConfig`]). Only world-readable files are served (see [`crate::tftp::root`]).

use crate::bootcfg::{Found, Generated};
use crate::tftp::root::{self, PathError};
use anyhow::{Context, Result};
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
pub use hyper::{Method, StatusCode};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Settings of an HTTP server.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Directory served; canonicalised by [`serve`].
    pub root: PathBuf,
    /// Most connections at once; more are closed on accept.
    pub max_connections: usize,
    /// Connections one source address may hold at once; more are closed on accept.
    pub per_source: usize,
    /// A request's whole header must arrive within this (slowloris), and a connection with no
    /// new request for this long after its last answer is closed.
    pub header_deadline: Duration,
    /// Slowest reader kept: an answer of `n` bytes must be taken within
    /// `header_deadline + n / min_rate` seconds, or the connection is closed.
    pub min_rate: u64,
    /// Dynamic routes answered before the file rules (see [`Route`]).
    pub routes: Routes,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            root: PathBuf::from("/srv/si/http"),
            max_connections: 512,
            per_source: 16,
            header_deadline: Duration::from_secs(10),
            min_rate: 64 << 10,
            routes: Routes::default(),
        }
    }
}

const CHUNK: usize = 64 << 10;
/// Most bytes of request head buffered per connection (hyper refuses a longer head).
const MAX_HEADER_BUF: usize = 16 << 10;

/// A dynamic part of the HTTP space: requests for `/<prefix>/...` (GET, HEAD or POST; a body
/// is not read) are answered by the route instead of the file rules. The route decides who
/// may ask: it is handed the peer's address. [`Route::answer`] may block (it runs on tokio's
/// blocking pool).
pub trait Route: Send + Sync + std::fmt::Debug + 'static {
    /// The first path segment the route owns (`autoinstall`).
    fn prefix(&self) -> &str;
    /// Answers `rest`, the raw (not percent-decoded) path after `/<prefix>/`.
    fn answer(&self, peer: std::net::IpAddr, method: &Method, rest: &str) -> RouteReply;
}

/// What a [`Route`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteReply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl RouteReply {
    /// A plain-text answer.
    pub fn text(status: StatusCode, body: impl Into<String>) -> RouteReply {
        RouteReply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
        }
    }
}

/// The routes of a server.
#[derive(Debug, Clone, Default)]
pub struct Routes(pub Vec<Arc<dyn Route>>);

async fn route(
    state: &State,
    peer: std::net::IpAddr,
    req: &Request<Incoming>,
) -> Option<Response<FileBody>> {
    let path = req.uri().path().strip_prefix('/')?;
    let (first, rest) = path.split_once('/').unwrap_or((path, ""));
    let r = state.routes.0.iter().find(|r| r.prefix() == first)?.clone();
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD && method != Method::POST {
        let mut r = status(StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD or POST\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
        return Some(r);
    }
    let rest = rest.to_string();
    let peer = peer.to_canonical();
    let m = method.clone();
    let reply = match tokio::task::spawn_blocking(move || r.answer(peer, &m, &rest)).await {
        Ok(reply) => reply,
        Err(e) => {
            tracing::error!(error = %e, "an HTTP route failed");
            RouteReply::text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
        }
    };
    let len = reply.body.len();
    let mut resp = Response::new(FileBody::Full(
        (method != Method::HEAD).then(|| Bytes::from(reply.body)),
    ));
    *resp.status_mut() = reply.status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(reply.content_type),
    );
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Some(resp)
}

/// A response body: a small buffer or a stretch of an open file.
pub enum FileBody {
    Full(Option<Bytes>),
    File {
        file: tokio::fs::File,
        remaining: u64,
        buf: Vec<u8>,
    },
}

impl FileBody {
    fn text(s: &str) -> FileBody {
        FileBody::Full(Some(Bytes::copy_from_slice(s.as_bytes())))
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            FileBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            FileBody::File {
                file,
                remaining,
                buf,
            } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let n = (*remaining).min(CHUNK as u64) as usize;
                buf.resize(n, 0);
                let mut rb = ReadBuf::new(&mut buf[..n]);
                match Pin::new(file).poll_read(cx, &mut rb) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(Ok(())) => {
                        let got = rb.filled().len();
                        if got == 0 {
                            return Poll::Ready(Some(
                                Err(std::io::ErrorKind::UnexpectedEof.into()),
                            ));
                        }
                        *remaining -= got as u64;
                        Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(&buf[..got])))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            FileBody::Full(b) => b.is_none(),
            FileBody::File { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            FileBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            FileBody::File { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}

/// Decodes `%XX` escapes; `None` if malformed or not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses a single `bytes=` range against a length; `Err(())` means unsatisfiable.
#[allow(clippy::result_unit_err)]
pub fn parse_range(h: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = h.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // multiple ranges: answer with the whole file
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let r = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end: u64 = if b.is_empty() {
            u64::MAX
        } else {
            b.parse().ok()?
        };
        if start >= len || end < start {
            return Some(Err(()));
        }
        (start, end.min(len - 1))
    };
    Some(Ok(r))
}

fn status(code: StatusCode, msg: &str) -> Response<FileBody> {
    let mut r = Response::new(FileBody::text(msg));
    *r.status_mut() = code;
    r
}

fn content_type(path: &str) -> &'static str {
    if path.ends_with(".ipxe") || path.ends_with(".cfg") || path.contains("pxelinux.cfg/") {
        "text/plain; charset=utf-8"
    } else if path.ends_with(".efi") {
        // UEFI HTTP boot: firmware (edk2's HttpBootDxe) takes the image type from this header
        // first and only falls back to the URL's extension.
        "application/efi"
    } else {
        "application/octet-stream"
    }
}

async fn respond(
    state: &State,
    peer: std::net::SocketAddr,
    req: &Request<Incoming>,
) -> Response<FileBody> {
    if let Some(r) = route(state, peer.ip(), req).await {
        return r;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = status(StatusCode::METHOD_NOT_ALLOWED, "read-only server\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let Some(path) = percent_decode(req.uri().path()) else {
        return status(StatusCode::BAD_REQUEST, "bad path\n");
    };
    let rel = match root::normalize(&path) {
        Ok(r) => r,
        Err(PathError::Escape) => return status(StatusCode::FORBIDDEN, "forbidden\n"),
        Err(_) => return status(StatusCode::NOT_FOUND, "not found\n"),
    };
    let head = req.method() == Method::HEAD;
    let ctype = HeaderValue::from_static(content_type(&rel));
    let found = match state.generated.lookup(&state.root, &rel) {
        Ok(f) => f,
        Err(PathError::NotFound) => return status(StatusCode::NOT_FOUND, "not found\n"),
        Err(_) => return status(StatusCode::FORBIDDEN, "forbidden\n"),
    };
    let file_path = match found {
        Found::File(p) => p,
        Found::Generated(data) => {
            let len = data.len();
            let mut r = Response::new(FileBody::Full(
                (!head).then(|| Bytes::copy_from_slice(&data)),
            ));
            r.headers_mut().insert(header::CONTENT_TYPE, ctype);
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            return r;
        }
    };
    let opened = async {
        let f = tokio::fs::File::open(&file_path).await?;
        let len = f.metadata().await?.len();
        Ok::<_, std::io::Error>((f, len))
    };
    let (mut file, len) = match opened.await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(path = %file_path.display(), error = %e, "opening file for HTTP");
            return status(StatusCode::FORBIDDEN, "cannot open\n");
        }
    };
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| parse_range(h, len));
    let (code, start, count) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Err(())) => {
            let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE, "");
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
        Some(Ok((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
    };
    if start > 0 {
        if let Err(e) = file.seek(std::io::SeekFrom::Start(start)).await {
            tracing::warn!(path = %file_path.display(), error = %e, "seeking for HTTP range");
            return status(StatusCode::INTERNAL_SERVER_ERROR, "seek failed\n");
        }
    }
    let body = if head {
        FileBody::Full(None)
    } else {
        FileBody::File {
            file,
            remaining: count,
            buf: Vec::new(),
        }
    };
    let mut r = Response::new(body);
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, ctype);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if code == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
        {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    r
}

struct State {
    root: PathBuf,
    generated: Generated,
    routes: Routes,
}

/// Runs the server on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    mut cfg: HttpConfig,
    generated: Generated,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    cfg.root = std::fs::canonicalize(&cfg.root)
        .with_context(|| format!("opening HTTP root {}", cfg.root.display()))?;
    let local = listener
        .local_addr()
        .context("reading HTTP socket address")?;
    tracing::info!(%local, root = %cfg.root.display(), "HTTP server listening");
    let state = Arc::new(State {
        root: cfg.root.clone(),
        generated,
        routes: cfg.routes,
    });
    let permits = Arc::new(Semaphore::new(cfg.max_connections));
    let sources = si_proto::persource::PerSource::new(cfg.per_source);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting HTTP connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = sources.try_take(peer.ip()) else {
            tracing::warn!(%peer, cap = sources.max(), "HTTP source holds its cap of connections, closing");
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many HTTP connections, closing");
            continue;
        };
        let state = state.clone();
        let (header_deadline, min_rate) = (cfg.header_deadline, cfg.min_rate.max(1));
        tokio::spawn(async move {
            let _held = (permit, slot);
            serve_connection(TokioIo::new(stream), peer, state, header_deadline, min_rate).await;
        });
    }
}

/// Serves one connection until it closes or passes its deadline.
async fn serve_connection<I>(
    io: I,
    peer: std::net::SocketAddr,
    state: Arc<State>,
    header_deadline: Duration,
    min_rate: u64,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    // One deadline for the connection, moved on by each request: its header must be
    // whole within `header_deadline` of the last answer's allowance, and an answer of
    // n bytes is allowed n / min_rate more. Past it the connection is dropped, however
    // slowly its client reads or writes.
    let deadline = Arc::new(std::sync::Mutex::new(
        tokio::time::Instant::now() + header_deadline,
    ));
    let d = deadline.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        let d = d.clone();
        async move {
            let r = respond(&state, peer, &req).await;
            let bytes = r.body().size_hint().exact().unwrap_or(0);
            let allow = header_deadline + Duration::from_secs(bytes / min_rate);
            *d.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now() + allow;
            tracing::info!(%peer, method = %req.method(), path = req.uri().path(), status = r.status().as_u16(), "HTTP");
            Ok::<_, Infallible>(r)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_deadline)
        .half_close(true)
        .max_buf_size(MAX_HEADER_BUF)
        .serve_connection(io, svc);
    let watchdog = async {
        loop {
            let at = *deadline.lock().unwrap_or_else(|p| p.into_inner());
            if tokio::time::Instant::now() >= at {
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    };
    tokio::select! {
        r = conn => if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "HTTP connection ended with error");
        },
        () = watchdog => tracing::info!(%peer, "HTTP connection past its deadline, closed"),
    }
}

/// Feeds `request` (the bytes a client sends on one connection, then its end) to the server
/// and returns what it answers: the fuzz target's way in, through the same code as a socket.
pub fn answer_bytes(root: &std::path::Path, generated: Generated, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return Vec::new(),
    };
    let state = Arc::new(State {
        root: root.to_path_buf(),
        generated,
        routes: Routes::default(),
    });
    let (client, server) = tokio::io::duplex(1 << 20);
    rt.block_on(async {
        let conn = serve_connection(
            TokioIo::new(server),
            ([127, 0, 0, 1], 0).into(),
            state,
            Duration::from_secs(10),
            64 << 10,
        );
        let talk = async {
            let (mut r, mut w) = tokio::io::split(client);
            let _ = w.write_all(request).await;
            let _ = w.shutdown().await;
            let mut out = Vec::new();
            let _ = r.read_to_end(&mut out).await;
            out
        };
        let ((), out) = tokio::join!(conn, talk);
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=50-1000", 100), Some(Ok((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=5-1", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,3-4", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }

    async fn get(addr: std::net::SocketAddr, req: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_over_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("k"), b"0123456789").unwrap();
        std::fs::write(dir.path().join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink("../secret", root.join("out")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gen = Generated::new([("boot/x.ipxe".to_string(), "#!ipxe\n".to_string())].into());
        let cfg = HttpConfig {
            root,
            ..HttpConfig::default()
        };
        tokio::spawn(serve(listener, cfg, gen, std::future::pending()));
        let close = "Connection: close\r\n\r\n";
        let r = get(addr, &format!("GET /k HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\n0123456789"),
            "{r}"
        );
        let r = get(
            addr,
            &format!("GET /k HTTP/1.1\r\nRange: bytes=-3\r\n{close}"),
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 206")
                && r.contains("content-range: bytes 7-9/10")
                && r.ends_with("789"),
            "{r}"
        );
        let r = get(
            addr,
            &format!("GET /k HTTP/1.1\r\nRange: bytes=10-\r\n{close}"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 416"), "{r}");
        let r = get(addr, &format!("HEAD /boot/x.ipxe HTTP/1.1\r\n{close}")).await;
        assert!(
            r.starts_with("HTTP/1.1 200")
                && r.contains("content-length: 7")
                && !r.contains("#!ipxe"),
            "{r}"
        );
        for bad in ["/../secret", "/%2e%2e/secret", "/out"] {
            let r = get(addr, &format!("GET {bad} HTTP/1.1\r\n{close}")).await;
            assert!(r.starts_with("HTTP/1.1 403"), "{bad}: {r}");
        }
        let r = get(
            addr,
            &format!("POST /k HTTP/1.1\r\nContent-Length: 0\r\n{close}"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    }

    /// HTTP and TFTP share one rule ([`Generated::lookup`]): the root's file first by default.
    #[tokio::test]
    async fn operator_script_wins_over_the_generated_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("boot.ipxe"), b"#!ipxe\necho site\n").unwrap();
        let gen = Generated::new(
            [
                ("boot.ipxe".to_string(), "#!ipxe\necho si\n".to_string()),
                (
                    "boot/default.ipxe".to_string(),
                    "#!ipxe\nexit\n".to_string(),
                ),
            ]
            .into(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = HttpConfig {
            root: dir.path().to_path_buf(),
            ..HttpConfig::default()
        };
        tokio::spawn(serve(listener, cfg, gen, std::future::pending()));
        let close = "Connection: close\r\n\r\n";
        let r = get(addr, &format!("GET /boot.ipxe HTTP/1.1\r\n{close}")).await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("echo site\n"),
            "{r}"
        );
        let r = get(addr, &format!("GET /boot/default.ipxe HTTP/1.1\r\n{close}")).await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("exit\n"),
            "{r}"
        );
    }

    async fn start(root: &std::path::Path, cfg: HttpConfig) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = HttpConfig {
            root: root.to_path_buf(),
            ..cfg
        };
        tokio::spawn(serve(
            listener,
            cfg,
            Generated::default(),
            std::future::pending(),
        ));
        addr
    }

    /// Reads until the server closes; the bytes and how long it took. Bounded by `limit`.
    async fn until_closed(
        c: &mut tokio::net::TcpStream,
        limit: Duration,
    ) -> Result<Vec<u8>, &'static str> {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        match tokio::time::timeout(limit, c.read_to_end(&mut out)).await {
            Ok(_) => Ok(out),
            Err(_) => Err("still open"),
        }
    }

    /// Slowloris: a header dribbled a byte at a time never completes, and the connection is
    /// closed at the header deadline (it was 30 s and renewed by each byte's arrival... hyper's
    /// timer is per header, so the bound is the deadline, whatever the pace).
    #[tokio::test]
    async fn a_dribbled_header_is_cut_at_its_deadline() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), b"kernel").unwrap();
        let cfg = HttpConfig {
            header_deadline: Duration::from_secs(1),
            ..HttpConfig::default()
        };
        let addr = start(dir.path(), cfg).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let start = std::time::Instant::now();
        let req = b"GET /k HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let mut cut = false;
        for b in req.iter() {
            if c.write_all(&[*b]).await.is_err() {
                cut = true;
                break;
            }
            // The pace of the attack: one byte every 100 ms (the whole header would take 8 s).
            let mut probe = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(100), c.peek(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    cut = true;
                    break;
                }
                Ok(Ok(_)) => panic!("the server answered a header that never ended"),
                Err(_) => {}
            }
        }
        let took = start.elapsed();
        assert!(cut, "the dribbled header was read to its end ({took:?})");
        assert!(took < Duration::from_secs(4), "cut after {took:?}");
        // An idle connection (nothing sent) is closed too.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        until_closed(&mut idle, Duration::from_secs(4))
            .await
            .unwrap();
    }

    /// A slow reader cannot hold a connection: an answer of n bytes must be taken within the
    /// header deadline plus n / min_rate.
    #[tokio::test]
    async fn a_slow_reader_is_cut_at_its_transfer_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let size = 64usize << 20;
        std::fs::write(dir.path().join("initrd"), vec![7u8; size]).unwrap();
        let cfg = HttpConfig {
            header_deadline: Duration::from_secs(1),
            min_rate: 32 << 20, // 64 MiB: 1 s + 2 s allowed
            ..HttpConfig::default()
        };
        let addr = start(dir.path(), cfg).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /initrd HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let start = std::time::Instant::now();
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        // 64 KiB every 20 ms: about 3 MiB/s, the whole file would take 20 s. What the kernel
        // buffered before the cut (a few MiB) still arrives, then the end.
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "not cut: {got} bytes read"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(got < size, "the slow reader got all {got} bytes");
        let took = start.elapsed();
        eprintln!("slow reader cut after {took:?}, {got} of {size} bytes");
        assert!(took < Duration::from_secs(8), "cut after {took:?}");
        // A reader at normal speed gets it all.
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /initrd HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let all = until_closed(&mut c, Duration::from_secs(3)).await.unwrap();
        assert!(
            all.len() > size && all.ends_with(&[7u8; 100]),
            "{}",
            all.len()
        );
    }

    /// One source cannot take every connection; another source is still served.
    #[tokio::test]
    async fn one_source_is_capped() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), b"kernel").unwrap();
        let cfg = HttpConfig {
            per_source: 2,
            ..HttpConfig::default()
        };
        let addr = start(dir.path(), cfg).await;
        let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = third
            .write_all(b"GET /k HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await;
        let r = until_closed(&mut third, Duration::from_secs(3))
            .await
            .unwrap();
        assert!(r.is_empty(), "{}", String::from_utf8_lossy(&r));
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(([127, 0, 0, 2], 0).into()).unwrap();
        let mut other = sock.connect(addr).await.unwrap();
        other
            .write_all(b"GET /k HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let r = until_closed(&mut other, Duration::from_secs(3))
            .await
            .unwrap();
        let r = String::from_utf8_lossy(&r);
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("kernel"),
            "{r}"
        );
    }

    /// Boot files only: a file only root may read (as every file of the image store is) is
    /// never served, even from inside the served root, directly or through a symlink.
    #[tokio::test]
    async fn root_only_files_are_never_served() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let packs = dir.path().join("store/packs/4e");
        std::fs::create_dir_all(&packs).unwrap();
        std::fs::write(packs.join("4e67.pack"), b"root:$6$shadow").unwrap();
        std::fs::set_permissions(
            packs.join("4e67.pack"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("store/packs/4e/4e67.pack", dir.path().join("vmlinuz")).unwrap();
        std::fs::write(dir.path().join("k"), b"kernel").unwrap();
        let addr = start(dir.path(), HttpConfig::default()).await;
        let close = "Connection: close\r\n\r\n";
        for p in ["/store/packs/4e/4e67.pack", "/vmlinuz"] {
            let r = get(addr, &format!("GET {p} HTTP/1.1\r\n{close}")).await;
            assert!(
                r.starts_with("HTTP/1.1 403") && !r.contains("shadow"),
                "{p}: {r}"
            );
        }
        let r = get(addr, &format!("GET /k HTTP/1.1\r\n{close}")).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }

    /// The fuzz target's entry answers like the socket server does.
    #[test]
    fn answer_bytes_serves_like_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), b"kernel").unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let out = answer_bytes(
            &root,
            Generated::default(),
            b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("kernel"),
            "{out}"
        );
        let out = answer_bytes(
            &root,
            Generated::default(),
            b"GET /../etc/passwd HTTP/1.1\r\n\r\n",
        );
        assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 403"));
        assert!(answer_bytes(&root, Generated::default(), b"\x00\xff garbage").len() < 200);
    }

    #[test]
    fn content_types() {
        assert_eq!(content_type("boot/ipxe.efi"), "application/efi");
        assert_eq!(
            content_type("boot/52-54-00-00-00-01.ipxe"),
            "text/plain; charset=utf-8"
        );
        assert_eq!(content_type("vmlinuz"), "application/octet-stream");
    }

    #[test]
    fn decodes() {
        assert_eq!(percent_decode("/a%20b").as_deref(), Some("/a b"));
        assert_eq!(percent_decode("/a%2").as_deref(), None);
        assert_eq!(percent_decode("/%2e%2e/x").as_deref(), Some("/../x"));
    }
}
