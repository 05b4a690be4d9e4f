//! Deploying an image version onto a node and moving a node to another version
//! (`si-updateclient`).
//!
//! Plan, then apply. The plan compares the target manifest with the tree on disk (a fast stat
//! check: type, size, mtime, owner, mode, xattrs, link targets; `verify` re-hashes file content
//! too) and lists what will be created, replaced, changed in metadata only, and deleted, and
//! which objects must move. Objects are looked for locally first (chunks of the old versions of
//! changed big files, and unchanged files known from the installed manifest) and fetched only
//! when missing.
//!
//! Applying to a running node never leaves it half-updated: every object is fetched (after a
//! free-space check) and verified into a staging directory first; only then are files swapped
//! in, each written under a temporary name with all its metadata and renamed over the old one.
//! Objects already staged survive an interruption, so a second run fetches only the rest.
//! An update that would delete more than half of the node's files is refused unless forced.
//! Mount points (a filesystem of the node's layout, a bind mount) are never removed or
//! replaced: a version without one empties it and keeps the directory and its filesystem's
//! lost+found; a version that turns one into a file or a symlink is refused before anything
//! is changed.
//!
//! A fresh deploy (an empty target, as the installer has) streams instead: objects are written
//! into their files as they arrive, with no staging copy.

use crate::pull::{Client, ManifestAnswer};
use anyhow::{anyhow, bail, Context, Result};
use rustix::fs::{AtFlags, Mode, OFlags};
use serde::{Deserialize, Serialize};
use si_proto::manifest::{Entry, Kind, Manifest};
use si_proto::msg::ImageVersionInfo;
use si_proto::path as mpath;
use si_proto::Digest;
use si_tree::apply::{self, ObjectSource};
use si_tree::chunker::{self, Chunker, CHUNK_THRESHOLD};
use si_tree::exclude::Excludes;
use si_tree::fsutil::timing;
use si_tree::scan;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// The default update excludes.
pub const DEFAULT_UPDATE: &str = include_str!("excludes/update.exclude");

pub fn default_update_excludes() -> Vec<String> {
    DEFAULT_UPDATE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[derive(Clone, Debug)]
pub struct UpdateOptions {
    pub server: String,
    /// How the master is reached and trusted (TLS pinned to its CA, or `--insecure`).
    pub trust: si_trust::Connector,
    pub image: String,
    pub version: Option<u32>,
    pub root: PathBuf,
    pub excludes: Excludes,
    /// Where the installed record and the staging area live (default ROOT/var/lib/si).
    pub state_dir: Option<PathBuf>,
    pub dry_run: bool,
    pub verify: bool,
    pub force: bool,
    pub threads: usize,
    pub node: String,
    pub pre_hooks: Vec<String>,
    pub post_hooks: Vec<String>,
    /// Most kbit/s read from the server (0: no cap).
    pub max_rate_kbit: u64,
}

/// What the node records about its installed version (`installed.toml`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Installed {
    pub image: String,
    pub version: u32,
    /// The installed manifest's digest, which `installed.digests` must name to be used: the
    /// manifest digest (`si_proto::manifest::digest`) when `digest-format` is
    /// [`DIGEST_FORMAT`]. Nodes installed by older builds have no `digest-format` (read as 1)
    /// and the BLAKE3 of `installed.manifest`'s compressed bytes here, with the same in their
    /// `installed.digests`: the pair still matches, so such a node updates as before, and its
    /// next update records the new form.
    pub manifest: String,
    #[serde(default = "legacy_digest_format")]
    pub digest_format: u32,
    pub server: String,
    pub when: String,
}

/// `installed.toml`'s `digest-format`: `manifest` is the manifest digest.
pub const DIGEST_FORMAT: u32 = 2;

fn legacy_digest_format() -> u32 {
    1
}

#[derive(Debug, Default)]
pub struct Plan {
    pub image: String,
    pub version: u32,
    pub create: Vec<usize>,
    pub replace: Vec<usize>,
    pub meta: Vec<usize>,
    pub delete: Vec<Vec<u8>>,
    /// Objects to fetch from the server (digest, length).
    pub fetch: Vec<(Digest, u32)>,
    pub fetch_bytes: u64,
    /// Objects copied out of files already on the node: digest → (path, offset, length).
    pub local: HashMap<Digest, (Vec<u8>, u64, u32)>,
    /// Regular files on the node within the update's scope, and how many would be deleted.
    pub disk_files: u64,
    pub delete_files: u64,
    pub fresh: bool,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty()
            && self.replace.is_empty()
            && self.meta.is_empty()
            && self.delete.is_empty()
    }

    /// A dry-run listing: `+` created, `~` replaced, `m` metadata only, `-` deleted.
    pub fn print(&self, m: &Manifest, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        for (sign, list) in [("+", &self.create), ("~", &self.replace), ("m", &self.meta)] {
            for &i in list {
                writeln!(out, "{sign} /{}", m.entries[i].path_lossy())?;
            }
        }
        for p in &self.delete {
            writeln!(out, "- /{}", String::from_utf8_lossy(p))?;
        }
        writeln!(
            out,
            "{}@{}: {} to create, {} to replace, {} metadata only, {} to delete; {} objects ({} bytes) to fetch, {} reused from local files",
            self.image,
            self.version,
            self.create.len(),
            self.replace.len(),
            self.meta.len(),
            self.delete.len(),
            self.fetch.len(),
            self.fetch_bytes,
            self.local.len()
        )
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct UpdateSummary {
    pub image: String,
    pub version: u32,
    pub created: u64,
    pub replaced: u64,
    pub meta: u64,
    pub deleted: u64,
    pub fetched_objects: u64,
    pub fetched_bytes: u64,
    pub wire_bytes: u64,
    pub local_objects: u64,
    /// Where the time went: planning (walk and compare, while objects new in the version are
    /// prefetched), fetching the rest (and local copies), swapping.
    pub plan_seconds: f64,
    pub fetch_seconds: f64,
    pub swap_seconds: f64,
    pub seconds: f64,
}

struct DiskEntry {
    md: std::fs::Metadata,
}

/// Lists the tree on disk beneath `root` (relative paths), skipping excluded paths, descending
/// into mounts of local disk filesystems (a separate /boot) but not into others (proc, NFS).
/// The tree on disk by relative path, and the directories kept because something excluded
/// lies beneath them.
type DiskTree = (HashMap<Vec<u8>, DiskEntry>, HashSet<Vec<u8>>);

fn walk_disk(root: &Path, excludes: &Excludes) -> Result<DiskTree> {
    let mut out = HashMap::new();
    let mut keep = HashSet::new();
    let mounts = scan::mount_types();
    let root_md =
        std::fs::symlink_metadata(root).with_context(|| format!("reading {}", root.display()))?;
    let mut stack = vec![(root.to_path_buf(), Vec::new(), root_md.dev())];
    out.insert(Vec::new(), DiskEntry { md: root_md });
    while let Some((abs, rel, dev)) = stack.pop() {
        for e in std::fs::read_dir(&abs).with_context(|| format!("listing {}", abs.display()))? {
            let e = e.with_context(|| format!("listing {}", abs.display()))?;
            let name = e.file_name();
            let crel = mpath::join(&rel, name.as_bytes());
            if excludes.is_excluded(&crel) {
                // Keep the directories that lead to something excluded.
                let mut a = Some(rel.as_slice());
                while let Some(x) = a {
                    keep.insert(x.to_vec());
                    a = mpath::parent(x);
                }
                continue;
            }
            let p = e.path();
            let md = std::fs::symlink_metadata(&p)
                .with_context(|| format!("reading {}", p.display()))?;
            if md.is_dir() {
                let local = md.dev() == dev
                    || mounts
                        .get(&p)
                        .is_some_and(|t| scan::LOCAL_FS.contains(&t.as_str()));
                if local {
                    let d = md.dev();
                    stack.push((p, crel.clone(), d));
                }
            }
            out.insert(crel, DiskEntry { md });
        }
    }
    Ok((out, keep))
}

fn same_type(k: &Kind, md: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let ft = md.file_type();
    match k {
        Kind::Dir => ft.is_dir(),
        Kind::File { .. } | Kind::Hardlink { .. } => ft.is_file(),
        Kind::Symlink { .. } => ft.is_symlink(),
        Kind::CharDev { .. } => ft.is_char_device(),
        Kind::BlockDev { .. } => ft.is_block_device(),
        Kind::Fifo => ft.is_fifo(),
        Kind::Socket => ft.is_socket(),
    }
}

fn hash_matches(abs: &Path, size: u64, chunks: &[si_proto::Chunk]) -> Result<bool> {
    let f = std::fs::File::open(abs).with_context(|| format!("opening {}", abs.display()))?;
    let mut end = 0u64;
    let mut buf = Vec::new();
    for c in chunks {
        if c.offset > end && !is_zero_range(&f, end, c.offset - end)? {
            return Ok(false);
        }
        buf.resize(c.len as usize, 0);
        f.read_exact_at(&mut buf, c.offset)
            .with_context(|| format!("reading {}", abs.display()))?;
        if Digest::of(&buf) != c.digest {
            return Ok(false);
        }
        end = c.offset + c.len as u64;
    }
    Ok(end >= size || is_zero_range(&f, end, size - end)?)
}

fn is_zero_range(f: &std::fs::File, off: u64, len: u64) -> Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = off;
    while pos < off + len {
        let n = ((off + len - pos) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], pos)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        pos += n as u64;
    }
    Ok(true)
}

