//! si-reinstall NODES
use clap::Parser;
use si_bmc::cli::{self, Common};
use std::process::ExitCode;

/// Reinstall nodes: PXE next boot, boot action "install", power cycle (or on).
#[derive(Parser)]
#[command(name = "si-reinstall")]
struct Opt {
    #[command(flatten)]
    common: Common,
}

fn main() -> anyhow::Result<ExitCode> {
    cli::reinstall(&Opt::parse().common)
}
