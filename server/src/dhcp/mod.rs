//! DHCP
