//! Chain relays (Kascade-style): nodes moving to the same version form a chain
//! master → n1 → n2 → … → nK, each fetching objects from its predecessor, which serves what it
//! has already verified and written.
//!
//! - A relay runs the image service's object path ([`si_imageserver::service::run_objects`])
//!   over [`RelayObjects`]: the bounded [`buffer::Buffer`] of recent objects, else the node's
//!   own tree (read back, checked against the digest, compressed again). An object the relay
//!   still expects is waited for (up to `--wait-secs`), not refused.
//! - Manifests and their signatures always come from the master, checked against the pinned CA.
//!   Objects are content-addressed and verified on arrival, whoever sends them.
//! - Trust: TLS with si-trust. The node dials its upstream as `NAME.node.si` (the upstream's
//!   node certificate from the pinned CA) and presents its own; the relay's gate serves only
//!   peers with a certificate from that CA (or anyone under `--insecure`, logged).
//! - Healing: an upstream that sends nothing for `--stall-secs` (killed, link down) is left for
//!   the next candidate (the predecessor's predecessor, …, the master last); the node asks it
//!   only for what it still lacks, so no object is fetched twice. A relay waiting for an
//!   object from its own upstream is not silent: it sends `Waiting` every 0.5 s (at most its
//!   `--wait-secs`), so its successor stays while it is alive and heals it out when it dies.
//! - Late joiners: a node that finished (its deploy done, maybe rebooted since) serves the
//!   version installed on its root with `--serve-installed`, every object read back from its
//!   tree and checked against its digest, so a node that joins after the session attaches to
//!   it rather than to the master.

pub mod buffer;
pub mod multicast;

use anyhow::{anyhow, bail, Context, Result};
use buffer::{Buffer, Found};
use serde::{Deserialize, Serialize};
use si_agent::pull::{Client, TrustArgs};
use si_imageserver::service::{self, Caller, EnrollRequest, Gate, ObjectFinder, ServeConfig};
use si_proto::manifest::{Kind, Manifest};
use si_proto::Digest;
use si_tree::exclude::Excludes;
use si_trust::{Connector, NodeIdentity};
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

fn default_buffer_mib() -> usize {
    256
}
fn default_stall() -> u64 {
    5
}
fn default_wait() -> u64 {
    30
}
fn default_linger() -> u64 {
    10
}
fn default_threads() -> usize {
    2
}

/// si-relay's configuration: the command line, and the same as a TOML file.
#[derive(Clone, Debug, clap::Parser, Serialize, Deserialize)]
#[command(
    name = "si-relay",
    disable_version_flag = true,
    about = "Deploy an image version onto an empty root, fetching objects along a chain of relays and relaying them on"
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RelayConfig {
    /// The master (HOST or HOST:PORT): manifests and signatures always come from it, and it is
    /// the last upstream for objects.
    #[arg(long)]
    pub server: String,
    #[arg(long)]
    pub image: String,
    /// The version (default: the newest).
    #[arg(long)]
    #[serde(default)]
    pub version: Option<u32>,
    /// The empty root to deploy onto.
    #[arg(long)]
    pub root: PathBuf,
    /// Where the installed record goes, as si-updateclient keeps it (default ROOT/var/lib/si):
    /// a later update of this node is differential.
    #[arg(long)]
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Upstream relays, nearest first, as NAME@HOST:PORT (NAME: the node its certificate
    /// names; HOST:PORT alone under --insecure). The master is tried after them.
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub relay_from: Vec<String>,
    /// Serve the objects this node has to its successor on this address (HOST:PORT).
    #[arg(long)]
    #[serde(default)]
    pub relay_listen: Option<String>,
    /// The most memory (MiB of compressed objects) the relay keeps for its successor; older
    /// objects are read back from the tree.
    #[arg(long, default_value_t = default_buffer_mib())]
    #[serde(default = "default_buffer_mib")]
    pub buffer_mib: usize,
    /// An upstream that sends no byte for this long is left for the next candidate.
    #[arg(long, default_value_t = default_stall())]
    #[serde(default = "default_stall")]
    pub stall_secs: u64,
    /// An upstream relay that has objects to send but delivers fewer than this many kbit/s
    /// over a stretch of `SLOW_WINDOW` is left as if it had stalled (a node much slower
    /// than its chain becomes a leaf: nobody fetches from it any more). 0: off.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub min_rate_kbit: u64,
    /// How long the relay waits for an object its successor asks for and it has not yet.
    #[arg(long, default_value_t = default_wait())]
    #[serde(default = "default_wait")]
    pub wait_secs: u64,
    /// Once deployed, keep relaying until no successor asked for anything for this long.
    #[arg(long, default_value_t = default_linger())]
    #[serde(default = "default_linger")]
    pub linger_secs: u64,
    /// Deploy nothing: serve the version installed on ROOT (the image and, if given, the
    /// version must be what its state directory records) on `--relay-listen` until no one
    /// asked for anything for `--linger-secs`. A finished node feeds late joiners this way;
    /// an object that changed in its tree since is refused, and the joiner takes it from its
    /// next upstream.
    #[arg(long, requires = "relay_listen", conflicts_with = "relay_from")]
    #[serde(default)]
    pub serve_installed: bool,
    /// Receive the version from the master's multicast session first (si-server
    /// --multicast-group); whatever does not arrive is fetched as usual, from the relays and
    /// the master.
    #[arg(long, conflicts_with = "serve_installed")]
    #[serde(default)]
    pub multicast: bool,
    /// Threads verifying and writing objects.
    #[arg(long, default_value_t = default_threads())]
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    #[serde(default)]
    pub summary_json: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub trust: TrustArgs,
}

/// What came from one upstream.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FromUpstream {
    pub upstream: String,
    pub objects: u64,
    /// Compressed bytes, as they travelled.
    pub bytes: u64,
    /// Why the node left this upstream before it had everything (it failed, stalled, or was
    /// too slow); None when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left: Option<String>,
}