enum Action {
    Same,
    Meta,
    Replace,
}

/// `unchanged`: the installed version had this very entry, so a disk entry whose stat data
/// matches it needs no xattr or link read (drift past stat data is what `verify` is for).
fn classify(e: &Entry, d: &DiskEntry, abs: &Path, verify: bool, unchanged: bool) -> Result<Action> {
    let trust = unchanged && !verify;
    let md = &d.md;
    if !same_type(&e.kind, md) {
        return Ok(Action::Replace);
    }
    let meta_differs = || -> Result<bool> {
        if md.uid() != e.uid || md.gid() != e.gid {
            return Ok(true);
        }
        if !matches!(e.kind, Kind::Symlink { .. }) && md.mode() & 0o7777 != e.mode {
            return Ok(true);
        }
        if md.mtime() != e.mtime || md.mtime_nsec() as u32 != e.mtime_nsec {
            return Ok(true);
        }
        Ok(!trust && scan::read_xattrs(abs)? != e.xattrs)
    };
    match &e.kind {
        Kind::File { size, chunks } => {
            if md.len() != *size || md.mtime() != e.mtime || md.mtime_nsec() as u32 != e.mtime_nsec
            {
                return Ok(Action::Replace);
            }
            if verify && !hash_matches(abs, *size, chunks)? {
                return Ok(Action::Replace);
            }
        }
        Kind::Symlink { target }
            if !trust && std::fs::read_link(abs)?.as_os_str().as_bytes() != target.as_slice() =>
        {
            return Ok(Action::Replace);
        }
        Kind::CharDev { rdev } | Kind::BlockDev { rdev } if md.rdev() != *rdev => {
            return Ok(Action::Replace);
        }
        _ => {}
    }
    Ok(if meta_differs()? {
        Action::Meta
    } else {
        Action::Same
    })
}

fn state_dir(o: &UpdateOptions) -> PathBuf {
    o.state_dir
        .clone()
        .unwrap_or_else(|| o.root.join("var/lib/si"))
}

/// `installed.digests`: the installed version's object digests, sorted, so the objects a new
/// version adds are known the moment its delta arrives, before the installed manifest is
/// decoded. `SIDG`, format u32 LE, the digest of the manifest it was made from, then the
/// sorted unique 32-byte digests. A file that does not name the installed manifest is ignored.
struct DigestSet(Vec<u8>);

const DIGESTS_MAGIC: &[u8; 4] = b"SIDG";
const DIGESTS_HEAD: usize = 4 + 4 + 32;

impl DigestSet {
    fn encode(m: &Manifest, manifest: &Digest) -> Vec<u8> {
        let mut ds: Vec<[u8; 32]> = m.digests().map(|c| c.digest.0).collect();
        ds.sort_unstable();
        ds.dedup();
        let mut out = Vec::with_capacity(DIGESTS_HEAD + ds.len() * 32);
        out.extend_from_slice(DIGESTS_MAGIC);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&manifest.0);
        for d in ds {
            out.extend_from_slice(&d);
        }
        out
    }

    /// The set of `m`'s digests, in memory (made for no manifest file in particular).
    fn of(m: &Manifest) -> DigestSet {
        DigestSet(DigestSet::encode(m, &Digest([0; 32])))
    }

    fn load(dir: &Path, manifest: &str) -> Option<DigestSet> {
        let data = std::fs::read(dir.join("installed.digests")).ok()?;
        let want = Digest::from_hex(manifest).ok()?;
        let ok = data.len() >= DIGESTS_HEAD
            && (data.len() - DIGESTS_HEAD).is_multiple_of(32)
            && &data[..4] == DIGESTS_MAGIC
            && data[4..8] == 1u32.to_le_bytes()
            && data[8..40] == want.0;
        let set = DigestSet(data);
        (ok && set.digests().is_sorted_by(|a, b| a < b)).then_some(set)
    }

    fn digests(&self) -> &[[u8; 32]] {
        self.0[DIGESTS_HEAD..].as_chunks::<32>().0
    }

    fn contains(&self, d: &Digest) -> bool {
        self.digests().binary_search(&d.0).is_ok()
    }
}

/// The node's record of its installed version (`installed.toml`).
pub fn read_installed(dir: &Path) -> Option<Installed> {
    let text = std::fs::read_to_string(dir.join("installed.toml")).ok()?;
    toml::from_str(&text).ok()
}

/// The installed version's manifest (`installed.manifest`), decoded.
pub fn read_installed_manifest(dir: &Path) -> Option<Manifest> {
    let data = std::fs::read(dir.join("installed.manifest")).ok()?;
    Manifest::decode(&data).ok()
}

/// The update's scope: the options' excludes, plus the state directory, which an update
/// never touches.
fn scope(o: &UpdateOptions) -> Result<Excludes> {
    let mut excludes = o.excludes.clone();
    if let Ok(rel) = state_dir(o).strip_prefix(&o.root) {
        let rel = rel.as_os_str().as_bytes();
        if !rel.is_empty() {
            let mut pats = excludes.patterns().to_vec();
            pats.push(format!("/{}", String::from_utf8_lossy(rel)));
            excludes = Excludes::new(&pats)?;
        }
    }
    Ok(excludes)
}

/// Lists the node's tree within the update's scope (the expensive part of a plan).
fn scan_node(o: &UpdateOptions) -> Result<DiskTree> {
    let t = walk_disk(&o.root, &scope(o)?);
    timing("walk done");
    t
}

/// Builds the plan for moving the tree at `o.root` to `m`.
pub fn plan(
    o: &UpdateOptions,
    image: &str,
    version: u32,
    m: &Manifest,
    installed: Option<&Manifest>,
) -> Result<Plan> {
    plan_with(o, image, version, m, installed, scan_node(o)?)
}

