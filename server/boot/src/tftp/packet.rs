//! TFTP wire format (RFC 1350) with option extension (RFC 2347).
//!
//! Parsing never panics and never allocates more than the packet it was given: every
//! length comes from the buffer itself. "Errors are fine, panics are bugs."

use std::fmt;

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// Longest request we look at; larger datagrams are truncated by the socket and refused.
pub const MAX_REQUEST: usize = 1024;
/// Most options one request may carry (RFC 2347 names five; clients send fewer).
pub const MAX_OPTIONS: usize = 16;

/// TFTP error codes (RFC 1350 §5, RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    NotDefined = 0,
    FileNotFound = 1,
    AccessViolation = 2,
    DiskFull = 3,
    IllegalOperation = 4,
    UnknownTid = 5,
    FileExists = 6,
    NoSuchUser = 7,
    OptionRefused = 8,
}

/// Transfer mode of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub write: bool,
    pub filename: String,
    pub mode: Mode,
    /// Options in the order sent, names lowercased.
    pub options: Vec<(String, String)>,
}

/// Any packet the server may receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Request(Request),
    Data { block: u16, len: usize },
    Ack { block: u16 },
    Error { code: u16, message: String },
    Oack,
}

/// Why a packet could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    TooShort,
    TooLong,
    UnknownOpcode(u16),
    Unterminated,
    NotUtf8,
    EmptyFilename,
    BadMode(String),
    TooManyOptions,
    OddOption,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::TooShort => write!(f, "packet too short"),
            ParseError::TooLong => write!(f, "request too long"),
            ParseError::UnknownOpcode(o) => write!(f, "unknown opcode {o}"),
            ParseError::Unterminated => write!(f, "string not NUL-terminated"),
            ParseError::NotUtf8 => write!(f, "string is not UTF-8"),
            ParseError::EmptyFilename => write!(f, "empty filename"),
            ParseError::BadMode(m) => write!(f, "unsupported mode {m:?}"),
            ParseError::TooManyOptions => write!(f, "too many options"),
            ParseError::OddOption => write!(f, "option without value"),
        }
    }
}

impl std::error::Error for ParseError {}

fn split_strings(mut b: &[u8]) -> Result<Vec<&str>, ParseError> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let nul = b
            .iter()
            .position(|&c| c == 0)
            .ok_or(ParseError::Unterminated)?;
        let s = std::str::from_utf8(&b[..nul]).map_err(|_| ParseError::NotUtf8)?;
        out.push(s);
        if out.len() > 2 + 2 * MAX_OPTIONS {
            return Err(ParseError::TooManyOptions);
        }
        b = &b[nul + 1..];
    }
    Ok(out)
}

/// Parses one datagram.
pub fn parse(buf: &[u8]) -> Result<Packet, ParseError> {
    if buf.len() < 2 {
        return Err(ParseError::TooShort);
    }
    let op = u16::from_be_bytes([buf[0], buf[1]]);
    let rest = &buf[2..];
    match op {
        OP_RRQ | OP_WRQ => {
            if buf.len() > MAX_REQUEST {
                return Err(ParseError::TooLong);
            }
            let strings = split_strings(rest)?;
            if strings.len() < 2 {
                return Err(ParseError::Unterminated);
            }
            let filename = strings[0];
            if filename.is_empty() {
                return Err(ParseError::EmptyFilename);
            }
            let mode = match strings[1].to_ascii_lowercase().as_str() {
                "octet" => Mode::Octet,
                "netascii" => Mode::Netascii,
                other => return Err(ParseError::BadMode(other.chars().take(16).collect())),
            };
            let opts = &strings[2..];
            if opts.len() % 2 != 0 {
                return Err(ParseError::OddOption);
            }
            let options = opts
                .chunks(2)
                .map(|kv| (kv[0].to_ascii_lowercase(), kv[1].to_string()))
                .collect();
            Ok(Packet::Request(Request {
                write: op == OP_WRQ,
                filename: filename.to_string(),
                mode,
                options,
            }))
        }
        OP_DATA => {
            if rest.len() < 2 {
                return Err(ParseError::TooShort);
            }
            Ok(Packet::Data {
                block: u16::from_be_bytes([rest[0], rest[1]]),
                len: rest.len() - 2,
            })
        }
        OP_ACK => {
            if rest.len() < 2 {
                return Err(ParseError::TooShort);
            }
            Ok(Packet::Ack {
                block: u16::from_be_bytes([rest[0], rest[1]]),
            })
        }
        OP_ERROR => {
            if rest.len() < 2 {
                return Err(ParseError::TooShort);
            }
            let code = u16::from_be_bytes([rest[0], rest[1]]);
            let msg = &rest[2..];
            let end = msg.iter().position(|&c| c == 0).unwrap_or(msg.len());
            let message = String::from_utf8_lossy(&msg[..end.min(255)]).into_owned();
            Ok(Packet::Error { code, message })
        }
        OP_OACK => Ok(Packet::Oack),
        other => Err(ParseError::UnknownOpcode(other)),
    }
}

