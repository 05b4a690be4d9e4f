//! The `si-node` and `si-group` command lines. The binaries only parse and call [`node_main`]
//! or [`group_main`].

use super::*;
use crate::enroll::{Enrollment, DEFAULT_WINDOW_SECS};
use crate::ranges;
use clap::{Args, Parser, Subcommand};
use std::io::Write;

/// Options every inventory command takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Server state directory holding inventory.db.
    #[arg(
        long,
        env = "SI_STATE_DIR",
        default_value = "/var/lib/si",
        global = true
    )]
    pub state_dir: PathBuf,
    /// Image store: image names are checked against <STORE>/images/<name>.
    #[arg(long, env = "SI_STORE", global = true)]
    pub store: Option<PathBuf>,
    /// Known image names (comma separated); overrides --store for the check.
    #[arg(long, value_delimiter = ',', global = true)]
    pub images: Option<Vec<String>>,
}

impl Common {
    fn open(&self) -> Result<Inventory> {
        Inventory::open_state_dir(&self.state_dir)
    }
    fn catalog(&self) -> Box<dyn ImageCatalog> {
        match (&self.images, &self.store) {
            (Some(l), _) => Box::new(ListCatalog(l.clone())),
            (None, Some(s)) => Box::new(StoreCatalog(s.clone())),
            (None, None) => Box::new(NoCatalog),
        }
    }
    fn note_unchecked(&self, image: &Option<String>) {
        if image.is_some() && self.images.is_none() && self.store.is_none() {
            eprintln!("note: image name not checked (give --store or --images)");
        }
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct BmcArgs {
    /// BMC address (incremented along a node range, like --ip).
    #[arg(long)]
    pub bmc_host: Option<String>,
    #[arg(long)]
    pub bmc_port: Option<u16>,
    #[arg(long)]
    pub bmc_user: Option<String>,
    /// Stored in the inventory (mode 0600), never displayed. `-` reads it from the first line
    /// of stdin (command lines are visible to other users in `ps`).
    #[arg(long)]
    pub bmc_password: Option<String>,
    /// ipmi, redfish...
    #[arg(long)]
    pub bmc_driver: Option<String>,
    /// IPMI cipher suite (e.g. 3 or 17).
    #[arg(long)]
    pub bmc_cipher_suite: Option<u8>,
}

impl BmcArgs {
    /// Replaces a `-` password by the first line of stdin.
    fn read_secret(&mut self) -> Result<()> {
        if self.bmc_password.as_deref() == Some("-") {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the BMC password from stdin")?;
            let p = line.trim_end_matches(['\n', '\r']).to_string();
            if p.is_empty() {
                bail!("empty BMC password on stdin");
            }
            self.bmc_password = Some(p);
        }
        Ok(())
    }

    /// Applies the given fields over `b`; `host_offset` increments an IPv4 host.
    fn apply(&self, b: &mut Bmc, host_offset: u32) -> Result<()> {
        if let Some(h) = &self.bmc_host {
            b.host = Some(match h.parse::<Ipv4Addr>() {
                Ok(ip) => ip_add(ip, host_offset)?.to_string(),
                Err(_) => h.clone(),
            });
        }
        if self.bmc_port.is_some() {
            b.port = self.bmc_port;
        }
        if self.bmc_user.is_some() {
            b.user.clone_from(&self.bmc_user);
        }
        if let Some(p) = &self.bmc_password {
            b.password = Some(p.clone());
        }
        if self.bmc_driver.is_some() {
            b.driver.clone_from(&self.bmc_driver);
        }
        if self.bmc_cipher_suite.is_some() {
            b.cipher_suite = self.bmc_cipher_suite;
        }
        Ok(())
    }
}

/// Manage cluster nodes (ranges like node[001-128] are accepted wherever NODES appears).
#[derive(Parser, Debug)]
#[command(name = "si-node", version)]
pub struct NodeCli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub cmd: NodeCmd,
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Add nodes; --mac, --ip and --bmc-host increase by one per node of the range.
    Add {
        nodes: String,
        /// First MAC address (repeat for nodes with several interfaces).
        #[arg(long)]
        mac: Vec<String>,
        /// First IPv4 address.
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        image: Option<String>,
        /// Host name (single node only; defaults to the node name).
        #[arg(long)]
        hostname: Option<String>,
        /// install, local or autoinstall (the distribution's installer, see --profile).
        #[arg(long, visible_alias = "action", default_value = "install")]
        boot: String,
        /// Automatic-install profile (`si-profile`); overrides the group's.
        #[arg(long)]
        profile: Option<String>,
        /// Rack label: install waves chain the nodes of a rack together.
        #[arg(long)]
        rack: Option<String>,
        /// Switch label (the next grouping when racks are not recorded).
        #[arg(long)]
        switch: Option<String>,
        /// Permanent (infinite) DHCP lease.
        #[arg(long)]
        permanent: bool,
        #[command(flatten)]
        bmc: BmcArgs,
    },
    /// List nodes.
    List { nodes: Option<String> },
    /// Show nodes in detail (passwords as ***), with their enrollment and any alarm.
    Show { nodes: String },
    /// Cut nodes off: their certificates are refused from their next request on (open sessions
    /// included). Arming an install lets a node enroll again.
    Revoke { nodes: String },
    /// What a node may fetch and do on the image service.
    Access { node: String },
    /// Change nodes.
    Set {
        nodes: String,
        /// Replace the MAC addresses (incremented along the range).
        #[arg(long)]
        mac: Vec<String>,
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
        /// install, local, autoinstall or custom (custom needs --kernel).
        #[arg(long, visible_alias = "action")]
        boot: Option<String>,
        /// Automatic-install profile (`si-profile`); an empty value clears it.
        #[arg(long)]
        profile: Option<String>,
        /// Rack label; an empty value clears it.
        #[arg(long)]
        rack: Option<String>,
        /// Switch label; an empty value clears it.
        #[arg(long)]
        switch: Option<String>,
        #[arg(long)]
        kernel: Option<String>,
        #[arg(long)]
        initrd: Option<String>,
        #[arg(long)]
        cmdline: Option<String>,
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        permanent: Option<bool>,
        #[command(flatten)]
        bmc: BmcArgs,
    },
    /// Remove nodes.
    Rm { nodes: String },
    /// Mark nodes installed: boot action becomes local.
    Installed { nodes: String },
    /// Write the whole cluster as TOML to stdout (passwords as *** unless --with-secrets).
    Export {
        #[arg(long)]
        with_secrets: bool,
    },
    /// Add or update everything in a cluster TOML file.
    Import {
        file: PathBuf,
        /// Also remove nodes, groups and subnets that the file does not mention.
        #[arg(long)]
        prune: bool,
    },
    /// Show the change history.
    History {
        nodes: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Configured subnets.
    #[command(subcommand)]
    Subnet(SubnetCmd),
    /// DHCP leases.
    Leases,
}

#[derive(Subcommand, Debug)]
pub enum SubnetCmd {
    Add {
        name: String,
        /// e.g. 10.213.0.0/16
        #[arg(long)]
        network: String,
        #[arg(long)]
        router: Option<Ipv4Addr>,
        #[arg(long, value_delimiter = ',')]
        dns: Vec<Ipv4Addr>,
        #[arg(long)]
        domain: Option<String>,
        /// Dynamic pool FIRST-LAST.
        #[arg(long)]
        pool: Option<String>,
        /// Seconds.
        #[arg(long, default_value_t = 3600)]
        lease_time: u32,
        /// Pool leases never expire.
        #[arg(long)]
        permanent: bool,
    },
    List,
    Rm {
        name: String,
    },
}

/// Manage groups (hardware profiles).
#[derive(Parser, Debug)]
#[command(name = "si-group", version)]
pub struct GroupCli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub cmd: GroupCmd,
}

#[derive(Args, Debug, Clone, Default)]
pub struct GroupArgs {
    #[arg(long)]
    pub description: Option<String>,
    #[arg(long)]
    pub image: Option<String>,
    #[arg(long)]
    pub disk_layout: Option<String>,
    #[arg(long, allow_hyphen_values = true)]
    pub kernel_args: Option<String>,
    /// auto, bios or uefi.
    #[arg(long)]
    pub firmware: Option<String>,
    /// Automatic-install profile of the group's nodes (`si-profile`); empty clears it.
    #[arg(long)]
    pub profile: Option<String>,
    #[command(flatten)]
    pub bmc: BmcArgs,
}

#[derive(Subcommand, Debug)]
pub enum GroupCmd {
    Add {
        name: String,
        #[command(flatten)]
        args: GroupArgs,
    },
    List,
    Show {
        name: String,
    },
    Set {
        name: String,
        #[command(flatten)]
        args: GroupArgs,
    },
    Rm {
        name: String,
    },
}

/// The enrollment part of `si-node show` (the token itself is never shown: the inventory does
/// not hold it).
fn enrollment_lines(e: Option<&Enrollment>) -> String {
    let Some(e) = e else {
        return "enrollment: none".into();
    };
    let mut s = format!(
        "enrollment: {}\ncertificate: {}{}",
        match e.spent {
            Some(t) => format!("spent at {t}"),
            None if e.expires > crate::now() => format!("open until {}", e.expires),
            None => "expired".into(),
        },
        e.cert.as_deref().unwrap_or("-"),
        if e.revoked { " (revoked)" } else { "" }
    );
    if let Some(a) = &e.alarm {
        s.push_str(&format!("\nALARM: {a}"));
    }
    s
}

fn boot_action(
    kind: &str,
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
) -> Result<BootAction> {
    Ok(match kind {
        "install" => BootAction::Install,
        "local" => BootAction::Local,
        "autoinstall" => BootAction::Autoinstall,
        "custom" => BootAction::Custom {
            kernel: kernel.context("--boot custom needs --kernel")?,
            initrd,
            cmdline: cmdline.unwrap_or_default(),
        },
        _ => bail!("unknown boot action {kind:?} (install, local, autoinstall or custom)"),
    })
}

/// Names of existing nodes matching a range expression; unknown names are an error.
fn existing(inv: &Inventory, expr: &str) -> Result<Vec<Node>> {
    let names = ranges::expand(expr)?;
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        out.push(
            inv.node(&n)?
                .with_context(|| format!("unknown node {n:?}"))?,
        );
    }
    Ok(out)
}

