//! Per-node boot configurations for PXELINUX, iPXE and GRUB, generated from [`BootNode`]s.
//!
//! [`render`] turns nodes into a map of relative paths to file contents:
//!
//! ```text
//! boot.ipxe                          iPXE entry script: chains boot/<mac>.ipxe, else boot/default.ipxe
//! boot/default.ipxe                  unknown nodes: boot the local disk
//! boot/52-54-00-12-34-56.ipxe        per MAC (lowercase, dashes)
//! pxelinux.cfg/default               unknown nodes
//! pxelinux.cfg/<uuid>                per node with a UUID
//! pxelinux.cfg/01-52-54-00-12-34-56  per MAC
//! pxelinux.cfg/0AD50A05              per IPv4 address (uppercase hex)
//! grub/grub.cfg                      chains grub.cfg-01-<mac>, falls back to local boot
//! grub/grub.cfg-01-52-54-00-12-34-56 per MAC (GRUB's own search)
//! grub/grub.cfg-01-52:54:00:12:34:56 the same, for grub.cfg's chain by $net_default_mac
//! grub/grub.cfg-0AD50A05             per IPv4 address
//! ```
//!
//! The map is served by both the TFTP and HTTP servers through [`Generated`], or written out
//! with [`write_tree`]. Where a generated file and a file in the served root share a path,
//! [`GenerateConfig::boot_files`] decides ([`Precedence`]: the root's file by default), and
//! [`GenerateConfig::no_generate`] turns generation off per loader ([`Loader`]); both servers
//! ask [`Generated::lookup`], so they always serve the same file for a path.

use crate::tftp::root::{self, PathError};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// What a node should boot.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type", deny_unknown_fields)]
pub enum BootAction {
    /// Netboot si's installer, which puts `image` on the node.
    Install { image: String },
    /// Boot the node's local disk.
    Local,
    /// Boot a given kernel (paths relative to the served roots).
    Custom {
        kernel: String,
        initrd: Option<String>,
        cmdline: String,
    },
    /// Boot a distribution's own installer (kernel and initrd relative to the served roots)
    /// with its family's answer-file argument pointing at `answer_url`.
    Autoinstall {
        family: Family,
        kernel: String,
        initrd: String,
        /// The node's own answer file (served only to the node, see `si-autoinstall`).
        answer_url: String,
        /// The distribution's package tree over HTTP, if it has one.
        #[serde(default)]
        tree_url: Option<String>,
        /// Host name handed to installers that take it on the command line (d-i).
        hostname: String,
    },
}

/// Installer families, by the answer-file argument their kernel command line takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Debian and Ubuntu's debian-installer: a preseed file.
    Debian,
    /// Anaconda (Red Hat, Fedora, Rocky, Alma...): a Kickstart file.
    Redhat,
    /// SUSE's YaST: an AutoYaST profile.
    Suse,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Debian => "debian",
            Family::Redhat => "redhat",
            Family::Suse => "suse",
        }
    }

    /// The kernel arguments that make the installer fetch `answer` and run unattended.
    pub fn answer_args(self, answer: &str, tree: Option<&str>, hostname: &str) -> String {
        match self {
            // auto=true delays the locale and keyboard questions until the preseed file is
            // read; priority=critical asks nothing that has a default; interface=auto picks
            // the interface that got a DHCP answer.
            Family::Debian => format!(
                "auto=true priority=critical url={answer} interface=auto hostname={hostname}"
            ),
            Family::Redhat => match tree {
                Some(t) => format!("inst.ks={answer} inst.repo={t}"),
                None => format!("inst.ks={answer}"),
            },
            Family::Suse => match tree {
                Some(t) => format!("autoyast={answer} install={t}"),
                None => format!("autoyast={answer}"),
            },
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Family {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Family> {
        Ok(match s {
            "debian" => Family::Debian,
            "redhat" => Family::Redhat,
            "suse" => Family::Suse,
            _ => bail!("unknown installer family {s:?} (debian, redhat or suse)"),
        })
    }
}

/// Firmware of a node; `Any` makes scripts that work on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    Bios,
    Uefi,
    #[default]
    Any,
}

/// One node as the boot services see it (the inventory converts its rows into this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootNode {
    pub name: String,
    pub macs: Vec<[u8; 6]>,
    pub ip: Option<Ipv4Addr>,
    /// SMBIOS UUID as pxelinux prints it (lowercase, dashed).
    pub uuid: Option<String>,
    pub action: BootAction,
    /// Extra kernel arguments appended for `Install`.
    pub kernel_args: String,
    pub firmware: Firmware,
}

