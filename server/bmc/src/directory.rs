//! Where BMCs are found, and where what was done to them is written down.
//!
//! [`BmcDirectory`] is the interface; [`TomlDirectory`] reads `/etc/si/bmc.toml` (root-only:
//! it holds passwords, and is refused if group or others may read it):
//!
//! ```toml
//! state_dir = "/var/lib/si/power"    # history.jsonl and boot-actions.json live here
//!
//! [defaults]                         # applies to every node
//! user = "ADMIN"
//! password = "secret"
//! driver = "ipmi"                    # ipmi | ipmitool | redfish
//! cipher_suite = 17                  # 3 or 17
//! port = 623
//!
//! [groups.rack1]                     # a group: nodes by range, host by template
//! nodes = "node[01-64]"
//! host = "{node}-bmc.example"        # {node} is replaced by the node name
//!
//! [nodes.node65]                     # one node; overrides its group and the defaults
//! host = "10.1.0.65"
//! group = "rack1"
//! ```
//! A node's settings come from its `[nodes.X]` table, then its group (named by `group`, or
//! the first group whose `nodes` contains it), then `[defaults]`. `@rack1` on a command line
//! means every node of group rack1.

use super::{BmcTarget, Driver};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use si_inventory::ranges;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const DEFAULT_PATH: &str = "/etc/si/bmc.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/si/power";

/// One thing done to a node, for its history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// Seconds since the epoch.
    pub time: u64,
    pub node: String,
    /// What was attempted: "power on", "bootdev pxe", "boot-action install", ...
    pub action: String,
    /// "ok" or "error".
    pub outcome: String,
    pub detail: String,
}

impl HistoryEvent {
    pub fn new(node: &str, action: &str, result: &Result<String>) -> HistoryEvent {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (outcome, detail) = match result {
            Ok(d) => ("ok", d.clone()),
            Err(e) => ("error", format!("{e:#}")),
        };
        HistoryEvent {
            time,
            node: node.into(),
            action: action.into(),
            outcome: outcome.into(),
            detail,
        }
    }
}

/// Resolves node names to BMC targets and keeps per-node history and boot actions.
/// Implementations are shared between worker threads.
pub trait BmcDirectory: Send + Sync {
    /// Expands a node expression (ranges, lists; implementations may add group syntax).
    fn expand(&self, expr: &str) -> Result<Vec<String>> {
        ranges::expand(expr)
    }
    /// Targets for `nodes`, in order; an unknown node is an error naming it.
    fn resolve(&self, nodes: &[String]) -> Result<Vec<BmcTarget>>;
    /// Appends an event to the node's history.
    fn record(&self, event: &HistoryEvent) -> Result<()>;
    /// Sets what the node should do at its next network boot ("install", "local", ...).
    fn set_boot_action(&self, node: &str, action: &str) -> Result<()>;
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password: Option<String>,
    driver: Option<Driver>,
    cipher_suite: Option<u8>,
    redfish_tls: Option<crate::RedfishTls>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    nodes: Option<String>,
    #[serde(flatten)]
    settings: Settings,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    group: Option<String>,
    #[serde(flatten)]
    settings: Settings,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    state_dir: Option<PathBuf>,
    #[serde(default)]
    defaults: Settings,
    #[serde(default)]
    groups: BTreeMap<String, GroupFile>,
    #[serde(default)]
    nodes: BTreeMap<String, NodeFile>,
}

/// [`BmcDirectory`] backed by a TOML file, with history and boot actions in `state_dir`.
pub struct TomlDirectory {
    file: FileFormat,
    group_members: BTreeMap<String, Vec<String>>,
    state_dir: PathBuf,
    lock: Mutex<()>,
}

