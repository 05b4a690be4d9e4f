//! si-server: the master daemon.
use anyhow::{Context, Result};
use clap::Parser;
use std::net::SocketAddr;
use std::sync::Arc;

/// The si master daemon: serves images to nodes (deploys, updates, installs).
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    store: si_server::imagecmd::StoreArg,
    /// Address of the image service.
    #[arg(long, default_value = "0.0.0.0:7811")]
    listen: SocketAddr,
    /// Most nodes served at once.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let store = Arc::new(a.store.open()?);
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    eprintln!(
        "si-server: serving images from {} on {}",
        a.store.store.display(),
        listener.local_addr()?
    );
    let cfg = si_server::serve::ServeConfig {
        max_connections: a.max_connections,
    };
    si_server::serve::run(listener, store, cfg, None, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    Args::command().debug_assert();
}
