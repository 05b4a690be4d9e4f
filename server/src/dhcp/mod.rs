//! The embedded DHCP server (RFC 2131/2132) with PXE (RFC 4578), iPXE chain loading, UEFI HTTP
//! boot and a ProxyDHCP mode, backed by the [inventory](crate::inventory).
//!
//! - [`config`]: [`DhcpConfig`] (also the command line of `si-dhcpd`), [`BootFiles`].
//! - [`handler`]: the packet logic without sockets ([`Handler::handle`]).
//! - [`pxe`]: recognising firmware (option 60, 77, 93, 97).
//! - [`serve`]: the tokio service, bound to one interface only.

pub mod config;
pub mod handler;
pub mod pxe;

pub use config::{BootFiles, DhcpConfig, Mode, UnknownPolicy};
pub use handler::{Handler, Port, Reply};

use crate::inventory::Inventory;
use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

/// The first IPv4 address of `interface`.
pub fn interface_ipv4(interface: &str) -> Result<Ipv4Addr> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing interface addresses")?;
    for a in addrs {
        if a.interface_name != interface {
            continue;
        }
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            return Ok(sin.ip());
        }
    }
    bail!("interface {interface:?} has no IPv4 address (give --server-ip)")
}

/// A UDP socket on `port` that sees and sends only through `interface`.
fn bind(interface: &str, port: u16) -> Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .context("creating UDP socket")?;
    s.set_reuse_address(true).context("setting SO_REUSEADDR")?;
    s.set_broadcast(true).context("setting SO_BROADCAST")?;
    s.bind_device(Some(interface.as_bytes()))
        .with_context(|| format!("binding to device {interface} (needs CAP_NET_RAW)"))?;
    s.set_nonblocking(true)
        .context("making socket non-blocking")?;
    let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    s.bind(&addr.into())
        .with_context(|| format!("binding UDP port {port} on {interface}"))?;
    UdpSocket::from_std(s.into()).context("registering socket with tokio")
}

/// Requests waiting for the worker; more are dropped (and counted), as on a saturated wire.
const QUEUE: usize = 1024;

/// Runs the DHCP service until `shutdown` completes.
///
/// Listens on `cfg.port` (67) and `cfg.proxy_port` (4011) of `cfg.interface` only. Packets are
/// handled in order by one worker thread (the inventory is SQLite, so the runtime's threads
/// never wait for the database) through a bounded queue; replies are sent from here.
pub async fn serve(
    cfg: DhcpConfig,
    inventory: Arc<Inventory>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let server_ip = match cfg.server_ip {
        Some(ip) => ip,
        None => interface_ipv4(&cfg.interface)?,
    };
    let dhcp = bind(&cfg.interface, cfg.port)?;
    let pxe = bind(&cfg.interface, cfg.proxy_port)?;
    info!(interface = %cfg.interface, %server_ip, mode = ?cfg.mode, unknown = ?cfg.unknown, "DHCP service started");
    let handler = Arc::new(Handler::new(cfg, inventory, server_ip));

    let (req_tx, req_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, SocketAddrV4, Port)>(QUEUE);
    let (rep_tx, mut rep_rx) = tokio::sync::mpsc::channel::<(Reply, Port)>(QUEUE);
    let h = Arc::clone(&handler);
    let worker = std::thread::Builder::new()
        .name("si-dhcp".into())
        .spawn(move || {
            while let Ok((pkt, src, port)) = req_rx.recv() {
                if let Some(r) = h.handle(&pkt, src, port) {
                    if rep_tx.blocking_send((r, port)).is_err() {
                        break;
                    }
                }
            }
        })
        .context("starting the DHCP worker thread")?;

    tokio::pin!(shutdown);
    let mut b1 = vec![0u8; handler::MAX_LEN + 1];
    let mut b2 = vec![0u8; handler::MAX_LEN + 1];
    let mut dropped: u64 = 0;
    loop {
        let (r, port) = tokio::select! {
            _ = &mut shutdown => break,
            Some((reply, port)) = rep_rx.recv() => {
                let sock = if port == Port::Dhcp { &dhcp } else { &pxe };
                debug!(dest = %reply.dest, len = reply.bytes.len(), "sending reply");
                if let Err(e) = sock.send_to(&reply.bytes, reply.dest).await {
                    warn!(dest = %reply.dest, error = %e, "sending reply failed");
                }
                continue;
            }
            r = dhcp.recv_from(&mut b1) => (r.map(|(n, s)| (b1[..n].to_vec(), s)), Port::Dhcp),
            r = pxe.recv_from(&mut b2) => (r.map(|(n, s)| (b2[..n].to_vec(), s)), Port::Pxe),
        };
        let (pkt, src) = match r {
            Ok(v) => v,
            Err(e) => {
                warn!(?port, error = %e, "receive failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let SocketAddr::V4(src) = src else { continue };
        match req_tx.try_send((pkt, src, port)) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                dropped += 1;
                if dropped.is_power_of_two() {
                    warn!(dropped, "request queue full: dropping requests");
                }
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                bail!("the DHCP worker thread stopped")
            }
        }
    }
    drop(req_tx);
    drop(rep_rx);
    tokio::task::spawn_blocking(move || worker.join())
        .await
        .context("waiting for the DHCP worker")?
        .map_err(|_| anyhow::anyhow!("the DHCP worker thread panicked"))?;
    info!(dropped, "DHCP service stopped");
    Ok(())
}
