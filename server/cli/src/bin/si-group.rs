//! `si-group`: manage the groups of the inventory (see docs/inventory.md).
use clap::Parser;
use si_inventory::cli;

fn main() -> std::process::ExitCode {
    match cli::group_main(cli::GroupCli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("si-group: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
