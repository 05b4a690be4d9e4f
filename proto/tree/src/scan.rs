//! Scanning a tree into a manifest and content objects.
//!
//! The scan runs in two passes. The walk reads metadata only (lstat, xattrs, symlink targets)
//! and is cheap. The content pass reads regular files on a pool of threads, splits them into
//! chunks by the one rule of [`crate::chunker`] (per data extent: holes stay holes), hashes each chunk with BLAKE3, and hands every chunk the receiver does not already
//! have (the `have` set) to a [`BlobSink`], zstd-compressed. A [`StatCache`] from the previous
//! scan lets unchanged files (same inode, size, mtime and ctime) skip the read altogether when
//! the receiver still has all their chunks.
//!
//! The walk stays on the root's filesystem, but descends into mounts of local disk
//! filesystems (a separate /boot, /boot/efi, /home...); other mounts (proc, sysfs, tmpfs, NFS,
//! Lustre...) appear as empty directories. Excluded paths are skipped with their subtrees.

use crate::exclude::Excludes;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use si_proto::manifest::{Chunk, Entry, Kind, Manifest, Xattr};
use si_proto::msg::ScanStats;
use si_proto::Digest;
use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Compression level of objects.
pub const ZSTD_LEVEL: i32 = crate::codec::ZSTD_LEVEL;

/// Filesystems the walk descends into when they are mounted below the root.
pub const LOCAL_FS: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "f2fs", "jfs", "reiserfs", "zfs",
];

