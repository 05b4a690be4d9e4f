//! si-agentd: the node's push service (si-pushupdate talks to it).
use clap::Parser;

fn main() -> anyhow::Result<()> {
    si_tree::logging::init("info");
    si_agent::agentd::serve(si_agent::agentd::AgentConfig::parse())
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    si_agent::agentd::AgentConfig::command().debug_assert();
}
