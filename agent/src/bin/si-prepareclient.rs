//! si-prepareclient: record this golden node's disk layout and serve its tree to the master.

use anyhow::{Context, Result};
use clap::Parser;
use si_agent::golden::ServeConfig;

fn main() -> Result<()> {
    si_tree::logging::init("info");
    let mut cfg = ServeConfig::parse();
    let layout = cfg.layout_toml()?;
    let token = match &cfg.token {
        Some(t) => t.clone(),
        None => si_proto::handshake::new_token().context("making a token")?,
    };
    println!("token: {token}");
    cfg.token = Some(token);
    println!(
        "serving {} on {} to {} (timeout {}s)",
        cfg.root.display(),
        cfg.listen,
        cfg.master,
        cfg.timeout
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    let st = si_agent::golden::serve_once(&cfg, layout)?;
    println!(
        "captured: {} entries, {} files, read {} files ({} bytes), sent {} objects ({} bytes)",
        st.entries, st.files, st.files_read, st.bytes_read, st.blobs_sent, st.bytes_sent
    );
    Ok(())
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    ServeConfig::command().debug_assert();
}
