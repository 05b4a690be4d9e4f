//! A piece-level simulation of a broadcast session.
//!
//! Content moves in pieces (objects) in manifest order. A node receives piece k from its
//! feeder once the feeder holds it (cut-through), one piece after another on its link:
//!
//! ```text
//! t[v][k] = max(t[feeder][k] + latency, t[v][k-1]) + piece / rate(v)
//! ```
//!
//! where `rate(v)` is the least of the feeder's outgoing share (its NIC split among the
//! streams it sends, and for a stream that crosses the core its rack uplink split among the
//! streams leaving the rack; the master's link split among the heads it feeds), the node's
//! own NIC, and the node's processing rate (verify, write, forward: CPU or disk, measured).
//!
//! A relay fails with probability `failure_rate` at a uniformly drawn moment of its session;
//! the pieces it had not received by then never come from it. Each of its children notices
//! after `detect` seconds, takes `reattach` seconds to reach the nearest live ancestor (the
//! master at worst) and from then on receives from it the pieces it still lacks. The master's
//! egress counts every piece it sends, replays included.

use crate::plan::{plan, Member, Options, Plan};
use serde::Serialize;

/// The figures a simulation runs on (rates in bytes per second, times in seconds).
#[derive(Clone, Debug, Serialize)]
pub struct Params {
    pub nodes: usize,
    pub rack: usize,
    pub payload: u64,
    pub piece: u64,
    pub node_link: f64,
    pub uplink: f64,
    pub master_link: f64,
    pub node_rate: f64,
    pub hop_latency: f64,
    pub failure_rate: f64,
    pub detect: f64,
    pub reattach: f64,
    pub fanout: usize,
    pub seed: u64,
}

/// What a simulated session came to.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub nodes: usize,
    pub failed: usize,
    /// Completion of the nodes that finished: median and slowest, seconds.
    pub p50: f64,
    pub max: f64,
    /// Bytes the master sent, in payloads.
    pub master_payloads: f64,
    /// Reattachments after a failure.
    pub reattached: usize,
}

/// A small deterministic generator (xorshift64*), so a seed gives the same session.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Simulates a session of `p.nodes` nodes in racks of `p.rack`, planned by [`plan`].
pub fn simulate(p: &Params) -> Outcome {
    let members: Vec<Member> = (0..p.nodes)
        .map(|i| Member {
            name: format!("n{i:05}"),
            rack: Some(format!("r{:04}", i / p.rack.max(1))),
            lacks: p.payload,
            ..Default::default()
        })
        .collect();
    let opts = Options {
        direct_below: 0,
        fanout: p.fanout,
        max_chain: p.rack.max(1),
    };
    simulate_plan(p, &plan(&members, &opts))
}

/// Simulates `plan` with the figures of `p`.
pub fn simulate_plan(p: &Params, plan: &Plan) -> Outcome {
    let pieces = p.payload.div_ceil(p.piece.max(1)).max(1) as usize;
    let piece = p.piece as f64;
    let feeders = plan.feeders();
    let n = feeders.len();
    let index: std::collections::HashMap<&str, usize> = feeders
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.as_str(), i))
        .collect();
    let feeder: Vec<Option<usize>> = feeders
        .iter()
        .map(|(_, f)| f.as_deref().map(|f| index[f]))
        .collect();
    // The chain (topology group) of each node: a feeder in the same chain is in the rack.
    let mut chain_of = vec![usize::MAX; n];
    if let Plan::Tree { chains, .. } = plan {
        for (c, members) in chains.iter().enumerate() {
            for m in members {
                chain_of[index[m.as_str()]] = c;
            }
        }
    }
    let same_group = |a: usize, b: usize| chain_of[a] != usize::MAX && chain_of[a] == chain_of[b];
    // Outgoing streams of each node, and of those, the ones leaving its rack.
    let mut out = vec![0usize; n];
    let mut out_cross = vec![0usize; n];
    let mut master_out = 0usize;
    let mut crosses = vec![true; n];
    for v in 0..n {
        match feeder[v] {
            Some(u) => {
                out[u] += 1;
                let cross = !same_group(u, v);
                crosses[v] = cross;
                if cross {
                    out_cross[u] += 1;
                }
            }
            None => master_out += 1,
        }
    }
    let rate_from = |u: Option<usize>, v: usize| -> f64 {
        let share = match u {
            None => p.master_link / master_out.max(1) as f64,
            Some(u) => {
                let nic = p.node_link / out[u].max(1) as f64;
                if crosses[v] {
                    nic.min(p.uplink / out_cross[u].max(1) as f64)
                } else {
                    nic
                }
            }
        };
        share.min(p.node_link).min(p.node_rate)
    };

    let mut rng = Rng(p.seed.max(1));
    // Feeders come before the nodes they feed in `feeders` (heads in order, then chains).
    let order = topo_order(&feeder);
    let mut times: Vec<Option<Vec<f64>>> = vec![None; n];
    let mut fail_at: Vec<Option<f64>> = vec![None; n];
    let mut master_pieces = 0usize;
    let mut reattached = 0usize;
    let mut finish = Vec::with_capacity(n);
    for &v in &order {
        let mut t = vec![0f64; pieces];
        let mut prev = 0f64;
        // The upstream chain: feeder, then its ancestors; the master at the end.
        let mut src = feeder[v];
        let mut from = 0usize;
        while from < pieces {
            let rate = rate_from(src, v);
            let up_times = src.and_then(|u| times[u].as_ref());
            let dead_at = src.and_then(|u| fail_at[u]);
            let mut k = from;
            while k < pieces {
                let avail = match up_times {
                    Some(ut) => ut[k],
                    None => 0.0,
                };
                if let Some(d) = dead_at {
                    if avail > d {
                        break;
                    }
                }
                prev = (avail + p.hop_latency).max(prev) + piece / rate;
                t[k] = prev;
                if src.is_none() {
                    master_pieces += 1;
                }
                k += 1;
            }
            from = k;
            if from < pieces {
                // The feeder died at `d`: reattach to the nearest ancestor alive then.
                let d = dead_at.expect("stopped only by a failure");
                reattached += 1;
                prev = prev.max(d) + p.detect + p.reattach;
                let mut a = src.and_then(|u| feeder[u]);
                while let Some(x) = a {
                    match fail_at[x] {
                        Some(fx) if fx <= d => a = feeder[x],
                        _ => break,
                    }
                }
                src = a;
            }
        }
        // Does this node fail during its own session (relays only: a leaf's failure costs
        // nobody else anything, but it is a failed node all the same)?
        if rng.next() < p.failure_rate {
            fail_at[v] = Some(rng.next() * t[pieces - 1]);
        } else {
            finish.push(t[pieces - 1]);
        }
        // Kept for the whole run: any ancestor may be the one a node reattaches to.
        times[v] = Some(t);
    }
    finish.sort_by(f64::total_cmp);
    let pct = |q: f64| -> f64 {
        if finish.is_empty() {
            return f64::NAN;
        }
        finish[((finish.len() - 1) as f64 * q).round() as usize]
    };
    Outcome {
        nodes: n,
        failed: n - finish.len(),
        p50: pct(0.5),
        max: pct(1.0),
        master_payloads: master_pieces as f64 / pieces as f64,
        reattached,
    }
}

