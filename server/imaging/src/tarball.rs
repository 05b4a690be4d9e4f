//! Import and export of images as tar streams (POSIX pax; xattrs as `SCHILY.xattr.*`,
//! nanosecond mtimes as pax `mtime`), so a debootstrap or container rootfs tarball can become
//! an image without a golden node, and an image can leave the store.
//!
//! Sparse files travel as sparse tar members: import reads GNU tar's pax sparse formats (0.0,
//! 0.1, 1.0) and the old GNU sparse type; export writes pax sparse 1.0 (what `tar --sparse
//! --format=posix` writes and GNU tar and libarchive extract). Content is chunked by the one rule
//! of [`si_tree::chunker`] over the member's data extents (a member that is not sparse is one
//! extent; its zeros are data), so a file chunks the same whether captured or imported.
//!
//! The stream is untrusted: every header field is parsed without panicking, sizes and maps are
//! checked against each other, and memory stays bounded by the input.

use crate::getimage::Summary;
use anyhow::{anyhow, bail, Context, Result};
use si_proto::manifest::{Chunk, Entry, Kind, Manifest, Xattr};
use si_store::{PackWriter, Store, VersionMeta};
use si_tree::chunker::{Chunker, Extent};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

const XATTR_PREFIX: &str = "SCHILY.xattr.";
/// Linux's limits on an xattr's name and value (`XATTR_NAME_MAX`, `XATTR_SIZE_MAX`).
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 64 << 10;
/// Longest decimal number a sparse map line may hold (u64::MAX has 20 digits).
const MAP_LINE_MAX: usize = 20;

/// Stores a member's content: `extents` of a file read from `r`, chunked by the one rule.
/// `expanded`: `r` yields the whole file, holes as zeros (old GNU sparse members, which the tar
/// reader expands); otherwise `r` yields the extents' bytes back to back.
fn store_extents<R: Read>(
    w: &mut PackWriter<'_>,
    chunker: &mut Chunker,
    r: &mut R,
    extents: &[Extent],
    expanded: bool,
) -> Result<Vec<Chunk>> {
    let mut chunks = Vec::new();
    let mut pos = 0u64;
    for &(off, len) in extents {
        if expanded && off > pos {
            let skip = off - pos;
            let n = std::io::copy(&mut r.take(skip), &mut std::io::sink())
                .context("reading tar entry data")?;
            if n != skip {
                bail!("tar entry data is truncated");
            }
        }
        let got = chunker.extent(r, off, len, |offset, data| {
            chunks.push(Chunk {
                offset,
                len: data.len() as u32,
                digest: w.add_raw(data)?,
            });
            Ok(())
        })?;
        if got != len {
            bail!("tar entry data is truncated");
        }
        pos = off + len;
    }
    Ok(chunks)
}

/// Parses a pax decimal field: ASCII digits only.
fn pax_u64(key: &str, v: &[u8]) -> Result<u64> {
    let s = std::str::from_utf8(v).ok().filter(|s| {
        !s.is_empty() && s.len() <= MAP_LINE_MAX && s.bytes().all(|b| b.is_ascii_digit())
    });
    s.and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("pax {key}={:?} is not a number", String::from_utf8_lossy(v)))
}

/// Parses a pax time (`[-]SECONDS[.FRACTION]`) into seconds and nanoseconds (the fraction
/// truncated to nanoseconds; a negative time counts back from the epoch, `-1.25` is 1.25 s
/// before it).
fn pax_time(v: &[u8]) -> Result<(i64, u32)> {
    let bad = || anyhow!("pax mtime={:?} is not a time", String::from_utf8_lossy(v));
    let (neg, rest) = match v.strip_prefix(b"-") {
        Some(r) => (true, r),
        None => (false, v),
    };
    let (int, frac) = match rest.iter().position(|&b| b == b'.') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &b""[..]),
    };
    if int.is_empty() || int.len() > 19 || !int.iter().chain(frac).all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let mut secs: i64 = std::str::from_utf8(int)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let mut nsec = 0u32;
    for (i, &d) in frac.iter().take(9).enumerate() {
        nsec += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    if neg {
        secs = -secs;
        if nsec > 0 {
            secs -= 1;
            nsec = 1_000_000_000 - nsec;
        }
    }
    Ok((secs, nsec))
}

