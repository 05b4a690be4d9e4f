//! Fan-out over many nodes: at most `fanout` nodes in flight, each with its own deadline.
//!
//! With `n` unreachable nodes the run lasts about `ceil(n / fanout)` timeouts: 1000 nodes of
//! which 500 are unreachable finish in about one timeout with `--fanout 1000` (threads are
//! cheap: 256 KiB stacks, blocking on one UDP socket each), in about 8 with the default 64.

use super::{connect, Bmc, BmcTarget};
use anyhow::Result;
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What happened on one node.
#[derive(Debug, Serialize)]
pub struct NodeOutcome<T> {
    pub node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub elapsed_ms: u64,
}

impl<T> NodeOutcome<T> {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Runs `f` for every target, at most `fanout` at a time; `f` gets the target and its
/// deadline (start + `timeout`). Results come back in the order of `targets`.
pub fn for_each_node<T, F>(
    targets: &[BmcTarget],
    fanout: usize,
    timeout: Duration,
    f: F,
) -> Vec<NodeOutcome<T>>
where
    T: Send,
    F: Fn(&BmcTarget, Instant) -> Result<T> + Sync,
{
    let slots: Vec<Mutex<Option<NodeOutcome<T>>>> =
        targets.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let workers = fanout.max(1).min(targets.len());
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for _ in 0..workers {
            let h = std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(s, || loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(t) = targets.get(i) else { break };
                    let start = Instant::now();
                    let r = f(t, start + timeout);
                    let out = NodeOutcome {
                        node: t.node.clone(),
                        elapsed_ms: start.elapsed().as_millis() as u64,
                        error: r.as_ref().err().map(|e| format!("{e:#}")),
                        result: r.ok(),
                    };
                    if let Ok(mut slot) = slots[i].lock() {
                        *slot = Some(out);
                    }
                });
            match h {
                Ok(h) => handles.push(h),
                // Fewer threads than asked for: the ones running take the remaining work.
                Err(e) => eprintln!("warning: could not start a worker thread: {e}"),
            }
        }
        for h in handles {
            let _ = h.join();
        }
    });
    slots
        .into_iter()
        .zip(targets)
        .map(|(m, t)| {
            m.into_inner()
                .ok()
                .flatten()
                .unwrap_or_else(|| NodeOutcome {
                    node: t.node.clone(),
                    result: None,
                    error: Some(
                        "internal error: worker did not finish (panicked or no thread)".into(),
                    ),
                    elapsed_ms: 0,
                })
        })
        .collect()
}

/// Connects, runs `f` on the BMC, and closes the session.
pub fn with_bmc<T>(
    t: &BmcTarget,
    deadline: Instant,
    f: impl FnOnce(&mut dyn Bmc) -> Result<T>,
) -> Result<T> {
    let mut b = connect(t, deadline)?;
    let r = f(b.as_mut());
    // The node's result is the work's: once it is done (or failed), a lost Close Session
    // answer changes nothing for the node, and the BMC drops the session at its idle timeout.
    let _closed = b.close();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Driver;

    fn targets(n: usize) -> Vec<BmcTarget> {
        (0..n)
            .map(|i| BmcTarget {
                node: format!("n{i}"),
                host: "127.0.0.1".into(),
                port: 9,
                user: "u".into(),
                password: "p".into(),
                driver: Driver::Ipmi,
                cipher_suite: 3,
                redfish_tls: Default::default(),
            })
            .collect()
    }

    #[test]
    fn fanout_bounds_wall_time() {
        // 1000 nodes, half of them "unreachable" (sleep until their deadline): with a fanout
        // of 1000 the whole run takes about one timeout.
        let t = targets(1000);
        let timeout = Duration::from_millis(300);
        let start = Instant::now();
        let out = for_each_node(&t, 1000, timeout, |t, deadline| {
            let n: usize = t.node[1..].parse()?;
            if n & 1 == 0 {
                std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                anyhow::bail!("timed out")
            }
            Ok(n)
        });
        let took = start.elapsed();
        assert!(took < Duration::from_millis(1500), "took {took:?}");
        assert_eq!(out.iter().filter(|o| !o.ok()).count(), 500);
        assert_eq!(out[3].result, Some(3));
        assert_eq!(out[4].node, "n4");
    }
}