/// An order in which every node comes after its feeder.
fn topo_order(feeder: &[Option<usize>]) -> Vec<usize> {
    let n = feeder.len();
    let mut kids: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut roots = Vec::new();
    for (v, f) in feeder.iter().enumerate() {
        match f {
            Some(u) => kids[*u].push(v),
            None => roots.push(v),
        }
    }
    // Depth first: a chain from its head to its tail, then the chains it feeds.
    let mut order = Vec::with_capacity(n);
    let mut stack: Vec<usize> = roots.into_iter().rev().collect();
    while let Some(v) = stack.pop() {
        order.push(v);
        stack.extend(kids[v].iter().rev());
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Params {
        Params {
            nodes: 1,
            rack: 40,
            payload: 1 << 30,
            piece: 4 << 20,
            node_link: 125e6,
            uplink: 1.25e9,
            master_link: 125e6,
            node_rate: 1e9,
            hop_latency: 0.0005,
            failure_rate: 0.0,
            detect: 3.0,
            reattach: 0.5,
            fanout: 2,
            seed: 7,
        }
    }

    /// One node: the payload at the link rate, plus one piece of latency.
    #[test]
    fn one_node_takes_payload_over_rate() {
        let o = simulate(&base());
        let want = (1u64 << 30) as f64 / 125e6;
        assert!((o.max - want).abs() / want < 0.01, "{o:?}");
        assert_eq!(o.master_payloads, 1.0);
    }

    /// A chain of 40 is pipelined: about the time of one, plus a piece per hop.
    #[test]
    fn a_chain_costs_about_one_payload_time() {
        let one = simulate(&base()).max;
        let o = simulate(&Params {
            nodes: 40,
            ..base()
        });
        assert!(o.max < one * 1.3, "{} vs {one}", o.max);
        assert!(o.master_payloads <= 1.0 + 1e-9, "{o:?}");
    }

    /// Direct fetches share the master's link: N times one.
    #[test]
    fn direct_sessions_share_the_master() {
        let p = Params { nodes: 8, ..base() };
        let names: Vec<String> = (0..8).map(|i| format!("d{i}")).collect();
        let o = simulate_plan(&p, &Plan::Direct(names));
        let one = simulate(&base()).max;
        assert!((o.max / one - 8.0).abs() < 0.1, "{} vs {one}", o.max);
        assert!((o.master_payloads - 8.0).abs() < 1e-9);
    }

    /// Failures cost their detection and reattachment, and everyone else still finishes.
    #[test]
    fn failures_cost_detection_and_reattachment() {
        let clean = simulate(&Params {
            nodes: 400,
            ..base()
        });
        let p = Params {
            nodes: 400,
            failure_rate: 0.05,
            ..base()
        };
        let o = simulate(&p);
        assert!(o.failed > 0 && o.reattached > 0, "{o:?}");
        assert!(o.max > clean.max, "{o:?} vs {clean:?}");
        assert!(
            o.max < clean.max + 10.0 * (p.detect + p.reattach) + 60.0,
            "{o:?}"
        );
    }
}
