//! si-prepareclient: record this golden node's disk layout and serve its tree to the master.

use anyhow::{Context, Result};
use clap::Parser;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Prepare this node to be captured: record the disk layout, then serve the tree to the named
/// master only, once, with a one-time token (printed), and exit.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The master allowed to capture (IP address).
    #[arg(long)]
    master: IpAddr,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7810")]
    listen: SocketAddr,
    /// Root of the tree to serve.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Use this token instead of a random one.
    #[arg(long)]
    token: Option<String>,
    /// Use this disk layout file instead of detecting the layout.
    #[arg(long, conflicts_with = "no_layout")]
    layout: Option<PathBuf>,
    /// Record no disk layout.
    #[arg(long)]
    no_layout: bool,
    /// State directory (stat cache).
    #[arg(long, default_value = "/var/lib/si")]
    state_dir: PathBuf,
    /// Give up when no capture arrives within this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
}

fn main() -> Result<()> {
    si_tree::logging::init("info");
    let a = Args::parse();
    let layout = if a.no_layout {
        None
    } else if let Some(p) = &a.layout {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        si_proto::layout::Layout::parse(&text).map_err(anyhow::Error::msg)?;
        Some(text)
    } else {
        Some(
            si_agent::layout::detect(&a.root)
                .context("detecting the disk layout (or pass --layout FILE / --no-layout)")?
                .to_toml(),
        )
    };
    let token = match a.token {
        Some(t) => t,
        None => si_proto::handshake::new_token().context("making a token")?,
    };
    println!("token: {token}");
    println!(
        "serving {} on {} to {} (timeout {}s)",
        a.root.display(),
        a.listen,
        a.master,
        a.timeout
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    let cfg = si_agent::golden::ServeConfig {
        listen: a.listen,
        master: a.master,
        token,
        root: a.root,
        layout,
        state_dir: a.state_dir,
        timeout: Duration::from_secs(a.timeout),
    };
    let st = si_agent::golden::serve_once(&cfg)?;
    println!(
        "captured: {} entries, {} files, read {} files ({} bytes), sent {} objects ({} bytes)",
        st.entries, st.files, st.files_read, st.bytes_read, st.blobs_sent, st.bytes_sent
    );
    Ok(())
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    Args::command().debug_assert();
}
