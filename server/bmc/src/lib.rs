//! Out-of-band control of nodes through their BMCs.
//!
//! One interface, [`Bmc`], with three drivers behind it (chosen per node by [`Driver`]):
//! - [`Driver::Ipmi`]: IPMI 2.0 over LAN (RMCP+) in Rust ([`rmcp`], [`ipmi`]), cipher suites 3 and 17;
//! - [`Driver::Ipmitool`]: the same IPMI commands sent through `ipmitool -I lanplus raw`, for
//!   BMCs whose quirks ipmitool already knows ([`ipmitool`]);
//! - [`Driver::Redfish`]: HTTP/JSON ([`redfish`]).
//!
//! Where BMCs come from is the [`directory::BmcDirectory`] trait (a TOML file today).
//! [`run`] fans work out over many nodes with a bound on parallelism and a per-node deadline;
//! [`cli`] holds what the `si-power`, `si-bootdev`, `si-sel`, `si-sensors`, `si-inventory` and
//! `si-reinstall` binaries do.

pub mod cli;
pub mod directory;
#[cfg(test)]
mod fakebmc;
pub mod invdir;
pub mod ipmi;
pub mod ipmitool;
pub mod redfish;
pub mod rmcp;
pub mod run;
pub mod sol;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Instant;

/// Which driver talks to a node's BMC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// Native IPMI 2.0 / RMCP+.
    #[default]
    Ipmi,
    /// `ipmitool -I lanplus`.
    Ipmitool,
    /// Redfish over HTTP(S).
    Redfish,
}

/// How the Redfish driver protects its connection (the BMC password travels in it).
///
/// Written in a BMC directory or on the command line as `verify` (the default: HTTPS, the
/// certificate checked against the system's CAs, or `SI_REDFISH_CACERT`), `ca:/path/ca.pem`,
/// `pin:sha256//BASE64` (HTTPS, the BMC's public key pinned, as `curl --pinnedpubkey` takes
/// it), `insecure-skip-verify` (HTTPS, nothing checked: lab BMCs, warned on every use) or
/// `plain-http` (no TLS at all, warned on every use).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RedfishTls {
    #[default]
    Verify,
    Ca(std::path::PathBuf),
    Pin(String),
    InsecureSkipVerify,
    PlainHttp,
}

impl std::str::FromStr for RedfishTls {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<RedfishTls> {
        Ok(match s {
            "verify" => RedfishTls::Verify,
            "insecure-skip-verify" => RedfishTls::InsecureSkipVerify,
            "plain-http" => RedfishTls::PlainHttp,
            _ => {
                if let Some(p) = s.strip_prefix("ca:").filter(|p| !p.is_empty()) {
                    RedfishTls::Ca(p.into())
                } else if let Some(k) = s.strip_prefix("pin:") {
                    let b64 = k.strip_prefix("sha256//").unwrap_or("");
                    anyhow::ensure!(
                        b64.len() == 44
                            && b64.bytes().all(|c| c.is_ascii_alphanumeric() || b"+/=".contains(&c)),
                        "a Redfish pin is pin:sha256//BASE64 (44 characters of the BMC public key's SHA-256)"
                    );
                    RedfishTls::Pin(k.to_string())
                } else {
                    anyhow::bail!(
                        "unknown Redfish TLS setting {s:?} (verify, ca:PATH, pin:sha256//BASE64, insecure-skip-verify, plain-http)"
                    )
                }
            }
        })
    }
}

impl TryFrom<String> for RedfishTls {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<RedfishTls> {
        s.parse()
    }
}

impl From<RedfishTls> for String {
    fn from(t: RedfishTls) -> String {
        t.to_string()
    }
}

impl fmt::Display for RedfishTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedfishTls::Verify => f.write_str("verify"),
            RedfishTls::Ca(p) => write!(f, "ca:{}", p.display()),
            RedfishTls::Pin(k) => write!(f, "pin:{k}"),
            RedfishTls::InsecureSkipVerify => f.write_str("insecure-skip-verify"),
            RedfishTls::PlainHttp => f.write_str("plain-http"),
        }
    }
}

/// How to reach one node's BMC.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct BmcTarget {
    pub node: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Never printed: `Debug` redacts it and it is not serialized.
    #[serde(skip)]
    pub password: String,
    pub driver: Driver,
    pub cipher_suite: u8,
    /// Redfish only.
    #[serde(default)]
    pub redfish_tls: RedfishTls,
}

impl fmt::Debug for BmcTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BmcTarget")
            .field("node", &self.node)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("driver", &self.driver)
            .field("cipher_suite", &self.cipher_suite)
            .field("redfish_tls", &self.redfish_tls)
            .finish()
    }
}

