//! `si-agentd`: the node's push service. The master's `si-pushupdate` connects over TLS,
//! presents the master's certificate (the agent presents its node certificate; both are from
//! the CA the node pinned), and asks for an update; the agent runs it (one at a time) and
//! answers with the outcome. Any other peer (a node's certificate, another CA, none, plain
//! TCP) is refused before it can say anything.
//!
//! Under `--insecure` (lab use only, both sides) the agent speaks plain TCP and asks for the
//! shared token in `--token-file` instead, as before trust existed.

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
    /// Master addresses allowed to push (repeatable; default: any, the master's certificate
    /// still required).
    #[arg(long)]
    #[serde(default)]
    pub master: Vec<IpAddr>,
    /// File holding the shared push token (read only with --insecure).
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
    /// Plain TCP with the shared token instead of TLS, here and for the updates it runs (lab
    /// use only; logged loudly).
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

/// How pushes are authenticated.
enum Auth {
    /// TLS: only the master's certificate (from the pinned CA) is accepted.
    Tls(std::sync::Arc<si_trust::rustls::ServerConfig>),
    /// `--insecure`: plain TCP and the shared token.
    Token(std::sync::Arc<str>),
}

impl AgentConfig {
    fn auth(&self) -> Result<Auth> {
        if self.insecure {
            tracing::warn!("--insecure: pushes arrive over plain TCP with the shared token; whoever sees one push can replay it");
            return Ok(Auth::Token(read_token(&self.token_file)?.into()));
        }
        let dir = self
            .identity_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::pull::DEFAULT_IDENTITY_DIR));
        let pin = match &self.ca_fingerprint {
            Some(p) => p.parse().context("parsing --ca-fingerprint")?,
            None => crate::pull::read_pin(&dir)?.with_context(|| {
                format!(
                    "no CA fingerprint: pass --ca-fingerprint or enroll this node (no {} in {})",
                    si_trust::identity::PIN_FILE,
                    dir.display()
                )
            })?,
        };
        let id = si_trust::NodeIdentity::load(&dir, &pin).with_context(|| {
            format!(
                "loading this node's identity from {} (enroll it first, or --insecure)",
                dir.display()
            )
        })?;
        tracing::info!(node = %id.name, ca = %pin, "pushes are accepted from the master's certificate only");
        Ok(Auth::Tls(si_trust::tls::agent_server_config(&id)?))
    }
}

/// The shared token of `--insecure` pushes: the file must be private (0600, no group or other
/// bits) and not empty (an empty token would accept an empty token).
fn read_token(path: &std::path::Path) -> Result<String> {
    let token = si_trust::files::read_private(path)
        .with_context(|| format!("reading the push token {}", path.display()))?;
    let token =
        String::from_utf8(token).with_context(|| format!("{} is not text", path.display()))?;
    if token.trim().is_empty() {
        bail!(
            "{} is empty: refusing to accept an empty token",
            path.display()
        );
    }
    Ok(token.trim().to_string())
}

/// Serves pushes on `cfg.listen` forever (one thread per connection; updates run one at a
/// time).
pub fn serve(cfg: AgentConfig) -> Result<()> {
    let auth = cfg.auth()?;
    let l =
        TcpListener::bind(cfg.listen).with_context(|| format!("listening on {}", cfg.listen))?;
    serve_listener(l, cfg, auth)
}

/// Serves pushes on `l` forever, with the authentication `cfg` asks for.
pub fn serve_on(l: TcpListener, cfg: AgentConfig) -> Result<()> {
    let auth = cfg.auth()?;
    serve_listener(l, cfg, auth)
}

