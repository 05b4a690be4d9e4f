//! The opening of every si connection, written once for every role and any byte stream.
//!
//! The connecting side calls [`connect`] (or [`connect_async`]) with its [`Role`] and
//! [`Credentials`]; the listening side calls [`accept`] (or [`accept_async`]) with its
//! [`Policy`]. Both work over anything that reads and writes bytes (a TCP stream today, a TLS
//! stream tomorrow) and leave the stream positioned after the handshake.
//!
//! ```text
//! connecting side                          listening side
//! Hello{magic, version, min_version,  ->   checks magic, version, role, token (constant time)
//!       role, token, client}
//!                                     <-   Welcome{version, server}   or   Error{kind, message}
//! ```
//!
//! # Errors and retries
//!
//! Every failure is a [`PeerError`]. [`PeerError::retryable`] says which are worth another try:
//! a peer that answered `Busy` (it is at its connection cap) and a connection that could not be
//! opened or broke (refused, reset, timed out). Everything else is permanent: a wrong token, a
//! role the peer does not serve, no common protocol version, a malformed answer. [`Backoff`] is
//! the retry policy callers share: 200 ms, doubling to at most 5 s, each delay jittered by up
//! to a quarter so a crowd of nodes turned away together does not return together, until a
//! deadline passes.

use crate::frame::{recv_msg, write_msg, FrameError};
use crate::msg::{self, ErrorKind, Msg, Role};
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Longest a listener waits for a peer's hello; a peer that connects and says nothing is
/// dropped after this.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// What the connecting side presents.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// A one-time or shared token ("" where the role needs none).
    pub token: String,
    /// The client's name, for the peer's logs.
    pub client: String,
}

/// What the listening side accepts.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The roles this listener serves.
    pub roles: Vec<Role>,
    /// The token a peer must present, compared in constant time; `None`: no token needed.
    pub token: Option<String>,
    /// This side's name, sent in the welcome.
    pub server: String,
}

/// The listening side's answer, as the connecting side sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub version: u32,
    pub server: String,
}

/// A peer the listening side has let in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub version: u32,
    pub role: Role,
    pub client: String,
}

#[derive(Debug, Error)]
pub enum PeerError {
    /// The peer answered with an error message.
    #[error("the peer refused: {message} ({kind:?})")]
    Remote { kind: ErrorKind, message: String },
    /// This side turned the peer away (the peer was told why).
    #[error("refused the peer: {message} ({kind:?})")]
    Rejected { kind: ErrorKind, message: String },
    /// The peer broke the protocol (a message out of place, not an si peer).
    #[error("protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Frame(FrameError),
}

impl From<FrameError> for PeerError {
    fn from(e: FrameError) -> PeerError {
        match e {
            FrameError::Peer { kind, message } => PeerError::Remote { kind, message },
            e => PeerError::Frame(e),
        }
    }
}

impl PeerError {
    /// Worth another try after a pause (see [`Backoff`]).
    pub fn retryable(&self) -> bool {
        match self {
            PeerError::Remote { kind, .. } => *kind == ErrorKind::Busy,
            PeerError::Frame(FrameError::Io(e)) => transient_io(e),
            PeerError::Frame(FrameError::Truncated) => true,
            _ => false,
        }
    }
}

/// I/O failures that another attempt may not meet.
pub fn transient_io(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::TimedOut
            | K::WouldBlock
            | K::UnexpectedEof
            | K::Interrupted
    )
}

/// The hello a connecting side sends.
fn hello(role: Role, creds: &Credentials) -> Msg {
    msg::hello(role, &creds.token, &creds.client)
}