/// How long an upstream must stay below `--min-rate-kbit` before it is left: long enough
/// that a burst of small files or a TCP recovery does not count.
pub const SLOW_WINDOW: Duration = Duration::from_secs(4);

/// Watches a session with an upstream relay once a second and cuts it when, over the last
/// [`SLOW_WINDOW`], the upstream had objects to send (it sent no `Waiting`), this node was not
/// the one holding the stream up (its workers took less than half the window), and fewer
/// than `min_rate` bytes a second arrived. Returns the reason when it cut; runs until `stop`
/// ends.
fn watch_rate(
    w: &si_agent::pull::Watch,
    min_rate: u64,
    stop: &std::sync::mpsc::Receiver<()>,
) -> Option<String> {
    let mut seen: std::collections::VecDeque<(Instant, u64, u64, Duration)> = Default::default();
    loop {
        match stop.recv_timeout(Duration::from_secs(1)) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return None,
        }
        let now = (Instant::now(), w.received(), w.waits(), w.held_up());
        seen.push_back(now);
        while seen.len() > 1 && now.0.duration_since(seen[1].0) >= SLOW_WINDOW {
            seen.pop_front();
        }
        let first = seen[0];
        let span = now.0.duration_since(first.0);
        if span < SLOW_WINDOW || now.2 != first.2 || now.3 - first.3 > span / 2 {
            continue;
        }
        let rate = (now.1 - first.1) as f64 / span.as_secs_f64();
        if rate < min_rate as f64 {
            w.cut();
            return Some(format!(
                "too slow: {:.1} Mbit/s for {:.0} s, below the floor of {:.1} Mbit/s",
                rate * 8.0 / 1e6,
                span.as_secs_f64(),
                min_rate as f64 * 8.0 / 1e6
            ));
        }
    }
}

/// What a relaying deploy did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RelaySummary {
    pub image: String,
    pub version: u32,
    /// Distinct objects the version needs, and their uncompressed bytes written.
    pub objects: u64,
    pub bytes: u64,
    pub from: Vec<FromUpstream>,
    /// Times the node left an upstream for the next candidate.
    pub reattaches: u64,
    /// What this node relayed to its successors.
    pub served_objects: u64,
    pub served_bytes: u64,
    pub seconds: f64,
    /// What the multicast session brought, when the node joined one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multicast: Option<multicast::MulticastSummary>,
}

/// An upstream relay: its label (as given), address, and how it is trusted.
struct Upstream {
    label: String,
    addr: SocketAddr,
    trust: Connector,
}

/// Parses `NAME@HOST:PORT` (or `HOST:PORT` under `--insecure`).
fn upstream(
    spec: &str,
    pin_id: Option<(si_trust::Fingerprint, &NodeIdentity)>,
) -> Result<Upstream> {
    let (name, addr) = match spec.split_once('@') {
        Some((n, a)) => (Some(n), a),
        None => (None, spec),
    };
    let addr = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving relay {spec}"))?
        .next()
        .ok_or_else(|| anyhow!("relay {spec} resolves to nothing"))?;
    let trust = match (pin_id, name) {
        (None, _) => Connector::Insecure,
        (Some((pin, id)), Some(n)) => Connector::node_peer(pin, id, n)?,
        (Some(_), None) => {
            bail!("relay {spec}: give it as NAME@HOST:PORT (NAME: the node its certificate names)")
        }
    };
    Ok(Upstream {
        label: spec.to_string(),
        addr,
        trust,
    })
}

/// The relay's gate: objects to peers holding a certificate from the pinned CA (the TLS layer
/// verified it), or to anyone under `--insecure`; nothing else.
pub struct RelayGate {
    insecure: bool,
}

impl RelayGate {
    pub fn new(insecure: bool) -> RelayGate {
        RelayGate { insecure }
    }
}

impl Gate for RelayGate {
    fn may_read_image(&self, _: &Caller, _: &str) -> Result<()> {
        bail!("a relay serves objects only")
    }
    fn may_fetch_objects(&self, c: &Caller) -> Result<()> {
        if self.insecure || c.peer.is_some() {
            Ok(())
        } else {
            bail!("a relay serves only enrolled nodes (no certificate from the CA was presented)")
        }
    }
    fn may_report(&self, _: &Caller, _: &str) -> Result<()> {
        bail!("a relay takes no reports")
    }
    fn enroll(&self, _: &Caller, _: &EnrollRequest) -> Result<Vec<Vec<u8>>> {
        bail!("a relay does not enroll nodes")
    }
}

/// Where each object of a version lies in the tree: its first use (entry, offset, length).
type Index = HashMap<Digest, (Vec<u8>, u64, u32)>;

fn index(m: &Manifest) -> Index {
    let mut ix = Index::new();
    for e in &m.entries {
        if let Kind::File { chunks, .. } = &e.kind {
            for c in chunks {
                ix.entry(c.digest)
                    .or_insert_with(|| (e.path.clone(), c.offset, c.len));
            }
        }
    }
    ix
}

/// The objects a relay serves: the buffer, else the node's tree.
pub struct RelayObjects {
    buffer: Arc<Buffer>,
    root: PathBuf,
    index: OnceLock<Index>,
    wait: Duration,
    served_objects: AtomicU64,
    served_bytes: AtomicU64,
    busy: AtomicUsize,
    last: Mutex<Instant>,
}

