//! Sizes both ends of the protocol agree on.
//!
//! The chunking parameters are wire vocabulary: a node re-chunks its old files to find objects
//! it already has, and the master's capture and tar import must cut the same content at the same
//! places for objects to be shared. `si_tree::chunker` applies them; the rule is written there.

/// A data extent of at most this many bytes is one chunk; a longer one is split by FastCDC.
pub const CHUNK_THRESHOLD: u64 = 1 << 20;
/// FastCDC (v2020, normalisation level 1) minimum chunk size.
pub const CHUNK_MIN: u32 = 64 << 10;
/// FastCDC average chunk size.
pub const CHUNK_AVG: u32 = 256 << 10;
/// FastCDC maximum chunk size.
pub const CHUNK_MAX: u32 = 1 << 20;
/// Largest object (uncompressed) any producer makes; receivers refuse bigger ones.
pub const MAX_OBJECT: u32 = CHUNK_MAX;

const _: () = assert!(CHUNK_THRESHOLD <= MAX_OBJECT as u64);
