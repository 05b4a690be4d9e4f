//! `si-node`: manage the nodes of the inventory (see docs/inventory.md).
use clap::Parser;
use si_inventory::cli;

fn main() -> std::process::ExitCode {
    match cli::node_main(cli::NodeCli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("si-node: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