fn plan_with(
    o: &UpdateOptions,
    image: &str,
    version: u32,
    m: &Manifest,
    installed: Option<&Manifest>,
    tree: DiskTree,
) -> Result<Plan> {
    let root = &o.root;
    let excludes = scope(o)?;
    let (disk, keep) = tree;
    let mut p = Plan {
        image: image.into(),
        version,
        ..Default::default()
    };
    // Fresh: nothing but empty directories the version has (the installer's mount points of a
    // whole layout) and filesystems' lost+found.
    p.fresh = disk.len() <= 1 || {
        let dirs: HashSet<&[u8]> = m
            .entries
            .iter()
            .filter(|e| e.kind == Kind::Dir)
            .map(|e| e.path.as_slice())
            .collect();
        disk.iter().all(|(path, d)| {
            d.md.is_dir()
                && (path.is_empty()
                    || mpath::file_name(path) == b"lost+found"
                    || dirs.contains(path.as_slice()))
        })
    };
    p.disk_files = disk.values().filter(|d| d.md.is_file()).count() as u64;
    // Mount points on the node (a filesystem of its layout, a bind mount): an update empties
    // or fills them but never removes or replaces the directory itself.
    let mounts = scan::mount_types();
    let is_mount = |path: &[u8]| {
        let Some(d) = disk.get(path).filter(|d| d.md.is_dir() && !path.is_empty()) else {
            return false;
        };
        let other_dev = mpath::parent(path)
            .and_then(|pp| disk.get(pp))
            .is_some_and(|pd| pd.md.dev() != d.md.dev());
        other_dev || mounts.contains_key(&root.join(OsStr::from_bytes(path)))
    };
    let before: HashMap<&[u8], &Entry> = installed
        .map(|im| im.entries.iter().map(|e| (e.path.as_slice(), e)).collect())
        .unwrap_or_default();
    let mut target_paths: HashSet<&[u8]> = HashSet::new();
    let mut changed: HashSet<&[u8]> = HashSet::new();
    for (i, e) in m.entries.iter().enumerate() {
        if excludes.is_excluded(&e.path) {
            continue;
        }
        target_paths.insert(&e.path);
        let abs = root.join(OsStr::from_bytes(&e.path));
        if e.path.is_empty() {
            // The root itself: only its metadata can differ.
            if let Some(d) = disk.get(&e.path) {
                if let Action::Meta | Action::Replace = classify(e, d, &abs, o.verify, false)? {
                    p.meta.push(i);
                }
            }
            continue;
        }
        let action = match (disk.get(&e.path), &e.kind) {
            (None, _) => {
                p.create.push(i);
                changed.insert(&e.path);
                continue;
            }
            (Some(d), Kind::Hardlink { target }) => {
                let linked = disk
                    .get(target)
                    .is_some_and(|t| t.md.ino() == d.md.ino() && t.md.dev() == d.md.dev());
                if !linked || changed.contains(target.as_slice()) {
                    Action::Replace
                } else {
                    Action::Same
                }
            }
            (Some(d), _) => {
                let unchanged = before.get(e.path.as_slice()).is_some_and(|b| *b == e);
                classify(e, d, &abs, o.verify, unchanged)?
            }
        };
        match action {
            Action::Same => {}
            Action::Meta => p.meta.push(i),
            Action::Replace if e.kind != Kind::Dir && is_mount(&e.path) => bail!(
                "/{} is a mount point on this node; {image}@{version} makes it a {}: nothing was changed (unmount it, or change the node's layout first)",
                e.path_lossy(),
                e.kind.name()
            ),
            Action::Replace => {
                p.replace.push(i);
                changed.insert(&e.path);
            }
        }
    }
    let mut del: Vec<Vec<u8>> = disk
        .keys()
        .filter(|k| {
            !k.is_empty() && !target_paths.contains(k.as_slice()) && !keep.contains(k.as_slice())
        })
        .filter(|k| {
            // What lies inside still goes; the mount point stays, and so does the lost+found
            // of the filesystem mounted there (e2fsck's, never part of an image).
            let mount = is_mount(k);
            if mount {
                tracing::warn!(path = %String::from_utf8_lossy(k), %image, version, "the version no longer has this mount point; it is kept (emptied)");
            }
            let lost_found = mpath::file_name(k) == b"lost+found"
                && mpath::parent(k).is_some_and(|pp| pp.is_empty() || is_mount(pp));
            !mount && !lost_found
        })
        .cloned()
        .collect();
    p.delete_files = del
        .iter()
        .filter(|k| disk[k.as_slice()].md.is_file())
        .count() as u64;
    del.sort();
    del.reverse();
    p.delete = del;

    // Objects: what the new content needs, minus what is already on the node.
    let mut needed: Vec<(Digest, u32)> = Vec::new();
    let mut seen = HashSet::new();
    for &i in p.create.iter().chain(&p.replace) {
        if let Kind::File { chunks, .. } = &m.entries[i].kind {
            for c in chunks {
                if seen.insert(c.digest) {
                    needed.push((c.digest, c.len));
                }
            }
        }
    }
    if !p.fresh && !needed.is_empty() {
        // Files as the installed manifest records them: their chunks are known without reading.
        let mut known: HashSet<&[u8]> = HashSet::new();
        if let Some(im) = installed {
            for e in &im.entries {
                if let (Kind::File { chunks, .. }, Some(d)) = (&e.kind, disk.get(&e.path)) {
                    if d.md.len() == e.file_size()
                        && d.md.mtime() == e.mtime
                        && d.md.mtime_nsec() as u32 == e.mtime_nsec
                    {
                        known.insert(&e.path);
                        for c in chunks {
                            if seen.contains(&c.digest) {
                                p.local.entry(c.digest).or_insert((
                                    e.path.clone(),
                                    c.offset,
                                    c.len,
                                ));
                            }
                        }
                    }
                }
            }
        }
        // The old versions of changed big files the installed manifest does not describe,
        // chunked the way the image was.
        for &i in &p.replace {
            let e = &m.entries[i];
            if let (Kind::File { size, .. }, Some(d)) = (&e.kind, disk.get(&e.path)) {
                if *size > CHUNK_THRESHOLD
                    && d.md.is_file()
                    && d.md.len() > CHUNK_THRESHOLD
                    && !known.contains(e.path.as_slice())
                {
                    let abs = root.join(OsStr::from_bytes(&e.path));
                    for c in local_chunks(&abs)? {
                        if seen.contains(&c.digest) {
                            p.local
                                .entry(c.digest)
                                .or_insert((e.path.clone(), c.offset, c.len));
                        }
                    }
                }
            }
        }
    }
    for (d, len) in needed {
        if !p.local.contains_key(&d) {
            p.fetch_bytes += len as u64;
            p.fetch.push((d, len));
        }
    }
    Ok(p)
}

/// The chunks a local file has by the one chunking rule ([`si_tree::chunker`], over the file's own
/// hole map): what the old version of a changed file can give a new version without a fetch.
pub fn local_chunks(abs: &Path) -> Result<Vec<si_proto::Chunk>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(abs)
        .with_context(|| format!("opening {}", abs.display()))?;
    let md = f
        .metadata()
        .with_context(|| format!("reading metadata of {}", abs.display()))?;
    let extents = chunker::data_extents(&f, &md)
        .with_context(|| format!("finding the data of {}", abs.display()))?;
    let mut out = Vec::new();
    Chunker::new()
        .file(&f, &extents, |offset, data| {
            out.push(si_proto::Chunk {
                offset,
                len: data.len() as u32,
                digest: Digest::of(data),
            });
            Ok(())
        })
        .with_context(|| format!("reading {}", abs.display()))?;
    Ok(out)
}

/// Objects staged on the node, verified on arrival.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.to_hex())
    }
    fn has(&self, d: &Digest, len: u32) -> bool {
        std::fs::read(self.path(d))
            .is_ok_and(|data| data.len() == len as usize && Digest::of(&data) == *d)
    }
    fn put(&self, d: &Digest, data: &[u8]) -> Result<()> {
        let tmp = self.dir.join(format!(".{}.tmp", d.to_hex()));
        std::fs::write(&tmp, data).with_context(|| format!("staging {d}"))?;
        std::fs::rename(&tmp, self.path(d)).with_context(|| format!("staging {d}"))
    }
}

impl ObjectSource for Staging {
    fn get(&self, d: &Digest, raw_len: u32) -> Result<Vec<u8>> {
        let data =
            std::fs::read(self.path(d)).with_context(|| format!("object {d} is not staged"))?;
        if data.len() != raw_len as usize {
            bail!("staged object {d} has the wrong length");
        }
        Ok(data)
    }
}

