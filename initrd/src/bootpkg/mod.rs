//! The boot package (`si-mkbootpackage`, SystemImager's `si_mkbootpackage`): the kernel and
//! initramfs a node netboots into to run the installer.
//!
//! The initramfs holds the static `si-install` binary at `/bin/si-install`, busybox (rescue
//! shell, `udhcpc`, `insmod`), the kernel's modules for network, storage, md, dm and
//! filesystems with their dependencies (`modules.dep`, decompressed), the disk tools of the
//! master with the shared libraries its loader resolves for them, and the `/init` of
//! `init.sh`. The layout is merged-/usr (`bin`, `sbin`, `lib`, `lib64` are links into `usr/`).
//!
//! The kernel comes from the master (`/boot/vmlinuz-*` with `/lib/modules/<release>`), from a
//! given file and module directory, from a tree (an image's root), or from an image in the
//! store (SystemImager's "use your own kernel": the drivers match the installed OS).
//!
//! Output: `vmlinuz`, `initrd.img` and `bootpackage.toml` (what went in) in one directory,
//! each written to a temporary file, fsynced and renamed. `--register ROOT` writes them to
//! `ROOT/si/`, where si-server's `install` action finds them by default
//! (`--installer-kernel si/vmlinuz --installer-initrd si/initrd.img`).

use crate::cpio::Archive;
use crate::libs;
use crate::modules::{self, ModuleDb};
use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `/init`.
pub const INIT: &str = include_str!("init.sh");
/// udhcpc's event script, `/usr/share/udhcpc/default.script`.
pub const UDHCPC_SCRIPT: &str = include_str!("udhcpc.sh");

/// Network drivers (virtual and the common server NICs).
pub const NET_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "ixgbe",
    "i40e",
    "r8169",
    "tg3",
    "bnx2",
    "bnxt_en",
    "af_packet",
];
/// Storage drivers.
pub const STORAGE_MODULES: &[&str] = &[
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "ahci",
    "ata_piix",
    "nvme",
    "mpt3sas",
    "megaraid_sas",
];
/// Software RAID and the device mapper (LVM).
pub const MD_DM_MODULES: &[&str] = &["md_mod", "raid0", "raid1", "raid10", "dm_mod"];
/// Filesystems, their checksums and the code pages vfat mounts with.
pub const FS_MODULES: &[&str] = &[
    "crc32c_generic",
    "crc32c_intel",
    "ext4",
    "vfat",
    "xfs",
    "btrfs",
    "nls_cp437",
    "nls_iso8859_1",
    // Debian's FAT_DEFAULT_IOCHARSET is "ascii": vfat refuses to mount without it.
    "nls_ascii",
    "nls_utf8",
    "efivarfs",
];

/// A tool of the package: installed as `/usr/sbin/<name>`.
struct ToolSpec {
    name: &'static str,
    required: bool,
}

const fn req(name: &'static str) -> ToolSpec {
    ToolSpec {
        name,
        required: true,
    }
}

const fn opt(name: &'static str) -> ToolSpec {
    ToolSpec {
        name,
        required: false,
    }
}

/// The master's tools the installer calls. Required ones missing on the master are an error
/// (with the Debian package to install); optional ones are left out and listed.
const TOOLS: &[ToolSpec] = &[
    req("sfdisk"),   // fdisk
    req("sgdisk"),   // gdisk
    req("wipefs"),   // util-linux
    req("blkid"),    // util-linux
    req("lsblk"),    // util-linux
    req("blockdev"), // util-linux
    req("partx"),    // util-linux
    req("findmnt"),  // util-linux
    req("mount"),    // mount
    req("umount"),   // mount
    req("mke2fs"),   // e2fsprogs
    req("mkfs.ext4"),
    req("e2fsck"),
    opt("fsck.ext4"),
    opt("tune2fs"),
    opt("resize2fs"),
    req("mkfs.vfat"), // dosfstools
    opt("mkfs.fat"),
    opt("fsck.vfat"),
    req("mkswap"), // util-linux
    req("mdadm"),  // mdadm
    req("lvm"),    // lvm2, and its links
    req("pvcreate"),
    req("vgcreate"),
    req("lvcreate"),
    req("vgchange"),
    opt("pvremove"),
    opt("vgremove"),
    opt("lvremove"),
    opt("pvs"),
    opt("vgs"),
    opt("lvs"),
    opt("pvscan"),
    opt("vgscan"),
    opt("lvchange"),
    opt("dmsetup"),    // dmsetup
    opt("mkfs.xfs"),   // xfsprogs
    opt("mkfs.btrfs"), // btrfs-progs
    opt("kexec"),      // kexec-tools
    opt("efibootmgr"), // efibootmgr
];

