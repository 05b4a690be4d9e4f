//! The README's demo: a golden client (the real `si-prepareclient` service, in a thread) serves
//! a directory over loopback, and the master captures it into image `demo` with the real
//! protocol.

use anyhow::{Context, Result};
use si_imaging::commands::{console_is_tty, list};
use si_imaging::getimage::{self, GetImage};
use si_store::Store;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn run(store: &Store, dir: &Path) -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let addr = listener.local_addr()?;
    let token = si_proto::handshake::new_token().context("making a token")?;
    let cfg = si_agent::golden::ServeConfig {
        listen: addr,
        master: "127.0.0.1".parse()?,
        token: Some(token.clone()),
        root: dir.to_path_buf(),
        layout: None,
        no_layout: true,
        state_dir: state_dir(store.root())?,
        timeout: 60,
        insecure: false,
        ca_fingerprint: None,
    };
    eprintln!("golden client: serving {} on {addr}", dir.display());
    let golden = std::thread::spawn(move || si_agent::golden::serve_on(listener, &cfg, None));
    let summary = getimage::get_image(
        store,
        &GetImage {
            golden: addr.to_string(),
            token,
            image: "demo".into(),
            excludes: si_tree::exclude::default_capture(),
            progress: console_is_tty(),
            connect_timeout: Duration::from_secs(5),
            insecure: false,
            master_cert: None,
        },
    );
    let served = golden
        .join()
        .map_err(|_| anyhow::anyhow!("golden client thread panicked"))?;
    let s = summary?;
    served?;
    s.print();
    println!();
    list(store)?;
    println!();
    print!(
        "{}",
        toml::to_string_pretty(&store.meta("demo", s.version)?)?
    );
    Ok(())
}

/// The demo golden client's stat cache, beside the store (so a second demo reads nothing).
fn state_dir(root: &Path) -> Result<PathBuf> {
    let p = root.parent().unwrap_or(root).join(".si-demo-state");
    std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    Ok(p)
}