impl RelayObjects {
    pub fn new(buffer: Arc<Buffer>, root: &Path, wait: Duration) -> RelayObjects {
        RelayObjects {
            buffer,
            root: root.to_path_buf(),
            index: OnceLock::new(),
            wait,
            served_objects: AtomicU64::new(0),
            served_bytes: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        }
    }

    /// The version being deployed: where its objects will lie in the tree.
    pub fn set_manifest(&self, m: &Manifest) {
        let _ = self.index.set(index(m));
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// How long since a successor last asked for an object (zero while one is being served).
    pub fn idle(&self) -> Duration {
        if self.busy.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    fn read_back(&self, d: &Digest) -> Result<(u32, Vec<u8>)> {
        let (path, offset, len) = self
            .index
            .get()
            .and_then(|ix| ix.get(d))
            .ok_or_else(|| anyhow!("object {d} is in no file of this version"))?;
        let root = si_tree::apply::open_root(&self.root)?;
        let parent =
            si_proto::path::parent(path).ok_or_else(|| anyhow!("object {d} at the root"))?;
        let pd = si_tree::apply::open_dir_beneath(std::os::fd::AsFd::as_fd(&root), parent)?;
        let fd = rustix::fs::openat(
            &pd,
            OsStr::from_bytes(si_proto::path::file_name(path)),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .with_context(|| format!("opening the file that holds {d}"))?;
        let f = std::fs::File::from(fd);
        if *len > si_proto::limits::MAX_OBJECT {
            bail!("object {d}: {len} bytes is past the largest object");
        }
        let mut data = vec![0u8; *len as usize];
        f.read_exact_at(&mut data, *offset)
            .with_context(|| format!("reading {d} back from the tree"))?;
        if Digest::of(&data) != *d {
            bail!("object {d} changed in the tree since it was written");
        }
        let z = si_tree::codec::compress(&data)?;
        Ok((*len, z))
    }
}

impl ObjectFinder for RelayObjects {
    fn object(&self, d: &Digest) -> Result<(u32, Vec<u8>)> {
        self.busy.fetch_add(1, Ordering::AcqRel);
        let r = match self.buffer.get(d, self.wait) {
            Found::Memory(raw, z) => Ok((raw, z.to_vec())),
            Found::Disk => self.read_back(d),
            Found::Absent => Err(anyhow!("object {d} is not on this relay")),
        };
        self.touch();
        self.busy.fetch_sub(1, Ordering::AcqRel);
        if let Ok((_, z)) = &r {
            self.served_objects.fetch_add(1, Ordering::Relaxed);
            self.served_bytes
                .fetch_add(z.len() as u64, Ordering::Relaxed);
        }
        r
    }

    fn may_wait(&self) -> bool {
        true
    }

    fn at_hand(&self, d: &Digest) -> Option<(u32, Vec<u8>)> {
        let (raw, z) = self.buffer.in_memory(d)?;
        self.touch();
        self.served_objects.fetch_add(1, Ordering::Relaxed);
        self.served_bytes
            .fetch_add(z.len() as u64, Ordering::Relaxed);
        Some((raw, z.to_vec()))
    }
}

/// The relay listener's limits: few peers (a successor, and one healing past a dead relay).
pub fn serve_config(transport: si_trust::Acceptor, insecure: bool) -> ServeConfig {
    let mut c = ServeConfig::new(transport);
    c.max_connections = 16;
    c.per_source = 4;
    c.message_deadline = Duration::from_secs(10);
    c.idle_timeout = Duration::from_secs(60);
    c.write_stall = Duration::from_secs(30);
    c.gate = Arc::new(RelayGate::new(insecure));
    c
}

/// How long the first attach keeps trying an upstream that does not accept yet (it may still
/// be starting).
const FIRST_ATTACH_PATIENCE: Duration = Duration::from_secs(20);

/// Fetches `wants` from the upstreams in order, then the master; on an upstream that fails or
/// stalls, moves on and asks the next only for what is still missing. Each object arrives
/// once: `write` writes it, then it enters the buffer.
#[allow(clippy::too_many_arguments)]
fn fetch_chain(
    upstreams: &[Upstream],
    master: &mut Client,
    master_label: &str,
    wants: &[(Digest, u32)],
    threads: usize,
    stall: Duration,
    min_rate: u64,
    buffer: &Buffer,
    write: &(dyn Fn(Digest, Vec<u8>) -> Result<()> + Sync),
) -> Result<(Vec<FromUpstream>, u64)> {
    let got = Mutex::new(HashSet::<Digest>::with_capacity(wants.len()));
    let mut from: Vec<FromUpstream> = Vec::new();
    let mut reattaches = 0u64;
    let local_failed = AtomicBool::new(false);
    let n = upstreams.len() + 1;
    for i in 0..n {
        let rest: Vec<(Digest, u32)> = {
            let g = got.lock().unwrap_or_else(|p| p.into_inner());
            wants
                .iter()
                .filter(|w| !g.contains(&w.0))
                .copied()
                .collect()
        };
        if rest.is_empty() {
            break;
        }
        if i > 0 {
            reattaches += 1;
        }
        let label = upstreams
            .get(i)
            .map_or(master_label, |u| &u.label)
            .to_string();
        tracing::info!(upstream = %label, missing = rest.len(), reattach = i > 0, "attaching to an upstream");
        let (objs, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
        let on_object = |d: Digest, z: &[u8], data: Vec<u8>| -> Result<()> {
            let raw = data.len() as u32;
            if let Err(e) = write(d, data) {
                local_failed.store(true, Ordering::Release);
                return Err(e);
            }
            buffer.put(d, raw, z);
            got.lock().unwrap_or_else(|p| p.into_inner()).insert(d);
            objs.fetch_add(1, Ordering::Relaxed);
            bytes.fetch_add(z.len() as u64, Ordering::Relaxed);
            Ok(())
        };
        let mut slow = None;
        let res = match upstreams.get(i) {
            Some(u) => attach(u, i == 0, stall).and_then(|mut c| {
                let r = if min_rate > 0 {
                    let w = c.watch()?;
                    let (stop, stopped) = std::sync::mpsc::channel::<()>();
                    std::thread::scope(|sc| {
                        let w = &w;
                        let dog = sc.spawn(move || watch_rate(w, min_rate, &stopped));
                        let r = c.fetch_with(&rest, threads, &on_object);
                        drop(stop);
                        slow = dog.join().unwrap_or(None);
                        r
                    })
                } else {
                    c.fetch_with(&rest, threads, &on_object)
                };
                if r.is_ok() {
                    c.bye();
                }
                r
            }),
            None => master.fetch_with(&rest, threads, &on_object),
        };
        let mut f = FromUpstream {
            upstream: label.clone(),
            objects: objs.load(Ordering::Relaxed),
            bytes: bytes.load(Ordering::Relaxed),
            left: None,
        };
        match res {
            Ok(()) => from.push(f),
            Err(e) if local_failed.load(Ordering::Acquire) => {
                return Err(e.context("writing an object into the tree"))
            }
            Err(e) if i + 1 < n => {
                let why = slow.unwrap_or_else(|| {
                    if timed_out(&e) {
                        format!("stalled: nothing arrived for {} s", stall.as_secs_f64())
                    } else {
                        format!("failed: {e:#}")
                    }
                });
                tracing::warn!(upstream = %label, reason = %why, "leaving the upstream; reattaching to the next");
                f.left = Some(why);
                from.push(f);
            }
            Err(e) => return Err(e.context(format!("fetching objects from {label}"))),
        }
    }
    let g = got.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = wants.iter().find(|w| !g.contains(&w.0)) {
        bail!("object {} never arrived", w.0);
    }
    Ok((from, reattaches))
}

/// A session with an upstream relay. The first one may not accept yet (it is starting too):
/// refused connections are retried for a while; a later (healing) attach gets one try.
/// Whether an error comes from a socket read that timed out (the upstream sent nothing for the
/// stall deadline).
fn timed_out(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        })
    })
}

