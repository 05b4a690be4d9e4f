//! The embedded DHCP server (RFC 2131/2132) with PXE (RFC 4578), iPXE chain loading, UEFI HTTP
//! boot and a ProxyDHCP mode, backed by the [inventory](si_inventory).
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

use anyhow::{bail, Context, Result};
use si_inventory::Inventory;
use socket2::{Domain, Protocol, Socket, Type};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    // Room for a rack's worth of requests arriving while a burst is handled.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.set_nonblocking(true)
        .context("making socket non-blocking")?;
    let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    s.bind(&addr.into())
        .with_context(|| format!("binding UDP port {port} on {interface}"))?;
    Ok(s.into())
}

/// At most this many waiting requests are handled as one burst (one lease journal append).
const BURST: usize = 64;

/// Runs the DHCP service until `shutdown` completes.
///
/// Listens on `cfg.port` (67) and `cfg.proxy_port` (4011) of `cfg.interface` only. One thread
/// owns both sockets (the inventory is SQLite, so the runtime's threads never wait for the
/// database): it waits for packets, takes every request waiting (up to [`BURST`]) as one burst
/// whose leases are made durable by one journal append, and sends the replies itself. No
/// queue besides the sockets' receive buffers, no hand-off between threads on the way in or
/// out.
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
    let (interface, mode, unknown) = (cfg.interface.clone(), cfg.mode, cfg.unknown);
    if let Err(e) = inventory.checkpoint_in_background() {
        warn!(
            error = format!("{e:#}"),
            "inventory checkpoints stay inline"
        );
    }
    let handler = Handler::new(cfg, inventory, server_ip)?;
    info!(%interface, %server_ip, ?mode, ?unknown, "DHCP service started");
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("si-dhcp".into())
            .spawn(move || run(&handler, &dhcp, &pxe, &stop))
            .context("starting the DHCP thread")?
    };
    shutdown.await;
    stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || worker.join())
        .await
        .context("waiting for the DHCP thread")?
        .map_err(|_| anyhow::anyhow!("the DHCP thread panicked"))?;
    info!("DHCP service stopped");
    Ok(())
}

/// The DHCP thread: until `stop`, bursts of requests in, replies out.
fn run(h: &Handler, dhcp: &UdpSocket, pxe: &UdpSocket, stop: &AtomicBool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut bufs: Vec<Vec<u8>> = (0..BURST)
        .map(|_| vec![0u8; handler::MAX_LEN + 1])
        .collect();
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [
            PollFd::new(dhcp.as_fd(), PollFlags::POLLIN),
            PollFd::new(pxe.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                warn!(error = %e, "poll failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        }
        // The requests waiting on both sockets, up to BURST.
        let mut got: Vec<(usize, SocketAddrV4, Port)> = Vec::new();
        for (sock, port) in [(dhcp, Port::Dhcp), (pxe, Port::Pxe)] {
            while got.len() < BURST {
                match sock.recv_from(&mut bufs[got.len()]) {
                    Ok((n, SocketAddr::V4(src))) => got.push((n, src, port)),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn!(?port, error = %e, "receive failed");
                        break;
                    }
                }
            }
        }
        let pkts: Vec<(&[u8], SocketAddrV4, Port)> = got
            .iter()
            .zip(&bufs)
            .map(|(&(n, src, port), b)| (&b[..n], src, port))
            .collect();
        h.handle_many(&pkts, |reply, port| {
            let sock = if port == Port::Dhcp { dhcp } else { pxe };
            send(sock, &reply);
        });
    }
}

/// Sends a reply; a full send buffer is waited out briefly, then the reply is dropped (the
/// client retransmits).
fn send(sock: &UdpSocket, reply: &Reply) {
    debug!(dest = %reply.dest, len = reply.bytes.len(), "sending reply");
    for _ in 0..100 {
        match sock.send_to(&reply.bytes, reply.dest) {
            Ok(_) => return,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_micros(200))
            }
            Err(e) => {
                warn!(dest = %reply.dest, error = %e, "sending reply failed");
                return;
            }
        }
    }
    warn!(dest = %reply.dest, "send buffer full: reply dropped");
}