/// Receives the objects of a scan.
pub trait BlobSink {
    /// `zdata` is the zstd-compressed object whose uncompressed bytes hash to `digest`.
    fn blob(&mut self, digest: Digest, raw_len: u32, zdata: Vec<u8>) -> Result<()>;
    /// Called once between the walk and the content pass: files and bytes the pass covers.
    fn totals(&mut self, _files: u64, _bytes: u64) -> Result<()> {
        Ok(())
    }
    /// Content-pass progress: files and bytes done so far.
    fn progress(&mut self, _files: u64, _bytes: u64) -> Result<()> {
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct ScanConfig {
    pub root: PathBuf,
    pub excludes: Excludes,
    /// Where the stat cache lives (none: every file is read).
    pub stat_cache: Option<PathBuf>,
    pub threads: usize,
}

impl ScanConfig {
    pub fn new(root: impl Into<PathBuf>) -> ScanConfig {
        ScanConfig {
            root: root.into(),
            excludes: Excludes::default(),
            stat_cache: None,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CacheRec {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
    chunks: Vec<Chunk>,
}

/// Content digests of the files seen by the previous scan, keyed by path and stat data.
#[derive(Default, Serialize, Deserialize)]
pub struct StatCache {
    files: HashMap<Vec<u8>, CacheRec>,
    /// (dev, ino) → path in `files`: which name of a hard-linked file the parallel walk reads
    /// varies from scan to scan, and the record under another name still vouches for it.
    #[serde(skip)]
    by_inode: HashMap<(u64, u64), Vec<u8>>,
}

const CACHE_MAGIC: &[u8; 8] = b"SISTAT01";

/// Files whose mtime or ctime is this close to a scan's start are read again by the next scan
/// (timestamps are coarse: jiffies on ext4, 2 s on FAT).
const RACY_SECONDS: i64 = 2;

impl StatCache {
    pub fn load(path: &Path) -> StatCache {
        let Ok(data) = std::fs::read(path) else {
            return StatCache::default();
        };
        if data.len() < 8 || &data[..8] != CACHE_MAGIC {
            return StatCache::default();
        }
        let cfg = bincode::config::standard().with_limit::<{ 1 << 30 }>();
        match bincode::serde::decode_from_slice::<StatCache, _>(&data[8..], cfg) {
            Ok((mut c, _)) => {
                c.by_inode = c
                    .files
                    .iter()
                    .map(|(k, r)| ((r.dev, r.ino), k.clone()))
                    .collect();
                c
            }
            Err(_) => StatCache::default(),
        }
    }

    /// The record for `rel`, or for another name of the same inode.
    fn get(&self, rel: &[u8], md: &std::fs::Metadata) -> Option<&CacheRec> {
        self.files.get(rel).or_else(|| {
            let other = self.by_inode.get(&(md.dev(), md.ino()))?;
            self.files.get(other)
        })
    }

    /// Writes the cache atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut data = CACHE_MAGIC.to_vec();
        bincode::serde::encode_into_std_write(self, &mut data, bincode::config::standard())
            .context("encoding the stat cache")?;
        crate::fsutil::write_atomic(path, &data)
            .with_context(|| format!("writing stat cache {}", path.display()))
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// A scan's result: the manifest, its statistics, and the stat cache to save once the
/// receiver has durably stored everything.
pub struct ScanResult {
    pub manifest: Manifest,
    pub stats: ScanStats,
    pub cache: StatCache,
}

struct Pending {
    /// Which walker found it, and its entry index there.
    walker: usize,
    index: usize,
    abs: PathBuf,
    rel: Vec<u8>,
    md: std::fs::Metadata,
}

/// Mount points below the root with their filesystem type (from /proc/self/mountinfo).
pub fn mount_types() -> HashMap<PathBuf, String> {
    let mut m = HashMap::new();
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return m;
    };
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|&x| x == "-") else {
            continue;
        };
        if f.len() <= sep + 1 || f.len() < 5 {
            continue;
        }
        m.insert(PathBuf::from(unescape_mount(f[4])), f[sep + 1].to_string());
    }
    m
}

fn unescape_mount(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn entry_from(rel: Vec<u8>, md: &std::fs::Metadata, kind: Kind, xattrs: Vec<Xattr>) -> Entry {
    Entry {
        path: rel,
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        xattrs,
    }
}

/// Reads every extended attribute of `path` without following symlinks, sorted by name.
pub fn read_xattrs(path: &Path) -> Result<Vec<Xattr>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("listing xattrs of {}", path.display())),
    };
    let mut out = Vec::new();
    for name in names {
        if let Some(value) = xattr::get(path, &name)
            .with_context(|| format!("reading xattr {name:?} of {}", path.display()))?
        {
            out.push(Xattr {
                name: name.into_vec(),
                value,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

struct Walker<'a> {
    id: usize,
    cfg: &'a ScanConfig,
    mounts: HashMap<PathBuf, String>,
    entries: Vec<Entry>,
    /// Files whose content must be read, handed to the content workers in batches as they
    /// are found.
    pending: Option<crossbeam_channel::Sender<Vec<Pending>>>,
    batch: Vec<Pending>,
    batch_bytes: u64,
    files: u64,
    /// (dev, ino) of multiply-linked files → index of the first entry seen.
    links: HashMap<(u64, u64), Vec<usize>>,
    total_bytes: u64,
}

/// A directory waiting to be listed.
struct DirJob {
    abs: PathBuf,
    rel: Vec<u8>,
    dev: u64,
}

/// Directories to list, shared by the walker threads; the walk ends when it is empty and no
/// walker is listing (which could add more).
#[derive(Default)]
struct WalkQueue {
    state: Mutex<QueueState>,
    cv: std::sync::Condvar,
}

#[derive(Default)]
struct QueueState {
    jobs: Vec<DirJob>,
    active: usize,
    failed: bool,
}

impl WalkQueue {
    fn push(&self, job: DirJob) {
        self.state.lock().expect("walk queue").jobs.push(job);
        self.cv.notify_one();
    }

    fn next(&self) -> Option<DirJob> {
        let mut st = self.state.lock().expect("walk queue");
        loop {
            if st.failed {
                return None;
            }
            if let Some(j) = st.jobs.pop() {
                st.active += 1;
                return Some(j);
            }
            if st.active == 0 {
                return None;
            }
            st = self.cv.wait(st).expect("walk queue");
        }
    }

    fn done(&self, failed: bool) {
        let mut st = self.state.lock().expect("walk queue");
        st.active -= 1;
        st.failed |= failed;
        if st.failed || (st.active == 0 && st.jobs.is_empty()) {
            self.cv.notify_all();
        }
    }
}

/// Threads listing directories: statx and listxattr per entry are most of a re-capture.
const WALKERS: usize = 2;

/// Files (or bytes) handed to a content worker at once: few channel operations per file.
const BATCH_FILES: usize = 256;
const BATCH_BYTES: u64 = 8 << 20;

impl Walker<'_> {
    fn flush(&mut self) -> Result<()> {
        self.batch_bytes = 0;
        let b = std::mem::take(&mut self.batch);
        if let (Some(tx), false) = (&self.pending, b.is_empty()) {
            tx.send(b)
                .map_err(|_| anyhow::anyhow!("content workers stopped"))?;
        }
        Ok(())
    }

    /// Lists one directory, recording its children; subdirectories go back to the queue.
    fn visit(&mut self, job: DirJob, queue: &WalkQueue) -> Result<()> {
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&job.abs)
            .with_context(|| format!("listing {}", job.abs.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("listing {}", job.abs.display()))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let child_rel = si_proto::path::join(&job.rel, name.as_bytes());
            if self.cfg.excludes.is_excluded(&child_rel) {
                continue;
            }
            self.walk(&job.abs.join(&name), child_rel, Some(job.dev), queue)?;
        }
        Ok(())
    }

    /// Records one entry (a directory is queued for listing).
    fn walk(
        &mut self,
        abs: &Path,
        rel: Vec<u8>,
        parent_dev: Option<u64>,
        queue: &WalkQueue,
    ) -> Result<()> {
        let md = std::fs::symlink_metadata(abs)
            .with_context(|| format!("reading metadata of {}", abs.display()))?;
        let xattrs = read_xattrs(abs)?;
        let ft = md.file_type();
        use std::os::unix::fs::FileTypeExt;
        if ft.is_dir() {
            self.entries
                .push(entry_from(rel.clone(), &md, Kind::Dir, xattrs));
            let crosses = parent_dev.is_some_and(|d| d != md.dev());
            if crosses {
                let local = self
                    .mounts
                    .get(abs)
                    .is_some_and(|t| LOCAL_FS.contains(&t.as_str()));
                if !local {
                    return Ok(());
                }
            }
            queue.push(DirJob {
                abs: abs.to_path_buf(),
                rel,
                dev: md.dev(),
            });
            return Ok(());
        }
        let kind = if ft.is_file() {
            // Only the first name of a hard-link group carries content.
            let first_name = if md.nlink() > 1 {
                let g = self.links.entry((md.dev(), md.ino())).or_default();
                g.push(self.entries.len());
                g.len() == 1
            } else {
                true
            };
            if first_name {
                self.total_bytes += md.len();
                self.files += 1;
                let p = Pending {
                    walker: self.id,
                    index: self.entries.len(),
                    abs: abs.to_path_buf(),
                    rel: rel.clone(),
                    md: md.clone(),
                };
                self.batch_bytes += md.len();
                self.batch.push(p);
                if self.batch.len() >= BATCH_FILES || self.batch_bytes >= BATCH_BYTES {
                    self.flush()?;
                }
            }
            Kind::File {
                size: md.len(),
                chunks: vec![],
            }
        } else if ft.is_symlink() {
            let t = std::fs::read_link(abs)
                .with_context(|| format!("reading symlink {}", abs.display()))?;
            Kind::Symlink {
                target: t.into_os_string().into_vec(),
            }
        } else if ft.is_char_device() {
            Kind::CharDev { rdev: md.rdev() }
        } else if ft.is_block_device() {
            Kind::BlockDev { rdev: md.rdev() }
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else {
            bail!("{}: unknown file type", abs.display());
        };
        self.entries.push(entry_from(rel, &md, kind, xattrs));
        Ok(())
    }
}

thread_local! {
    /// Each content worker's chunker (its buffer lives as long as the thread).
    static CHUNKER: std::cell::RefCell<crate::chunker::Chunker> = Default::default();
}

struct Shared<'a> {
    have: &'a HashSet<Digest>,
    sent: Mutex<HashSet<Digest>>,
    files_done: AtomicU64,
    bytes_done: AtomicU64,
    files_read: AtomicU64,
    bytes_read: AtomicU64,
}

/// A file's content pass: entry index, path, size, chunks, stat cache record.
type Done = ((usize, usize), Vec<u8>, u64, Vec<Chunk>, Option<CacheRec>);

enum Out {
    Blob(Digest, u32, Vec<u8>),
    Done(Vec<Done>),
    Totals(u64, u64),
    Err(anyhow::Error),
}

impl Shared<'_> {
    /// Hashes one chunk and, if the receiver lacks it and nobody sent it yet, compresses it.
    fn chunk(
        &self,
        offset: u64,
        data: &[u8],
        tx: &crossbeam_channel::Sender<Out>,
    ) -> Result<Chunk> {
        let digest = Digest::of(data);
        let len = data.len() as u32;
        if !self.have.contains(&digest) && self.sent.lock().expect("sent set").insert(digest) {
            let z = crate::codec::compress(data)?;
            tx.send(Out::Blob(digest, len, z)).context("sink gone")?;
        }
        Ok(Chunk {
            offset,
            len,
            digest,
        })
    }

    fn read_file(
        &self,
        p: &Pending,
        tx: &crossbeam_channel::Sender<Out>,
    ) -> Result<(u64, Vec<Chunk>)> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOATIME)
            .open(&p.abs)
            .or_else(|_| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&p.abs)
            })
            .with_context(|| format!("opening {}", p.abs.display()))?;
        let extents = crate::chunker::data_extents(&f, &p.md)
            .with_context(|| format!("finding the data of {}", p.abs.display()))?;
        let mut chunks = Vec::new();
        let end = CHUNKER
            .with_borrow_mut(|c| {
                c.file(&f, &extents, |off, data| {
                    chunks.push(self.chunk(off, data, tx)?);
                    self.bytes_read
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    Ok(())
                })
            })
            .with_context(|| format!("reading {}", p.abs.display()))?;
        self.files_read.fetch_add(1, Ordering::Relaxed);
        // A file that grew while read keeps what was read; one that shrank keeps its old size.
        Ok((p.md.len().max(end), chunks))
    }
}

