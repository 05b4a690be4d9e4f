//! One read transfer: option negotiation, then windows of DATA blocks until the last is acked.
//!
//! A transfer runs on a blocking thread with plain sockets: lock-step TFTP is bound by the
//! round trip per window, and a blocking `recv` costs less per block than an async wake-up.

use super::packet::{self, ErrorCode, Mode, Packet, Request};
use super::root::{self, PathError};
use super::TftpConfig;
use crate::bootcfg::{Found, Generated};
use anyhow::{bail, Context, Result};
use std::net::UdpSocket;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

/// Bytes read from a file at once (at least one window).
const READ_CHUNK: usize = 256 << 10;
/// Most bytes in one window (windowsize × blksize), which bounds memory per transfer.
const MAX_WINDOW_BYTES: usize = 1 << 20;

/// Where the bytes of a transfer come from.
enum Source {
    Memory(Arc<[u8]>),
    File {
        file: std::fs::File,
        size: u64,
        buf: Vec<u8>,
        buf_off: u64,
    },
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Memory(m) => m.len() as u64,
            Source::File { size, .. } => *size,
        }
    }

    /// Appends the bytes `[off, off+len)` (clipped to the size) to `out`.
    fn read_into(&mut self, off: u64, len: usize, ahead: usize, out: &mut Vec<u8>) -> Result<()> {
        match self {
            Source::Memory(m) => {
                let start = off.min(m.len() as u64) as usize;
                let end = start.saturating_add(len).min(m.len());
                out.extend_from_slice(&m[start..end]);
            }
            Source::File {
                file,
                size,
                buf,
                buf_off,
            } => {
                let want_end = off.saturating_add(len as u64).min(*size);
                let have_end = *buf_off + buf.len() as u64;
                if off < *buf_off || want_end > have_end {
                    let n = (*size - off.min(*size)).min(ahead.max(len) as u64) as usize;
                    buf.clear();
                    buf.resize(n, 0);
                    let mut got = 0;
                    while got < n {
                        let r = file
                            .read_at(&mut buf[got..], off + got as u64)
                            .context("reading file")?;
                        if r == 0 {
                            break; // the file shrank: end the transfer early
                        }
                        got += r;
                    }
                    buf.truncate(got);
                    *buf_off = off;
                }
                let start = (off - *buf_off) as usize;
                let end = ((want_end - *buf_off) as usize).min(buf.len());
                if start < end {
                    out.extend_from_slice(&buf[start..end]);
                }
            }
        }
        Ok(())
    }
}

fn netascii(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 16);
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            b => out.push(b),
        }
    }
    out
}

fn open(
    cfg: &TftpConfig,
    generated: &Generated,
    req: &Request,
) -> Result<Source, (ErrorCode, String)> {
    let rel = root::normalize(&req.filename).map_err(path_error)?;
    let mut src = match generated.lookup(&cfg.root, &rel).map_err(path_error)? {
        Found::Generated(data) => Source::Memory(data),
        Found::File(path) => {
            let file = std::fs::File::open(&path)
                .map_err(|_| (ErrorCode::AccessViolation, "cannot open file".to_string()))?;
            let size = file
                .metadata()
                .map_err(|_| {
                    (
                        ErrorCode::AccessViolation,
                        "cannot read file size".to_string(),
                    )
                })?
                .len();
            Source::File {
                file,
                size,
                buf: Vec::new(),
                buf_off: 0,
            }
        }
    };
    if req.mode == Mode::Netascii {
        if src.size() > cfg.max_netascii {
            return Err((
                ErrorCode::NotDefined,
                "file too large for netascii, use octet".into(),
            ));
        }
        let mut all = Vec::new();
        src.read_into(0, src.size() as usize, 0, &mut all)
            .map_err(|_| (ErrorCode::AccessViolation, "cannot read file".to_string()))?;
        src = Source::Memory(netascii(&all).into());
    }
    Ok(src)
}

