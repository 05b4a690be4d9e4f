//! Pack files and their indexes (format in the parent module's documentation).

use super::{Store, MAX_OBJECT, PACK_TARGET};
use anyhow::{bail, Context, Result};
use si_proto::Digest;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const PACK_MAGIC: &[u8; 4] = b"SIPK";
const IDX_MAGIC: &[u8; 4] = b"SIIX";
const VERSION: u32 = 1;
const REC_HEADER: usize = 40;
const IDX_ENTRY: usize = 48;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxEntry {
    pub digest: Digest,
    pub offset: u64,
    pub comp_len: u32,
    pub raw_len: u32,
}

/// Reads and checks a pack index.
pub fn read_index(path: &Path) -> Result<Vec<IdxEntry>> {
    let data = std::fs::read(path).with_context(|| format!("reading index {}", path.display()))?;
    let bad = |why: &str| anyhow::anyhow!("index {} is corrupt: {why}", path.display());
    if data.len() < 12 + 32 || &data[..4] != IDX_MAGIC {
        return Err(bad("bad header"));
    }
    if u32::from_le_bytes(data[4..8].try_into().unwrap()) != VERSION {
        return Err(bad("unknown version"));
    }
    let count = u32::from_le_bytes(data[8..12].try_into().unwrap()) as usize;
    let body_end = data.len() - 32;
    if count.checked_mul(IDX_ENTRY).and_then(|n| n.checked_add(12)) != Some(body_end) {
        return Err(bad("length does not match the entry count"));
    }
    if blake3::hash(&data[..body_end]).as_bytes() != &data[body_end..] {
        return Err(bad("checksum mismatch"));
    }
    let mut out = Vec::with_capacity(count);
    for rec in data[12..body_end].chunks_exact(IDX_ENTRY) {
        out.push(IdxEntry {
            digest: Digest(rec[..32].try_into().unwrap()),
            offset: u64::from_le_bytes(rec[32..40].try_into().unwrap()),
            comp_len: u32::from_le_bytes(rec[40..44].try_into().unwrap()),
            raw_len: u32::from_le_bytes(rec[44..48].try_into().unwrap()),
        });
    }
    Ok(out)
}

fn encode_index(entries: &[IdxEntry]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + entries.len() * IDX_ENTRY + 32);
    v.extend_from_slice(IDX_MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        v.extend_from_slice(&e.digest.0);
        v.extend_from_slice(&e.offset.to_le_bytes());
        v.extend_from_slice(&e.comp_len.to_le_bytes());
        v.extend_from_slice(&e.raw_len.to_le_bytes());
    }
    let h = blake3::hash(&v);
    v.extend_from_slice(h.as_bytes());
    v
}

