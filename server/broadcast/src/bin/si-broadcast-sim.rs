//! si-broadcast-sim: predicts broadcast sessions at scale from per-hop figures.
use anyhow::Result;
use clap::Parser;
use si_broadcast::sim::{simulate, Params};

/// si-broadcast-sim's configuration: the command line, and the same as a serde type.
#[derive(Parser, Debug, Clone, serde::Serialize, serde::Deserialize)]
#[command(
    name = "si-broadcast-sim",
    about = "Simulate broadcast sessions (racks of chains, relay failures) from measured per-hop figures"
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SimConfig {
    /// Session sizes (nodes).
    #[arg(long, value_delimiter = ',', default_value = "1,40,1000,10000")]
    nodes: Vec<usize>,
    /// Nodes per rack.
    #[arg(long, default_value_t = 40)]
    rack: usize,
    /// Rack uplink rates, Gbit/s.
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    uplink_gbit: Vec<f64>,
    /// A node's NIC, Gbit/s.
    #[arg(long, default_value_t = 10.0)]
    node_gbit: f64,
    /// The master's NIC, Gbit/s (default: the uplink's).
    #[arg(long)]
    master_gbit: Option<f64>,
    /// What a node verifies, writes and forwards per second, MB/s (measured: CPU or disk).
    #[arg(long, default_value_t = 1000.0)]
    node_mbs: f64,
    /// Bytes every node lacks, GiB.
    #[arg(long, default_value_t = 4.0)]
    payload_gib: f64,
    /// Piece (object batch) size, MiB.
    #[arg(long, default_value_t = 4.0)]
    piece_mib: f64,
    /// Per-hop latency, ms.
    #[arg(long, default_value_t = 0.5)]
    latency_ms: f64,
    /// Probability that a relay dies during the session.
    #[arg(long, default_value_t = 0.01)]
    failure_rate: f64,
    /// Seconds until a successor notices its relay is dead.
    #[arg(long, default_value_t = 3.0)]
    detect_s: f64,
    /// Seconds to reattach upstream.
    #[arg(long, default_value_t = 0.5)]
    reattach_s: f64,
    /// Heads fed by the master, and by each head.
    #[arg(long, default_value_t = 2)]
    fanout: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Every node from the master instead of chains (the baseline a session is planned
    /// against).
    #[arg(long)]
    #[serde(default)]
    direct: bool,
    /// Print JSON lines instead of the table.
    #[arg(long)]
    #[serde(default)]
    json: bool,
}

fn main() -> Result<()> {
    let c = SimConfig::parse();
    let gbit = |g: f64| g * 1e9 / 8.0;
    if !c.json {
        println!(
            "{:>7} {:>8} {:>9} {:>9} {:>8} {:>7} {:>9} {:>11}",
            "nodes", "uplink", "p50 s", "max s", "x T(1)", "failed", "reattach", "master egr"
        );
    }
    for &up in &c.uplink_gbit {
        let mk = |nodes: usize| Params {
            nodes,
            rack: c.rack,
            payload: (c.payload_gib * (1u64 << 30) as f64) as u64,
            piece: (c.piece_mib * (1u64 << 20) as f64) as u64,
            node_link: gbit(c.node_gbit),
            uplink: gbit(up),
            master_link: gbit(c.master_gbit.unwrap_or(up)),
            node_rate: c.node_mbs * 1e6,
            hop_latency: c.latency_ms / 1e3,
            failure_rate: c.failure_rate,
            detect: c.detect_s,
            reattach: c.reattach_s,
            fanout: c.fanout,
            seed: c.seed,
        };
        let one = simulate(&Params {
            failure_rate: 0.0,
            ..mk(1)
        })
        .max;
        for &n in &c.nodes {
            let p = mk(n);
            let o = if c.direct {
                let names = (0..n).map(|i| format!("n{i:05}")).collect();
                si_broadcast::sim::simulate_plan(&p, &si_broadcast::plan::Plan::Direct(names))
            } else {
                simulate(&p)
            };
            if c.json {
                println!("{}", serde_json::json!({"params": p, "outcome": o}));
            } else {
                println!(
                    "{:>7} {:>6}Gb {:>9.1} {:>9.1} {:>8.2} {:>7} {:>9} {:>9.2} P",
                    n,
                    up,
                    o.p50,
                    o.max,
                    o.max / one,
                    o.failed,
                    o.reattached,
                    o.master_payloads
                );
            }
        }
    }
    Ok(())
}

#[test]
fn cli_is_consistent() {
    use clap::CommandFactory;
    SimConfig::command().debug_assert();
}