impl std::fmt::Debug for TomlDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TomlDirectory")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl TomlDirectory {
    /// Reads the file, refusing it if group or others have any access to it.
    pub fn open(path: &Path) -> Result<TomlDirectory> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        ensure!(
            mode & 0o077 == 0,
            "refusing to read {}: mode {mode:03o} lets group/others read BMC passwords (chmod 600 it)",
            path.display()
        );
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Parses the TOML text (no permission check; for tests and other sources).
    pub fn parse(text: &str) -> Result<TomlDirectory> {
        let file: FileFormat = toml::from_str(text).context("invalid BMC directory")?;
        let mut group_members = BTreeMap::new();
        for (name, g) in &file.groups {
            let members = match &g.nodes {
                Some(expr) => ranges::expand(expr).with_context(|| format!("group {name}"))?,
                None => Vec::new(),
            };
            group_members.insert(name.clone(), members);
        }
        for (node, n) in &file.nodes {
            if let Some(g) = &n.group {
                ensure!(
                    file.groups.contains_key(g),
                    "node {node} names unknown group {g}"
                );
            }
        }
        let state_dir = file
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        Ok(TomlDirectory {
            file,
            group_members,
            state_dir,
            lock: Mutex::new(()),
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn group_of(&self, node: &str) -> Option<&str> {
        if let Some(g) = self.file.nodes.get(node).and_then(|n| n.group.as_deref()) {
            return Some(g);
        }
        self.group_members
            .iter()
            .find(|(_, m)| m.iter().any(|x| x == node))
            .map(|(g, _)| g.as_str())
    }

    fn target(&self, node: &str) -> Result<BmcTarget> {
        let own = self.file.nodes.get(node).map(|n| &n.settings);
        let group = self
            .group_of(node)
            .and_then(|g| self.file.groups.get(g))
            .map(|g| &g.settings);
        if own.is_none() && group.is_none() {
            bail!("node {node} is not in the BMC directory");
        }
        let layers = [own, group, Some(&self.file.defaults)];
        macro_rules! pick {
            ($f:ident) => {
                layers.iter().flatten().find_map(|s| s.$f.clone())
            };
        }
        let host = pick!(host)
            .ok_or_else(|| anyhow!("node {node}: no BMC host"))?
            .replace("{node}", node);
        let cipher_suite = pick!(cipher_suite).unwrap_or(17);
        let driver = pick!(driver).unwrap_or_default();
        Ok(BmcTarget {
            node: node.to_string(),
            host,
            port: pick!(port).unwrap_or(if driver == Driver::Redfish { 443 } else { 623 }),
            user: pick!(user).ok_or_else(|| anyhow!("node {node}: no BMC user"))?,
            password: pick!(password).ok_or_else(|| anyhow!("node {node}: no BMC password"))?,
            driver,
            cipher_suite,
            redfish_tls: pick!(redfish_tls).unwrap_or_default(),
        })
    }

    fn ensure_state_dir(&self) -> Result<()> {
        std::fs::create_dir_all(&self.state_dir)
            .with_context(|| format!("creating {}", self.state_dir.display()))
    }

    /// Current boot actions (node → action).
    pub fn boot_actions(&self) -> Result<BTreeMap<String, String>> {
        let p = self.state_dir.join("boot-actions.json");
        match std::fs::read_to_string(&p) {
            Ok(t) => serde_json::from_str(&t).with_context(|| format!("parsing {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Every recorded event, oldest first.
    pub fn history(&self) -> Result<Vec<HistoryEvent>> {
        let p = self.state_dir.join("history.jsonl");
        let t = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        t.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .with_context(|| format!("parsing a line of {}", p.display()))
            })
            .collect()
    }
}

impl BmcDirectory for TomlDirectory {
    fn expand(&self, expr: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for part in expr.split(',').filter(|p| p.starts_with('@')) {
            let g = &part[1..];
            let m = self
                .group_members
                .get(g)
                .ok_or_else(|| anyhow!("unknown group @{g}"))?;
            out.extend(m.iter().cloned());
            out.extend(
                self.file
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.group.as_deref() == Some(g))
                    .map(|(k, _)| k.clone()),
            );
        }
        let rest: Vec<&str> = split_keep_brackets(expr)
            .into_iter()
            .filter(|p| !p.starts_with('@'))
            .collect();
        if !rest.is_empty() {
            out.extend(ranges::expand(&rest.join(","))?);
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|n| seen.insert(n.clone()));
        ensure!(!out.is_empty(), "no nodes in {expr:?}");
        Ok(out)
    }

    fn resolve(&self, nodes: &[String]) -> Result<Vec<BmcTarget>> {
        let mut out = Vec::with_capacity(nodes.len());
        let mut missing = Vec::new();
        for n in nodes {
            match self.target(n) {
                Ok(t) => out.push(t),
                Err(e) => missing.push(format!("{e:#}")),
            }
        }
        if !missing.is_empty() {
            bail!("{}", missing.join("; "));
        }
        Ok(out)
    }

    fn record(&self, event: &HistoryEvent) -> Result<()> {
        let _g = self
            .lock
            .lock()
            .map_err(|_| anyhow!("history lock poisoned"))?;
        self.ensure_state_dir()?;
        let p = self.state_dir.join("history.jsonl");
        let mut line = serde_json::to_string(event).context("encoding a history event")?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))?;
        f.write_all(line.as_bytes())
            .with_context(|| format!("appending to {}", p.display()))
    }

    fn set_boot_action(&self, node: &str, action: &str) -> Result<()> {
        let _g = self
            .lock
            .lock()
            .map_err(|_| anyhow!("boot action lock poisoned"))?;
        self.ensure_state_dir()?;
        let mut map = self.boot_actions()?;
        map.insert(node.to_string(), action.to_string());
        let p = self.state_dir.join("boot-actions.json");
        let tmp = self
            .state_dir
            .join(format!(".boot-actions.json.{}", std::process::id()));
        let text = serde_json::to_string_pretty(&map).context("encoding boot actions")?;
        {
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(text.as_bytes())
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.sync_all()
                .with_context(|| format!("syncing {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, &p)
            .with_context(|| format!("renaming {} to {}", tmp.display(), p.display()))
    }
}

fn split_keep_brackets(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
state_dir = "/nonexistent"
[defaults]
user = "ADMIN"
password = "pw"
cipher_suite = 3

[groups.rack1]
nodes = "node[01-04]"
host = "{node}-bmc"
port = 6230

[nodes.node02]
host = "10.213.0.2"
password = "other"

[nodes.solo]
host = "10.213.0.9"
driver = "ipmitool"
group = "rack1"
"#;

    #[test]
    fn layering() {
        let d = TomlDirectory::parse(SAMPLE).unwrap();
        let t = d
            .resolve(&["node01".into(), "node02".into(), "solo".into()])
            .unwrap();
        assert_eq!(
            (t[0].host.as_str(), t[0].port, t[0].password.as_str()),
            ("node01-bmc", 6230, "pw")
        );
        assert_eq!(
            (t[1].host.as_str(), t[1].port, t[1].password.as_str()),
            ("10.213.0.2", 6230, "other")
        );
        assert_eq!(
            (t[2].driver, t[2].cipher_suite, t[2].port),
            (Driver::Ipmitool, 3, 6230)
        );
        let e = d.resolve(&["node09".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("node09"));
        assert_eq!(
            d.expand("@rack1").unwrap(),
            ["node01", "node02", "node03", "node04", "solo"]
        );
        assert_eq!(
            d.expand("node[01-02],x").unwrap(),
            ["node01", "node02", "x"]
        );
    }

    #[test]
    fn rejects_unknown_keys_and_readable_files() {
        assert!(TomlDirectory::parse("[defaults]\npasword = \"x\"\n").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bmc.toml");
        std::fs::write(&p, SAMPLE).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = TomlDirectory::open(&p).unwrap_err();
        assert!(format!("{e:#}").contains("refusing"), "{e:#}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        TomlDirectory::open(&p).unwrap();
    }

    #[test]
    fn history_and_boot_actions() {
        let dir = tempfile::tempdir().unwrap();
        let text = SAMPLE.replace("/nonexistent", &dir.path().join("st").display().to_string());
        let d = TomlDirectory::parse(&text).unwrap();
        d.record(&HistoryEvent::new("node01", "power on", &Ok("done".into())))
            .unwrap();
        d.record(&HistoryEvent::new(
            "node01",
            "power off",
            &Err(anyhow!("boom")),
        ))
        .unwrap();
        d.set_boot_action("node01", "install").unwrap();
        d.set_boot_action("node02", "local").unwrap();
        let h = d.history().unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(
            (h[1].outcome.as_str(), h[1].detail.as_str()),
            ("error", "boom")
        );
        let b = d.boot_actions().unwrap();
        assert_eq!(b.get("node01").map(String::as_str), Some("install"));
        assert_eq!(b.len(), 2);
    }
}