/// Runs a hook command with the update's context in its environment.
fn run_hook(cmd: &str, o: &UpdateOptions, version: u32, phase: &str) -> Result<()> {
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("SI_IMAGE", &o.image)
        .env("SI_VERSION", version.to_string())
        .env("SI_ROOT", &o.root)
        .env("SI_PHASE", phase)
        .status()
        .with_context(|| format!("running {phase} hook {cmd:?}"))?;
    if !st.success() {
        bail!("{phase} hook {cmd:?} failed ({st})");
    }
    Ok(())
}

/// Services to stop before and start after the swap, declared by the image in
/// `/etc/si/triggers.toml`:
///
/// ```toml
/// [[trigger]]
/// paths = ["/etc/ssh/**", "/usr/sbin/sshd"]
/// service = "ssh"              # systemctl stop/start ssh, unless stop/start are given
/// stop = "systemctl stop ssh"
/// start = "systemctl start ssh"
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Triggers {
    #[serde(default)]
    pub trigger: Vec<Trigger>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    pub paths: Vec<String>,
    pub service: String,
    pub stop: Option<String>,
    pub start: Option<String>,
}

fn fired_triggers(text: &str, changed: &[&[u8]]) -> Result<Vec<Trigger>> {
    let t: Triggers = toml::from_str(text).context("parsing /etc/si/triggers.toml")?;
    let mut out = Vec::new();
    for tr in t.trigger {
        let ex = Excludes::new(&tr.paths)?;
        if changed.iter().any(|p| ex.is_excluded(p)) {
            out.push(tr);
        }
    }
    Ok(out)
}

/// Removes the tree at `rel` beneath `root` (no symlink followed).
pub fn remove_tree(root: BorrowedFd<'_>, rel: &[u8]) -> Result<()> {
    let parent = mpath::parent(rel).ok_or_else(|| anyhow!("refusing to remove the root"))?;
    let pd = apply::open_dir_beneath(root, parent)?;
    let name = OsStr::from_bytes(mpath::file_name(rel));
    let st = rustix::fs::statat(&pd, name, AtFlags::SYMLINK_NOFOLLOW);
    match st {
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("stat {}", String::from_utf8_lossy(rel))),
        Ok(s)
            if rustix::fs::FileType::from_raw_mode(s.st_mode)
                == rustix::fs::FileType::Directory =>
        {
            let d = apply::open_dir_beneath(root, rel)?;
            let mut names = Vec::new();
            for ent in rustix::fs::Dir::read_from(&d).context("listing a directory to remove")? {
                let ent = ent?;
                let n = ent.file_name().to_bytes();
                if n != b"." && n != b".." {
                    names.push(n.to_vec());
                }
            }
            for n in names {
                remove_tree(root, &mpath::join(rel, &n))?;
            }
            rustix::fs::unlinkat(&pd, name, AtFlags::REMOVEDIR)
                .with_context(|| format!("removing {}", String::from_utf8_lossy(rel)))?;
        }
        Ok(_) => rustix::fs::unlinkat(&pd, name, AtFlags::empty())
            .with_context(|| format!("removing {}", String::from_utf8_lossy(rel)))?,
    }
    Ok(())
}

fn tmp_name(name: &[u8]) -> Vec<u8> {
    let mut v = b".si-new.".to_vec();
    v.extend_from_slice(&name[..name.len().min(200)]);
    v
}