fn path_error(e: PathError) -> (ErrorCode, String) {
    let code = match e {
        PathError::NotFound => ErrorCode::FileNotFound,
        PathError::Escape | PathError::Invalid | PathError::NotAFile | PathError::NotPublic => {
            ErrorCode::AccessViolation
        }
    };
    (code, e.to_string())
}

/// Options granted to a transfer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub blksize: usize,
    pub windowsize: u64,
    pub timeout: Duration,
    /// Options for the OACK, empty if none was accepted (then no OACK is sent).
    pub reply: Vec<(String, String)>,
}

/// Applies the options of a request; unknown or invalid options are ignored (RFC 2347).
pub(crate) fn negotiate(cfg: &TftpConfig, options: &[(String, String)], size: u64) -> Negotiated {
    let mut n = Negotiated {
        blksize: 512,
        windowsize: 1,
        timeout: cfg.timeout,
        reply: Vec::new(),
    };
    for (k, v) in options {
        if n.reply.iter().any(|(r, _)| r == k) {
            continue;
        }
        let val: Option<u64> = v.trim().parse().ok();
        match (k.as_str(), val) {
            ("blksize", Some(b)) if (8..=65464).contains(&b) => {
                let b = b.min(u64::from(cfg.max_blksize)).max(8);
                n.blksize = b as usize;
                n.reply.push((k.clone(), b.to_string()));
            }
            ("tsize", Some(_)) => n.reply.push((k.clone(), size.to_string())),
            ("timeout", Some(t)) if (1..=cfg.max_timeout.as_secs().min(255)).contains(&t) => {
                n.timeout = Duration::from_secs(t);
                n.reply.push((k.clone(), t.to_string()));
            }
            ("windowsize", Some(w)) if (1..=65535).contains(&w) => {
                let w = w.min(u64::from(cfg.max_windowsize)).max(1);
                n.windowsize = w;
                n.reply.push((k.clone(), w.to_string()));
            }
            _ => {}
        }
    }
    // Bound the bytes in flight (and buffered) per transfer.
    let max_window = (MAX_WINDOW_BYTES / n.blksize).max(1) as u64;
    if n.windowsize > max_window {
        n.windowsize = max_window;
        for (k, v) in &mut n.reply {
            if k == "windowsize" {
                *v = max_window.to_string();
            }
        }
    }
    n
}

/// Maps a 16-bit block number to the absolute block in `lo..=hi` it names, if any.
pub(crate) fn ack_to_abs(block: u16, lo: u64, hi: u64) -> Option<u64> {
    let off = u64::from(block.wrapping_sub(lo as u16));
    let abs = lo + off;
    (abs <= hi).then_some(abs)
}

fn send_error(sock: &UdpSocket, code: ErrorCode, msg: &str) {
    let mut out = Vec::new();
    packet::error(&mut out, code, msg);
    // Best effort: the client may already be gone.
    if let Err(e) = sock.send(&out) {
        tracing::debug!(error = %e, "sending TFTP error");
    }
}

/// What the client said while we waited.
enum Reply {
    Ack(u64),
    Timeout,
    /// The client sent an ERROR: firmware does so after reading `tsize` from the OACK.
    Aborted(u16, String),
}

/// Waits until `deadline` for an ACK naming a block in `lo..=hi`; other packets are ignored.
fn wait_ack(
    sock: &UdpSocket,
    rbuf: &mut [u8],
    deadline: Instant,
    lo: u64,
    hi: u64,
) -> Result<Reply> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Reply::Timeout);
        }
        sock.set_read_timeout(Some(left))
            .context("setting the receive timeout")?;
        let n = match sock.recv(rbuf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Reply::Timeout)
            }
            // ICMP port unreachable from a client that went away.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Ok(Reply::Aborted(0, "client unreachable".into()))
            }
            Err(e) => return Err(e).context("receiving from client"),
        };
        match packet::parse(&rbuf[..n]) {
            Ok(Packet::Ack { block }) => {
                if let Some(abs) = ack_to_abs(block, lo, hi) {
                    return Ok(Reply::Ack(abs));
                }
            }
            Ok(Packet::Error { code, message }) => return Ok(Reply::Aborted(code, message)),
            Ok(_) | Err(_) => {
                tracing::trace!("ignoring unexpected packet during transfer");
            }
        }
    }
}

