//! `si-profile`: installation profiles, snippets and answer files (docs/autoinstall.md).
use clap::Parser;
use si_autoinstall::cli;

fn main() -> std::process::ExitCode {
    si_tree::logging::init("warn");
    match cli::profile_main(cli::ProfileCli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("si-profile: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