pub fn node_main(mut cli: NodeCli) -> Result<()> {
    match &mut cli.cmd {
        NodeCmd::Add { bmc, .. } | NodeCmd::Set { bmc, .. } => bmc.read_secret()?,
        _ => {}
    }
    let c = &cli.common;
    let inv = c.open()?;
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        NodeCmd::Add {
            nodes,
            mac,
            ip,
            group,
            image,
            hostname,
            boot,
            profile,
            rack,
            switch,
            permanent,
            bmc,
        } => {
            let names = ranges::expand(&nodes)?;
            if hostname.is_some() && names.len() > 1 {
                bail!("--hostname applies to a single node");
            }
            c.note_unchecked(&image);
            let boot = boot_action(&boot, None, None, None)?;
            let mut list = Vec::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                let i = i as u32;
                let mut n = Node {
                    name: name.clone(),
                    macs: mac
                        .iter()
                        .map(|m| mac_add(m, u64::from(i)))
                        .collect::<Result<_>>()?,
                    ip: ip.map(|ip| ip_add(ip, i)).transpose()?,
                    hostname: hostname.clone(),
                    group: group.clone(),
                    image: image.clone(),
                    boot: boot.clone(),
                    state: "new".into(),
                    permanent,
                    bmc: Bmc::default(),
                    profile: profile.clone(),
                    rack: rack.clone(),
                    switch: switch.clone(),
                };
                bmc.apply(&mut n.bmc, i)?;
                list.push(n);
            }
            inv.add_nodes(&list, c.catalog().as_ref())?;
            // A node added to be installed is armed: its one-time enrollment opens.
            for n in list
                .iter()
                .filter(|n| matches!(n.boot, BootAction::Install))
            {
                inv.arm_enrollment(&n.name, DEFAULT_WINDOW_SECS)?;
            }
            eprintln!("added {} node(s)", list.len());
        }
        NodeCmd::List { nodes } => {
            let list = match nodes {
                Some(r) => existing(&inv, &r)?,
                None => inv.nodes()?,
            };
            writeln!(
                out,
                "{:<16} {:<18} {:<15} {:<10} {:<12} {:<8} STATE",
                "NAME", "MAC", "IP", "GROUP", "IMAGE", "BOOT"
            )
            .context("writing to stdout")?;
            for n in list {
                writeln!(
                    out,
                    "{:<16} {:<18} {:<15} {:<10} {:<12} {:<8} {}",
                    n.name,
                    n.macs.join(","),
                    n.ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                    n.group.as_deref().unwrap_or("-"),
                    n.image.as_deref().unwrap_or("-"),
                    n.boot.kind(),
                    n.state
                )
                .context("writing to stdout")?;
            }
        }
        NodeCmd::Show { nodes } => {
            for n in existing(&inv, &nodes)? {
                let b = inv.boot_info(&n.name)?.context("node vanished")?;
                let bmc = inv.bmc(&n.name)?.unwrap_or_default().redacted();
                writeln!(
                    out,
                    "name: {}\nmacs: {}\nip: {}\nhostname: {}\ngroup: {}\nimage: {}\nboot: {}\nstate: {}\npermanent lease: {}\nkernel args: {}\nfirmware: {}\nprofile: {}\nrack: {}\nswitch: {}\nbmc: host={} port={} user={} password={} driver={} cipher-suite={}\n",
                    n.name,
                    n.macs.join(", "),
                    opt(&n.ip),
                    b.hostname,
                    opt(&n.group),
                    b.image.as_deref().unwrap_or("-"),
                    n.boot,
                    n.state,
                    n.permanent,
                    b.kernel_args,
                    b.firmware.as_str(),
                    opt(&b.profile),
                    opt(&n.rack),
                    opt(&n.switch),
                    opt(&bmc.host),
                    opt(&bmc.port),
                    opt(&bmc.user),
                    opt(&bmc.password),
                    opt(&bmc.driver),
                    opt(&bmc.cipher_suite),
                )
                .context("writing to stdout")?;
                let e = inv.enrollment(&n.name)?;
                writeln!(out, "{}", enrollment_lines(e.as_ref())).context("writing to stdout")?;
            }
        }
        NodeCmd::Revoke { nodes } => {
            for n in existing(&inv, &nodes)? {
                inv.revoke(&n.name)?;
                eprintln!("revoked {}", n.name);
            }
        }
        NodeCmd::Access { node } => {
            let n = inv
                .node(&node)?
                .with_context(|| format!("unknown node {node:?}"))?;
            let e = inv.enrollment(&n.name)?;
            let images = inv.entitled_images(&n.name)?;
            let usable = e.as_ref().is_some_and(|e| e.cert.is_some() && !e.revoked);
            writeln!(
                out,
                "node: {}\ncertificate: {}\nmay fetch: {}\nmay report: {}\n",
                n.name,
                match &e {
                    Some(e) if e.revoked => "revoked".to_string(),
                    Some(Enrollment { cert: Some(c), .. }) => c.clone(),
                    _ => "none (not enrolled)".to_string(),
                },
                if !usable {
                    "nothing".to_string()
                } else if images.is_empty() {
                    "nothing (no image for the node or its group)".to_string()
                } else {
                    format!("manifests and objects of {}", images.join(", "))
                },
                if usable {
                    "about itself only"
                } else {
                    "nothing"
                },
            )
            .context("writing to stdout")?;
        }
        NodeCmd::Set {
            nodes,
            mac,
            ip,
            group,
            image,
            hostname,
            boot,
            profile,
            rack,
            switch,
            kernel,
            initrd,
            cmdline,
            state,
            permanent,
            bmc,
        } => {
            let list = existing(&inv, &nodes)?;
            if hostname.is_some() && list.len() > 1 {
                bail!("--hostname applies to a single node");
            }
            c.note_unchecked(&image);
            let boot = match boot {
                Some(b) => Some(boot_action(&b, kernel, initrd, cmdline)?),
                None if kernel.is_some() || initrd.is_some() || cmdline.is_some() => {
                    bail!("--kernel, --initrd and --cmdline go with --boot custom")
                }
                None => None,
            };
            let mut changed = Vec::with_capacity(list.len());
            for (i, mut n) in list.into_iter().enumerate() {
                let i = i as u32;
                if !mac.is_empty() {
                    n.macs = mac
                        .iter()
                        .map(|m| mac_add(m, u64::from(i)))
                        .collect::<Result<_>>()?;
                }
                if let Some(ip) = ip {
                    n.ip = Some(ip_add(ip, i)?);
                }
                if group.is_some() {
                    n.group.clone_from(&group);
                }
                if image.is_some() {
                    n.image.clone_from(&image);
                }
                if hostname.is_some() {
                    n.hostname.clone_from(&hostname);
                }
                if let Some(b) = &boot {
                    n.boot = b.clone();
                }
                if let Some(p) = &profile {
                    n.profile = (!p.is_empty()).then(|| p.clone());
                }
                if let Some(r) = &rack {
                    n.rack = (!r.is_empty()).then(|| r.clone());
                }
                if let Some(s) = &switch {
                    n.switch = (!s.is_empty()).then(|| s.clone());
                }
                if let Some(s) = &state {
                    n.state.clone_from(s);
                }
                if let Some(p) = permanent {
                    n.permanent = p;
                }
                bmc.apply(&mut n.bmc, i)?;
                changed.push(n);
            }
            // Free MACs/IPs inside the range first so shifting a range works.
            inv.update_nodes(&changed, c.catalog().as_ref())?;
            // Arming an install opens the node's one-time enrollment.
            if matches!(boot, Some(BootAction::Install)) {
                for n in &changed {
                    inv.arm_enrollment(&n.name, DEFAULT_WINDOW_SECS)?;
                }
            }
            eprintln!("updated {} node(s)", changed.len());
        }
        NodeCmd::Rm { nodes } => {
            let names: Vec<String> = existing(&inv, &nodes)?
                .into_iter()
                .map(|n| n.name)
                .collect();
            inv.remove_nodes(&names)?;
            eprintln!("removed {} node(s)", names.len());
        }
        NodeCmd::Installed { nodes } => {
            for n in existing(&inv, &nodes)? {
                inv.mark_installed(&n.name)?;
            }
        }
        NodeCmd::Export { with_secrets } => {
            let cluster = inv.export(with_secrets)?;
            let text = toml::to_string(&cluster).context("serialising the cluster")?;
            writeln!(out, "# si cluster, exported from {}", inv.path().display())
                .and_then(|_| out.write_all(text.as_bytes()))
                .context("writing to stdout")?;
        }
        NodeCmd::Import { file, prune } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let cluster: Cluster =
                toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
            inv.import(&cluster, c.catalog().as_ref(), prune)
                .with_context(|| format!("importing {}", file.display()))?;
            eprintln!(
                "imported {} subnet(s), {} group(s), {} node(s)",
                cluster.subnets.len(),
                cluster.groups.len(),
                cluster.nodes.len()
            );
        }
        NodeCmd::History { nodes, limit } => {
            let entries = match nodes {
                None => inv.history(None, limit)?,
                Some(r) => {
                    let mut v = Vec::new();
                    for n in ranges::expand(&r)? {
                        v.extend(inv.history(Some(&format!("node/{n}")), limit)?);
                    }
                    v.sort_by_key(|e| e.id);
                    v
                }
            };
            for e in entries {
                writeln!(
                    out,
                    "{} {:<10} {:<8} {:<20} {}",
                    e.at, e.actor, e.action, e.object, e.detail
                )
                .context("writing to stdout")?;
            }
        }
        NodeCmd::Subnet(cmd) => match cmd {
            SubnetCmd::Add {
                name,
                network,
                router,
                dns,
                domain,
                pool,
                lease_time,
                permanent,
            } => {
                let (network, prefix) = parse_cidr(&network)?;
                let (pool_start, pool_end) = match pool {
                    Some(p) => {
                        let (a, b) = p.split_once('-').context("--pool is FIRST-LAST")?;
                        (
                            Some(a.trim().parse().with_context(|| format!("parsing {a:?}"))?),
                            Some(b.trim().parse().with_context(|| format!("parsing {b:?}"))?),
                        )
                    }
                    None => (None, None),
                };
                inv.put_subnet(&Subnet {
                    name,
                    network,
                    prefix,
                    router,
                    dns,
                    domain,
                    pool_start,
                    pool_end,
                    lease_time,
                    permanent,
                })?;
            }
            SubnetCmd::List => {
                for s in inv.subnets()? {
                    writeln!(
                        out,
                        "{:<10} {}/{} router={} dns={} pool={}-{} lease={}s{}",
                        s.name,
                        s.network,
                        s.prefix,
                        opt(&s.router),
                        s.dns
                            .iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        opt(&s.pool_start),
                        opt(&s.pool_end),
                        s.lease_time,
                        if s.permanent { " permanent" } else { "" }
                    )
                    .context("writing to stdout")?;
                }
            }
            SubnetCmd::Rm { name } => inv.remove_subnet(&name)?,
        },
        NodeCmd::Leases => {
            let now = now();
            for l in inv.leases()? {
                let left = match l.expires {
                    None => "permanent".to_string(),
                    Some(e) if e > now => format!("{}s left", e - now),
                    Some(_) => "expired".to_string(),
                };
                writeln!(out, "{:<15} {} {:<9} {}", l.ip, l.mac, l.state, left)
                    .context("writing to stdout")?;
            }
        }
    }
    Ok(())
}

