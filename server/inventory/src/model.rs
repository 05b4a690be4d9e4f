//! The records of the inventory, shared by the database, the CLI and `cluster.toml`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;

/// What a node does at its next network boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", tag = "action", deny_unknown_fields)]
pub enum BootAction {
    /// Boot the installer and image the node.
    #[default]
    Install,
    /// Boot from the local disk.
    Local,
    /// Boot the distribution's own installer with the node's answer file (its profile's distro,
    /// see `si-profile`).
    Autoinstall,
    /// Boot a given kernel and initrd with a command line.
    Custom {
        kernel: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        initrd: Option<String>,
        #[serde(default)]
        cmdline: String,
    },
}

impl BootAction {
    pub fn kind(&self) -> &'static str {
        match self {
            BootAction::Install => "install",
            BootAction::Local => "local",
            BootAction::Autoinstall => "autoinstall",
            BootAction::Custom { .. } => "custom",
        }
    }
}

impl fmt::Display for BootAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootAction::Custom {
                kernel,
                initrd,
                cmdline,
            } => write!(
                f,
                "custom(kernel={kernel} initrd={} cmdline={cmdline:?})",
                initrd.as_deref().unwrap_or("-")
            ),
            a => f.write_str(a.kind()),
        }
    }
}

/// Boot firmware of a hardware profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    /// Whatever the machine announces in DHCP option 93.
    #[default]
    Auto,
    Bios,
    Uefi,
}

impl Firmware {
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Auto => "auto",
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }
    pub fn parse(s: &str) -> Result<Firmware> {
        Ok(match s {
            "auto" => Firmware::Auto,
            "bios" => Firmware::Bios,
            "uefi" => Firmware::Uefi,
            _ => bail!("unknown firmware {s:?} (auto, bios or uefi)"),
        })
    }
}

/// How to reach a baseboard management controller. Fields left empty on a node are taken
/// from its group (see [`Bmc::or`]).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Bmc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Secret: never printed; shown as `***`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// e.g. `ipmi`, `redfish`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher_suite: Option<u8>,
}

/// Shown wherever a password would be.
pub const REDACTED: &str = "***";

impl Bmc {
    /// Fields of `self`, with the empty ones taken from `fallback`.
    pub fn or(&self, fallback: &Bmc) -> Bmc {
        Bmc {
            host: self.host.clone().or_else(|| fallback.host.clone()),
            port: self.port.or(fallback.port),
            user: self.user.clone().or_else(|| fallback.user.clone()),
            password: self.password.clone().or_else(|| fallback.password.clone()),
            driver: self.driver.clone().or_else(|| fallback.driver.clone()),
            cipher_suite: self.cipher_suite.or(fallback.cipher_suite),
        }
    }
    pub fn is_empty(&self) -> bool {
        *self == Bmc::default()
    }
    /// A copy with the password replaced by `***`.
    pub fn redacted(&self) -> Bmc {
        Bmc {
            password: self.password.as_ref().map(|_| REDACTED.to_string()),
            ..self.clone()
        }
    }
}

impl fmt::Debug for Bmc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bmc")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("driver", &self.driver)
            .field("cipher_suite", &self.cipher_suite)
            .finish()
    }
}

/// A hardware profile: service, login, I/O, graphics, compute...
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Group {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Name or path of a disk layout (see `si_proto::layout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_layout: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel_args: String,
    #[serde(default)]
    pub firmware: Firmware,
    #[serde(default, skip_serializing_if = "Bmc::is_empty")]
    pub bmc: Bmc,
    /// Automatic-install profile of the group's nodes (`si-profile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

/// One machine of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Node {
    pub name: String,
    /// Normalised `aa:bb:cc:dd:ee:ff`.
    #[serde(default)]
    pub macs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Overrides the group's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub boot: BootAction,
    /// Free text: `new`, `installing`, `installed`, `failed`...
    #[serde(default = "default_state")]
    pub state: String,
    /// DHCP lease never expires.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permanent: bool,
    #[serde(default, skip_serializing_if = "Bmc::is_empty")]
    pub bmc: Bmc,
    /// Automatic-install profile; overrides the group's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Rack label (nodes of a rack share a top-of-rack switch): install waves chain a rack's
    /// nodes together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rack: Option<String>,
    /// Switch label, for nodes whose rack is not recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<String>,
}

fn default_state() -> String {
    "new".into()
}

/// A configured IPv4 subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Subnet {
    pub name: String,
    pub network: Ipv4Addr,
    pub prefix: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// First and last address of the dynamic pool (none: only static nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_start: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_end: Option<Ipv4Addr>,
    /// Seconds.
    #[serde(default = "default_lease_time")]
    pub lease_time: u32,
    /// Leases from this subnet never expire.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permanent: bool,
}

fn default_lease_time() -> u32 {
    3600
}

impl Subnet {
    pub fn mask(&self) -> Ipv4Addr {
        prefix_mask(self.prefix)
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let m = u32::from(self.mask());
        u32::from(ip) & m == u32::from(self.network) & m
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !u32::from(self.mask()))
    }
    pub fn in_pool(&self, ip: Ipv4Addr) -> bool {
        match (self.pool_start, self.pool_end) {
            (Some(a), Some(b)) => (u32::from(a)..=u32::from(b)).contains(&u32::from(ip)),
            _ => false,
        }
    }
    pub fn validate(&self) -> Result<()> {
        crate::ranges::check_name(&self.name)?;
        if self.prefix > 32 {
            bail!("prefix /{} is longer than 32", self.prefix);
        }
        match (self.pool_start, self.pool_end) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                if u32::from(a) > u32::from(b) {
                    bail!("pool {a}-{b} runs backwards");
                }
                if !self.contains(a) || !self.contains(b) {
                    bail!(
                        "pool {a}-{b} is not inside {}/{}",
                        self.network,
                        self.prefix
                    );
                }
            }
            _ => bail!("a pool needs both a start and an end"),
        }
        if self.lease_time == 0 {
            bail!("lease time must be at least 1 second");
        }
        Ok(())
    }
}

