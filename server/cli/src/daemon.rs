//! `si-server`: the master daemon. One process runs the image service and, when asked, the
//! network boot services (DHCP or ProxyDHCP on one interface, TFTP, HTTP) with boot
//! configurations generated from the inventory and kept current as it changes. When a node
//! reports a finished install, its boot action flips to `local` (SystemImager's
//! si_netbootmond), and its boot files are regenerated at once.

use anyhow::{Context, Result};
use clap::Parser;
use si_boot::bootcfg::{self, BootNode, BootSettings, Generated};
use si_boot::dhcp::{self, DhcpConfig, Mode, UnknownPolicy};
use si_boot::{http, tftp};
use si_imageserver::service as serve;
use si_imaging::commands::StoreArg;
use si_inventory::{self, Inventory};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "si-server",
    version,
    about = "The si master daemon: images, and network boot"
)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub store: StoreArg,
    /// State directory (inventory.db).
    #[arg(long, env = "SI_STATE_DIR", default_value = "/var/lib/si")]
    pub state_dir: PathBuf,
    /// Address of the image service.
    #[arg(long, default_value = "0.0.0.0:7811")]
    pub listen: SocketAddr,
    /// Most nodes served images at once.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Serve DHCP on this interface (never on all interfaces).
    #[arg(long)]
    pub dhcp_interface: Option<String>,
    /// ProxyDHCP: another server gives addresses, si only boot information.
    #[arg(long)]
    pub proxy_dhcp: bool,
    /// Unknown machines: ignore them, or boot the discovery script.
    #[arg(long, value_enum, default_value_t = UnknownPolicy::Ignore)]
    pub unknown: UnknownPolicy,
    /// Our address on the boot network (default: the DHCP interface's).
    #[arg(long)]
    pub server_ip: Option<Ipv4Addr>,
    /// DHCP settings as TOML (overrides the flags above).
    #[arg(long)]
    pub dhcp_config: Option<PathBuf>,
    /// Serve this directory over TFTP (iPXE/pxelinux/GRUB binaries, kernels).
    #[arg(long)]
    pub tftp_root: Option<PathBuf>,
    #[arg(long, default_value = "0.0.0.0:69")]
    pub tftp_listen: SocketAddr,
    /// Serve this directory over HTTP (kernels, initrds; iPXE scripts are generated).
    #[arg(long)]
    pub http_root: Option<PathBuf>,
    #[arg(long, default_value = "0.0.0.0:80")]
    pub http_listen: SocketAddr,
    /// Base URL of the HTTP service as nodes reach it (default http://SERVER-IP[:PORT]).
    #[arg(long)]
    pub http_base: Option<String>,
    /// Installer kernel and initrd, relative to the served roots.
    #[arg(long, default_value = "si/vmlinuz")]
    pub installer_kernel: String,
    #[arg(long, default_value = "si/initrd.img")]
    pub installer_initrd: String,
}

fn mac_bytes(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split([':', '-'])
        .filter_map(|x| u8::from_str_radix(x, 16).ok())
        .collect();
    v.try_into().ok()
}

/// The boot description of every node in the inventory.
pub fn boot_nodes(inv: &Inventory) -> Result<Vec<BootNode>> {
    let mut out = Vec::new();
    for n in inv.nodes()? {
        let Some(b) = inv.boot_info(&n.name)? else {
            continue;
        };
        out.push(BootNode {
            name: b.name,
            macs: b.macs.iter().filter_map(|m| mac_bytes(m)).collect(),
            ip: b.ip,
            uuid: None,
            action: match b.action {
                si_inventory::BootAction::Install => bootcfg::BootAction::Install {
                    image: b.image.unwrap_or_default(),
                },
                si_inventory::BootAction::Local => bootcfg::BootAction::Local,
                si_inventory::BootAction::Custom {
                    kernel,
                    initrd,
                    cmdline,
                } => bootcfg::BootAction::Custom {
                    kernel,
                    initrd,
                    cmdline,
                },
            },
            kernel_args: b.kernel_args,
            firmware: match b.firmware {
                si_inventory::Firmware::Auto => bootcfg::Firmware::Any,
                si_inventory::Firmware::Bios => bootcfg::Firmware::Bios,
                si_inventory::Firmware::Uefi => bootcfg::Firmware::Uefi,
            },
        });
    }
    Ok(out)
}

