//! `si-pushupdate`: update many nodes at once through their `si-agentd`.
//!
//! Nodes run in parallel up to a fan-out limit, each with its own timeout (a node that does not
//! answer costs one timeout, not a stall). Progress is printed as each node finishes; at the end
//! the nodes that succeeded and those that failed (with why) are printed and written to
//! `pushupdate.ok` and `pushupdate.failed` for a retry (`--nodes-file pushupdate.failed`).

use anyhow::{bail, Result};
use si_proto::frame::{recv_msg_async, write_msg_async};
use si_proto::msg::{self, Msg, Role};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

#[derive(Clone, Debug)]
pub struct PushConfig {
    /// The si-server address the nodes pull from.
    pub server: String,
    pub image: Option<String>,
    pub version: Option<u32>,
    pub verify: bool,
    pub force: bool,
    pub dry_run: bool,
    pub token: String,
    pub port: u16,
    pub fanout: usize,
    pub timeout: Duration,
    pub results_dir: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct NodeResult {
    pub node: String,
    pub ok: bool,
    pub detail: String,
    pub seconds: f64,
}

async fn push_one(node: &str, cfg: &PushConfig) -> Result<String> {
    let addr = if node.contains(':') {
        node.to_string()
    } else {
        format!("{node}:{}", cfg.port)
    };
    let mut s = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {addr}: {e}"))?;
    write_msg_async(
        &mut s,
        &msg::hello(Role::Push, &cfg.token, &crate::hostname()),
    )
    .await?;
    match recv_msg_async(&mut s).await? {
        Msg::Welcome { .. } => {}
        m => bail!("unexpected answer {m:?}"),
    }
    write_msg_async(
        &mut s,
        &Msg::PushUpdate {
            server: cfg.server.clone(),
            image: cfg.image.clone(),
            version: cfg.version,
            verify: cfg.verify,
            force: cfg.force,
            dry_run: cfg.dry_run,
        },
    )
    .await?;
    s.flush().await?;
    match recv_msg_async(&mut s).await? {
        Msg::PushDone { ok: true, detail } => Ok(detail),
        Msg::PushDone { ok: false, detail } => bail!("{detail}"),
        m => bail!("unexpected answer {m:?}"),
    }
}

/// Pushes to every node; returns one result per node, in the order given.
pub async fn push(nodes: &[String], cfg: &PushConfig) -> Vec<NodeResult> {
    let sem = Arc::new(Semaphore::new(cfg.fanout.max(1)));
    let total = nodes.len();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for node in nodes {
        let (sem, cfg, node, done) = (sem.clone(), cfg.clone(), node.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            let start = Instant::now();
            let r = match tokio::time::timeout(cfg.timeout, push_one(&node, &cfg)).await {
                Ok(Ok(detail)) => NodeResult {
                    node,
                    ok: true,
                    detail,
                    seconds: 0.0,
                },
                Ok(Err(e)) => NodeResult {
                    node,
                    ok: false,
                    detail: format!("{e:#}"),
                    seconds: 0.0,
                },
                Err(_) => NodeResult {
                    node,
                    ok: false,
                    detail: format!("timed out after {:?}", cfg.timeout),
                    seconds: 0.0,
                },
            };
            let r = NodeResult {
                seconds: start.elapsed().as_secs_f64(),
                ..r
            };
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            eprintln!(
                "[{n}/{total}] {} {} ({:.1}s): {}",
                r.node,
                if r.ok { "ok" } else { "FAILED" },
                r.seconds,
                r.detail
            );
            r
        }));
    }
    let mut out = Vec::new();
    for (t, node) in tasks.into_iter().zip(nodes) {
        out.push(t.await.unwrap_or_else(|e| NodeResult {
            node: node.clone(),
            ok: false,
            detail: format!("internal error: {e}"),
            seconds: 0.0,
        }));
    }
    out
}

/// Prints the final report and writes the ok/failed lists.
pub fn report(results: &[NodeResult], dir: Option<&std::path::Path>) -> Result<()> {
    let ok: Vec<&NodeResult> = results.iter().filter(|r| r.ok).collect();
    let failed: Vec<&NodeResult> = results.iter().filter(|r| !r.ok).collect();
    println!("{} succeeded, {} failed", ok.len(), failed.len());
    for r in &failed {
        println!("FAILED {}: {}", r.node, r.detail);
    }
    if let Some(d) = dir {
        std::fs::create_dir_all(d)?;
        let list = |v: &[&NodeResult]| {
            v.iter()
                .map(|r| format!("{}\n", r.node))
                .collect::<String>()
        };
        std::fs::write(d.join("pushupdate.ok"), list(&ok))?;
        std::fs::write(
            d.join("pushupdate.failed"),
            failed
                .iter()
                .map(|r| format!("{}\t{}\n", r.node, r.detail.replace('\n', " ")))
                .collect::<String>(),
        )?;
    }
    Ok(())
}
