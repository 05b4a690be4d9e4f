//! si-sel NODES [--clear]
use clap::Parser;
use si_bmc::cli::{self, Common};
use std::process::ExitCode;

/// Read (or clear) the System Event Log of nodes.
#[derive(Parser)]
#[command(name = "si-sel")]
struct Opt {
    #[command(flatten)]
    common: Common,
    /// Clear the log instead of reading it.
    #[arg(long)]
    clear: bool,
}

fn main() -> anyhow::Result<ExitCode> {
    let o = Opt::parse();
    cli::sel(o.clear, &o.common)
}
