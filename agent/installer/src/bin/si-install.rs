use clap::Parser;

fn main() -> std::process::ExitCode {
    si_tree::logging::init("warn");
    let cfg = match si_installer::config::Config::parse().resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("si-install: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut i = si_installer::steps::Installer::new(cfg);
    if i.install().is_err() {
        return std::process::ExitCode::FAILURE;
    }
    if let Err(e) = i.post_action() {
        eprintln!("si-install: post-action: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
