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
}

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
}
