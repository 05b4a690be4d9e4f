//! si-console NODE
use clap::Parser;
use si_bmc::cli::{self, ConsoleArgs};
use std::process::ExitCode;

/// Serial-over-LAN console of one node (IPMI SOL); type `~.` at the start of a line to leave.
#[derive(Parser)]
#[command(name = "si-console")]
struct Opt {
    #[command(flatten)]
    args: ConsoleArgs,
}

fn main() -> anyhow::Result<ExitCode> {
    cli::console(&Opt::parse().args)
}