fn attach(u: &Upstream, first: bool, stall: Duration) -> Result<Client> {
    let deadline = Instant::now()
        + if first {
            FIRST_ATTACH_PATIENCE
        } else {
            Duration::ZERO
        };
    loop {
        match Client::connect_once(&u.addr, Duration::from_secs(3), stall, &u.trust) {
            Ok(c) => return Ok(c),
            Err(e) if e.retryable() && Instant::now() < deadline => {
                tracing::debug!(upstream = %u.label, error = %e, "upstream not ready; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(anyhow!(e)).with_context(|| format!("attaching to {}", u.label)),
        }
    }
}

/// A relaying deploy, as [`run`] makes it from the command line and the installer from its
/// plan (si-installer pulls onto filesystems it just made, with its own excludes).
pub struct Deploy<'a> {
    /// The master (HOST or HOST:PORT): manifests, signatures, and the last upstream.
    pub server: String,
    pub image: String,
    pub version: Option<u32>,
    /// The root to deploy onto: empty but for the version's own directories (mount points)
    /// and excluded paths.
    pub root: PathBuf,
    /// Where the installed record goes (default ROOT/var/lib/si).
    pub state_dir: Option<PathBuf>,
    /// Upstream relays, nearest first, `NAME@HOST:PORT` (`HOST:PORT` under `--insecure`).
    pub relay_from: Vec<String>,
    /// Where to serve successors (HOST:PORT).
    pub relay_listen: Option<String>,
    pub buffer_mib: usize,
    pub stall: Duration,
    /// Leave an upstream relay slower than this (bytes a second) as if it had stalled; 0: off.
    pub min_rate: u64,
    pub wait: Duration,
    pub linger: Duration,
    pub threads: usize,
    /// How the master is reached; its pin is the CA relays are checked against.
    pub master: Connector,
    /// The node's key and certificate, which its relay presents and it dials upstreams with
    /// (required unless `master` is `--insecure`).
    pub identity: Option<&'a NodeIdentity>,
    /// Entries of the version left out of the deploy (neither written nor relayed): the
    /// installer's own files and the filesystems' lost+found.
    pub excludes: Excludes,
    /// Receive from the master's multicast session first.
    pub multicast: bool,
}

/// Deploys the version onto the empty root, relaying as it goes; returns once deployed and no
/// successor asked for anything for `linger_secs`.
pub fn run(cfg: &RelayConfig) -> Result<RelaySummary> {
    let master = cfg.trust.connector()?;
    let identity = match master.pin() {
        Some(pin) => {
            let dir = cfg
                .trust
                .identity_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(si_agent::pull::DEFAULT_IDENTITY_DIR));
            Some(
                NodeIdentity::load(&dir, &pin)
                    .context("loading this node's identity (a relay needs one)")?,
            )
        }
        None => None,
    };
    if cfg.serve_installed {
        return serve_installed(cfg, identity.as_ref());
    }
    deploy(&Deploy {
        server: cfg.server.clone(),
        image: cfg.image.clone(),
        version: cfg.version,
        root: cfg.root.clone(),
        state_dir: cfg.state_dir.clone(),
        relay_from: cfg.relay_from.clone(),
        relay_listen: cfg.relay_listen.clone(),
        buffer_mib: cfg.buffer_mib,
        stall: Duration::from_secs(cfg.stall_secs),
        min_rate: cfg.min_rate_kbit.saturating_mul(125),
        wait: Duration::from_secs(cfg.wait_secs),
        linger: Duration::from_secs(cfg.linger_secs),
        threads: cfg.threads,
        master,
        identity: identity.as_ref(),
        excludes: Excludes::default(),
        multicast: cfg.multicast,
    })
}

