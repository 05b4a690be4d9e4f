//! Writes the test initramfs of `si_initrd::testimage` (for bench/pxe.sh and manual runs).

use anyhow::{Context, Result};
use clap::Parser;
use si_initrd::testimage::{find_module, TestImage};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Build the small busybox initramfs used by si's PXE tests")]
struct Args {
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Kernel release whose modules to take (`/lib/modules/<release>`).
    #[arg(long)]
    release: String,
    /// Module names to load, in order.
    #[arg(long, default_value = "e1000")]
    module: Vec<String>,
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let modules = a
        .module
        .iter()
        .map(|m| find_module(&a.release, m))
        .collect::<Result<Vec<_>>>()?;
    let img = TestImage {
        busybox: a.busybox,
        modules,
    }
    .build()?;
    std::fs::write(&a.out, img).with_context(|| format!("writing {}", a.out.display()))
}
