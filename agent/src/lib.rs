//! si's node-side code.
//!
//! - [`update`]: move a node to an image version (deploy onto an empty root, or update in place).
//! - [`pull`]: the image service client the update fetches manifests and objects with.
//! - [`agentd`]: `si-agentd`, which runs an update when the master pushes one.
//! - [`golden`]: `si-prepareclient`, the golden client's capture service.
//! - [`layout`]: disk layout detection on the golden client.

pub mod agentd;
pub mod golden;
pub mod layout;
pub mod pull;
pub mod update;
