//! si-inventory NODES
use clap::Parser;
use si_bmc::cli::{self, Common};
use std::process::ExitCode;

/// Vendor, product and serial numbers of nodes (FRU).
#[derive(Parser)]
#[command(name = "si-inventory")]
struct Opt {
    #[command(flatten)]
    common: Common,
}

fn main() -> anyhow::Result<ExitCode> {
    cli::inventory(&Opt::parse().common)
}
