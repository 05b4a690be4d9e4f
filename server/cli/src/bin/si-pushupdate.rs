//! si-pushupdate: update many nodes at once.
use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// Push an image version to nodes (through their si-agentd, or over ssh), in parallel.
#[derive(Parser)]
#[command(disable_version_flag = true)]
struct Args {
    /// Nodes: names, addresses, ranges (node[01-16]) and comma lists.
    nodes: Vec<String>,
    /// Read more nodes from a file (one a line; a pushupdate.failed file works).
    #[arg(long)]
    nodes_file: Option<PathBuf>,
    /// The si-server address as the nodes reach it.
    #[arg(long)]
    server: String,
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    version: Option<u32>,
    #[arg(long)]
    verify: bool,
    #[arg(long)]
    force: bool,
    #[arg(long, short = 'n')]
    dry_run: bool,
    /// Nodes updated at once.
    #[arg(long, default_value_t = 32)]
    fanout: usize,
    /// Per-node timeout in seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// si-agentd port on the nodes.
    #[arg(long, default_value_t = 7812)]
    port: u16,
    #[arg(long, default_value = "/etc/si/agent.token")]
    token_file: PathBuf,
    /// Reach the nodes over ssh instead of their si-agentd: each runs si-updateclient.
    #[arg(long)]
    ssh: bool,
    /// The ssh command and its options (with --ssh), like rsync's -e.
    #[arg(long, default_value = "ssh", requires = "ssh")]
    ssh_command: String,
    /// What runs on the node (with --ssh); `{node}` becomes the node's name.
    #[arg(long, default_value = "si-updateclient", requires = "ssh")]
    remote_command: String,
    /// Where pushupdate.ok and pushupdate.failed are written.
    #[arg(long, default_value = ".")]
    results: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    si_tree::logging::init("info");
    let a = Args::parse();
    let mut nodes = Vec::new();
    for n in &a.nodes {
        nodes.extend(si_inventory::ranges::expand(n)?);
    }
    if let Some(f) = &a.nodes_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for l in text.lines().filter_map(|l| l.split_whitespace().next()) {
            nodes.extend(si_inventory::ranges::expand(l)?);
        }
    }
    if nodes.is_empty() {
        bail!("no nodes given");
    }
    let (token, via) = if a.ssh {
        let via = si_imageserver::push::Via::Ssh {
            ssh: a.ssh_command,
            remote: a.remote_command,
        };
        (String::new(), via)
    } else {
        let token = std::fs::read_to_string(&a.token_file)
            .with_context(|| format!("reading {}", a.token_file.display()))?;
        (token, si_imageserver::push::Via::Agent)
    };
    let cfg = si_imageserver::push::PushConfig {
        server: a.server,
        image: a.image,
        version: a.version,
        verify: a.verify,
        force: a.force,
        dry_run: a.dry_run,
        token: token.trim().to_string(),
        port: a.port,
        fanout: a.fanout,
        timeout: Duration::from_secs(a.timeout),
        results_dir: Some(a.results.clone()),
        via,
    };
    let results = si_imageserver::push::push(&nodes, &cfg).await;
    si_imageserver::push::report(&results, Some(&a.results))?;
    if results.iter().any(|r| !r.ok) {
        std::process::exit(1);
    }
    Ok(())
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    Args::command().debug_assert();
}