/// Where tools are looked for on the master (or in `--tools-root`).
const TOOL_DIRS: &[&str] = &["usr/sbin", "usr/bin", "sbin", "bin"];

/// How the initramfs is compressed (the kernel must have the matching `CONFIG_RD_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    #[default]
    Zstd,
    Gzip,
    None,
}

/// `si-mkbootpackage`: both the command line and a TOML file (`--config`).
#[derive(Parser, Debug, Clone, Default, Serialize, Deserialize)]
#[command(
    name = "si-mkbootpackage",
    version,
    about = "Build the kernel and initramfs nodes netboot into to run si-install"
)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct BootPackageConfig {
    /// The kernel to boot (a bzImage). Default: the master's newest `/boot/vmlinuz-*` that has
    /// modules.
    #[arg(long, conflicts_with_all = ["kernel_root", "image"])]
    pub kernel: Option<PathBuf>,
    /// The module directory of `--kernel` (default `/lib/modules/<its release>`).
    #[arg(long, requires = "kernel")]
    pub modules: Option<PathBuf>,
    /// Take kernel and modules from this tree (an image's root): its newest
    /// `boot/vmlinuz-<release>` with `lib/modules/<release>` or `usr/lib/modules/<release>`.
    #[arg(long, conflicts_with = "image")]
    pub kernel_root: Option<PathBuf>,
    /// Take kernel and modules from this image of the store (`NAME` or `NAME@VERSION`).
    #[arg(long, requires = "store")]
    pub image: Option<String>,
    /// The store holding `--image`.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// The installer (a static binary). Default: `si-install` beside this program.
    #[arg(long)]
    pub installer: Option<PathBuf>,
    /// A statically linked busybox (Debian: busybox-static).
    #[arg(long, default_value = "/bin/busybox")]
    #[serde(default = "default_busybox")]
    pub busybox: PathBuf,
    /// Where the tools and their libraries are taken from (the master's root).
    #[arg(long, default_value = "/")]
    #[serde(default = "default_root")]
    pub tools_root: PathBuf,
    /// More modules by name (with their dependencies).
    #[arg(long = "add-module")]
    pub add_modules: Vec<String>,
    /// More tools by name, looked up like the others (required: missing is an error).
    #[arg(long = "add-tool")]
    pub add_tools: Vec<String>,
    /// Keep debugging symbols in the installer (it is stripped by default when `strip` exists).
    #[arg(long)]
    pub no_strip: bool,
    #[arg(long, value_enum, default_value_t = Compression::Zstd)]
    pub compression: Compression,
    /// Write `vmlinuz`, `initrd.img` and `bootpackage.toml` into this directory.
    #[arg(long, required_unless_present_any = ["register", "config"])]
    pub out: Option<PathBuf>,
    /// Write them into `ROOT/si/`, the path si-server's `install` action serves by default
    /// (ROOT is its `--http-root`/`--tftp-root`).
    #[arg(long, conflicts_with = "out")]
    pub register: Option<PathBuf>,
    /// Read these settings from a TOML file (same keys, kebab-case); the command line's
    /// `--out`/`--register` win.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

fn default_busybox() -> PathBuf {
    PathBuf::from("/bin/busybox")
}

fn default_root() -> PathBuf {
    PathBuf::from("/")
}

impl BootPackageConfig {
    /// The settings of `--config` merged under the command line's output choice.
    pub fn resolve(self) -> Result<BootPackageConfig> {
        let Some(path) = &self.config else {
            return Ok(self);
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut c: BootPackageConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if self.out.is_some() || self.register.is_some() {
            c.out = self.out;
            c.register = self.register;
        }
        Ok(c)
    }

    /// The output directory.
    pub fn out_dir(&self) -> Result<PathBuf> {
        match (&self.out, &self.register) {
            (Some(o), None) => Ok(o.clone()),
            (None, Some(r)) => Ok(r.join("si")),
            (Some(_), Some(_)) => bail!("give --out or --register, not both"),
            (None, None) => bail!("give --out DIR or --register ROOT"),
        }
    }
}

/// What went into a package (`bootpackage.toml`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PackageReport {
    pub format: u32,
    pub kernel_release: String,
    /// Where the kernel came from: `master`, `file:PATH`, `tree:PATH`, `image:NAME@V`.
    pub kernel_source: String,
    pub installer: String,
    pub installer_static: bool,
    /// Module files in load order (relative to `lib/modules/<release>`).
    pub modules: Vec<String>,
    pub modules_builtin: Vec<String>,
    /// Wanted modules this kernel has neither as a module nor built in.
    pub modules_missing: Vec<String>,
    /// Tool name → the master's file it is.
    pub tools: BTreeMap<String, String>,
    pub tools_missing: Vec<String>,
    /// Libraries, as the master's paths.
    pub libraries: Vec<String>,
    pub initrd_bytes: u64,
    pub initrd_uncompressed_bytes: u64,
    pub kernel_bytes: u64,
}

/// A built package, in memory.
pub struct Package {
    pub kernel: Vec<u8>,
    /// The initramfs, uncompressed (newc).
    pub cpio: Vec<u8>,
    /// The initramfs as written (compressed as asked).
    pub initrd: Vec<u8>,
    pub report: PackageReport,
}

/// Paths of the package's tree and what they are.
enum Node {
    Dir,
    File { mode: u32, data: Vec<u8> },
    Symlink(String),
}

#[derive(Default)]
struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    fn parents(&mut self, path: &str) {
        let mut acc = String::new();
        let comps: Vec<&str> = path.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(c);
            self.nodes.entry(acc.clone()).or_insert(Node::Dir);
        }
    }

    fn dir(&mut self, path: &str) {
        self.parents(path);
        self.nodes.entry(path.to_string()).or_insert(Node::Dir);
    }

    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.parents(path);
        self.nodes
            .insert(path.to_string(), Node::File { mode, data });
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.nodes
            .insert(path.to_string(), Node::Symlink(target.to_string()));
    }

    fn has(&self, path: &str) -> bool {
        self.nodes.contains_key(path)
    }

    fn archive(self) -> Result<Vec<u8>> {
        let mut a = Archive::new();
        // Directories first, shallow before deep, so that every parent precedes its children.
        let mut dirs: Vec<&String> = self
            .nodes
            .iter()
            .filter(|(_, n)| matches!(n, Node::Dir))
            .map(|(p, _)| p)
            .collect();
        dirs.sort_by_key(|p| (p.matches('/').count(), p.as_str()));
        for d in dirs {
            a.dir(d)?;
        }
        a.char_dev("dev/console", 0o600, 5, 1)?;
        a.char_dev("dev/null", 0o666, 1, 3)?;
        for (p, n) in &self.nodes {
            match n {
                Node::Dir => {}
                Node::File { mode, data } => a.file(p, *mode, data)?,
                Node::Symlink(t) => a.symlink(p, t)?,
            }
        }
        Ok(a.finish())
    }
}