/// Applies metadata to an existing entry, removing xattrs the target does not have.
fn fix_meta(root: BorrowedFd<'_>, e: &Entry) -> Result<()> {
    let parent = mpath::parent(&e.path).unwrap_or(b"");
    let pd = apply::open_dir_beneath(root, parent)?;
    let name = if e.path.is_empty() {
        OsStr::new(".")
    } else {
        OsStr::from_bytes(mpath::file_name(&e.path))
    };
    match e.kind {
        Kind::Dir | Kind::File { .. } | Kind::Hardlink { .. } => {
            let fd = if e.path.is_empty() {
                pd
            } else {
                let flags = if e.kind == Kind::Dir {
                    OFlags::RDONLY | OFlags::DIRECTORY
                } else {
                    OFlags::RDONLY
                };
                rustix::fs::openat(
                    &pd,
                    name,
                    flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .with_context(|| format!("opening {}", e.path_lossy()))?
            };
            let mut buf = vec![0u8; 64 << 10];
            let n = rustix::fs::flistxattr(&fd, &mut buf[..]).unwrap_or(0);
            for x in buf[..n].split(|&b| b == 0).filter(|x| !x.is_empty()) {
                if !e.xattrs.iter().any(|t| t.name == x) {
                    rustix::fs::fremovexattr(&fd, OsStr::from_bytes(x))
                        .with_context(|| format!("removing an xattr of {}", e.path_lossy()))?;
                }
            }
            apply::set_meta_fd(fd.as_fd(), e)
        }
        _ => apply::set_meta_at_pub(pd.as_fd(), name, e),
    }
}

/// Fetches `m` into an empty root, writing objects into their files as they arrive.
/// Writes a version onto an empty root, streaming each object into every place it is used;
/// returns the objects and bytes fetched.
pub fn deploy_fresh(
    client: &mut Client,
    m: &Manifest,
    root: &Path,
    threads: usize,
) -> Result<(u64, u64)> {
    deploy_fresh_with(m, root, &mut |wants, f| client.fetch(wants, threads, f))
}

/// What [`deploy_fresh_with`] gets its objects with: called once with every object the version
/// needs (digest, length) and the function that writes one into the tree; it returns once each
/// was handed to that function (a relay fetches them from its upstreams).
pub type Fetch<'a> =
    dyn FnMut(&[(Digest, u32)], &(dyn Fn(Digest, Vec<u8>) -> Result<()> + Sync)) -> Result<()> + 'a;

/// [`deploy_fresh`] with the objects from `fetch`.
pub fn deploy_fresh_with(m: &Manifest, root: &Path, fetch: &mut Fetch<'_>) -> Result<(u64, u64)> {
    m.validate()?;
    let rootfd = apply::open_root(root)?;
    let rfd = rootfd.as_fd();
    let mut with_content: Vec<usize> = Vec::new();
    for (i, e) in m.entries.iter().enumerate().skip(1) {
        let pd = apply::open_dir_beneath(rfd, mpath::parent(&e.path).expect("non-root"))?;
        let name = OsStr::from_bytes(mpath::file_name(&e.path));
        match &e.kind {
            Kind::Hardlink { .. } => {}
            Kind::File { chunks, .. } if !chunks.is_empty() => with_content.push(i),
            // A mount point the installer made (its metadata is set with the others below).
            Kind::Dir
                if rustix::fs::statat(&pd, name, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| {
                    rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::Directory
                }) => {}
            _ => {
                apply::create_at(pd.as_fd(), name, e, &NoObjects)?;
            }
        }
    }
    let remaining: Vec<AtomicU32> = with_content
        .iter()
        .map(|&i| match &m.entries[i].kind {
            Kind::File { chunks, .. } => AtomicU32::new(chunks.len() as u32),
            _ => AtomicU32::new(0),
        })
        .collect();
    let mut uses: HashMap<Digest, Vec<(usize, u64)>> = HashMap::new();
    let mut wants = Vec::new();
    for (k, &i) in with_content.iter().enumerate() {
        if let Kind::File { chunks, .. } = &m.entries[i].kind {
            for c in chunks {
                let u = uses.entry(c.digest).or_default();
                if u.is_empty() {
                    wants.push((c.digest, c.len));
                }
                u.push((k, c.offset));
            }
        }
    }
    let written = AtomicU64::new(0);
    let f = |d: Digest, data: Vec<u8>| -> Result<()> {
        for &(k, off) in uses
            .get(&d)
            .ok_or_else(|| anyhow!("unrequested object {d}"))?
        {
            let e = &m.entries[with_content[k]];
            let pd = apply::open_dir_beneath(rfd, mpath::parent(&e.path).expect("non-root"))?;
            let fd = rustix::fs::openat(
                &pd,
                OsStr::from_bytes(mpath::file_name(&e.path)),
                OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .with_context(|| format!("creating {}", e.path_lossy()))?;
            let file = std::fs::File::from(fd);
            file.write_all_at(&data, off)
                .with_context(|| format!("writing {}", e.path_lossy()))?;
            written.fetch_add(data.len() as u64, Ordering::Relaxed);
            if remaining[k].fetch_sub(1, Ordering::AcqRel) == 1 {
                if let Kind::File { size, .. } = &e.kind {
                    file.set_len(*size)?;
                }
                apply::set_meta_fd(file.as_fd(), e)?;
            }
        }
        Ok(())
    };
    fetch(&wants, &f)?;
    for e in m
        .entries
        .iter()
        .filter(|e| matches!(e.kind, Kind::Hardlink { .. }))
    {
        let pd = apply::open_dir_beneath(rfd, mpath::parent(&e.path).expect("non-root"))?;
        apply::link_at(
            rfd,
            pd.as_fd(),
            OsStr::from_bytes(mpath::file_name(&e.path)),
            e,
        )?;
    }
    for e in m.entries.iter().rev().filter(|e| e.kind == Kind::Dir) {
        let d = apply::open_dir_beneath(rfd, &e.path)?;
        apply::set_meta_fd(d.as_fd(), e)?;
    }
    Ok((wants.len() as u64, written.load(Ordering::Relaxed)))
}

struct NoObjects;
impl ObjectSource for NoObjects {
    fn get(&self, d: &Digest, _: u32) -> Result<Vec<u8>> {
        bail!("object {d} unexpectedly needed")
    }
}

/// Fails unless `need` bytes fit on the filesystem of `p`.
fn ensure_space(p: &Path, need: u64) -> Result<()> {
    let s = rustix::fs::statvfs(p).with_context(|| format!("statvfs {}", p.display()))?;
    let free = s.f_bavail * s.f_frsize;
    if need > free {
        bail!(
            "not enough space in {}: the update needs {need} bytes, {free} are free",
            p.display()
        );
    }
    Ok(())
}

/// Moves the tree at `o.root` to the requested version. With `dry_run`, only plans.
/// Moves the node to a version, as a straight line of stages:
///
/// ```text
/// prepare  the session, the target manifest (or its delta), the installed state; the walk of
///          the node's tree starts
/// plan     the target manifest rebuilt, the tree compared with it: the printable Plan (the dry
///          run stops here); objects new in the version are fetched meanwhile (the prefetch)
/// stage    everything the swap needs is put on the node: local copies checked, the rest
///          fetched (a fresh deploy writes its tree here instead)
/// swap     hooks and triggers around the atomic replacement of each changed entry
/// record   installed.manifest, installed.digests, installed.toml
/// report   the master is told, the session closed
/// ```
pub fn update(o: &UpdateOptions, out: &mut dyn std::io::Write) -> Result<UpdateSummary> {
    let start = std::time::Instant::now();
    timing("update: start");
    let prepared = prepare(o)?;
    let (mut client, planned) = plan_stage(o, prepared)?;
    let mut sum = UpdateSummary {
        image: planned.info.image.clone(),
        version: planned.info.version,
        plan_seconds: planned.seconds,
        ..Default::default()
    };
    if o.dry_run {
        planned.plan.print(&planned.m, out)?;
        client.bye();
        return Ok(sum);
    }
    if planned.plan.fresh {
        deploy_stage(o, &mut client, &planned, &mut sum)?;
    } else {
        let staged = stage(o, &mut client, &planned, &mut sum)?;
        swap_stage(o, &planned, staged, &mut sum)?;
    }
    record(o, &planned)?;
    if !planned.plan.fresh {
        for h in &o.post_hooks {
            run_hook(h, o, planned.info.version, "post-update")?;
        }
    }
    timing("recorded");
    sum.wire_bytes = client.received();
    sum.seconds = start.elapsed().as_secs_f64();
    report(o, client, &planned.info);
    Ok(sum)
}

/// What [`prepare`] gathers for the plan.
struct Prepared {
    client: Client,
    sdir: PathBuf,
    staging: Staging,
    info: ImageVersionInfo,
    answer: ManifestAnswer,
    /// The walk of the node's tree, running.
    walker: std::thread::JoinHandle<Result<DiskTree>>,
    /// The installed manifest: decoded already, or being decoded.
    installed: InstalledManifest,
    /// Objects new in the version that the node lacks: fetched while the plan is made.
    prefetch: Vec<(Digest, u32)>,
    t0: std::time::Instant,
}

enum InstalledManifest {
    Decoded(Option<Manifest>),
    Decoding(std::thread::JoinHandle<Option<Manifest>>),
}

impl InstalledManifest {
    fn get(self) -> Option<Manifest> {
        match self {
            InstalledManifest::Decoded(m) => m,
            InstalledManifest::Decoding(h) => h.join().ok().flatten(),
        }
    }
}

/// The outcome of the plan stage: the target manifest and what to do to the node.
struct Planned {
    info: ImageVersionInfo,
    m: Manifest,
    /// The manifest's encoding, as recorded once installed.
    mbytes: Vec<u8>,
    plan: Plan,
    /// Objects already fetched by the prefetch, and their bytes.
    prefetched: HashSet<Digest>,
    prefetched_bytes: u64,
    staging: Staging,
    sdir: PathBuf,
    t0: std::time::Instant,
    seconds: f64,
}

/// What the swap reads besides the staging area: ranges of the node's own files, in place.
struct Staged {
    direct: HashMap<Digest, (PathBuf, u64, u32)>,
}

/// Connects, asks for the manifest (a delta from the installed version where there is one),
/// starts the walk of the node's tree and lists the objects to prefetch.
fn prepare(o: &UpdateOptions) -> Result<Prepared> {
    // The walk of the node's tree runs while the server is asked for the manifest.
    std::fs::create_dir_all(&o.root).with_context(|| format!("creating {}", o.root.display()))?;
    let walker = {
        let o = o.clone();
        std::thread::spawn(move || scan_node(&o))
    };
    // The installed manifest is decoded while the server answers.
    let sdir = state_dir(o);
    let inst = read_installed(&sdir);
    let inst_decoder = {
        let dir = sdir.clone();
        std::thread::spawn(move || read_installed_manifest(&dir))
    };
    let mut client = Client::connect(&o.server, Duration::from_secs(10), &o.trust)?;
    if o.max_rate_kbit > 0 {
        tracing::info!(
            max_rate_kbit = o.max_rate_kbit,
            "reading from the server at a capped rate"
        );
        client.limit_rate(o.max_rate_kbit);
    }
    timing("connected");
    let has_manifest = sdir.join("installed.manifest").exists();
    let base = inst
        .as_ref()
        .filter(|_| has_manifest)
        .map(|i| (i.image.as_str(), i.version));
    let answer = client.manifest_or_delta(&o.image, o.version, base)?;
    timing("manifest");
    let info = answer.info().clone();
    let t0 = std::time::Instant::now();
    let staging = Staging {
        dir: sdir.join("staging"),
    };
    // Objects new in this version (absent from the installed one) move while the tree is
    // walked and the plan made; what the walk finds missing besides (local drift) is fetched
    // after. With a delta they are known before the manifest is even rebuilt: they can only
    // be in the entries the delta adds or changes.
    let mut prefetch: Vec<(Digest, u32)> = Vec::new();
    let known = inst
        .as_ref()
        .and_then(|i| DigestSet::load(&sdir, &i.manifest));
    // Decoded here only when the digest list is missing; otherwise while the prefetch runs.
    let mut installed = InstalledManifest::Decoding(inst_decoder);
    // What the node has: the digest list, else the decoded installed manifest's digests.
    // Without either nothing is fetched ahead: the walk decides.
    let old = match (&inst, o.dry_run, known) {
        (None, _, _) | (_, true, _) => None,
        (_, _, Some(k)) => Some(k),
        (_, _, None) => {
            let m = installed.get();
            let set = m.as_ref().map(DigestSet::of);
            installed = InstalledManifest::Decoded(m);
            set
        }
    };
    if let Some(old) = old {
        let mut seen = HashSet::new();
        // Only what the plan can write: nothing below an excluded path is fetched.
        let excludes = scope(o)?;
        let entries: Box<dyn Iterator<Item = &Entry>> = match &answer {
            ManifestAnswer::Full { m, .. } => Box::new(m.entries.iter()),
            ManifestAnswer::Delta { delta, .. } => Box::new(delta.upserts.iter()),
        };
        let new_chunks = entries
            .filter(|e| !excludes.is_excluded(&e.path))
            .flat_map(|e| match &e.kind {
                Kind::File { chunks, .. } => chunks.as_slice(),
                _ => &[],
            });
        prefetch = new_chunks
            .filter(|c| !old.contains(&c.digest) && seen.insert(c.digest))
            .map(|c| (c.digest, c.len))
            .collect();
    }
    if !prefetch.is_empty() {
        std::fs::create_dir_all(&staging.dir)
            .with_context(|| format!("creating {}", staging.dir.display()))?;
        ensure_space(&staging.dir, prefetch.iter().map(|x| u64::from(x.1)).sum())?;
        prefetch.retain(|(d, l)| !staging.has(d, *l));
    }
    timing("prefetch list");
    Ok(Prepared {
        client,
        sdir,
        staging,
        info,
        answer,
        walker,
        installed,
        prefetch,
        t0,
    })
}

/// Rebuilds the target manifest, joins the walk and makes the plan, while the prefetch fetches
/// the objects new in the version.
fn plan_stage(o: &UpdateOptions, prep: Prepared) -> Result<(Client, Planned)> {
    let Prepared {
        mut client,
        sdir,
        staging,
        info,
        answer,
        walker,
        installed,
        prefetch,
        t0,
    } = prep;
    let prefetched = AtomicU64::new(0);
    let (planned, pre, inst_m) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            client.fetch(&prefetch, o.threads, &|d, data| {
                prefetched.fetch_add(data.len() as u64, Ordering::Relaxed);
                staging.put(&d, &data)
            })
        });
        let inst_m = installed.get();
        timing("installed manifest");
        let rebuilt = answer.into_manifest(inst_m.as_ref());
        timing("manifest rebuilt");
        let tree = walker
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the walk panicked")));
        timing("walk joined");
        let planned = match rebuilt {
            Some((m, mbytes)) => {
                let p = tree
                    .and_then(|t| plan_with(o, &info.image, info.version, &m, inst_m.as_ref(), t));
                timing("planned");
                Ok((m, mbytes, p))
            }
            None => Err(tree),
        };
        (
            planned,
            h.join()
                .unwrap_or_else(|_| Err(anyhow!("prefetch panicked")))
                .inspect(|_| timing("prefetched")),
            inst_m,
        )
    });
    pre?;
    let (m, mbytes, p) = match planned {
        Ok(x) => x,
        Err(tree) => {
            // The delta did not rebuild the manifest the server named: take the whole one.
            let (_, m, mbytes) = client.manifest(&o.image, Some(info.version))?;
            let p =
                tree.and_then(|t| plan_with(o, &info.image, info.version, &m, inst_m.as_ref(), t));
            (m, mbytes, p)
        }
    };
    let plan = p?;
    let planned = Planned {
        info,
        m,
        mbytes,
        plan,
        prefetched: prefetch.iter().map(|x| x.0).collect(),
        prefetched_bytes: prefetched.load(Ordering::Relaxed),
        staging,
        sdir,
        t0,
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((client, planned))
}

