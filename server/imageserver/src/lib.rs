//! si's image service: nodes fetch manifests and objects; the master pushes updates.
//!
//! - [`service`]: the image service (port 7811) over the si protocol.
//! - [`push`]: pushed updates through the nodes' agents or over ssh.

mod manifest_cache;
pub mod push;
pub mod service;
