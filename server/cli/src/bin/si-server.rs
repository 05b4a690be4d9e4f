//! si-server: the master daemon.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    si_server::daemon::run(si_server::daemon::DaemonArgs::parse()).await
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    si_server::daemon::DaemonArgs::command().debug_assert();
}