/// A relay's listener: the image service's object path over [`RelayObjects`].
struct Listener {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Listener {
    /// Serves `objects` on `addr`: over TLS to peers with a node certificate of the pinned CA
    /// when the node has an `identity` (it has one unless `--insecure`), else over plain TCP
    /// to anyone.
    fn start(
        rt: &tokio::runtime::Runtime,
        addr: &str,
        identity: Option<&NodeIdentity>,
        objects: Arc<RelayObjects>,
    ) -> Result<Listener> {
        let transport = match identity {
            None => {
                tracing::warn!(
                    "--insecure: this relay serves objects over plain TCP to anyone who reaches it"
                );
                si_trust::Acceptor::Insecure
            }
            Some(id) => si_trust::Acceptor::tls(si_trust::tls::node_server_config(id)?),
        };
        let l =
            std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        l.set_nonblocking(true)
            .context("making the listener non-blocking")?;
        let sc = serve_config(transport, identity.is_none());
        let finder: Arc<dyn ObjectFinder> = objects;
        let _guard = rt.enter();
        let l = tokio::net::TcpListener::from_std(l).context("registering the listener")?;
        tracing::info!(listen = %addr, "relay listening");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(service::run_objects(l, finder, sc, async {
            let _ = stopped.await;
        }));
        Ok(Listener { stop, task })
    }

