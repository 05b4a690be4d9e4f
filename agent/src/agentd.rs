//! `si-agentd`: the node's push service. The master's `si-pushupdate` connects, proves it
//! knows the shared token, and asks for an update; the agent runs it (one at a time) and
//! answers with the outcome.

use crate::update::{self, OptionArgs};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use si_proto::frame::{recv_msg, write_msg};
use si_proto::handshake::{self, Policy};
use si_proto::msg::{Msg, Role};
use si_proto::stream::BufStream;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;

/// `si-agentd`'s configuration: its command line, and the same as a serde type.
#[derive(clap::Parser, Clone, Debug, Serialize, Deserialize)]
#[command(
    name = "si-agentd",
    version,
    about = "Accept update pushes from the master: run si-updateclient's update on request"
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentConfig {
    #[arg(long, default_value = "0.0.0.0:7812")]
    pub listen: SocketAddr,
    /// Master addresses allowed to push (repeatable; default: any, token still required).
    #[arg(long)]
    #[serde(default)]
    pub master: Vec<IpAddr>,
    /// File holding the shared push token.
    #[arg(long, default_value = "/etc/si/agent.token")]
    pub token_file: PathBuf,
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    #[arg(long)]
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The master's CA fingerprint the updates pin (default: IDENTITY_DIR/ca.fingerprint).
    #[arg(long, env = "SI_CA_FINGERPRINT")]
    #[serde(default)]
    pub ca_fingerprint: Option<String>,
    /// Updates fetch over plain TCP (lab use only; logged loudly).
    #[arg(long)]
    #[serde(default)]
    pub insecure: bool,
    /// This node's key, certificate and pin (default /etc/si).
    #[arg(long)]
    #[serde(default)]
    pub identity_dir: Option<PathBuf>,
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Connections served at once (updates run one at a time anyway; the rest wait or are told).
const MAX_CONNECTIONS: usize = 16;

/// Serves pushes forever (one thread per connection; updates run one at a time).
pub fn serve(cfg: AgentConfig) -> Result<()> {
    // The token file must be private (0600, no group or other bits) and not empty: an empty
    // token would accept an empty token.
    let token = si_trust::files::read_private(&cfg.token_file)
        .with_context(|| format!("reading the push token {}", cfg.token_file.display()))?;
    let token = String::from_utf8(token)
        .with_context(|| format!("{} is not text", cfg.token_file.display()))?;
    if token.trim().is_empty() {
        bail!(
            "{} is empty: refusing to accept an empty token",
            cfg.token_file.display()
        );
    }
    let token: std::sync::Arc<str> = token.trim().into();
    let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let l =
        TcpListener::bind(cfg.listen).with_context(|| format!("listening on {}", cfg.listen))?;
    tracing::info!(listen = %l.local_addr()?, "si-agentd listening");
    let cfg = std::sync::Arc::new(cfg);
    for s in l.incoming() {
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection");
                continue;
            }
        };
        // At most MAX_CONNECTIONS threads: one past the cap is closed at once.
        if open.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            tracing::warn!(peer = ?s.peer_addr().ok(), "too many connections; closing this one");
            continue;
        }
        let (cfg, token, open) = (cfg.clone(), token.clone(), open.clone());
        std::thread::spawn(move || {
            let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            if let Err(e) = handle(s, &cfg, &token) {
                tracing::warn!(%peer, error = format!("{e:#}"), "push failed");
            }
            open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    Ok(())
}

fn handle(s: TcpStream, cfg: &AgentConfig, token: &str) -> Result<()> {
    let peer = s.peer_addr()?;
    if !cfg.master.is_empty() && !cfg.master.contains(&peer.ip()) {
        bail!("refused: not a configured master");
    }
    s.set_read_timeout(Some(handshake::HELLO_TIMEOUT))?;
    let mut conn = BufStream::new(s);
    let policy = Policy {
        roles: vec![Role::Push],
        token: Some(token.to_string()),
        server: si_tree::fsutil::hostname(),
    };
    handshake::accept(&mut conn, &policy)?;
    let Msg::PushUpdate {
        server,
        image,
        version,
        verify,
        force,
        dry_run,
    } = recv_msg(&mut conn)?
    else {
        bail!("expected PushUpdate")
    };
    conn.get_ref().set_read_timeout(None)?;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let res = update::options(OptionArgs {
        server,
        image,
        version,
        root: cfg.root.clone(),
        state_dir: cfg.state_dir.clone(),
        verify,
        force,
        dry_run,
        ca_fingerprint: cfg.ca_fingerprint.clone(),
        insecure: cfg.insecure,
        identity_dir: cfg.identity_dir.clone(),
        ..Default::default()
    })
    .and_then(|o| update::update(&o, &mut std::io::sink()));
    let done = match res {
        Ok(s) => Msg::PushDone {
            ok: true,
            detail: format!(
                "{}@{}: {} created, {} replaced, {} deleted, {} bytes fetched",
                s.image, s.version, s.created, s.replaced, s.deleted, s.fetched_bytes
            ),
        },
        Err(e) => Msg::PushDone {
            ok: false,
            detail: format!("{e:#}"),
        },
    };
    write_msg(&mut conn, &done)?;
    conn.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn cfg(token_file: PathBuf) -> AgentConfig {
        AgentConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            master: vec![],
            token_file,
            root: "/nonexistent".into(),
            state_dir: None,
            ca_fingerprint: None,
            insecure: false,
            identity_dir: None,
        }
    }

    /// An empty token file would accept an empty token, and a token others can read is no
    /// secret: the agent refuses to start with either.
    #[test]
    fn empty_or_readable_token_files_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("agent.token");
        std::fs::write(&p, "\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = format!("{:#}", serve(cfg(p.clone())).unwrap_err());
        assert!(e.contains("empty"), "{e}");
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", serve(cfg(p)).unwrap_err());
        assert!(e.contains("group or others"), "{e}");
    }
}
