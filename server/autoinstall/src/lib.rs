//! Automatic installs through a distribution's own installer (Kickstart, preseed, AutoYaST),
//! Cobbler-style: **distros** (an installer kernel and initrd, and optionally a package tree),
//! **profiles** (a distro, an answer-file template, kernel arguments, variables) and
//! **snippets** (templates included by name). Nodes and groups get a profile in the inventory
//! and the boot action `autoinstall`; the boot configurations then boot the distro's installer
//! with its family's answer-file argument, pointing at [`route::AnswerRoute`] on si-server's
//! HTTP, which renders the node's answer file ([`render`]) and serves it to that node only.
//!
//! Everything lives in the server's state directory, which is root-only:
//!
//! ```text
//! <state>/autoinstall/                 mode 0700
//! ├── distros/<distro>/                served over TFTP and HTTP as si-distro/<distro>/...
//! │   ├── distro.toml                  family, architecture, where it came from
//! │   ├── linux, initrd                the installer's kernel and initrd
//! │   └── tree/                        the package tree (optional)
//! ├── profiles/<profile>/
//! │   ├── profile.toml                 distro, kernel arguments, variables
//! │   └── template                     the answer-file template (minijinja)
//! ├── snippets/global/<snippet>        looked up last
//! ├── snippets/distro/<distro>/<snippet>
//! ├── snippets/profile/<profile>/<snippet>
//! ├── snippets/node/<node>/<snippet>   looked up first
//! ├── vars/group/<group>.toml, vars/node/<node>.toml
//! └── tokens/<node>                    mode 0600: the node's one-time install token
//! ```
//!
//! Every name is checked ([`check_name`]) before it becomes a path. Writes go to a temporary
//! file and are renamed into place.

pub mod cli;
pub mod distro;
pub mod render;
pub mod route;
pub mod store;

pub use distro::{Detected, Distro};
pub use render::{render_answer, Rendered, ServerUrls};
pub use route::AnswerRoute;
pub use si_boot::bootcfg::Family;
pub use store::{Profile, Scope, Store};

use anyhow::{bail, Result};

/// The path prefix distros are served under (TFTP and HTTP), see
/// [`si_boot::bootcfg::Generated::mount`].
pub const DISTRO_PREFIX: &str = "si-distro";

/// The HTTP route prefix of answer files and install callbacks.
pub const ROUTE_PREFIX: &str = "autoinstall";

/// Checks a distro, profile, snippet, node or group name before it becomes a path:
/// 1 to 63 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 63 {
        bail!("{what} name {name:?} must have 1 to 63 characters");
    }
    if name.starts_with('.') || name.starts_with('-') {
        bail!("{what} name {name:?} must not start with '.' or '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        bail!("{what} name {name:?} may contain only letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// Checks a template variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 63 characters.
pub fn check_var(key: &str) -> Result<()> {
    let mut b = key.bytes();
    let first_ok = b
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_');
    if !first_ok || key.len() > 63 || !b.all(|c| c.is_ascii_alphanumeric() || c == b'_') {
        bail!("variable name {key:?} must be [A-Za-z_][A-Za-z0-9_]* (at most 63 characters)");
    }
    Ok(())
}

/// Parses `key=value`.
pub fn parse_var(s: &str) -> Result<(String, String)> {
    let Some((k, v)) = s.split_once('=') else {
        bail!("{s:?} is not KEY=VALUE");
    };
    check_var(k)?;
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests;