fn render(inv: &Inventory, settings: &BootSettings) -> Result<BTreeMap<String, String>> {
    bootcfg::render(settings, &boot_nodes(inv)?)
}

/// Runs the daemon until SIGINT/SIGTERM.
pub async fn run(a: DaemonArgs) -> Result<()> {
    let store = Arc::new(a.store.open()?);
    let inv = Arc::new(Inventory::open_state_dir(&a.state_dir)?.with_actor("si-server"));
    let http_base = a.http_base.clone().unwrap_or_else(|| {
        let ip = a
            .server_ip
            .map(|i| i.to_string())
            .unwrap_or_else(|| a.http_listen.ip().to_string());
        if a.http_listen.port() == 80 {
            format!("http://{ip}")
        } else {
            format!("http://{ip}:{}", a.http_listen.port())
        }
    });
    let settings = BootSettings {
        http_base: http_base.clone(),
        si_server: match a.server_ip {
            Some(ip) => format!("{ip}:{}", a.listen.port()),
            None => a.listen.to_string(),
        },
        installer_kernel: a.installer_kernel.clone(),
        installer_initrd: a.installer_initrd.clone(),
        default_action: bootcfg::BootAction::Local,
    };
    let generated = Generated::new(render(&inv, &settings)?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks: tokio::task::JoinSet<Result<()>> = tokio::task::JoinSet::new();

    // Image service; a finished install flips the node to local boot.
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    eprintln!(
        "si-server: images from {} on {}",
        a.store.store.display(),
        listener.local_addr()?
    );
    let hook: serve::ReportHook = {
        let (inv, generated, settings) = (inv.clone(), generated.clone(), settings.clone());
        Arc::new(move |node: &str, state: &str, _detail: &str| {
            if state == "installed" {
                if let Err(e) = inv.mark_installed(node) {
                    eprintln!("si-server: marking {node} installed: {e:#}");
                }
                match render(&inv, &settings) {
                    Ok(files) => generated.replace(files),
                    Err(e) => eprintln!("si-server: regenerating boot files: {e:#}"),
                }
            }
        })
    };
    let scfg = serve::ServeConfig {
        max_connections: a.max_connections,
    };
    tasks.spawn(serve::run(listener, store, scfg, Some(hook), stopped()));

    if let Some(root) = &a.tftp_root {
        let udp = tokio::net::UdpSocket::bind(a.tftp_listen)
            .await
            .with_context(|| format!("binding TFTP to {}", a.tftp_listen))?;
        let cfg = tftp::TftpConfig {
            root: root.clone(),
            ..Default::default()
        };
        tasks.spawn(tftp::serve(udp, cfg, generated.clone(), stopped()));
    }
    if let Some(root) = &a.http_root {
        let tcp = tokio::net::TcpListener::bind(a.http_listen)
            .await
            .with_context(|| format!("binding HTTP to {}", a.http_listen))?;
        let cfg = http::HttpConfig {
            root: root.clone(),
            ..Default::default()
        };
        tasks.spawn(http::serve(tcp, cfg, generated.clone(), stopped()));
    }
    if a.dhcp_interface.is_some() || a.dhcp_config.is_some() {
        let cfg = match &a.dhcp_config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                toml::from_str::<DhcpConfig>(&text)
                    .with_context(|| format!("parsing {}", p.display()))?
            }
            None => {
                let mut c = DhcpConfig::new(a.dhcp_interface.as_deref().expect("checked"));
                c.server_ip = a.server_ip;
                c.mode = if a.proxy_dhcp {
                    Mode::Proxy
                } else {
                    Mode::Full
                };
                c.unknown = a.unknown;
                c.http_base = Some(http_base.clone());
                c
            }
        };
        tasks.spawn(dhcp::serve(cfg, inv.clone(), stopped()));
    }
    // Inventory edits (si-node set ... --boot install) reach the boot files within seconds.
    {
        let (inv, generated, settings) = (inv.clone(), generated.clone(), settings.clone());
        let stop = stopped();
        tasks.spawn(async move {
            tokio::pin!(stop);
            let mut last = render(&inv, &settings)?;
            loop {
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                match render(&inv, &settings) {
                    Ok(files) if files != last => {
                        generated.replace(files.clone());
                        last = files;
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("si-server: regenerating boot files: {e:#}"),
                }
            }
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    let res = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        r = tasks.join_next() => match r {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(anyhow::anyhow!("a service panicked: {e}")),
            _ => Ok(()),
        },
    };
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    res
}