/// Server-wide settings the configurations refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSettings {
    /// Base URL of the HTTP server, without a trailing slash (`http://10.213.0.1:8080`).
    pub http_base: String,
    /// Value of `si.server=` on installer command lines.
    pub si_server: String,
    /// Installer kernel and initrd, relative to the served roots.
    pub installer_kernel: String,
    pub installer_initrd: String,
    /// Action for nodes with no file of their own.
    pub default_action: BootAction,
}

/// Which file is served when a generated file and a file in the served root share a path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Precedence {
    /// The root's file (the operator's own loader configuration, a vendor's tool); generated
    /// files fill in the paths the root lacks.
    #[default]
    RootFirst,
    /// The generated file; the root's file of the same path is never served.
    GeneratedFirst,
}

/// The boot loaders si generates configurations for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Loader {
    /// `boot.ipxe`, `boot/*.ipxe`.
    Ipxe,
    /// `pxelinux.cfg/*`.
    Pxelinux,
    /// `grub/grub.cfg*`.
    Grub,
}

impl Loader {
    /// The loader a generated path belongs to.
    pub fn of(path: &str) -> Option<Loader> {
        if path == "boot.ipxe" || (path.starts_with("boot/") && path.ends_with(".ipxe")) {
            Some(Loader::Ipxe)
        } else if path.starts_with("pxelinux.cfg/") {
            Some(Loader::Pxelinux)
        } else if path.starts_with("grub/grub.cfg") {
            Some(Loader::Grub)
        } else {
            None
        }
    }
}

/// Which boot files are generated and how they meet the operator's files in the served root:
/// command-line flags of `si-server` and `si-bootd`, and a TOML table with the same keys.
#[derive(Args, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct GenerateConfig {
    /// Where a generated boot file and a file in the TFTP/HTTP root share a path: serve the
    /// root's file (root-first) or the generated one (generated-first).
    #[arg(long, value_enum, default_value_t = Precedence::RootFirst)]
    pub boot_files: Precedence,
    /// Generate no configuration files for these loaders (comma-separated: ipxe, pxelinux,
    /// grub); the site's own files in the root are served instead.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub no_generate: Vec<Loader>,
}

/// What a request path resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A generated file's contents.
    Generated(Arc<[u8]>),
    /// A regular file beneath the root (canonical path).
    File(PathBuf),
}

/// Generated files shared with the servers; replace the whole set when nodes change.
#[derive(Debug, Clone, Default)]
pub struct Generated {
    files: Arc<RwLock<BTreeMap<String, Arc<[u8]>>>>,
    cfg: Arc<GenerateConfig>,
    /// Directories served beneath a path prefix (see [`Generated::mount`]).
    mounts: Arc<RwLock<BTreeMap<String, PathBuf>>>,
}

impl Generated {
    /// `files` with the default configuration (root first, every loader generated).
    pub fn new(files: BTreeMap<String, String>) -> Generated {
        Generated::with_config(GenerateConfig::default(), files)
    }

    pub fn with_config(cfg: GenerateConfig, files: BTreeMap<String, String>) -> Generated {
        let g = Generated {
            files: Default::default(),
            cfg: Arc::new(cfg),
            mounts: Default::default(),
        };
        g.replace(files);
        g
    }

    pub fn config(&self) -> &GenerateConfig {
        &self.cfg
    }

    /// Contents of a normalised relative path, if generated.
    pub fn get(&self, path: &str) -> Option<Arc<[u8]>> {
        // A poisoned lock only means a writer panicked; the map itself is always whole.
        let map = self.files.read().unwrap_or_else(|e| e.into_inner());
        map.get(path).cloned()
    }

    /// The paths generated now.
    pub fn paths(&self) -> Vec<String> {
        let map = self.files.read().unwrap_or_else(|e| e.into_inner());
        map.keys().cloned().collect()
    }

