//! si's master: the image store, capture from golden clients, image management, serving.

pub mod capture;
pub mod imagecmd;
pub mod store;
pub mod tarfmt;

/// This machine's host name.
pub fn hostname() -> String {
    si_agent::capture::hostname()
}
