//! si-sensors NODES
use clap::Parser;
use si_bmc::cli::{self, Common};
use std::process::ExitCode;

/// Temperatures, voltages and fans of nodes, with thresholds and status.
#[derive(Parser)]
#[command(name = "si-sensors")]
struct Opt {
    #[command(flatten)]
    common: Common,
}

fn main() -> anyhow::Result<ExitCode> {
    cli::sensors(&Opt::parse().common)
}
