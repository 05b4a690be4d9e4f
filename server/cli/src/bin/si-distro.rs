//! `si-distro`: register distributions' installers for automatic installs (docs/autoinstall.md).
use clap::Parser;
use si_autoinstall::cli;

fn main() -> std::process::ExitCode {
    si_tree::logging::init("warn");
    match cli::distro_main(cli::DistroCli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("si-distro: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
