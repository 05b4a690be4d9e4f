//! si-report: tell si-server how an install or update of this node went (the installer calls
//! it; `installed` flips the node's boot action to local boot).
use anyhow::Result;
use clap::Parser;
use si_agent::pull::ReportConfig;

fn main() -> Result<()> {
    si_tree::logging::init("warn");
    si_agent::pull::report(&ReportConfig::parse())
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    ReportConfig::command().debug_assert();
}
