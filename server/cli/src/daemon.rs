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
    /// The CA directory (root-only; made on first start; default STATE_DIR/ca).
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Extra names and addresses the master's certificate carries (besides `master.si`, the
    /// host name, --server-ip and a specific --listen address).
    #[arg(long)]
    pub tls_name: Vec<String>,
    /// Plain TCP on the image service: no authentication, no encryption (lab use only; every
    /// connection is logged as a warning).
    #[arg(long)]
    pub insecure: bool,
    /// Install waves: how the nodes armed for install of one image share its objects.
    #[command(flatten)]
    pub waves: crate::wave::WaveConfig,
    /// Install wave settings as TOML (instead of the --broadcast-*, --relay-port and
    /// --no-waves flags).
    #[arg(long)]
    pub wave_config: Option<PathBuf>,
    /// Multicast sessions on the nodes' segment (off unless --multicast-group is given).
    #[command(flatten)]
    pub multicast: si_imageserver::multicast::MulticastConfig,
    #[command(subcommand)]
    pub command: Option<ServerCmd>,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum ServerCmd {
    /// The master's certificate authority.
    #[command(subcommand)]
    Ca(CaCmd),
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum CaCmd {
    /// Print the CA fingerprint clients pin (`--ca-fingerprint`), and where the CA lives
    /// (made now if it does not exist yet).
    Show,
    /// Print the one-time enrollment token of a node whose install is armed (a secret: for
    /// installs by hand and tests; nodes get theirs on their boot script).
    Token { node: String },
}

impl DaemonArgs {
    pub fn ca_dir(&self) -> PathBuf {
        self.ca_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("ca"))
    }

    /// The names and addresses the master's certificate carries besides `master.si`.
    pub fn tls_names(&self) -> Vec<String> {
        let mut n = vec![si_tree::fsutil::hostname()];
        if !self.listen.ip().is_unspecified() {
            n.push(self.listen.ip().to_string());
        }
        n.extend(self.server_ip.map(|ip| ip.to_string()));
        n.extend(self.tls_name.iter().cloned());
        n.retain(|x| !x.is_empty() && x != si_trust::MASTER_NAME);
        n.sort();
        n.dedup();
        n
    }

    /// Opens (or makes) the master's CA.
    pub fn authority(&self) -> Result<si_trust::ca::Authority> {
        si_trust::ca::Authority::open_or_create(&self.ca_dir(), &self.tls_names())
            .with_context(|| format!("opening the CA in {}", self.ca_dir().display()))
    }
}

/// The migration at start: every version gets a signature by this CA (versions made before
/// versions were signed, or signed by a CA that has since been replaced).
fn migrate_signatures(
    store: &si_store::Store,
    ca: &si_trust::ca::Authority,
    signer: &serve::Signer,
) -> Result<()> {
    let mut resigned = 0;
    for image in store.images()? {
        for v in store.versions(&image)? {
            let Some(sig) = store.signature(&image, v)? else {
                continue;
            };
            let digest = serve::manifest_digest(store, &image, v)?;
            if si_trust::sign::verify_version(ca.ca_der(), &image, v, &digest, &sig).is_err() {
                tracing::warn!(%image, version = v, "the stored signature is not this CA's: signing again");
                store.write_signature(&image, v, &ca.sign_version(&image, v, &digest)?)?;
                resigned += 1;
            }
        }
    }
    let signed = serve::sign_unsigned(store, signer)?;
    if signed + resigned > 0 {
        tracing::info!(signed, resigned, "signed the store's versions");
    }
    Ok(())
}

/// `si-server ca token NODE`.
pub fn ca_token(a: &DaemonArgs, node: &str) -> Result<()> {
    let ca = a.authority()?;
    let inv = Inventory::open_state_dir(&a.state_dir)?;
    match crate::gate::enrollment_token(&inv, &ca, node)? {
        Some(t) => {
            println!("{t}");
            Ok(())
        }
        None => bail!(
            "no open enrollment for {node}: arm an install (si-node set {node} --boot install)"
        ),
    }
}

/// `si-server ca show`.
pub fn ca_show(a: &DaemonArgs) -> Result<()> {
    let ca = a.authority()?;
    println!("fingerprint: {}", ca.fingerprint());
    println!("directory:   {}", ca.dir().display());
    println!(
        "certificate: {}",
        ca.dir().join(si_trust::ca::CA_CERT).display()
    );
    Ok(())
}

