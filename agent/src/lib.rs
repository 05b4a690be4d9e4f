//! si's node-side code.
//!
//! - [`scan`]: reads a tree into a manifest and content objects (capture on the golden node,
//!   `commit` on the master).
//! - [`apply`]: writes a manifest's tree beneath a target root with full metadata (checkout on
//!   the master, deploy and update on nodes).
//! - [`capture`]: `si-prepareclient`, the golden client's capture service.
//! - [`exclude`]: exclude patterns.

pub mod agentd;
pub mod apply;
pub mod capture;
pub mod codec;
pub mod exclude;
pub mod fsutil;
pub mod layout;
pub mod pull;
pub mod scan;
pub mod update;
