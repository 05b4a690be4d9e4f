//! Writing a manifest's tree beneath a target root.
//!
//! Every path is resolved beneath the target with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! on the parent directory, then the entry is created with the `*at` calls relative to that
//! directory, never following a symlink. A manifest path with `..`, an absolute path, or a
//! parent that is (on disk) a symlink cannot make us write outside the target: the kernel
//! refuses the resolution. Object content is verified against its BLAKE3 digest before it is
//! written (see [`ObjectSource`]).
//!
//! Metadata order per entry: content, owner (which clears setuid bits and capabilities), mode,
//! extended attributes (ACLs, capabilities), times. Directory metadata is applied last, deepest
//! first, since creating children changes a directory's mtime.

use anyhow::{anyhow, bail, Context, Result};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags};
use si_proto::manifest::{Entry, Kind, Manifest};
use si_proto::path as mpath;
use si_proto::Digest;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Where object content comes from. Implementations return the *verified* uncompressed bytes.
pub trait ObjectSource: Sync {
    fn get(&self, digest: &Digest, raw_len: u32) -> Result<Vec<u8>>;
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyStats {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
}

fn name_of(p: &[u8]) -> &OsStr {
    OsStr::from_bytes(mpath::file_name(p))
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Opens the target root.
pub fn open_root(target: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        target,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening target {}", target.display()))
}

/// Opens directory `rel` (a manifest path) beneath `root`, refusing any symlink on the way and
/// any escape from the root.
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &[u8]) -> Result<OwnedFd> {
    mpath::validate(rel).map_err(|e| anyhow!("{e}"))?;
    let p: &OsStr = if rel.is_empty() {
        OsStr::new(".")
    } else {
        OsStr::from_bytes(rel)
    };
    rustix::fs::openat2(
        root,
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .with_context(|| format!("opening directory {:?} beneath the target", show(rel)))
}

fn times(e: &Entry) -> Timestamps {
    let t = Timespec {
        tv_sec: e.mtime,
        tv_nsec: e.mtime_nsec.min(999_999_999) as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn uid(e: &Entry) -> (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>) {
    (
        (e.uid != u32::MAX).then(|| rustix::fs::Uid::from_raw(e.uid)),
        (e.gid != u32::MAX).then(|| rustix::fs::Gid::from_raw(e.gid)),
    )
}

/// Sets owner, mode, xattrs and times through an open descriptor (files and directories).
pub fn set_meta_fd(fd: BorrowedFd<'_>, e: &Entry) -> Result<()> {
    let (u, g) = uid(e);
    rustix::fs::fchown(fd, u, g).with_context(|| format!("chown {}", e.path_lossy()))?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(e.mode))
        .with_context(|| format!("chmod {}", e.path_lossy()))?;
    for x in &e.xattrs {
        rustix::fs::fsetxattr(
            fd,
            OsStr::from_bytes(&x.name),
            &x.value,
            XattrFlags::empty(),
        )
        .with_context(|| format!("setting xattr {} on {}", show(&x.name), e.path_lossy()))?;
    }
    rustix::fs::futimens(fd, &times(e))
        .with_context(|| format!("setting times of {}", e.path_lossy()))?;
    Ok(())
}

/// Sets metadata of a non-openable entry (symlink, device, FIFO, socket) by name in `dir`.
fn set_meta_at(dir: BorrowedFd<'_>, name: &OsStr, e: &Entry) -> Result<()> {
    let (u, g) = uid(e);
    rustix::fs::chownat(dir, name, u, g, AtFlags::SYMLINK_NOFOLLOW)
        .with_context(|| format!("chown {}", e.path_lossy()))?;
    if !matches!(e.kind, Kind::Symlink { .. }) {
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(e.mode), AtFlags::empty())
            .with_context(|| format!("chmod {}", e.path_lossy()))?;
    }
    if !e.xattrs.is_empty() {
        // lsetxattr through the directory descriptor's /proc link: the final name is not followed.
        use std::os::fd::AsRawFd;
        let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        p.extend_from_slice(name.as_bytes());
        for x in &e.xattrs {
            rustix::fs::lsetxattr(
                OsStr::from_bytes(&p),
                OsStr::from_bytes(&x.name),
                &x.value,
                XattrFlags::empty(),
            )
            .with_context(|| format!("setting xattr {} on {}", show(&x.name), e.path_lossy()))?;
        }
    }
    rustix::fs::utimensat(dir, name, &times(e), AtFlags::SYMLINK_NOFOLLOW)
        .with_context(|| format!("setting times of {}", e.path_lossy()))?;
    Ok(())
}

/// [`set_meta_at`] for other modules.
pub fn set_meta_at_pub(dir: BorrowedFd<'_>, name: &OsStr, e: &Entry) -> Result<()> {
    set_meta_at(dir, name, e)
}

/// Writes a regular file's content into `f` (holes stay holes), then truncates to its size.
pub fn write_content(f: &std::fs::File, e: &Entry, src: &dyn ObjectSource) -> Result<u64> {
    let Kind::File { size, chunks } = &e.kind else {
        bail!("not a file")
    };
    let mut written = 0;
    for c in chunks {
        let data = src.get(&c.digest, c.len)?;
        if data.len() != c.len as usize {
            bail!(
                "object {} has {} bytes, manifest says {}",
                c.digest,
                data.len(),
                c.len
            );
        }
        f.write_all_at(&data, c.offset)
            .with_context(|| format!("writing {}", e.path_lossy()))?;
        written += data.len() as u64;
    }
    f.set_len(*size)
        .with_context(|| format!("sizing {}", e.path_lossy()))?;
    Ok(written)
}

/// Creates `e` as `name` in `dir` (which must not exist yet), with all its metadata; a
/// directory gets its metadata later ([`set_meta_fd`]). Hard links are made by the caller.
pub fn create_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    e: &Entry,
    src: &dyn ObjectSource,
) -> Result<u64> {
    let ctx = || format!("creating {}", e.path_lossy());
    match &e.kind {
        Kind::Dir => {
            rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)).with_context(ctx)?;
            Ok(0)
        }
        Kind::File { .. } => {
            let fd = rustix::fs::openat(
                dir,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .with_context(ctx)?;
            let f = std::fs::File::from(fd);
            let n = write_content(&f, e, src)?;
            set_meta_fd(f.as_fd(), e)?;
            Ok(n)
        }
        Kind::Symlink { target } => {
            rustix::fs::symlinkat(OsStr::from_bytes(target), dir, name).with_context(ctx)?;
            set_meta_at(dir, name, e)?;
            Ok(0)
        }
        Kind::CharDev { rdev } | Kind::BlockDev { rdev } => {
            let ft = if matches!(e.kind, Kind::CharDev { .. }) {
                FileType::CharacterDevice
            } else {
                FileType::BlockDevice
            };
            rustix::fs::mknodat(dir, name, ft, Mode::from_raw_mode(0o600), *rdev)
                .with_context(ctx)?;
            set_meta_at(dir, name, e)?;
            Ok(0)
        }
        Kind::Fifo | Kind::Socket => {
            let ft = if e.kind == Kind::Fifo {
                FileType::Fifo
            } else {
                FileType::Socket
            };
            rustix::fs::mknodat(dir, name, ft, Mode::from_raw_mode(0o600), 0).with_context(ctx)?;
            set_meta_at(dir, name, e)?;
            Ok(0)
        }
        Kind::Hardlink { .. } => bail!("hard links are made by the caller"),
    }
}