/// A fresh deploy: the tree is written straight from the stream (nothing to swap).
fn deploy_stage(
    o: &UpdateOptions,
    client: &mut Client,
    planned: &Planned,
    sum: &mut UpdateSummary,
) -> Result<()> {
    let m = &planned.m;
    // The data the image holds (holes excluded) must fit beside what is there.
    ensure_space(&o.root, m.digests().map(|c| u64::from(c.len)).sum())?;
    let (objects, written) = deploy_fresh(client, m, &o.root, o.threads)?;
    sum.created = m.entries.len() as u64 - 1;
    sum.fetched_objects = objects;
    sum.fetched_bytes = written;
    Ok(())
}

/// Puts everything the swap needs on the node before anything is touched: local copies
/// checked (read in place at swap time where their file stays), the rest fetched.
fn stage(
    o: &UpdateOptions,
    client: &mut Client,
    planned: &Planned,
    sum: &mut UpdateSummary,
) -> Result<Staged> {
    let (m, p, staging, staged) = (
        &planned.m,
        &planned.plan,
        &planned.staging,
        &planned.prefetched,
    );
    let deleted_files = p.delete_files;
    if !o.force && p.disk_files > 0 && deleted_files * 2 > p.disk_files {
        bail!(
            "refusing to delete {deleted_files} of the node's {} files in scope (wrong image?); use --force",
            p.disk_files
        );
    }
    std::fs::create_dir_all(&staging.dir)
        .with_context(|| format!("creating {}", staging.dir.display()))?;
    // Everything the swap needs is on the node before anything is touched.
    let new_bytes: u64 = p
        .create
        .iter()
        .chain(&p.replace)
        .map(|&i| m.entries[i].file_size())
        .sum();
    ensure_space(&planned.sdir, p.fetch_bytes + new_bytes)?;
    // Local copies first (from files not yet touched); a copy that no longer matches
    // (local drift) is fetched instead.
    let mut todo: Vec<(Digest, u32)> = p
        .fetch
        .iter()
        .copied()
        .filter(|(d, l)| !staged.contains(d) && !staging.has(d, *l))
        .collect();
    // Local copies: read in place at swap time when their file stays as it is (or is the
    // very file they go into, still the old one until renamed over); staged otherwise.
    // Each is checked now, so a drifted file means a fetch, not a failed swap.
    let touched: HashSet<&[u8]> = p
        .replace
        .iter()
        .map(|&i| m.entries[i].path.as_slice())
        .chain(p.delete.iter().map(|v| v.as_slice()))
        .collect();
    let mut users: HashMap<Digest, HashSet<&[u8]>> = HashMap::new();
    for &i in p.create.iter().chain(&p.replace) {
        if let Kind::File { chunks, .. } = &m.entries[i].kind {
            for c in chunks {
                users
                    .entry(c.digest)
                    .or_default()
                    .insert(&m.entries[i].path);
            }
        }
    }
    let mut direct: HashMap<Digest, (PathBuf, u64, u32)> = HashMap::new();
    let mut local_ok = 0u64;
    let mut buf = Vec::new();
    for (d, (path, off, len)) in p.local.iter().filter(|(d, _)| !staged.contains(*d)) {
        let abs = o.root.join(OsStr::from_bytes(path));
        buf.resize(*len as usize, 0);
        let ok = std::fs::File::open(&abs)
            .and_then(|f| f.read_exact_at(&mut buf, *off))
            .is_ok()
            && Digest::of(&buf) == *d;
        if !ok {
            todo.push((*d, *len));
            continue;
        }
        local_ok += 1;
        let in_place = !touched.contains(path.as_slice())
            || users
                .get(d)
                .is_some_and(|u| u.len() == 1 && u.contains(path.as_slice()));
        if in_place {
            direct.insert(*d, (abs, *off, *len));
        } else {
            staging.put(d, &buf)?;
        }
    }
    let fetched = AtomicU64::new(0);
    client.fetch(&todo, o.threads, &|d, data| {
        fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
        staging.put(&d, &data)
    })?;
    sum.fetched_objects = (todo.len() + staged.len()) as u64;
    sum.fetched_bytes = fetched.load(Ordering::Relaxed) + planned.prefetched_bytes;
    sum.local_objects = local_ok;
    sum.fetch_seconds = planned.t0.elapsed().as_secs_f64() - sum.plan_seconds;
    timing("fetched");
    Ok(Staged { direct })
}