fn serve_listener(l: TcpListener, cfg: AgentConfig, auth: Auth) -> Result<()> {
    let auth = std::sync::Arc::new(auth);
    let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
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
        let (cfg, auth, open) = (cfg.clone(), auth.clone(), open.clone());
        std::thread::spawn(move || {
            let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            if let Err(e) = handle(s, &cfg, &auth) {
                tracing::warn!(%peer, error = format!("{e:#}"), "push refused or failed");
            }
            open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    Ok(())
}

fn handle(s: TcpStream, cfg: &AgentConfig, auth: &Auth) -> Result<()> {
    let peer = s.peer_addr()?;
    if !cfg.master.is_empty() && !cfg.master.contains(&peer.ip()) {
        bail!("refused: not a configured master");
    }
    // The TLS handshake, the si handshake and the request must all come within this.
    s.set_read_timeout(Some(handshake::HELLO_TIMEOUT))?;
    s.set_write_timeout(Some(handshake::HELLO_TIMEOUT))?;
    match auth {
        Auth::Tls(config) => {
            let tls = si_trust::tls::accept_master(config, s)?;
            serve_push(BufStream::new(tls), cfg, None, |c| c.get_ref().tcp())
        }
        Auth::Token(token) => {
            tracing::warn!(%peer, "--insecure: plain TCP push session");
            serve_push(BufStream::new(s), cfg, Some(token), |c| c.get_ref())
        }
    }
}

/// The push session once the peer is authenticated (TLS) or about to show its token.
fn serve_push<S: std::io::Read + Write>(
    mut conn: BufStream<S>,
    cfg: &AgentConfig,
    token: Option<&str>,
    tcp: impl Fn(&BufStream<S>) -> &TcpStream,
) -> Result<()> {
    let policy = Policy {
        roles: vec![Role::Push],
        token: token.map(str::to_string),
        server: si_tree::fsutil::hostname(),
    };
    handshake::accept(&mut conn, &policy)?;
    let mut msg = recv_msg(&mut conn)?;
    let mut max_rate_kbit = 0;
    if let Msg::PushRate { max_kbit } = msg {
        max_rate_kbit = max_kbit;
        msg = recv_msg(&mut conn)?;
    }
    let Msg::PushUpdate {
        server,
        image,
        version,
        verify,
        force,
        dry_run,
    } = msg
    else {
        bail!("expected PushUpdate, got {}", msg.name())
    };
    // The update takes as long as it takes; the master waits for its answer.
    tcp(&conn).set_read_timeout(None)?;
    tcp(&conn).set_write_timeout(None)?;
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
        max_rate_kbit,
        ..Default::default()
    })
    .and_then(|o| update::update(&o, &mut std::io::sink()));
    let done = match res {
        Ok(s) => Msg::PushDone {
            ok: true,
            detail: format!(
                "{}@{}: {} created, {} replaced, {} deleted, {} bytes fetched{}",
                s.image,
                s.version,
                s.created,
                s.replaced,
                s.deleted,
                s.fetched_bytes,
                if max_rate_kbit > 0 {
                    format!(" at most {max_rate_kbit} kbit/s")
                } else {
                    String::new()
                }
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

    /// Under --insecure, an empty token file would accept an empty token, and a token others
    /// can read is no secret: the agent refuses to start with either.
    #[test]
    fn empty_or_readable_token_files_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("agent.token");
        std::fs::write(&p, "\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let insecure = |p: PathBuf| AgentConfig {
            insecure: true,
            ..cfg(p)
        };
        let e = format!("{:#}", serve(insecure(p.clone())).unwrap_err());
        assert!(e.contains("empty"), "{e}");
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", serve(insecure(p)).unwrap_err());
        assert!(e.contains("group or others"), "{e}");
    }

    /// Without --insecure the agent needs the node's own identity (it accepts only the
    /// master's certificate); a token file does not stand in for it.
    #[test]
    fn without_an_identity_the_agent_does_not_start() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("agent.token");
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = AgentConfig {
            identity_dir: Some(t.path().join("id")),
            ..cfg(p)
        };
        let e = format!("{:#}", serve(c).unwrap_err());
        assert!(e.contains("no CA fingerprint"), "{e}");
    }
}
