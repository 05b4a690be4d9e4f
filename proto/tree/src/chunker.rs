//! The chunking rule, in one place. Capture ([`crate::scan`]), tar import and the update's
//! re-chunking of old files all cut content here, so the same file content gives the same chunks
//! (and so the same objects) whichever path produced it.
//!
//! # The rule
//!
//! A file is its size and its data extents `(offset, len)`: sorted, not overlapping, with holes
//! between them (a file without holes is one extent `(0, size)`). Holes are never chunked; the
//! manifest records them as the gaps between chunks, so sparse files stay sparse. Each extent is
//! chunked on its own, from its first byte:
//!
//! - an extent of at most [`CHUNK_THRESHOLD`] bytes is one chunk;
//! - a longer one is cut by FastCDC (v2020, normalisation level 1, the standard gear table) with
//!   [`CHUNK_MIN`] / [`CHUNK_AVG`] / [`CHUNK_MAX`], each cut searched from the previous one (the
//!   cuts `fastcdc::v2020::StreamCDC` finds over the extent's bytes).
//!
//! Zeros inside an extent are data: only the hole map makes holes. Chunk offsets are file
//! offsets. The parameters are wire vocabulary and live in [`si_proto::limits`].
//!
//! # Use
//!
//! A [`Chunker`] keeps one buffer and reads each extent through it once: from any reader
//! ([`Chunker::extent`], a tar stream), or from a file on disk by `pread` ([`Chunker::file`]).
//! Each chunk is handed to a callback as a slice of that buffer, with no further copy.

use anyhow::{Context, Result};
pub use si_proto::limits::{CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, CHUNK_THRESHOLD, MAX_OBJECT};
use si_proto::manifest::Chunk;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};

/// A data extent of a file: `(offset, len)`.
pub type Extent = (u64, u64);

/// Bytes buffered while cutting a long extent: several maximum-size chunks per refill, so the
/// tail moved to the buffer's front before each refill is a small share of what is read.
const BUF: usize = 4 * CHUNK_MAX as usize;

/// FastCDC's masks for [`CHUNK_AVG`] at normalisation level 1 (as `FastCDC::new` derives them).
fn masks() -> (u64, u64) {
    let bits = fastcdc::v2020::logarithm2(CHUNK_AVG);
    (
        fastcdc::v2020::MASKS[(bits + 1) as usize],
        fastcdc::v2020::MASKS[(bits - 1) as usize],
    )
}

/// Cuts extents into chunks; one per thread, its buffer reused from extent to extent.
#[derive(Default)]
pub struct Chunker {
    buf: Vec<u8>,
}

impl Chunker {
    pub fn new() -> Chunker {
        Chunker::default()
    }

    /// Chunks the extent at file offset `offset`, `len` bytes long, whose bytes `r` yields,
    /// calling `chunk(file_offset, bytes)` for each chunk in order. Reads at most `len` bytes
    /// and returns how many it read: fewer when `r` ends early (the caller decides whether that
    /// is an error; what was read is chunked).
    pub fn extent<R: Read>(
        &mut self,
        r: &mut R,
        offset: u64,
        len: u64,
        mut chunk: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        if len == 0 {
            return Ok(0);
        }
        if len <= CHUNK_THRESHOLD {
            let n = len as usize;
            if self.buf.len() < n {
                self.buf.resize(n, 0);
            }
            let got = fill(r, &mut self.buf[..n])?;
            if got > 0 {
                chunk(offset, &self.buf[..got])?;
            }
            return Ok(got as u64);
        }
        let want = BUF.min(usize::try_from(len).unwrap_or(BUF));
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let buf = &mut self.buf[..want];
        let (mask_s, mask_l) = masks();
        let (mut start, mut end) = (0usize, 0usize);
        let mut read = 0u64;
        let mut eof = false;
        let mut pos = offset;
        loop {
            // Keep at least one maximum chunk ahead of the cut search, or everything to the end.
            if !eof && end - start < CHUNK_MAX as usize {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
                let room = (buf.len() - end).min(usize::try_from(len - read).unwrap_or(usize::MAX));
                let got = fill(r, &mut buf[end..end + room])?;
                end += got;
                read += got as u64;
                eof = got < room || read == len;
            }
            if start == end {
                return Ok(read);
            }
            let (_, n) = fastcdc::v2020::cut(
                &buf[start..end],
                CHUNK_MIN as usize,
                CHUNK_AVG as usize,
                CHUNK_MAX as usize,
                mask_s,
                mask_l,
                mask_s << 1,
                mask_l << 1,
            );
            let n = if n == 0 { end - start } else { n };
            chunk(pos, &buf[start..start + n])?;
            pos += n as u64;
            start += n;
        }
    }

    /// Chunks a file on disk: each of `extents` read by `pread`, chunked by [`Chunker::extent`].
    /// Returns the end of the last byte read (less than the file's size when it shrank).
    pub fn file(
        &mut self,
        f: &File,
        extents: &[Extent],
        mut chunk: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        let mut end = 0;
        for &(off, len) in extents {
            let mut r = ReadAt { f, pos: off };
            let got = self.extent(&mut r, off, len, &mut chunk)?;
            if got > 0 {
                end = off + got;
            }
            if got < len {
                break;
            }
        }
        Ok(end)
    }
}

/// Reads into `buf` until it is full or the reader ends; returns the bytes read.
fn fill<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading data"),
        }
    }
    Ok(n)
}

