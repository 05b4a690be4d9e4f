//! si-relay: deploy a version onto an empty root through a chain of relays, and relay it on.
use anyhow::{Context, Result};
use clap::Parser;

fn main() -> Result<()> {
    si_tree::logging::init("warn");
    let cfg = si_relay::RelayConfig::parse();
    let s = si_relay::run(&cfg)?;
    let from: Vec<String> = s
        .from
        .iter()
        .map(|f| {
            format!(
                "{} objects ({} bytes) from {}",
                f.objects, f.bytes, f.upstream
            )
        })
        .collect();
    println!(
        "{}@{}: {} objects, {} bytes; {}; {} reattaches; relayed {} objects ({} bytes); {:.1}s",
        s.image,
        s.version,
        s.objects,
        s.bytes,
        from.join(", "),
        s.reattaches,
        s.served_objects,
        s.served_bytes,
        s.seconds
    );
    if let Some(p) = &cfg.summary_json {
        std::fs::write(p, serde_json::to_vec_pretty(&s)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    si_relay::RelayConfig::command().debug_assert();
}
