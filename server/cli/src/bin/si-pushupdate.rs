//! si-pushupdate: update many nodes at once.
use anyhow::{bail, Context, Result};
use clap::Parser;
use si_imageserver::push::PushConfig;

#[tokio::main]
async fn main() -> Result<()> {
    si_tree::logging::init("info");
    let a = PushConfig::parse();
    let mut nodes = Vec::new();
    for n in &a.nodes {
        nodes.extend(si_inventory::ranges::expand(n)?);
    }
    if let Some(f) = &a.nodes_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for l in text.lines().filter_map(|l| l.split_whitespace().next()) {
            nodes.extend(si_inventory::ranges::expand(l)?);
        }
    }
    if nodes.is_empty() {
        bail!("no nodes given");
    }
    let (canaries, rest) = a.canaries(&nodes, si_inventory::ranges::expand)?;
    let trust = a.trust()?;
    let results = si_imageserver::push::rollout(&canaries, &rest, &a, &trust).await;
    si_imageserver::push::report(&results, Some(&a.results))?;
    if results.iter().any(|r| !r.ok) {
        std::process::exit(1);
    }
    Ok(())
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    PushConfig::command().debug_assert();
}
