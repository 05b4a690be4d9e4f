//! Distros: an installer's kernel and initrd, and optionally its package tree, detected from
//! an installation tree, an ISO image or a tarball.

use crate::store::{read_bounded, write_atomic, Store};
use crate::Family;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A registered distro (`distro.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Distro {
    pub name: String,
    pub family: Family,
    /// As the tree names it (`amd64`, `x86_64`, `aarch64`...).
    pub arch: String,
    /// What the tree says it is (`.disk/info`, `.treeinfo`, `content`...).
    #[serde(default)]
    pub description: String,
    /// Whether the package tree is kept (served as `si-distro/<name>/tree/`).
    #[serde(default)]
    pub tree: bool,
    /// The path it was imported from.
    #[serde(default)]
    pub source: String,
}

impl Distro {
    /// The kernel and initrd relative to the served roots.
    pub fn kernel_path(&self) -> String {
        format!("{}/{}/linux", crate::DISTRO_PREFIX, self.name)
    }
    pub fn initrd_path(&self) -> String {
        format!("{}/{}/initrd", crate::DISTRO_PREFIX, self.name)
    }
    /// The package tree's URL under `http_base`, if kept.
    pub fn tree_url(&self, http_base: &str) -> Option<String> {
        self.tree
            .then(|| format!("{http_base}/{}/{}/tree", crate::DISTRO_PREFIX, self.name))
    }
}

/// What a tree was found to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub family: Family,
    pub arch: String,
    pub description: String,
    /// Relative to the tree.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Overrides for what detection finds (or cannot find).
#[derive(Debug, Clone, Default)]
pub struct Hints {
    pub family: Option<Family>,
    pub arch: Option<String>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
}

const ARCHES: &[&str] = &[
    "amd64", "x86_64", "arm64", "aarch64", "i386", "i686", "ppc64le", "ppc64el", "s390x",
    "riscv64", "armhf", "armel",
];

fn read_small(p: &Path) -> Result<Option<String>> {
    if !p.is_file() {
        return Ok(None);
    }
    read_bounded(p).map(Some)
}

/// The value of `key` in INI `section` (`.treeinfo`).
fn ini_get(text: &str, section: &str, key: &str) -> Option<String> {
    let mut cur = String::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            cur = s.trim().to_string();
        } else if cur == section {
            if let Some((k, v)) = l.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim().to_string());
                }
            }
        }
    }
    None
}

fn first_arch_word(text: &str) -> Option<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .find(|w| ARCHES.contains(w))
        .map(str::to_string)
}

/// The single subdirectory of `dir` named like an architecture that holds `file`.
fn arch_dir_with(dir: &Path, file: &str) -> Option<String> {
    ARCHES
        .iter()
        .find(|a| dir.join(a).join(file).is_file())
        .map(|a| a.to_string())
}

/// Detects the family, architecture, kernel and initrd of an installation tree.
pub fn detect(tree: &Path, hints: &Hints) -> Result<Detected> {
    let d = detect_family(tree, hints)?;
    let kernel = hints.kernel.clone().unwrap_or(d.kernel);
    let initrd = hints.initrd.clone().unwrap_or(d.initrd);
    for (what, p) in [("kernel", &kernel), ("initrd", &initrd)] {
        if p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
            bail!(
                "the {what} path {} must be relative to the tree",
                p.display()
            );
        }
        if !tree.join(p).is_file() {
            bail!(
                "the installer {what} {} is not in {} (give --{what})",
                p.display(),
                tree.display()
            );
        }
    }
    Ok(Detected {
        family: hints.family.unwrap_or(d.family),
        arch: hints.arch.clone().unwrap_or(d.arch),
        description: d.description,
        kernel,
        initrd,
    })
}

fn detect_family(tree: &Path, hints: &Hints) -> Result<Detected> {
    // Red Hat family: .treeinfo names the family, arch and boot images.
    if let Some(ti) = read_small(&tree.join(".treeinfo"))? {
        let arch = ini_get(&ti, "general", "arch")
            .or_else(|| ini_get(&ti, "tree", "arch"))
            .unwrap_or_else(|| "x86_64".into());
        let family = ini_get(&ti, "general", "family")
            .or_else(|| ini_get(&ti, "release", "name"))
            .unwrap_or_default();
        let version = ini_get(&ti, "general", "version")
            .or_else(|| ini_get(&ti, "release", "version"))
            .unwrap_or_default();
        let images = format!("images-{arch}");
        return Ok(Detected {
            family: Family::Redhat,
            description: format!("{family} {version}").trim().to_string(),
            kernel: ini_get(&ti, &images, "kernel")
                .unwrap_or_else(|| "images/pxeboot/vmlinuz".into())
                .into(),
            initrd: ini_get(&ti, &images, "initrd")
                .unwrap_or_else(|| "images/pxeboot/initrd.img".into())
                .into(),
            arch,
        });
    }
    // SUSE: `content` (up to SLE 15 / Leap 15) or media.1/, kernel in boot/<arch>/loader/.
    let content = read_small(&tree.join("content"))?;
    let products = read_small(&tree.join("media.1/products"))?;
    if content.is_some() || products.is_some() || tree.join("media.1/media").is_file() {
        let boot = tree.join("boot");
        let arch = hints
            .arch
            .clone()
            .or_else(|| arch_dir_with(&boot, "loader/linux"))
            .or_else(|| content.as_deref().and_then(first_arch_word))
            .context("no boot/<arch>/loader/linux in this SUSE tree (give --arch)")?;
        let description = content
            .as_deref()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("LABEL").map(|v| v.trim().to_string()))
            })
            .or_else(|| {
                products
                    .as_deref()
                    .and_then(|p| p.lines().next().map(str::to_string))
            })
            .unwrap_or_default();
        return Ok(Detected {
            family: Family::Suse,
            kernel: PathBuf::from(format!("boot/{arch}/loader/linux")),
            initrd: PathBuf::from(format!("boot/{arch}/loader/initrd")),
            arch,
            description,
        });
    }
    // Debian and Ubuntu installation media: .disk/info, install.<arch>/ or install/.
    if let Some(info) = read_small(&tree.join(".disk/info"))? {
        let description = info.lines().next().unwrap_or_default().trim().to_string();
        let arch = hints
            .arch
            .clone()
            .or_else(|| first_arch_word(&info))
            .context("no architecture in .disk/info (give --arch)")?;
        let dirs = ["install.amd", "install.a64", "install.386", "install"];
        let (kernel, initrd) = dirs
            .iter()
            .map(|d| (format!("{d}/vmlinuz"), format!("{d}/initrd.gz")))
            .find(|(k, _)| tree.join(k).is_file())
            .unwrap_or_else(|| ("casper/vmlinuz".into(), "casper/initrd".into()));
        return Ok(Detected {
            family: Family::Debian,
            arch,
            description,
            kernel: kernel.into(),
            initrd: initrd.into(),
        });
    }
    // A debian-installer netboot tree (netboot.tar.gz, debian-installer-*-netboot-*).
    let di = tree.join("debian-installer");
    if let Some(arch) = hints
        .arch
        .clone()
        .filter(|a| di.join(a).join("linux").is_file())
        .or_else(|| arch_dir_with(&di, "linux"))
    {
        let description = read_small(&tree.join("version.info"))?
            .map(|v| v.lines().map(str::trim).collect::<Vec<_>>().join("; "))
            .unwrap_or_else(|| "debian-installer netboot".into());
        return Ok(Detected {
            family: Family::Debian,
            kernel: PathBuf::from(format!("debian-installer/{arch}/linux")),
            initrd: PathBuf::from(format!("debian-installer/{arch}/initrd.gz")),
            arch,
            description,
        });
    }
    match (&hints.family, &hints.arch, &hints.kernel, &hints.initrd) {
        (Some(f), Some(a), Some(k), Some(i)) => Ok(Detected {
            family: *f,
            arch: a.clone(),
            description: String::new(),
            kernel: k.clone(),
            initrd: i.clone(),
        }),
        _ => bail!(
            "{} is no installation tree si knows (no .treeinfo, content, media.1/, .disk/info or \
             debian-installer/<arch>/linux): give --family, --arch, --kernel and --initrd",
            tree.display()
        ),
    }
}

/// The tool that unpacks ISO images and tarballs: `bsdtar` (Debian's libarchive-tools).
pub const EXTRACTOR: &str = "bsdtar";

fn extract(archive: &Path, into: &Path) -> Result<()> {
    std::fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
    let out = std::process::Command::new(EXTRACTOR)
        .arg("-x")
        .arg("-f")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "unpacking {} needs {EXTRACTOR}, which is not installed (Debian: apt-get install \
             libarchive-tools), or unpack it yourself and import the directory",
            archive.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("running {EXTRACTOR}")),
    };
    if !out.status.success() {
        bail!(
            "{EXTRACTOR} could not unpack {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // ISO 9660 files come out read-only; the tree must be removable later.
    for e in walkdir::WalkDir::new(into) {
        let e = e.with_context(|| format!("walking {}", into.display()))?;
        if e.file_type().is_dir() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("making {} writable", e.path().display()))?;
        }
    }
    Ok(())
}

/// Copies a tree (files, directories, symlinks as links).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for e in walkdir::WalkDir::new(from) {
        let e = e.with_context(|| format!("walking {}", from.display()))?;
        let rel = e
            .path()
            .strip_prefix(from)
            .context("walking outside the tree")?;
        let dst = to.join(rel);
        let ft = e.file_type();
        if ft.is_dir() {
            std::fs::create_dir_all(&dst).with_context(|| format!("creating {}", dst.display()))?;
        } else if ft.is_symlink() {
            let t = std::fs::read_link(e.path())
                .with_context(|| format!("reading link {}", e.path().display()))?;
            std::os::unix::fs::symlink(&t, &dst)
                .with_context(|| format!("linking {}", dst.display()))?;
        } else if ft.is_file() {
            std::fs::copy(e.path(), &dst)
                .with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Imports a distro from a directory, an ISO image or a tarball. With `keep_tree` the whole
/// tree is kept and served as the distro's package tree. The distro appears whole or not at
/// all (it is assembled beside the others and renamed into place).
pub fn import(
    store: &Store,
    name: &str,
    path: &Path,
    hints: &Hints,
    keep_tree: bool,
) -> Result<Distro> {
    let final_dir = store.distro_dir(name)?;
    if final_dir.exists() {
        bail!("distro {name:?} already exists (si-distro rm {name} first)");
    }
    let meta = std::fs::metadata(path).with_context(|| format!("opening {}", path.display()))?;
    let staging = store
        .distros_dir()
        .join(format!(".import-{name}-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing the leftover {}", staging.display()))?;
    }
    std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let r = (|| {
        let (tree, unpacked) = if meta.is_dir() {
            (path.to_path_buf(), false)
        } else {
            let t = staging.join("unpacked");
            extract(path, &t)?;
            (t, true)
        };
        let d = detect(&tree, hints)?;
        std::fs::copy(tree.join(&d.kernel), staging.join("linux"))
            .with_context(|| format!("copying the kernel {}", d.kernel.display()))?;
        std::fs::copy(tree.join(&d.initrd), staging.join("initrd"))
            .with_context(|| format!("copying the initrd {}", d.initrd.display()))?;
        if keep_tree {
            if unpacked {
                std::fs::rename(&tree, staging.join("tree")).context("keeping the tree")?;
            } else {
                copy_tree(&tree, &staging.join("tree"))?;
            }
        } else if unpacked {
            std::fs::remove_dir_all(&tree)
                .with_context(|| format!("removing {}", tree.display()))?;
        }
        let distro = Distro {
            name: name.to_string(),
            family: d.family,
            arch: d.arch,
            description: d.description,
            tree: keep_tree,
            source: path.display().to_string(),
        };
        let t = toml::to_string(&distro).context("encoding distro.toml")?;
        write_atomic(&staging.join("distro.toml"), t.as_bytes())?;
        std::fs::rename(&staging, &final_dir)
            .with_context(|| format!("moving the distro into {}", final_dir.display()))?;
        Ok(distro)
    })();
    if r.is_err() && staging.exists() {
        if let Err(e) = std::fs::remove_dir_all(&staging) {
            tracing::warn!(path = %staging.display(), error = %e, "removing a failed import");
        }
    }
    r
}
