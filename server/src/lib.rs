//! si server
pub mod bootcfg;
pub mod http;
pub mod tftp;
