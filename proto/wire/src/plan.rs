//! The install plan: everything the netbooted installer needs to turn a blank machine into a
//! node, assembled by the master from its inventory (`Msg::GetPlan` → `Msg::Plan`) or read from
//! a file (`si-install --config`).

use serde::{Deserialize, Serialize};

/// What happens once the node is installed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PostAction {
    #[default]
    Reboot,
    Poweroff,
    Kexec,
    Shell,
}

impl std::str::FromStr for PostAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "reboot" => PostAction::Reboot,
            "poweroff" => PostAction::Poweroff,
            "kexec" => PostAction::Kexec,
            "shell" => PostAction::Shell,
            _ => return Err(format!("{s:?}: expected reboot, poweroff, kexec or shell")),
        })
    }
}

/// The node's network settings, written into the installed system.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Network {
    /// `dhcp` (default) or `static`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// MAC of the interface to configure (none: the one the installer booted from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<std::net::Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// When a script runs: before partitioning (in the installer) or after the image is in place
/// (chrooted into the target).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScriptStage {
    Pre,
    Post,
}

/// A pre- or post-install script. SystemImager's naming: `NN.CLASS[.rest]`, where CLASS is
/// `all`, the image, the group or the hostname; scripts run by NN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Script {
    pub stage: ScriptStage,
    pub name: String,
    pub body: String,
}

/// The node's role in an install wave (see docs/installer.md, "Install waves"): it pulls the
/// image's objects through a chain of relays (si-relay) rather than from the master alone.
/// Manifests and signatures always come from the master; the master is also the last
/// upstream, implicitly, after those listed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Relay {
    /// Where this node serves what it has to its successors (HOST:PORT). None: it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Its upstream relays, nearest first, as `NAME@HOST:PORT` (NAME: the node whose
    /// certificate the relay presents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<String>,
    /// Leave an upstream relay that delivers fewer kbit/s than this while it has objects to
    /// send (`si-relay --min-rate-kbit`); 0 (left out): off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_rate_kbit: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A relay address: HOST:PORT with a port and a host of address or name characters.
fn host_port_ok(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'))
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InstallPlan {
    pub node: String,
    pub image: String,
    /// None: the newest version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The disk layout (TOML, see [`crate::layout`]): the group's hardware profile's, else the
    /// image's own. None: the installer asks for the image's (not yet served) and fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default)]
    pub network: Network,
    /// Override images, applied over the image in this order (global, group, host: later wins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scripts: Vec<Script>,
    #[serde(default)]
    pub post: PostAction,
    /// The node's place in an install wave; None (plans from before waves, a wave served
    /// directly, waves turned off): every object comes from the master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<Relay>,
}

/// Most upstreams a relay section lists (a chain's length bounds it; the master caps chains).
pub const MAX_UPSTREAMS: usize = 1024;

impl InstallPlan {
    /// Checks the names that become paths or command arguments on the node.
    pub fn check(&self) -> Result<(), String> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 253
                && !n.starts_with(['-', '.'])
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        for (what, n) in [("node", Some(&self.node)), ("image", Some(&self.image))]
            .into_iter()
            .chain([
                ("hostname", self.hostname.as_ref()),
                ("group", self.group.as_ref()),
            ])
        {
            if let Some(n) = n {
                if !name_ok(n) {
                    return Err(format!("install plan: bad {what} name {n:?}"));
                }
            }
        }
        for o in &self.overrides {
            if !name_ok(o) {
                return Err(format!("install plan: bad override name {o:?}"));
            }
        }
        for s in &self.scripts {
            if !name_ok(&s.name) {
                return Err(format!("install plan: bad script name {:?}", s.name));
            }
        }
        if let Some(r) = &self.relay {
            if let Some(l) = &r.listen {
                if !host_port_ok(l) {
                    return Err(format!("install plan: bad relay listen address {l:?}"));
                }
            }
            if r.upstreams.len() > MAX_UPSTREAMS {
                return Err(format!(
                    "install plan: {} relay upstreams (at most {MAX_UPSTREAMS})",
                    r.upstreams.len()
                ));
            }
            for u in &r.upstreams {
                let ok = u
                    .split_once('@')
                    .is_some_and(|(n, a)| name_ok(n) && host_port_ok(a));
                if !ok {
                    return Err(format!(
                        "install plan: bad relay upstream {u:?} (NAME@HOST:PORT)"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_checks_names() {
        let p = InstallPlan {
            node: "n01".into(),
            image: "deb".into(),
            hostname: Some("n01".into()),
            overrides: vec!["global".into(), "compute".into(), "n01".into()],
            scripts: vec![Script {
                stage: ScriptStage::Post,
                name: "10all.puppet".into(),
                body: "#!/bin/sh\n".into(),
            }],
            ..Default::default()
        };
        let t = toml::to_string(&p).unwrap();
        assert_eq!(toml::from_str::<InstallPlan>(&t).unwrap(), p);
        p.check().unwrap();
        let mut bad = p.clone();
        bad.overrides.push("../etc".into());
        assert!(bad.check().unwrap_err().contains("override"));
        assert_eq!("kexec".parse::<PostAction>(), Ok(PostAction::Kexec));
        assert!("halt".parse::<PostAction>().is_err());
    }

    /// A plan written before waves (no relay section) still decodes, to no relay; a plan
    /// with one round-trips, and its addresses are checked.
    #[test]
    fn relay_sections_are_optional_and_checked() {
        let old = "node = \"n01\"\nimage = \"deb\"\nversion = 3\npost = \"reboot\"\n\n[network]\n";
        let p: InstallPlan = toml::from_str(old).unwrap();
        assert_eq!(p.relay, None);
        p.check().unwrap();
        // Without a relay section nothing new is written: an older installer reads it.
        assert!(!toml::to_string(&p).unwrap().contains("relay"));
        let mut p = p;
        p.relay = Some(Relay {
            listen: Some("10.213.5.12:7812".into()),
            upstreams: vec!["n02@10.213.5.11:7812".into(), "n01@10.213.5.10:7812".into()],
            ..Default::default()
        });
        let t = toml::to_string(&p).unwrap();
        assert!(t.contains("[relay]"), "{t}");
        assert_eq!(toml::from_str::<InstallPlan>(&t).unwrap(), p);
        p.check().unwrap();
        // An empty section (the last of a chain with no upstreams is impossible, but a hand
        // written one) decodes too.
        let e: InstallPlan = toml::from_str(&format!("{old}\n[relay]\n")).unwrap();
        assert_eq!(e.relay, Some(Relay::default()));
        for bad in [
            "n02@10.213.5.11",
            "10.213.5.11:7812",
            "../x@10.213.5.11:7812",
            "n02@10.213.5.11:0",
            "n02@10.213.5.11:99999",
            "n02@a b:7812",
        ] {
            let mut b = p.clone();
            b.relay.as_mut().unwrap().upstreams = vec![bad.into()];
            assert!(b.check().unwrap_err().contains("relay upstream"), "{bad}");
        }
        let mut b = p.clone();
        b.relay.as_mut().unwrap().listen = Some("0.0.0.0".into());
        assert!(b.check().unwrap_err().contains("listen"));
        // Unknown keys in the section are refused, as everywhere in the plan.
        assert!(
            toml::from_str::<InstallPlan>(&format!("{old}\n[relay]\nlisen = \"x:1\"\n")).is_err()
        );
    }
}