    /// Keeps serving until no one asked for anything for `linger`, then stops.
    fn linger(
        self,
        rt: &tokio::runtime::Runtime,
        objects: &RelayObjects,
        linger: Duration,
    ) -> Result<()> {
        while objects.idle() < linger {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.stop.send(());
        match rt.block_on(self.task) {
            Ok(r) => r.context("the relay listener"),
            Err(e) => bail!("the relay listener ended abnormally: {e}"),
        }
    }
}

/// `--serve-installed`: serves the version recorded as installed on the root, read back from
/// the tree, until no one asked for anything for `--linger-secs`.
fn serve_installed(cfg: &RelayConfig, identity: Option<&NodeIdentity>) -> Result<RelaySummary> {
    let start = Instant::now();
    let addr = cfg
        .relay_listen
        .as_deref()
        .ok_or_else(|| anyhow!("--serve-installed needs --relay-listen"))?;
    let sdir = cfg
        .state_dir
        .clone()
        .unwrap_or_else(|| cfg.root.join("var/lib/si"));
    let inst = si_agent::update::read_installed(&sdir).ok_or_else(|| {
        anyhow!(
            "nothing is recorded as installed in {} (no readable installed.toml)",
            sdir.display()
        )
    })?;
    if inst.image != cfg.image || cfg.version.is_some_and(|v| v != inst.version) {
        bail!(
            "{} has {}@{} installed, not {}@{}",
            cfg.root.display(),
            inst.image,
            inst.version,
            cfg.image,
            cfg.version.map_or("any".into(), |v| v.to_string())
        );
    }
    let m = si_agent::update::read_installed_manifest(&sdir).ok_or_else(|| {
        anyhow!(
            "the installed manifest in {} is missing or unreadable",
            sdir.display()
        )
    })?;
    let buffer = Arc::new(Buffer::new(0));
    buffer.on_disk(m.digests().map(|c| c.digest));
    buffer.close();
    let objects = Arc::new(RelayObjects::new(buffer, &cfg.root, Duration::ZERO));
    objects.set_manifest(&m);
    tracing::info!(image = %inst.image, version = inst.version, entries = m.entries.len(), "serving the installed version");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the relay's runtime")?;
    Listener::start(&rt, addr, identity, objects.clone())?.linger(
        &rt,
        &objects,
        Duration::from_secs(cfg.linger_secs),
    )?;
    let sum = RelaySummary {
        image: inst.image,
        version: inst.version,
        served_objects: objects.served_objects.load(Ordering::Relaxed),
        served_bytes: objects.served_bytes.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
        ..Default::default()
    };
    tracing::info!(
        served_objects = sum.served_objects,
        served_bytes = sum.served_bytes,
        seconds = sum.seconds,
        "serving the installed version done"
    );
    Ok(sum)
}

/// The version without its excluded entries (and what lies below them), nor hard links to
/// them.
fn without_excluded(m: &Manifest, ex: &Excludes) -> Manifest {
    let kept = |p: &[u8]| p.is_empty() || !ex.is_excluded(p);
    Manifest {
        entries: m
            .entries
            .iter()
            .filter(|e| {
                kept(&e.path)
                    && match &e.kind {
                        Kind::Hardlink { target } => kept(target),
                        _ => true,
                    }
            })
            .cloned()
            .collect(),
    }
}

/// [`run`] with everything given: the installer's entry point.
pub fn deploy(cfg: &Deploy<'_>) -> Result<RelaySummary> {
    let start = Instant::now();
    let master_trust = cfg.master.clone();
    let identity = match master_trust.pin() {
        Some(pin) => Some((
            pin,
            cfg.identity.ok_or_else(|| {
                anyhow!("a relay needs the node's identity (key and certificate)")
            })?,
        )),
        None => None,
    };
    let upstreams = cfg
        .relay_from
        .iter()
        .map(|s| upstream(s, identity))
        .collect::<Result<Vec<_>>>()?;
    let buffer = Arc::new(Buffer::new(cfg.buffer_mib.saturating_mul(1 << 20)));
    let objects = Arc::new(RelayObjects::new(buffer.clone(), &cfg.root, cfg.wait));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the relay's runtime")?;
    let server = match &cfg.relay_listen {
        Some(addr) => Some(Listener::start(
            &rt,
            addr,
            identity.map(|(_, id)| id),
            objects.clone(),
        )?),
        None => None,
    };
    let deployed = (|| -> Result<RelaySummary> {
        let mut master = Client::connect(&cfg.server, Duration::from_secs(10), &master_trust)?;
        let (info, full, mbytes) = master
            .manifest(&cfg.image, cfg.version)
            .with_context(|| format!("fetching the manifest of {}", cfg.image))?;
        let m = without_excluded(&full, &cfg.excludes);
        objects.set_manifest(&m);
        let ix = index(&m);
        buffer.expect(ix.keys().copied());
        let mut from = Vec::new();
        let mut reattaches = 0;
        let mut mc = None;
        let (n, bytes) =
            si_agent::update::deploy_fresh_with(&m, &cfg.root, &mut |wants, write| {
                let mut rest = wants.to_vec();
                if cfg.multicast {
                    let on_object = |d: Digest, z: &[u8], data: Vec<u8>| -> Result<()> {
                        let raw = data.len() as u32;
                        write(d, data)?;
                        buffer.put(d, raw, z);
                        Ok(())
                    };
                    match multicast::receive(
                        &cfg.server,
                        &master_trust,
                        &cfg.image,
                        info.version,
                        wants,
                        cfg.stall,
                        &on_object,
                    ) {
                        Ok((sum, missing)) => {
                            from.push(FromUpstream {
                                upstream: format!("multicast {}", sum.group),
                                objects: sum.objects,
                                bytes: sum.bytes,
                                left: (!missing.is_empty()).then(|| {
                                    format!(
                                        "{} objects did not arrive ({} blocks undecoded)",
                                        missing.len(),
                                        sum.abandoned
                                    )
                                }),
                            });
                            rest = missing;
                            mc = Some(sum);
                        }
                        // A node that cannot join (no multicast on the master, no route for
                        // the group) fetches everything the usual way.
                        Err(e) => {
                            tracing::warn!(
                                error = format!("{e:#}"),
                                "multicast: not received; fetching over TCP"
                            )
                        }
                    }
                    // The master's session may have idled out meanwhile.
                    master = Client::connect(&cfg.server, Duration::from_secs(10), &master_trust)?;
                }
                let (f, r) = fetch_chain(
                    &upstreams,
                    &mut master,
                    &format!("master {}", cfg.server),
                    &rest,
                    cfg.threads,
                    cfg.stall,
                    cfg.min_rate,
                    &buffer,
                    write,
                )?;
                from.extend(f);
                reattaches = r;
                Ok(())
            })?;
        let sdir = cfg
            .state_dir
            .clone()
            .unwrap_or_else(|| cfg.root.join("var/lib/si"));
        // The whole version is recorded, as an update records it: what a later update plans
        // against (it keeps its own excludes).
        si_agent::update::record_installed(&sdir, &cfg.server, &info, &full, &mbytes)?;
        master.bye();
        Ok(RelaySummary {
            image: info.image,
            version: info.version,
            objects: n,
            bytes,
            from,
            reattaches,
            multicast: mc,
            ..Default::default()
        })
    })();
    buffer.close();
    let mut sum = deployed?;
    if let Some(l) = server {
        l.linger(&rt, &objects, cfg.linger)?;
    }
    sum.served_objects = objects.served_objects.load(Ordering::Relaxed);
    sum.served_bytes = objects.served_bytes.load(Ordering::Relaxed);
    sum.seconds = start.elapsed().as_secs_f64();
    for f in &sum.from {
        tracing::info!(upstream = %f.upstream, objects = f.objects, bytes = f.bytes, "objects from an upstream");
    }
    tracing::info!(
        image = %sum.image,
        version = sum.version,
        objects = sum.objects,
        reattaches = sum.reattaches,
        from = ?sum.from,
        served_objects = sum.served_objects,
        served_bytes = sum.served_bytes,
        seconds = sum.seconds,
        "relayed deploy done"
    );
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use si_proto::frame::{read_frame_async, recv_msg_async, write_msg_async, Frame, FrameError};
    use si_proto::handshake::{self, Credentials};
    use si_proto::manifest::Entry;
    use si_proto::msg::{ErrorKind, Msg, Role};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn entry(path: &[u8], kind: Kind) -> Entry {
        Entry {
            path: path.to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: vec![],
        }
    }

    /// A relay listener over plain TCP whose gate is `insecure` or not, holding `objects`.
    async fn listener(
        objects: Arc<RelayObjects>,
        insecure: bool,
        deadline: Duration,
    ) -> SocketAddr {
        let mut sc = serve_config(si_trust::Acceptor::Insecure, insecure);
        sc.message_deadline = deadline;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(service::run_objects(l, objects, sc, std::future::pending()));
        addr
    }

    fn one_object() -> (Arc<RelayObjects>, Digest) {
        let b = Arc::new(Buffer::new(1 << 20));
        let data = b"relayed object".to_vec();
        let d = Digest::of(&data);
        b.expect([d]);
        b.put(
            d,
            data.len() as u32,
            &si_tree::codec::compress(&data).unwrap(),
        );
        let o = Arc::new(RelayObjects::new(
            b,
            Path::new("/nonexistent"),
            Duration::from_millis(100),
        ));
        (o, d)
    }

    async fn want(addr: SocketAddr, d: Digest) -> Result<Msg, FrameError> {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let creds = Credentials {
            client: "n2".into(),
            token: String::new(),
        };
        handshake::connect_async(&mut c, Role::Deploy, &creds)
            .await
            .unwrap();
        write_msg_async(&mut c, &Msg::Want(vec![d])).await.unwrap();
        c.flush().await.unwrap();
        let m = recv_msg_async(&mut c).await?;
        if matches!(m, Msg::Blob { .. }) {
            let Some(Frame::Data(z)) = read_frame_async(&mut c).await.unwrap() else {
                panic!("a blob without data")
            };
            assert!(si_tree::codec::verify(&d, 14, &z).is_ok());
        }
        Ok(m)
    }

    /// An object request from a peer without a certificate is refused with a Refused error;
    /// the same request where the gate lets everyone in (`--insecure`) gets the object.
    #[tokio::test]
    async fn an_unauthenticated_peer_is_refused() {
        let (o, d) = one_object();
        let addr = listener(o.clone(), false, Duration::from_secs(5)).await;
        let m = want(addr, d).await;
        assert!(
            matches!(
                m,
                Err(FrameError::Peer {
                    kind: ErrorKind::Refused,
                    ..
                })
            ),
            "{m:?}"
        );
        let addr = listener(o.clone(), true, Duration::from_secs(5)).await;
        let m = want(addr, d).await;
        assert!(
            matches!(m, Ok(Msg::Blob { digest, raw_len: 14 }) if digest == d),
            "{m:?}"
        );
        assert_eq!(o.served_objects.load(Ordering::Relaxed), 1);
    }

    /// A peer that connects and says nothing is dropped once the message deadline passes.
    #[tokio::test]
    async fn a_silent_peer_is_dropped_after_the_deadline() {
        let (o, _) = one_object();
        let addr = listener(o, true, Duration::from_millis(300)).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 64];
        let got = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("the relay kept a silent peer for 10 s");
        assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
    }

