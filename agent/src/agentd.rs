//! `si-agentd`: the node's push service. The master's `si-pushupdate` connects, proves it
//! knows the shared token, and asks for an update; the agent runs it (one at a time) and
//! answers with the outcome.

use crate::update::{self, OptionArgs};
use anyhow::{bail, Context, Result};
use si_proto::frame::{recv_msg, write_msg};
use si_proto::msg::{self, ErrorKind, Msg, Role};
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

pub struct AgentConfig {
    pub listen: SocketAddr,
    /// Masters allowed to push (empty: any address, token still required).
    pub masters: Vec<IpAddr>,
    pub token: String,
    pub root: PathBuf,
    pub state_dir: Option<PathBuf>,
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Serves pushes forever (one thread per connection; updates run one at a time).
pub fn serve(cfg: AgentConfig) -> Result<()> {
    let l =
        TcpListener::bind(cfg.listen).with_context(|| format!("listening on {}", cfg.listen))?;
    eprintln!("si-agentd: listening on {}", l.local_addr()?);
    let cfg = std::sync::Arc::new(cfg);
    for s in l.incoming() {
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                eprintln!("si-agentd: accept: {e}");
                continue;
            }
        };
        let cfg = cfg.clone();
        std::thread::spawn(move || {
            let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            if let Err(e) = handle(s, &cfg) {
                eprintln!("si-agentd: {peer}: {e:#}");
            }
        });
    }
    Ok(())
}

fn handle(s: TcpStream, cfg: &AgentConfig) -> Result<()> {
    let peer = s.peer_addr()?;
    if !cfg.masters.is_empty() && !cfg.masters.contains(&peer.ip()) {
        bail!("refused: not a configured master");
    }
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = std::io::BufReader::new(s.try_clone()?);
    let mut w = s;
    let Msg::Hello {
        magic,
        version,
        min_version,
        role,
        token,
        ..
    } = recv_msg(&mut r)?
    else {
        bail!("expected hello")
    };
    let refuse = |w: &mut TcpStream, kind, m: &str| -> Result<()> {
        let _ = write_msg(
            w,
            &Msg::Error {
                kind,
                message: m.into(),
            },
        );
        bail!("refused: {m}")
    };
    if magic != msg::MAGIC || role != Role::Push {
        return refuse(&mut w, ErrorKind::BadRequest, "not a push");
    }
    let v = match msg::negotiate(version, min_version) {
        Ok(v) => v,
        Err(m) => return refuse(&mut w, ErrorKind::Version, &m),
    };
    if !si_proto::handshake::ct_eq(token.as_bytes(), cfg.token.as_bytes()) {
        return refuse(&mut w, ErrorKind::Refused, "wrong token");
    }
    write_msg(
        &mut w,
        &Msg::Welcome {
            version: v,
            server: si_tree::fsutil::hostname(),
        },
    )?;
    let Msg::PushUpdate {
        server,
        image,
        version,
        verify,
        force,
        dry_run,
    } = recv_msg(&mut r)?
    else {
        bail!("expected PushUpdate")
    };
    r.get_ref().set_read_timeout(None)?;
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
    write_msg(&mut w, &done)?;
    w.flush()?;
    Ok(())
}