/// Chassis power requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    On,
    /// Hard power off.
    Off,
    /// ACPI soft shutdown.
    Soft,
    Cycle,
    /// Hard reset.
    Reset,
}

impl PowerAction {
    pub fn name(self) -> &'static str {
        match self {
            PowerAction::On => "on",
            PowerAction::Off => "off",
            PowerAction::Soft => "soft",
            PowerAction::Cycle => "cycle",
            PowerAction::Reset => "reset",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    Pxe,
    Disk,
    Bios,
}

impl BootDevice {
    pub fn name(self) -> &'static str {
        match self {
            BootDevice::Pxe => "pxe",
            BootDevice::Disk => "disk",
            BootDevice::Bios => "bios",
        }
    }
}

/// One decoded System Event Log entry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SelEntry {
    pub id: u16,
    pub record_type: u8,
    /// Seconds since the epoch as the BMC stamped it (None for OEM records without one).
    pub timestamp: Option<u32>,
    /// `YYYY-MM-DD HH:MM:SS` UTC, or "pre-init +Ns" for timestamps before the clock was set.
    pub time: String,
    pub sensor_type: String,
    pub sensor_number: u8,
    pub assertion: bool,
    pub description: String,
    pub raw: Vec<u8>,
}

/// One sensor, converted to engineering units where it is analog.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SensorReading {
    pub name: String,
    pub number: u8,
    pub sensor_type: String,
    pub value: Option<f64>,
    pub unit: String,
    /// "ok", "nc" (non-critical), "cr" (critical), "nr" (non-recoverable), "na" (no reading),
    /// or for discrete sensors the asserted state bits as `0x....`.
    pub status: String,
    pub lower_non_recoverable: Option<f64>,
    pub lower_critical: Option<f64>,
    pub lower_non_critical: Option<f64>,
    pub upper_non_critical: Option<f64>,
    pub upper_critical: Option<f64>,
    pub upper_non_recoverable: Option<f64>,
}

/// FRU identity of a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Inventory {
    pub board_manufacturer: Option<String>,
    pub board_product: Option<String>,
    pub board_serial: Option<String>,
    pub board_part_number: Option<String>,
    pub product_manufacturer: Option<String>,
    pub product_name: Option<String>,
    pub product_part_number: Option<String>,
    pub product_version: Option<String>,
    pub product_serial: Option<String>,
    pub product_asset_tag: Option<String>,
    pub chassis_part_number: Option<String>,
    pub chassis_serial: Option<String>,
}

/// A connection to one BMC. Every call honours the deadline given to [`connect`].
pub trait Bmc: Send {
    fn power_status(&mut self) -> Result<PowerState>;
    fn power(&mut self, action: PowerAction) -> Result<()>;
    /// Next boot from `dev`; with `persistent`, every boot.
    fn set_boot_device(&mut self, dev: BootDevice, persistent: bool) -> Result<()>;
    fn sel(&mut self) -> Result<Vec<SelEntry>>;
    fn clear_sel(&mut self) -> Result<()>;
    fn sensors(&mut self) -> Result<Vec<SensorReading>>;
    fn inventory(&mut self) -> Result<Inventory>;
    /// Ends the session cleanly (best effort for drivers without sessions).
    fn close(self: Box<Self>) -> Result<()>;
}

/// Connects to `target` with the driver it names; all work must end by `deadline`.
pub fn connect(target: &BmcTarget, deadline: Instant) -> Result<Box<dyn Bmc>> {
    match target.driver {
        Driver::Ipmi => Ok(Box::new(ipmi::IpmiBmc::new(
            ipmi::NativeTransport::connect(target, deadline)?,
        ))),
        Driver::Ipmitool => Ok(Box::new(ipmi::IpmiBmc::new(
            ipmitool::IpmitoolTransport::new(target, deadline)?,
        ))),
        Driver::Redfish => Ok(Box::new(redfish::RedfishBmc::new(target, deadline)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_password() {
        let t = BmcTarget {
            node: "n1".into(),
            host: "127.0.0.1".into(),
            port: 623,
            user: "admin".into(),
            password: "hunter2".into(),
            driver: Driver::Ipmi,
            cipher_suite: 17,
            redfish_tls: Default::default(),
        };
        let s = format!("{t:?}");
        assert!(!s.contains("hunter2") && s.contains("redacted"), "{s}");
        let j = serde_json::to_string(&t).unwrap();
        assert!(!j.contains("hunter2"), "{j}");
    }
}
