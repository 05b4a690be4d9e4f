//! Object compression and verification, with one zstd context per thread (creating a context
//! per object costs more than compressing a small file).

use anyhow::{bail, Context, Result};
use si_proto::Digest;
use std::cell::RefCell;

/// Compression level of objects.
pub const ZSTD_LEVEL: i32 = 2;

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses an object at [`ZSTD_LEVEL`].
pub fn compress(data: &[u8]) -> Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL).context("creating a zstd context")?);
        }
        c.as_mut()
            .expect("set above")
            .compress(data)
            .context("compressing")
    })
}

/// Decompresses at most `capacity` bytes.
pub fn decompress(z: &[u8], capacity: usize) -> Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new().context("creating a zstd context")?);
        }
        Ok(d.as_mut().expect("set above").decompress(z, capacity)?)
    })
}

/// Checks a received or stored object: decompresses at most `raw_len` bytes (no more than
/// [`si_proto::limits::MAX_OBJECT`]) and compares the BLAKE3 digest. Returns the content.
pub fn verify(digest: &Digest, raw_len: u32, z: &[u8]) -> Result<Vec<u8>> {
    if raw_len > si_proto::limits::MAX_OBJECT {
        bail!(
            "object {digest} claims {raw_len} bytes, more than the {}-byte limit",
            si_proto::limits::MAX_OBJECT
        );
    }
    let raw = decompress(z, raw_len as usize)
        .with_context(|| format!("object {digest} does not decompress"))?;
    if raw.len() != raw_len as usize {
        bail!(
            "object {digest} has {} bytes, {raw_len} announced",
            raw.len()
        );
    }
    let actual = Digest::of(&raw);
    if actual != *digest {
        bail!("object {digest} is corrupt: its content hashes to {actual}");
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let data = b"hello hello hello hello".repeat(100);
        let z = compress(&data).unwrap();
        let d = Digest::of(&data);
        assert_eq!(verify(&d, data.len() as u32, &z).unwrap(), data);
        assert!(
            verify(&d, data.len() as u32 - 1, &z).is_err(),
            "wrong length"
        );
        assert!(
            verify(&Digest::of(b"x"), data.len() as u32, &z).is_err(),
            "wrong digest"
        );
        assert!(verify(&d, u32::MAX, &z).is_err(), "oversized claim");
        assert!(verify(&d, 10, b"garbage").is_err());
    }
}
