//! `si-server`: the master daemon. One process runs the image service and, when asked, the
//! network boot services (DHCP or ProxyDHCP on one interface, TFTP, HTTP) with boot
//! configurations generated from the inventory and kept current as it changes. When a node
//! reports a finished install, its boot action flips to `local` (SystemImager's
//! si_netbootmond), and its boot files are regenerated at once.

use anyhow::{bail, Context, Result};
use clap::Parser;
use si_boot::bootcfg::{self, BootNode, BootSettings, GenerateConfig, Generated};
use si_boot::dhcp::{self, BootFiles, DhcpConfig, Mode, UnknownPolicy};
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
    /// Our address on the boot network, put in every URL and `si.server=` handed to nodes
    /// (default: the DHCP interface's address, else the address HTTP listens on; a wildcard
    /// listen address with neither is an error at start).
    #[arg(long)]
    pub server_ip: Option<Ipv4Addr>,
    /// DHCP settings as TOML (overrides the flags above and the --boot-* flags).
    #[arg(long)]
    pub dhcp_config: Option<PathBuf>,
    /// Boot files the DHCP service names (a name without `scheme://` is a TFTP path).
    #[command(flatten)]
    pub boot: BootFiles,
    /// Which boot configurations are generated, and whether the root's files win.
    #[command(flatten)]
    pub generate: GenerateConfig,
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

/// The DHCP configuration: the file's, else the flags'. Unset fields of a file are filled in
/// from what the daemon knows (its HTTP base).
fn dhcp_config(a: &DaemonArgs) -> Result<Option<DhcpConfig>> {
    if let Some(p) = &a.dhcp_config {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let c = toml::from_str::<DhcpConfig>(&text)
            .with_context(|| format!("parsing {}", p.display()))?;
        return Ok(Some(c));
    }
    let Some(iface) = &a.dhcp_interface else {
        return Ok(None);
    };
    let mut c = DhcpConfig::new(iface);
    c.server_ip = a.server_ip;
    c.mode = if a.proxy_dhcp {
        Mode::Proxy
    } else {
        Mode::Full
    };
    c.unknown = a.unknown;
    c.boot = a.boot.clone();
    Ok(Some(c))
}

/// The host part of a URL (`http://HOST[:PORT]/…`, `[v6]` kept in brackets).
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let auth = rest.split(['/', '?', '#']).next()?;
    let auth = auth.rsplit('@').next()?;
    if auth.starts_with('[') {
        return auth.find(']').map(|i| &auth[..=i]);
    }
    auth.split(':').next()
}

/// Where nodes reach us, as put into the URLs and `si.server=` handed to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reachable {
    /// Base URL of the HTTP service, without a trailing slash.
    pub http_base: String,
    /// `si.server=` on installer command lines: the image service's address.
    pub si_server: String,
}

/// Finds the addresses nodes reach: `--server-ip`, else `server_ip` (the DHCP interface's
/// address), else the specific address a service listens on. Every URL handed to a node must
/// name an address it can reach: a wildcard with nothing else known is an error.
pub fn reachable(a: &DaemonArgs, server_ip: Option<Ipv4Addr>) -> Result<Reachable> {
    let addr = a.server_ip.or(server_ip);
    let specific = |l: SocketAddr| (!l.ip().is_unspecified()).then(|| l.ip());
    let http_base = match &a.http_base {
        Some(b) => {
            let host = url_host(b)
                .filter(|h| !h.is_empty())
                .with_context(|| format!("--http-base {b:?} is not a URL (http://HOST[:PORT])"))?;
            let ip = host.trim_start_matches('[').trim_end_matches(']');
            if ip
                .parse::<std::net::IpAddr>()
                .is_ok_and(|i| i.is_unspecified())
            {
                bail!("--http-base {b:?} names no address a node can reach");
            }
            b.trim_end_matches('/').to_string()
        }
        None => {
            let ip = match (addr, specific(a.http_listen)) {
                (Some(ip), _) => std::net::IpAddr::V4(ip),
                (None, Some(ip)) => ip,
                (None, None) => bail!(
                    "cannot tell which address nodes reach the HTTP service at (it listens on \
                     {}): give --server-ip, --dhcp-interface, --http-base or a specific \
                     --http-listen",
                    a.http_listen
                ),
            };
            let host = match ip {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            };
            if a.http_listen.port() == 80 {
                format!("http://{host}")
            } else {
                format!("http://{host}:{}", a.http_listen.port())
            }
        }
    };
    let si_server = match (addr, specific(a.listen)) {
        (Some(ip), _) => format!("{ip}:{}", a.listen.port()),
        (None, Some(_)) => a.listen.to_string(),
        (None, None) => bail!(
            "cannot tell which address nodes reach the image service at (it listens on {}): \
             give --server-ip, --dhcp-interface or a specific --listen",
            a.listen
        ),
    };
    Ok(Reachable {
        http_base,
        si_server,
    })
}

