//! si-power on|off|soft|cycle|reset|status NODES
use clap::Parser;
use si_bmc::cli::{self, Common, PowerCmd};
use std::process::ExitCode;

/// Switch nodes on or off through their BMCs.
#[derive(Parser)]
#[command(name = "si-power")]
struct Opt {
    #[arg(value_enum)]
    action: PowerCmd,
    #[command(flatten)]
    common: Common,
}

fn main() -> anyhow::Result<ExitCode> {
    let o = Opt::parse();
    cli::power(o.action, &o.common)
}
