//! `si-install`, the netbooted installer: it turns a blank machine (or one with an old install,
//! or another OS) into a node.
//!
//! - [`config`]: the kernel command line and `si-install`'s flags, one struct.
//! - [`disks`]: the node's disks from lsblk and sysfs, in-use checks, matching layout disks.
//! - [`plan`]: the layout made concrete on the chosen disks (partition geometry, mount order,
//!   boot loader targets), printed before anything is written.
//! - [`gen`]: fstab, mdadm.conf, network configuration, script order.
//! - [`steps`]: the install as named, timed, reported steps, and the error path.

pub mod config;
pub mod disks;
pub mod gen;
pub mod plan;
pub mod steps;