/// The connecting side's reading of the answer to its hello.
fn read_answer(answer: Msg) -> Result<Welcome, PeerError> {
    match answer {
        Msg::Welcome { version, server } => {
            if !(msg::MIN_PROTOCOL_VERSION..=msg::PROTOCOL_VERSION).contains(&version) {
                return Err(PeerError::Protocol(format!(
                    "the peer chose protocol version {version}, which this build does not speak"
                )));
            }
            Ok(Welcome { version, server })
        }
        Msg::Error { kind, message } => Err(PeerError::Remote { kind, message }),
        m => Err(PeerError::Protocol(format!(
            "expected a welcome, got {}",
            m.name()
        ))),
    }
}

/// The listening side's decision on a hello: the peer let in and the welcome to send, or the
/// error to send.
fn judge(hello: Msg, policy: &Policy) -> Result<(Accepted, Msg), (ErrorKind, String)> {
    let Msg::Hello {
        magic,
        version,
        min_version,
        role,
        token,
        client,
    } = hello
    else {
        return Err((
            ErrorKind::BadRequest,
            format!("expected a hello, got {}", hello.name()),
        ));
    };
    if magic != msg::MAGIC {
        return Err((ErrorKind::BadRequest, "not an si peer".into()));
    }
    let v = msg::negotiate(version, min_version).map_err(|m| (ErrorKind::Version, m))?;
    if !policy.roles.contains(&role) {
        return Err((
            ErrorKind::BadRequest,
            format!("this service does not serve {role:?}"),
        ));
    }
    if let Some(want) = &policy.token {
        if !ct_eq(token.as_bytes(), want.as_bytes()) {
            return Err((ErrorKind::Refused, "wrong token".into()));
        }
    }
    let welcome = Msg::Welcome {
        version: v,
        server: policy.server.clone(),
    };
    Ok((
        Accepted {
            version: v,
            role,
            client: client.chars().take(256).collect(),
        },
        welcome,
    ))
}

fn rejected(kind: ErrorKind, message: String) -> (Msg, PeerError) {
    (
        Msg::Error {
            kind,
            message: message.clone(),
        },
        PeerError::Rejected { kind, message },
    )
}

/// Opens a connection as `role`: sends the hello, reads the answer.
pub fn connect<S: Read + Write>(
    stream: &mut S,
    role: Role,
    creds: &Credentials,
) -> Result<Welcome, PeerError> {
    write_msg(stream, &hello(role, creds)).map_err(FrameError::Io)?;
    stream.flush().map_err(FrameError::Io)?;
    read_answer(recv_msg(stream)?)
}

/// Takes a connection's opening: reads the hello, answers welcome or error (flushed). The
/// caller bounds the wait with a read timeout of [`HELLO_TIMEOUT`].
pub fn accept<S: Read + Write>(stream: &mut S, policy: &Policy) -> Result<Accepted, PeerError> {
    let hello = recv_msg(stream)?;
    let (reply, out) = match judge(hello, policy) {
        Ok((accepted, welcome)) => (welcome, Ok(accepted)),
        Err((kind, message)) => {
            let (m, e) = rejected(kind, message);
            (m, Err(e))
        }
    };
    write_msg(stream, &reply).map_err(FrameError::Io)?;
    stream.flush().map_err(FrameError::Io)?;
    out
}

/// Turns a connection away because this side is at its cap; the peer may retry.
pub fn refuse_busy<S: Write>(stream: &mut S) -> io::Result<()> {
    write_msg(stream, &busy())?;
    stream.flush()
}

fn busy() -> Msg {
    Msg::Error {
        kind: ErrorKind::Busy,
        message: "too many connections; retry later".into(),
    }
}

#[cfg(feature = "async")]
mod asynchronous {
    use super::*;
    use crate::frame::{recv_msg_async, write_msg_async};
    use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

