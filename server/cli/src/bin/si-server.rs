//! si-server: the master daemon.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    si_tree::logging::init("info");
    si_server::daemon::run(si_server::daemon::DaemonArgs::parse()).await
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    si_server::daemon::DaemonArgs::command().debug_assert();
}
