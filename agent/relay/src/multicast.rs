//! Receiving a version by multicast before anything is fetched over TCP.
//!
//! The node joins the master's session on its Deploy session (TLS: the key comes only that
//! way), joins the group on the interface facing the master, and says it is ready. Each block
//! that decodes is split into its objects; an object the node wants is checked against its
//! digest (as from any relay) and written. What did not arrive is returned, for the TCP path.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use si_agent::pull::Client;
use si_proto::Digest;
use si_trust::Connector;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// What multicast brought a node.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MulticastSummary {
    pub group: String,
    /// Objects written from decoded blocks, and their compressed bytes.
    pub objects: u64,
    pub bytes: u64,
    /// Objects still missing afterwards (fetched over TCP).
    pub missing: u64,
    pub datagrams: u64,
    /// Datagrams not used (another session, forged, a block already decoded).
    pub ignored: u64,
    pub blocks: u32,
    /// Blocks given up undecoded (the node joined late, or lost more than the repair covers).
    pub abandoned: u32,
    /// Blocks the sender said it sent (0 if its end was not heard).
    pub sent: u32,
    /// Objects in decoded blocks that did not match their digest (refused).
    pub bad: u64,
    pub seconds: f64,
}

/// Receives `version` of `image` from the master's multicast session; `write` gets each wanted
/// object (digest, compressed bytes as they arrived, content) once verified. Returns what came
/// and what is still missing. `idle`: how long a silent group is waited for once the session
/// started.
pub fn receive(
    server: &str,
    trust: &Connector,
    image: &str,
    version: u32,
    wants: &[(Digest, u32)],
    idle: Duration,
    write: &si_agent::pull::Arrived<'_>,
) -> Result<(MulticastSummary, Vec<(Digest, u32)>)> {
    let t = Instant::now();
    let mut c = Client::connect(server, Duration::from_secs(10), trust)?;
    let s = c.mcast_join(image, Some(version))?;
    anyhow::ensure!(
        s.version == version,
        "the master's multicast session sends version {}, not {version}",
        s.version
    );
    let iface = match c.local_addr()?.ip() {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => {
            anyhow::bail!("multicast is IPv4 only; this node reaches the master as {a}")
        }
    };
    let sock = si_mcast::receiver_socket(s.group, iface)?;
    c.mcast_ready(s.session)?;
    c.bye();
    tracing::info!(group = %s.group, %iface, session = format!("{:016x}", s.session), starts_in = ?s.starts_in, objects = wants.len(), "joined a multicast session");
    let want: HashMap<Digest, u32> = wants.iter().copied().collect();
    let mut got: HashSet<Digest> = HashSet::with_capacity(wants.len());
    let mut sum = MulticastSummary {
        group: s.group.to_string(),
        ..Default::default()
    };
    let mut rx = si_mcast::Receiver::new(si_mcast::Sealer::new(s.session, &s.key)?);
    // The first datagram is waited for until the session starts, and a stall past that.
    let first = Instant::now() + s.starts_in + idle;
    rx.run(&sock, first, idle, |block, data| {
        let ps = match si_mcast::pieces(&data) {
            Ok(ps) => ps,
            Err(e) => {
                tracing::warn!(block, error = format!("{e:#}"), "a multicast block that does not parse: refused");
                sum.bad += 1;
                return Ok(());
            }
        };
        for p in ps {
            if want.get(&p.digest) != Some(&p.raw_len) || got.contains(&p.digest) {
                continue;
            }
            match si_tree::codec::verify(&p.digest, p.raw_len, p.z) {
                Ok(raw) => {
                    write(p.digest, p.z, raw)
                        .with_context(|| format!("writing object {}", p.digest))?;
                    got.insert(p.digest);
                    sum.objects += 1;
                    sum.bytes += p.z.len() as u64;
                }
                Err(e) => {
                    tracing::warn!(digest = %p.digest, error = format!("{e:#}"), "a multicast object that does not match its digest: refused");
                    sum.bad += 1;
                }
            }
        }
        Ok(())
    })?;
    let missing: Vec<(Digest, u32)> = wants
        .iter()
        .filter(|w| !got.contains(&w.0))
        .copied()
        .collect();
    let st = rx.stats;
    sum.missing = missing.len() as u64;
    sum.datagrams = st.datagrams;
    sum.ignored = st.ignored;
    sum.blocks = st.blocks;
    sum.abandoned = st.abandoned;
    sum.sent = st.sent;
    sum.seconds = t.elapsed().as_secs_f64();
    tracing::info!(
        objects = sum.objects,
        bytes = sum.bytes,
        missing = sum.missing,
        blocks = sum.blocks,
        abandoned = sum.abandoned,
        datagrams = sum.datagrams,
        ignored = sum.ignored,
        bad = sum.bad,
        seconds = sum.seconds,
        "multicast received"
    );
    Ok((sum, missing))
}
