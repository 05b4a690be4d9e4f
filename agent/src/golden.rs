//! `si-prepareclient`: the golden client's side of a capture.
//!
//! It listens on one address, accepts a connection from the named master only, runs TLS with
//! a throwaway certificate, requires proof bound to that session that the master knows the
//! one-time token it printed and proves it knows it too (`si_trust::capture`: the token never
//! crosses the network; `--insecure` sends it in the clear over TCP), serves exactly one capture (protocol in `si_proto::msg`) and
//! exits; with no capture before the timeout it exits with an error. The stat cache, and the
//! encoded manifest just sent, are saved only after the master confirms (`Bye`) that the image
//! is durably recorded.
//!
//! The manifest kept is the base of the next capture: when the master offers the manifest
//! digest of its newest version (`CaptureBase`) and it is the one kept, the master sends no
//! list of the objects it has, and this side sends only a `manifest::Delta` from that base to
//! the new tree; any doubt (no file, a corrupt one, another digest) takes the full path.

use anyhow::{bail, Context, Result};
use si_proto::frame::{self, recv_msg, write_data, write_msg};
use si_proto::handshake::{self, Policy};
use si_proto::manifest::{Delta, Entry, Kind, Manifest};
use si_proto::msg::{self, Msg, Role, ScanStats};
use si_proto::stream::BufStream;
use si_proto::Digest;
use si_tree::exclude::Excludes;
use si_tree::scan::{self, BlobSink, ScanConfig};
use std::collections::HashSet;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// si-prepareclient's configuration: the command line, and the same as a TOML file.
#[derive(Clone, clap::Parser, serde::Serialize, serde::Deserialize)]
#[command(
    name = "si-prepareclient",
    version,
    about = "Prepare this node to be captured: record the disk layout, then serve the tree to \
             the named master only, once, with a one-time token (printed), and exit"
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeConfig {
    /// The master allowed to capture (IP address): the only peer address accepted.
    #[arg(long)]
    pub master: IpAddr,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7810")]
    pub listen: SocketAddr,
    /// Root of the tree to serve.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Use this token instead of a random one (required by the time a capture is served).
    #[arg(long)]
    #[serde(default)]
    pub token: Option<String>,
    /// Use this disk layout file instead of detecting the layout.
    #[arg(long, conflicts_with = "no_layout")]
    #[serde(default)]
    pub layout: Option<PathBuf>,
    /// Record no disk layout.
    #[arg(long)]
    #[serde(default)]
    pub no_layout: bool,
    /// State directory (the stat cache and the manifest last sent).
    #[arg(long, default_value = "/var/lib/si")]
    pub state_dir: PathBuf,
    /// Give up when no capture arrives within this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// Plain TCP, the token sent in the clear (lab use only; si-getimage --insecure too).
    #[arg(long)]
    #[serde(default)]
    pub insecure: bool,
    /// Pin the master's CA (`si-server ca show`): the master must then also present its
    /// certificate from that CA, besides proving it knows the token.
    #[arg(long, env = "SI_CA_FINGERPRINT")]
    #[serde(default)]
    pub ca_fingerprint: Option<String>,
}

impl ServeConfig {
    /// The disk layout (TOML) to hand to the master: none with `no_layout`, the `layout` file
    /// (checked), else the one detected beneath `root`.
    pub fn layout_toml(&self) -> Result<Option<String>> {
        if self.no_layout {
            return Ok(None);
        }
        if let Some(p) = &self.layout {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            si_proto::layout::Layout::parse(&text)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("parsing {}", p.display()))?;
            return Ok(Some(text));
        }
        Ok(Some(
            crate::layout::detect(&self.root)
                .context("detecting the disk layout (or pass --layout FILE / --no-layout)")?
                .to_toml(),
        ))
    }

    fn token(&self) -> Result<&str> {
        self.token.as_deref().context("no capture token configured")
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }
}

/// Largest encoded size of one `Entries` batch.
const BATCH_BYTES: usize = 4 << 20;

fn approx_size(e: &Entry) -> usize {
    let k = match &e.kind {
        Kind::File { chunks, .. } => chunks.len() * 48,
        Kind::Symlink { target } | Kind::Hardlink { target } => target.len(),
        _ => 0,
    };
    64 + e.path.len()
        + k
        + e.xattrs
            .iter()
            .map(|x| x.name.len() + x.value.len() + 8)
            .sum::<usize>()
}

struct NetSink<W: Write> {
    w: W,
}

