//! The boot package of `si-mkbootpackage` (`si_initrd::bootpkg`), checked from the outside:
//! GNU cpio unpacks it, readelf lists what each program needs, modinfo what each module
//! depends on, `sh -n` parses the scripts. Root only for the last check: each tool starts in
//! a chroot of the unpacked package (its libraries resolve there, not from the master).
//!
//! Needs the master's kernel (linux-image-amd64), busybox-static, the disk tools (fdisk gdisk
//! util-linux e2fsprogs dosfstools mdadm lvm2), cpio, binutils (readelf) and kmod (modinfo).
//! The installer is the static `si-install` when it was built (see `si_tests::static_bin`),
//! else busybox stands in as the file put at /bin/si-install.

use clap::Parser;
use si_initrd::bootpkg::{self, BootPackageConfig, PackageReport};
use si_tests::{is_root, run};
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

fn master_ready() -> Option<&'static str> {
    for (p, pkg) in [
        ("/bin/busybox", "busybox-static"),
        ("/usr/bin/cpio", "cpio"),
        ("/usr/bin/readelf", "binutils"),
        ("/usr/sbin/mdadm", "mdadm"),
        ("/usr/sbin/lvm", "lvm2"),
        ("/usr/sbin/sgdisk", "gdisk"),
    ] {
        if !Path::new(p).exists() {
            return Some(pkg);
        }
    }
    let has_kernel = std::fs::read_dir("/boot").ok()?.any(|e| {
        e.ok()
            .is_some_and(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
    });
    (!has_kernel).then_some("linux-image-amd64")
}

fn installer() -> PathBuf {
    si_tests::static_bin("si-install").unwrap_or_else(|| PathBuf::from("/bin/busybox"))
}

/// Builds a package from the master's kernel and unpacks it with GNU cpio.
fn build_and_unpack() -> Option<(tempfile::TempDir, PackageReport, Vec<String>)> {
    if let Some(pkg) = master_ready() {
        eprintln!("SKIP: the master lacks {pkg} (see .ci/run)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let inst = installer();
    let cfg = BootPackageConfig::parse_from([
        OsStr::new("si-mkbootpackage"),
        OsStr::new("--installer"),
        inst.as_os_str(),
        OsStr::new("--out"),
        out.as_os_str(),
    ]);
    let pkg = bootpkg::build(&cfg).unwrap();
    bootpkg::write(&pkg, &dir.path().join("out")).unwrap();
    // The written initrd is zstd of the newc archive.
    let initrd = std::fs::read(dir.path().join("out/initrd.img")).unwrap();
    assert_eq!(zstd::decode_all(&initrd[..]).unwrap(), pkg.cpio);
    let report: PackageReport =
        toml::from_str(&std::fs::read_to_string(dir.path().join("out/bootpackage.toml")).unwrap())
            .unwrap();
    assert_eq!(report, pkg.report);
    std::fs::write(dir.path().join("initrd.cpio"), &pkg.cpio).unwrap();
    // List it, then unpack everything but device nodes (an unprivileged cpio cannot mknod).
    let list = run(Command::new("sh").arg("-c").arg(format!(
        "cpio -it --quiet < {}",
        dir.path().join("initrd.cpio").display()
    )))
    .unwrap();
    let names: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    run(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "cpio -idm --quiet --no-absolute-filenames --nonmatching 'dev/*' < {}",
        dir.path().join("initrd.cpio").display()
    )))
    .unwrap();
    Some((dir, report, names))
}

/// `rel` inside `root`, following symlinks (absolute ones relative to `root`) as the booted
/// package would, never leaving it.
fn resolve(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut cur = PathBuf::new();
    let mut todo: Vec<String> = rel
        .trim_start_matches('/')
        .split('/')
        .rev()
        .map(str::to_string)
        .collect();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        if c.is_empty() || c == "." {
            continue;
        }
        if c == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        let md = std::fs::symlink_metadata(root.join(&next)).ok()?;
        if md.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let t = std::fs::read_link(root.join(&next)).ok()?;
            let t = t.to_str()?.to_string();
            if t.starts_with('/') {
                cur = PathBuf::new();
            }
            for part in t.trim_start_matches('/').split('/').rev() {
                todo.push(part.to_string());
            }
        } else {
            cur = next;
        }
    }
    Some(root.join(cur))
}

