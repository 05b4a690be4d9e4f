//! si's master: the image store, capture from golden clients, image management, serving.

pub mod bootcfg;
pub mod capture;
pub mod http;
pub mod imagecmd;
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