/// A master path as it sits in the merged-/usr package (`/lib/x` → `usr/lib/x`).
fn pkg_path(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))?;
    let rel = s.trim_start_matches('/');
    if rel.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("{s:?} is not a clean absolute path");
    }
    for top in ["lib/", "lib64/", "bin/", "sbin/"] {
        if rel.starts_with(top) {
            return Ok(format!("usr/{rel}"));
        }
    }
    Ok(rel.to_string())
}

/// The release a bzImage names in its setup header (`kernel_version` at 0x20E).
pub fn bzimage_release(data: &[u8]) -> Option<String> {
    if data.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let off = u16::from_le_bytes([*data.get(0x20E)?, *data.get(0x20F)?]) as usize + 0x200;
    let s = data.get(off..off.checked_add(256)?.min(data.len()))?;
    let end = s.iter().position(|&b| b == 0 || b == b' ')?;
    let rel = std::str::from_utf8(&s[..end]).ok()?;
    (!rel.is_empty()).then(|| rel.to_string())
}

fn check_release(rel: &str) -> Result<()> {
    if rel.is_empty()
        || rel == "."
        || rel == ".."
        || !rel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b))
    {
        bail!("{rel:?} is not a kernel release name");
    }
    Ok(())
}

/// Where a kernel and its modules are read from.
pub enum KernelSource {
    /// A kernel file and its module directory.
    Files {
        vmlinuz: PathBuf,
        modules: PathBuf,
        release: String,
        label: String,
    },
    /// An image version in the store.
    Image(Box<crate::storekernel::ImageKernel>),
}

