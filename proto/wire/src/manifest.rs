//! The manifest: the full description of one image version.
//!
//! # Format (version [`MANIFEST_FORMAT`])
//!
//! A manifest is a list of [`Entry`] values sorted by path bytes (so a parent always comes before
//! its children), serialized with bincode 2 (standard config, varint integers) and stored
//! zstd-compressed. Encoded, it is
//!
//! ```text
//! "SIMF" magic (4 bytes) | format: u32 LE | zstd( bincode(Vec<Entry>) )
//! ```
//!
//! # The manifest digest
//!
//! A version is named by its **manifest digest** ([`digest`]): the BLAKE3 of the manifest's
//! *plain* encoding, the same bytes without compression,
//!
//! ```text
//! "SIMF" magic (4 bytes) | format: u32 LE | bincode(Vec<Entry>)
//! ```
//!
//! bincode's encoding of a given list of entries is deterministic, so the digest depends only
//! on the entries: a manifest rebuilt from a [`Delta`], or compressed by another zstd build or
//! level, has the same digest. The store's version records, a node's installed record and the
//! wire (`ManifestIs`, `ManifestDeltaIs`, a capture's `CaptureDelta`) all carry this digest,
//! and signatures are to cover it. Stores and nodes written before it recorded the BLAKE3 of the
//! compressed file instead; the store and the agent read both (see their docs).
//!
//! Each entry records its path relative to the image root (the root is the empty path, a byte
//! string that need not be UTF-8), its [`Kind`], permission bits (including setuid, setgid and
//! sticky), numeric owner and group, mtime to the nanosecond, and every extended attribute
//! (user, trusted, security including file capabilities, and the system.posix_acl_* ACLs) as
//! raw name/value bytes.
//!
//! File content is a list of [`Chunk`]s, each the BLAKE3 digest of an object plus the offset
//! and length it covers. Bytes covered by no chunk are holes: a sparse file records only its
//! data extents, and stays sparse when it is written back. Small files are one chunk; large
//! files are split into content-defined chunks so an edit inside a big file changes only the
//! chunks it touches. The second and later names of a hard-linked inode are [`Kind::Hardlink`]
//! entries pointing at the first name's path.
//!
//! Readers refuse a format they do not know; a format change bumps [`MANIFEST_FORMAT`].

use crate::digest::Digest;
use crate::path;
use serde::{Deserialize, Serialize};
use std::io::Read;
use thiserror::Error;

/// Current manifest format.
pub const MANIFEST_FORMAT: u32 = 1;
const MAGIC: &[u8; 4] = b"SIMF";
/// Largest decoded manifest accepted (bounds memory for hostile input).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;
/// Largest extended attribute value (as Linux's XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Offset of the chunk in the file.
    pub offset: u64,
    /// Uncompressed length.
    pub len: u32,
    pub digest: Digest,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Dir,
    File {
        size: u64,
        chunks: Vec<Chunk>,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// Another name for the inode first recorded at `target` (a manifest path).
    Hardlink {
        target: Vec<u8>,
    },
    CharDev {
        rdev: u64,
    },
    BlockDev {
        rdev: u64,
    },
    Fifo,
    Socket,
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::File { .. } => "file",
            Kind::Symlink { .. } => "symlink",
            Kind::Hardlink { .. } => "hardlink",
            Kind::CharDev { .. } => "chardev",
            Kind::BlockDev { .. } => "blockdev",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits, `0o7777` at most.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub xattrs: Vec<Xattr>,
}

impl Entry {
    /// The size of a regular file (0 for anything else).
    pub fn file_size(&self) -> u64 {
        match &self.kind {
            Kind::File { size, .. } => *size,
            _ => 0,
        }
    }

    pub fn path_lossy(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    pub entries: Vec<Entry>,
}

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("not a manifest (bad magic)")]
    Magic,
    #[error("manifest format {0} is not supported (this build reads format {MANIFEST_FORMAT})")]
    Format(u32),
    #[error("manifest is corrupt: {0}")]
    Corrupt(String),
    #[error("manifest entry {path:?}: {why}")]
    Invalid { path: String, why: String },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_MANIFEST_BYTES as usize }>()
}