impl<W: Write> BlobSink for NetSink<W> {
    fn blob(&mut self, digest: Digest, raw_len: u32, zdata: Vec<u8>) -> Result<()> {
        write_msg(&mut self.w, &Msg::Blob { digest, raw_len })?;
        write_data(&mut self.w, &zdata)?;
        Ok(())
    }
    fn totals(&mut self, files: u64, bytes: u64) -> Result<()> {
        write_msg(&mut self.w, &Msg::Totals { files, bytes })?;
        Ok(())
    }
    fn progress(&mut self, files: u64, bytes: u64) -> Result<()> {
        write_msg(&mut self.w, &Msg::Progress { files, bytes })?;
        Ok(())
    }
}

/// Sends the tree as `Entries` batches of about [`BATCH_BYTES`]; a file whose chunk list alone
/// is larger goes out with its first chunks, the rest following in `MoreChunks` messages.
fn send_entries<W: Write>(w: &mut W, entries: Vec<Entry>) -> Result<()> {
    let mut batch = Vec::new();
    let mut size = 0;
    for mut e in entries {
        let mut rest = Vec::new();
        if let Kind::File { chunks, .. } = &mut e.kind {
            if chunks.len() > msg::MAX_CHUNKS_PER_MSG {
                rest = chunks.split_off(msg::MAX_CHUNKS_PER_MSG);
            }
        }
        size += approx_size(&e);
        batch.push(e);
        if size >= BATCH_BYTES || !rest.is_empty() {
            write_msg(w, &Msg::Entries(std::mem::take(&mut batch)))?;
            size = 0;
        }
        for part in rest.chunks(msg::MAX_CHUNKS_PER_MSG) {
            write_msg(w, &Msg::MoreChunks(part.to_vec()))?;
        }
    }
    if !batch.is_empty() {
        write_msg(w, &Msg::Entries(batch))?;
    }
    Ok(())
}

/// Waits for the master, serves one capture (handing it `layout`, see
/// [`ServeConfig::layout_toml`]), returns its statistics.
pub fn serve_once(cfg: &ServeConfig, layout: Option<String>) -> Result<ScanStats> {
    let listener =
        TcpListener::bind(cfg.listen).with_context(|| format!("listening on {}", cfg.listen))?;
    serve_on(listener, cfg, layout)
}

/// [`serve_once`] on a listener the caller has bound (`cfg.listen` is not used).
pub fn serve_on(
    listener: TcpListener,
    cfg: &ServeConfig,
    layout: Option<String>,
) -> Result<ScanStats> {
    cfg.token()?;
    let tls = if cfg.insecure {
        tracing::warn!("--insecure: the capture runs over plain TCP; the tree and the token cross the network in the clear");
        None
    } else {
        let pin: Option<si_trust::Fingerprint> = cfg
            .ca_fingerprint
            .as_deref()
            .map(|p| p.parse().context("parsing --ca-fingerprint"))
            .transpose()?;
        if let Some(p) = &pin {
            tracing::info!(ca = %p, "the master must present its certificate from the pinned CA");
        }
        Some(si_trust::capture::golden_server_config(pin)?)
    };
    // Non-blocking so a connection gone between poll(2) and accept(2) cannot block past the
    // deadline; the wait itself is poll(2).
    listener.set_nonblocking(true)?;
    let kept = KeptBase::start(StateFiles::new(cfg));
    let deadline = Instant::now() + cfg.timeout();
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            bail!(
                "no capture from {} within {:?}; exiting",
                cfg.master,
                cfg.timeout()
            );
        };
        if !wait_readable(&listener, left)? {
            continue;
        }
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e).context("accepting a connection"),
        };
        if peer.ip() != cfg.master {
            tracing::warn!(%peer, master = %cfg.master, "refused a connection: only the master may capture");
            continue;
        }
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true).ok();
        match open_session(stream, cfg, tls.as_ref()) {
            Ok(Golden::Tls(s)) => return capture(s, cfg, layout, kept),
            Ok(Golden::Plain(s)) => return capture(s, cfg, layout, kept),
            Err(e) => tracing::warn!(%peer, error = format!("{e:#}"), "refused a connection"),
        }
    }
}

/// The golden client's side of a session past the handshake.
enum Golden {
    Tls(si_trust::tls::TlsServerStream),
    Plain(TcpStream),
}

/// Blocks until the listener has a connection to accept (true) or `timeout` passes (false).
fn wait_readable(listener: &TcpListener, timeout: Duration) -> Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let ts = Timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: timeout.subsec_nanos().into(),
    };
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    match poll(&mut fds, Some(&ts)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(std::io::Error::from(e)).context("waiting for the master to connect"),
    }
}