    /// Manifests never come from a relay, whoever asks.
    #[tokio::test]
    async fn a_relay_serves_no_manifests() {
        let (o, _) = one_object();
        let addr = listener(o, true, Duration::from_secs(5)).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let creds = Credentials {
            client: "n2".into(),
            token: String::new(),
        };
        handshake::connect_async(&mut c, Role::Deploy, &creds)
            .await
            .unwrap();
        let ask = Msg::GetManifest {
            image: "img".into(),
            version: None,
        };
        write_msg_async(&mut c, &ask).await.unwrap();
        c.flush().await.unwrap();
        let m = recv_msg_async(&mut c).await;
        assert!(
            matches!(
                m,
                Err(FrameError::Peer {
                    kind: ErrorKind::NotFound,
                    ..
                })
            ),
            "{m:?}"
        );
    }

    /// An object evicted from memory is read back from the tree, checked and compressed
    /// again; one whose bytes in the tree changed is refused, not served.
    #[test]
    fn falls_back_to_the_tree() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        let a = vec![1u8; 3000];
        let b: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let mut file = a.clone();
        file.extend_from_slice(&b);
        std::fs::write(t.path().join("d/f"), &file).unwrap();
        let (da, db) = (Digest::of(&a), Digest::of(&b));
        let m = Manifest {
            entries: vec![
                entry(b"", Kind::Dir),
                entry(b"d", Kind::Dir),
                entry(
                    b"d/f",
                    Kind::File {
                        size: 6000,
                        chunks: vec![
                            si_proto::Chunk {
                                offset: 0,
                                len: 3000,
                                digest: da,
                            },
                            si_proto::Chunk {
                                offset: 3000,
                                len: 3000,
                                digest: db,
                            },
                        ],
                    },
                ),
            ],
        };
        // Room for one compressed object only: the first is evicted by the second.
        let za = si_tree::codec::compress(&a).unwrap();
        let zb = si_tree::codec::compress(&b).unwrap();
        let buf = Arc::new(Buffer::new(za.len().max(zb.len())));
        buf.expect([da, db]);
        let o = RelayObjects::new(buf.clone(), t.path(), Duration::ZERO);
        o.set_manifest(&m);
        buf.put(da, 3000, &za);
        buf.put(db, 3000, &zb);
        assert_eq!(buf.get(&da, Duration::ZERO), Found::Disk);
        let (raw, z) = o.object(&da).unwrap();
        assert_eq!(raw, 3000);
        assert_eq!(si_tree::codec::verify(&da, raw, &z).unwrap(), a);
        let (_, z) = o.object(&db).unwrap();
        assert_eq!(z, zb);
        // The tree changed under the relay: refused.
        std::fs::write(t.path().join("d/f"), vec![9u8; 6000]).unwrap();
        assert!(o.object(&da).is_err());
        // Not in this version at all: refused at once.
        assert!(o.object(&Digest::of(b"other")).is_err());
    }