/// The manifest digest of a manifest's plain encoding ([`Manifest::encode_plain`]; see the
/// module documentation). The one definition: every other way to a manifest digest calls it.
pub fn digest(plain: &[u8]) -> Digest {
    Digest::of(plain)
}

/// The manifest digest of an encoded (compressed) manifest, without validating its entries.
pub fn digest_of_encoded(data: &[u8]) -> Result<Digest, ManifestError> {
    Ok(digest(&plain_of(MAGIC, data)?))
}

impl Manifest {
    /// Encodes as described in the module documentation.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with_digest().0
    }

    /// The plain (uncompressed) encoding the manifest digest covers.
    pub fn encode_plain(&self) -> Vec<u8> {
        plain_framed(MAGIC, &self.entries)
    }

    /// The manifest digest ([`digest`]).
    pub fn digest(&self) -> Digest {
        digest(&self.encode_plain())
    }

    /// The encoding and the manifest digest, serializing once.
    pub fn encode_with_digest(&self) -> (Vec<u8>, Digest) {
        let plain = self.encode_plain();
        (compress_plain(&plain), digest(&plain))
    }

    /// Decodes and validates (see [`Manifest::validate`]).
    pub fn decode(data: &[u8]) -> Result<Manifest, ManifestError> {
        Ok(Manifest::decode_with_digest(data)?.0)
    }

    /// [`Manifest::decode`], and the manifest digest of what was decoded.
    pub fn decode_with_digest(data: &[u8]) -> Result<(Manifest, Digest), ManifestError> {
        let plain = plain_of(MAGIC, data)?;
        let m = Manifest {
            entries: decode_plain(&plain)?,
        };
        m.validate()?;
        Ok((m, digest(&plain)))
    }

    /// Checks the invariants every reader relies on: valid sorted unique paths, a root
    /// directory first, parents present and directories, hard links pointing at an earlier
    /// regular file, chunks in order inside the file size, sane modes and xattrs.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |e: &Entry, why: &str| ManifestError::Invalid {
            path: e.path_lossy(),
            why: why.to_string(),
        };
        let mut kinds: std::collections::HashMap<&[u8], &Kind> = std::collections::HashMap::new();
        let mut prev: Option<&[u8]> = None;
        for e in &self.entries {
            path::validate(&e.path).map_err(|err| bad(e, &err.to_string()))?;
            if let Some(p) = prev {
                if p >= e.path.as_slice() {
                    return Err(bad(e, "entries not sorted or duplicated"));
                }
            } else if !e.path.is_empty() || e.kind != Kind::Dir {
                return Err(bad(e, "first entry must be the root directory"));
            }
            if let Some(parent) = path::parent(&e.path) {
                match kinds.get(parent) {
                    Some(Kind::Dir) => {}
                    _ => return Err(bad(e, "parent is missing or not a directory")),
                }
            }
            if e.mode & !0o7777 != 0 {
                return Err(bad(e, "mode has bits beyond 0o7777"));
            }
            for x in &e.xattrs {
                if x.name.is_empty() || x.name.len() > 255 || x.value.len() > MAX_XATTR_VALUE {
                    return Err(bad(e, "bad extended attribute"));
                }
            }
            match &e.kind {
                Kind::File { size, chunks } => {
                    let mut end = 0u64;
                    for c in chunks {
                        if c.offset < end || c.len == 0 {
                            return Err(bad(e, "chunks overlap or are empty"));
                        }
                        end = c
                            .offset
                            .checked_add(c.len as u64)
                            .ok_or_else(|| bad(e, "chunk overflows"))?;
                    }
                    if end > *size {
                        return Err(bad(e, "chunks extend past the file size"));
                    }
                }
                Kind::Hardlink { target } => match kinds.get(target.as_slice()) {
                    Some(Kind::File { .. }) => {}
                    _ => return Err(bad(e, "hard link target is not an earlier regular file")),
                },
                Kind::Symlink { target }
                    if target.is_empty()
                        || target.len() > path::MAX_PATH
                        || target.contains(&0) =>
                {
                    return Err(bad(e, "bad symlink target"));
                }
                _ => {}
            }
            kinds.insert(&e.path, &e.kind);
            prev = Some(&e.path);
        }
        Ok(())
    }

    /// Every object digest the manifest references (with repeats).
    pub fn digests(&self) -> impl Iterator<Item = &Chunk> {
        self.entries.iter().flat_map(|e| match &e.kind {
            Kind::File { chunks, .. } => chunks.as_slice(),
            _ => &[],
        })
    }

    /// Finds an entry by path (entries are sorted).
    pub fn get(&self, p: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.path.as_slice().cmp(p))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Sum of file sizes (logical bytes).
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(Entry::file_size).sum()
    }
}

