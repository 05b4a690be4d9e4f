//! `si-pushupdate`: update many nodes at once, through their `si-agentd` or over ssh (the
//! node runs `si-updateclient` against the master, as SystemImager's si_pushupdate does).
//!
//! Nodes run in parallel up to a fan-out limit (`--fanout`, and `--max-percent` of the nodes),
//! each with its own timeout (a node that does not answer costs one timeout, not a stall). A
//! rollout budget as Dominator has it: `--canary` nodes go first and alone, and the rest only
//! if every canary succeeded; `--on-failure stop` starts no node after one failed. Progress is printed as each node finishes; at the end
//! the nodes that succeeded and those that failed (with why) are printed and written to
//! `pushupdate.ok` and `pushupdate.failed` for a retry (`--nodes-file pushupdate.failed`).

use anyhow::{bail, Context, Result};
use si_proto::frame::{recv_msg_async, write_msg_async};
use si_proto::handshake::{self, Credentials};
use si_proto::msg::{Msg, Role};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

/// si-pushupdate's configuration: the command line, and the same as a TOML file.
#[derive(Clone, Debug, clap::Parser, serde::Serialize, serde::Deserialize)]
#[command(
    name = "si-pushupdate",
    disable_version_flag = true,
    about = "Push an image version to nodes (through their si-agentd, or over ssh), in parallel"
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PushConfig {
    /// Nodes: names, addresses, ranges (node[01-16]) and comma lists.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Read more nodes from a file (one a line; a pushupdate.failed file works).
    #[arg(long)]
    #[serde(default)]
    pub nodes_file: Option<PathBuf>,
    /// The si-server address as the nodes reach it (the nodes pull from it).
    #[arg(long)]
    pub server: String,
    #[arg(long)]
    #[serde(default)]
    pub image: Option<String>,
    #[arg(long)]
    #[serde(default)]
    pub version: Option<u32>,
    #[arg(long)]
    #[serde(default)]
    pub verify: bool,
    #[arg(long)]
    #[serde(default)]
    pub force: bool,
    #[arg(long, short = 'n')]
    #[serde(default)]
    pub dry_run: bool,
    /// Nodes updated at once.
    #[arg(long, default_value_t = 32)]
    pub fanout: usize,
    /// At most this percentage of the nodes at once (1-100; with --fanout, whichever allows
    /// fewer; at least one node).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    #[serde(default)]
    pub max_percent: Option<u8>,
    /// Canary nodes, pushed first and on their own: a count (the first N nodes given) or names
    /// and ranges among the nodes. The rest start only when every canary succeeded.
    #[arg(long)]
    #[serde(default)]
    pub canary: Option<String>,
    /// What a failed node does to the rest: `continue` (they are still pushed) or `stop` (no
    /// node starts after one failed; those not started are listed as such).
    #[arg(long, value_enum, default_value_t)]
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Per-node bandwidth cap: each node's update reads at most this many kbit/s from the
    /// server (0: no cap). Agents from before the cap refuse a capped push.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub max_rate_kbit: u64,
    /// Per-node timeout in seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// si-agentd port on the nodes.
    #[arg(long, default_value_t = 7812)]
    pub port: u16,
    /// File holding the shared push token (read only with --insecure).
    #[arg(long, default_value = "/etc/si/agent.token")]
    pub token_file: PathBuf,
    /// The master's CA: pushes present the master's certificate, agents must present a node
    /// certificate from it (the node named, when nodes are given by name).
    #[arg(long, default_value = "/var/lib/si/ca")]
    pub ca_dir: PathBuf,
    /// Plain TCP and the shared token instead of TLS (lab use only; the agents must run with
    /// --insecure too).
    #[arg(long)]
    #[serde(default)]
    pub insecure: bool,
    /// Reach the nodes over ssh instead of their si-agentd: each runs si-updateclient.
    #[arg(long)]
    #[serde(default)]
    pub ssh: bool,
    /// The ssh command and its options (with --ssh), like rsync's -e.
    #[arg(long, default_value = "ssh", requires = "ssh")]
    pub ssh_command: String,
    /// What runs on the node (with --ssh); `{node}` becomes the node's name.
    #[arg(long, default_value = "si-updateclient", requires = "ssh")]
    pub remote_command: String,
    /// Where pushupdate.ok and pushupdate.failed are written.
    #[arg(long, default_value = ".")]
    pub results: PathBuf,
}

