//! Answer files: a profile's template rendered for one node with minijinja.
//!
//! Variables (an unknown one is an error: undefined behaviour is strict):
//!
//! | name | value |
//! | --- | --- |
//! | `node`, `hostname` | the node's name and host name |
//! | `ip`, `addresses` | its static address, else its DHCP lease's (or none); all of them |
//! | `mac`, `macs` | its first MAC address; all of them |
//! | `group`, `disk_layout` | its group and the group's disk layout (or none) |
//! | `disks` | the `disks` variable split at commas and blanks (empty list if unset) |
//! | `profile`, `distro` | the profile's name; the distro (`name`, `family`, `arch`, `description`, `tree_url`) |
//! | `server_url` | si-server's HTTP base URL |
//! | `answer_url`, `done_url`, `token` | this file's URL, the install callback, the one-time token |
//! | `vars` | the profile's variables, overridden by the group's, overridden by the node's |
//!
//! `{% include "name" %}` finds a snippet in the node's snippets, then the profile's, then the
//! distro's, then the global ones (Cobbler's order). A missing snippet, an include loop, an
//! undefined variable or a syntax error fails the whole render: a node is never served part of
//! a file.

use crate::store::{Profile, Scope, Store};
use crate::Distro;
use anyhow::{bail, Context, Result};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior};
use serde::Serialize;
use si_inventory::{BootInfo, Inventory};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Deepest include nesting; deeper is reported as an include loop.
pub const MAX_INCLUDE_DEPTH: usize = 32;
/// Largest answer file rendered (bytes).
pub const MAX_OUTPUT: usize = 4 << 20;
/// Template instructions allowed per render (a runaway loop stops here).
pub const FUEL: u64 = 10_000_000;

const NOT_FOUND: &str = "is in none of:";

/// Where nodes reach si-server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrls {
    /// `http://10.213.0.1:8080`, no trailing slash.
    pub http_base: String,
}

impl ServerUrls {
    pub fn answer_url(&self, node: &str, token: &str) -> String {
        format!(
            "{}/{}/answer/{node}/{token}",
            self.http_base,
            crate::ROUTE_PREFIX
        )
    }
    pub fn done_url(&self, node: &str, token: &str) -> String {
        format!(
            "{}/{}/done/{node}/{token}",
            self.http_base,
            crate::ROUTE_PREFIX
        )
    }
}

/// A rendered answer file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub node: String,
    pub profile: String,
    pub distro: String,
    pub text: String,
}

#[derive(Serialize)]
struct DistroCtx {
    name: String,
    family: String,
    arch: String,
    description: String,
    tree_url: Option<String>,
}

#[derive(Serialize)]
struct Ctx {
    node: String,
    hostname: String,
    ip: Option<String>,
    addresses: Vec<String>,
    mac: Option<String>,
    macs: Vec<String>,
    group: Option<String>,
    disk_layout: Option<String>,
    disks: Vec<String>,
    profile: String,
    distro: DistroCtx,
    server_url: String,
    answer_url: String,
    done_url: String,
    token: String,
    vars: BTreeMap<String, String>,
}

/// The node's addresses: its static one, then those of current (bound, unexpired) leases of
/// its MACs.
pub fn node_addresses(inv: &Inventory, b: &BootInfo) -> Result<Vec<Ipv4Addr>> {
    let mut v: Vec<Ipv4Addr> = b.ip.into_iter().collect();
    let now = si_inventory::now();
    for l in inv.leases().context("reading DHCP leases")? {
        if b.macs.contains(&l.mac)
            && l.state == "bound"
            && l.expires.is_none_or(|e| e > now)
            && !v.contains(&l.ip)
        {
            v.push(l.ip);
        }
    }
    Ok(v)
}

/// The profile a node installs with (its own, else its group's).
pub fn node_profile(store: &Store, b: &BootInfo) -> Result<(Profile, Distro)> {
    let name = b.profile.as_deref().with_context(|| {
        format!(
            "node {} has no profile (si-node set {} --profile NAME, or its group's)",
            b.name, b.name
        )
    })?;
    let p = store
        .profile(name)
        .with_context(|| format!("loading the profile of node {}", b.name))?;
    let d = store
        .distro(&p.distro)
        .with_context(|| format!("loading the distro of profile {}", p.name))?;
    Ok((p, d))
}

/// Checks that a template or snippet parses.
pub fn check_syntax(text: &str) -> Result<()> {
    let env = environment();
    env.template_from_str(text).map_err(describe)?;
    Ok(())
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_recursion_limit(MAX_INCLUDE_DEPTH);
    env.set_fuel(Some(FUEL));
    env
}

/// One line per error of a chain: `undefined value (in snippet-a:3)`.
fn describe(e: Error) -> anyhow::Error {
    let mut parts = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = cur {
        let line = match err.downcast_ref::<Error>() {
            Some(me) => {
                let what = match me.kind() {
                    ErrorKind::UndefinedError => "unknown variable".to_string(),
                    ErrorKind::InvalidOperation
                        if me.detail().is_some_and(|d| d.contains("recursion limit")) =>
                    {
                        format!("include loop (or includes nested deeper than {MAX_INCLUDE_DEPTH})")
                    }
                    ErrorKind::TemplateNotFound => "missing snippet".to_string(),
                    ErrorKind::InvalidOperation
                        if me.detail().is_some_and(|d| d.contains(NOT_FOUND)) =>
                    {
                        "missing snippet".to_string()
                    }
                    ErrorKind::OutOfFuel => "the template runs too long".to_string(),
                    ErrorKind::SyntaxError => "syntax error".to_string(),
                    k => k.to_string(),
                };
                let detail = me.detail().map(|d| format!(": {d}")).unwrap_or_default();
                let at = match (me.name(), me.line()) {
                    (Some(n), Some(l)) => format!(" (in {n}, line {l})"),
                    (Some(n), None) => format!(" (in {n})"),
                    _ => String::new(),
                };
                format!("{what}{detail}{at}")
            }
            None => err.to_string(),
        };
        parts.push(line);
        cur = err.source();
    }
    anyhow::anyhow!("{}", parts.join(": "))
}