/// What changed between two manifests, path by path.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<Vec<u8>>,
    pub removed: Vec<Vec<u8>>,
    pub changed: Vec<Vec<u8>>,
}

/// Compares two manifests by a merge over their sorted paths.
pub fn diff(old: &Manifest, new: &Manifest) -> Diff {
    let mut d = Diff::default();
    let (mut i, mut j) = (0, 0);
    let (a, b) = (&old.entries, &new.entries);
    while i < a.len() || j < b.len() {
        if j >= b.len() || (i < a.len() && a[i].path < b[j].path) {
            d.removed.push(a[i].path.clone());
            i += 1;
        } else if i >= a.len() || b[j].path < a[i].path {
            d.added.push(b[j].path.clone());
            j += 1;
        } else {
            if a[i] != b[j] {
                d.changed.push(b[j].path.clone());
            }
            i += 1;
            j += 1;
        }
    }
    d
}

/// The difference between two manifests as a node needs it to go from one to the other:
/// entries added or changed, and paths removed. Encoded as `"SIMD" | format u32 LE |
/// zstd(bincode(Delta))`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub upserts: Vec<Entry>,
    pub removed: Vec<Vec<u8>>,
}

const DELTA_MAGIC: &[u8; 4] = b"SIMD";

impl Delta {
    pub fn between(old: &Manifest, new: &Manifest) -> Delta {
        let d = diff(old, new);
        let mut upserts = Vec::with_capacity(d.added.len() + d.changed.len());
        let mut wanted: Vec<&Vec<u8>> = d.added.iter().chain(&d.changed).collect();
        wanted.sort();
        for p in wanted {
            if let Some(e) = new.get(p) {
                upserts.push(e.clone());
            }
        }
        Delta {
            upserts,
            removed: d.removed,
        }
    }

    /// Rebuilds the new manifest from the old one (validated). One merge over the old entries
    /// (sorted, as every valid manifest is) and the upserts; of two upserts of one path the
    /// later wins.
    pub fn apply(&self, old: &Manifest) -> Result<Manifest, ManifestError> {
        let removed: std::collections::HashSet<&[u8]> =
            self.removed.iter().map(|p| p.as_slice()).collect();
        let mut ups: Vec<&Entry> = self.upserts.iter().collect();
        // Stable: upserts of one path stay in their order, and the last of them is taken.
        ups.sort_by(|a, b| a.path.cmp(&b.path));
        let mut entries = Vec::with_capacity(old.entries.len() + ups.len());
        let mut ups = ups.into_iter().peekable();
        let take_up = |entries: &mut Vec<Entry>, e: &Entry| match entries.last_mut() {
            Some(last) if last.path == e.path => *last = e.clone(),
            _ => entries.push(e.clone()),
        };
        for e in old
            .entries
            .iter()
            .filter(|e| !removed.contains(e.path.as_slice()))
        {
            while let Some(u) = ups.next_if(|u| u.path < e.path) {
                take_up(&mut entries, u);
            }
            if ups.peek().is_some_and(|u| u.path == e.path) {
                while let Some(u) = ups.next_if(|u| u.path == e.path) {
                    take_up(&mut entries, u);
                }
            } else {
                entries.push(e.clone());
            }
        }
        for u in ups {
            take_up(&mut entries, u);
        }
        let m = Manifest { entries };
        m.validate()?;
        Ok(m)
    }

    pub fn encode(&self) -> Vec<u8> {
        encode_framed(DELTA_MAGIC, self)
    }

