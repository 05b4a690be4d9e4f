//! si-updateclient: move this node (or a tree) to an image version, sending only what changed.
use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;

/// Update this node to an image version from si-server: fetch only missing objects, swap
/// changed files in atomically, delete what the version no longer has, record the version.
#[derive(Parser)]
#[command(disable_version_flag = true)]
struct Args {
    #[command(flatten)]
    update: si_agent::update::OptionArgs,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

fn main() -> Result<()> {
    si_tree::logging::init("warn");
    let a = Args::parse();
    let o = si_agent::update::options(a.update)?;
    let s = si_agent::update::update(&o, &mut std::io::stdout())?;
    if !o.dry_run {
        eprintln!(
            "{}@{}: {} created, {} replaced, {} metadata, {} deleted; fetched {} objects ({} bytes), {} on the wire, {} reused locally; {:.1}s",
            s.image, s.version, s.created, s.replaced, s.meta, s.deleted, s.fetched_objects, s.fetched_bytes, s.wire_bytes, s.local_objects, s.seconds
        );
    }
    if let Some(p) = a.summary_json {
        std::fs::write(p, serde_json::to_vec_pretty(&s)?)?;
    }
    Ok(())
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    Args::command().debug_assert();
}
