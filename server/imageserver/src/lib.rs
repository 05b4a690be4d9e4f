//! si's image service: nodes fetch manifests and objects; the master pushes updates.
//!
//! - [`service`]: the image service (port 7811) over the si protocol.
//! - [`multicast`]: multicast sessions on one LAN segment (RaptorQ-repaired, TCP for the rest).
//! - [`push`]: pushed updates through the nodes' agents or over ssh.

mod manifest_cache;
pub mod multicast;
pub mod push;
pub mod service;
