//! Decoded manifests and encoded manifest deltas, kept between requests.
//!
//! When a rack of nodes updates from version N to N+1, every node asks for the same delta; it
//! is computed once (concurrent askers wait for the first) and then served from memory. Keys
//! are manifest digests, not version numbers, so an image removed and recreated under the same
//! numbers can never be answered from a stale entry. Both maps are bounded (entries and bytes);
//! the least recently used entry goes first.

use anyhow::{anyhow, bail, Context, Result};
use si_proto::manifest::{Delta, Manifest};
use si_proto::Digest;
use si_store::Store;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

/// At most this many decoded manifests (a 45k-entry manifest is ~20 MB decoded).
const MANIFESTS: usize = 4;
/// At most this many deltas, and this many bytes of them.
const DELTAS: usize = 64;
const DELTA_BYTES: usize = 64 << 20;

/// (base manifest, target manifest).
type DeltaKey = (Digest, Digest);

type Slot<T> = Arc<OnceLock<Result<T, String>>>;

struct Lru<K, T> {
    map: HashMap<K, (u64, Slot<T>)>,
    tick: u64,
}

impl<K: std::hash::Hash + Eq + Clone, T: Clone> Lru<K, T> {
    fn new() -> Self {
        Lru {
            map: HashMap::new(),
            tick: 0,
        }
    }

    /// The slot for `k` (new and empty if absent), marked as just used.
    fn slot(&mut self, k: &K) -> Slot<T> {
        self.tick += 1;
        let tick = self.tick;
        let e = self
            .map
            .entry(k.clone())
            .or_insert_with(|| (tick, Arc::new(OnceLock::new())));
        e.0 = tick;
        e.1.clone()
    }

    /// Drops least recently used filled entries until at most `n` remain and `size` of the
    /// filled ones sums to at most `bytes`.
    fn trim(&mut self, n: usize, bytes: usize, size: impl Fn(&T) -> usize) {
        loop {
            let filled = || {
                self.map.iter().filter_map(|(k, (t, s))| match s.get() {
                    Some(Ok(v)) => Some((k, *t, size(v))),
                    Some(Err(_)) => Some((k, *t, 0)),
                    None => None,
                })
            };
            let count = filled().count();
            let total: usize = filled().map(|x| x.2).sum();
            if count <= n && total <= bytes {
                return;
            }
            let Some(oldest) = filled().min_by_key(|x| x.1).map(|x| x.0.clone()) else {
                return;
            };
            self.map.remove(&oldest);
        }
    }
}

/// At most this many manifest files' digests are remembered.
const DIGESTS: usize = 1024;

pub struct ManifestCache {
    manifests: Mutex<Lru<Digest, Arc<Manifest>>>,
    deltas: Mutex<Lru<DeltaKey, Arc<Vec<u8>>>>,
    /// Manifest file → its digest, while the file is the same inode, size and mtime (store
    /// files are renamed into place, never rewritten): a request hashes no manifest twice.
    digests: Mutex<HashMap<PathBuf, (FileKey, Stored)>>,
}

type FileKey = (u64, u64, u64, i64, i64);

impl Default for ManifestCache {
    fn default() -> Self {
        ManifestCache {
            manifests: Mutex::new(Lru::new()),
            deltas: Mutex::new(Lru::new()),
            digests: Mutex::new(HashMap::new()),
        }
    }
}

/// A version's manifest file: where it is, its length and the version's manifest digest.
#[derive(Clone)]
pub struct Stored {
    pub path: PathBuf,
    pub len: u64,
    /// The manifest digest the version record names (`si_proto::manifest::digest`).
    pub digest: Digest,
    /// BLAKE3 of the file as it was read, to notice a file changed while being served.
    file: Digest,
}

