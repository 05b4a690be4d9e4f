//! Private files: keys are written 0600 in 0700 directories, and a key that group or others
//! could read (or write) is refused rather than used.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and its parents) as 0700 when missing; refuses an existing one that group or
/// others may enter or write.
pub fn private_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        // The umask may have taken bits away, never added; make it exact.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
    }
    let md = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !md.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    if md.mode() & 0o077 != 0 {
        bail!(
            "{} has mode {:o}: group and others must have no access (chmod 700 it)",
            dir.display(),
            md.mode() & 0o777
        );
    }
    Ok(())
}

/// Reads a private file, refusing one with any group or other permission bit.
pub fn read_private(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let md = f
        .metadata()
        .with_context(|| format!("reading the mode of {}", path.display()))?;
    if !md.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if md.mode() & 0o077 != 0 {
        bail!(
            "refusing {}: mode {:o} lets group or others read it (chmod 600 it)",
            path.display(),
            md.mode() & 0o777
        );
    }
    if md.len() > 1 << 20 {
        bail!(
            "{} is {} bytes: too large for a key",
            path.display(),
            md.len()
        );
    }
    let mut out = Vec::with_capacity(md.len() as usize);
    std::io::Read::read_to_end(&mut std::io::BufReader::new(f), &mut out)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(out)
}

/// Writes `bytes` to `path` with `mode`, atomically (temporary file, fsync, rename).
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes a private file (0600).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, bytes, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_group_or_other_bits_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("k");
        write_private(&p, b"secret").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(read_private(&p).unwrap(), b"secret");
        for bad in [0o640, 0o604, 0o660, 0o606] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(bad)).unwrap();
            let e = format!("{:#}", read_private(&p).unwrap_err());
            assert!(e.contains("group or others"), "{bad:o}: {e}");
        }
    }

    #[test]
    fn directories_are_made_private_and_loose_ones_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/ca");
        private_dir(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(private_dir(&d).is_err());
    }
}