    pub fn decode(data: &[u8]) -> Result<Delta, ManifestError> {
        decode_framed(DELTA_MAGIC, data)
    }
}

/// `magic | format u32 LE | bincode(value)`: the plain encoding.
fn plain_framed<T: Serialize>(magic: &[u8; 4], value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 << 16);
    out.extend_from_slice(magic);
    out.extend_from_slice(&MANIFEST_FORMAT.to_le_bytes());
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
        .expect("serializes into memory");
    out
}

/// A plain encoding with its body compressed: `magic | format u32 LE | zstd(bincode(value))`.
fn compress_plain(plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(plain.len() / 4 + 8);
    out.extend_from_slice(&plain[..8]);
    out.extend_from_slice(&zstd_compress(&plain[8..]));
    out
}

/// `magic | format u32 LE | zstd(bincode(value))`.
fn encode_framed<T: Serialize>(magic: &[u8; 4], value: &T) -> Vec<u8> {
    compress_plain(&plain_framed(magic, value))
}

/// The plain encoding of a compressed one (header checked, body bounded by
/// [`MAX_MANIFEST_BYTES`]).
fn plain_of(magic: &[u8; 4], data: &[u8]) -> Result<Vec<u8>, ManifestError> {
    if data.len() < 8 || &data[..4] != magic {
        return Err(ManifestError::Magic);
    }
    let fmt = u32::from_le_bytes(data[4..8].try_into().expect("4 bytes"));
    if fmt != MANIFEST_FORMAT {
        return Err(ManifestError::Format(fmt));
    }
    let raw = zstd_decompress_bounded(&data[8..], MAX_MANIFEST_BYTES)
        .map_err(|e| ManifestError::Corrupt(e.to_string()))?;
    let mut plain = Vec::with_capacity(raw.len() + 8);
    plain.extend_from_slice(&data[..8]);
    plain.extend_from_slice(&raw);
    Ok(plain)
}

/// The value of a plain encoding (the header already checked by [`plain_of`]).
fn decode_plain<T: serde::de::DeserializeOwned>(plain: &[u8]) -> Result<T, ManifestError> {
    let body = &plain[8..];
    let (v, used): (T, usize) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| ManifestError::Corrupt(e.to_string()))?;
    if used != body.len() {
        return Err(ManifestError::Corrupt("trailing bytes".into()));
    }
    Ok(v)
}

/// The inverse of [`encode_framed`], bounded by [`MAX_MANIFEST_BYTES`].
fn decode_framed<T: serde::de::DeserializeOwned>(
    magic: &[u8; 4],
    data: &[u8],
) -> Result<T, ManifestError> {
    decode_plain(&plain_of(magic, data)?)
}

fn zstd_compress(raw: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(raw, 3).expect("in-memory zstd compression")
}

