//! si's master.
//!
//! - [`store`]: the content-addressed image store; [`capture`], [`tarfmt`], [`imagecmd`]:
//!   capture, import/export and the image commands.
//! - [`serve`]: the image service nodes deploy and update from; [`push`]: pushed updates.
//! - [`inventory`]: nodes, groups, subnets, DHCP leases and change history in SQLite.
//! - [`dhcp`], [`tftp`], [`http`], [`bootcfg`]: the network boot services.
//! - [`power`]: BMC control (IPMI over LAN, ipmitool, Redfish).
//! - [`ranges`]: node range expressions (`node[001-128]`).

pub mod bootcfg;
pub mod capture;
pub mod daemon;
pub mod dhcp;
pub mod http;
pub mod imagecmd;
pub mod inventory;
pub mod mcache;
pub mod power;
pub mod push;
pub mod ranges;
pub mod serve;
pub mod store;
pub mod tarfmt;
pub mod tftp;

/// This machine's host name.
pub fn hostname() -> String {
    si_agent::capture::hostname()
}

#[cfg(test)]
mod deploy_tests;