fn cache_rec(md: &std::fs::Metadata, chunks: Vec<Chunk>) -> CacheRec {
    CacheRec {
        dev: md.dev(),
        ino: md.ino(),
        size: md.len(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec(),
        ctime: md.ctime(),
        ctime_nsec: md.ctime_nsec(),
        chunks,
    }
}

/// Walks the tree under `cfg.root`, then reads the files' content, sending what the receiver
/// lacks to `sink`.
pub fn scan(
    cfg: &ScanConfig,
    have: &HashSet<Digest>,
    sink: &mut dyn BlobSink,
) -> Result<ScanResult> {
    let old_cache = cfg
        .stat_cache
        .as_deref()
        .map(StatCache::load)
        .unwrap_or_default();
    let root = cfg
        .root
        .canonicalize()
        .with_context(|| format!("opening root {}", cfg.root.display()))?;
    if !root.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let shared = Shared {
        have,
        sent: Mutex::new(HashSet::new()),
        files_done: AtomicU64::new(0),
        bytes_done: AtomicU64::new(0),
        files_read: AtomicU64::new(0),
        bytes_read: AtomicU64::new(0),
    };
    // The walk feeds the content workers as it goes: reading starts with the first file.
    let stop = AtomicBool::new(false);
    let (ptx, prx) = crossbeam_channel::bounded::<Vec<Pending>>(16);
    let (tx, rx) = crossbeam_channel::bounded::<Out>(64);
    let mut new_cache = StatCache::default();
    // "Racily clean" files (changed within RACY_SECONDS of the scan's start) are not cached:
    // a rewrite of the same size in the same timestamp tick after they were read would
    // otherwise look unchanged next time.
    let racy_after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(i128::MAX)
        - i128::from(RACY_SECONDS) * 1_000_000_000;
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    let mut blobs_sent = 0u64;
    let mut bytes_sent = 0u64;
    let mut results: Vec<((usize, usize), u64, Vec<Chunk>)> = Vec::new();
    let mut first_err: Option<anyhow::Error> = None;
    let queue = WalkQueue::default();
    queue.state.lock().expect("walk queue").active = 1;
    let walked: Result<Vec<Walker>> = std::thread::scope(|s| {
        let walker = {
            let tx = tx.clone();
            let root = &root;
            let queue = &queue;
            let mut handles = Vec::new();
            let mounts = mount_types();
            for id in 0..WALKERS {
                let ptx = ptx.clone();
                let mounts = mounts.clone();
                handles.push(s.spawn(move || -> Result<Walker> {
                    let mut w = Walker {
                        id,
                        cfg,
                        mounts,
                        entries: Vec::new(),
                        pending: Some(ptx),
                        batch: Vec::new(),
                        batch_bytes: 0,
                        files: 0,
                        links: HashMap::new(),
                        total_bytes: 0,
                    };
                    if id == 0 {
                        // The root entry itself; its listing is the first job. The queue
                        // counts this as one active walker, so the others wait for it.
                        let r = w.walk(root, Vec::new(), None, queue);
                        queue.done(r.is_err());
                        r?;
                    }
                    let mut res = Ok(());
                    while let Some(job) = queue.next() {
                        let r = w.visit(job, queue);
                        queue.done(r.is_err());
                        if r.is_err() {
                            res = r;
                            break;
                        }
                    }
                    let r = res.and_then(|_| w.flush());
                    w.pending = None;
                    r.map(|_| w)
                }));
            }
            drop(ptx);
            s.spawn(move || -> Result<Vec<Walker>> {
                let mut ws = Vec::new();
                let mut err = None;
                for h in handles {
                    match h
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a walker panicked")))
                    {
                        Ok(w) => ws.push(w),
                        Err(e) => err = err.or(Some(e)),
                    }
                }
                if let Some(e) = err {
                    return Err(e);
                }
                let files = ws.iter().map(|w| w.files).sum();
                let bytes = ws.iter().map(|w| w.total_bytes).sum();
                let _ = tx.send(Out::Totals(files, bytes));
                Ok(ws)
            })
        };
        for _ in 0..cfg.threads.max(1) {
            let tx = tx.clone();
            let prx = prx.clone();
            let (shared, stop, old_cache) = (&shared, &stop, &old_cache);
            s.spawn(move || {
                for batch in prx {
                    if stop.load(Ordering::Relaxed) {
                        continue;
                    }
                    let mut done = Vec::with_capacity(batch.len());
                    for p in batch {
                        let rec = cache_rec(&p.md, vec![]);
                        let cached = old_cache.get(&p.rel, &p.md).filter(|c| {
                            CacheRec {
                                chunks: vec![],
                                ..(*c).clone()
                            } == rec
                                && c.chunks.iter().all(|ch| shared.have.contains(&ch.digest))
                        });
                        let out = match cached {
                            Some(c) => Ok((p.md.len(), c.chunks.clone())),
                            None => shared.read_file(&p, &tx),
                        };
                        shared.files_done.fetch_add(1, Ordering::Relaxed);
                        shared.bytes_done.fetch_add(p.md.len(), Ordering::Relaxed);
                        match out {
                            Ok((size, chunks)) => {
                                let rec =
                                    (size == p.md.len()).then(|| cache_rec(&p.md, chunks.clone()));
                                done.push(((p.walker, p.index), p.rel, size, chunks, rec));
                            }
                            Err(e) => {
                                let _ = tx.send(Out::Err(e));
                                break;
                            }
                        }
                    }
                    if tx.send(Out::Done(done)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        drop(prx);
        let mut last = std::time::Instant::now();
        let fail = |e: anyhow::Error, first_err: &mut Option<anyhow::Error>| {
            if first_err.is_none() {
                *first_err = Some(e);
                stop.store(true, Ordering::Relaxed);
            }
        };
        for out in rx.iter() {
            match out {
                Out::Blob(d, raw, z) => {
                    if first_err.is_none() {
                        blobs_sent += 1;
                        bytes_sent += z.len() as u64;
                        if let Err(e) = sink.blob(d, raw, z) {
                            fail(e, &mut first_err);
                        }
                    }
                }
                Out::Done(done) => {
                    for (i, rel, size, chunks, rec) in done {
                        let settled = |r: &CacheRec| {
                            ns(r.mtime, r.mtime_nsec).max(ns(r.ctime, r.ctime_nsec)) < racy_after
                        };
                        if let Some(rec) = rec.filter(settled) {
                            new_cache.files.insert(rel, rec);
                        }
                        results.push((i, size, chunks));
                    }
                }
                Out::Totals(files, bytes) => {
                    if let Err(e) = sink.totals(files, bytes) {
                        fail(e, &mut first_err);
                    }
                }
                Out::Err(e) => fail(e, &mut first_err),
            }
            if first_err.is_none() && last.elapsed().as_millis() >= 250 {
                last = std::time::Instant::now();
                if let Err(e) = sink.progress(
                    shared.files_done.load(Ordering::Relaxed),
                    shared.bytes_done.load(Ordering::Relaxed),
                ) {
                    fail(e, &mut first_err);
                }
            }
        }
        walker
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the walk panicked")))
    });
    let walkers = match (walked, first_err) {
        (Err(e), _) | (Ok(_), Some(e)) => return Err(e),
        (Ok(w), None) => w,
    };
    // One entry list: each walker's entries after the previous ones.
    let mut offsets = Vec::new();
    let mut entries = Vec::new();
    let mut links: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
    let (mut files, mut total_bytes) = (0, 0);
    for w in walkers {
        let off = entries.len();
        offsets.push(off);
        files += w.files;
        total_bytes += w.total_bytes;
        for (k, g) in w.links {
            links
                .entry(k)
                .or_default()
                .extend(g.into_iter().map(|i| i + off));
        }
        entries.extend(w.entries);
    }
    let mut read: HashSet<usize> = HashSet::new();
    for ((w, i), size, chunks) in results {
        let i = offsets[w] + i;
        entries[i].kind = Kind::File { size, chunks };
        read.insert(i);
    }
    // Hard-link groups: after sorting, the first path carries the content (that of a name
    // whose content was read: two walkers may each have read the group).
    for g in links.into_values().filter(|g| g.len() > 1) {
        let mut paths: Vec<(Vec<u8>, usize)> =
            g.iter().map(|&i| (entries[i].path.clone(), i)).collect();
        paths.sort();
        let source = g.iter().copied().find(|i| read.contains(i)).unwrap_or(g[0]);
        let content = entries[source].kind.clone();
        let first = paths[0].1;
        entries[first].kind = content;
        for (_, i) in &paths[1..] {
            entries[*i].kind = Kind::Hardlink {
                target: paths[0].0.clone(),
            };
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let stats = ScanStats {
        entries: entries.len() as u64,
        files,
        bytes: total_bytes,
        bytes_read: shared.bytes_read.load(Ordering::Relaxed),
        files_read: shared.files_read.load(Ordering::Relaxed),
        blobs_sent,
        bytes_sent,
    };
    let manifest = Manifest { entries };
    manifest
        .validate()
        .context("the scanned tree does not make a valid manifest")?;
    Ok(ScanResult {
        manifest,
        stats,
        cache: new_cache,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which name of a hard-linked file a scan reads depends on the walk's timing: the next
    /// scan's cache lookup finds the record under any name of the inode.
    #[test]
    fn stat_cache_finds_hard_links_under_another_name() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a"), b"x").unwrap();
        std::fs::hard_link(t.path().join("a"), t.path().join("b")).unwrap();
        let md = std::fs::metadata(t.path().join("a")).unwrap();
        let mut c = StatCache::default();
        c.files.insert(b"a".to_vec(), cache_rec(&md, vec![]));
        c.save(&t.path().join("cache")).unwrap();
        let c = StatCache::load(&t.path().join("cache"));
        let other = std::fs::metadata(t.path().join("b")).unwrap();
        assert!(c.get(b"b", &other).is_some());
        std::fs::write(t.path().join("c"), b"x").unwrap();
        let unrelated = std::fs::metadata(t.path().join("c")).unwrap();
        assert!(c.get(b"c", &unrelated).is_none());
    }

    /// A file changed just before a scan may be rewritten (same size, same inode) within the
    /// same coarse timestamp tick after it was read: the cache must not vouch for it.
    #[test]
    fn racily_clean_files_stay_out_of_the_stat_cache() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("old"), b"old").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2100));
        std::fs::write(root.join("new"), b"new").unwrap();
        let mut cfg = ScanConfig::new(&root);
        cfg.stat_cache = Some(t.path().join("cache"));
        struct Null;
        impl BlobSink for Null {
            fn blob(&mut self, _: Digest, _: u32, _: Vec<u8>) -> Result<()> {
                Ok(())
            }
        }
        let res = scan(&cfg, &HashSet::new(), &mut Null).unwrap();
        assert!(res.cache.files.contains_key(&b"old"[..]));
        assert!(!res.cache.files.contains_key(&b"new"[..]));
    }
}