/// The TLS handshake (unless `--insecure`) and the si handshake, all within the Hello
/// timeout: over TLS the master's Hello carries its token proof for this session, and the
/// golden client answers with its own before anything else.
fn open_session(
    stream: TcpStream,
    cfg: &ServeConfig,
    tls: Option<&std::sync::Arc<si_trust::rustls::ServerConfig>>,
) -> Result<Golden> {
    use si_trust::capture::{proof, Side};
    stream.set_read_timeout(Some(handshake::HELLO_TIMEOUT))?;
    stream.set_write_timeout(Some(handshake::HELLO_TIMEOUT))?;
    let token = cfg.token()?;
    let server = si_tree::fsutil::hostname();
    let Some(tls) = tls else {
        let policy = Policy {
            roles: vec![Role::Capture],
            token: Some(token.to_string()),
            server,
        };
        handshake::accept(&mut &stream, &policy)?;
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        return Ok(Golden::Plain(stream));
    };
    let mut s = si_trust::tls::accept_any(tls, stream)?;
    let binding = s.binding()?;
    let policy = Policy {
        roles: vec![Role::Capture],
        token: Some(proof(token, &binding, Side::Master)),
        server,
    };
    handshake::accept(&mut s, &policy)?;
    write_msg(
        &mut s,
        &Msg::CaptureProof(proof(token, &binding, Side::Golden)),
    )?;
    s.flush()?;
    s.tcp().set_read_timeout(None)?;
    s.tcp().set_write_timeout(None)?;
    Ok(Golden::Tls(s))
}

/// Where the golden client keeps what it needs between captures of `root`: the stat cache,
/// and the encoded manifest the master last recorded (the base of the next capture's delta).
struct StateFiles {
    stat_cache: PathBuf,
    sent_manifest: PathBuf,
}

impl StateFiles {
    fn new(cfg: &ServeConfig) -> StateFiles {
        let key = &Digest::of(cfg.root.to_string_lossy().as_bytes()).to_hex()[..16];
        StateFiles {
            stat_cache: cfg.state_dir.join(format!("statcache-{key}")),
            sent_manifest: cfg.state_dir.join(format!("manifest-{key}")),
        }
    }

    /// The manifest last sent, if it is there and decodes, with its manifest digest (a
    /// missing or corrupt one is no base).
    fn kept(&self) -> Option<(Manifest, Digest)> {
        let data = match std::fs::read(&self.sent_manifest) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.sent_manifest.display(), error = %e, "cannot read the last manifest sent");
                return None;
            }
        };
        match Manifest::decode_with_digest(&data) {
            Ok(x) => Some(x),
            Err(e) => {
                tracing::warn!(path = %self.sent_manifest.display(), error = %e, "the last manifest sent is corrupt");
                None
            }
        }
    }
}

/// The manifest last sent, decoding on a thread of its own from the moment the client starts
/// listening, so a re-capture does not wait for it when the master names its base.
struct KeptBase(Option<std::thread::JoinHandle<Option<(Manifest, Digest)>>>);

impl KeptBase {
    fn start(files: StateFiles) -> KeptBase {
        KeptBase(Some(std::thread::spawn(move || files.kept())))
    }

    /// The kept manifest if its digest is `want` (anything else is no base).
    fn matching(&mut self, want: &Digest) -> Option<Manifest> {
        let kept = self.0.take()?.join().ok().flatten();
        match kept {
            Some((m, d)) if d == *want => Some(m),
            Some(_) => {
                tracing::info!(
                    "the master's newest version is not the manifest last sent from here"
                );
                None
            }
            None => None,
        }
    }
}

/// What the master offered before the scan: a base it and this client both hold (if any),
/// and the objects it has.
struct Offered {
    excludes: Vec<String>,
    base: Option<Manifest>,
    have: HashSet<Digest>,
}

/// Reads `CaptureStart`, answers a `CaptureBase`, reads the `Have` list.
fn offered<S: std::io::Read + Write>(conn: &mut S, kept: &mut KeptBase) -> Result<Offered> {
    let Msg::CaptureStart { excludes } = recv_msg(conn)? else {
        bail!("expected CaptureStart")
    };
    let mut base = None;
    let mut have = HashSet::new();
    loop {
        match recv_msg(conn)? {
            Msg::CaptureBase { manifest } => {
                base = kept.matching(&manifest);
                write_msg(conn, &Msg::BaseKnown(base.is_some()))?;
                conn.flush()?;
            }
            Msg::Have(ds) => {
                if ds.len() > msg::MAX_WANT {
                    bail!("Have batch too large");
                }
                have.extend(ds)
            }
            Msg::HaveEnd => break,
            m => bail!("unexpected {} during the have list", m.name()),
        }
    }
    // The master holds every object of the base: none of them is sent again.
    if let Some(b) = &base {
        have.extend(b.digests().map(|c| c.digest));
    }
    Ok(Offered {
        excludes,
        base,
        have,
    })
}

