//! `si-mkbootpackage`: builds the kernel and initramfs nodes netboot into to run si-install
//! (see `si_initrd::bootpkg` and docs/installer.md, "Boot package").

use anyhow::Result;
use clap::Parser;
use si_initrd::bootpkg::{self, BootPackageConfig};

fn main() -> Result<()> {
    si_tree::logging::init("warn");
    let cfg = BootPackageConfig::parse().resolve()?;
    let dir = cfg.out_dir()?;
    let pkg = bootpkg::build(&cfg)?;
    bootpkg::write(&pkg, &dir)?;
    let r = &pkg.report;
    println!(
        "boot package in {}: kernel {} ({}), initrd {} bytes ({} uncompressed), {} modules, {} tools",
        dir.display(),
        r.kernel_release,
        r.kernel_source,
        r.initrd_bytes,
        r.initrd_uncompressed_bytes,
        r.modules.len(),
        r.tools.len()
    );
    if !r.modules_missing.is_empty() {
        println!("modules this kernel lacks: {}", r.modules_missing.join(" "));
    }
    if !r.tools_missing.is_empty() {
        println!(
            "optional tools the master lacks: {}",
            r.tools_missing.join(" ")
        );
    }
    if cfg.register.is_some() {
        println!(
            "si-server serves it for the install action with its defaults \
             (--installer-kernel si/vmlinuz --installer-initrd si/initrd.img)"
        );
    }
    Ok(())
}