    /// Replaces the set; files of loaders in `no_generate` are left out.
    pub fn replace(&self, files: BTreeMap<String, String>) {
        let new = files
            .into_iter()
            .filter(|(k, _)| Loader::of(k).is_none_or(|l| !self.cfg.no_generate.contains(&l)))
            .map(|(k, v)| (k, Arc::from(v.into_bytes())))
            .collect();
        *self.files.write().unwrap_or_else(|e| e.into_inner()) = new;
    }

    /// What a normalised request path (see [`root::normalize`]) serves, beneath the canonical
    /// `root`, in the configured [`Precedence`]. With root first, only a path the root lacks
    /// falls through to a generated file; a path the root refuses (a symlink out of it, a
    /// directory) stays refused.
    pub fn lookup(&self, root: &Path, rel: &str) -> Result<Found, PathError> {
        if let Some(found) = self.lookup_mounted(rel) {
            return found;
        }
        match self.cfg.boot_files {
            Precedence::GeneratedFirst => match self.get(rel) {
                Some(d) => Ok(Found::Generated(d)),
                None => root::resolve(root, rel).map(Found::File),
            },
            Precedence::RootFirst => match root::resolve(root, rel) {
                Err(PathError::NotFound) => self
                    .get(rel)
                    .map(Found::Generated)
                    .ok_or(PathError::NotFound),
                r => r.map(Found::File),
            },
        }
    }

    /// Serves the directory `dir` beneath the path `prefix` (one normalised segment, e.g.
    /// `autoinstall`) over both TFTP and HTTP, whatever the roots hold there: the distributions
    /// imported by si-autoinstall live in the server's state directory, not in a served root.
    /// Paths resolve beneath `dir` with the roots' rules (no symlink out of it).
    pub fn mount(&self, prefix: &str, dir: &Path) -> anyhow::Result<()> {
        if prefix.is_empty() || prefix.contains('/') || prefix.starts_with('.') {
            bail!("mount prefix {prefix:?} must be one path segment");
        }
        let dir = std::fs::canonicalize(dir)
            .with_context(|| format!("opening mounted directory {}", dir.display()))?;
        let mut m = self.mounts.write().unwrap_or_else(|e| e.into_inner());
        m.insert(prefix.to_string(), dir);
        Ok(())
    }

    fn lookup_mounted(&self, rel: &str) -> Option<Result<Found, PathError>> {
        let (first, rest) = rel.split_once('/')?;
        let m = self.mounts.read().unwrap_or_else(|e| e.into_inner());
        let dir = m.get(first)?;
        Some(root::resolve(dir, rest).map(Found::File))
    }

    /// Generated paths that a file in `root` shares, for the start-up log.
    pub fn shared_with(&self, root: &Path) -> Vec<String> {
        self.paths()
            .into_iter()
            .filter(|p| root.join(p).exists())
            .collect()
    }
}

/// `52-54-00-12-34-56`.
pub fn mac_dashed(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join("-")
}

/// Parses `52:54:00:12:34:56` or `52-54-00-12-34-56`.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        bail!("invalid MAC address {s:?}");
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            bail!("invalid MAC address {s:?}");
        }
        *m = u8::from_str_radix(p, 16).with_context(|| format!("invalid MAC address {s:?}"))?;
    }
    Ok(mac)
}

/// `10.213.10.5` → `0AD50A05`.
pub fn ip_hex(ip: Ipv4Addr) -> String {
    ip.octets().iter().map(|b| format!("{b:02X}")).collect()
}

/// The files pxelinux asks for, in its order: UUID, `01-<mac>`, the IP in hex from 8 digits
/// down to 1, `default` (all under `pxelinux.cfg/`).
pub fn pxelinux_lookup_order(
    uuid: Option<&str>,
    mac: &[u8; 6],
    ip: Option<Ipv4Addr>,
) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(u) = uuid {
        v.push(format!("pxelinux.cfg/{}", u.to_ascii_lowercase()));
    }
    v.push(format!("pxelinux.cfg/01-{}", mac_dashed(mac)));
    if let Some(ip) = ip {
        let hex = ip_hex(ip);
        for n in (1..=8).rev() {
            v.push(format!("pxelinux.cfg/{}", &hex[..n]));
        }
    }
    v.push("pxelinux.cfg/default".into());
    v
}