/// Runs the pre-update hooks and the fired triggers' stops, swaps every changed entry into
/// place, then starts the triggers' services again.
fn swap_stage(
    o: &UpdateOptions,
    planned: &Planned,
    staged: Staged,
    sum: &mut UpdateSummary,
) -> Result<()> {
    let (m, p, staging, version) = (
        &planned.m,
        &planned.plan,
        &planned.staging,
        planned.info.version,
    );
    let changed: Vec<&[u8]> = p
        .create
        .iter()
        .chain(&p.replace)
        .chain(&p.meta)
        .map(|&i| m.entries[i].path.as_slice())
        .chain(p.delete.iter().map(|v| v.as_slice()))
        .collect();
    let triggers = match m.get(b"etc/si/triggers.toml") {
        Some(Entry {
            kind: Kind::File { chunks, .. },
            ..
        }) => {
            let mut text = Vec::new();
            for c in chunks {
                match staging.get(&c.digest, c.len) {
                    Ok(d) => text.extend(d),
                    Err(_) => {
                        // Unchanged in this version: the node's own copy is the one.
                        let p = o.root.join("etc/si/triggers.toml");
                        text = std::fs::read(&p)
                            .with_context(|| format!("reading {}", p.display()))?;
                        break;
                    }
                }
            }
            let text = String::from_utf8(text).context("/etc/si/triggers.toml is not UTF-8")?;
            fired_triggers(&text, &changed)?
        }
        _ => vec![],
    };
    for h in &o.pre_hooks {
        run_hook(h, o, version, "pre-update")?;
    }
    for t in &triggers {
        run_hook(
            t.stop
                .as_deref()
                .unwrap_or(&format!("systemctl stop {}", t.service)),
            o,
            version,
            "trigger-stop",
        )?;
    }
    let t1 = std::time::Instant::now();
    swap(
        o,
        m,
        p,
        &SwapSource {
            staging,
            direct: staged.direct,
        },
    )?;
    sum.swap_seconds = t1.elapsed().as_secs_f64();
    timing("swapped");
    for t in &triggers {
        run_hook(
            t.start
                .as_deref()
                .unwrap_or(&format!("systemctl start {}", t.service)),
            o,
            version,
            "trigger-start",
        )?;
    }
    sum.created = p.create.len() as u64;
    sum.replaced = p.replace.len() as u64;
    sum.meta = p.meta.len() as u64;
    sum.deleted = p.delete.len() as u64;
    Ok(())
}

/// Records the installed version: its manifest, its digest list and `installed.toml`.
fn record(o: &UpdateOptions, planned: &Planned) -> Result<()> {
    std::fs::remove_dir_all(&planned.staging.dir).ok();
    record_installed(
        &planned.sdir,
        &o.server,
        &planned.info,
        &planned.m,
        &planned.mbytes,
    )
}

/// Records the version now on the node in `sdir` (`installed.manifest`, `installed.digests`,
/// `installed.toml`): what the next update plans against. `server` is the master it came from.
pub fn record_installed(
    sdir: &Path,
    server: &str,
    info: &ImageVersionInfo,
    m: &Manifest,
    mbytes: &[u8],
) -> Result<()> {
    std::fs::create_dir_all(sdir).with_context(|| format!("creating {}", sdir.display()))?;
    let digest = m.digest();
    let inst = Installed {
        image: info.image.clone(),
        version: info.version,
        manifest: digest.to_hex(),
        digest_format: DIGEST_FORMAT,
        server: server.to_string(),
        when: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    si_tree::fsutil::write_atomic(&sdir.join("installed.manifest"), mbytes)?;
    si_tree::fsutil::write_atomic(
        &sdir.join("installed.digests"),
        &DigestSet::encode(m, &digest),
    )?;
    si_tree::fsutil::write_atomic(
        &sdir.join("installed.toml"),
        toml::to_string_pretty(&inst)?.as_bytes(),
    )?;
    Ok(())
}

/// Tells the master the node is at the version. The update has happened whatever the answer:
/// a report the master did not store is logged, not an error of the update.
fn report(o: &UpdateOptions, mut client: Client, info: &ImageVersionInfo) {
    let detail = format!("{}@{}", info.image, info.version);
    let mut sent = client.report(&o.node, "updated", &detail);
    if sent.is_err() {
        // The swap and the hooks may outlast the service's idle timeout (it closes a
        // connection quiet for two minutes): one new connection for the report.
        sent = Client::connect(&o.server, Duration::from_secs(10), &o.trust).and_then(|mut c| {
            let r = c.report(&o.node, "updated", &detail);
            client = c;
            r
        });
    }
    if let Err(e) = sent {
        tracing::warn!(node = %o.node, error = format!("{e:#}"), "the master did not take the report");
    }
    client.bye();
}

/// Objects for the swap: staged ones, and ranges of the node's own files read in place
/// (verified again as they are read).
struct SwapSource<'a> {
    staging: &'a Staging,
    direct: HashMap<Digest, (PathBuf, u64, u32)>,
}

impl ObjectSource for SwapSource<'_> {
    fn get(&self, d: &Digest, raw_len: u32) -> Result<Vec<u8>> {
        match self.direct.get(d) {
            Some((abs, off, len)) => {
                let mut buf = vec![0u8; *len as usize];
                std::fs::File::open(abs)
                    .and_then(|f| f.read_exact_at(&mut buf, *off))
                    .with_context(|| format!("reading {}", abs.display()))?;
                if *len != raw_len || Digest::of(&buf) != *d {
                    bail!("{} changed during the update", abs.display());
                }
                Ok(buf)
            }
            None => self.staging.get(d, raw_len),
        }
    }
}

fn swap(o: &UpdateOptions, m: &Manifest, p: &Plan, staging: &dyn ObjectSource) -> Result<()> {
    let rootfd = apply::open_root(&o.root)?;
    let rfd = rootfd.as_fd();
    for path in &p.delete {
        remove_tree(rfd, path)?;
    }
    let mut todo: Vec<usize> = p.create.iter().chain(&p.replace).copied().collect();
    todo.sort();
    for &i in todo
        .iter()
        .filter(|&&i| !matches!(m.entries[i].kind, Kind::Hardlink { .. }))
    {
        let e = &m.entries[i];
        let parent = mpath::parent(&e.path).expect("non-root");
        let pd = apply::open_dir_beneath(rfd, parent)?;
        let name = mpath::file_name(&e.path);
        let st = rustix::fs::statat(&pd, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW).ok();
        let is_dir = st.is_some_and(|s| {
            rustix::fs::FileType::from_raw_mode(s.st_mode) == rustix::fs::FileType::Directory
        });
        if e.kind == Kind::Dir {
            if st.is_some() && !is_dir {
                remove_tree(rfd, &e.path)?;
            }
            if !is_dir {
                apply::create_at(pd.as_fd(), OsStr::from_bytes(name), e, staging)?;
            }
            continue;
        }
        let tmp = tmp_name(name);
        let _ = rustix::fs::unlinkat(&pd, OsStr::from_bytes(&tmp), AtFlags::empty());
        apply::create_at(pd.as_fd(), OsStr::from_bytes(&tmp), e, staging)?;
        if is_dir {
            remove_tree(rfd, &e.path)?;
        }
        rustix::fs::renameat(&pd, OsStr::from_bytes(&tmp), &pd, OsStr::from_bytes(name))
            .with_context(|| format!("swapping in {}", e.path_lossy()))?;
    }
    for &i in todo
        .iter()
        .filter(|&&i| matches!(m.entries[i].kind, Kind::Hardlink { .. }))
    {
        let e = &m.entries[i];
        let pd = apply::open_dir_beneath(rfd, mpath::parent(&e.path).expect("non-root"))?;
        let name = mpath::file_name(&e.path);
        let tmp = tmp_name(name);
        let _ = rustix::fs::unlinkat(&pd, OsStr::from_bytes(&tmp), AtFlags::empty());
        apply::link_at(rfd, pd.as_fd(), OsStr::from_bytes(&tmp), e)?;
        rustix::fs::renameat(&pd, OsStr::from_bytes(&tmp), &pd, OsStr::from_bytes(name))
            .with_context(|| format!("swapping in {}", e.path_lossy()))?;
    }
    for &i in &p.meta {
        fix_meta(rfd, &m.entries[i])?;
    }
    // Directories whose content changed got a new mtime: set theirs again (deepest first).
    let mut dirs: HashSet<&[u8]> = HashSet::new();
    for path in todo
        .iter()
        .map(|&i| m.entries[i].path.as_slice())
        .chain(p.delete.iter().map(|v| v.as_slice()))
    {
        if let Some(parent) = mpath::parent(path) {
            dirs.insert(parent);
        }
    }
    for &i in &todo {
        if m.entries[i].kind == Kind::Dir {
            dirs.insert(&m.entries[i].path);
        }
    }
    for e in m
        .entries
        .iter()
        .rev()
        .filter(|e| e.kind == Kind::Dir && dirs.contains(e.path.as_slice()))
    {
        fix_meta(rfd, e)?;
    }
    Ok(())
}

