//! `si-dhcpd`: only the DHCP/ProxyDHCP service (tests, or sites that run it apart). The server
//! proper starts the same service with `si_boot::dhcp::serve`.
use anyhow::Context;
use clap::Parser;
use si_boot::dhcp::{self, DhcpConfig};
use si_inventory::Inventory;
use std::path::PathBuf;
use std::sync::Arc;

/// Run only the si DHCP / ProxyDHCP service, on one interface, from the inventory.
#[derive(Parser, Debug)]
#[command(name = "si-dhcpd", version, long_about = None)]
struct Cli {
    /// Server state directory holding inventory.db.
    #[arg(long, env = "SI_STATE_DIR", default_value = "/var/lib/si")]
    state_dir: PathBuf,
    #[command(flatten)]
    dhcp: DhcpConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    si_tree::logging::init("info");
    let cli = Cli::parse();
    let inv = Arc::new(Inventory::open_state_dir(&cli.state_dir)?.with_actor("si-dhcpd"));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    dhcp::serve(cli.dhcp, inv, shutdown).await
}