/// What a member's pax records say, of what import uses.
#[derive(Default)]
struct Pax {
    xattrs: Vec<Xattr>,
    mtime: Option<(i64, u32)>,
    /// GNU.sparse.major / minor.
    sparse_version: Option<(u64, u64)>,
    sparse_name: Option<Vec<u8>>,
    /// GNU.sparse.realsize (1.0) or GNU.sparse.size (0.x).
    sparse_size: Option<u64>,
    /// The 0.0 (`offset`/`numbytes` records) or 0.1 (`map`) sparse map.
    sparse_map: Vec<Extent>,
    sparse_offset: Option<u64>,
}

impl Pax {
    fn record(&mut self, key: &str, v: &[u8]) -> Result<()> {
        if let Some(name) = key.strip_prefix(XATTR_PREFIX) {
            if name.is_empty() || name.len() > XATTR_NAME_MAX || v.len() > XATTR_SIZE_MAX {
                bail!(
                    "pax xattr {name:?} ({} bytes): name empty or too long, or value too long",
                    v.len()
                );
            }
            self.xattrs.push(Xattr {
                name: name.as_bytes().to_vec(),
                value: v.to_vec(),
            });
            return Ok(());
        }
        match key {
            "mtime" => self.mtime = Some(pax_time(v)?),
            "GNU.sparse.major" => {
                let minor = self.sparse_version.map_or(0, |(_, m)| m);
                self.sparse_version = Some((pax_u64(key, v)?, minor));
            }
            "GNU.sparse.minor" => {
                let major = self.sparse_version.map_or(0, |(m, _)| m);
                self.sparse_version = Some((major, pax_u64(key, v)?));
            }
            "GNU.sparse.name" => self.sparse_name = Some(v.to_vec()),
            "GNU.sparse.realsize" | "GNU.sparse.size" => self.sparse_size = Some(pax_u64(key, v)?),
            "GNU.sparse.offset" => {
                self.sparse_version.get_or_insert((0, 0));
                self.sparse_offset = Some(pax_u64(key, v)?);
            }
            "GNU.sparse.numbytes" => {
                let off = self
                    .sparse_offset
                    .take()
                    .ok_or_else(|| anyhow!("pax GNU.sparse.numbytes without an offset"))?;
                self.sparse_map.push((off, pax_u64(key, v)?));
            }
            "GNU.sparse.map" => {
                self.sparse_version.get_or_insert((0, 1));
                let nums = v
                    .split(|&b| b == b',')
                    .map(|n| pax_u64(key, n))
                    .collect::<Result<Vec<u64>>>()?;
                if nums.len() % 2 != 0 {
                    bail!("pax GNU.sparse.map has an odd count of numbers");
                }
                self.sparse_map
                    .extend(nums.chunks_exact(2).map(|p| (p[0], p[1])));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Reads one decimal line of a sparse 1.0 map; returns the number and the bytes it took.
fn map_line<R: Read>(r: &mut R) -> Result<(u64, u64)> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        r.read_exact(&mut b)
            .context("reading the sparse map: the data ends inside it")?;
        if b[0] == b'\n' {
            break;
        }
        if line.len() >= MAP_LINE_MAX {
            bail!("a sparse map line is too long");
        }
        line.push(b[0]);
    }
    Ok((pax_u64("sparse map line", &line)?, line.len() as u64 + 1))
}

/// Reads the sparse 1.0 map at the start of a member's data (decimal lines: the count, then
/// offset and length per extent, padded to 512 bytes). Returns the map and the bytes it took.
fn read_map_1_0<R: Read>(r: &mut R, data_size: u64) -> Result<(Vec<Extent>, u64)> {
    let (count, mut used) = map_line(r)?;
    // Every extent takes at least four bytes of the map: the count is bounded by the data.
    if count > data_size / 4 {
        bail!("sparse map of {count} extents in {data_size} bytes");
    }
    let mut map = Vec::new();
    for _ in 0..count {
        let (off, a) = map_line(r)?;
        let (len, b) = map_line(r)?;
        used += a + b;
        map.push((off, len));
    }
    let padded = used.div_ceil(512) * 512;
    let pad = padded - used;
    let n =
        std::io::copy(&mut r.take(pad), &mut std::io::sink()).context("reading the sparse map")?;
    if n != pad || padded > data_size {
        bail!("the sparse map runs past the member's data");
    }
    Ok((map, padded))
}

/// Checks a sparse map against the file's size and the data the member carries: extents in
/// order, not overlapping, inside the file, their lengths adding up to `data`. Zero-length
/// extents (GNU tar ends a file that ends in a hole with one) are dropped.
fn check_map(map: Vec<Extent>, size: u64, data: u64) -> Result<Vec<Extent>> {
    let mut end = 0u64;
    let mut total = 0u64;
    let mut out = Vec::with_capacity(map.len());
    for (off, len) in map {
        let e = off
            .checked_add(len)
            .filter(|&e| e <= size)
            .ok_or_else(|| anyhow!("sparse extent {off}+{len} lies past the file's size {size}"))?;
        if off < end {
            bail!("sparse extents out of order or overlapping at offset {off}");
        }
        if len > 0 {
            out.push((off, len));
            end = e;
            total += len;
        }
    }
    if total != data {
        bail!("sparse map covers {total} bytes, the member carries {data}");
    }
    Ok(out)
}

/// Normalises a tar path to a manifest path (`./a/b/` → `a/b`); refuses `..` and the like.
fn norm(p: &[u8]) -> Result<Vec<u8>> {
    let parts: Vec<&[u8]> = p
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect();
    let out = parts.join(&b'/');
    si_proto::path::validate(&out)
        .map_err(|e| anyhow!("tar entry {:?}: {e}", String::from_utf8_lossy(p)))?;
    Ok(out)
}

/// One tar member as a manifest entry (`None`: a member that is no entry, like a global pax
/// header).
fn import_entry<R: Read>(
    item: &mut tar::Entry<'_, R>,
    raw_path: &[u8],
    writer: &mut PackWriter<'_>,
    chunker: &mut Chunker,
) -> Result<(Vec<u8>, Option<Entry>)> {
    let mut pax = Pax::default();
    if let Some(exts) = item.pax_extensions().context("reading pax headers")? {
        for ext in exts {
            let ext = ext.context("reading a pax record")?;
            let key = ext.key().map_err(|_| anyhow!("non-UTF-8 pax key"))?;
            pax.record(key, ext.value_bytes())?;
        }
    }
    pax.xattrs.sort_by(|a, b| a.name.cmp(&b.name));
    let h = item.header().clone();
    let et = h.entry_type();
    if et.is_pax_global_extensions() || et.is_gnu_longname() || et.is_gnu_longlink() {
        return Ok((vec![], None));
    }
    // A pax sparse member's header names a stand-in (`GNUSparseFile.0/f`); the real name is a
    // pax record.
    let sparse = pax.sparse_version.filter(|_| et.is_file());
    let path = match (&sparse, &pax.sparse_name) {
        (Some(_), Some(name)) => norm(name)?,
        _ => norm(raw_path)?,
    };
    let mode = h.mode().context("bad mode")? & 0o7777;
    let kind = if et.is_dir() {
        Kind::Dir
    } else if let Some((major, minor)) = sparse {
        let size = pax
            .sparse_size
            .ok_or_else(|| anyhow!("sparse member without GNU.sparse.realsize or size"))?;
        let data = item.size();
        let (map, data) = match (major, minor) {
            (1, 0) => {
                let (map, used) = read_map_1_0(item, data)?;
                (map, data - used)
            }
            (0, 0) | (0, 1) => (std::mem::take(&mut pax.sparse_map), data),
            v => bail!("unsupported GNU sparse format {}.{}", v.0, v.1),
        };
        let extents = check_map(map, size, data)?;
        Kind::File {
            size,
            chunks: store_extents(writer, chunker, item, &extents, false)?,
        }
    } else if et.is_gnu_sparse() {
        // The tar reader expands old GNU sparse members; the header's own four map slots say
        // where the data is (more slots in extension blocks the reader keeps to itself).
        let size = item.size();
        let gnu = h
            .as_gnu()
            .ok_or_else(|| anyhow!("GNU sparse member without a GNU header"))?;
        let extents = if gnu.is_extended() {
            tracing::warn!(
                path = %String::from_utf8_lossy(&path),
                "GNU sparse member with more than four extents: imported without its holes"
            );
            vec![(0, size)]
        } else {
            let mut map = Vec::new();
            for s in gnu.sparse.iter().filter(|s| !s.is_empty()) {
                map.push((s.offset()?, s.length()?));
            }
            let data = map.iter().map(|e| e.1).sum();
            check_map(map, size, data)?
        };
        Kind::File {
            size,
            chunks: store_extents(writer, chunker, item, &extents, true)?,
        }
    } else if et.is_file() || et == tar::EntryType::Continuous {
        let size = item.size();
        let extents = if size > 0 { vec![(0, size)] } else { vec![] };
        Kind::File {
            size,
            chunks: store_extents(writer, chunker, item, &extents, false)?,
        }
    } else if et.is_symlink() {
        let t = item
            .link_name_bytes()
            .ok_or_else(|| anyhow!("symlink without target"))?;
        Kind::Symlink { target: t.to_vec() }
    } else if et.is_hard_link() {
        let t = item
            .link_name_bytes()
            .ok_or_else(|| anyhow!("hard link without target"))?;
        Kind::Hardlink { target: norm(&t)? }
    } else if et.is_character_special() || et.is_block_special() {
        let major = h.device_major()?.unwrap_or(0);
        let minor = h.device_minor()?.unwrap_or(0);
        let rdev = rustix::fs::makedev(major, minor);
        if et.is_character_special() {
            Kind::CharDev { rdev }
        } else {
            Kind::BlockDev { rdev }
        }
    } else if et.is_fifo() {
        Kind::Fifo
    } else {
        bail!("unsupported type {et:?}");
    };
    let id = |what: &str, v: u64| {
        u32::try_from(v).map_err(|_| anyhow!("{what} {v} does not fit 32 bits"))
    };
    let (mtime, mtime_nsec) = match pax.mtime {
        Some(t) => t,
        None => {
            let t = h.mtime().context("bad mtime")?;
            (
                i64::try_from(t).map_err(|_| anyhow!("mtime {t} is out of range"))?,
                0,
            )
        }
    };
    let e = Entry {
        path: path.clone(),
        kind,
        mode,
        uid: id("uid", h.uid().context("bad uid")?)?,
        gid: id("gid", h.gid().context("bad gid")?)?,
        mtime,
        mtime_nsec,
        xattrs: pax.xattrs,
    };
    Ok((path, Some(e)))
}

/// Imports a tar stream (a file, or `-` for stdin) as a new version of `image`.
pub fn import(store: &Store, src: &Path, image: &str) -> Result<Summary> {
    si_store::valid_image_name(image)?;
    let _lock = store.writer_lock()?;
    let start = Instant::now();
    let input: Box<dyn Read> = if src == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?)
    };
    let mut ar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, input));
    let mut writer = store.pack_writer()?;
    let mut entries: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    let mut chunker = Chunker::new();
    for item in ar.entries().context("reading the tar stream")? {
        let mut item = item.context("reading a tar entry")?;
        let raw_path = item.path_bytes().into_owned();
        let what = || format!("tar entry {:?}", String::from_utf8_lossy(&raw_path));
        let (path, e) =
            import_entry(&mut item, &raw_path, &mut writer, &mut chunker).with_context(what)?;
        if let Some(e) = e {
            entries.insert(path, e);
        }
    }
    // Parents the tar stream did not list, and the root.
    let paths: Vec<Vec<u8>> = entries.keys().cloned().collect();
    for p in paths {
        let mut cur = si_proto::path::parent(&p);
        while let Some(par) = cur {
            entries.entry(par.to_vec()).or_insert_with(|| Entry {
                path: par.to_vec(),
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                xattrs: vec![],
            });
            cur = si_proto::path::parent(par);
        }
    }
    // Hard links must point at an earlier path: swap content to the first name if needed.
    let mut m = Manifest {
        entries: entries.into_values().collect(),
    };
    fix_hardlinks(&mut m)?;
    let (new_objects, new_bytes) = writer.finish()?;
    let meta = VersionMeta {
        source: format!("import:{}", src.display()),
        ..Default::default()
    };
    let meta = store.record_version(image, &m, meta, None)?;
    Ok(Summary {
        image: image.into(),
        version: meta.version,
        entries: meta.entries,
        files: meta.files,
        bytes: meta.bytes,
        new_objects,
        new_bytes,
        seconds: start.elapsed().as_secs_f64(),
        ..Default::default()
    })
}