/// Reads a pack sequentially, calling `f` for every record (digest, raw_len, compressed bytes).
pub fn scan_pack(path: &Path, mut f: impl FnMut(IdxEntry, &[u8]) -> Result<()>) -> Result<Digest> {
    let file = File::open(path).with_context(|| format!("opening pack {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let mut head = [0u8; 8];
    r.read_exact(&mut head)
        .with_context(|| format!("reading {}", path.display()))?;
    if &head[..4] != PACK_MAGIC || u32::from_le_bytes(head[4..].try_into().unwrap()) != VERSION {
        bail!("pack {} has a bad header", path.display());
    }
    hasher.update(&head);
    let mut offset = 8u64;
    let mut buf = Vec::new();
    loop {
        let mut h = [0u8; REC_HEADER];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        hasher.update(&h);
        let digest = Digest(h[..32].try_into().unwrap());
        let raw_len = u32::from_le_bytes(h[32..36].try_into().unwrap());
        let comp_len = u32::from_le_bytes(h[36..40].try_into().unwrap());
        if raw_len > MAX_OBJECT
            || comp_len as usize > zstd::zstd_safe::compress_bound(MAX_OBJECT as usize)
        {
            bail!(
                "pack {}: record at {offset} has impossible lengths",
                path.display()
            );
        }
        buf.resize(comp_len as usize, 0);
        r.read_exact(&mut buf)
            .with_context(|| format!("pack {}: record at {offset} is truncated", path.display()))?;
        hasher.update(&buf);
        offset += REC_HEADER as u64;
        f(
            IdxEntry {
                digest,
                offset,
                comp_len,
                raw_len,
            },
            &buf,
        )?;
        offset += comp_len as u64;
    }
    Ok(hasher.finalize().into())
}

/// Appends objects to new packs. Objects already in the store (or already added) are skipped.
/// Nothing is visible to readers until a pack is finished; [`PackWriter::finish`] must be
/// called before anything referencing the objects is recorded.
pub struct PackWriter<'a> {
    store: &'a Store,
    current: Option<Open>,
    added: HashSet<Digest>,
    /// Ignore the store's index (gc moving live objects out of a pack).
    pub(crate) force: bool,
    pub new_objects: u64,
    pub new_bytes: u64,
}

struct Open {
    path: PathBuf,
    w: BufWriter<File>,
    hasher: blake3::Hasher,
    offset: u64,
    entries: Vec<IdxEntry>,
}

impl<'a> PackWriter<'a> {
    pub(crate) fn new(store: &'a Store) -> Result<PackWriter<'a>> {
        Ok(PackWriter {
            store,
            current: None,
            added: HashSet::new(),
            force: false,
            new_objects: 0,
            new_bytes: 0,
        })
    }

    /// Adds an object given compressed; returns whether it was new. The caller has verified it.
    pub fn add(&mut self, digest: Digest, raw_len: u32, zdata: &[u8]) -> Result<bool> {
        if (!self.force && self.store.contains(&digest)) || !self.added.insert(digest) {
            return Ok(false);
        }
        if self.current.is_none() {
            let path = self.store.tmp_path("pack");
            let f = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| format!("creating {}", path.display()))?
            };
            let mut o = Open {
                path,
                w: BufWriter::with_capacity(4 << 20, f),
                hasher: blake3::Hasher::new(),
                offset: 0,
                entries: Vec::new(),
            };
            let mut head = PACK_MAGIC.to_vec();
            head.extend_from_slice(&VERSION.to_le_bytes());
            o.write(&head)?;
            self.current = Some(o);
        }
        let o = self.current.as_mut().expect("opened above");
        let mut h = [0u8; REC_HEADER];
        h[..32].copy_from_slice(&digest.0);
        h[32..36].copy_from_slice(&raw_len.to_le_bytes());
        h[36..40].copy_from_slice(&(zdata.len() as u32).to_le_bytes());
        o.write(&h)?;
        o.entries.push(IdxEntry {
            digest,
            offset: o.offset,
            comp_len: zdata.len() as u32,
            raw_len,
        });
        o.write(zdata)?;
        self.new_objects += 1;
        self.new_bytes += zdata.len() as u64;
        if o.offset >= PACK_TARGET {
            self.finish_pack()?;
        }
        Ok(true)
    }

    /// Compresses and adds an uncompressed object.
    pub fn add_raw(&mut self, data: &[u8]) -> Result<Digest> {
        let d = Digest::of(data);
        if !self.store.contains(&d) && !self.added.contains(&d) {
            let z = si_tree::codec::compress(data)?;
            self.add(d, data.len() as u32, &z)?;
        }
        Ok(d)
    }

    fn finish_pack(&mut self) -> Result<()> {
        let Some(mut o) = self.current.take() else {
            return Ok(());
        };
        o.w.flush().context("flushing pack")?;
        let f =
            o.w.into_inner()
                .map_err(|e| e.into_error())
                .context("flushing pack")?;
        f.sync_all().context("syncing pack")?;
        drop(f);
        let id: Digest = o.hasher.finalize().into();
        let dest = self.store.pack_path(&id, "pack");
        let dir = dest.parent().expect("pack dir");
        crate::private_dir_all(dir)?;
        if dest.exists() {
            // The same pack already exists (same content): never overwrite it.
            std::fs::remove_file(&o.path).ok();
        } else {
            std::fs::rename(&o.path, &dest)
                .with_context(|| format!("renaming pack into {}", dest.display()))?;
        }
        let idx = self.store.pack_path(&id, "idx");
        if !idx.exists() {
            crate::write_private(&idx, &encode_index(&o.entries))?;
        }
        si_tree::fsutil::sync_dir(dir)?;
        self.store.register_pack(id, &o.entries);
        Ok(())
    }

    /// Makes every added object durable and visible.
    pub fn finish(mut self) -> Result<(u64, u64)> {
        self.finish_pack()?;
        Ok((self.new_objects, self.new_bytes))
    }
}

impl Drop for PackWriter<'_> {
    fn drop(&mut self) {
        if let Some(o) = self.current.take() {
            // Abandoned (an error happened): leave nothing half-written behind.
            let _ = std::fs::remove_file(&o.path);
        }
    }
}

impl Open {
    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.w
            .write_all(b)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.hasher.update(b);
        self.offset += b.len() as u64;
        Ok(())
    }
}
