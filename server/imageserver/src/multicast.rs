//! The master's multicast sessions: one LAN segment receives a version at once.
//!
//! - A node on its (authenticated) Deploy session sends `McastJoin`; the first join of an image
//!   version opens a session: a fresh key and session number, a group and the time it starts.
//!   The node joins the group and says `McastReady`.
//! - The session starts once `--multicast-min-receivers` nodes are ready, or
//!   `--multicast-gather-secs` after its first join. It sends every object of the version
//!   once, in manifest order, in blocks with RaptorQ repair symbols ([`si_mcast`]), paced at
//!   `--multicast-rate-mbit`, on the interface of `--multicast-iface` only, one hop.
//! - A node that joins while a session sends receives the rest of it. Whatever a node did not
//!   decode (it joined late, lost too much) it fetches over TCP with `Want`, as ever.
//! - Who may join: a caller the gate lets read the image and fetch objects (an enrolled node
//!   under TLS); the key goes only to such a caller, over TLS, and is never logged.

use crate::service::ObjectFinder;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use si_proto::msg::{Msg, SessionKey};
use si_proto::Digest;
use si_store::Store;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

fn default_rate() -> u64 {
    400
}
fn default_repair() -> u32 {
    5
}
fn default_gather() -> u64 {
    5
}

/// si-server's multicast settings (off unless a group is given).
#[derive(Clone, Debug, Default, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MulticastConfig {
    /// Offer multicast sessions on this group (IP:PORT, an IPv4 multicast address; for
    /// example 239.213.0.1:7812). Off when unset.
    #[arg(long)]
    #[serde(default)]
    pub multicast_group: Option<SocketAddrV4>,
    /// The master's address on the nodes' segment: datagrams go out on its interface only
    /// (required with a group; never a wildcard).
    #[arg(long)]
    #[serde(default)]
    pub multicast_iface: Option<Ipv4Addr>,
    /// The sending rate, datagrams and headers included.
    #[arg(long, default_value_t = default_rate())]
    #[serde(default = "default_rate")]
    pub multicast_rate_mbit: u64,
    /// Repair symbols sent with each block, in percent of its source symbols (at least one):
    /// the loss a receiver rides through without falling back to TCP.
    #[arg(long, default_value_t = default_repair())]
    #[serde(default = "default_repair")]
    pub multicast_repair_percent: u32,
    /// A session starts this long after its first node joined, ready or not.
    #[arg(long, default_value_t = default_gather())]
    #[serde(default = "default_gather")]
    pub multicast_gather_secs: u64,
    /// A session starts as soon as this many nodes are ready (0: after the gather time).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub multicast_min_receivers: usize,
}

struct Session {
    id: u64,
    key: Vec<u8>,
    version: u32,
    ready: AtomicUsize,
    go: tokio::sync::Notify,
    starts: Instant,
}

/// The sessions of one master.
pub struct Multicast {
    cfg: MulticastConfig,
    group: SocketAddrV4,
    iface: Ipv4Addr,
    store: Arc<Store>,
    sessions: Mutex<HashMap<(String, u32), Arc<Session>>>,
}

impl std::fmt::Debug for Multicast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Multicast({} on {})", self.group, self.iface)
    }
}

/// What one session sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    pub objects: u64,
    pub stats: si_mcast::SendStats,
}

impl Multicast {
    /// The sessions `cfg` describes, or None when multicast is off.
    pub fn new(cfg: &MulticastConfig, store: Arc<Store>) -> Result<Option<Arc<Multicast>>> {
        let Some(group) = cfg.multicast_group else {
            return Ok(None);
        };
        if !group.ip().is_multicast() {
            bail!("--multicast-group {group}: not an IPv4 multicast address");
        }
        let iface = match cfg.multicast_iface {
            Some(a) if !a.is_unspecified() && !a.is_multicast() => a,
            Some(a) => bail!("--multicast-iface {a}: give the master's address on the segment"),
            None => bail!("--multicast-group needs --multicast-iface (the master's address on the nodes' segment)"),
        };
        if cfg.multicast_rate_mbit == 0 {
            bail!("--multicast-rate-mbit must be above 0");
        }
        // The sender's socket is checked now, not at the first session.
        si_mcast::sender_socket(iface, 1).context("the multicast sender")?;
        tracing::info!(%group, %iface, rate_mbit = cfg.multicast_rate_mbit, repair_percent = cfg.multicast_repair_percent, "multicast sessions offered");
        Ok(Some(Arc::new(Multicast {
            cfg: cfg.clone(),
            group,
            iface,
            store,
            sessions: Mutex::new(HashMap::new()),
        })))
    }