/// The files GRUB's network config search asks for (`grub_net_search_config_file`):
/// `grub.cfg-01-<mac>`, `grub.cfg-<IP hex>` from 8 digits down to 1, `grub.cfg`.
pub fn grub_lookup_order(mac: &[u8; 6], ip: Option<Ipv4Addr>) -> Vec<String> {
    let mut v = vec![format!("grub/grub.cfg-01-{}", mac_dashed(mac))];
    if let Some(ip) = ip {
        let hex = ip_hex(ip);
        for n in (1..=8).rev() {
            v.push(format!("grub/grub.cfg-{}", &hex[..n]));
        }
    }
    v.push("grub/grub.cfg".into());
    v
}

/// A resolved kernel, initrd and command line.
struct Kernel<'a> {
    kernel: &'a str,
    initrd: Option<&'a str>,
    cmdline: String,
}

fn kernel_for<'a>(
    s: &'a BootSettings,
    name: &str,
    args: &str,
    action: &'a BootAction,
) -> Option<Kernel<'a>> {
    match action {
        BootAction::Local => None,
        BootAction::Install { image } => {
            let mut cmdline = format!("si.server={} si.image={image} si.node={name}", s.si_server);
            if !args.trim().is_empty() {
                cmdline.push(' ');
                cmdline.push_str(args.trim());
            }
            Some(Kernel {
                kernel: &s.installer_kernel,
                initrd: Some(&s.installer_initrd),
                cmdline,
            })
        }
        BootAction::Custom {
            kernel,
            initrd,
            cmdline,
        } => Some(Kernel {
            kernel,
            initrd: initrd.as_deref(),
            cmdline: cmdline.clone(),
        }),
        BootAction::Autoinstall {
            family,
            kernel,
            initrd,
            answer_url,
            tree_url,
            hostname,
        } => {
            let mut cmdline = family.answer_args(answer_url, tree_url.as_deref(), hostname);
            if !args.trim().is_empty() {
                cmdline.push(' ');
                cmdline.push_str(args.trim());
            }
            Some(Kernel {
                kernel,
                initrd: Some(initrd),
                cmdline,
            })
        }
    }
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// An iPXE script for one action.
pub fn ipxe_script(
    s: &BootSettings,
    name: &str,
    args: &str,
    action: &BootAction,
    fw: Firmware,
) -> String {
    let mut o = String::from("#!ipxe\n");
    let _ = writeln!(o, "echo si: booting {name}");
    match kernel_for(s, name, args, action) {
        // Local boot. UEFI: `exit 1`, a failure, so the firmware's boot manager goes on to
        // the next boot option (the disk); a plain `exit` is EFI_SUCCESS, which ends the boot
        // loop in the firmware's menu (OVMF, and most machines, as Warewulf and Tinkerbell
        // found). BIOS: boot the first disk.
        None => match fw {
            Firmware::Bios => o.push_str("sanboot --no-describe --drive 0x80 || exit 1\n"),
            Firmware::Uefi => o.push_str("exit 1\n"),
            Firmware::Any => o.push_str(
                "iseq ${platform} efi && goto si_exit || goto si_sanboot\n\
                 :si_sanboot\nsanboot --no-describe --drive 0x80 || goto si_exit\n:si_exit\nexit 1\n",
            ),
        },
        Some(k) => {
            let base = &s.http_base;
            // The EFI stub reads its initrd from the `initrd=` argument; BIOS kernels ignore it.
            let initrd_arg = k
                .initrd
                .map(|i| format!(" initrd={}", basename(i)))
                .unwrap_or_default();
            let _ = writeln!(o, "kernel {base}/{}{initrd_arg} {}", k.kernel, k.cmdline);
            if let Some(i) = k.initrd {
                let _ = writeln!(o, "initrd {base}/{i}");
            }
            o.push_str("boot\n");
        }
    }
    o
}