/// What a failed node does to the rest of a push.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// The others are still pushed (the default).
    #[default]
    Continue,
    /// No node starts after one failed.
    Stop,
}

impl PushConfig {
    /// Nodes pushed at once for `total` nodes: --fanout, lowered to --max-percent of them.
    pub fn parallel(&self, total: usize) -> usize {
        let mut n = self.fanout.max(1);
        if let Some(p) = self.max_percent {
            n = n.min((total * p as usize).div_ceil(100).max(1));
        }
        n
    }

    /// Splits `nodes` into the canaries and the rest, each in the order given; `expand` turns
    /// a range expression into names (si-inventory's, in si-pushupdate).
    pub fn canaries(
        &self,
        nodes: &[String],
        expand: impl Fn(&str) -> Result<Vec<String>>,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let Some(spec) = self.canary.as_deref().map(str::trim) else {
            return Ok((vec![], nodes.to_vec()));
        };
        if let Ok(n) = spec.parse::<usize>() {
            if n == 0 || n >= nodes.len() {
                bail!(
                    "--canary {n}: a count must be at least 1 and below the {} nodes pushed",
                    nodes.len()
                );
            }
            return Ok((nodes[..n].to_vec(), nodes[n..].to_vec()));
        }
        let named = expand(spec).context("--canary")?;
        if named.is_empty() {
            bail!("--canary names no node");
        }
        if let Some(stray) = named.iter().find(|c| !nodes.contains(c)) {
            bail!("--canary {stray} is not among the nodes pushed");
        }
        if named.len() >= nodes.len() {
            bail!("--canary names every node: nothing would follow the canaries");
        }
        let (c, rest) = nodes.iter().cloned().partition(|n| named.contains(n));
        Ok((c, rest))
    }

    /// How the node side is reached.
    pub fn via(&self) -> Via {
        if self.ssh {
            Via::Ssh {
                ssh: self.ssh_command.clone(),
                remote: self.remote_command.clone(),
            }
        } else {
            Via::Agent
        }
    }

    /// The push token (from `token_file`; only --insecure pushes to agents need one).
    pub fn read_token(&self) -> Result<String> {
        if self.ssh || !self.insecure {
            return Ok(String::new());
        }
        let token = std::fs::read_to_string(&self.token_file)
            .with_context(|| format!("reading {}", self.token_file.display()))?;
        Ok(token.trim().to_string())
    }

    fn node_timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }
}

#[derive(Clone, Debug)]
pub enum Via {
    /// The node's `si-agentd` (TLS with the master's certificate; the shared token under
    /// --insecure).
    Agent,
    /// `ssh` (the command and its options, split on spaces like rsync's `-e`) running
    /// `remote` on the node: `si-updateclient` and any arguments; `{node}` in it becomes the
    /// node's name.
    Ssh { ssh: String, remote: String },
}

/// Quotes `s` for the remote shell ssh hands the command to.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The update command line run on `node` over ssh.
fn remote_command(node: &str, remote: &str, cfg: &PushConfig) -> String {
    let mut cmd = remote.replace("{node}", node);
    let mut arg = |a: &str| {
        cmd.push(' ');
        cmd.push_str(&shell_quote(a));
    };
    arg("--server");
    arg(&cfg.server);
    if let Some(i) = &cfg.image {
        arg("--image");
        arg(i);
    }
    if let Some(v) = cfg.version {
        arg("--version");
        arg(&v.to_string());
    }
    if cfg.max_rate_kbit > 0 {
        arg("--max-rate-kbit");
        arg(&cfg.max_rate_kbit.to_string());
    }
    for (on, flag) in [
        (cfg.verify, "--verify"),
        (cfg.force, "--force"),
        (cfg.dry_run, "--dry-run"),
    ] {
        if on {
            arg(flag);
        }
    }
    cmd
}

async fn push_ssh(node: &str, ssh: &str, remote: &str, cfg: &PushConfig) -> Result<String> {
    let mut words = ssh.split_whitespace();
    let prog = words.next().unwrap_or("ssh");
    let out = tokio::process::Command::new(prog)
        .args(words)
        .args(["-o", "BatchMode=yes"])
        .arg("-o")
        .arg(format!("ConnectTimeout={}", cfg.timeout.clamp(1, 30)))
        .arg("--")
        .arg(node)
        .arg(remote_command(node, remote, cfg))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("running {prog}: {e}"))?;
    let last = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string()
    };
    match out.status.code() {
        Some(0) => Ok(last(&out.stderr)),
        Some(255) => bail!("ssh: {}", last(&out.stderr)),
        _ => bail!("{} ({})", last(&out.stderr), out.status),
    }
}