fn mac_bytes(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split([':', '-'])
        .filter_map(|x| u8::from_str_radix(x, 16).ok())
        .collect();
    v.try_into().ok()
}

/// What nodes' boot files need beyond the inventory: for `autoinstall` nodes the distros and
/// profiles and where nodes reach the answer files; for `install` nodes how si's installer
/// reaches the master.
#[derive(Debug, Clone)]
pub struct Autoinstall {
    pub store: si_autoinstall::Store,
    pub urls: si_autoinstall::ServerUrls,
    pub trust: InstallTrust,
}

/// What an installer's kernel command line carries to reach the master: `si.ca=` (the CA
/// fingerprint it pins) and `si.token=` (its node's one-time enrollment token, while the
/// node is armed), or `si.insecure` when the master runs `--insecure`.
#[derive(Clone)]
pub enum InstallTrust {
    Tls(Arc<si_trust::ca::Authority>),
    Insecure,
}

impl std::fmt::Debug for InstallTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstallTrust::Tls(ca) => write!(f, "Tls({})", ca.fingerprint()),
            InstallTrust::Insecure => f.write_str("Insecure"),
        }
    }
}

impl InstallTrust {
    /// The kernel arguments for `node`'s installer.
    fn args(&self, inv: &Inventory, node: &str) -> Result<String> {
        Ok(match self {
            InstallTrust::Insecure => "si.insecure".into(),
            InstallTrust::Tls(ca) => {
                let mut a = format!("si.ca={}", ca.fingerprint());
                if let Some(t) = crate::gate::enrollment_token(inv, ca, node)? {
                    a.push_str(&format!(" si.token={t}"));
                }
                a
            }
        })
    }
}

/// The boot description of every node in the inventory.
pub fn boot_nodes(inv: &Inventory, auto: &Autoinstall) -> Result<Vec<BootNode>> {
    let mut out = Vec::new();
    for n in inv.nodes()? {
        let Some(b) = inv.boot_info(&n.name)? else {
            continue;
        };
        if b.action == si_inventory::BootAction::Autoinstall {
            let (action, kernel_args) = match si_autoinstall::render::boot_action(
                &auto.store,
                &b,
                &auto.urls,
            ) {
                Ok(x) => x,
                Err(e) => {
                    // One misconfigured node must not stop the others' boot files: it
                    // boots its disk until its profile is fixed.
                    tracing::warn!(node = %b.name, error = format!("{e:#}"), "autoinstall node boots locally");
                    (bootcfg::BootAction::Local, String::new())
                }
            };
            out.push(BootNode {
                name: b.name,
                macs: b.macs.iter().filter_map(|m| mac_bytes(m)).collect(),
                ip: b.ip,
                uuid: None,
                action,
                kernel_args,
                firmware: firmware(b.firmware),
            });
            continue;
        }
        // The installer's way to the master (si.ca=, si.token= or si.insecure) comes first.
        let kernel_args = match b.action {
            si_inventory::BootAction::Install => {
                let t = auto.trust.args(inv, &b.name)?;
                format!("{t} {}", b.kernel_args).trim().to_string()
            }
            _ => b.kernel_args.clone(),
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
                // Handled above.
                si_inventory::BootAction::Autoinstall => bootcfg::BootAction::Local,
            },
            kernel_args,
            firmware: firmware(b.firmware),
        });
    }
    Ok(out)
}

fn firmware(f: si_inventory::Firmware) -> bootcfg::Firmware {
    match f {
        si_inventory::Firmware::Auto => bootcfg::Firmware::Any,
        si_inventory::Firmware::Bios => bootcfg::Firmware::Bios,
        si_inventory::Firmware::Uefi => bootcfg::Firmware::Uefi,
    }
}