/// A PXELINUX configuration for one action.
pub fn pxelinux_config(s: &BootSettings, name: &str, args: &str, action: &BootAction) -> String {
    let mut o = format!("# si: {name}\nDEFAULT si\nPROMPT 0\nTIMEOUT 0\nLABEL si\n");
    match kernel_for(s, name, args, action) {
        None => o.push_str("  LOCALBOOT 0\n"),
        Some(k) => {
            let _ = writeln!(o, "  KERNEL {}", k.kernel);
            if let Some(i) = k.initrd {
                let _ = writeln!(o, "  INITRD {i}");
            }
            let _ = writeln!(o, "  APPEND {}", k.cmdline);
        }
    }
    o
}

/// A GRUB configuration for one action (GRUB's root is the TFTP server when netbooted).
pub fn grub_config(s: &BootSettings, name: &str, args: &str, action: &BootAction) -> String {
    let mut o = format!("# si: {name}\nset timeout=0\nmenuentry 'si: {name}' {{\n");
    match kernel_for(s, name, args, action) {
        None => o.push_str("  exit\n"),
        Some(k) => {
            let _ = writeln!(o, "  linux /{} {}", k.kernel, k.cmdline);
            if let Some(i) = k.initrd {
                let _ = writeln!(o, "  initrd /{i}");
            }
        }
    }
    o.push_str("}\n");
    o
}

/// The iPXE entry script every iPXE client is pointed at.
pub fn ipxe_entry(s: &BootSettings) -> String {
    format!(
        "#!ipxe\nchain {b}/boot/${{mac:hexhyp}}.ipxe || chain {b}/boot/default.ipxe\n",
        b = s.http_base
    )
}

/// `grub/grub.cfg`: GRUB reads this when its network search finds no per-node file (GRUB ≥
/// 2.04 searches `grub.cfg-01-<mac>` and `grub.cfg-<IP hex>` itself), or first when built
/// without the search. It chains the node's file by GRUB's own `$net_default_mac`
/// (`grub.cfg-01-52:54:00:12:34:56`, the same text as the dashed file), which needs only the
/// `configfile` command: no `regexp` or `test` module, whose absence GRUB's `if` does not even
/// see (an unknown command leaves `$?` as it was). For an unknown node the chain is an error
/// message, and the default entry boots at once (`timeout=0`).
pub fn grub_entry(s: &BootSettings) -> String {
    let mut o = String::from("configfile \"$prefix/grub.cfg-01-$net_default_mac\"\n");
    o.push_str(&grub_config(s, "default", "", &s.default_action));
    o
}

/// Checks a node's fields that end up in paths or command lines.
fn check_node(n: &BootNode) -> Result<()> {
    let ok = |v: &str| {
        !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !ok(&n.name) {
        bail!("node name {:?} must be non-empty [A-Za-z0-9._-]", n.name);
    }
    if let BootAction::Install { image } = &n.action {
        if !ok(image) {
            bail!(
                "image name {image:?} of node {} must be non-empty [A-Za-z0-9._-]",
                n.name
            );
        }
    }
    if let Some(u) = &n.uuid {
        if u.len() != 36 || !u.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            bail!("UUID {u:?} of node {} is not in 8-4-4-4-12 form", n.name);
        }
    }
    if n.kernel_args.contains('\n') {
        bail!("kernel arguments of node {} contain a newline", n.name);
    }
    if let BootAction::Autoinstall {
        kernel,
        initrd,
        answer_url,
        tree_url,
        hostname,
        ..
    } = &n.action
    {
        // One word each on a kernel line, a loader command and a URL.
        let word = |v: &str| {
            !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_graphic() && !"\"'`$;&|\\{}".contains(c))
        };
        for (what, v) in [
            ("kernel", kernel.as_str()),
            ("initrd", initrd.as_str()),
            ("answer URL", answer_url.as_str()),
            ("host name", hostname.as_str()),
        ]
        .into_iter()
        .chain(tree_url.as_deref().map(|t| ("tree URL", t)))
        {
            if !word(v) {
                bail!("{what} {v:?} of node {} is not one plain word", n.name);
            }
        }
    }
    Ok(())
}

