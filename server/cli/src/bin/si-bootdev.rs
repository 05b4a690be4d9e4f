//! si-bootdev pxe|disk|bios NODES [--persistent]
use clap::Parser;
use si_bmc::cli::{self, Common};
use si_bmc::BootDevice;
use std::process::ExitCode;

#[derive(clap::ValueEnum, Clone, Copy)]
enum Dev {
    Pxe,
    Disk,
    Bios,
}

/// Choose the device nodes boot from next (or always, with --persistent).
#[derive(Parser)]
#[command(name = "si-bootdev")]
struct Opt {
    #[arg(value_enum)]
    device: Dev,
    #[command(flatten)]
    common: Common,
    /// Keep the choice for every boot, not just the next one.
    #[arg(long)]
    persistent: bool,
}

fn main() -> anyhow::Result<ExitCode> {
    let o = Opt::parse();
    let dev = match o.device {
        Dev::Pxe => BootDevice::Pxe,
        Dev::Disk => BootDevice::Disk,
        Dev::Bios => BootDevice::Bios,
    };
    cli::bootdev(dev, o.persistent, &o.common)
}
