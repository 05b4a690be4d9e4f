//! si-server: the master daemon.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    si_tree::logging::init("info");
    let a = si_server::daemon::DaemonArgs::parse();
    match &a.command {
        Some(si_server::daemon::ServerCmd::Ca(si_server::daemon::CaCmd::Show)) => {
            si_server::daemon::ca_show(&a)
        }
        Some(si_server::daemon::ServerCmd::Ca(si_server::daemon::CaCmd::Token { node })) => {
            si_server::daemon::ca_token(&a, node)
        }
        None => si_server::daemon::run(a).await,
    }
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    si_server::daemon::DaemonArgs::command().debug_assert();
}