    /// A node asks to receive `image` (`version`, default the newest): the session it joins,
    /// opened if none is gathering or sending. Runs inside the service's runtime.
    pub fn join(self: &Arc<Self>, image: &str, version: Option<u32>) -> Result<Msg> {
        let v = self.store.resolve(image, version)?;
        let mut map = self.sessions.lock().expect("sessions lock");
        let s = match map.get(&(image.to_string(), v)) {
            Some(s) => s.clone(),
            None => {
                let (id, key) = si_mcast::new_session()?;
                let s = Arc::new(Session {
                    id,
                    key,
                    version: v,
                    ready: AtomicUsize::new(0),
                    go: tokio::sync::Notify::new(),
                    starts: Instant::now() + Duration::from_secs(self.cfg.multicast_gather_secs),
                });
                map.insert((image.to_string(), v), s.clone());
                let (me, s2, img) = (self.clone(), s.clone(), image.to_string());
                tokio::spawn(async move { me.run(img, s2).await });
                tracing::info!(
                    image,
                    version = v,
                    session = format!("{id:016x}"),
                    gather_secs = self.cfg.multicast_gather_secs,
                    "multicast session opened"
                );
                s
            }
        };
        Ok(Msg::McastSession {
            group: self.group.to_string(),
            session: s.id,
            key: SessionKey(s.key.clone()),
            version: s.version,
            starts_in_ms: s
                .starts
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
        })
    }

    /// A node joined session `id`'s group.
    pub fn ready(&self, id: u64) -> Result<()> {
        let map = self.sessions.lock().expect("sessions lock");
        let Some(s) = map.values().find(|s| s.id == id) else {
            bail!("no multicast session {id:016x} (it ended)");
        };
        let n = s.ready.fetch_add(1, Ordering::AcqRel) + 1;
        if self.cfg.multicast_min_receivers > 0 && n >= self.cfg.multicast_min_receivers {
            s.go.notify_one();
        }
        Ok(())
    }

    async fn run(self: Arc<Self>, image: String, s: Arc<Session>) {
        tokio::select! {
            _ = s.go.notified() => {}
            _ = tokio::time::sleep_until(s.starts) => {}
        }
        let ready = s.ready.load(Ordering::Acquire);
        tracing::info!(
            image,
            version = s.version,
            session = format!("{:016x}", s.id),
            ready,
            "multicast session starts"
        );
        let (me, s2, img) = (self.clone(), s.clone(), image.clone());
        let t = std::time::Instant::now();
        let r = tokio::task::spawn_blocking(move || me.send(&img, &s2)).await;
        match r {
            Ok(Ok(sent)) => tracing::info!(
                image,
                version = s.version,
                session = format!("{:016x}", s.id),
                receivers = s.ready.load(Ordering::Acquire),
                objects = sent.objects,
                blocks = sent.stats.blocks,
                datagrams = sent.stats.datagrams,
                repair = sent.stats.repair,
                bytes = sent.stats.bytes,
                seconds = t.elapsed().as_secs_f64(),
                "multicast session sent"
            ),
            Ok(Err(e)) => {
                tracing::error!(
                    image,
                    version = s.version,
                    error = format!("{e:#}"),
                    "multicast session failed: its nodes fetch over TCP"
                )
            }
            Err(e) => tracing::error!(image, error = %e, "multicast sender"),
        }
        self.sessions
            .lock()
            .expect("sessions lock")
            .remove(&(image, s.version));
    }

    fn send(&self, image: &str, s: &Session) -> Result<Sent> {
        let m = self.store.manifest(image, s.version)?;
        let sock = si_mcast::sender_socket(self.iface, 1)?;
        let sealer = si_mcast::Sealer::new(s.id, &s.key)?;
        let mut snd = si_mcast::Sender::new(
            &sock,
            self.group.into(),
            &sealer,
            si_mcast::Pace {
                rate: self.cfg.multicast_rate_mbit.saturating_mul(125_000),
                repair_percent: self.cfg.multicast_repair_percent,
            },
        );
        let mut seen: HashSet<Digest> = HashSet::new();
        let mut block = Vec::with_capacity(si_mcast::BLOCK_TARGET + (2 << 20));
        let mut objects = 0;
        for d in m.digests().map(|c| c.digest) {
            if !seen.insert(d) {
                continue;
            }
            let (raw_len, z) = self.store.object(&d)?;
            if !block.is_empty() && block.len() + z.len() + 64 > si_mcast::MAX_BLOCK as usize {
                snd.block(&block)?;
                block.clear();
            }
            si_mcast::push_piece(&mut block, &d, raw_len, &z);
            objects += 1;
            if block.len() >= si_mcast::BLOCK_TARGET {
                snd.block(&block)?;
                block.clear();
            }
        }
        if !block.is_empty() {
            snd.block(&block)?;
        }
        Ok(Sent {
            objects,
            stats: snd.finish()?,
        })
    }
}