/// Decompresses at most `limit` bytes; more is an error.
pub fn zstd_decompress_bounded(data: &[u8], limit: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let dec = zstd::stream::read::Decoder::new(data)?;
    dec.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("decompressed data exceeds {limit} bytes"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            mtime_nsec: 123_456_789,
            xattrs: vec![],
        }
    }

    fn sample() -> Manifest {
        let d = Digest::of(b"x");
        Manifest {
            entries: vec![
                entry("", Kind::Dir),
                entry(
                    "a",
                    Kind::File {
                        size: 10,
                        chunks: vec![Chunk {
                            offset: 0,
                            len: 1,
                            digest: d,
                        }],
                    },
                ),
                entry(
                    "b",
                    Kind::Hardlink {
                        target: b"a".to_vec(),
                    },
                ),
                entry("d", Kind::Dir),
                entry(
                    "d/l",
                    Kind::Symlink {
                        target: b"../a".to_vec(),
                    },
                ),
            ],
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let enc = m.encode();
        assert_eq!(Manifest::decode(&enc).unwrap(), m);
    }

    #[test]
    fn rejects_bad_manifests() {
        let mut m = sample();
        m.entries[4].path = b"d/../../etc".to_vec();
        assert!(m.validate().is_err());
        let mut m = sample();
        m.entries.swap(1, 2);
        assert!(m.validate().is_err());
        let mut m = sample();
        m.entries[2].kind = Kind::Hardlink {
            target: b"zz".to_vec(),
        };
        assert!(m.validate().is_err());
        let mut m = sample();
        m.entries.insert(4, entry("d/x/y", Kind::Fifo));
        assert!(m.validate().is_err(), "missing parent accepted");
        let mut m = sample();
        m.entries[1].kind = Kind::File {
            size: 0,
            chunks: vec![Chunk {
                offset: 0,
                len: 1,
                digest: Digest::default(),
            }],
        };
        assert!(m.validate().is_err());
    }

    #[test]
    fn decode_rejects_garbage() {
        assert!(matches!(Manifest::decode(b"xx"), Err(ManifestError::Magic)));
        let mut enc = sample().encode();
        enc[4] = 9;
        assert!(matches!(
            Manifest::decode(&enc),
            Err(ManifestError::Format(9))
        ));
        let mut enc = sample().encode();
        let n = enc.len();
        enc.truncate(n - 3);
        assert!(Manifest::decode(&enc).is_err());
        let mut junk = b"SIMF\x01\0\0\0".to_vec();
        junk.extend_from_slice(&[0xff; 64]);
        assert!(Manifest::decode(&junk).is_err());
    }

    #[test]
    fn delta_rebuilds_the_new_manifest() {
        let a = sample();
        let mut b = sample();
        b.entries.remove(2);
        b.entries[1].mode = 0o600;
        b.entries.push(entry("z", Kind::Fifo));
        let d = Delta::between(&a, &b);
        assert_eq!(d.upserts.len(), 2);
        let d2 = Delta::decode(&d.encode()).unwrap();
        assert_eq!(d2.apply(&a).unwrap(), b);
        assert_eq!(
            d2.apply(&a).unwrap().encode(),
            b.encode(),
            "encoding is deterministic"
        );
        assert!(Delta::decode(b"SIMD\x01\0\0\0garbage").is_err());
    }

    /// Upserts in any order, and repeated ones (the last wins), rebuild as a map would.
    #[test]
    fn delta_apply_merges_unsorted_and_repeated_upserts() {
        let a = sample();
        let mut first = entry("c", Kind::Fifo);
        first.mode = 0o600;
        let d = Delta {
            upserts: vec![
                entry("z", Kind::Fifo),
                first,
                entry("a", Kind::Dir),
                entry("c", Kind::Fifo),
            ],
            removed: vec![b"b".to_vec()],
        };
        let m = d.apply(&a).unwrap();
        let paths: Vec<&[u8]> = m.entries.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(paths, [&b""[..], b"a", b"c", b"d", b"d/l", b"z"]);
        assert_eq!(m.get(b"c").unwrap().mode, 0o644, "the later upsert wins");
        assert_eq!(m.get(b"a").unwrap().kind, Kind::Dir);
    }

    /// The digest covers the entries, not the compressed bytes: another compression of the
    /// same manifest has the same digest, and any change to an entry changes it.
    #[test]
    fn the_digest_does_not_depend_on_compression() {
        let m = sample();
        let (enc, d) = m.encode_with_digest();
        assert_eq!(d, m.digest());
        assert_eq!(digest_of_encoded(&enc).unwrap(), d);
        let mut other = enc[..8].to_vec();
        other.extend_from_slice(&zstd::bulk::compress(&m.encode_plain()[8..], 19).unwrap());
        assert_ne!(
            other, enc,
            "a different compression level gives different bytes"
        );
        let (back, d2) = Manifest::decode_with_digest(&other).unwrap();
        assert_eq!((back, d2), (m.clone(), d));
        let mut changed = m;
        changed.entries[1].mtime_nsec += 1;
        assert_ne!(changed.digest(), d);
    }

    #[test]
    fn diff_finds_changes() {
        let a = sample();
        let mut b = sample();
        b.entries.remove(2);
        b.entries[1].mode = 0o600;
        b.entries.push(entry("z", Kind::Fifo));
        let d = diff(&a, &b);
        assert_eq!(d.added, vec![b"z".to_vec()]);
        assert_eq!(d.removed, vec![b"b".to_vec()]);
        assert_eq!(d.changed, vec![b"a".to_vec()]);
    }
}
