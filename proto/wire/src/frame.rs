//! Framing of the si protocol.
//!
//! Every frame is
//!
//! ```text
//! length: u32 LE (bytes after the 5-byte header) | kind: u8 | payload
//! ```
//!
//! `kind` 1 is a [`Msg`](crate::msg::Msg) encoded with bincode 2 (standard config, decode limit
//! [`MAX_FRAME`]); kind 2 is raw bulk data (compressed objects, manifest bytes) that never goes
//! through the serializer. The length is checked against [`MAX_FRAME`] *before* anything is
//! allocated. A clean end of stream between frames reads as `Ok(None)`; a stream that ends inside
//! a frame, an unknown kind, an oversized length or an undecodable message is an error, after
//! which the connection must be closed.
//!
//! A payload is read into a buffer that grows as bytes arrive (one [`READ_STEP`] of 64 KiB at
//! first, then by as much as has arrived): a peer that claims 8 MiB and sends 10 bytes makes
//! the reader hold 64 KiB, not 8 MiB, never more than twice what it sent plus one step, and the
//! buffer is dropped with the error when the connection fails or closes.

use crate::msg::Msg;
use std::io::{self, Read, Write};
use thiserror::Error;
#[cfg(feature = "async")]
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame payload accepted.
pub const MAX_FRAME: usize = 8 << 20;
pub const HEADER_LEN: usize = 5;
/// A frame's payload buffer grows by at most this much per step, so a peer that claims a
/// large frame and then stalls holds only what it has actually sent (plus one step).
pub const READ_STEP: usize = 64 << 10;
const KIND_MSG: u8 = 1;
const KIND_DATA: u8 = 2;

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("undecodable message: {0}")]
    Decode(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer answered with an error message.
    #[error("peer reported {kind:?}: {message}")]
    Peer {
        kind: crate::msg::ErrorKind,
        message: String,
    },
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug)]
pub enum Frame {
    Msg(Msg),
    Data(Vec<u8>),
}

fn cfg() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Encodes a message into one frame (header included); a message larger than [`MAX_FRAME`]
/// is an error (`InvalidInput`), never a frame the peer would refuse.
pub fn encode_msg(m: &Msg) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; HEADER_LEN];
    bincode::serde::encode_into_std_write(m, &mut out, bincode::config::standard())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let n = out.len() - HEADER_LEN;
    if n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} message of {n} bytes exceeds the {MAX_FRAME}-byte frame limit",
                m.name()
            ),
        ));
    }
    out[..4].copy_from_slice(&(n as u32).to_le_bytes());
    out[4] = KIND_MSG;
    Ok(out)
}