fn fix_hardlinks(m: &mut Manifest) -> Result<()> {
    // Group each hard link with its target, transitively; the first path in order gets the
    // content, the others link to it.
    let idx: std::collections::HashMap<Vec<u8>, usize> = m
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.clone(), i))
        .collect();
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, e) in m.entries.iter().enumerate() {
        if let Kind::Hardlink { target } = &e.kind {
            let mut t = *idx.get(target).ok_or_else(|| {
                anyhow!(
                    "hard link {} to a missing {}",
                    e.path_lossy(),
                    String::from_utf8_lossy(target)
                )
            })?;
            let mut hops = 0;
            while let Kind::Hardlink { target } = &m.entries[t].kind {
                t = *idx
                    .get(target)
                    .ok_or_else(|| anyhow!("dangling hard link"))?;
                hops += 1;
                if hops > 64 {
                    bail!("hard link loop at {}", e.path_lossy());
                }
            }
            groups.entry(t).or_default().push(i);
        }
    }
    for (t, links) in groups {
        let first = *links
            .iter()
            .chain(std::iter::once(&t))
            .min()
            .expect("non-empty");
        if !matches!(m.entries[t].kind, Kind::File { .. }) {
            bail!(
                "hard link to {}, which is not a regular file",
                m.entries[t].path_lossy()
            );
        }
        let content = m.entries[t].kind.clone();
        let first_path = m.entries[first].path.clone();
        for &i in links.iter().chain(std::iter::once(&t)) {
            m.entries[i].kind = if i == first {
                content.clone()
            } else {
                Kind::Hardlink {
                    target: first_path.clone(),
                }
            };
            if i != t {
                let (mode, uid, gid, mtime, ns, xa) = {
                    let s = &m.entries[t];
                    (
                        s.mode,
                        s.uid,
                        s.gid,
                        s.mtime,
                        s.mtime_nsec,
                        s.xattrs.clone(),
                    )
                };
                let e = &mut m.entries[i];
                (e.mode, e.uid, e.gid, e.mtime, e.mtime_nsec, e.xattrs) =
                    (mode, uid, gid, mtime, ns, xa);
            }
        }
    }
    Ok(())
}