impl KernelSource {
    /// The newest `boot/vmlinuz-<release>` under `root` that has its module directory.
    pub fn from_tree(root: &Path, label: String) -> Result<KernelSource> {
        let boot = root.join("boot");
        let mut found = Vec::new();
        for e in std::fs::read_dir(&boot).with_context(|| format!("listing {}", boot.display()))? {
            let e = e.with_context(|| format!("listing {}", boot.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rel) = name.strip_prefix("vmlinuz-") else {
                continue;
            };
            if check_release(rel).is_err() {
                continue;
            }
            for m in ["lib/modules", "usr/lib/modules"] {
                let dir = root.join(m).join(rel);
                if dir.join("modules.dep").is_file() {
                    found.push((rel.to_string(), dir));
                    break;
                }
            }
        }
        found.sort_by(|a, b| version_cmp(&a.0, &b.0));
        let Some((release, modules)) = found.pop() else {
            bail!(
                "no {}/vmlinuz-<release> with lib/modules/<release>/modules.dep (on the master: \
                 apt-get install linux-image-amd64)",
                boot.display()
            );
        };
        Ok(KernelSource::Files {
            vmlinuz: boot.join(format!("vmlinuz-{release}")),
            modules,
            release,
            label,
        })
    }

    /// A given kernel file; its modules in `modules` or `/lib/modules/<its release>`.
    pub fn from_file(vmlinuz: &Path, modules: Option<&Path>) -> Result<KernelSource> {
        let data =
            std::fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
        let release = bzimage_release(&data)
            .or_else(|| {
                vmlinuz
                    .file_name()?
                    .to_str()?
                    .strip_prefix("vmlinuz-")
                    .map(str::to_string)
            })
            .with_context(|| {
                format!(
                    "{} is not a bzImage with a version and is not named vmlinuz-<release>",
                    vmlinuz.display()
                )
            })?;
        check_release(&release)?;
        let modules = modules
            .map(Path::to_path_buf)
            .unwrap_or_else(|| Path::new("/lib/modules").join(&release));
        Ok(KernelSource::Files {
            vmlinuz: vmlinuz.to_path_buf(),
            modules,
            release,
            label: format!("file:{}", vmlinuz.display()),
        })
    }

    pub fn release(&self) -> &str {
        match self {
            KernelSource::Files { release, .. } => release,
            KernelSource::Image(k) => &k.release,
        }
    }

    pub fn label(&self) -> String {
        match self {
            KernelSource::Files { label, .. } => label.clone(),
            KernelSource::Image(k) => k.label.clone(),
        }
    }

    fn kernel(&self) -> Result<Vec<u8>> {
        match self {
            KernelSource::Files { vmlinuz, .. } => {
                std::fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))
            }
            KernelSource::Image(k) => k.kernel(),
        }
    }

    /// A file of the module directory (`modules.dep`, `kernel/…/x.ko`).
    fn module_file(&self, rel: &str) -> Result<Vec<u8>> {
        match self {
            KernelSource::Files { modules, .. } => {
                let p = modules.join(rel);
                std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
            }
            KernelSource::Image(k) => k.module_file(rel),
        }
    }

    fn module_db(&self) -> Result<ModuleDb> {
        match self {
            KernelSource::Files { modules, .. } => ModuleDb::load(modules),
            KernelSource::Image(k) => {
                let dep = k.module_file("modules.dep")?;
                let builtin = k.module_file("modules.builtin").unwrap_or_default();
                ModuleDb::parse(
                    &String::from_utf8_lossy(&dep),
                    &String::from_utf8_lossy(&builtin),
                )
            }
        }
    }
}

