//! si-updateclient: move this node (or a tree) to an image version, sending only what changed.
use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;

/// Update this node to an image version from si-server: fetch only missing objects, swap
/// changed files in atomically, delete what the version no longer has, record the version.
#[derive(Parser)]
#[command(disable_version_flag = true)]
struct Args {
    /// The si-server (HOST or HOST:PORT; port 7811 by default).
    #[arg(long)]
    server: String,
    /// Image name (default: the installed one).
    #[arg(long)]
    image: Option<String>,
    /// Version (default: the newest).
    #[arg(long)]
    version: Option<u32>,
    /// Root of the tree to update.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Where the installed record and staging live (default ROOT/var/lib/si).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Only list what would change.
    #[arg(long, short = 'n')]
    dry_run: bool,
    /// Re-hash every file to find and repair local drift.
    #[arg(long)]
    verify: bool,
    /// Allow an update that deletes more than half of the node's files.
    #[arg(long)]
    force: bool,
    /// Extra exclude patterns (paths the update neither writes nor deletes).
    #[arg(long)]
    exclude: Vec<String>,
    /// Files of exclude patterns (default also /etc/si/update.exclude under ROOT if present).
    #[arg(long)]
    exclude_file: Vec<PathBuf>,
    /// Do not apply the default update excludes (node state such as /etc/fstab, /var/log).
    #[arg(long)]
    no_default_excludes: bool,
    /// Commands run before the swap and after it (SI_IMAGE, SI_VERSION, SI_ROOT set).
    #[arg(long)]
    pre_hook: Vec<String>,
    #[arg(long)]
    post_hook: Vec<String>,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

fn main() -> Result<()> {
    si_tree::logging::init("warn");
    let a = Args::parse();
    let o = si_agent::update::options(si_agent::update::OptionArgs {
        server: a.server,
        image: a.image,
        version: a.version,
        root: a.root,
        state_dir: a.state_dir,
        dry_run: a.dry_run,
        verify: a.verify,
        force: a.force,
        exclude: a.exclude,
        exclude_file: a.exclude_file,
        no_default_excludes: a.no_default_excludes,
        pre_hook: a.pre_hook,
        post_hook: a.post_hook,
    })?;
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