    /// Async twin of [`connect`].
    pub async fn connect_async<S: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut S,
        role: Role,
        creds: &Credentials,
    ) -> Result<Welcome, PeerError> {
        write_msg_async(stream, &hello(role, creds))
            .await
            .map_err(FrameError::Io)?;
        stream.flush().await.map_err(FrameError::Io)?;
        read_answer(recv_msg_async(stream).await?)
    }

    /// Async twin of [`accept`]; a peer that says nothing for [`HELLO_TIMEOUT`] is an error.
    pub async fn accept_async<S: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut S,
        policy: &Policy,
    ) -> Result<Accepted, PeerError> {
        let hello = tokio::time::timeout(HELLO_TIMEOUT, recv_msg_async(stream))
            .await
            .map_err(|_| {
                FrameError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no hello within {HELLO_TIMEOUT:?}"),
                ))
            })??;
        let (reply, out) = match judge(hello, policy) {
            Ok((accepted, welcome)) => (welcome, Ok(accepted)),
            Err((kind, message)) => {
                let (m, e) = rejected(kind, message);
                (m, Err(e))
            }
        };
        write_msg_async(stream, &reply)
            .await
            .map_err(FrameError::Io)?;
        stream.flush().await.map_err(FrameError::Io)?;
        out
    }

    /// Async twin of [`refuse_busy`].
    pub async fn refuse_busy_async<S: AsyncWrite + Unpin>(stream: &mut S) -> io::Result<()> {
        write_msg_async(stream, &busy()).await?;
        stream.flush().await
    }
}
#[cfg(feature = "async")]
pub use asynchronous::{accept_async, connect_async, refuse_busy_async};

/// The shared retry policy: exponential backoff with jitter until a deadline.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    deadline: Instant,
}

impl Backoff {
    /// Retries for at most `patience` from now.
    pub fn new(patience: Duration) -> Backoff {
        Backoff {
            next: Duration::from_millis(200),
            max: Duration::from_secs(5),
            deadline: Instant::now() + patience,
        }
    }

    /// The pause before the next attempt, or `None` once the deadline has passed.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if now >= self.deadline {
            return None;
        }
        let mut r = [0u8; 2];
        let jitter = match getrandom::getrandom(&mut r) {
            Ok(()) => u16::from_le_bytes(r) as u32,
            Err(_) => 0,
        };
        let base = self.next;
        let d = base + base / 4 * jitter / u16::MAX as u32;
        self.next = (base * 2).min(self.max);
        Some(d.min(self.deadline - now))
    }
}

/// Runs `attempt` until it succeeds, fails permanently, or `backoff` runs out; between tries it
/// sleeps for the backoff's delay and calls `on_retry` with the error it is retrying.
pub fn retry<T>(
    mut backoff: Backoff,
    mut attempt: impl FnMut() -> Result<T, PeerError>,
    mut on_retry: impl FnMut(&PeerError, Duration),
) -> Result<T, PeerError> {
    loop {
        match attempt() {
            Err(e) if e.retryable() => match backoff.next_delay() {
                Some(d) => {
                    on_retry(&e, d);
                    std::thread::sleep(d);
                }
                None => return Err(e),
            },
            r => return r,
        }
    }
}

/// A random token: 128 bits from the kernel, hex.
pub fn new_token() -> io::Result<String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(io::Error::from)?;
    Ok(hex::encode(b))
}