fn apply_group(g: &mut Group, a: &GroupArgs) -> Result<()> {
    if let Some(d) = &a.description {
        g.description.clone_from(d);
    }
    if a.image.is_some() {
        g.image.clone_from(&a.image);
    }
    if a.disk_layout.is_some() {
        g.disk_layout.clone_from(&a.disk_layout);
    }
    if let Some(k) = &a.kernel_args {
        g.kernel_args.clone_from(k);
    }
    if let Some(f) = &a.firmware {
        g.firmware = Firmware::parse(f)?;
    }
    if let Some(p) = &a.profile {
        g.profile = (!p.is_empty()).then(|| p.clone());
    }
    a.bmc.apply(&mut g.bmc, 0)
}

pub fn group_main(mut cli: GroupCli) -> Result<()> {
    match &mut cli.cmd {
        GroupCmd::Add { args, .. } | GroupCmd::Set { args, .. } => args.bmc.read_secret()?,
        _ => {}
    }
    let c = &cli.common;
    let inv = c.open()?;
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        GroupCmd::Add { name, args } => {
            let mut g = Group {
                name,
                ..Default::default()
            };
            apply_group(&mut g, &args)?;
            c.note_unchecked(&g.image);
            inv.add_group(&g, c.catalog().as_ref())?;
        }
        GroupCmd::Set { name, args } => {
            let mut g = inv
                .group(&name)?
                .with_context(|| format!("unknown group {name:?}"))?;
            apply_group(&mut g, &args)?;
            c.note_unchecked(&args.image);
            inv.update_group(&g, c.catalog().as_ref())?;
        }
        GroupCmd::List => {
            writeln!(
                out,
                "{:<12} {:<14} {:<8} {:<14} DESCRIPTION",
                "NAME", "IMAGE", "FIRMWARE", "DISK-LAYOUT"
            )
            .context("writing to stdout")?;
            for g in inv.groups()? {
                writeln!(
                    out,
                    "{:<12} {:<14} {:<8} {:<14} {}",
                    g.name,
                    g.image.as_deref().unwrap_or("-"),
                    g.firmware.as_str(),
                    g.disk_layout.as_deref().unwrap_or("-"),
                    g.description
                )
                .context("writing to stdout")?;
            }
        }
        GroupCmd::Show { name } => {
            let g = inv
                .group(&name)?
                .with_context(|| format!("unknown group {name:?}"))?;
            let b = g.bmc.redacted();
            writeln!(
                out,
                "name: {}\ndescription: {}\nimage: {}\ndisk layout: {}\nkernel args: {}\nfirmware: {}\nbmc: host={} port={} user={} password={} driver={} cipher-suite={}",
                g.name,
                g.description,
                opt(&g.image),
                opt(&g.disk_layout),
                g.kernel_args,
                g.firmware.as_str(),
                opt(&b.host),
                opt(&b.port),
                opt(&b.user),
                opt(&b.password),
                opt(&b.driver),
                opt(&b.cipher_suite),
            )
            .context("writing to stdout")?;
        }
        GroupCmd::Rm { name } => inv.remove_group(&name)?,
    }
    Ok(())
}
