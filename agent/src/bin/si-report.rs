//! si-report: tell si-server how an install or update of this node went (the installer calls
//! it; `installed` flips the node's boot action to local boot).
use anyhow::Result;
use clap::Parser;
use std::time::Duration;

#[derive(Parser)]
#[command(version, about = "Report a node's install/update state to si-server")]
struct Args {
    /// The si-server (HOST or HOST:PORT).
    #[arg(long)]
    server: String,
    /// Node name as the inventory knows it.
    #[arg(long)]
    node: String,
    /// State: installing, installed, failed, updated...
    #[arg(long)]
    state: String,
    #[arg(long, default_value = "")]
    detail: String,
    #[command(flatten)]
    trust: si_agent::pull::TrustArgs,
}

fn main() -> Result<()> {
    si_tree::logging::init("warn");
    let a = Args::parse();
    let mut c =
        si_agent::pull::Client::connect(&a.server, Duration::from_secs(10), &a.trust.connector()?)?;
    c.report(&a.node, &a.state, &a.detail)?;
    c.bye();
    Ok(())
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    Args::command().debug_assert();
}