/// NEEDED sonames and the interpreter of an ELF file, by readelf.
fn elf_needs(file: &Path) -> (Vec<String>, Option<String>) {
    let out = run(Command::new("readelf").args(["-d", "-l", "-W"]).arg(file)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut needed = Vec::new();
    let mut interp = None;
    for l in text.lines() {
        if l.contains("(NEEDED)") {
            if let Some(s) = l.split('[').nth(1).and_then(|s| s.split(']').next()) {
                needed.push(s.to_string());
            }
        }
        if let Some(rest) = l.split("[Requesting program interpreter: ").nth(1) {
            interp = rest.split(']').next().map(str::to_string);
        }
    }
    (needed, interp)
}

#[test]
fn package_holds_tools_libraries_modules_and_a_valid_init() {
    let Some((dir, report, names)) = build_and_unpack() else {
        return;
    };
    let root = dir.path().join("root");
    eprintln!(
        "package: kernel {} initrd {} bytes ({} uncompressed), {} modules, {} tools, {} libraries",
        report.kernel_release,
        report.initrd_bytes,
        report.initrd_uncompressed_bytes,
        report.modules.len(),
        report.tools.len(),
        report.libraries.len()
    );
    // The newc archive lists the device nodes the kernel's console needs before devtmpfs.
    for n in [
        "init",
        "dev/console",
        "dev/null",
        "bin",
        "usr/bin/busybox",
        "usr/bin/si-install",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} not in the archive");
    }
    // Scripts parse.
    for s in ["init", "usr/share/udhcpc/default.script", "etc/profile"] {
        run(Command::new("sh").arg("-n").arg(root.join(s))).unwrap();
        run(Command::new("busybox").args(["sh", "-n"]).arg(root.join(s))).unwrap();
    }
    // The installer where init runs it, the shell and udhcpc from busybox.
    for p in [
        "bin/si-install",
        "bin/sh",
        "bin/udhcpc",
        "bin/insmod",
        "sbin/mdadm",
    ] {
        let r = resolve(&root, p).unwrap_or_else(|| panic!("{p} does not resolve"));
        assert!(r.is_file(), "{p} -> {}", r.display());
    }
    // Every listed tool, and what each ELF file of the package needs: its interpreter and each
    // NEEDED soname in the loader's default directories inside the package.
    let tools = [
        "sfdisk",
        "sgdisk",
        "wipefs",
        "blkid",
        "mkfs.ext4",
        "mke2fs",
        "mkfs.vfat",
        "mkswap",
        "mdadm",
        "lvm",
        "pvcreate",
        "vgcreate",
        "lvcreate",
        "vgchange",
        "e2fsck",
        "lsblk",
    ];
    for t in tools {
        assert!(report.tools.contains_key(t), "{t} not in the report");
        let r = resolve(&root, &format!("usr/sbin/{t}")).unwrap_or_else(|| panic!("{t}"));
        assert!(r.is_file(), "{t}");
    }
    let mut elves = BTreeSet::new();
    for e in walk(&root) {
        if std::fs::read(&e).is_ok_and(|d| d.starts_with(b"\x7fELF"))
            && !e.to_string_lossy().ends_with(".ko")
        {
            elves.insert(e);
        }
    }
    let libdirs = [
        "usr/lib/x86_64-linux-gnu",
        "lib/x86_64-linux-gnu",
        "usr/lib64",
        "lib64",
    ];
    let mut checked = 0;
    for f in &elves {
        let (needed, interp) = elf_needs(f);
        if let Some(i) = interp {
            assert!(
                resolve(&root, &i).is_some_and(|p| p.is_file()),
                "{}: interpreter {i} is not in the package",
                f.display()
            );
        }
        for so in needed {
            assert!(
                libdirs
                    .iter()
                    .any(|d| resolve(&root, &format!("{d}/{so}")).is_some_and(|p| p.is_file())),
                "{} needs {so}, which is not in the package",
                f.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} NEEDED entries seen");
    // Modules: the wanted ones for the master's kernel, each module's `depends` (modinfo)
    // loaded before it.
    let mdir = root.join("usr/lib/modules").join(&report.kernel_release);
    let order: Vec<String> = std::fs::read_to_string(mdir.join("si-load-order"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(order, report.modules);
    let name = |p: &str| si_initrd::modules::name_of(p).unwrap();
    let loaded: Vec<String> = order.iter().map(|p| name(p)).collect();
    for want in [
        "virtio_net",
        "e1000",
        "virtio_blk",
        "virtio_pci",
        "nvme",
        "ahci",
        "sd_mod",
        "raid1",
        "dm_mod",
        "ext4",
        "vfat",
        "nls_cp437",
        "nls_iso8859_1",
        "nls_ascii",
        "nls_utf8",
    ] {
        assert!(
            loaded.iter().any(|l| l == want) || report.modules_builtin.iter().any(|b| b == want),
            "{want} neither in the package nor built in"
        );
    }
    for (i, m) in order.iter().enumerate() {
        let f = mdir.join(m);
        let out = run(Command::new("modinfo").args(["-F", "depends"]).arg(&f)).unwrap();
        for dep in String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(',')
            .filter(|d| !d.is_empty())
        {
            let dep = si_initrd::modules::normalize(dep);
            let at = loaded.iter().position(|l| *l == dep);
            assert!(
                at.is_some_and(|j| j < i),
                "{m} depends on {dep}, not loaded before it ({at:?})"
            );
        }
    }
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// Root: every tool starts inside a chroot of the unpacked package, so its libraries come
/// from the package; busybox's shell runs the init script's syntax check the same way.
#[test]
fn package_tools_run_in_a_chroot_of_the_package() {
    si_tests::require_root!();
    let Some((dir, _report, _)) = build_and_unpack() else {
        return;
    };
    let root = dir.path().join("root");
    for cmd in [
        "sfdisk --version",
        "sgdisk --version",
        "wipefs --version",
        "blkid -V",
        "mke2fs -V",
        "mkfs.ext4 -V",
        "e2fsck -V",
        "mkfs.vfat --help",
        "mkswap --version",
        "mdadm --version",
        "lvm version",
        "lsblk --version",
        "sh -n /init",
        "udhcpc --help",
    ] {
        let out = Command::new("chroot")
            .arg(&root)
            .args(["/bin/sh", "-c", &format!("PATH=/usr/sbin:/usr/bin {cmd}")])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains("error while loading shared libraries") && !text.contains("not found"),
            "{cmd}: {text}"
        );
        // Help and version options exit 0 or 1 depending on the tool; what matters is that
        // it started (a missing library is exit 127 with the loader's message).
        assert!(
            matches!(out.status.code(), Some(0) | Some(1)),
            "{cmd}: {} {text}",
            out.status
        );
    }
    assert!(is_root());
}
