//! si-enroll: enroll this node with the master once (the installer's step, and for a node set
//! up by hand): make a key, present the one-time token, keep key and certificate in
//! IDENTITY_DIR (default /etc/si, never captured into an image).
use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    version,
    about = "Enroll this node with si-server and keep its certificate"
)]
struct Args {
    /// The si-server (HOST or HOST:PORT).
    #[arg(long)]
    server: String,
    /// The master's CA fingerprint (`si-server ca show`).
    #[arg(long, env = "SI_CA_FINGERPRINT")]
    ca_fingerprint: String,
    /// Node name as the inventory knows it.
    #[arg(long)]
    node: String,
    /// The one-time enrollment token (from the node's boot script, or `si-server ca token`).
    #[arg(long, env = "SI_ENROLL_TOKEN", hide_env_values = true)]
    token: String,
    /// The MAC address this node is known by.
    #[arg(long)]
    mac: String,
    /// The SMBIOS UUID (default: /sys/class/dmi/id/product_uuid).
    #[arg(long)]
    uuid: Option<String>,
    #[arg(long, default_value = "/etc/si")]
    identity_dir: PathBuf,
}

fn main() -> Result<()> {
    si_tree::logging::init("warn");
    let a = Args::parse();
    let pin = a
        .ca_fingerprint
        .parse()
        .context("reading --ca-fingerprint")?;
    let uuid = match a.uuid {
        Some(u) => u,
        None => std::fs::read_to_string("/sys/class/dmi/id/product_uuid")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    };
    let id = si_trust::enroll::enroll(&a.server, pin, &a.node, &a.token, &a.mac, &uuid)?;
    id.save(&a.identity_dir)?;
    println!(
        "enrolled {} ({})",
        id.name,
        si_trust::Fingerprint::of(id.cert())
    );
    Ok(())
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    Args::command().debug_assert();
}