/// Orders kernel releases by their numeric parts (`6.1.0-9` < `6.1.0-57`).
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<(u64, String)> {
        s.split(['.', '-', '+', '~'])
            .map(|p| {
                let n: String = p.chars().take_while(char::is_ascii_digit).collect();
                (n.parse().unwrap_or(0), p.to_string())
            })
            .collect()
    };
    parts(a).cmp(&parts(b))
}

impl BootPackageConfig {
    fn kernel_source(&self) -> Result<KernelSource> {
        if let Some(k) = &self.kernel {
            return KernelSource::from_file(k, self.modules.as_deref());
        }
        if let Some(r) = &self.kernel_root {
            return KernelSource::from_tree(r, format!("tree:{}", r.display()));
        }
        if let Some(img) = &self.image {
            let store = self.store.as_ref().context("--image needs --store")?;
            return Ok(KernelSource::Image(Box::new(
                crate::storekernel::ImageKernel::open(store, img)?,
            )));
        }
        KernelSource::from_tree(Path::new("/"), "master".into())
    }

    fn installer_path(&self) -> Result<PathBuf> {
        if let Some(p) = &self.installer {
            return Ok(p.clone());
        }
        let exe = std::env::current_exe().context("finding this program's path")?;
        let p = exe
            .parent()
            .context("this program has no directory")?
            .join("si-install");
        if !p.exists() {
            bail!(
                "no installer at {} (give --installer; build it static with \
                 RUSTFLAGS='-C target-feature=+crt-static' cargo build -p si-installer \
                 --target x86_64-unknown-linux-gnu)",
                p.display()
            );
        }
        Ok(p)
    }
}

/// Finds tool `name` in the tools root.
fn find_tool(root: &Path, name: &str) -> Option<PathBuf> {
    TOOL_DIRS
        .iter()
        .map(|d| root.join(d).join(name))
        .find(|p| p.is_file())
}

/// The installer with its debugging symbols removed (`strip`), or as it is.
fn installer_bytes(path: &Path, strip: bool) -> Result<Vec<u8>> {
    if strip {
        if let Ok(dir) = tempfile::tempdir() {
            let out = dir.path().join("si-install");
            let st = std::process::Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&out)
                .arg(path)
                .stderr(std::process::Stdio::null())
                .status();
            if matches!(st, Ok(s) if s.success()) {
                return std::fs::read(&out).with_context(|| format!("reading {}", out.display()));
            }
            tracing::warn!(installer = %path.display(), "strip failed: the installer goes in with its symbols");
        }
    }
    std::fs::read(path).with_context(|| format!("reading the installer {}", path.display()))
}