pub fn prefix_mask(prefix: u8) -> Ipv4Addr {
    if prefix == 0 {
        Ipv4Addr::UNSPECIFIED
    } else {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix.min(32))))
    }
}

/// Parses `10.213.0.0/16`.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8)> {
    let (a, p) = s
        .split_once('/')
        .with_context(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
    let a: Ipv4Addr = a
        .parse()
        .with_context(|| format!("parsing address {a:?}"))?;
    let p: u8 = p.parse().with_context(|| format!("parsing prefix {p:?}"))?;
    if p > 32 {
        bail!("prefix /{p} is longer than 32");
    }
    Ok((a, p))
}

/// A DHCP lease. Its serde form (bincode) is part of the lease journal's record format
/// (`leasebook.rs`, `FORMAT`): a change to these fields is a new journal format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub mac: String,
    pub ip: Ipv4Addr,
    /// Unix seconds; `None` is a permanent lease.
    pub expires: Option<i64>,
    /// `offered`, `bound`, `released`, `declined`.
    pub state: String,
    pub hostname: Option<String>,
}

/// One recorded change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub id: i64,
    /// UTC, `YYYY-MM-DD HH:MM:SS`.
    pub at: String,
    pub actor: String,
    pub object: String,
    pub action: String,
    pub detail: String,
}

/// What the boot services need to know about a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootInfo {
    pub name: String,
    pub hostname: String,
    pub macs: Vec<String>,
    pub ip: Option<Ipv4Addr>,
    /// Node image, else its group's.
    pub image: Option<String>,
    pub group: Option<String>,
    pub action: BootAction,
    /// The group's kernel arguments.
    pub kernel_args: String,
    pub disk_layout: Option<String>,
    pub firmware: Firmware,
    pub state: String,
    /// Node profile, else its group's.
    pub profile: Option<String>,
    /// The node's topology labels.
    pub rack: Option<String>,
    pub switch: Option<String>,
}

/// The whole cluster as declarative TOML (`si-node export` / `si-node import`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    #[serde(default, rename = "subnet")]
    pub subnets: Vec<Subnet>,
    #[serde(default, rename = "group")]
    pub groups: Vec<Group>,
    #[serde(default, rename = "node")]
    pub nodes: Vec<Node>,
}

/// Normalises a MAC address to lowercase `aa:bb:cc:dd:ee:ff` (accepts `:` or `-`).
pub fn normalize_mac(s: &str) -> Result<String> {
    Ok(format_mac(&parse_mac(s)?))
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.trim().split([':', '-']).collect();
    if parts.len() != 6 {
        bail!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)");
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            bail!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)");
        }
        m[i] = u8::from_str_radix(p, 16).with_context(|| format!("{s:?} is not a MAC address"))?;
    }
    Ok(m)
}

pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// `mac + n` as a 48-bit number.
pub fn mac_add(mac: &str, n: u64) -> Result<String> {
    let m = parse_mac(mac)?;
    let mut v = 0u64;
    for b in m {
        v = (v << 8) | u64::from(b);
    }
    let v = v
        .checked_add(n)
        .filter(|v| *v < (1u64 << 48))
        .with_context(|| format!("{mac} + {n} overflows"))?;
    let b = v.to_be_bytes();
    Ok(format_mac(&[b[2], b[3], b[4], b[5], b[6], b[7]]))
}

/// `ip + n`.
pub fn ip_add(ip: Ipv4Addr, n: u32) -> Result<Ipv4Addr> {
    u32::from(ip)
        .checked_add(n)
        .map(Ipv4Addr::from)
        .with_context(|| format!("{ip} + {n} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            normalize_mac("52-54-00-AA-bb-0F").unwrap(),
            "52:54:00:aa:bb:0f"
        );
        assert!(normalize_mac("52:54:00:aa:bb").is_err());
        assert!(normalize_mac("52:54:00:aa:bb:zz").is_err());
        assert_eq!(
            mac_add("52:54:00:00:00:ff", 1).unwrap(),
            "52:54:00:00:01:00"
        );
        assert!(mac_add("ff:ff:ff:ff:ff:ff", 1).is_err());
    }

    #[test]
    fn subnet_math() {
        let s = Subnet {
            name: "s".into(),
            network: "10.213.0.0".parse().unwrap(),
            prefix: 16,
            router: None,
            dns: vec![],
            domain: None,
            pool_start: Some("10.213.1.1".parse().unwrap()),
            pool_end: Some("10.213.1.9".parse().unwrap()),
            lease_time: 60,
            permanent: false,
        };
        s.validate().unwrap();
        assert!(s.contains("10.213.200.1".parse().unwrap()));
        assert!(!s.contains("10.214.0.1".parse().unwrap()));
        assert_eq!(s.mask(), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 213, 255, 255));
        assert!(s.in_pool("10.213.1.9".parse().unwrap()));
        assert_eq!(prefix_mask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(prefix_mask(32), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn bmc_debug_hides_password() {
        let b = Bmc {
            password: Some("hunter2".into()),
            ..Default::default()
        };
        assert!(!format!("{b:?}").contains("hunter2"));
    }
}