/// Exports a version as a tar stream.
pub fn export(store: &Store, image: &str, v: u32, dest: &Path) -> Result<()> {
    let m = store.manifest(image, v)?;
    let out: Box<dyn Write> = if dest == Path::new("-") {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?,
        )
    };
    let mut b = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, out));
    b.mode(tar::HeaderMode::Complete);
    for e in m.entries.iter().skip(1) {
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        for x in &e.xattrs {
            let name = String::from_utf8(x.name.clone())
                .map_err(|_| anyhow!("non-UTF-8 xattr name on {}", e.path_lossy()))?;
            pax.push((format!("{XATTR_PREFIX}{name}"), x.value.clone()));
        }
        pax.push((
            "mtime".into(),
            pax_time_text(e.mtime, e.mtime_nsec).into_bytes(),
        ));
        // A file with holes goes out as a pax sparse 1.0 member: its data extents only.
        let sparse = match &e.kind {
            Kind::File { size, chunks } => {
                let extents = si_tree::chunker::extents_of(chunks);
                let dense = extents.is_empty() && *size == 0 || extents == [(0, *size)];
                (!dense).then_some(extents)
            }
            _ => None,
        };
        if sparse.is_some() {
            let Kind::File { size, .. } = &e.kind else {
                unreachable!("only files are sparse")
            };
            pax.push(("GNU.sparse.major".into(), b"1".to_vec()));
            pax.push(("GNU.sparse.minor".into(), b"0".to_vec()));
            pax.push(("GNU.sparse.name".into(), e.path.clone()));
            pax.push(("GNU.sparse.realsize".into(), size.to_string().into_bytes()));
        }
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .context("writing pax headers")?;
        // GNU tar reads pax sparse members only behind a POSIX (ustar) header.
        let mut h = if sparse.is_some() {
            tar::Header::new_ustar()
        } else {
            tar::Header::new_gnu()
        };
        h.set_mode(e.mode);
        h.set_uid(e.uid as u64);
        h.set_gid(e.gid as u64);
        h.set_mtime(e.mtime.max(0) as u64);
        let path = std::ffi::OsStr::from_bytes_path(&e.path);
        match &e.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty())?;
            }
            Kind::File { size, chunks } => {
                h.set_entry_type(tar::EntryType::Regular);
                let r = FileReader {
                    store,
                    chunks,
                    size: *size,
                    pos: 0,
                    buf: Vec::new(),
                    buf_off: 0,
                };
                match sparse {
                    None => {
                        h.set_size(*size);
                        b.append_data(&mut h, path, r)
                    }
                    Some(extents) => {
                        let map = sparse_map_1_0(&extents, *size);
                        let data: u64 = extents.iter().map(|e| e.1).sum();
                        h.set_size(map.len() as u64 + data);
                        // GNU tar's stand-in name: the directory, GNUSparseFile.0, the name.
                        let (dir, base) = match e.path.iter().rposition(|&c| c == b'/') {
                            Some(i) => (&e.path[..i + 1], &e.path[i + 1..]),
                            None => (&b""[..], &e.path[..]),
                        };
                        let stand_in = [dir, b"GNUSparseFile.0/", base].concat();
                        let r = std::io::Cursor::new(map).chain(ExtentReader {
                            inner: r,
                            extents,
                            next: 0,
                        });
                        b.append_data(&mut h, std::ffi::OsStr::from_bytes_path(&stand_in), r)
                    }
                }
                .with_context(|| format!("writing {}", e.path_lossy()))?;
            }
            Kind::Symlink { target } | Kind::Hardlink { target } => {
                h.set_entry_type(if matches!(e.kind, Kind::Symlink { .. }) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_size(0);
                b.append_link(&mut h, path, std::ffi::OsStr::from_bytes_path(target))?;
            }
            Kind::CharDev { rdev } | Kind::BlockDev { rdev } => {
                h.set_entry_type(if matches!(e.kind, Kind::CharDev { .. }) {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                });
                h.set_device_major(rustix::fs::major(*rdev))?;
                h.set_device_minor(rustix::fs::minor(*rdev))?;
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty())?;
            }
            Kind::Fifo => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty())?;
            }
            Kind::Socket => continue,
        }
    }
    b.into_inner()?.flush()?;
    Ok(())
}