fn capture<S: std::io::Read + Write>(
    stream: S,
    cfg: &ServeConfig,
    layout: Option<String>,
    mut kept: KeptBase,
) -> Result<ScanStats> {
    let mut conn = BufStream::with_capacities(64 << 10, 1 << 20, stream);
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let files = StateFiles::new(cfg);
    let offer = offered(&mut conn, &mut kept)?;
    write_msg(&mut conn, &Msg::Layout(layout.unwrap_or_default()))?;
    let mut scfg = ScanConfig::new(&cfg.root);
    scfg.excludes = Excludes::new(&offer.excludes)?;
    scfg.stat_cache = Some(files.stat_cache.clone());
    let mut sink = NetSink { w: conn };
    let t = std::time::Instant::now();
    let res = scan::scan(&scfg, &offer.have, &mut sink)?;
    tracing::debug!(seconds = t.elapsed().as_secs_f64(), "scan done");
    let mut w = sink.w;
    let manifest = res.manifest;
    let plain = manifest.encode_plain();
    match &offer.base {
        Some(base) => {
            let delta = Delta::between(base, &manifest).encode();
            write_msg(
                &mut w,
                &Msg::CaptureDelta {
                    digest: si_proto::manifest::digest(&plain),
                    bytes: delta.len() as u64,
                },
            )?;
            frame::write_bytes(&mut w, &delta)?;
        }
        None => send_entries(&mut w, manifest.entries.clone())?,
    }
    let end = Msg::ScanEnd {
        stats: res.stats.clone(),
    };
    write_msg(&mut w, &end)?;
    w.flush()?;
    loop {
        match frame::read_frame(&mut w) {
            Ok(Some(frame::Frame::Msg(Msg::Bye))) => break,
            Ok(Some(frame::Frame::Msg(Msg::SendEntries))) if offer.base.is_some() => {
                tracing::warn!(
                    "the master could not rebuild the manifest from the delta; sending it whole"
                );
                send_entries(&mut w, manifest.entries.clone())?;
                write_msg(&mut w, &end)?;
                w.flush()?;
            }
            Ok(Some(frame::Frame::Msg(Msg::Error { message, .. }))) => {
                bail!("the master failed: {message}")
            }
            Ok(other) => bail!("the master closed without confirming ({other:?})"),
            Err(e) => return Err(e).context("waiting for the master's confirmation"),
        }
    }
    // Recorded: what the master now has is the base of the next capture.
    res.cache.save(&files.stat_cache)?;
    si_tree::fsutil::write_atomic(&files.sent_manifest, &manifest.encode())
        .context("keeping the manifest sent")?;
    Ok(res.stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use si_proto::frame::{read_frame, Frame, MAX_FRAME};
    use si_proto::manifest::Chunk;

    fn file(path: &str, chunks: usize) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: Kind::File {
                size: (chunks as u64) << 18,
                chunks: (0..chunks)
                    .map(|i| Chunk {
                        offset: (i as u64) << 18,
                        len: 256 << 10,
                        digest: Digest::of(&i.to_le_bytes()),
                    })
                    .collect(),
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1,
            mtime_nsec: 0,
            xattrs: vec![],
        }
    }

    /// A file of ~60 GiB (240k chunks) goes out in frames the master accepts, and comes back
    /// whole when the continuations are appended to the entry before them.
    #[test]
    fn a_chunk_list_larger_than_a_frame_is_split() {
        let entries = vec![file("small", 3), file("vm.img", 240_000), file("after", 1)];
        let mut wire = Vec::new();
        send_entries(&mut wire, entries.clone()).unwrap();
        let mut r = &wire[..];
        let mut got: Vec<Entry> = Vec::new();
        let mut frames = 0;
        while let Some(f) = read_frame(&mut r).unwrap() {
            frames += 1;
            match f {
                Frame::Msg(Msg::Entries(es)) => got.extend(es),
                Frame::Msg(Msg::MoreChunks(more)) => match &mut got.last_mut().unwrap().kind {
                    Kind::File { chunks, .. } => chunks.extend(more),
                    k => panic!("continuation after a {}", k.name()),
                },
                f => panic!("unexpected frame {f:?}"),
            }
        }
        assert!(frames >= 4, "{frames} frames");
        assert!(wire.len() > MAX_FRAME, "the test must exceed one frame");
        assert_eq!(got, entries);
    }
}
