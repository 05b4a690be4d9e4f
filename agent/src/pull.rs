//! The node's side of the image service: fetch a manifest, then objects, pipelined.

use anyhow::{anyhow, bail, Context, Result};
use si_proto::frame::{read_frame, recv_msg, write_msg, Frame};
use si_proto::handshake::{self, Backoff, Credentials, PeerError};
use si_proto::manifest::Manifest;
use si_proto::msg::{ImageVersionInfo, Msg, Role};
use si_proto::stream::{BufStream, Counted, Traffic};
use si_proto::Digest;
use si_trust::{ClientStream, Connector, Fingerprint};
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a node keeps retrying a server that answers Busy or cannot be reached (an installer
/// whose master is restarting waits for it; the retries are logged as warnings).
const BUSY_PATIENCE: Duration = Duration::from_secs(600);

/// Digests per `Want`, and how many `Want`s may be outstanding.
const WANT_BATCH: usize = 1024;
const IN_FLIGHT: usize = 2;

pub use si_tree::codec::verify;

/// How a node client trusts the master: the CA fingerprint it pins, or `--insecure`; and the
/// node identity it presents once enrolled. Flattened into every node command line.
#[derive(clap::Args, Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrustArgs {
    /// The master's CA fingerprint (`sha256:HEX`, as `si-server ca show` prints it); default:
    /// the one in IDENTITY_DIR/ca.fingerprint.
    #[arg(long, env = "SI_CA_FINGERPRINT")]
    pub ca_fingerprint: Option<String>,
    /// Plain TCP to the master: nothing authenticated or encrypted (lab use only; logged loudly).
    #[arg(long)]
    pub insecure: bool,
    /// Where this node's key, certificate and pinned CA live (default /etc/si).
    #[arg(long)]
    pub identity_dir: Option<PathBuf>,
}

/// Where a node keeps its identity and its pin when none is given.
pub const DEFAULT_IDENTITY_DIR: &str = "/etc/si";
/// The file in the identity directory that holds the pinned fingerprint.
pub const PIN_FILE: &str = si_trust::identity::PIN_FILE;

impl TrustArgs {
    /// The connector these options describe: TLS pinned to the given (or saved) fingerprint,
    /// presenting the node's identity when it has one; plain TCP under `--insecure`.
    pub fn connector(&self) -> Result<Connector> {
        let dir = self
            .identity_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_IDENTITY_DIR));
        if self.insecure {
            return Connector::from_options(None, true, None);
        }
        let pin = match &self.ca_fingerprint {
            Some(f) => Some(
                f.parse::<Fingerprint>()
                    .context("reading --ca-fingerprint")?,
            ),
            None => read_pin(&dir)?,
        };
        Connector::from_options(pin, false, Some(&dir))
    }
}