/// A pax time for `mtime` seconds and `nsec` nanoseconds after them (`-1.500000000` for
/// `(-2, 500000000)`); [`pax_time`] reads it back.
fn pax_time_text(mtime: i64, nsec: u32) -> String {
    if mtime < 0 && nsec > 0 {
        format!("-{}.{:09}", -(mtime + 1), 1_000_000_000 - nsec)
    } else {
        format!("{mtime}.{nsec:09}")
    }
}

/// The sparse 1.0 map: count, then offset and length per extent, decimal lines, padded to 512
/// bytes. A file that ends in a hole ends its map with a zero-length extent at its size, as GNU
/// tar writes it.
fn sparse_map_1_0(extents: &[Extent], size: u64) -> Vec<u8> {
    let mut list = extents.to_vec();
    if list.last().is_none_or(|&(o, l)| o + l < size) {
        list.push((size, 0));
    }
    let mut map = format!("{}\n", list.len());
    for (o, l) in list {
        map.push_str(&format!("{o}\n{l}\n"));
    }
    let mut map = map.into_bytes();
    map.resize(map.len().div_ceil(512) * 512, 0);
    map
}

/// A file's data extents back to back, read from the store.
struct ExtentReader<'a> {
    inner: FileReader<'a>,
    extents: Vec<Extent>,
    next: usize,
}

