//! si-agentd: the node's push service (si-pushupdate talks to it).
use anyhow::{Context, Result};
use clap::Parser;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// Accept update pushes from the master: run si-updateclient's update on request.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[arg(long, default_value = "0.0.0.0:7812")]
    listen: SocketAddr,
    /// Master addresses allowed to push (repeatable; default: any, token still required).
    #[arg(long)]
    master: Vec<IpAddr>,
    /// File holding the shared push token.
    #[arg(long, default_value = "/etc/si/agent.token")]
    token_file: PathBuf,
    #[arg(long, default_value = "/")]
    root: PathBuf,
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

fn main() -> Result<()> {
    si_tree::logging::init("info");
    let a = Args::parse();
    let token = std::fs::read_to_string(&a.token_file)
        .with_context(|| format!("reading {}", a.token_file.display()))?;
    si_agent::agentd::serve(si_agent::agentd::AgentConfig {
        listen: a.listen,
        masters: a.master,
        token: token.trim().to_string(),
        root: a.root,
        state_dir: a.state_dir,
    })
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    Args::command().debug_assert();
}
