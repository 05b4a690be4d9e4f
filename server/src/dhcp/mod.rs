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

/// Runs the DHCP service until `shutdown` completes.
///
/// Listens on `cfg.port` (67) and `cfg.proxy_port` (4011) of `cfg.interface` only. Packets are
/// handled one at a time on the blocking pool (the inventory is SQLite), so the runtime's
/// threads never wait for the database.
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
    tokio::pin!(shutdown);
    let mut b1 = vec![0u8; handler::MAX_LEN + 1];
    let mut b2 = vec![0u8; handler::MAX_LEN + 1];
    loop {
        let (len, src, port, sock) = tokio::select! {
            _ = &mut shutdown => break,
            r = dhcp.recv_from(&mut b1) => {
                let (n, s) = r.context("receiving on port 67")?;
                (n, s, Port::Dhcp, &dhcp)
            }
            r = pxe.recv_from(&mut b2) => {
                let (n, s) = r.context("receiving on the PXE port")?;
                (n, s, Port::Pxe, &pxe)
            }
        };
        let SocketAddr::V4(src) = src else { continue };
        let pkt = if port == Port::Dhcp {
            b1[..len].to_vec()
        } else {
            b2[..len].to_vec()
        };
        let h = Arc::clone(&handler);
        let reply = match tokio::task::spawn_blocking(move || h.handle(&pkt, src, port)).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "packet handler failed");
                continue;
            }
        };
        if let Some(r) = reply {
            debug!(dest = %r.dest, len = r.bytes.len(), "sending reply");
            if let Err(e) = sock.send_to(&r.bytes, r.dest).await {
                warn!(dest = %r.dest, error = %e, "sending reply failed");
            }
        }
    }
    info!("DHCP service stopped");
    Ok(())
}
