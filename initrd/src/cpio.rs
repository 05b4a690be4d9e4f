//! Writer for the cpio "newc" format the Linux kernel unpacks as an initramfs.

use anyhow::{bail, Result};

/// File types with their `st_mode` bits.
pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

/// An archive being built in memory.
#[derive(Default)]
pub struct Archive {
    out: Vec<u8>,
    ino: u32,
}

fn pad4(v: &mut Vec<u8>) {
    while v.len() & 3 != 0 {
        v.push(0);
    }
}

impl Archive {
    pub fn new() -> Archive {
        Archive {
            out: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> Result<()> {
        if name.is_empty() || name.starts_with('/') || name.contains('\0') {
            bail!("invalid cpio entry name {name:?}");
        }
        let Ok(size) = u32::try_from(data.len()) else {
            bail!("{name} is too large for cpio newc")
        };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & S_IFDIR == S_IFDIR && mode & S_IFREG == 0 {
                2
            } else {
                1
            },
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        pad4(&mut self.out);
        self.out.extend_from_slice(data);
        pad4(&mut self.out);
        Ok(())
    }

    pub fn dir(&mut self, name: &str) -> Result<()> {
        self.entry(name, S_IFDIR | 0o755, &[], (0, 0))
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), data, (0, 0))
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> Result<()> {
        self.entry(name, S_IFLNK | 0o777, target.as_bytes(), (0, 0))
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.entry(name, S_IFCHR | (perm & 0o7777), &[], (major, minor))
    }

    /// Adds the trailer and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        let _ = self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut a = Archive::new();
        a.file("init", 0o755, b"abc").unwrap();
        let v = a.finish();
        assert!(v.starts_with(b"070701"));
        assert_eq!(&v[110..115], b"init\0");
        // 110 + 5 = 115, padded to 116, then data.
        assert_eq!(&v[116..119], b"abc");
        assert_eq!(v.len() % 4, 0);
        assert!(v.windows(10).any(|w| w == b"TRAILER!!!"));
        assert!(Archive::new().file("/abs", 0o644, b"").is_err());
    }
}