/// Builds the package.
pub fn build(cfg: &BootPackageConfig) -> Result<Package> {
    let ksrc = cfg.kernel_source()?;
    let release = ksrc.release().to_string();
    check_release(&release)?;
    let kernel = ksrc.kernel().context("reading the kernel")?;
    if bzimage_release(&kernel).is_none() {
        bail!("the kernel of {} is not a bzImage", ksrc.label());
    }
    let mut report = PackageReport {
        format: 1,
        kernel_release: release.clone(),
        kernel_source: ksrc.label(),
        kernel_bytes: kernel.len() as u64,
        ..Default::default()
    };
    let mut tree = Tree::default();
    for top in ["bin", "sbin", "lib", "lib64"] {
        tree.symlink(top, &format!("usr/{top}"));
    }
    for d in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "root",
        "etc",
        "var",
        "mnt",
    ] {
        tree.dir(d);
    }

    // Busybox and its applets (the real tools below take precedence by PATH order and name).
    let bb = std::fs::read(&cfg.busybox)
        .with_context(|| format!("reading busybox {} (busybox-static)", cfg.busybox.display()))?;
    let bb_needs = libs::needs(&cfg.busybox)?;
    if !bb_needs.is_static {
        bail!(
            "{} is not statically linked (install busybox-static)",
            cfg.busybox.display()
        );
    }
    tree.file("usr/bin/busybox", 0o755, bb);
    let list = std::process::Command::new(&cfg.busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("running {} --list", cfg.busybox.display()))?;
    if !list.status.success() {
        bail!("{} --list failed", cfg.busybox.display());
    }
    let applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
        .map(str::to_string)
        .collect();
    for want in [
        "sh", "udhcpc", "insmod", "ip", "setsid", "cttyhack", "mount",
    ] {
        if !applets.iter().any(|a| a == want) {
            bail!("busybox {} has no {want} applet", cfg.busybox.display());
        }
    }

    // The installer.
    let inst_path = cfg.installer_path()?;
    let inst_needs = libs::needs(&inst_path)?;
    report.installer = inst_path.display().to_string();
    report.installer_static = inst_needs.is_static;
    if !inst_needs.is_static {
        tracing::warn!(installer = %inst_path.display(), "the installer is not static: its libraries go in too");
    }
    tree.file(
        "usr/bin/si-install",
        0o755,
        installer_bytes(&inst_path, !cfg.no_strip)?,
    );
    let mut lib_paths: BTreeSet<PathBuf> = inst_needs.paths.into_iter().collect();

    // Tools: one file per distinct program; other names of it become links.
    let mut by_canon: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut specs: Vec<(String, bool)> = TOOLS
        .iter()
        .map(|t| (t.name.to_string(), t.required))
        .collect();
    for t in &cfg.add_tools {
        if t.is_empty() || t.contains('/') || t == "." || t == ".." {
            bail!("--add-tool {t:?} is not a program name");
        }
        specs.push((t.clone(), true));
    }
    for (name, required) in &specs {
        if report.tools.contains_key(name) {
            continue;
        }
        let Some(found) = find_tool(&cfg.tools_root, name) else {
            if *required {
                bail!(
                    "the master has no {name} in {}/{{usr/sbin,usr/bin,sbin,bin}}; install its \
                     package (fdisk gdisk util-linux mount e2fsprogs dosfstools mdadm lvm2)",
                    cfg.tools_root.display()
                );
            }
            report.tools_missing.push(name.clone());
            continue;
        };
        let canon = std::fs::canonicalize(&found)
            .with_context(|| format!("resolving {}", found.display()))?;
        let dest = format!("usr/sbin/{name}");
        if let Some(first) = by_canon.get(&canon) {
            tree.symlink(&dest, first);
        } else {
            let data =
                std::fs::read(&canon).with_context(|| format!("reading {}", canon.display()))?;
            tree.file(&dest, 0o755, data);
            by_canon.insert(canon.clone(), name.clone());
            let n = libs::needs(&canon)?;
            lib_paths.extend(n.paths);
        }
        report
            .tools
            .insert(name.clone(), canon.display().to_string());
    }
    // Busybox applets for the names no real tool took.
    for a in &applets {
        let p = format!("usr/bin/{a}");
        if !report.tools.contains_key(a) && !tree.has(&p) {
            tree.symlink(&p, "busybox");
        }
    }

    // Libraries: the file at its real path, the name the loader asks for as a link to it.
    for lib in &lib_paths {
        let host = if cfg.tools_root == Path::new("/") {
            lib.clone()
        } else {
            cfg.tools_root.join(lib.strip_prefix("/").unwrap_or(lib))
        };
        let canon = std::fs::canonicalize(&host)
            .with_context(|| format!("resolving library {}", host.display()))?;
        let real_in_root = if cfg.tools_root == Path::new("/") {
            canon.clone()
        } else {
            Path::new("/").join(canon.strip_prefix(&cfg.tools_root).unwrap_or(&canon))
        };
        let real = pkg_path(&real_in_root)?;
        if !tree.has(&real) {
            let data =
                std::fs::read(&canon).with_context(|| format!("reading {}", canon.display()))?;
            tree.file(&real, 0o755, data);
        }
        let asked = pkg_path(lib)?;
        if asked != real && !tree.has(&asked) {
            tree.symlink(&asked, &format!("/{real}"));
        }
        report.libraries.push(lib.display().to_string());
    }

    // Modules.
    let db = ksrc.module_db()?;
    let mut wanted: Vec<&str> = NET_MODULES
        .iter()
        .chain(STORAGE_MODULES)
        .chain(MD_DM_MODULES)
        .chain(FS_MODULES)
        .copied()
        .collect();
    for m in &cfg.add_modules {
        wanted.push(m);
    }
    let resolved = db.resolve(&wanted)?;
    let mdir = format!("usr/lib/modules/{release}");
    let mut order = String::new();
    for rel in &resolved.order {
        let data = modules::decompress(rel, ksrc.module_file(rel)?)?;
        let plain = modules::plain_name(rel);
        tree.file(&format!("{mdir}/{plain}"), 0o644, data);
        order.push_str(&plain);
        order.push('\n');
    }
    for user_wanted in &cfg.add_modules {
        let n = modules::normalize(user_wanted);
        if resolved.missing.contains(&n) {
            bail!("--add-module {user_wanted}: kernel {release} has no such module");
        }
    }
    tree.file(&format!("{mdir}/si-load-order"), 0o644, order.into_bytes());
    tree.file(
        &format!("{mdir}/modules.dep"),
        0o644,
        db.dep_text(&resolved.order).into_bytes(),
    );
    if let Ok(b) = ksrc.module_file("modules.builtin") {
        tree.file(&format!("{mdir}/modules.builtin"), 0o644, b);
    }
    report.modules = resolved
        .order
        .iter()
        .map(|p| modules::plain_name(p))
        .collect();
    report.modules_builtin = resolved.builtin;
    report.modules_missing = resolved.missing;

    // Configuration the tools read.
    tree.file("init", 0o755, INIT.as_bytes().to_vec());
    tree.file(
        "usr/share/udhcpc/default.script",
        0o755,
        UDHCPC_SCRIPT.as_bytes().to_vec(),
    );
    tree.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
    );
    tree.file(
        "etc/group",
        0o644,
        b"root:x:0:\ntty:x:5:\ndisk:x:6:\n".to_vec(),
    );
    tree.file("etc/profile", 0o644, PROFILE.as_bytes().to_vec());
    // No udev in the package: LVM must not wait for it.
    tree.file("etc/lvm/lvm.conf", 0o644, LVM_CONF.as_bytes().to_vec());
    tree.file(
        "etc/mdadm/mdadm.conf",
        0o644,
        b"# si boot package: arrays are assembled by si-install\nAUTO -all\n".to_vec(),
    );
    let mke2fs_conf = cfg.tools_root.join("etc/mke2fs.conf");
    if let Ok(c) = std::fs::read(&mke2fs_conf) {
        tree.file("etc/mke2fs.conf", 0o644, c);
    }
    tree.file(
        "etc/si-bootpackage",
        0o644,
        format!(
            "release={release}\nkernel-source={}\n",
            report.kernel_source
        )
        .into_bytes(),
    );

    let cpio = tree.archive()?;
    report.initrd_uncompressed_bytes = cpio.len() as u64;
    let initrd = match cfg.compression {
        Compression::None => cpio.clone(),
        Compression::Zstd => {
            zstd::encode_all(&cpio[..], 12).context("compressing the initramfs")?
        }
        Compression::Gzip => modules_gzip(&cpio).context("compressing the initramfs with gzip")?,
    };
    report.initrd_bytes = initrd.len() as u64;
    Ok(Package {
        kernel,
        cpio,
        initrd,
        report,
    })
}

