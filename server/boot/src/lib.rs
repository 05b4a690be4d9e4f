//! si's network boot services, generated from the inventory.
//!
//! - [`dhcp`]: DHCP and ProxyDHCP.
//! - [`tftp`]: TFTP (RFC 1350 with blksize, tsize, timeout and windowsize options).
//! - [`http`]: the boot HTTP server.
//! - [`bootcfg`]: the iPXE, PXELINUX and GRUB configurations generated per node.

pub mod bootcfg;
pub mod dhcp;
pub mod http;
pub mod tftp;