fn client_ended(code: u16, msg: &str) -> Result<()> {
    tracing::debug!(code, msg, "client ended the transfer");
    Ok(())
}

pub(crate) fn run(
    cfg: &TftpConfig,
    generated: &Generated,
    local: IpAddr,
    peer: SocketAddr,
    req: Request,
) -> Result<()> {
    let bind_ip = if local.is_unspecified() || local.is_ipv4() != peer.is_ipv4() {
        match peer {
            SocketAddr::V4(_) => IpAddr::from([0u8; 4]),
            SocketAddr::V6(_) => IpAddr::from([0u16; 8]),
        }
    } else {
        local
    };
    let sock = UdpSocket::bind((bind_ip, 0)).context("binding transfer socket")?;
    sock.connect(peer).context("connecting transfer socket")?;

    let mut src = match open(cfg, generated, &req) {
        Ok(s) => s,
        Err((code, msg)) => {
            send_error(&sock, code, &msg);
            bail!("refused: {msg}");
        }
    };
    let size = src.size();
    let neg = negotiate(cfg, &req.options, size);
    let lifetime = Duration::from_secs(30 + size / cfg.min_rate.max(1));
    let deadline = Instant::now() + lifetime;
    let blksize = neg.blksize;
    let mut rbuf = vec![0u8; 1024];
    let mut out = Vec::with_capacity(blksize + 4);

    if !neg.reply.is_empty() {
        packet::oack(&mut out, &neg.reply);
        let mut tries = 0;
        loop {
            sock.send(&out).context("sending OACK")?;
            match wait_ack(&sock, &mut rbuf, Instant::now() + neg.timeout, 0, 0)? {
                Reply::Ack(_) => break,
                Reply::Aborted(code, msg) => return client_ended(code, &msg),
                Reply::Timeout => {
                    tries += 1;
                    if tries > cfg.retries {
                        bail!("no ACK for OACK");
                    }
                }
            }
        }
    }

    let last = size / blksize as u64 + 1; // the last block is shorter than blksize
    let ahead = READ_CHUNK.max(blksize * neg.windowsize as usize);
    let mut base = 1u64;
    let mut retries = 0;
    loop {
        let end = (base + neg.windowsize - 1).min(last);
        for b in base..=end {
            packet::data_header(&mut out, b as u16);
            src.read_into((b - 1) * blksize as u64, blksize, ahead, &mut out)?;
            sock.send(&out).context("sending DATA")?;
        }
        match wait_ack(
            &sock,
            &mut rbuf,
            Instant::now() + neg.timeout,
            base - 1,
            end,
        )? {
            Reply::Ack(abs) if abs == last => return Ok(()),
            Reply::Ack(abs) if abs >= base => {
                base = abs + 1;
                retries = 0;
            }
            // A duplicate ACK of the previous window: resend only after a timeout
            // (avoids the Sorcerer's Apprentice syndrome).
            Reply::Ack(_) => {
                match wait_ack(&sock, &mut rbuf, Instant::now() + neg.timeout, base, end)? {
                    Reply::Ack(abs) if abs == last => return Ok(()),
                    Reply::Ack(abs) => {
                        base = abs + 1;
                        retries = 0;
                    }
                    Reply::Timeout => retries += 1,
                    Reply::Aborted(code, msg) => return client_ended(code, &msg),
                }
            }
            Reply::Timeout => retries += 1,
            Reply::Aborted(code, msg) => return client_ended(code, &msg),
        }
        if retries > cfg.retries {
            send_error(&sock, ErrorCode::NotDefined, "timed out");
            bail!("timed out waiting for ACK of block {base}");
        }
        if Instant::now() > deadline {
            send_error(&sock, ErrorCode::NotDefined, "transfer too slow");
            bail!("transfer of {size} bytes still running after {lifetime:?}");
        }
    }
}
