//! Exclude patterns for capture and update.
//!
//! A pattern starting with `/` is anchored at the image root; any other pattern matches a name
//! (or a trailing run of components) at any depth. `*` and `?` stay within one component, `**`
//! spans components. An entry is excluded when it or any of its ancestors matches: a matched
//! directory is excluded with everything below it, so `/proc/*` keeps `/proc` itself and drops
//! its contents at every depth. Capture's scan, the update's walk of the node and the update's
//! plan over manifest entries all ask [`Excludes::is_excluded`], so they cannot disagree.

use anyhow::{Context, Result};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use std::path::Path;

/// SystemImager's getimage.exclude plus what must never be cloned.
pub const DEFAULT_CAPTURE: &str = include_str!("excludes/default.exclude");

#[derive(Clone, Debug)]
pub struct Excludes {
    patterns: Vec<String>,
    set: GlobSet,
}

impl Default for Excludes {
    fn default() -> Self {
        Excludes::new(Vec::<String>::new()).expect("empty pattern set builds")
    }
}

impl Excludes {
    pub fn new<S: AsRef<str>>(patterns: impl IntoIterator<Item = S>) -> Result<Excludes> {
        let mut b = GlobSetBuilder::new();
        let mut kept = Vec::new();
        for p in patterns {
            let p = p.as_ref().trim();
            if p.is_empty() || p.starts_with('#') {
                continue;
            }
            let p = p.trim_end_matches('/');
            let glob = if p.starts_with('/') {
                p.to_string()
            } else {
                format!("**/{p}")
            };
            let g = GlobBuilder::new(&glob)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .with_context(|| format!("bad exclude pattern {p:?}"))?;
            b.add(g);
            kept.push(p.to_string());
        }
        let set = b.build().context("building the exclude set")?;
        Ok(Excludes {
            patterns: kept,
            set,
        })
    }

    /// Parses the lines of an exclude file's text.
    pub fn parse(text: &str) -> Result<Excludes> {
        Excludes::new(text.lines())
    }

    pub fn from_file(path: &Path) -> Result<Vec<String>> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading exclude file {}", path.display()))?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect())
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether the entry at relative path `rel` (manifest form, no leading slash) is excluded:
    /// `rel` itself or one of its ancestors matches a pattern.
    pub fn is_excluded(&self, rel: &[u8]) -> bool {
        if rel.is_empty() || self.patterns.is_empty() {
            return false;
        }
        let mut abs = Vec::with_capacity(rel.len() + 1);
        abs.push(b'/');
        abs.extend_from_slice(rel);
        // Each ancestor is a prefix of `/rel` ending before a `/`; then `/rel` itself.
        let mut ends = abs
            .iter()
            .enumerate()
            .skip(1)
            .filter(|&(_, &b)| b == b'/')
            .map(|(i, _)| i)
            .chain(std::iter::once(abs.len()));
        use std::os::unix::ffi::OsStrExt;
        ends.any(|end| self.set.is_match(std::ffi::OsStr::from_bytes(&abs[..end])))
    }
}

/// The default capture patterns, as a list.
pub fn default_capture() -> Vec<String> {
    DEFAULT_CAPTURE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchored_and_floating() {
        let e = Excludes::new(["/proc/*", "*.pyc", "/etc/ssh/ssh_host_*", "cache/"]).unwrap();
        assert!(!e.is_excluded(b"proc"));
        assert!(e.is_excluded(b"proc/1"));
        assert!(!e.is_excluded(b"usr/proc/1"));
        assert!(e.is_excluded(b"usr/lib/x.pyc"));
        assert!(e.is_excluded(b"etc/ssh/ssh_host_rsa_key"));
        assert!(!e.is_excluded(b"etc/ssh/sshd_config"));
        assert!(e.is_excluded(b"var/cache"));
        assert!(!e.is_excluded(b""));
    }

    #[test]
    fn below_an_excluded_directory_is_excluded_at_every_depth() {
        let e = Excludes::new(["/var/cache/*", "/etc/ssh/ssh_host_*", "*.pyc"]).unwrap();
        assert!(!e.is_excluded(b"var/cache"));
        for p in [
            "var/cache/debconf",
            "var/cache/debconf/config.dat",
            "var/cache/apt/archives/partial/x.deb",
            "etc/ssh/ssh_host_keys/a/b",
            "usr/lib/x.pyc/inside",
        ] {
            assert!(e.is_excluded(p.as_bytes()), "{p}");
        }
        // A name that merely starts like an excluded one is not below it.
        assert!(!e.is_excluded(b"var/cachex/a/b"));
        assert!(!e.is_excluded(b"var/lib/cache/a"));
    }

    #[test]
    fn defaults_parse_and_cover_machine_identity() {
        let e = Excludes::new(default_capture()).unwrap();
        for p in [
            "etc/machine-id",
            "tmp/x",
            "run/lock",
            "sys/kernel",
            "etc/ssh/ssh_host_ed25519_key",
        ] {
            assert!(e.is_excluded(p.as_bytes()), "{p}");
        }
        for p in ["tmp", "etc/passwd", "usr/bin/ls", "var/log"] {
            assert!(!e.is_excluded(p.as_bytes()), "{p}");
        }
    }

    #[test]
    fn non_utf8_paths() {
        let e = Excludes::new(["/a/*"]).unwrap();
        assert!(e.is_excluded(b"a/\xff\xfe"));
    }
}