/// `IMAGE@VERSION` from a node's `installed` report (`status=101 image=NAME version=Some(N)`,
/// as si-install sends it), when both are well formed; the rest of the detail is not recorded.
pub fn installed_image(detail: &str) -> Option<String> {
    let mut image = None;
    let mut version = None;
    for w in detail.split_whitespace() {
        if let Some(i) = w.strip_prefix("image=") {
            image = si_store::valid_image_name(i).is_ok().then(|| i.to_string());
        } else if let Some(v) = w.strip_prefix("version=") {
            let v = v.trim_start_matches("Some(").trim_end_matches(')');
            version = v.parse::<u32>().ok();
        }
    }
    Some(format!("{}@{}", image?, version?))
}

/// Says, for each generated path that a file in `root` shares, which one is served.
pub fn log_shared(generated: &Generated, root: &std::path::Path) {
    let served = match generated.config().boot_files {
        bootcfg::Precedence::RootFirst => "the root's file (--boot-files root-first)",
        bootcfg::Precedence::GeneratedFirst => "the generated file (--boot-files generated-first)",
    };
    for path in generated.shared_with(root) {
        tracing::info!(%path, root = %root.display(), served, "a generated boot file shares a path with the root");
    }
}

/// Runs the daemon until SIGINT/SIGTERM.
pub async fn run(a: DaemonArgs) -> Result<()> {
    let store = Arc::new(a.store.open()?);
    let inv = Arc::new(Inventory::open_state_dir(&a.state_dir)?.with_actor("si-server"));
    let dhcp_cfg = dhcp_config(&a)?;
    let boot_services = a.tftp_root.is_some() || a.http_root.is_some() || dhcp_cfg.is_some();
    // The DHCP interface's address is the one its clients reach (as the DHCP service finds it).
    let dhcp_ip = match &dhcp_cfg {
        Some(c) => match c.server_ip.or(a.server_ip) {
            Some(ip) => Some(ip),
            None => Some(dhcp::interface_ipv4(&c.interface)?),
        },
        None => None,
    };
    // Without boot services nothing is handed to nodes: the image service alone needs no
    // address (si-updateclient is told where it is).
    let reach = if boot_services {
        reachable(&a, dhcp_ip)?
    } else {
        Reachable {
            http_base: String::new(),
            si_server: a.listen.to_string(),
        }
    };
    let http_base = reach.http_base.clone();
    let settings = BootSettings {
        http_base: http_base.clone(),
        si_server: reach.si_server.clone(),
        installer_kernel: a.installer_kernel.clone(),
        installer_initrd: a.installer_initrd.clone(),
        default_action: bootcfg::BootAction::Local,
    };
    if boot_services {
        tracing::info!(%http_base, si_server = %reach.si_server, "nodes are pointed at");
    }
    let generated = Generated::with_config(a.generate.clone(), render(&inv, &settings)?);
    for root in a.tftp_root.iter().chain(&a.http_root) {
        log_shared(&generated, root);
    }
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
    tracing::info!(store = %a.store.store.display(), listen = %listener.local_addr()?, "image service listening");
    let hook: serve::ReportHook = {
        let (inv, generated, settings) = (inv.clone(), generated.clone(), settings.clone());
        Arc::new(move |node: &str, state: &str, detail: &str| {
            if state == "installed" {
                inv.mark_installed_with(node, installed_image(detail).as_deref())
                    .with_context(|| format!("marking {node} installed"))?;
                match render(&inv, &settings) {
                    Ok(files) => generated.replace(files),
                    // The node is recorded; its boot files follow at the next change.
                    Err(e) => tracing::error!(error = format!("{e:#}"), "regenerating boot files"),
                }
            }
            Ok(())
        })
    };
    let plans: serve::PlanHook = {
        let (inv, store, layouts) = (inv.clone(), store.clone(), a.state_dir.join("layouts"));
        Arc::new(move |node: &str| crate::plans::install_plan(&inv, &store, &layouts, node))
    };
    let scfg = serve::ServeConfig {
        max_connections: a.max_connections,
        plans: Some(plans),
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
    if let Some(mut cfg) = dhcp_cfg {
        cfg.server_ip = cfg.server_ip.or(dhcp_ip);
        if cfg.http_base.is_none() {
            cfg.http_base = Some(http_base.clone());
        }
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
                    Err(e) => tracing::error!(error = format!("{e:#}"), "regenerating boot files"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_image_from_a_report() {
        assert_eq!(
            installed_image("status=101 image=deb12 version=Some(3)").as_deref(),
            Some("deb12@3")
        );
        assert_eq!(installed_image("status=101 image=deb12 version=None"), None);
        assert_eq!(installed_image("image=../x version=1"), None);
        assert_eq!(installed_image(""), None);
    }

    fn args(a: &[&str]) -> DaemonArgs {
        DaemonArgs::parse_from(std::iter::once("si-server").chain(a.iter().copied()))
    }

    #[test]
    fn urls_name_the_dhcp_interface_address_not_the_wildcard() {
        let ip = Some(Ipv4Addr::new(10, 213, 0, 1));
        let r = reachable(&args(&["--tftp-root", "/srv"]), ip).unwrap();
        assert_eq!(r.http_base, "http://10.213.0.1");
        assert_eq!(r.si_server, "10.213.0.1:7811");
        let r = reachable(&args(&["--http-listen", "0.0.0.0:8080"]), ip).unwrap();
        assert_eq!(r.http_base, "http://10.213.0.1:8080");
        // --server-ip wins over the interface's address.
        let r = reachable(&args(&["--server-ip", "10.213.0.2"]), ip).unwrap();
        assert_eq!(r.http_base, "http://10.213.0.2");
        assert_eq!(r.si_server, "10.213.0.2:7811");
    }

    #[test]
    fn specific_listen_addresses_are_used_without_an_interface() {
        let a = args(&[
            "--http-listen",
            "10.213.0.5:8080",
            "--listen",
            "10.213.0.5:7000",
        ]);
        let r = reachable(&a, None).unwrap();
        assert_eq!(r.http_base, "http://10.213.0.5:8080");
        assert_eq!(r.si_server, "10.213.0.5:7000");
        let a = args(&[
            "--http-listen",
            "[fd00::1]:80",
            "--listen",
            "10.213.0.5:7811",
        ]);
        assert_eq!(reachable(&a, None).unwrap().http_base, "http://[fd00::1]");
    }

    #[test]
    fn no_reachable_address_is_an_error_at_start() {
        let e = reachable(&args(&["--tftp-root", "/srv"]), None).unwrap_err();
        assert!(format!("{e:#}").contains("--server-ip"), "{e:#}");
        // An explicit HTTP base still leaves si.server= unknown.
        let a = args(&["--http-base", "http://10.213.0.1:8080/"]);
        let e = reachable(&a, None).unwrap_err();
        assert!(format!("{e:#}").contains("image service"), "{e:#}");
        let a = args(&[
            "--http-base",
            "http://10.213.0.1:8080/",
            "--listen",
            "10.213.0.1:7811",
        ]);
        assert_eq!(
            reachable(&a, None).unwrap().http_base,
            "http://10.213.0.1:8080"
        );
        for bad in ["http://0.0.0.0:8080", "http://[::]/", "10.213.0.1"] {
            let a = args(&["--http-base", bad, "--server-ip", "10.213.0.1"]);
            assert!(reachable(&a, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn url_hosts() {
        assert_eq!(url_host("http://10.0.0.1:80/x"), Some("10.0.0.1"));
        assert_eq!(url_host("http://u@h/x"), Some("h"));
        assert_eq!(url_host("http://[::1]:8080"), Some("[::1]"));
        assert_eq!(url_host("nope"), None);
    }
}