/// What an update is asked to do: `si-updateclient`'s command line and, as the same serde
/// type, what the push agent builds from a push.
#[derive(clap::Args, Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct OptionArgs {
    /// The si-server (HOST or HOST:PORT; port 7811 by default).
    #[arg(long)]
    pub server: String,
    /// Image name (default: the installed one).
    #[arg(long)]
    #[serde(default)]
    pub image: Option<String>,
    /// Version (default: the newest).
    #[arg(long)]
    #[serde(default)]
    pub version: Option<u32>,
    /// Root of the tree to update.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Where the installed record and staging live (default ROOT/var/lib/si).
    #[arg(long)]
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Only list what would change.
    #[arg(long, short = 'n')]
    #[serde(default)]
    pub dry_run: bool,
    /// Re-hash every file to find and repair local drift.
    #[arg(long)]
    #[serde(default)]
    pub verify: bool,
    /// Allow an update that deletes more than half of the node's files.
    #[arg(long)]
    #[serde(default)]
    pub force: bool,
    /// Extra exclude patterns (paths the update neither writes nor deletes).
    #[arg(long)]
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Files of exclude patterns (default also /etc/si/update.exclude under ROOT if present).
    #[arg(long)]
    #[serde(default)]
    pub exclude_file: Vec<PathBuf>,
    /// Do not apply the default update excludes (node state such as /etc/fstab, /var/log).
    #[arg(long)]
    #[serde(default)]
    pub no_default_excludes: bool,
    /// Commands run before the swap (SI_IMAGE, SI_VERSION, SI_ROOT set).
    #[arg(long)]
    #[serde(default)]
    pub pre_hook: Vec<String>,
    /// Commands run after the swap.
    #[arg(long)]
    #[serde(default)]
    pub post_hook: Vec<String>,
    /// The master's CA fingerprint (`sha256:HEX`, from `si-server ca show`; default: the one
    /// saved in IDENTITY_DIR/ca.fingerprint).
    #[arg(long, env = "SI_CA_FINGERPRINT")]
    #[serde(default)]
    pub ca_fingerprint: Option<String>,
    /// Plain TCP to the master, nothing authenticated (lab use only; logged loudly).
    #[arg(long)]
    #[serde(default)]
    pub insecure: bool,
    /// This node's key, certificate and pin (default /etc/si).
    #[arg(long)]
    #[serde(default)]
    pub identity_dir: Option<PathBuf>,
    /// Read at most this many kbit/s from the server (0: no cap), so an update leaves the
    /// node's link to its work. si-pushupdate --max-rate-kbit sets it for every node pushed.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub max_rate_kbit: u64,
}

/// Resolves arguments into options: the image defaults to the installed one; the exclude list
/// is the defaults, the node's /etc/si/update.exclude, and the extra ones.
pub fn options(a: OptionArgs) -> Result<UpdateOptions> {
    let sdir = a
        .state_dir
        .clone()
        .unwrap_or_else(|| a.root.join("var/lib/si"));
    let image = match a.image {
        Some(i) => i,
        None => read_installed(&sdir)
            .map(|i| i.image)
            .ok_or_else(|| anyhow!("no image installed here: pass --image"))?,
    };
    let mut ex = if a.no_default_excludes {
        vec![]
    } else {
        default_update_excludes()
    };
    let local = a.root.join("etc/si/update.exclude");
    if local.exists() {
        ex.extend(Excludes::from_file(&local)?);
    }
    for f in &a.exclude_file {
        ex.extend(Excludes::from_file(f)?);
    }
    ex.extend(a.exclude.iter().cloned());
    let trust = crate::pull::TrustArgs {
        ca_fingerprint: a.ca_fingerprint.clone(),
        insecure: a.insecure,
        identity_dir: a.identity_dir.clone(),
    }
    .connector()?;
    Ok(UpdateOptions {
        trust: trust.clone(),
        server: a.server,
        image,
        version: a.version,
        root: a.root,
        excludes: Excludes::new(&ex)?,
        state_dir: a.state_dir,
        dry_run: a.dry_run,
        verify: a.verify,
        force: a.force,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        // Enrolled, a node reports under the name its certificate carries.
        node: trust
            .node()
            .map(str::to_string)
            .unwrap_or_else(si_tree::fsutil::hostname),
        pre_hooks: a.pre_hook,
        post_hooks: a.post_hook,
        max_rate_kbit: a.max_rate_kbit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_update_excludes_protect_node_state_at_any_depth() {
        let u = Excludes::new(default_update_excludes()).unwrap();
        for p in [
            "var/log/apt/history.log",
            "var/spool/cron/crontabs/root",
            "home/u/.ssh/k",
        ] {
            assert!(u.is_excluded(p.as_bytes()), "{p}");
        }
        assert!(!u.is_excluded(b"var/lib/dpkg/status"));
    }

    #[test]
    fn digest_list_round_trip_and_rejects() {
        let t = tempfile::tempdir().unwrap();
        let entry = |path: &[u8], kind| Entry {
            path: path.to_vec(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: vec![],
        };
        let mut m = Manifest {
            entries: vec![entry(b"", Kind::Dir)],
        };
        let chunks: Vec<si_proto::Chunk> = (0..100u32)
            .map(|i| si_proto::Chunk {
                digest: Digest::of(&i.to_le_bytes()),
                offset: i as u64 * 10,
                len: 10,
            })
            .collect();
        m.entries.push(entry(
            b"f",
            Kind::File {
                size: 1000,
                chunks: chunks.clone(),
            },
        ));
        let md = Digest::of(b"manifest");
        let enc = DigestSet::encode(&m, &md);
        std::fs::write(t.path().join("installed.digests"), &enc).unwrap();
        let set = DigestSet::load(t.path(), &md.to_hex()).expect("loads");
        for c in &chunks {
            assert!(set.contains(&c.digest));
        }
        assert!(!set.contains(&Digest::of(b"absent")));
        // Made for another manifest, truncated, unsorted: ignored.
        assert!(DigestSet::load(t.path(), &Digest::of(b"other").to_hex()).is_none());
        std::fs::write(t.path().join("installed.digests"), &enc[..enc.len() - 1]).unwrap();
        assert!(DigestSet::load(t.path(), &md.to_hex()).is_none());
        let mut bad = enc.clone();
        let n = bad.len();
        bad.copy_within(DIGESTS_HEAD..DIGESTS_HEAD + 32, n - 32);
        std::fs::write(t.path().join("installed.digests"), &bad).unwrap();
        assert!(DigestSet::load(t.path(), &md.to_hex()).is_none());
    }
}
