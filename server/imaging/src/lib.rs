//! si's image pipeline on the master.
//!
//! - [`getimage`]: capture from a golden client's `si-prepareclient` into the store.
//! - [`tarball`]: import and export of tar streams (PAX xattrs, sparse files).
//! - [`commands`]: the image commands (`si-image`, `si-lsimage`, `si-getimage`, ...).

pub mod commands;
pub mod getimage;
pub mod tarball;