/// The fingerprint saved in `dir/ca.fingerprint`, if there is one.
pub fn read_pin(dir: &Path) -> Result<Option<Fingerprint>> {
    let p = dir.join(PIN_FILE);
    match std::fs::read_to_string(&p) {
        Ok(s) => {
            Ok(Some(s.parse().with_context(|| {
                format!("reading the pin in {}", p.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// What [`Client::fetch_with`] hands each verified object to: its digest, its compressed bytes
/// as they arrived, and its content.
pub type Arrived<'a> = dyn Fn(Digest, &[u8], Vec<u8>) -> Result<()> + Sync + 'a;

pub struct Client {
    conn: BufStream<Counted<ClientStream>>,
    traffic: Traffic,
    /// The pinned CA certificate as the server sent it (None under `--insecure`): the key that
    /// signs versions.
    ca: Option<Vec<u8>>,
    watch: Watched,
}

/// What another thread may watch of a session while it fetches ([`Client::watch`]): the bytes
/// received, the `Waiting`s a relay sent, the time this node held the stream up itself
/// (its workers busy), and a way to cut the session.
#[derive(Clone, Default)]
struct Watched {
    waits: Arc<AtomicU64>,
    held_up_ns: Arc<AtomicU64>,
}

pub struct Watch {
    traffic: Traffic,
    watched: Watched,
    sock: TcpStream,
}

impl Watch {
    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.traffic.read()
    }
    /// `Waiting` messages received so far: the upstream had nothing to send yet.
    pub fn waits(&self) -> u64 {
        self.watched.waits.load(Ordering::Relaxed)
    }
    /// How long, in all, the session waited on this node's own workers (verify and write).
    pub fn held_up(&self) -> Duration {
        Duration::from_nanos(self.watched.held_up_ns.load(Ordering::Relaxed))
    }
    /// Ends the session now: the fetch in progress fails with an error.
    pub fn cut(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

impl Client {
    pub fn connect(server: &str, timeout: Duration, trust: &Connector) -> Result<Client> {
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
        let creds = Credentials {
            token: String::new(),
            client: si_tree::fsutil::hostname(),
        };
        // A server at its connection cap answers Busy: wait and retry (see si_proto::handshake).
        handshake::retry(
            Backoff::new(BUSY_PATIENCE),
            || Client::open(&addr, timeout, &creds, trust),
            |e, d| tracing::warn!(server = %addr, error = %e, retry_in = ?d, "server busy or unreachable; retrying"),
        )
        .with_context(|| format!("opening a session with {addr}"))
    }

    fn open(
        addr: &std::net::SocketAddr,
        timeout: Duration,
        creds: &Credentials,
        trust: &Connector,
    ) -> Result<Client, PeerError> {
        Client::open_with(addr, timeout, Duration::from_secs(120), creds, trust)
    }

    /// One attempt at a session with `addr` (no retry), whose reads fail after `stall` without
    /// a byte: what a relaying node uses to notice an upstream that stopped making progress.
    /// The error says whether another attempt may succeed ([`PeerError::retryable`]).
    pub fn connect_once(
        addr: &std::net::SocketAddr,
        timeout: Duration,
        stall: Duration,
        trust: &Connector,
    ) -> Result<Client, PeerError> {
        let creds = Credentials {
            token: String::new(),
            client: si_tree::fsutil::hostname(),
        };
        Client::open_with(addr, timeout, stall, &creds, trust)
    }

    fn open_with(
        addr: &std::net::SocketAddr,
        timeout: Duration,
        read_timeout: Duration,
        creds: &Credentials,
        trust: &Connector,
    ) -> Result<Client, PeerError> {
        let io = |e: std::io::Error| PeerError::Frame(si_proto::frame::FrameError::Io(e));
        let s = TcpStream::connect_timeout(addr, timeout).map_err(io)?;
        s.set_nodelay(true).ok();
        s.set_read_timeout(Some(read_timeout)).map_err(io)?;
        let mut s = trust
            .wrap(s)
            .map_err(|e| PeerError::Protocol(format!("{e:#}")))?;
        // A wrong CA or a refused certificate fails here, permanently (not retried).
        s.handshake()
            .map_err(|e| PeerError::Protocol(format!("TLS handshake with {addr}: {e}")))?;
        let ca = trust.pin().and_then(|p| s.pinned_ca(&p));
        let counted = Counted::new(s);
        let traffic = counted.traffic();
        let mut conn = BufStream::with_capacities(1 << 20, 64 << 10, counted);
        handshake::connect(&mut conn, Role::Deploy, creds)?;
        Ok(Client {
            conn,
            traffic,
            ca,
            watch: Watched::default(),
        })
    }

    /// Reads at most `kbit` kbit/s from the server from now on (0: no cap): a node's share of
    /// the network in a push (`si-update --max-rate-kbit`).
    pub fn limit_rate(&mut self, kbit: u64) {
        self.conn.get_mut().limit_read(kbit.saturating_mul(125));
    }

    /// Checks that an answer is the version asked for and carries the master's signature on
    /// its manifest digest, before any of it is used (the bytes are then checked against the
    /// digest). Under `--insecure` there is no pinned key: the check is skipped, loudly.
    fn check_signed(
        &self,
        image: &str,
        version: Option<u32>,
        info: &ImageVersionInfo,
        digest: &Digest,
        signature: &[u8],
    ) -> Result<()> {
        if info.image != image || version.is_some_and(|v| v != info.version) {
            bail!(
                "asked for {image}@{}, the server answered with {}@{}",
                version.map_or("newest".into(), |v| v.to_string()),
                info.image,
                info.version
            );
        }
        match &self.ca {
            Some(ca) => si_trust::sign::verify_version(ca, image, info.version, digest, signature),
            None => {
                tracing::warn!(%image, version = info.version, "--insecure: the version's signature is not checked");
                Ok(())
            }
        }
    }

    /// The pinned CA certificate the server presented (None under `--insecure`).
    pub fn ca(&self) -> Option<&[u8]> {
        self.ca.as_deref()
    }

    /// Bytes received from the server so far.
    pub fn received(&self) -> u64 {
        self.traffic.read()
    }

    /// A handle another thread watches this session's progress with, and may cut it by.
    pub fn watch(&self) -> Result<Watch> {
        Ok(Watch {
            traffic: self.traffic.clone(),
            watched: self.watch.clone(),
            sock: self
                .conn
                .get_ref()
                .get_ref()
                .tcp()
                .try_clone()
                .context("cloning the session's socket")?,
        })
    }

    pub fn list(&mut self) -> Result<Vec<ImageVersionInfo>> {
        write_msg(&mut self.conn, &Msg::ListImages)?;
        self.conn.flush()?;
        match recv_msg(&mut self.conn)? {
            Msg::Images(v) => Ok(v),
            m => bail!("unexpected answer: {m:?}"),
        }
    }

    /// Fetches and decodes a manifest (the newest version when `version` is None).
    pub fn manifest(
        &mut self,
        image: &str,
        version: Option<u32>,
    ) -> Result<(ImageVersionInfo, Manifest, Vec<u8>)> {
        write_msg(
            &mut self.conn,
            &Msg::GetManifest {
                image: image.into(),
                version,
            },
        )?;
        self.conn.flush()?;
        let (info, digest, bytes) = match recv_msg(&mut self.conn)? {
            Msg::ManifestIs {
                info,
                digest,
                bytes,
                signature,
            } => {
                self.check_signed(image, version, &info, &digest, &signature)?;
                (info, digest, bytes)
            }
            m => bail!("unexpected answer: {m:?}"),
        };
        let data = self.recv_bytes(bytes)?;
        let m = checked_manifest(image, &data, &digest)?;
        Ok((info, m, data))
    }

    fn recv_bytes(&mut self, n: u64) -> Result<Vec<u8>> {
        si_proto::frame::recv_bytes(&mut self.conn, n, si_proto::manifest::MAX_MANIFEST_BYTES)
            .context("receiving a manifest")
    }

    /// Asks for a version's manifest as the difference from `base` (the image and version
    /// the node has). The answer is a delta when the server still has that base, else the
    /// whole manifest.
    pub fn manifest_or_delta(
        &mut self,
        image: &str,
        version: Option<u32>,
        base: Option<(&str, u32)>,
    ) -> Result<ManifestAnswer> {
        let Some((bimage, bversion)) = base else {
            let (info, m, bytes) = self.manifest(image, version)?;
            return Ok(ManifestAnswer::Full { info, m, bytes });
        };
        write_msg(
            &mut self.conn,
            &Msg::GetManifestDelta {
                image: image.into(),
                version,
                base_image: bimage.into(),
                base_version: bversion,
            },
        )?;
        self.conn.flush()?;
        match recv_msg(&mut self.conn)? {
            Msg::ManifestDeltaIs {
                info,
                digest,
                bytes,
                delta_bytes,
                signature,
            } => {
                self.check_signed(image, version, &info, &digest, &signature)?;
                let data = self.recv_bytes(delta_bytes)?;
                let delta = si_proto::manifest::Delta::decode(&data)?;
                Ok(ManifestAnswer::Delta {
                    info,
                    delta,
                    digest,
                    bytes,
                })
            }
            Msg::ManifestIs {
                info,
                digest,
                bytes,
                signature,
            } => {
                self.check_signed(image, version, &info, &digest, &signature)?;
                let data = self.recv_bytes(bytes)?;
                let m = checked_manifest(image, &data, &digest)?;
                Ok(ManifestAnswer::Full {
                    info,
                    m,
                    bytes: data,
                })
            }
            m => bail!("unexpected answer: {m:?}"),
        }
    }

    /// Fetches `wants` (digest, expected length), verifying each, and hands them to `f` on
    /// `threads` worker threads, in no particular order.
    pub fn fetch(
        &mut self,
        wants: &[(Digest, u32)],
        threads: usize,
        f: &(dyn Fn(Digest, Vec<u8>) -> Result<()> + Sync),
    ) -> Result<()> {
        self.fetch_with(wants, threads, &|d, _, data| f(d, data))
    }

    /// [`Client::fetch`], also handing `f` each object's compressed bytes as they arrived
    /// (verified: they decompress to `data`, whose digest is `d`), for a relay to pass on.
    /// When it fails, every object already handed to `f` was handled by it.
    pub fn fetch_with(
        &mut self,
        wants: &[(Digest, u32)],
        threads: usize,
        f: &Arrived<'_>,
    ) -> Result<()> {
        let batches: Vec<&[(Digest, u32)]> = wants.chunks(WANT_BATCH).collect();
        let (tx, rx) = crossbeam_channel::bounded::<(Digest, u32, u32, Vec<u8>)>(32);
        let c = &mut self.conn;
        let watched = self.watch.clone();
        std::thread::scope(|s| -> Result<()> {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    let rx = rx.clone();
                    s.spawn(move || -> Result<()> {
                        for (d, raw, expect, z) in rx {
                            if raw != expect {
                                bail!("object {d}: server says {raw} bytes, manifest {expect}");
                            }
                            let data = verify(&d, raw, &z)?;
                            f(d, &z, data)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            drop(rx);
            let res = (|| -> Result<()> {
                let mut sent = 0;
                while sent < batches.len().min(IN_FLIGHT) {
                    write_msg(c, &Msg::Want(batches[sent].iter().map(|x| x.0).collect()))?;
                    sent += 1;
                }
                c.flush()?;
                for (i, batch) in batches.iter().enumerate() {
                    for &(d, expect) in batch.iter() {
                        let (digest, raw_len) = loop {
                            match recv_msg(c)? {
                                Msg::Blob { digest, raw_len } => break (digest, raw_len),
                                // A relay waiting for it from its upstream (alive, not stalled).
                                Msg::Waiting => {
                                    watched.waits.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                m => bail!("expected an object, got {}", m.name()),
                            }
                        };
                        if digest != d {
                            bail!("server sent {digest} where {d} was due");
                        }
                        let Some(Frame::Data(z)) = read_frame(c)? else {
                            bail!("object {d} without data")
                        };
                        let t = Instant::now();
                        if tx.send((d, raw_len, expect, z)).is_err() {
                            return Ok(()); // a worker failed; its error is reported below
                        }
                        watched
                            .held_up_ns
                            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    }
                    if sent < batches.len() {
                        write_msg(c, &Msg::Want(batches[sent].iter().map(|x| x.0).collect()))?;
                        c.flush()?;
                        sent += 1;
                    }
                    let _ = i;
                }
                Ok(())
            })();
            drop(tx);
            let mut out = res;
            for h in workers {
                let r = h.join().unwrap_or_else(|_| Err(anyhow!("worker panicked")));
                if out.is_ok() {
                    out = r;
                }
            }
            out
        })
    }

    pub fn report(&mut self, node: &str, state: &str, detail: &str) -> Result<()> {
        write_msg(
            &mut self.conn,
            &Msg::Report {
                node: node.into(),
                state: state.into(),
                detail: detail.into(),
            },
        )?;
        self.conn.flush()?;
        match recv_msg(&mut self.conn)? {
            Msg::Ok => Ok(()),
            m => bail!("unexpected answer: {m:?}"),
        }
    }

    /// Asks the master for a node's install plan (TOML, `si_proto::plan::InstallPlan`).
    pub fn plan(&mut self, node: &str) -> Result<String> {
        write_msg(&mut self.conn, &Msg::GetPlan { node: node.into() })?;
        self.conn.flush()?;
        match recv_msg(&mut self.conn)? {
            Msg::Plan(t) => Ok(t),
            Msg::Error { message, .. } => {
                bail!("the master has no install plan for {node}: {message}")
            }
            m => bail!("unexpected answer: {}", m.name()),
        }
    }

    /// Joins the master's multicast session for `image` (`version`, default the newest).
    pub fn mcast_join(&mut self, image: &str, version: Option<u32>) -> Result<McastSession> {
        write_msg(
            &mut self.conn,
            &Msg::McastJoin {
                image: image.into(),
                version,
            },
        )?;
        self.conn.flush()?;
        match recv_msg(&mut self.conn)? {
            Msg::McastSession {
                group,
                session,
                key,
                version,
                starts_in_ms,
            } => Ok(McastSession {
                group: group
                    .parse()
                    .with_context(|| format!("the master's multicast group {group:?}"))?,
                session,
                key: key.0,
                version,
                starts_in: Duration::from_millis(starts_in_ms.min(3_600_000)),
            }),
            Msg::Error { message, .. } => bail!("no multicast session for {image}: {message}"),
            m => bail!("unexpected answer: {}", m.name()),
        }
    }

    /// Tells the master this node has joined session `session`'s group.
    pub fn mcast_ready(&mut self, session: u64) -> Result<()> {
        write_msg(&mut self.conn, &Msg::McastReady { session })?;
        self.conn.flush()?;
        match recv_msg(&mut self.conn)? {
            Msg::Ok => Ok(()),
            Msg::Error { message, .. } => bail!("multicast session refused: {message}"),
            m => bail!("unexpected answer: {}", m.name()),
        }
    }

    /// This node's address on the session: the interface facing the master.
    pub fn local_addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self.conn.get_ref().get_ref().tcp().local_addr()?)
    }

    pub fn bye(mut self) {
        let _ = write_msg(&mut self.conn, &Msg::Bye);
        let _ = self.conn.flush();
    }
}

/// Decodes a manifest that arrived whole and checks it has the manifest digest announced.
fn checked_manifest(image: &str, data: &[u8], digest: &Digest) -> Result<Manifest> {
    let (m, got) = Manifest::decode_with_digest(data)
        .with_context(|| format!("decoding the manifest of {image}"))?;
    if got != *digest {
        bail!("manifest of {image} arrived corrupt (its digest is not the one announced)");
    }
    Ok(m)
}

/// A multicast session the master offered ([`Client::mcast_join`]).
pub struct McastSession {
    pub group: std::net::SocketAddrV4,
    pub session: u64,
    /// The session key: never printed.
    pub key: Vec<u8>,
    pub version: u32,
    /// The sender starts within this.
    pub starts_in: Duration,
}

/// A manifest as the server sent it: whole, or as a delta from the node's installed one.
pub enum ManifestAnswer {
    Full {
        info: ImageVersionInfo,
        m: Manifest,
        bytes: Vec<u8>,
    },
    Delta {
        info: ImageVersionInfo,
        delta: si_proto::manifest::Delta,
        /// The manifest digest of the manifest the delta must rebuild, and the length of the
        /// server's encoding of it (for information).
        digest: Digest,
        bytes: u64,
    },
}

impl ManifestAnswer {
    pub fn info(&self) -> &ImageVersionInfo {
        match self {
            ManifestAnswer::Full { info, .. } | ManifestAnswer::Delta { info, .. } => info,
        }
    }

    /// The manifest and its encoding: the delta applied to `base`, checked against the digest
    /// the server gave. None when the rebuilt manifest does not match (ask for the whole one).
    pub fn into_manifest(self, base: Option<&Manifest>) -> Option<(Manifest, Vec<u8>)> {
        match self {
            ManifestAnswer::Full { m, bytes, .. } => Some((m, bytes)),
            ManifestAnswer::Delta { delta, digest, .. } => {
                let m = delta.apply(base?).ok()?;
                let (enc, got) = m.encode_with_digest();
                (got == digest).then_some((m, enc))
            }
        }
    }
}

/// si-report's configuration: the command line, and the same as a TOML file.
#[derive(Clone, Debug, clap::Parser, serde::Serialize, serde::Deserialize)]
#[command(
    name = "si-report",
    version,
    about = "Report a node's install/update state to si-server"
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReportConfig {
    /// The si-server (HOST or HOST:PORT).
    #[arg(long)]
    pub server: String,
    /// Node name as the inventory knows it.
    #[arg(long)]
    pub node: String,
    /// State: installing, installed, failed, updated...
    #[arg(long)]
    pub state: String,
    #[arg(long, default_value = "")]
    #[serde(default)]
    pub detail: String,
    #[command(flatten)]
    #[serde(flatten)]
    pub trust: TrustArgs,
}

/// Sends one report and waits for the server to say it is stored.
pub fn report(cfg: &ReportConfig) -> Result<()> {
    let mut c = Client::connect(
        &cfg.server,
        Duration::from_secs(10),
        &cfg.trust.connector()?,
    )?;
    c.report(&cfg.node, &cfg.state, &cfg.detail)
        .with_context(|| format!("reporting {} as {}", cfg.node, cfg.state))?;
    c.bye();
    Ok(())
}