/// Makes `e` (a hard link) in `dir` as `name`, pointing at its target beneath `root`.
pub fn link_at(root: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr, e: &Entry) -> Result<()> {
    let Kind::Hardlink { target } = &e.kind else {
        bail!("not a hard link")
    };
    let tparent = mpath::parent(target).ok_or_else(|| anyhow!("hard link to the root"))?;
    let tdir = open_dir_beneath(root, tparent)?;
    rustix::fs::linkat(&tdir, name_of(target), dir, name, AtFlags::empty())
        .with_context(|| format!("linking {} to {}", e.path_lossy(), show(target)))
}

/// A per-thread cache of the last parent directory opened.
struct DirCache {
    path: Vec<u8>,
    fd: Option<OwnedFd>,
}

impl DirCache {
    fn get(&mut self, root: BorrowedFd<'_>, parent: &[u8]) -> Result<BorrowedFd<'_>> {
        if self.fd.is_none() || self.path != parent {
            self.fd = Some(open_dir_beneath(root, parent)?);
            self.path = parent.to_vec();
        }
        Ok(self.fd.as_ref().expect("set above").as_fd())
    }
}

/// Materialises `m` into `target`, which must be an empty directory. Directories are created
/// first, then everything else on `threads` threads, then hard links, then directory metadata.
pub fn apply_fresh(
    m: &Manifest,
    target: &Path,
    src: &dyn ObjectSource,
    threads: usize,
) -> Result<ApplyStats> {
    m.validate().context("refusing an invalid manifest")?;
    let root = open_root(target)?;
    if std::fs::read_dir(target)
        .with_context(|| format!("listing {}", target.display()))?
        .next()
        .is_some()
    {
        bail!("{} is not empty", target.display());
    }
    let root_fd = root.as_fd();
    let mut dc = DirCache {
        path: vec![],
        fd: None,
    };
    for e in m.entries.iter().skip(1).filter(|e| e.kind == Kind::Dir) {
        let parent = mpath::parent(&e.path).expect("non-root");
        let d = dc.get(root_fd, parent)?;
        create_at(d, name_of(&e.path), e, src)?;
    }
    let others: Vec<&Entry> = m
        .entries
        .iter()
        .filter(|e| !matches!(e.kind, Kind::Dir | Kind::Hardlink { .. }))
        .collect();
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    const BATCH: usize = 32;
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                let (others, next, bytes) = (&others, &next, &bytes);
                s.spawn(move || -> Result<()> {
                    let mut dc = DirCache {
                        path: vec![],
                        fd: None,
                    };
                    loop {
                        let start = next.fetch_add(BATCH, Ordering::Relaxed);
                        if start >= others.len() {
                            return Ok(());
                        }
                        for e in &others[start..(start + BATCH).min(others.len())] {
                            let parent = mpath::parent(&e.path).expect("non-root");
                            let d = dc.get(root_fd, parent)?;
                            let n = create_at(d, name_of(&e.path), e, src)?;
                            bytes.fetch_add(n, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("worker panicked"))))
            .collect()
    });
    for r in results {
        r?;
    }
    for e in m
        .entries
        .iter()
        .filter(|e| matches!(e.kind, Kind::Hardlink { .. }))
    {
        let parent = mpath::parent(&e.path).expect("non-root");
        let d = dc.get(root_fd, parent)?;
        link_at(root_fd, d, name_of(&e.path), e)?;
    }
    for e in m.entries.iter().rev().filter(|e| e.kind == Kind::Dir) {
        let d = open_dir_beneath(root_fd, &e.path)?;
        set_meta_fd(d.as_fd(), e)?;
    }
    Ok(ApplyStats {
        entries: m.entries.len() as u64,
        files: others
            .iter()
            .filter(|e| matches!(e.kind, Kind::File { .. }))
            .count() as u64,
        bytes: bytes.load(Ordering::Relaxed),
    })
}
