//! Resolving request paths beneath a served root (shared by the TFTP and HTTP servers).
//!
//! A request path is first normalised without touching the filesystem: `\` is not special,
//! empty and `.` components are dropped, a leading `/` means the root, and any `..`
//! component is refused. The result is then joined to the canonical root and canonicalised,
//! which follows symlinks; a target outside the root is refused, so a symlink may point
//! elsewhere inside the root but never out of it. Only regular files that every user may read
//! are served (a root-only file is never a boot file).
//!
//! The check and the later open are two steps: a local user who can replace files inside
//! the root between them could race it. The root is meant to be writable by the server's
//! operator only.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why a path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path leaves the served root")]
    Escape,
    #[error("invalid path")]
    Invalid,
    #[error("file not found")]
    NotFound,
    #[error("not a regular file")]
    NotAFile,
    #[error("file is not world-readable, so not a boot file")]
    NotPublic,
}

/// Longest request path accepted.
pub const MAX_PATH: usize = 512;

/// Turns a request path into `a/b/c` form, refusing `..`, NUL and control characters.
pub fn normalize(request: &str) -> Result<String, PathError> {
    if request.len() > MAX_PATH || request.chars().any(|c| c.is_control()) {
        return Err(PathError::Invalid);
    }
    let mut parts = Vec::new();
    for comp in request.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(PathError::Escape),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(PathError::Invalid);
    }
    Ok(parts.join("/"))
}

/// Resolves a normalised path (from [`normalize`]) beneath `root`, which must be canonical.
/// Returns the canonical path of a regular file inside the root.
pub fn resolve(root: &Path, normalized: &str) -> Result<PathBuf, PathError> {
    let joined = root.join(normalized);
    let real = std::fs::canonicalize(&joined).map_err(|_| PathError::NotFound)?;
    if !real.starts_with(root) {
        return Err(PathError::Escape);
    }
    let meta = std::fs::metadata(&real).map_err(|_| PathError::NotFound)?;
    if !meta.is_file() {
        return Err(PathError::NotAFile);
    }
    // Boot files are public by nature (firmware fetches them unauthenticated); a file only
    // root may read (the image store's packs and manifests, a node's overrides, keys) is
    // never one, whatever path leads to it.
    if meta.permissions().mode() & 0o004 == 0 {
        return Err(PathError::NotPublic);
    }
    Ok(real)
}

/// Refuses a served root that holds, or lies inside, one of `private` (the image store, the
/// inventory's directory): TFTP and HTTP serve boot files only. Paths that do not exist are
/// skipped.
pub fn check_disjoint(root: &Path, private: &[&Path]) -> anyhow::Result<()> {
    use anyhow::Context;
    let r = std::fs::canonicalize(root)
        .with_context(|| format!("opening served root {}", root.display()))?;
    for p in private {
        let Ok(p) = std::fs::canonicalize(p) else {
            continue;
        };
        if r.starts_with(&p) || p.starts_with(&r) {
            anyhow::bail!(
                "served root {} overlaps {}: TFTP and HTTP serve boot files only, never the store",
                r.display(),
                p.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        assert_eq!(
            normalize("/pxelinux.cfg//./default").unwrap(),
            "pxelinux.cfg/default"
        );
        assert_eq!(normalize("a/../b"), Err(PathError::Escape));
        assert_eq!(normalize(".."), Err(PathError::Escape));
        assert_eq!(normalize("/"), Err(PathError::Invalid));
        assert_eq!(normalize("a\nb"), Err(PathError::Invalid));
    }

    #[test]
    fn resolves_beneath_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/f"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink("../secret", root.join("out")).unwrap();
        std::os::unix::fs::symlink("sub/f", root.join("in")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("abs")).unwrap();
        let root = std::fs::canonicalize(&root).unwrap();
        assert!(resolve(&root, "sub/f").is_ok());
        assert!(resolve(&root, "in").is_ok());
        assert_eq!(resolve(&root, "out"), Err(PathError::Escape));
        assert_eq!(resolve(&root, "abs"), Err(PathError::Escape));
        assert_eq!(resolve(&root, "sub"), Err(PathError::NotAFile));
        assert_eq!(resolve(&root, "nope"), Err(PathError::NotFound));
        assert_eq!(
            resolve(&root, &normalize("/etc/passwd").unwrap()),
            Err(PathError::NotFound)
        );
        std::fs::set_permissions(root.join("sub/f"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        assert_eq!(resolve(&root, "sub/f"), Err(PathError::NotPublic));
        assert_eq!(resolve(&root, "in"), Err(PathError::NotPublic));
    }

    #[test]
    fn a_root_overlapping_the_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("srv/store");
        let boot = dir.path().join("srv/boot");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::create_dir_all(&boot).unwrap();
        let nope = dir.path().join("absent");
        check_disjoint(&boot, &[&store, &nope]).unwrap();
        assert!(check_disjoint(&dir.path().join("srv"), &[&store]).is_err());
        assert!(check_disjoint(&store, &[&store]).is_err());
        std::fs::create_dir_all(store.join("packs")).unwrap();
        assert!(check_disjoint(&store.join("packs"), &[&store]).is_err());
    }
}
