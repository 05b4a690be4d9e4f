//! Read-only HTTP/1.1 server for kernels, initrds and iPXE scripts.
//!
//! `GET` and `HEAD` only. Files come from [`Generated`] first (per-node boot scripts), then
//! from beneath the root (same rules as TFTP, see [`crate::tftp::root`]). Single byte ranges
//! (`Range: bytes=a-b`, `a-`, `-n`) are answered with 206. Connections are capped.

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
    /// Dynamic routes answered before the file rules (see [`Route`]).
    pub routes: Routes,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            root: PathBuf::from("/srv/si/http"),
            max_connections: 512,
            routes: Routes::default(),
        }
    }
}

const CHUNK: usize = 64 << 10;

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
        root: cfg.root,
        generated,
        routes: cfg.routes,
    });
    let permits = Arc::new(Semaphore::new(cfg.max_connections));
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many HTTP connections, closing");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let r = respond(&state, peer, &req).await;
                    tracing::info!(%peer, method = %req.method(), path = req.uri().path(), status = r.status().as_u16(), "HTTP");
                    Ok::<_, Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with error");
            }
        });
    }
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