/// Renders `template` for a node: the whole file, or an error.
#[allow(clippy::too_many_arguments)]
pub fn render_template(
    store: &Store,
    template: &str,
    b: &BootInfo,
    addresses: &[Ipv4Addr],
    profile: &Profile,
    distro: &Distro,
    urls: &ServerUrls,
    token: &str,
) -> Result<String> {
    let mut vars = profile.vars.clone();
    if let Some(g) = &b.group {
        vars.extend(store.vars("group", g)?);
    }
    vars.extend(store.vars("node", &b.name)?);
    let disks = vars
        .get("disks")
        .map(|d| {
            d.split([',', ' '])
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let ctx = Ctx {
        node: b.name.clone(),
        hostname: b.hostname.clone(),
        ip: addresses.first().map(|a| a.to_string()),
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        mac: b.macs.first().cloned(),
        macs: b.macs.clone(),
        group: b.group.clone(),
        disk_layout: b.disk_layout.clone(),
        disks,
        profile: profile.name.clone(),
        distro: DistroCtx {
            name: distro.name.clone(),
            family: distro.family.to_string(),
            arch: distro.arch.clone(),
            description: distro.description.clone(),
            tree_url: distro.tree_url(&urls.http_base),
        },
        server_url: urls.http_base.clone(),
        answer_url: urls.answer_url(&b.name, token),
        done_url: urls.done_url(&b.name, token),
        token: token.to_string(),
        vars,
    };
    let scopes = vec![
        Scope::Node(b.name.clone()),
        Scope::Profile(profile.name.clone()),
        Scope::Distro(distro.name.clone()),
        Scope::Global,
    ];
    let mut env = environment();
    let loader_store = store.clone();
    env.set_loader(move |name| {
        if crate::check_name("snippet", name).is_err() {
            return Err(Error::new(
                ErrorKind::TemplateNotFound,
                format!("{name:?} is not a snippet name"),
            ));
        }
        for s in &scopes {
            match loader_store.snippet(s, name) {
                Ok(Some(t)) => return Ok(Some(t)),
                Ok(None) => {}
                Err(e) => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!("reading snippet {name:?} ({s}): {e:#}"),
                    ))
                }
            }
        }
        let looked: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        // Not TemplateNotFound: minijinja would replace this message with its own.
        Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("snippet {name:?} {NOT_FOUND} {}", looked.join(", ")),
        ))
    });
    let tname = format!("profile {}", profile.name);
    env.add_template_owned(tname.clone(), template.to_string())
        .map_err(describe)?;
    let text = env
        .get_template(&tname)
        .and_then(|t| t.render(&ctx))
        .map_err(describe)?;
    if text.len() > MAX_OUTPUT {
        bail!("the answer file is larger than {MAX_OUTPUT} bytes");
    }
    Ok(text)
}

/// Renders the answer file a node gets now (`si-profile render`, the HTTP route). Creates the
/// node's token if it has none.
pub fn render_answer(
    store: &Store,
    inv: &Inventory,
    node: &str,
    urls: &ServerUrls,
) -> Result<Rendered> {
    crate::check_name("node", node)?;
    let b = inv
        .boot_info(node)?
        .with_context(|| format!("unknown node {node:?}"))?;
    let (profile, distro) = node_profile(store, &b)?;
    let template = store.template(&profile.name)?;
    let addresses = node_addresses(inv, &b)?;
    let token = store.token(node)?;
    let text = render_template(
        store, &template, &b, &addresses, &profile, &distro, urls, &token,
    )
    .with_context(|| {
        format!(
            "rendering the answer file of node {node} (profile {})",
            profile.name
        )
    })?;
    Ok(Rendered {
        node: node.to_string(),
        profile: profile.name,
        distro: distro.name,
        text,
    })
}

/// The boot action of a node whose inventory action is `autoinstall`: its profile's distro's
/// installer, pointed at the node's answer file. Kernel arguments: the profile's, then the
/// group's.
pub fn boot_action(
    store: &Store,
    b: &BootInfo,
    urls: &ServerUrls,
) -> Result<(si_boot::bootcfg::BootAction, String)> {
    let (profile, distro) = node_profile(store, b)?;
    let token = store.token(&b.name)?;
    let args = [profile.kernel_args.trim(), b.kernel_args.trim()]
        .into_iter()
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    Ok((
        si_boot::bootcfg::BootAction::Autoinstall {
            family: distro.family,
            kernel: distro.kernel_path(),
            initrd: distro.initrd_path(),
            answer_url: urls.answer_url(&b.name, &token),
            tree_url: distro.tree_url(&urls.http_base),
            hostname: b.hostname.clone(),
        },
        args,
    ))
}
