//! si-bootd: the TFTP and HTTP boot services alone (for tests; si-server runs them too, with
//! the same wiring: `si_server::daemon::FileServices` and `until_signal`).

use anyhow::{bail, Context, Result};
use clap::Parser;
use si_boot::bootcfg::{self, BootAction, BootSettings, Generated};
use si_boot::{http, tftp};
use si_server::daemon::{self, FileServices};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(about = "Serve si's boot files over TFTP and HTTP")]
struct Args {
    /// Directory served over TFTP.
    #[arg(long)]
    tftp_root: PathBuf,
    /// Directory served over HTTP (defaults to the TFTP root).
    #[arg(long)]
    http_root: Option<PathBuf>,
    #[arg(long, default_value = "0.0.0.0:69")]
    tftp_listen: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:80")]
    http_listen: SocketAddr,
    /// Nodes (TOML, `[[node]]` tables) to generate boot configurations for.
    #[arg(long)]
    nodes: Option<PathBuf>,
    /// Base URL of the HTTP server as clients reach it (for iPXE scripts).
    #[arg(long)]
    http_base: Option<String>,
    /// `si.server=` value on installer command lines.
    #[arg(long, default_value = "")]
    si_server: String,
    #[arg(long, default_value = "si/vmlinuz")]
    installer_kernel: String,
    #[arg(long, default_value = "si/initrd.img")]
    installer_initrd: String,
    #[arg(long, default_value_t = 256)]
    max_transfers: usize,
    /// Largest TFTP window granted.
    #[arg(long, default_value_t = 64)]
    max_windowsize: u16,
    #[command(flatten)]
    generate: bootcfg::GenerateConfig,
}

async fn run(a: Args) -> Result<()> {
    // Scripts name an address the clients reach: a wildcard listen address is none.
    let http_base = match a.http_base {
        Some(b) => b.trim_end_matches('/').to_string(),
        None if a.http_listen.ip().is_unspecified() => bail!(
            "--http-listen {} names no address clients can reach: give --http-base",
            a.http_listen
        ),
        None => format!("http://{}", a.http_listen),
    };
    let settings = BootSettings {
        http_base,
        si_server: a.si_server,
        installer_kernel: a.installer_kernel,
        installer_initrd: a.installer_initrd,
        default_action: BootAction::Local,
    };
    let nodes = match &a.nodes {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            bootcfg::parse_nodes(&text).with_context(|| format!("reading {}", p.display()))?
        }
        None => Vec::new(),
    };
    let generated = Generated::with_config(a.generate, bootcfg::render(&settings, &nodes)?);
    daemon::log_shared(&generated, &a.tftp_root);

    let files = FileServices {
        tftp: Some((
            a.tftp_listen,
            tftp::TftpConfig {
                root: a.tftp_root.clone(),
                max_transfers: a.max_transfers,
                max_windowsize: a.max_windowsize,
                ..Default::default()
            },
        )),
        http: Some((
            a.http_listen,
            http::HttpConfig {
                root: a.http_root.unwrap_or(a.tftp_root),
                ..Default::default()
            },
        )),
    };
    let (stop_tx, stopped) = daemon::stop_signal();
    let mut tasks = daemon::Services::new();
    files.spawn(&mut tasks, &generated, &stopped).await?;
    daemon::until_signal(tasks, stop_tx).await
}

#[tokio::main]
async fn main() -> Result<()> {
    si_tree::logging::init("info");
    run(Args::parse()).await
}