/// A file read by `pread` from `pos` on.
struct ReadAt<'a> {
    f: &'a File,
    pos: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.f.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The data extents of an open file (`SEEK_DATA` / `SEEK_HOLE`): one extent unless the file has
/// holes, none when it is empty.
pub fn data_extents(f: &File, md: &std::fs::Metadata) -> Result<Vec<Extent>> {
    let size = md.len();
    if size == 0 {
        return Ok(vec![]);
    }
    if md.blocks() * 512 >= size {
        return Ok(vec![(0, size)]);
    }
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match rustix::fs::seek(f, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e).context("seeking to data"),
        };
        let hole =
            rustix::fs::seek(f, rustix::fs::SeekFrom::Hole(data)).context("seeking to a hole")?;
        let end = hole.min(size);
        if end > data {
            out.push((data, end - data));
        }
        pos = hole;
    }
    Ok(out)
}

/// The data extents a chunk list covers (adjacent chunks joined): the file's hole map as the
/// manifest records it.
pub fn extents_of(chunks: &[Chunk]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for c in chunks {
        match out.last_mut() {
            Some((off, len)) if *off + *len == c.offset => *len += c.len as u64,
            _ => out.push((c.offset, c.len as u64)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_bytes(n: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.extend_from_slice(&seed.to_le_bytes());
        }
        out.truncate(n);
        out
    }

    fn cuts(data: &[u8], offset: u64, read_size: usize) -> Vec<(u64, usize, si_proto::Digest)> {
        /// A reader that returns at most `n` bytes per read, as a pipe or a tar stream may.
        struct Dribble<'a>(&'a [u8], usize);
        impl Read for Dribble<'_> {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                let n = b.len().min(self.1).min(self.0.len());
                b[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut out = Vec::new();
        let got = Chunker::new()
            .extent(
                &mut Dribble(data, read_size),
                offset,
                data.len() as u64,
                |o, b| {
                    out.push((o, b.len(), si_proto::Digest::of(b)));
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(got, data.len() as u64);
        out
    }

    /// The rule's long-extent cuts are those of fastcdc's own streaming chunker (what capture
    /// and import used before this module), whatever sizes the reader returns.
    #[test]
    fn long_extents_cut_as_streamcdc_does() {
        for (n, seed) in [
            (CHUNK_THRESHOLD as usize + 1, 1),
            (3 << 20, 2),
            (9 << 20 | 12345, 3),
        ] {
            let mut data = rand_bytes(n, seed);
            // A run of zeros long enough to hit the maximum chunk size.
            data[n / 3..n / 3 + (2 << 20).min(n / 3)].fill(0);
            let want: Vec<_> =
                fastcdc::v2020::StreamCDC::new(&data[..], CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
                    .map(|c| {
                        let c = c.unwrap();
                        (c.offset + 7, c.length, si_proto::Digest::of(&c.data))
                    })
                    .collect();
            for read_size in [usize::MAX, 1 << 20, 65_537, 4096] {
                assert_eq!(
                    cuts(&data, 7, read_size),
                    want,
                    "{n} bytes, reads of {read_size}"
                );
            }
        }
    }

    #[test]
    fn short_extents_are_one_chunk() {
        for n in [1usize, 4096, CHUNK_THRESHOLD as usize] {
            let data = rand_bytes(n, 9);
            assert_eq!(
                cuts(&data, 100, 1000),
                vec![(100, n, si_proto::Digest::of(&data))]
            );
        }
    }

    #[test]
    fn a_short_read_is_reported_not_invented() {
        let data = rand_bytes(5000, 4);
        let mut seen = 0;
        let got = Chunker::new()
            .extent(&mut &data[..], 0, 8000, |_, b| {
                seen += b.len();
                Ok(())
            })
            .unwrap();
        assert_eq!((got, seen), (5000, 5000));
    }

    #[test]
    fn extents_of_joins_adjacent_chunks() {
        let c = |offset, len| Chunk {
            offset,
            len,
            digest: si_proto::Digest::of(b""),
        };
        assert_eq!(
            extents_of(&[c(0, 10), c(10, 5), c(100, 1), c(101, 2), c(200, 1)]),
            vec![(0, 15), (100, 3), (200, 1)]
        );
        assert!(extents_of(&[]).is_empty());
    }

    /// Throughput against fastcdc's StreamCDC (what capture and import used before), hashing
    /// each chunk as they do: `cargo test --release -p si-tree chunker_speed -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "a benchmark"]
    fn chunker_speed() {
        let data = rand_bytes(512 << 20, 11);
        let median = |f: &mut dyn FnMut()| {
            let mut t: Vec<f64> = (0..3)
                .map(|_| {
                    let s = std::time::Instant::now();
                    f();
                    s.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            t[1]
        };
        let mut a = 0usize;
        let old = median(&mut || {
            for c in fastcdc::v2020::StreamCDC::new(&data[..], CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
                a ^= si_proto::Digest::of(&c.unwrap().data).0[0] as usize;
            }
        });
        let mut ch = Chunker::new();
        let new = median(&mut || {
            ch.extent(&mut &data[..], 0, data.len() as u64, |_, b| {
                a ^= si_proto::Digest::of(b).0[0] as usize;
                Ok(())
            })
            .unwrap();
        });
        let mb = data.len() as f64 / 1e6;
        println!(
            "StreamCDC {:.0} MB/s, Chunker {:.0} MB/s ({a})",
            mb / old,
            mb / new
        );
    }
}
