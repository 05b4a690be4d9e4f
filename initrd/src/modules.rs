//! Kernel modules for the boot package: names resolved through `modules.dep` to files, their
//! dependencies closed over, put in an order `insmod` can load one by one, and decompressed
//! (`.ko.xz`, `.ko.zst`, `.ko.gz`) so that no in-kernel decompression is needed.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};

/// A module name as the kernel knows it: `-` and `_` are the same.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path in `modules.dep` (`kernel/fs/nls/nls_iso8859-1.ko.xz` →
/// `nls_iso8859_1`).
pub fn name_of(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(normalize(stem))
}

/// `modules.dep` (and `modules.builtin`) of one kernel release.
#[derive(Debug, Default)]
pub struct ModuleDb {
    /// Module name → (its path relative to the release directory, its dependencies' paths).
    by_name: BTreeMap<String, (String, Vec<String>)>,
    by_path: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

/// Longest `modules.dep` read (Debian's is ~700 KiB): bounds what a bad tree can make us read.
const MAX_DEP_FILE: u64 = 64 << 20;

fn read_bounded(p: &Path) -> Result<String> {
    let len = std::fs::metadata(p)
        .with_context(|| format!("reading {}", p.display()))?
        .len();
    if len > MAX_DEP_FILE {
        bail!(
            "{} is {len} bytes: too large for a module list",
            p.display()
        );
    }
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

impl ModuleDb {
    /// Parses `modules.dep` text (`path: dep dep …` per line) and `modules.builtin` text (one
    /// path a line).
    pub fn parse(dep: &str, builtin: &str) -> Result<ModuleDb> {
        let mut db = ModuleDb::default();
        for (i, line) in dep.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((path, deps)) = line.split_once(':') else {
                bail!("modules.dep line {}: no ':' in {line:?}", i + 1);
            };
            let path = path.trim().to_string();
            check_rel(&path).with_context(|| format!("modules.dep line {}", i + 1))?;
            let deps: Vec<String> = deps.split_whitespace().map(str::to_string).collect();
            for d in &deps {
                check_rel(d).with_context(|| format!("modules.dep line {}", i + 1))?;
            }
            let Some(name) = name_of(&path) else {
                bail!("modules.dep line {}: {path:?} is not a module file", i + 1);
            };
            db.by_path.insert(path.clone(), deps.clone());
            db.by_name.insert(name, (path, deps));
        }
        for line in builtin.lines() {
            if let Some(n) = name_of(line.trim()) {
                db.builtin.insert(n);
            }
        }
        Ok(db)
    }

    /// Reads `modules.dep` and `modules.builtin` (if present) of a release directory.
    pub fn load(release_dir: &Path) -> Result<ModuleDb> {
        let dep = read_bounded(&release_dir.join("modules.dep"))
            .context("reading the kernel's module list (run depmod for this kernel?)")?;
        let builtin_path = release_dir.join("modules.builtin");
        let builtin = if builtin_path.exists() {
            read_bounded(&builtin_path)?
        } else {
            String::new()
        };
        ModuleDb::parse(&dep, &builtin)
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    pub fn path_of(&self, name: &str) -> Option<&str> {
        self.by_name.get(&normalize(name)).map(|(p, _)| p.as_str())
    }

    /// The module files that load `wanted` (dependencies first, each once) and the names found
    /// neither as a module nor built in.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Resolved> {
        let mut out = Resolved::default();
        let mut seen = BTreeSet::new();
        for w in wanted {
            let n = normalize(w);
            if self.builtin.contains(&n) {
                out.builtin.push(n);
                continue;
            }
            let Some((path, _)) = self.by_name.get(&n) else {
                out.missing.push(n);
                continue;
            };
            self.visit(path, &mut seen, &mut Vec::new(), &mut out.order)?;
        }
        Ok(out)
    }

    fn visit(
        &self,
        path: &str,
        seen: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if seen.contains(path) {
            return Ok(());
        }
        if stack.iter().any(|p| p == path) {
            bail!("modules.dep has a dependency cycle through {path}");
        }
        stack.push(path.to_string());
        // Each line already lists the whole closure; visiting each dependency's own line
        // orders them whatever order the line has.
        for d in self.by_path.get(path).into_iter().flatten() {
            if !self.by_path.contains_key(d) {
                bail!("modules.dep: {path} needs {d}, which has no line of its own");
            }
            self.visit(d, seen, stack, order)?;
        }
        stack.pop();
        seen.insert(path.to_string());
        order.push(path.to_string());
        Ok(())
    }

    /// `modules.dep` text for the included modules only, with their uncompressed names, so that
    /// busybox `modprobe` in the package finds them.
    pub fn dep_text(&self, included: &[String]) -> String {
        let mut s = String::new();
        for p in included {
            let deps = self.by_path.get(p).cloned().unwrap_or_default();
            s.push_str(&plain_name(p));
            s.push(':');
            for d in deps {
                s.push(' ');
                s.push_str(&plain_name(&d));
            }
            s.push('\n');
        }
        s
    }
}

fn check_rel(p: &str) -> Result<()> {
    if p.starts_with('/') || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        bail!("module path {p:?} is not a clean relative path");
    }
    Ok(())
}