impl Stored {
    /// The file's bytes, checked against the bytes it was first read as.
    pub fn bytes(&self) -> Result<Vec<u8>> {
        let data = std::fs::read(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        if Digest::of(&data) != self.file {
            bail!("{} changed while being served", self.path.display());
        }
        Ok(data)
    }
}

impl ManifestCache {
    /// The manifest file of `image@v` and its manifest digest (read once per file).
    pub fn stored(&self, store: &Store, image: &str, v: u32) -> Result<Stored> {
        let path = store.manifest_path(image, v)?;
        let md = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        let key = (md.dev(), md.ino(), md.len(), md.mtime(), md.mtime_nsec());
        if let Some((k, s)) = self.digests.lock().expect("cache lock").get(&path) {
            if *k == key {
                return Ok(s.clone());
            }
        }
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let meta = store.meta(image, v)?;
        let s = Stored {
            path: path.clone(),
            len: data.len() as u64,
            digest: store.digest_of(image, v, &meta, Some(&data))?,
            file: Digest::of(&data),
        };
        let mut memo = self.digests.lock().expect("cache lock");
        if memo.len() >= DIGESTS {
            memo.clear();
        }
        memo.insert(path, (key, s.clone()));
        Ok(s)
    }

    /// The decoded manifest of `s`.
    pub fn manifest(&self, s: &Stored) -> Result<Arc<Manifest>> {
        let slot = self.manifests.lock().expect("cache lock").slot(&s.digest);
        let got = slot
            .get_or_init(|| {
                let data = s.bytes().map_err(|e| format!("{e:#}"))?;
                Manifest::decode(&data)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone();
        self.manifests
            .lock()
            .expect("cache lock")
            .trim(MANIFESTS, usize::MAX, |_| 0);
        got.map_err(|e| anyhow!("decoding a manifest: {e}"))
    }

    /// The encoded delta that turns `base` into `target`.
    pub fn delta(&self, base: &Stored, target: &Stored) -> Result<Arc<Vec<u8>>> {
        let key = (base.digest, target.digest);
        let slot = self.deltas.lock().expect("cache lock").slot(&key);
        let got = slot
            .get_or_init(|| {
                let go = || -> Result<Arc<Vec<u8>>> {
                    let (b, t) = (self.manifest(base)?, self.manifest(target)?);
                    Ok(Arc::new(Delta::between(&b, &t).encode()))
                };
                go().map_err(|e| format!("{e:#}"))
            })
            .clone();
        self.deltas
            .lock()
            .expect("cache lock")
            .trim(DELTAS, DELTA_BYTES, |v| v.len());
        got.map_err(|e| anyhow!("{e}"))
    }

    /// Computes ahead what nodes are about to ask: for every image, the delta from its
    /// previous version to its newest. Cheap when nothing changed (two stats per image).
    pub fn warm(&self, store: &Store) {
        let Ok(images) = store.images() else { return };
        for name in images {
            let Ok(vs) = store.versions(&name) else {
                continue;
            };
            if let [.., prev, last] = vs[..] {
                if let (Ok(b), Ok(t)) = (
                    self.stored(store, &name, prev),
                    self.stored(store, &name, last),
                ) {
                    let _ = self.delta(&b, &t);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_keeps_the_recent_and_bounds_bytes() {
        let mut l: Lru<u32, Vec<u8>> = Lru::new();
        for k in 0..10u32 {
            let s = l.slot(&k);
            s.set(Ok(vec![0; 10])).unwrap();
            l.trim(4, 35, |v| v.len());
        }
        // 4 entries fit the count but only 3 fit 35 bytes.
        let mut keys: Vec<u32> = l.map.keys().copied().collect();
        keys.sort();
        assert_eq!(keys, vec![7, 8, 9]);
        // Touching 7 makes 8 the oldest.
        let _ = l.slot(&7);
        let s = l.slot(&10);
        s.set(Ok(vec![0; 10])).unwrap();
        l.trim(4, 35, |v| v.len());
        let mut keys: Vec<u32> = l.map.keys().copied().collect();
        keys.sort();
        assert_eq!(keys, vec![7, 9, 10]);
    }

    #[test]
    fn empty_slots_in_progress_are_not_evicted() {
        let mut l: Lru<u32, Vec<u8>> = Lru::new();
        let pending = l.slot(&1);
        for k in 2..6u32 {
            l.slot(&k).set(Ok(vec![1])).unwrap();
            l.trim(1, usize::MAX, |v| v.len());
        }
        assert!(l.map.contains_key(&1), "a slot being computed stays");
        assert!(pending.get().is_none());
        assert_eq!(l.map.len(), 2);
    }
}
