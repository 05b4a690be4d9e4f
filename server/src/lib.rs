//! si server
pub mod power;
