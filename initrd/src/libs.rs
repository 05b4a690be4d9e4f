//! The shared libraries a program needs, as the master's dynamic loader resolves them (`ldd`
//! at build time: the tools come from the master, so its loader's answer is the right one).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What `ldd` says a program needs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Absolute paths of libraries and the loader, in the order printed.
    pub paths: Vec<PathBuf>,
    /// Statically linked: nothing to add.
    pub is_static: bool,
}

/// Parses `ldd` output. A library `ldd` cannot find ("not found") is an error: the package
/// would hold a tool that cannot start.
pub fn parse_ldd(program: &str, out: &str) -> Result<Needs> {
    let mut n = Needs::default();
    for line in out.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.contains("not a dynamic executable") || line.contains("statically linked") {
            n.is_static = true;
            continue;
        }
        if let Some((lib, rest)) = line.split_once("=>") {
            let rest = rest.trim();
            if rest.starts_with("not found") {
                bail!(
                    "{program} needs {}, which the master's loader cannot find",
                    lib.trim()
                );
            }
            let path = rest.split_whitespace().next().unwrap_or("");
            if path.starts_with('/') {
                n.paths.push(PathBuf::from(path));
            }
            // `linux-vdso.so.1 =>  (0x…)` in old glibc: nothing on disk.
        } else {
            // `/lib64/ld-linux-x86-64.so.2 (0x…)` or `linux-vdso.so.1 (0x…)`.
            let path = line.split_whitespace().next().unwrap_or("");
            if path.starts_with('/') {
                n.paths.push(PathBuf::from(path));
            }
        }
    }
    Ok(n)
}

/// Runs `ldd` on `program`.
pub fn needs(program: &Path) -> Result<Needs> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .context("running ldd (libc-bin) to find a tool's libraries")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // ldd exits 1 for static programs, saying so.
        if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
            return Ok(Needs {
                paths: Vec::new(),
                is_static: true,
            });
        }
        bail!(
            "ldd {} failed: {}{}",
            program.display(),
            text.trim(),
            err.trim()
        );
    }
    parse_ldd(&program.display().to_string(), &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd5c9f3000)\n\
                   \tlibblkid.so.1 => /lib/x86_64-linux-gnu/libblkid.so.1 (0x00007f0c1d1e0000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c1cfff000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1d265000)\n";
        let n = parse_ldd("sfdisk", out).unwrap();
        assert!(!n.is_static);
        assert_eq!(
            n.paths,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libblkid.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        let st = parse_ldd("busybox", "\tnot a dynamic executable\n").unwrap();
        assert!(st.is_static && st.paths.is_empty());
        let e = parse_ldd("x", "\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(e.to_string().contains("libfoo.so.1"), "{e}");
    }

    #[test]
    fn real_ldd_on_a_master_tool() {
        let sfdisk = Path::new("/usr/sbin/sfdisk");
        if !sfdisk.exists() {
            eprintln!("SKIP: no /usr/sbin/sfdisk here (fdisk package)");
            return;
        }
        let n = needs(sfdisk).unwrap();
        assert!(n
            .paths
            .iter()
            .any(|p| p.to_string_lossy().contains("libc.so")));
    }
}
