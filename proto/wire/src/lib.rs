//! Wire and on-disk types shared by every part of si.
//!
//! - [`digest`]: BLAKE3 content digests.
//! - [`manifest`]: the versioned description of one image version (every entry with its metadata).
//! - [`path`]: validation of the relative paths that manifests carry (no `..`, no absolute paths).
//! - [`frame`]: the length-prefixed, size-bounded framing of the si protocol.
//! - [`msg`]: the protocol messages and the version handshake.
//! - [`layout`]: the declarative disk layout recorded by `si-prepareclient`.
//! - [`plan`]: the install plan the master gives a netbooted installer.
//! - [`limits`]: sizes both ends agree on (the chunking parameters, the largest object).

pub mod digest;
pub mod frame;
pub mod handshake;
pub mod layout;
pub mod limits;
pub mod manifest;
pub mod msg;
pub mod path;
pub mod plan;
pub mod stream;

pub use digest::Digest;
pub use manifest::{Chunk, Entry, Kind, Manifest};