fn modules_gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = std::process::Command::new("gzip")
        .arg("-9c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting gzip")?;
    let mut stdin = child.stdin.take().context("taking gzip's stdin")?;
    let input = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().context("running gzip")?;
    match w.join() {
        Ok(Ok(())) if out.status.success() => Ok(out.stdout),
        Ok(Err(e)) => Err(e).context("writing to gzip"),
        _ => bail!("gzip failed ({})", out.status),
    }
}

const PROFILE: &str = "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nPS1='si-rescue# '\n\
    echo 'si boot package rescue shell: /run/si holds the network lease and the install log;'\n\
    echo 'run /bin/si-install to try again.'\n";

const LVM_CONF: &str = "# si boot package: no udev here\n\
    devices {\n    obtain_device_list_from_udev = 0\n    external_device_info_source = \"none\"\n}\n\
    activation {\n    udev_sync = 0\n    udev_rules = 0\n    monitoring = 0\n}\n\
    global {\n    use_lvmetad = 0\n    use_lvmpolld = 0\n}\n";

/// Writes a package into `dir` (each file to a temporary name, fsynced, renamed).
pub fn write(pkg: &Package, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let toml = toml::to_string(&pkg.report).context("encoding bootpackage.toml")?;
    si_tree::fsutil::write_atomic(&dir.join("vmlinuz"), &pkg.kernel)?;
    si_tree::fsutil::write_atomic(&dir.join("initrd.img"), &pkg.initrd)?;
    si_tree::fsutil::write_atomic(&dir.join("bootpackage.toml"), toml.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_usr_paths() {
        assert_eq!(
            pkg_path(Path::new("/lib/x86_64-linux-gnu/libc.so.6")).unwrap(),
            "usr/lib/x86_64-linux-gnu/libc.so.6"
        );
        assert_eq!(
            pkg_path(Path::new("/usr/lib/libx.so")).unwrap(),
            "usr/lib/libx.so"
        );
        assert!(pkg_path(Path::new("/lib/../etc/shadow")).is_err());
    }

    #[test]
    fn release_names_and_order() {
        assert!(check_release("6.1.0-57-amd64").is_ok());
        assert!(check_release("../x").is_err());
        assert!(check_release("").is_err());
        assert_eq!(
            version_cmp("6.1.0-9-amd64", "6.1.0-57-amd64"),
            std::cmp::Ordering::Less
        );
    }

    #[test]
    fn bzimage_header() {
        let mut k = vec![0u8; 0x1000];
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x20E..0x210].copy_from_slice(&(0x300u16).to_le_bytes());
        k[0x500..0x500 + 22].copy_from_slice(b"6.1.0-57-amd64 (debian");
        assert_eq!(bzimage_release(&k).unwrap(), "6.1.0-57-amd64");
        assert!(bzimage_release(&k[..0x400]).is_none());
        assert!(bzimage_release(b"nope").is_none());
    }

    #[test]
    fn config_file_and_output() {
        let c: BootPackageConfig =
            toml::from_str("kernel-root = \"/srv/img\"\nadd-modules = [\"mlx5_core\"]\n").unwrap();
        assert_eq!(c.busybox, PathBuf::from("/bin/busybox"));
        assert_eq!(c.add_modules, ["mlx5_core"]);
        assert!(toml::from_str::<BootPackageConfig>("kernal = 1\n").is_err());
        let r = BootPackageConfig {
            register: Some("/srv/boot".into()),
            ..c
        };
        assert_eq!(r.out_dir().unwrap(), PathBuf::from("/srv/boot/si"));
    }
}
