//! si's tree engine, used by the master and the nodes alike.
//!
//! - [`scan`]: reads a tree into a manifest and content objects (capture on the golden node,
//!   `commit` on the master).
//! - [`apply`]: writes a manifest's tree beneath a target root with full metadata (checkout on
//!   the master, deploy and update on nodes).
//! - [`chunker`]: the one chunking rule (per data extent, FastCDC) capture, tar import and
//!   update share.
//! - [`codec`]: the object codec (zstd, one context per thread) and digest verification.
//! - [`exclude`]: exclude patterns.
//! - [`fsutil`]: small filesystem and system helpers.

pub mod apply;
pub mod chunker;
pub mod codec;
pub mod exclude;
pub mod fsutil;
pub mod logging;
pub mod scan;
