//! Read-only TFTP server: RFC 1350 with the option extension (RFC 2347) and the blksize
//! (RFC 2348), timeout and tsize (RFC 2349) and windowsize (RFC 7440) options.
//!
//! One tokio task per transfer, each on its own socket (its own TID), at most
//! [`TftpConfig::max_transfers`] at once and [`TftpConfig::per_source`] per client address; a
//! client's timeout is granted up to [`TftpConfig::max_timeout`], and a transfer's whole
//! lifetime is bounded by its size. Files come from [`crate::bootcfg::Generated`]
//! first (per-node boot configurations), then from beneath the root (see [`root`]).

pub mod packet;
pub mod root;
mod transfer;

use crate::bootcfg::Generated;
use anyhow::{Context, Result};
use packet::{ErrorCode, Packet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

/// Settings of a TFTP server.
#[derive(Debug, Clone)]
pub struct TftpConfig {
    /// Directory served; canonicalised by [`serve`].
    pub root: PathBuf,
    /// Most transfers at once; further requests get "server busy".
    pub max_transfers: usize,
    /// Largest block size granted (RFC 2348 allows up to 65464).
    pub max_blksize: u16,
    /// Largest window granted (RFC 7440).
    pub max_windowsize: u16,
    /// Retransmission timeout unless the client asks for one.
    pub timeout: Duration,
    /// Longest timeout a client may ask for (RFC 2349 allows 255 s); a longer ask is not
    /// granted (the option is left out of the OACK and [`TftpConfig::timeout`] applies), so a
    /// request that is never acknowledged holds its slot at most `max_timeout × (retries + 1)`.
    pub max_timeout: Duration,
    /// Retransmissions of one window before the transfer is abandoned.
    pub retries: u32,
    /// Transfers one source address may run at once; the one past it gets "server busy".
    pub per_source: usize,
    /// Slowest transfer kept: a transfer may last `30 s + size / min_rate` in all, however
    /// its client paces its ACKs.
    pub min_rate: u64,
    /// Largest file sent in netascii mode (converted in memory).
    pub max_netascii: u64,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            root: PathBuf::from("/srv/si/tftp"),
            max_transfers: 256,
            max_blksize: 65464,
            max_windowsize: 64,
            timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(5),
            retries: 5,
            per_source: 8,
            min_rate: 64 << 10,
            max_netascii: 16 << 20,
        }
    }
}

/// What a request's options negotiate to under `cfg` for a file of `size` bytes: block size,
/// window size and retransmission timeout (for tests and the fuzz target).
pub fn negotiated(
    cfg: &TftpConfig,
    options: &[(String, String)],
    size: u64,
) -> (usize, u64, Duration) {
    let n = transfer::negotiate(cfg, options, size);
    (n.blksize, n.windowsize, n.timeout)
}

/// Runs the server on `socket` until `shutdown` completes.
pub async fn serve(
    socket: UdpSocket,
    mut cfg: TftpConfig,
    generated: Generated,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    cfg.root = std::fs::canonicalize(&cfg.root)
        .with_context(|| format!("opening TFTP root {}", cfg.root.display()))?;
    let local = socket.local_addr().context("reading TFTP socket address")?;
    tracing::info!(%local, root = %cfg.root.display(), "TFTP server listening");
    let cfg = Arc::new(cfg);
    let permits = Arc::new(Semaphore::new(cfg.max_transfers));
    let sources = si_proto::persource::PerSource::new(cfg.per_source);
    let mut buf = vec![0u8; packet::MAX_REQUEST + 1];
    let mut out = Vec::with_capacity(256);
    tokio::pin!(shutdown);
    loop {
        let (n, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "TFTP receive error");
                    continue;
                }
            },
        };
        let reply = match packet::parse(&buf[..n]) {
            Ok(Packet::Request(req)) if !req.write => match (
                sources.try_take(peer.ip()),
                permits.clone().try_acquire_owned(),
            ) {
                (Some(slot), Ok(permit)) => {
                    tracing::info!(%peer, file = req.filename, options = ?req.options, "TFTP read request");
                    let cfg = cfg.clone();
                    let generated = generated.clone();
                    tokio::task::spawn_blocking(move || {
                        let _permit = (permit, slot);
                        let file = req.filename.clone();
                        match transfer::run(&cfg, &generated, local.ip(), peer, req) {
                            Ok(()) => tracing::debug!(%peer, file, "TFTP transfer done"),
                            Err(e) => {
                                tracing::info!(%peer, file, error = format!("{e:#}"), "TFTP transfer failed")
                            }
                        }
                    });
                    None
                }
                (slot, _) => {
                    if slot.is_none() {
                        tracing::info!(%peer, cap = cfg.per_source, "TFTP source holds its cap of transfers");
                    }
                    Some((ErrorCode::NotDefined, "server busy".to_string()))
                }
            },
            Ok(Packet::Request(_)) => Some((ErrorCode::AccessViolation, "read-only server".into())),
            // Stray packets for finished transfers: say nothing.
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "malformed TFTP request");
                Some((ErrorCode::IllegalOperation, e.to_string()))
            }
        };
        if let Some((code, msg)) = reply {
            packet::error(&mut out, code, &msg);
            if let Err(e) = socket.send_to(&out, peer).await {
                tracing::debug!(%peer, error = %e, "sending TFTP error");
            }
        }
    }
}

#[cfg(test)]
mod tests;