#[derive(Clone, Debug)]
pub struct NodeResult {
    pub node: String,
    pub ok: bool,
    /// False for a node the push never reached (a canary or, under `--on-failure stop`,
    /// another node failed first).
    pub started: bool,
    pub detail: String,
    pub seconds: f64,
}

impl NodeResult {
    fn not_started(node: &str, why: &str) -> NodeResult {
        NodeResult {
            node: node.to_string(),
            ok: false,
            started: false,
            detail: why.to_string(),
            seconds: 0.0,
        }
    }
}

async fn push_one(node: &str, cfg: &PushConfig, trust: &Trust) -> Result<String> {
    if let Via::Ssh { ssh, remote } = &cfg.via() {
        return push_ssh(node, ssh, remote, cfg).await;
    }
    let addr = if node.contains(':') {
        node.to_string()
    } else {
        format!("{node}:{}", cfg.port)
    };
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {addr}: {e}"))?;
    match trust {
        Trust::Tls(a) => {
            // A node given by name must answer with that node's certificate; by address, with
            // any node certificate of the CA (which node it was is logged).
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let (expect, name) = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => (None, rustls_pki_types::ServerName::IpAddress(ip.into())),
                Err(_) => (Some(host), si_trust::ca::node_server_name(host)?),
            };
            let config = a.agent_client_config(expect)?;
            let mut s = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS with the agent at {addr}"))?;
            if let Some(c) = s.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                if let Ok(p) = si_trust::Peer::from_cert(c.as_ref()) {
                    tracing::debug!(%addr, agent = %p, "agent authenticated");
                }
            }
            push_session(&mut s, &addr, cfg, "").await
        }
        Trust::Token(token) => {
            let mut s = tcp;
            push_session(&mut s, &addr, cfg, token).await
        }
    }
}

/// How si-pushupdate authenticates to agents.
#[derive(Clone)]
pub enum Trust {
    /// TLS with the master's certificate from this CA.
    Tls(Arc<si_trust::ca::Authority>),
    /// `--insecure`: plain TCP and the shared token.
    Token(Arc<str>),
}

impl PushConfig {
    /// The agents' trust: the CA in `ca_dir` (which must exist), or the token under
    /// --insecure. Over ssh neither is used.
    pub fn trust(&self) -> Result<Trust> {
        if self.insecure || self.ssh {
            if self.insecure && !self.ssh {
                tracing::warn!("--insecure: pushing over plain TCP with the shared token; whoever sees one push can replay it");
            }
            return Ok(Trust::Token(self.read_token()?.into()));
        }
        let ca = si_trust::ca::Authority::open(&self.ca_dir)
            .with_context(|| format!("opening the CA in {}", self.ca_dir.display()))?;
        Ok(Trust::Tls(Arc::new(ca)))
    }
}

