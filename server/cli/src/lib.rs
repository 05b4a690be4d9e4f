//! si's master binaries. Each `src/bin/*.rs` parses its command line and calls a library; the
//! wiring that starts the master's services lives in [`daemon`].

pub mod daemon;
pub mod demo;
pub mod gate;
pub mod plans;
pub mod wave;