/// What [`ModuleDb::resolve`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Module files (relative to the release directory) in load order.
    pub order: Vec<String>,
    /// Wanted names that are built into the kernel.
    pub builtin: Vec<String>,
    /// Wanted names this kernel has neither as a module nor built in.
    pub missing: Vec<String>,
}

/// The name a module file has in the package: without a compression suffix.
pub fn plain_name(path: &str) -> String {
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(p) = path.strip_suffix(ext) {
            if p.ends_with(".ko") {
                return p.to_string();
            }
        }
    }
    path.to_string()
}

/// Largest module accepted after decompression (the biggest Debian modules are ~10 MiB).
const MAX_MODULE: usize = 256 << 20;

/// The uncompressed content of module `name` (its suffix says how it is compressed) from its
/// file's bytes.
pub fn decompress(name: &str, data: Vec<u8>) -> Result<Vec<u8>> {
    let tool: Option<(&str, &[&str])> = if name.ends_with(".ko.xz") {
        Some(("xz", &["-dc"]))
    } else if name.ends_with(".ko.zst") {
        Some(("zstd", &["-dcq"]))
    } else if name.ends_with(".ko.gz") {
        Some(("gzip", &["-dc"]))
    } else {
        None
    };
    let data = match tool {
        None => data,
        Some((prog, args)) => {
            filter(prog, args, data).with_context(|| format!("decompressing module {name}"))?
        }
    };
    if data.len() > MAX_MODULE {
        bail!("module {name} is larger than {MAX_MODULE} bytes");
    }
    if !data.starts_with(b"\x7fELF") {
        bail!("module {name} is not an ELF file");
    }
    Ok(data)
}

/// Runs `prog args` with `input` on its standard input; returns its standard output.
fn filter(prog: &str, args: &[&str], input: Vec<u8>) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {prog} (is it installed?)"))?;
    let mut stdin = child.stdin.take().context("taking the child's stdin")?;
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .with_context(|| format!("running {prog}"))?;
    let wrote = writer.join();
    if !out.status.success() {
        bail!(
            "{prog} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    match wrote {
        Ok(Ok(())) => Ok(out.stdout),
        Ok(Err(e)) => Err(e).with_context(|| format!("writing to {prog}")),
        Err(_) => bail!("the thread writing to {prog} panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz
kernel/lib/crc16.ko.xz:
kernel/fs/mbcache.ko.xz:
kernel/fs/jbd2/jbd2.ko.xz:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/nls/nls_iso8859-1.ko:
";

    #[test]
    fn resolves_dependencies_first_each_once() {
        let db = ModuleDb::parse(DEP, "kernel/drivers/block/virtio_blk.ko\n").unwrap();
        let r = db
            .resolve(&["virtio_net", "ext4", "virtio-blk", "nls_iso8859_1", "nope"])
            .unwrap();
        assert_eq!(
            r.order,
            [
                "kernel/net/core/failover.ko",
                "kernel/drivers/net/net_failover.ko",
                "kernel/drivers/net/virtio_net.ko",
                "kernel/lib/crc16.ko.xz",
                "kernel/fs/mbcache.ko.xz",
                "kernel/fs/jbd2/jbd2.ko.xz",
                "kernel/fs/ext4/ext4.ko.xz",
                "kernel/fs/nls/nls_iso8859-1.ko",
            ]
        );
        assert_eq!(r.builtin, ["virtio_blk"]);
        assert_eq!(r.missing, ["nope"]);
        let text = db.dep_text(&r.order[3..7]);
        assert!(text.contains(
            "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n"
        ));
    }

    #[test]
    fn refuses_bad_lists() {
        assert!(ModuleDb::parse("../x.ko: \n", "").is_err());
        assert!(ModuleDb::parse("kernel/a.ko kernel/b.ko\n", "").is_err());
        assert!(ModuleDb::parse("kernel/a.txt:\n", "").is_err());
        let cyc =
            ModuleDb::parse("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n", "").unwrap();
        assert!(cyc.resolve(&["a"]).is_err());
        let dangling = ModuleDb::parse("kernel/a.ko: kernel/b.ko\n", "").unwrap();
        assert!(dangling.resolve(&["a"]).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(
            name_of("kernel/fs/nls/nls_iso8859-1.ko.zst").unwrap(),
            "nls_iso8859_1"
        );
        assert_eq!(plain_name("kernel/x/y.ko.xz"), "kernel/x/y.ko");
        assert_eq!(plain_name("kernel/x/y.ko"), "kernel/x/y.ko");
    }

    #[test]
    fn decompresses_xz_modules() {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend_from_slice(&[7u8; 1000]);
        let Ok(xz) = filter("xz", &["-c"], elf.clone()) else {
            eprintln!("SKIP: no xz here");
            return;
        };
        assert_eq!(decompress("kernel/a.ko.xz", xz).unwrap(), elf);
        assert_eq!(decompress("kernel/a.ko", elf.clone()).unwrap(), elf);
        assert!(decompress("kernel/a.ko", b"not elf".to_vec()).is_err());
        assert!(decompress("kernel/a.ko.xz", b"not xz".to_vec()).is_err());
    }
}
