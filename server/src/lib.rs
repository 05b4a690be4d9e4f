//! si server
//!
//! - [`inventory`]: nodes, groups, subnets, DHCP leases and change history in SQLite.
//! - [`dhcp`]: the DHCP / ProxyDHCP service with PXE, iPXE and UEFI HTTP boot support.
//! - [`ranges`]: node range expressions (`node[001-128]`).

pub mod dhcp;
pub mod inventory;
pub mod ranges;