/// Writes an ERROR packet into `out` (cleared first).
pub fn error(out: &mut Vec<u8>, code: ErrorCode, message: &str) {
    out.clear();
    out.extend_from_slice(&OP_ERROR.to_be_bytes());
    out.extend_from_slice(&(code as u16).to_be_bytes());
    // Keep messages short and free of NULs.
    out.extend(message.bytes().filter(|&c| c != 0).take(200));
    out.push(0);
}

/// Writes an OACK packet.
pub fn oack(out: &mut Vec<u8>, options: &[(String, String)]) {
    out.clear();
    out.extend_from_slice(&OP_OACK.to_be_bytes());
    for (k, v) in options {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
}

/// Writes the 4-byte DATA header; the payload follows.
pub fn data_header(out: &mut Vec<u8>, block: u16) {
    out.clear();
    out.extend_from_slice(&OP_DATA.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rrq_with_options() {
        let p = parse(b"\x00\x01pxelinux.0\x00OCTET\x00blksize\x001408\x00TSIZE\x000\x00").unwrap();
        let Packet::Request(r) = p else {
            panic!("not a request")
        };
        assert!(!r.write);
        assert_eq!(r.filename, "pxelinux.0");
        assert_eq!(r.mode, Mode::Octet);
        assert_eq!(
            r.options,
            vec![
                ("blksize".into(), "1408".into()),
                ("tsize".into(), "0".into())
            ]
        );
    }

    #[test]
    fn refuses_malformed_requests() {
        assert_eq!(parse(b"\x00"), Err(ParseError::TooShort));
        assert_eq!(parse(b"\x00\x01a"), Err(ParseError::Unterminated));
        assert_eq!(parse(b"\x00\x01a\x00"), Err(ParseError::Unterminated));
        assert_eq!(
            parse(b"\x00\x01\x00octet\x00"),
            Err(ParseError::EmptyFilename)
        );
        assert!(matches!(
            parse(b"\x00\x01a\x00mail\x00"),
            Err(ParseError::BadMode(_))
        ));
        assert_eq!(
            parse(b"\x00\x01a\x00octet\x00blksize\x00"),
            Err(ParseError::OddOption)
        );
        assert_eq!(
            parse(b"\x00\x01\xff\x00octet\x00"),
            Err(ParseError::NotUtf8)
        );
        assert_eq!(parse(b"\x00\x09"), Err(ParseError::UnknownOpcode(9)));
    }

    #[test]
    fn builds_error_and_oack() {
        let mut b = Vec::new();
        error(&mut b, ErrorCode::FileNotFound, "no\0pe");
        assert_eq!(b, b"\x00\x05\x00\x01nope\x00");
        oack(&mut b, &[("blksize".into(), "1432".into())]);
        assert_eq!(b, b"\x00\x06blksize\x001432\x00");
    }
}