/// Constant-time comparison of secrets.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// One end of an in-memory duplex: reads what the other end wrote.
    struct Pipe {
        rx: VecDeque<u8>,
        tx: Vec<u8>,
    }
    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.rx.read(buf)
        }
    }
    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.tx.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn policy() -> Policy {
        Policy {
            roles: vec![Role::Capture],
            token: Some("secret".into()),
            server: "master".into(),
        }
    }

    /// Runs a connect against an accept over byte buffers: the client's hello goes to the
    /// listener, the listener's answer back to the client.
    fn exchange(
        role: Role,
        token: &str,
        p: &Policy,
    ) -> (Result<Accepted, PeerError>, Result<Welcome, PeerError>) {
        let creds = Credentials {
            token: token.into(),
            client: "node1".into(),
        };
        let mut hello = Vec::new();
        write_msg(&mut hello, &super::hello(role, &creds)).unwrap();
        let mut listener = Pipe {
            rx: hello.into(),
            tx: Vec::new(),
        };
        let accepted = accept(&mut listener, p);
        let mut client = Pipe {
            rx: listener.tx.into(),
            tx: Vec::new(),
        };
        // The client re-sends its hello into a sink; what matters is how it reads the answer.
        let welcome = connect(&mut client, role, &creds);
        (accepted, welcome)
    }

    #[test]
    fn accepts_the_right_role_and_token() {
        let (a, w) = exchange(Role::Capture, "secret", &policy());
        let a = a.unwrap();
        assert_eq!((a.role, a.client.as_str()), (Role::Capture, "node1"));
        assert_eq!(w.unwrap().server, "master");
    }

    #[test]
    fn wrong_token_and_wrong_role_are_permanent() {
        let (a, w) = exchange(Role::Capture, "guess", &policy());
        assert!(matches!(
            a,
            Err(PeerError::Rejected {
                kind: ErrorKind::Refused,
                ..
            })
        ));
        let w = w.unwrap_err();
        assert!(matches!(
            w,
            PeerError::Remote {
                kind: ErrorKind::Refused,
                ..
            }
        ));
        assert!(!w.retryable());
        let (a, w) = exchange(Role::Deploy, "secret", &policy());
        assert!(matches!(
            a,
            Err(PeerError::Rejected {
                kind: ErrorKind::BadRequest,
                ..
            })
        ));
        assert!(!w.unwrap_err().retryable());
    }

    #[test]
    fn busy_is_retryable() {
        let mut answer = Vec::new();
        refuse_busy(&mut answer).unwrap();
        let mut client = Pipe {
            rx: answer.into(),
            tx: Vec::new(),
        };
        let e = connect(&mut client, Role::Deploy, &Credentials::default()).unwrap_err();
        assert!(e.retryable(), "{e}");
    }

    #[test]
    fn silence_and_garbage_are_errors() {
        let mut silent = Pipe {
            rx: VecDeque::new(),
            tx: Vec::new(),
        };
        assert!(accept(&mut silent, &policy()).is_err());
        let mut garbage = Pipe {
            rx: vec![0xff; 64].into(),
            tx: Vec::new(),
        };
        assert!(accept(&mut garbage, &policy()).is_err());
        // Not a hello: refused with a reason.
        let mut bye = Vec::new();
        write_msg(&mut bye, &Msg::Bye).unwrap();
        let mut p = Pipe {
            rx: bye.into(),
            tx: Vec::new(),
        };
        assert!(matches!(
            accept(&mut p, &policy()),
            Err(PeerError::Rejected {
                kind: ErrorKind::BadRequest,
                ..
            })
        ));
    }

    #[test]
    fn retry_stops_on_permanent_errors_and_retries_busy() {
        let mut calls = 0;
        let r: Result<(), PeerError> = retry(
            Backoff::new(Duration::from_secs(10)),
            || {
                calls += 1;
                if calls < 3 {
                    Err(PeerError::Remote {
                        kind: ErrorKind::Busy,
                        message: String::new(),
                    })
                } else {
                    Err(PeerError::Remote {
                        kind: ErrorKind::Refused,
                        message: String::new(),
                    })
                }
            },
            |_, _| {},
        );
        assert!(matches!(
            r,
            Err(PeerError::Remote {
                kind: ErrorKind::Refused,
                ..
            })
        ));
        assert_eq!(calls, 3);
    }

    #[test]
    fn backoff_grows_and_ends() {
        let mut b = Backoff::new(Duration::from_secs(60));
        let d1 = b.next_delay().unwrap();
        let d2 = b.next_delay().unwrap();
        assert!(d1 >= Duration::from_millis(200) && d1 <= Duration::from_millis(250));
        assert!(d2 >= Duration::from_millis(400) && d2 <= Duration::from_millis(500));
        let mut b = Backoff::new(Duration::ZERO);
        assert_eq!(b.next_delay(), None);
    }
}