    /// The installer's excludes leave its own files and the filesystems' lost+found out of a
    /// relayed deploy, with hard links to them; the rest is kept in order.
    #[test]
    fn excluded_entries_are_left_out() {
        let file = Kind::File {
            size: 0,
            chunks: vec![],
        };
        let m = Manifest {
            entries: vec![
                entry(b"", Kind::Dir),
                entry(b"lost+found", Kind::Dir),
                entry(b"lost+found/x", file.clone()),
                entry(b"var", Kind::Dir),
                entry(b"var/log", Kind::Dir),
                entry(b"var/log/app.log", file.clone()),
                entry(b"var/log/si-install.log", file.clone()),
                entry(
                    b"var/log/z-link",
                    Kind::Hardlink {
                        target: b"var/log/si-install.log".to_vec(),
                    },
                ),
                entry(
                    b"var/log/zz-link",
                    Kind::Hardlink {
                        target: b"var/log/app.log".to_vec(),
                    },
                ),
            ],
        };
        let ex = Excludes::new(["/lost+found", "/var/log/si-install.log"]).unwrap();
        let kept = without_excluded(&m, &ex);
        let kept: Vec<&[u8]> = kept.entries.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(
            kept,
            [
                &b""[..],
                b"var",
                b"var/log",
                b"var/log/app.log",
                b"var/log/zz-link"
            ]
        );
        assert_eq!(without_excluded(&m, &Excludes::default()), m);
    }

    /// A piece corrupted in a relay's buffer (the bytes it holds no longer decompress to the
    /// digest) is caught by the next node before anything is written, and that node fetches
    /// it, and whatever else it still lacks, from the next upstream (the master here); every
    /// object ends written once with its right bytes.
    #[test]
    fn a_piece_corrupted_in_a_relays_buffer_is_caught_and_refetched() {
        let objs: Vec<Vec<u8>> = (0..4u8)
            .map(|k| (0..5000u32).map(|i| (i * (k as u32 + 3)) as u8).collect())
            .collect();
        let ds: Vec<Digest> = objs.iter().map(|o| Digest::of(o)).collect();
        let holding = |corrupt: Option<usize>| {
            let b = Arc::new(Buffer::new(1 << 20));
            b.expect(ds.iter().copied());
            for (i, o) in objs.iter().enumerate() {
                let mut z = si_tree::codec::compress(o).unwrap();
                if corrupt == Some(i) {
                    // A well-formed object of other bytes: only the digest check can tell.
                    z = si_tree::codec::compress(&vec![0x5a; o.len()]).unwrap();
                }
                b.put(ds[i], o.len() as u32, &z);
            }
            Arc::new(RelayObjects::new(
                b,
                Path::new("/nonexistent"),
                Duration::from_millis(100),
            ))
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let bad = holding(Some(2));
        let good = holding(None);
        let bad_addr = rt.block_on(listener(bad.clone(), true, Duration::from_secs(5)));
        let good_addr = rt.block_on(listener(good.clone(), true, Duration::from_secs(5)));
        let mut master = Client::connect_once(
            &good_addr,
            Duration::from_secs(3),
            Duration::from_secs(5),
            &Connector::Insecure,
        )
        .unwrap();
        let upstreams = [Upstream {
            label: "n1".into(),
            addr: bad_addr,
            trust: Connector::Insecure,
        }];
        let wants: Vec<(Digest, u32)> = ds.iter().map(|d| (*d, 5000)).collect();
        let written = Mutex::new(Vec::<(Digest, Vec<u8>)>::new());
        let mine = Buffer::new(1 << 20);
        let (from, reattaches) = fetch_chain(
            &upstreams,
            &mut master,
            "master",
            &wants,
            1,
            Duration::from_secs(5),
            0,
            &mine,
            &|d, data| {
                written.lock().unwrap().push((d, data));
                Ok(())
            },
        )
        .unwrap();
        let mut written = written.into_inner().unwrap();
        written.sort_by_key(|(d, _)| ds.iter().position(|x| x == d));
        let want: Vec<(Digest, Vec<u8>)> = ds.iter().copied().zip(objs.iter().cloned()).collect();
        assert_eq!(
            written, want,
            "every object written once, with its own bytes"
        );
        assert_eq!(reattaches, 1);
        assert_eq!(from.len(), 2, "{from:?}");
        assert_eq!((from[0].upstream.as_str(), from[0].objects), ("n1", 2));
        assert_eq!((from[1].upstream.as_str(), from[1].objects), ("master", 2));
        // The master served exactly the corrupted piece and the one after it.
        assert_eq!(good.served_objects.load(Ordering::Relaxed), 2);
    }

    /// A relay waiting for an object from its own upstream says so (`Waiting`) while it
    /// waits: a successor whose stall limit is shorter than the wait gets the object when it
    /// arrives instead of leaving a live upstream. The object here arrives 2.5 s after the ask,
    /// the successor's stall limit is 1 s.
    #[test]
    fn a_waiting_relay_is_not_taken_for_a_stalled_one() {
        let data = b"late object".to_vec();
        let d = Digest::of(&data);
        let b = Arc::new(Buffer::new(1 << 20));
        b.expect([d]);
        let o = Arc::new(RelayObjects::new(
            b.clone(),
            Path::new("/nonexistent"),
            Duration::from_secs(20),
        ));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let addr = rt.block_on(listener(o, true, Duration::from_secs(5)));
        let mut c = Client::connect_once(
            &addr,
            Duration::from_secs(3),
            Duration::from_secs(1),
            &Connector::Insecure,
        )
        .unwrap();
        let z = si_tree::codec::compress(&data).unwrap();
        let late = std::thread::spawn(move || {
            // The upstream's delivery, late: this delay is what the test is about.
            std::thread::sleep(Duration::from_millis(2500));
            b.put(d, 11, &z);
        });
        let got = Mutex::new(None);
        let t = Instant::now();
        c.fetch(&[(d, 11)], 1, &|dd, bytes| {
            *got.lock().unwrap() = Some((dd, bytes));
            Ok(())
        })
        .expect("the successor gave up on a relay that was waiting");
        late.join().unwrap();
        assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(got.into_inner().unwrap(), Some((d, data)));
    }
}