/// All generated files for `nodes`.
pub fn render(s: &BootSettings, nodes: &[BootNode]) -> Result<BTreeMap<String, String>> {
    let mut f = BTreeMap::new();
    f.insert("boot.ipxe".into(), ipxe_entry(s));
    f.insert(
        "boot/default.ipxe".into(),
        ipxe_script(s, "default", "", &s.default_action, Firmware::Any),
    );
    f.insert(
        "pxelinux.cfg/default".into(),
        pxelinux_config(s, "default", "", &s.default_action),
    );
    f.insert("grub/grub.cfg".into(), grub_entry(s));
    for n in nodes {
        check_node(n)?;
        let ipxe = ipxe_script(s, &n.name, &n.kernel_args, &n.action, n.firmware);
        let pxe = pxelinux_config(s, &n.name, &n.kernel_args, &n.action);
        let grub = grub_config(s, &n.name, &n.kernel_args, &n.action);
        let mut put = |path: String, body: &String| -> Result<()> {
            if f.insert(path.clone(), body.clone()).is_some() {
                bail!(
                    "{path} would be generated twice (duplicate MAC, IP or UUID; last was node {})",
                    n.name
                );
            }
            Ok(())
        };
        if let Some(u) = &n.uuid {
            put(format!("pxelinux.cfg/{}", u.to_ascii_lowercase()), &pxe)?;
        }
        for mac in &n.macs {
            put(format!("boot/{}.ipxe", mac_dashed(mac)), &ipxe)?;
            put(format!("pxelinux.cfg/01-{}", mac_dashed(mac)), &pxe)?;
            put(format!("grub/grub.cfg-01-{}", mac_dashed(mac)), &grub)?;
            // For grub.cfg's chain, named by `$net_default_mac`.
            put(
                format!("grub/grub.cfg-01-{}", mac_dashed(mac).replace('-', ":")),
                &grub,
            )?;
        }
        if let Some(ip) = n.ip {
            put(format!("pxelinux.cfg/{}", ip_hex(ip)), &pxe)?;
            put(format!("grub/grub.cfg-{}", ip_hex(ip)), &grub)?;
        }
    }
    Ok(f)
}

/// Writes generated files beneath `dir` (temporary file, fsync, rename for each).
pub fn write_tree(dir: &Path, files: &BTreeMap<String, String>) -> Result<()> {
    for (rel, body) in files {
        let path = dir.join(rel);
        let parent = path.parent().context("generated path has no parent")?;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let mut tmp_name = path
            .file_name()
            .context("generated path has no file name")?
            .to_owned();
        tmp_name.push(".si-tmp");
        let tmp = path.with_file_name(tmp_name);
        {
            use std::io::Write;
            let mut fh = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            fh.write_all(body.as_bytes())
                .with_context(|| format!("writing {}", tmp.display()))?;
            fh.sync_all()
                .with_context(|| format!("syncing {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    }
    Ok(())
}

/// A nodes file as read by `si-bootd --nodes` (TOML).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodesFile {
    #[serde(default)]
    pub node: Vec<NodeEntry>,
}

/// One `[[node]]` of a nodes file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeEntry {
    pub name: String,
    pub macs: Vec<String>,
    pub ip: Option<IpAddr>,
    pub uuid: Option<String>,
    pub action: BootAction,
    #[serde(default)]
    pub kernel_args: String,
    #[serde(default)]
    pub firmware: Firmware,
}

impl TryFrom<NodeEntry> for BootNode {
    type Error = anyhow::Error;
    fn try_from(e: NodeEntry) -> Result<BootNode> {
        let macs = e
            .macs
            .iter()
            .map(|m| parse_mac(m))
            .collect::<Result<Vec<_>>>()?;
        let ip = match e.ip {
            None => None,
            Some(IpAddr::V4(a)) => Some(a),
            Some(IpAddr::V6(a)) => bail!(
                "node {}: IPv6 address {a} not supported for boot files",
                e.name
            ),
        };
        Ok(BootNode {
            name: e.name,
            macs,
            ip,
            uuid: e.uuid.map(|u| u.to_ascii_lowercase()),
            action: e.action,
            kernel_args: e.kernel_args,
            firmware: e.firmware,
        })
    }
}

/// Parses a nodes file.
pub fn parse_nodes(text: &str) -> Result<Vec<BootNode>> {
    let f: NodesFile = toml::from_str(text).context("parsing nodes file")?;
    f.node.into_iter().map(BootNode::try_from).collect()
}

#[cfg(test)]
mod tests;