/// The header of a data frame of `len` bytes; more than [`MAX_FRAME`] is an error.
pub fn data_header(len: usize) -> io::Result<[u8; HEADER_LEN]> {
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("data frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4] = KIND_DATA;
    Ok(h)
}

/// Decodes a message payload. Never panics, whatever the bytes.
pub fn decode_msg(payload: &[u8]) -> Result<Msg, FrameError> {
    let (m, used): (Msg, usize) = bincode::serde::decode_from_slice(payload, cfg())
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::Decode(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(m)
}

fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(usize, u8), FrameError> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if h[4] != KIND_MSG && h[4] != KIND_DATA {
        return Err(FrameError::BadKind(h[4]));
    }
    Ok((len, h[4]))
}

fn finish(kind: u8, payload: Vec<u8>) -> Result<Frame, FrameError> {
    if kind == KIND_MSG {
        Ok(Frame::Msg(decode_msg(&payload)?))
    } else {
        Ok(Frame::Data(payload))
    }
}

/// Decodes one frame from the front of `buf`: `Ok(None)` if `buf` holds less than a whole
/// frame, else the frame and the number of bytes it used.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let (len, kind) = parse_header(buf[..HEADER_LEN].try_into().unwrap())?;
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let payload = buf[HEADER_LEN..HEADER_LEN + len].to_vec();
    Ok(Some((finish(kind, payload)?, HEADER_LEN + len)))
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a header.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (len, kind) = parse_header(&h)?;
    let mut payload = Vec::new();
    while payload.len() < len {
        let have = payload.len();
        // Grow by what has already arrived (at least one step): at most twice the bytes
        // received plus one step are held, and copying stays linear.
        let step = (len - have).min(have.max(READ_STEP));
        payload.reserve_exact(step);
        payload.resize(have + step, 0);
        let mut got = have;
        while got < have + step {
            match r.read(&mut payload[got..have + step]) {
                Ok(0) => return Err(FrameError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    finish(kind, payload).map(Some)
}

/// Async twin of [`read_frame`].
#[cfg(feature = "async")]
pub async fn read_frame_async<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Frame>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]).await {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (len, kind) = parse_header(&h)?;
    let mut payload = Vec::new();
    while payload.len() < len {
        let have = payload.len();
        // Grow by what has already arrived (at least one step): at most twice the bytes
        // received plus one step are held, and copying stays linear.
        let step = (len - have).min(have.max(READ_STEP));
        payload.reserve_exact(step);
        payload.resize(have + step, 0);
        let mut got = have;
        while got < have + step {
            match r.read(&mut payload[got..have + step]).await {
                Ok(0) => return Err(FrameError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    finish(kind, payload).map(Some)
}

pub fn write_msg<W: Write>(w: &mut W, m: &Msg) -> io::Result<()> {
    w.write_all(&encode_msg(m)?)
}

pub fn write_data<W: Write>(w: &mut W, data: &[u8]) -> io::Result<()> {
    w.write_all(&data_header(data.len())?)?;
    w.write_all(data)
}

/// Writes `data` as data frames of at most half a frame each (the receiver reads them back
/// with [`recv_bytes`], knowing the length from the message before them).
pub fn write_bytes<W: Write>(w: &mut W, data: &[u8]) -> io::Result<()> {
    for part in data.chunks(MAX_FRAME / 2) {
        write_data(w, part)?;
    }
    Ok(())
}

/// Reads data frames until exactly `n` bytes have arrived; `n` must be at most `limit` (checked
/// before anything is allocated), and frames may not overshoot it.
pub fn recv_bytes<R: Read>(r: &mut R, n: u64, limit: u64) -> Result<Vec<u8>, FrameError> {
    if n > limit {
        return Err(FrameError::Protocol(format!(
            "{n} bytes announced, at most {limit} accepted"
        )));
    }
    let mut data = Vec::with_capacity(n.min(64 << 20) as usize);
    while (data.len() as u64) < n {
        let part = recv_data(r)?;
        if (data.len() + part.len()) as u64 > n {
            return Err(FrameError::Protocol(format!(
                "more than the {n} bytes announced arrived"
            )));
        }
        data.extend_from_slice(&part);
    }
    Ok(data)
}

#[cfg(feature = "async")]
pub async fn write_msg_async<W: AsyncWrite + Unpin>(w: &mut W, m: &Msg) -> io::Result<()> {
    w.write_all(&encode_msg(m)?).await
}

#[cfg(feature = "async")]
pub async fn write_data_async<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> io::Result<()> {
    w.write_all(&data_header(data.len())?).await?;
    w.write_all(data).await
}

/// Reads a frame that must be a message.
pub fn recv_msg<R: Read>(r: &mut R) -> Result<Msg, FrameError> {
    match read_frame(r)? {
        Some(Frame::Msg(Msg::Error { kind, message })) => Err(FrameError::Peer { kind, message }),
        Some(Frame::Msg(m)) => Ok(m),
        Some(Frame::Data(_)) => Err(FrameError::Protocol("expected a message, got data".into())),
        None => Err(FrameError::Truncated),
    }
}

/// Reads a frame that must be data.
pub fn recv_data<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    match read_frame(r)? {
        Some(Frame::Data(d)) => Ok(d),
        Some(Frame::Msg(Msg::Error { kind, message })) => Err(FrameError::Peer { kind, message }),
        Some(Frame::Msg(_)) => Err(FrameError::Protocol("expected data, got a message".into())),
        None => Err(FrameError::Truncated),
    }
}

#[cfg(feature = "async")]
pub async fn recv_msg_async<R: AsyncRead + Unpin>(r: &mut R) -> Result<Msg, FrameError> {
    match read_frame_async(r).await? {
        Some(Frame::Msg(Msg::Error { kind, message })) => Err(FrameError::Peer { kind, message }),
        Some(Frame::Msg(m)) => Ok(m),
        Some(Frame::Data(_)) => Err(FrameError::Protocol("expected a message, got data".into())),
        None => Err(FrameError::Truncated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{ErrorKind, Msg};

    #[test]
    fn round_trip_and_clean_eof() {
        let mut buf = Vec::new();
        write_msg(&mut buf, &Msg::Bye).unwrap();
        write_data(&mut buf, b"bulk").unwrap();
        let mut r = &buf[..];
        assert!(matches!(
            read_frame(&mut r).unwrap(),
            Some(Frame::Msg(Msg::Bye))
        ));
        assert!(matches!(read_frame(&mut r).unwrap(), Some(Frame::Data(d)) if d == b"bulk"));
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn oversized_frame_rejected_before_allocation() {
        let mut buf = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        buf.push(KIND_DATA);
        assert!(matches!(
            read_frame(&mut &buf[..]),
            Err(FrameError::TooLarge(_))
        ));
        let mut buf = u32::MAX.to_le_bytes().to_vec();
        buf.push(KIND_MSG);
        assert!(matches!(
            read_frame(&mut &buf[..]),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn an_oversized_message_is_an_error_not_a_panic() {
        let big = Msg::Want(vec![crate::Digest::of(b"x"); MAX_FRAME / 32 + 1]);
        let e = encode_msg(&big).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(write_msg(&mut Vec::new(), &big).is_err());
        assert!(data_header(MAX_FRAME + 1).is_err());
    }

    #[test]
    fn truncated_and_garbage_frames() {
        let full = encode_msg(&Msg::Error {
            kind: ErrorKind::Refused,
            message: "x".into(),
        })
        .unwrap();
        for cut in 1..full.len() {
            assert!(
                matches!(read_frame(&mut &full[..cut]), Err(FrameError::Truncated)),
                "cut {cut}"
            );
        }
        let mut bad = full.clone();
        bad[4] = 7;
        assert!(matches!(
            read_frame(&mut &bad[..]),
            Err(FrameError::BadKind(7))
        ));
        let mut junk = 4u32.to_le_bytes().to_vec();
        junk.push(KIND_MSG);
        junk.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            read_frame(&mut &junk[..]),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn claimed_vec_length_is_bounded() {
        // A Want message claiming 2^60 digests in a tiny frame must fail, not allocate.
        let mut payload = Vec::new();
        // variant index of Want, then a huge varint length (0xff marker + u64).
        let idx = match decode_msg(&encode_msg(&Msg::Want(vec![])).unwrap()[HEADER_LEN..]).unwrap()
        {
            Msg::Want(_) => encode_msg(&Msg::Want(vec![])).unwrap()[HEADER_LEN],
            _ => unreachable!(),
        };
        payload.push(idx);
        payload.push(253);
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode_msg(&payload).is_err());
    }

    /// Fuzz-style: errors are fine, panics are bugs. Random bytes and mutations of valid frames.
    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid: Vec<Vec<u8>> = vec![
            encode_msg(&Msg::Bye).unwrap(),
            encode_msg(&Msg::Want(vec![crate::Digest::of(b"a"); 3])).unwrap(),
            encode_msg(&crate::msg::hello(
                crate::msg::Role::Capture,
                "token",
                "host",
            ))
            .unwrap(),
            encode_msg(&Msg::Entries(vec![crate::manifest::Entry {
                path: b"a/b".to_vec(),
                kind: crate::manifest::Kind::Symlink {
                    target: b"x".to_vec(),
                },
                mode: 0o777,
                uid: 1,
                gid: 2,
                mtime: 3,
                mtime_nsec: 4,
                xattrs: vec![],
            }]))
            .unwrap(),
        ];
        for i in 0..20_000 {
            let mut buf = if i % 2 == 0 {
                let n = (next() % 64) as usize;
                (0..n).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                let mut v = valid[(next() % valid.len() as u64) as usize].clone();
                for _ in 0..1 + next() % 4 {
                    let j = (next() % v.len() as u64) as usize;
                    v[j] = next() as u8;
                }
                v
            };
            if i % 7 == 0 {
                let cut = (next() % (buf.len() as u64 + 1)) as usize;
                buf.truncate(cut);
            }
            let _ = read_frame(&mut &buf[..]);
            let _ = decode_frame(&buf);
            if buf.len() > HEADER_LEN {
                let _ = decode_msg(&buf[HEADER_LEN..]);
            }
        }
    }

    #[cfg(feature = "async")]
    #[tokio::test]
    async fn async_reader_matches_sync() {
        let mut buf = Vec::new();
        write_msg(&mut buf, &Msg::Bye).unwrap();
        let mut r = &buf[..];
        assert!(matches!(
            read_frame_async(&mut r).await.unwrap(),
            Some(Frame::Msg(Msg::Bye))
        ));
        assert!(read_frame_async(&mut r).await.unwrap().is_none());
        let mut r = &buf[..3];
        assert!(matches!(
            read_frame_async(&mut r).await,
            Err(FrameError::Truncated)
        ));
    }
}
