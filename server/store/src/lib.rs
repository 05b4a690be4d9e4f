//! The content-addressed image store.
//!
//! # On-disk layout (store format 1)
//!
//! ```text
//! STORE/
//!   FORMAT                      "si-store 1"
//!   lock                        flock: writers share it, the garbage collector takes it alone
//!   packs/4e/4e67ea...c1.pack   objects, zstd-compressed, named by the BLAKE3 of the pack file
//!   packs/4e/4e67ea...c1.idx    the pack's index
//!   images/NAME/1/meta.toml     version record: when, from where, excludes, manifest digest
//!   images/NAME/1/manifest      the manifest (see si_proto::manifest)
//!   images/NAME/1/layout.toml   the disk layout recorded at capture (optional)
//!   tmp/                        files being written; never read
//! ```
//!
//! Everything in the store is root-only: files 0600, directories 0700, set when they are
//! created; opening a store takes group and other bits off whatever has them, with a warning.
//!
//! Objects are found by the BLAKE3 digest of their *uncompressed* content. Small and large
//! objects alike are appended to pack files (up to [`PACK_TARGET`] bytes), so a tree of tens of
//! thousands of files becomes a few large files: one sequential write, no per-file cost.
//!
//! A pack is `"SIPK" | version u32 LE | records`, each record
//! `digest[32] | raw_len u32 LE | comp_len u32 LE | zstd bytes[comp_len]`, so a pack can be
//! checked or re-indexed on its own. Its index is `"SIIX" | version u32 | count u32 |
//! count × (digest[32] | offset u64 | comp_len u32 | raw_len u32) | BLAKE3 of all before [32]`.
//!
//! A version's `meta.toml` records its **manifest digest** (`manifest-digest`, see
//! `si_proto::manifest::digest`): the BLAKE3 of the manifest's plain encoding, so it never
//! depends on the zstd bytes of the `manifest` file. Versions recorded by older builds carry
//! `manifest` instead, the BLAKE3 of the compressed file; they are read as they are (no
//! rewrite): [`Store::manifest_digest`] checks the file against the old field and computes the
//! manifest digest from it, and `fsck` checks either form.
//!
//! # Durability and concurrency
//!
//! Every file is written under `tmp/`, fsynced, and renamed into place; nothing is ever
//! overwritten (a pack's name is its own digest; a version directory is renamed into a
//! number that does not exist yet). A version is recorded only after every pack holding its
//! objects is durable, so a crash leaves at worst unreferenced packs, which `gc` removes.
//! Writers (capture, commit, import) hold `lock` shared for their whole run and the garbage
//! collector holds it exclusively, so gc never deletes an object a running capture relies on.

pub mod images;
mod pack;

pub use images::{valid_image_name, VersionMeta};
pub use pack::PackWriter;

use anyhow::{anyhow, bail, Context, Result};
use si_proto::Digest;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Target size of a pack file.
pub const PACK_TARGET: u64 = 128 << 20;
/// Largest object accepted (uncompressed).
pub const MAX_OBJECT: u32 = si_proto::limits::MAX_OBJECT;
const FORMAT_TEXT: &str = "si-store 1\n";

#[derive(Clone, Copy, Debug)]
pub(crate) struct Loc {
    pack: u32,
    offset: u64,
    comp_len: u32,
    raw_len: u32,
}

pub struct Store {
    root: PathBuf,
    index: RwLock<HashMap<Digest, Loc>>,
    /// Pack ids by the number `Loc::pack` holds.
    pack_ids: RwLock<Vec<Digest>>,
    open_packs: Mutex<HashMap<u32, Arc<File>>>,
}

/// A held store lock (shared for writers, exclusive for gc); released on drop.
pub struct StoreLock {
    _file: File,
}

/// Files the store writes: root only (objects lose their own mode in a pack, so a pack holds
/// what the golden node kept root-only, /etc/shadow and private keys among them).
pub(crate) const FILE_MODE: u32 = 0o600;
/// Directories the store makes.
pub(crate) const DIR_MODE: u32 = 0o700;

pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    si_tree::fsutil::write_atomic_mode(path, data, FILE_MODE)
}

/// Creates `dir` (and missing parents inside the store) root-only.
pub(crate) fn private_dir_all(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .with_context(|| format!("creating store directory {}", dir.display()))
}

pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(DIR_MODE)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Takes group and other permissions off everything in the store (a store made before the
/// store was root-only, or touched by hand), with one warning saying how many were changed.
/// Symlinks are not followed (a store holds none; one planted there is left alone).
fn tighten_modes(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut changed = 0u64;
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let md = std::fs::symlink_metadata(&p)
            .with_context(|| format!("reading the mode of {}", p.display()))?;
        let ft = md.file_type();
        if ft.is_symlink() {
            continue;
        }
        let mode = md.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & 0o700))
                .with_context(|| format!("making {} root-only", p.display()))?;
            changed += 1;
        }
        if ft.is_dir() {
            for e in std::fs::read_dir(&p).with_context(|| format!("listing {}", p.display()))? {
                todo.push(
                    e.with_context(|| format!("listing {}", p.display()))?
                        .path(),
                );
            }
        }
    }
    if changed > 0 {
        tracing::warn!(
            store = %root.display(),
            changed,
            "the store was readable by other users; its files and directories are now root-only"
        );
    }
    Ok(())
}

/// Checks a received object: decompresses at most `raw_len` bytes and compares digests.
pub use si_tree::codec::verify as verify_object;

impl Store {
    /// Opens the store at `root`, creating it if it does not exist.
    pub fn open(root: &Path) -> Result<Store> {
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        for d in ["", "packs", "images", "tmp"] {
            private_dir_all(&root.join(d))?;
        }
        tighten_modes(root)?;
        let fmt = root.join("FORMAT");
        match std::fs::read_to_string(&fmt) {
            Ok(s) if s == FORMAT_TEXT => {}
            Ok(s) => bail!(
                "{}: unsupported store format {:?}",
                root.display(),
                s.trim()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_private(&fmt, FORMAT_TEXT.as_bytes())?;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", fmt.display())),
        }
        let s = Store {
            root: root.to_path_buf(),
            index: RwLock::new(HashMap::new()),
            pack_ids: RwLock::new(Vec::new()),
            open_packs: Mutex::new(HashMap::new()),
        };
        s.load_index()?;
        Ok(s)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self, exclusive: bool, wait: bool) -> Result<StoreLock> {
        use rustix::fs::FlockOperation as F;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(self.root.join("lock"))
            .context("opening the store lock")?;
        let op = match (exclusive, wait) {
            (true, true) => F::LockExclusive,
            (true, false) => F::NonBlockingLockExclusive,
            (false, true) => F::LockShared,
            (false, false) => F::NonBlockingLockShared,
        };
        rustix::fs::flock(&f, op).map_err(|e| {
            if e == rustix::io::Errno::WOULDBLOCK {
                anyhow!("the store is busy (a capture or a garbage collection holds its lock)")
            } else {
                anyhow!("locking the store: {e}")
            }
        })?;
        Ok(StoreLock { _file: f })
    }

    /// The lock a writer holds for its whole run (waits while a gc runs).
    pub fn writer_lock(&self) -> Result<StoreLock> {
        self.lock(false, true)
    }

    /// A fresh name under `tmp/`.
    pub(crate) fn tmp_path(&self, what: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        self.root.join("tmp").join(format!(
            "{what}-{}-{t}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Where pack `id`'s file with extension `ext` (`pack` or `idx`) lies.
    pub fn pack_path(&self, id: &Digest, ext: &str) -> PathBuf {
        let h = id.to_hex();
        self.root
            .join("packs")
            .join(&h[..2])
            .join(format!("{h}.{ext}"))
    }

    /// Every pack id on disk (those with an index).
    pub fn list_packs(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        let packs = self.root.join("packs");
        for sub in
            std::fs::read_dir(&packs).with_context(|| format!("listing {}", packs.display()))?
        {
            let sub = sub?.path();
            if !sub.is_dir() {
                continue;
            }
            for f in
                std::fs::read_dir(&sub).with_context(|| format!("listing {}", sub.display()))?
            {
                let p = f?.path();
                if p.extension().is_some_and(|e| e == "idx") {
                    let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                    if let Ok(d) = Digest::from_hex(stem) {
                        out.push(d);
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// (Re)loads the in-memory index from every pack index.
    pub fn load_index(&self) -> Result<()> {
        let mut index = HashMap::new();
        let ids = self.list_packs()?;
        for (n, id) in ids.iter().enumerate() {
            for e in pack::read_index(&self.pack_path(id, "idx"))? {
                index.insert(
                    e.digest,
                    Loc {
                        pack: n as u32,
                        offset: e.offset,
                        comp_len: e.comp_len,
                        raw_len: e.raw_len,
                    },
                );
            }
        }
        *self.index.write().expect("index lock") = index;
        *self.pack_ids.write().expect("pack ids lock") = ids;
        self.open_packs.lock().expect("open packs lock").clear();
        Ok(())
    }

    pub(crate) fn register_pack(&self, id: Digest, entries: &[pack::IdxEntry]) {
        let mut ids = self.pack_ids.write().expect("pack ids lock");
        let n = ids.len() as u32;
        ids.push(id);
        let mut index = self.index.write().expect("index lock");
        for e in entries {
            index.insert(
                e.digest,
                Loc {
                    pack: n,
                    offset: e.offset,
                    comp_len: e.comp_len,
                    raw_len: e.raw_len,
                },
            );
        }
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.index.read().expect("index lock").contains_key(d)
    }

    /// Every object digest in the store.
    pub fn all_digests(&self) -> std::collections::HashSet<Digest> {
        self.index
            .read()
            .expect("index lock")
            .keys()
            .copied()
            .collect()
    }

    pub fn object_count(&self) -> usize {
        self.index.read().expect("index lock").len()
    }

    fn pack_file(&self, n: u32) -> Result<Arc<File>> {
        let mut open = self.open_packs.lock().expect("open packs lock");
        if let Some(f) = open.get(&n) {
            return Ok(f.clone());
        }
        let id = *self
            .pack_ids
            .read()
            .expect("pack ids lock")
            .get(n as usize)
            .ok_or_else(|| anyhow!("pack #{n} unknown"))?;
        let p = self.pack_path(&id, "pack");
        let f = Arc::new(File::open(&p).with_context(|| format!("opening pack {}", p.display()))?);
        if open.len() > 256 {
            open.clear();
        }
        open.insert(n, f.clone());
        Ok(f)
    }

    /// Loads packs written since the index was loaded (by another process).
    pub fn refresh(&self) -> Result<()> {
        let known: std::collections::HashSet<Digest> = self
            .pack_ids
            .read()
            .expect("pack ids lock")
            .iter()
            .copied()
            .collect();
        for id in self.list_packs()? {
            if !known.contains(&id) {
                let entries = pack::read_index(&self.pack_path(&id, "idx"))?;
                self.register_pack(id, &entries);
            }
        }
        Ok(())
    }

    fn locate(&self, d: &Digest) -> Option<Loc> {
        self.index.read().expect("index lock").get(d).copied()
    }

    /// The compressed bytes of an object and its uncompressed length (not verified).
    pub fn get_compressed(&self, d: &Digest) -> Result<(u32, Vec<u8>)> {
        let loc = match self.locate(d) {
            Some(l) => l,
            None => {
                self.refresh()?;
                self.locate(d)
                    .ok_or_else(|| anyhow!("object {d} is not in the store"))?
            }
        };
        let f = self.pack_file(loc.pack)?;
        let mut buf = vec![0u8; loc.comp_len as usize];
        f.read_exact_at(&mut buf, loc.offset)
            .with_context(|| format!("reading object {d}"))?;
        Ok((loc.raw_len, buf))
    }

    /// The verified uncompressed bytes of an object.
    pub fn get(&self, d: &Digest) -> Result<Vec<u8>> {
        let (raw, z) = self.get_compressed(d)?;
        verify_object(d, raw, &z)
    }

    /// A writer of new packs (hold [`Store::writer_lock`] while it lives).
    pub fn pack_writer(&self) -> Result<PackWriter<'_>> {
        PackWriter::new(self)
    }

    /// Bytes used by the store on disk (allocated blocks).
    pub fn disk_usage(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut total = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
                let e = e?;
                let md = e.metadata()?;
                if md.is_dir() {
                    stack.push(e.path());
                } else {
                    total += md.blocks() * 512;
                }
            }
        }
        Ok(total)
    }
}

impl si_tree::apply::ObjectSource for Store {
    fn get(&self, digest: &Digest, raw_len: u32) -> Result<Vec<u8>> {
        let v = Store::get(self, digest)?;
        if v.len() != raw_len as usize {
            bail!("object {digest} has {} bytes, {raw_len} expected", v.len());
        }
        Ok(v)
    }
}
