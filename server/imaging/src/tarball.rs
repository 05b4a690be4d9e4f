//! Import and export of images as tar streams (POSIX pax; xattrs as `SCHILY.xattr.*`,
//! nanosecond mtimes as pax `mtime`), so a debootstrap or container rootfs tarball can become
//! an image without a golden node, and an image can leave the store. Files larger than one chunk
//! keep their runs of zeros (whole chunks of zeros) as holes, so sparse files stay sparse.

use crate::getimage::Summary;
use anyhow::{anyhow, bail, Context, Result};
use si_proto::manifest::{Chunk, Entry, Kind, Manifest, Xattr};
use si_store::{PackWriter, Store, VersionMeta};
use si_tree::scan::{CDC_AVG, CDC_MAX, CDC_MIN, CDC_THRESHOLD};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

const XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Splits a stream of `len` bytes into chunks stored through `w`.
fn store_stream<R: Read>(w: &mut PackWriter<'_>, r: R, len: u64) -> Result<Vec<Chunk>> {
    let mut chunks = Vec::new();
    if len <= CDC_THRESHOLD {
        let mut buf = Vec::with_capacity(len as usize);
        r.take(len)
            .read_to_end(&mut buf)
            .context("reading tar entry data")?;
        if buf.len() as u64 != len {
            bail!("tar entry data is truncated");
        }
        if !buf.is_empty() {
            let d = w.add_raw(&buf)?;
            chunks.push(Chunk {
                offset: 0,
                len: buf.len() as u32,
                digest: d,
            });
        }
        return Ok(chunks);
    }
    let mut total = 0;
    for c in fastcdc::v2020::StreamCDC::new(r.take(len), CDC_MIN, CDC_AVG, CDC_MAX) {
        let c = c.map_err(|e| anyhow!("reading tar entry data: {e}"))?;
        total += c.length as u64;
        // Runs of zeros become holes: tar streams carry sparse files expanded.
        if c.data.iter().all(|&b| b == 0) {
            continue;
        }
        let d = w.add_raw(&c.data)?;
        chunks.push(Chunk {
            offset: c.offset,
            len: c.length as u32,
            digest: d,
        });
    }
    if total != len {
        bail!("tar entry data is truncated");
    }
    Ok(chunks)
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
    for item in ar.entries().context("reading the tar stream")? {
        let mut item = item.context("reading a tar entry")?;
        let path = norm(&item.path_bytes())?;
        let h = item.header().clone();
        let mut xattrs = Vec::new();
        let mut mtime_nsec = 0u32;
        if let Some(exts) = item.pax_extensions().context("reading pax headers")? {
            for ext in exts {
                let ext = ext.context("reading a pax record")?;
                let key = ext.key().map_err(|_| anyhow!("non-UTF-8 pax key"))?;
                if let Some(name) = key.strip_prefix(XATTR_PREFIX) {
                    xattrs.push(Xattr {
                        name: name.as_bytes().to_vec(),
                        value: ext.value_bytes().to_vec(),
                    });
                } else if key == "mtime" {
                    if let Some((_, frac)) = ext.value().unwrap_or("").split_once('.') {
                        let f = format!("{frac:0<9}");
                        mtime_nsec = f[..9].parse().unwrap_or(0);
                    }
                }
            }
        }
        xattrs.sort_by(|a, b| a.name.cmp(&b.name));
        let mode = h.mode().context("bad mode")? & 0o7777;
        let et = h.entry_type();
        let kind = if et.is_dir() {
            Kind::Dir
        } else if et.is_file() || et == tar::EntryType::Continuous {
            let size = item.size();
            Kind::File {
                size,
                chunks: store_stream(&mut writer, &mut item, size)?,
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
            let major = h.device_major()?.unwrap_or(0) as u64;
            let minor = h.device_minor()?.unwrap_or(0) as u64;
            let rdev = rustix::fs::makedev(major as u32, minor as u32);
            if et.is_character_special() {
                Kind::CharDev { rdev }
            } else {
                Kind::BlockDev { rdev }
            }
        } else if et.is_fifo() {
            Kind::Fifo
        } else if et.is_pax_global_extensions() || et.is_gnu_longname() || et.is_gnu_longlink() {
            continue;
        } else {
            bail!(
                "tar entry {:?}: unsupported type {:?}",
                String::from_utf8_lossy(&path),
                et
            );
        };
        let e = Entry {
            path: path.clone(),
            kind,
            mode,
            uid: h.uid().context("bad uid")? as u32,
            gid: h.gid().context("bad gid")? as u32,
            mtime: h.mtime().context("bad mtime")? as i64,
            mtime_nsec,
            xattrs,
        };
        entries.insert(path, e);
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
            format!("{}.{:09}", e.mtime, e.mtime_nsec).into_bytes(),
        ));
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .context("writing pax headers")?;
        let mut h = tar::Header::new_gnu();
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
                h.set_size(*size);
                let r = FileReader {
                    store,
                    chunks,
                    size: *size,
                    pos: 0,
                    buf: Vec::new(),
                    buf_off: 0,
                };
                b.append_data(&mut h, path, r)
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
