//! si-reinstall NODES
use clap::Parser;
use si_bmc::cli::{self, Common};
use std::process::ExitCode;

/// Reinstall nodes: PXE next boot, boot action "install" (or "autoinstall"), power cycle (or on).
#[derive(Parser)]
#[command(name = "si-reinstall")]
struct Opt {
    #[command(flatten)]
    common: Common,
    /// install: deploy the node's image; autoinstall: run its distribution's installer with
    /// the node's profile (si-profile).
    #[arg(long, default_value = "install", value_parser = ["install", "autoinstall"])]
    action: String,
}

fn main() -> anyhow::Result<ExitCode> {
    let o = Opt::parse();
    cli::reinstall(&o.common, &o.action)
}