impl Read for ExtentReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        // Before the first extent, and at the end of each: on to the next.
        while self.next == 0 || self.inner.pos >= self.inner.size {
            let Some(&(off, len)) = self.extents.get(self.next) else {
                return Ok(0);
            };
            self.next += 1;
            self.inner.pos = off;
            self.inner.size = off + len;
        }
        self.inner.read(out)
    }
}

trait FromBytesPath {
    fn from_bytes_path(b: &[u8]) -> &Path;
}

impl FromBytesPath for std::ffi::OsStr {
    fn from_bytes_path(b: &[u8]) -> &Path {
        use std::os::unix::ffi::OsStrExt;
        Path::new(std::ffi::OsStr::from_bytes(b))
    }
}

/// Reads a file's content from the store, zeros in the holes.
struct FileReader<'a> {
    store: &'a Store,
    chunks: &'a [Chunk],
    size: u64,
    pos: u64,
    buf: Vec<u8>,
    buf_off: u64,
}

impl Read for FileReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || out.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.buf_off && self.pos < self.buf_off + self.buf.len() as u64 {
            let s = (self.pos - self.buf_off) as usize;
            let n = out.len().min(self.buf.len() - s);
            out[..n].copy_from_slice(&self.buf[s..s + n]);
            self.pos += n as u64;
            return Ok(n);
        }
        // The chunk covering pos, or the hole up to the next chunk.
        match self
            .chunks
            .iter()
            .find(|c| c.offset + c.len as u64 > self.pos)
        {
            Some(c) if c.offset <= self.pos => {
                self.buf = self.store.get(&c.digest).map_err(std::io::Error::other)?;
                self.buf_off = c.offset;
                self.read(out)
            }
            next => {
                let end = next.map_or(self.size, |c| c.offset);
                let n = out.len().min((end - self.pos) as usize);
                out[..n].fill(0);
                self.pos += n as u64;
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar of one member: `pax` records, then a header of `kind` named `name` with `data`.
    fn tar_of(pax: &[(&str, &[u8])], name: &str, data: &[u8], uid: u64) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().copied()).unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(uid);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        // The name's bytes as given (the builder refuses `..`).
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
        b.into_inner().unwrap()
    }

    fn import_bytes(tar: &[u8]) -> Result<Summary> {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("store")).unwrap();
        let f = t.path().join("in.tar");
        std::fs::write(&f, tar).unwrap();
        let r = import(&store, &f, "img");
        if r.is_err() {
            assert!(store.images().unwrap().is_empty(), "nothing recorded");
        }
        r
    }

    fn refused(tar: &[u8], what: &str) {
        let err = import_bytes(tar).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains(what), "expected {what:?} in: {text}");
        assert!(text.contains("tar entry"), "names the entry: {text}");
    }

    /// `si-image import` sliced a non-ASCII fractional mtime on a byte index and panicked.
    #[test]
    fn non_ascii_pax_mtime_is_an_error_not_a_panic() {
        refused(
            &tar_of(&[("mtime", "1.é5".as_bytes())], "f", b"x", 0),
            "mtime",
        );
        // Byte 9 of the fraction inside a two-byte character: where the old slice panicked.
        refused(
            &tar_of(&[("mtime", "1.12345678é".as_bytes())], "f", b"x", 0),
            "mtime",
        );
        for bad in [
            "",
            ".5",
            "1e5",
            "-",
            "1.5.5",
            "99999999999999999999",
            "1.-5",
            " 1",
        ] {
            refused(&tar_of(&[("mtime", bad.as_bytes())], "f", b"x", 0), "mtime");
        }
    }

    #[test]
    fn pax_times_parse_to_the_nanosecond() {
        assert_eq!(pax_time(b"1").unwrap(), (1, 0));
        assert_eq!(pax_time(b"1.").unwrap(), (1, 0));
        assert_eq!(pax_time(b"1.5").unwrap(), (1, 500_000_000));
        assert_eq!(pax_time(b"12.1234567899").unwrap(), (12, 123_456_789));
        assert_eq!(pax_time(b"-1.25").unwrap(), (-2, 750_000_000));
        assert_eq!(pax_time(b"-3").unwrap(), (-3, 0));
        for (s, n) in [
            (-2i64, 750_000_000u32),
            (0, 1),
            (1_700_000_000, 999_999_999),
            (-5, 0),
        ] {
            assert_eq!(pax_time(pax_time_text(s, n).as_bytes()).unwrap(), (s, n));
        }
    }

    #[test]
    fn hostile_headers_are_refused() {
        // Owners that do not fit the manifest's 32 bits (pax uid overrides the header's).
        refused(&tar_of(&[("uid", b"4294967296")], "f", b"x", 0), "uid");
        // Xattr names the kernel would refuse, values past its limit.
        refused(&tar_of(&[("SCHILY.xattr.", b"v")], "f", b"x", 0), "xattr");
        let long = format!("SCHILY.xattr.user.{}", "n".repeat(300));
        refused(&tar_of(&[(&long, b"v")], "f", b"x", 0), "xattr");
        let big = vec![b'v'; XATTR_SIZE_MAX + 1];
        refused(
            &tar_of(&[("SCHILY.xattr.user.x", &big)], "f", b"x", 0),
            "xattr",
        );
        // Paths out of the tree, directly or through a sparse member's real name.
        refused(&tar_of(&[], "a/../../x", b"x", 0), "..");
        let sparse = |name: &[u8]| -> Vec<(&'static str, Vec<u8>)> {
            vec![
                ("GNU.sparse.major", b"1".to_vec()),
                ("GNU.sparse.minor", b"0".to_vec()),
                ("GNU.sparse.name", name.to_vec()),
                ("GNU.sparse.realsize", b"100".to_vec()),
            ]
        };
        let with = |pax: &[(&'static str, Vec<u8>)], data: &[u8]| {
            let p: Vec<(&str, &[u8])> = pax.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            tar_of(&p, "GNUSparseFile.0/f", data, 0)
        };
        let map = |text: &str, data: &[u8]| {
            let mut m = text.as_bytes().to_vec();
            m.resize(512, 0);
            m.extend_from_slice(data);
            m
        };
        refused(&with(&sparse(b"../x"), &map("1\n0\n1\n", b"x")), "..");
        let ok = sparse(b"f");
        // The control: a well-formed sparse member imports.
        import_bytes(&with(&ok, &map("2\n10\n1\n50\n2\n", b"xyz"))).unwrap();
        // Sparse maps: a huge count, lines too long or not numbers, extents past the size,
        // overlapping or out of order, lengths that do not add up, a map past the data.
        for (m, data, what) in [
            ("99999999999\n", &b"x"[..], "sparse map of"),
            ("1\n000000000000000000001\n1\n", b"x", "too long"),
            ("1\n1x\n1\n", b"x", "not a number"),
            ("1\n99\n2\n", b"xy", "past the file's size"),
            (
                "1\n18446744073709551615\n2\n",
                b"xy",
                "past the file's size",
            ),
            ("2\n10\n5\n12\n1\n", b"xxxxxx", "overlapping"),
            ("2\n50\n1\n10\n1\n", b"xx", "overlapping"),
            ("1\n10\n5\n", b"xx", "covers 5 bytes"),
        ] {
            refused(&with(&ok, &map(m, data)), what);
        }
        refused(&with(&ok, b"1\n0\n"), "sparse map");
        let mut v2 = sparse(b"f");
        v2[0].1 = b"2".to_vec();
        refused(
            &with(&v2, &map("1\n0\n1\n", b"x")),
            "unsupported GNU sparse format",
        );
        let mut v01 = sparse(b"f");
        v01.truncate(3);
        v01[1].1 = b"1".to_vec();
        v01[0].1 = b"0".to_vec();
        v01.push(("GNU.sparse.size", b"100".to_vec()));
        v01.push(("GNU.sparse.map", b"0,1,5".to_vec()));
        refused(&with(&v01, b"x"), "odd count");
        v01.pop();
        v01.push(("GNU.sparse.map", b"0,1,,5".to_vec()));
        refused(&with(&v01, b"x"), "not a number");
    }
}
