//! DHCP service configuration: one struct that is both the command line of `si-dhcpd` and the
//! `[dhcp]` TOML section the integrator may embed in the server configuration.

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Whether si hands out addresses or only boot information.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A full DHCP server: addresses (static, pool, permanent) and boot information.
    #[default]
    Full,
    /// ProxyDHCP (PXE spec, RFC 4578): another server gives addresses; si answers PXE clients
    /// on ports 67 and 4011 with boot information only.
    Proxy,
}

/// What to do with machines whose MAC is not in the inventory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownPolicy {
    /// Stay silent.
    #[default]
    Ignore,
    /// Give a pool address and boot the discovery/registration script.
    Discover,
}

/// Boot file names and URLs. Placeholders: `{http}` (the HTTP base URL), `{server}` (the
/// server's IPv4 address), `{mac}` (the client MAC as `52-54-00-00-00-01`), `{name}` (node
/// name, `unknown` for unknown machines).
#[derive(Args, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct BootFiles {
    /// BIOS PXE ROMs (option 93 = 0), fetched by TFTP (undionly.kpxe or pxelinux.0).
    #[arg(long = "boot-bios", default_value = "undionly.kpxe")]
    pub bios: String,
    /// UEFI x64 PXE (option 93 = 7 or 9), fetched by TFTP (ipxe.efi or grubx64.efi).
    #[arg(long = "boot-uefi", default_value = "ipxe.efi")]
    pub uefi_x64: String,
    /// UEFI ARM64 PXE (option 93 = 11), fetched by TFTP.
    #[arg(long = "boot-uefi-arm64", default_value = "ipxe-arm64.efi")]
    pub uefi_arm64: String,
    /// UEFI HTTP boot (vendor class HTTPClient, option 93 = 16): a URL to one EFI file.
    #[arg(long = "boot-uefi-http", default_value = "{http}/ipxe.efi")]
    pub uefi_http: String,
    /// What iPXE (user class "iPXE") gets for a known node: its script URL.
    #[arg(long = "boot-ipxe-script", default_value = "{http}/boot/{mac}.ipxe")]
    pub ipxe_script: String,
    /// What iPXE gets for an unknown machine (with --unknown discover).
    #[arg(
        long = "boot-discovery-script",
        default_value = "{http}/boot/discovery.ipxe"
    )]
    pub discovery_script: String,
}

impl Default for BootFiles {
    fn default() -> Self {
        BootFiles {
            bios: "undionly.kpxe".into(),
            uefi_x64: "ipxe.efi".into(),
            uefi_arm64: "ipxe-arm64.efi".into(),
            uefi_http: "{http}/ipxe.efi".into(),
            ipxe_script: "{http}/boot/{mac}.ipxe".into(),
            discovery_script: "{http}/boot/discovery.ipxe".into(),
        }
    }
}

#[derive(Args, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DhcpConfig {
    /// The one interface to serve (SO_BINDTODEVICE); never all interfaces.
    #[arg(long)]
    pub interface: String,
    /// Our address on that interface (server identifier); found on the interface if absent.
    #[arg(long)]
    #[serde(default)]
    pub server_ip: Option<Ipv4Addr>,
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    #[serde(default)]
    pub mode: Mode,
    #[arg(long, value_enum, default_value_t = UnknownPolicy::Ignore)]
    #[serde(default)]
    pub unknown: UnknownPolicy,
    /// TFTP server for boot files (siaddr, option 66); default: server-ip.
    #[arg(long)]
    #[serde(default)]
    pub next_server: Option<Ipv4Addr>,
    /// Base of boot URLs, e.g. http://10.213.0.1:8080; default: http://<server-ip>.
    #[arg(long)]
    #[serde(default)]
    pub http_base: Option<String>,
    /// Seconds an offered address is held for the client before it is free again.
    #[arg(long, default_value_t = 30)]
    #[serde(default = "default_offer_hold")]
    pub offer_hold: u32,
    /// Server port (67; change only for tests).
    #[arg(long, default_value_t = 67)]
    #[serde(default = "default_port")]
    pub port: u16,
    /// Client port (68; change only for tests).
    #[arg(long, default_value_t = 68)]
    #[serde(default = "default_client_port")]
    pub client_port: u16,
    /// PXE boot server port for ProxyDHCP requests (4011).
    #[arg(long, default_value_t = 4011)]
    #[serde(default = "default_proxy_port")]
    pub proxy_port: u16,
    #[command(flatten)]
    #[serde(default)]
    pub boot: BootFiles,
}

fn default_offer_hold() -> u32 {
    30
}
fn default_port() -> u16 {
    67
}
fn default_client_port() -> u16 {
    68
}
fn default_proxy_port() -> u16 {
    4011
}

impl DhcpConfig {
    /// A configuration with defaults for `interface`.
    pub fn new(interface: &str) -> DhcpConfig {
        DhcpConfig {
            interface: interface.into(),
            server_ip: None,
            mode: Mode::Full,
            unknown: UnknownPolicy::Ignore,
            next_server: None,
            http_base: None,
            offer_hold: default_offer_hold(),
            port: default_port(),
            client_port: default_client_port(),
            proxy_port: default_proxy_port(),
            boot: BootFiles::default(),
        }
    }
}