fn render(
    inv: &Inventory,
    settings: &BootSettings,
    auto: &Autoinstall,
) -> Result<BTreeMap<String, String>> {
    bootcfg::render(settings, &boot_nodes(inv, auto)?)
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
    // The CA signs versions whether or not TLS is on, so nodes that pin it can check them.
    let ca = Arc::new(a.authority()?);
    let auto = Autoinstall {
        store: si_autoinstall::Store::open(&a.state_dir)?,
        urls: si_autoinstall::ServerUrls {
            http_base: http_base.clone(),
        },
        trust: if a.insecure {
            InstallTrust::Insecure
        } else {
            InstallTrust::Tls(ca.clone())
        },
    };
    if boot_services {
        si_autoinstall::cli::record_server(&auto.store, &auto.urls)?;
    }
    let generated = Generated::with_config(a.generate.clone(), render(&inv, &settings, &auto)?);
    // Distros' kernels, initrds and package trees (TFTP and HTTP).
    generated.mount(si_autoinstall::DISTRO_PREFIX, &auto.store.distros_dir())?;
    for root in a.tftp_root.iter().chain(&a.http_root) {
        log_shared(&generated, root);
    }
    let (stop_tx, stopped) = stop_signal();
    let mut tasks = Services::new();

    // Image service; a finished install flips the node to local boot.
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    tracing::info!(store = %a.store.store.display(), listen = %listener.local_addr()?, "image service listening");
    let hook: serve::ReportHook = {
        let (inv, generated, settings, auto) = (
            inv.clone(),
            generated.clone(),
            settings.clone(),
            auto.clone(),
        );
        Arc::new(move |node: &str, state: &str, detail: &str| {
            if state == "installed" {
                inv.mark_installed_with(node, installed_image(detail).as_deref())
                    .with_context(|| format!("marking {node} installed"))?;
                match render(&inv, &settings, &auto) {
                    Ok(files) => generated.replace(files),
                    // The node is recorded; its boot files follow at the next change.
                    Err(e) => tracing::error!(error = format!("{e:#}"), "regenerating boot files"),
                }
            } else if state == "failed" {
                // The node stays armed (its next boot installs again); the inventory shows
                // it failed, and its history why.
                inv.mark_failed(node, detail)
                    .with_context(|| format!("recording {node}'s failed install"))?;
            }
            Ok(())
        })
    };
    let waves = match &a.wave_config {
        Some(p) => crate::wave::WaveConfig::from_file(p)?,
        None => a.waves.clone(),
    };
    tracing::info!(waves = ?waves, "install waves");
    let plans: serve::PlanHook = {
        let (inv, store, layouts) = (inv.clone(), store.clone(), a.state_dir.join("layouts"));
        Arc::new(move |node: &str| crate::plans::install_plan(&inv, &store, &layouts, &waves, node))
    };
    let transport = if a.insecure {
        tracing::warn!("--insecure: the image service runs without TLS; any host that reaches it reads every image and can report for any node");
        si_trust::Acceptor::Insecure
    } else {
        tracing::info!(fingerprint = %ca.fingerprint(), ca = %ca.dir().display(), names = ?a.tls_names(), "TLS: clients pin this CA");
        si_trust::Acceptor::tls(ca.server_config()?)
    };
    let signer: serve::Signer = {
        let ca = ca.clone();
        Arc::new(move |image: &str, v: u32, d: &si_proto::Digest| ca.sign_version(image, v, d))
    };
    migrate_signatures(&store, &ca, &signer)?;
    // Under --insecure nobody is authenticated, so nothing can be authorised per node.
    let gate: Arc<dyn serve::Gate> = if a.insecure {
        Arc::new(serve::Open)
    } else {
        Arc::new(crate::gate::InventoryGate {
            inv: inv.clone(),
            ca: ca.clone(),
        })
    };
    let multicast = si_imageserver::multicast::Multicast::new(&a.multicast, store.clone())?;
    if multicast.is_some() && a.insecure {
        tracing::warn!("--insecure: multicast session keys go to nodes over plain TCP; anyone on the path can read the stream");
    }
    let scfg = serve::ServeConfig {
        max_connections: a.max_connections,
        multicast,
        signer: Some(signer),
        plans: Some(plans),
        gate,
        ..serve::ServeConfig::new(transport)
    };
    tasks.spawn(serve::run(listener, store, scfg, Some(hook), stopped()));

    // TFTP and HTTP serve boot files only: a root that holds the store or the inventory (or
    // lies inside the store) is refused before anything listens.
    let inventory_db = a.state_dir.join("inventory.db");
    let private = [a.store.store.as_path(), inventory_db.as_path()];
    for root in a.tftp_root.iter().chain(&a.http_root) {
        si_boot::tftp::root::check_disjoint(root, &private)?;
    }

    // Answer files and install callbacks on HTTP; a finished install flips the node to local.
    let on_done: si_autoinstall::route::DoneHook = {
        let (inv, generated, settings, auto) = (
            inv.clone(),
            generated.clone(),
            settings.clone(),
            auto.clone(),
        );
        Arc::new(move |node: &str| {
            inv.mark_installed(node)
                .with_context(|| format!("marking {node} installed"))?;
            match render(&inv, &settings, &auto) {
                Ok(files) => generated.replace(files),
                Err(e) => tracing::error!(error = format!("{e:#}"), "regenerating boot files"),
            }
            Ok(())
        })
    };
    let route = si_autoinstall::AnswerRoute {
        store: auto.store.clone(),
        inv: inv.clone(),
        urls: auto.urls.clone(),
        on_done,
    };
    let files = FileServices {
        tftp: a.tftp_root.as_ref().map(|root| {
            let cfg = tftp::TftpConfig {
                root: root.clone(),
                ..Default::default()
            };
            (a.tftp_listen, cfg)
        }),
        http: a.http_root.as_ref().map(|root| {
            let cfg = http::HttpConfig {
                root: root.clone(),
                routes: http::Routes(vec![Arc::new(route)]),
                ..Default::default()
            };
            (a.http_listen, cfg)
        }),
    };
    files.spawn(&mut tasks, &generated, &stopped).await?;
    if let Some(mut cfg) = dhcp_cfg {
        cfg.server_ip = cfg.server_ip.or(dhcp_ip);
        if cfg.http_base.is_none() {
            cfg.http_base = Some(http_base.clone());
        }
        tasks.spawn(dhcp::serve(cfg, inv.clone(), stopped()));
    }
    // Inventory edits (si-node set ... --boot install) reach the boot files within seconds.
    {
        let (inv, generated, settings, auto) = (
            inv.clone(),
            generated.clone(),
            settings.clone(),
            auto.clone(),
        );
        let stop = stopped();
        tasks.spawn(async move {
            tokio::pin!(stop);
            let mut last = render(&inv, &settings, &auto)?;
            loop {
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                match render(&inv, &settings, &auto) {
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
    until_signal(tasks, stop_tx).await
}

/// Services as a daemon runs them: each a task; all are told to stop (`stop_tx`) on SIGINT or
/// SIGTERM, or when one of them fails; the first failure is the result.
pub type Services = tokio::task::JoinSet<Result<()>>;

/// Runs `tasks` until a signal or a failure, then stops them all and waits for them.
pub async fn until_signal(
    mut tasks: Services,
    stop_tx: tokio::sync::watch::Sender<bool>,
) -> Result<()> {
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

/// A stop signal for services: a function making futures that finish once `true` is sent.
pub fn stop_signal() -> (
    tokio::sync::watch::Sender<bool>,
    impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Clone,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|s| *s).await;
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    };
    (stop_tx, stopped)
}

/// The boot file services (TFTP, HTTP), either or both, serving `generated` over their roots:
/// si-server's, and si-bootd's alone.
pub struct FileServices {
    pub tftp: Option<(SocketAddr, tftp::TftpConfig)>,
    pub http: Option<(SocketAddr, http::HttpConfig)>,
}

impl FileServices {
    /// Binds each service's address (an error names it) and spawns it on `tasks`.
    pub async fn spawn<F>(
        self,
        tasks: &mut Services,
        generated: &Generated,
        stopped: &F,
    ) -> Result<()>
    where
        F: Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    {
        if let Some((listen, cfg)) = self.tftp {
            let udp = tokio::net::UdpSocket::bind(listen)
                .await
                .with_context(|| format!("binding TFTP to {listen}"))?;
            tasks.spawn(tftp::serve(udp, cfg, generated.clone(), stopped()));
        }
        if let Some((listen, cfg)) = self.http {
            let tcp = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding HTTP to {listen}"))?;
            tasks.spawn(http::serve(tcp, cfg, generated.clone(), stopped()));
        }
        Ok(())
    }
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