async fn push_session<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    addr: &str,
    cfg: &PushConfig,
    token: &str,
) -> Result<String> {
    let creds = Credentials {
        token: token.to_string(),
        client: si_tree::fsutil::hostname(),
    };
    handshake::connect_async(s, Role::Push, &creds)
        .await
        .with_context(|| format!("handshake with the agent at {addr}"))?;
    if cfg.max_rate_kbit > 0 {
        write_msg_async(
            s,
            &Msg::PushRate {
                max_kbit: cfg.max_rate_kbit,
            },
        )
        .await?;
    }
    write_msg_async(
        s,
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
    match recv_msg_async(s).await? {
        Msg::PushDone { ok: true, detail } => Ok(detail),
        Msg::PushDone { ok: false, detail } => bail!("{detail}"),
        m => bail!("unexpected answer {m:?}"),
    }
}

/// Pushes to the canaries, then, if every one of them succeeded, to the rest (see
/// [`PushConfig::canaries`]); returns one result per node, canaries first, each group in the
/// order given. Without canaries it is [`push`].
pub async fn rollout(
    canaries: &[String],
    rest: &[String],
    cfg: &PushConfig,
    trust: &Trust,
) -> Vec<NodeResult> {
    let mut out = Vec::new();
    if !canaries.is_empty() {
        tracing::info!(
            canaries = canaries.len(),
            rest = rest.len(),
            "pushing to the canaries first"
        );
        out = push(canaries, cfg, trust).await;
        if let Some(bad) = out.iter().find(|r| !r.ok) {
            let why = format!("not started: canary {} failed", bad.node);
            tracing::warn!(canary = %bad.node, not_started = rest.len(), "a canary failed; the rest are not pushed");
            out.extend(rest.iter().map(|n| NodeResult::not_started(n, &why)));
            return out;
        }
    }
    out.extend(push(rest, cfg, trust).await);
    out
}

/// Pushes to every node (authenticated by `trust`, see [`PushConfig::trust`]), at most
/// [`PushConfig::parallel`] at once; under `--on-failure stop` no node starts after one
/// failed. Returns one result per node, in the order given.
pub async fn push(nodes: &[String], cfg: &PushConfig, trust: &Trust) -> Vec<NodeResult> {
    let total = nodes.len();
    let sem = Arc::new(Semaphore::new(cfg.parallel(total)));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The first node that failed, once one has and the policy is to stop.
    let stopped: Arc<std::sync::Mutex<Option<String>>> = Default::default();
    let mut tasks = Vec::new();
    for node in nodes {
        // The permit is taken here, not in the task, so nodes start in the order given (tasks
        // reach a semaphore in whatever order the runtime's threads run them).
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let (cfg, node, done) = (cfg.clone(), node.clone(), done.clone());
        let (trust, stopped) = (trust.clone(), stopped.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            if let Some(bad) = stopped.lock().expect("not poisoned").as_ref() {
                return NodeResult::not_started(&node, &format!("not started: stopped after {bad} failed"));
            }
            let start = Instant::now();
            let limit = cfg.node_timeout();
            let r = match tokio::time::timeout(limit, push_one(&node, &cfg, &trust)).await {
                Ok(Ok(detail)) => NodeResult {
                    node,
                    ok: true,
                    started: true,
                    detail,
                    seconds: 0.0,
                },
                Ok(Err(e)) => NodeResult {
                    node,
                    ok: false,
                    started: true,
                    detail: format!("{e:#}"),
                    seconds: 0.0,
                },
                Err(_) => NodeResult {
                    node,
                    ok: false,
                    started: true,
                    detail: format!("timed out after {limit:?}"),
                    seconds: 0.0,
                },
            };
            let r = NodeResult {
                seconds: start.elapsed().as_secs_f64(),
                ..r
            };
            if !r.ok && cfg.on_failure == OnFailure::Stop {
                let mut first = stopped.lock().expect("not poisoned");
                if first.is_none() {
                    tracing::warn!(node = %r.node, "--on-failure stop: no more nodes start");
                    *first = Some(r.node.clone());
                }
            }
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if r.ok {
                tracing::info!(done = n, total, node = %r.node, seconds = r.seconds, detail = %r.detail, "pushed");
            } else {
                tracing::warn!(done = n, total, node = %r.node, seconds = r.seconds, detail = %r.detail, "push FAILED");
            }
            r
        }));
    }
    let mut out = Vec::new();
    for (t, node) in tasks.into_iter().zip(nodes) {
        out.push(t.await.unwrap_or_else(|e| NodeResult {
            node: node.clone(),
            ok: false,
            started: true,
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
    let not_started = failed.iter().filter(|r| !r.started).count();
    let tried = failed.len() - not_started;
    if not_started > 0 {
        println!(
            "{} succeeded, {tried} failed, {not_started} not started",
            ok.len()
        );
    } else {
        println!("{} succeeded, {tried} failed", ok.len());
    }
    for r in &failed {
        let tag = if r.started { "FAILED" } else { "NOT STARTED" };
        println!("{tag} {}: {}", r.node, r.detail);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        PushConfig::command().debug_assert();
    }

    /// The file form says what the command line says.
    #[test]
    fn a_config_file_reads_like_the_command_line() {
        use clap::Parser;
        let cli = PushConfig::parse_from(["si-pushupdate", "--server", "m:7811", "n[1-2]"]);
        let file: PushConfig = toml::from_str(
            "nodes = [\"n[1-2]\"]\nserver = \"m:7811\"\nfanout = 32\ntimeout = 1800\nport = 7812\n\
             token-file = \"/etc/si/agent.token\"\nca-dir = \"/var/lib/si/ca\"\nssh-command = \"ssh\"\n\
             remote-command = \"si-updateclient\"\nresults = \".\"\n",
        )
        .unwrap();
        assert_eq!(format!("{cli:?}"), format!("{file:?}"));
        assert!(toml::from_str::<PushConfig>("server = \"m\"\nbogus = 1\n").is_err());
    }

    fn names(s: &str) -> Result<Vec<String>> {
        Ok(s.split(',').map(|n| n.trim().to_string()).collect())
    }

    #[test]
    fn canaries_go_first_by_count_or_by_name() {
        use clap::Parser;
        let nodes: Vec<String> = ["n1", "n2", "n3", "n4"].map(String::from).to_vec();
        let cfg = |extra: &[&str]| {
            let mut a = vec!["si-pushupdate", "--server", "m"];
            a.extend_from_slice(extra);
            PushConfig::parse_from(a)
        };
        let (c, r) = cfg(&[]).canaries(&nodes, names).unwrap();
        assert!(c.is_empty());
        assert_eq!(r, nodes);
        let (c, r) = cfg(&["--canary", "1"]).canaries(&nodes, names).unwrap();
        assert_eq!((c, r), (vec!["n1".into()], nodes[1..].to_vec()));
        let (c, r) = cfg(&["--canary", "n3,n1"]).canaries(&nodes, names).unwrap();
        assert_eq!(c, ["n1", "n3"]);
        assert_eq!(r, ["n2", "n4"]);
        for (bad, says) in [
            ("0", "at least 1"),
            ("4", "below the 4 nodes"),
            ("n9", "n9 is not among the nodes"),
            ("n1,n2,n3,n4", "every node"),
        ] {
            let e = cfg(&["--canary", bad]).canaries(&nodes, names).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{bad}: {e:#}");
        }
    }

    #[test]
    fn at_most_a_percentage_at_once() {
        use clap::Parser;
        let cfg = |extra: &[&str]| {
            let mut a = vec!["si-pushupdate", "--server", "m"];
            a.extend_from_slice(extra);
            PushConfig::parse_from(a)
        };
        assert_eq!(cfg(&[]).parallel(100), 32);
        assert_eq!(cfg(&["--max-percent", "10"]).parallel(100), 10);
        assert_eq!(cfg(&["--max-percent", "10"]).parallel(1000), 32);
        assert_eq!(
            cfg(&["--max-percent", "10", "--fanout", "500"]).parallel(1000),
            100
        );
        assert_eq!(cfg(&["--max-percent", "10"]).parallel(15), 2); // rounded up
        assert_eq!(cfg(&["--max-percent", "1"]).parallel(3), 1); // never none
        assert!(PushConfig::try_parse_from([
            "si-pushupdate",
            "--server",
            "m",
            "--max-percent",
            "0"
        ])
        .is_err());
        assert!(PushConfig::try_parse_from([
            "si-pushupdate",
            "--server",
            "m",
            "--max-percent",
            "101"
        ])
        .is_err());
    }

    /// Under `--on-failure stop`, one at a time, the nodes start in the order given: the first
    /// fails and none after it starts. (Tasks that took their permit inside the runtime started
    /// in whatever order its threads ran them, so a later node could go first.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_stop_keeps_the_order_given() {
        use clap::Parser;
        // Ports nothing listens on: each push fails at once with "connection refused".
        let closed: Vec<String> = (0..8)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().to_string()
            })
            .collect();
        let cfg = PushConfig::parse_from([
            "si-pushupdate",
            "--server",
            "m",
            "--fanout",
            "1",
            "--on-failure",
            "stop",
        ]);
        let trust = Trust::Token("t".into());
        for _ in 0..20 {
            let out = push(&closed, &cfg, &trust).await;
            assert!(out[0].started && !out[0].ok, "{:?}", out[0].detail);
            for r in &out[1..] {
                assert!(!r.started, "{} started after the first failed", r.node);
                assert_eq!(
                    r.detail,
                    format!("not started: stopped after {} failed", closed[0])
                );
            }
        }
    }

    #[test]
    fn remote_commands_are_quoted() {
        assert_eq!(shell_quote("node-01.x"), "node-01.x");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(reboot)"), "'$(reboot)'");
        use clap::Parser;
        let cfg = PushConfig::parse_from([
            "si-pushupdate",
            "--server",
            "10.213.0.1",
            "--image",
            "compute",
            "--version",
            "3",
            "--verify",
            "--max-rate-kbit",
            "50000",
        ]);
        assert_eq!(
            remote_command("n7", "si-updateclient --root /srv/{node}", &cfg),
            "si-updateclient --root /srv/n7 --server 10.213.0.1 --image compute --version 3 --max-rate-kbit 50000 --verify"
        );
    }
}
