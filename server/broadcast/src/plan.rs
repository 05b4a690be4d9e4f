//! The plan of a broadcast session: direct fetches, or a tree of chains ordered by topology.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the planner knows of a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// Rack label from the inventory (nodes of a rack share a top-of-rack switch).
    pub rack: Option<String>,
    /// Switch label, when racks are not recorded.
    pub switch: Option<String>,
    /// The node's IPv4 /24 (or any subnet label), the next fallback.
    pub subnet: Option<String>,
    /// Content the node lacks, in bytes (what it must receive).
    pub lacks: u64,
}

/// Who feeds whom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Plan {
    /// Every node fetches from the master.
    Direct(Vec<String>),
    /// Chains, one per topology group: `chains[i][0]` is the head of group i; a head is fed by
    /// the last member of chain `feeds[i]` (None: the master), every other member by the one
    /// before it.
    Tree {
        chains: Vec<Vec<String>>,
        feeds: Vec<Option<usize>>,
    },
}

/// Planner settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Options {
    /// Below this many bytes of payload × nodes the master serves everyone directly
    /// (default: 30 s of a 10 Gbit/s link).
    pub direct_below: u64,
    /// Strings of chains the master feeds (its link divided by a node's, at least 1).
    pub fanout: usize,
    /// Longest chain; a larger group is split into chains of at most this many.
    pub max_chain: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            direct_below: 30 * 10_000_000_000 / 8,
            fanout: 2,
            max_chain: 64,
        }
    }
}

/// The topology group of a node: rack, else switch, else subnet, else one group for all.
fn group(m: &Member) -> String {
    if let Some(r) = &m.rack {
        return format!("rack:{r}");
    }
    if let Some(s) = &m.switch {
        return format!("switch:{s}");
    }
    if let Some(s) = &m.subnet {
        return format!("subnet:{s}");
    }
    "all".to_string()
}

/// Plans a session for `members` (nodes that lack nothing are left out).
pub fn plan(members: &[Member], o: &Options) -> Plan {
    let needy: Vec<&Member> = members.iter().filter(|m| m.lacks > 0).collect();
    let total: u64 = needy.iter().map(|m| m.lacks).sum();
    if total < o.direct_below || needy.len() <= 1 {
        return Plan::Direct(needy.iter().map(|m| m.name.clone()).collect());
    }
    // Groups in label order, members by name inside (racks are cabled in name order more
    // often than not, and the order is stable from one session to the next).
    let mut groups: BTreeMap<String, Vec<&Member>> = BTreeMap::new();
    for m in needy {
        groups.entry(group(m)).or_default().push(m);
    }
    let mut chains = Vec::new();
    for (_, mut ms) in groups {
        ms.sort_by(|a, b| natural(&a.name, &b.name));
        for part in ms.chunks(o.max_chain.max(1)) {
            chains.push(part.iter().map(|m| m.name.clone()).collect::<Vec<_>>());
        }
    }
    // `fanout` strings: chain i is fed by the master when i < fanout, else by the tail of
    // chain i - fanout (racks in order, interleaved across the strings).
    let f = o.fanout.max(1);
    let feeds = (0..chains.len())
        .map(|i| if i < f { None } else { Some(i - f) })
        .collect();
    Plan::Tree { chains, feeds }
}

/// Names compared with their digit runs as numbers (node9 before node10).
fn natural(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, &str)> {
        let mut v = Vec::new();
        let mut start = 0;
        let b = s.as_bytes();
        for i in 1..=b.len() {
            if i == b.len() || b[i].is_ascii_digit() != b[start].is_ascii_digit() {
                v.push((b[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        v
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(&pb) {
        let o = match (x.0, y.0) {
            (true, true) => {
                let (tx, ty) = (x.1.trim_start_matches('0'), y.1.trim_start_matches('0'));
                tx.len().cmp(&ty.len()).then(tx.cmp(ty))
            }
            _ => x.1.cmp(y.1),
        };
        if o.is_ne() {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

impl Plan {
    /// Each node's feeder (None: the master), for every node in the plan.
    pub fn feeders(&self) -> Vec<(String, Option<String>)> {
        match self {
            Plan::Direct(ns) => ns.iter().map(|n| (n.clone(), None)).collect(),
            Plan::Tree { chains, feeds } => {
                let mut v = Vec::new();
                for (i, c) in chains.iter().enumerate() {
                    for (j, n) in c.iter().enumerate() {
                        let from = if j > 0 {
                            Some(c[j - 1].clone())
                        } else {
                            feeds[i].and_then(|h| chains[h].last().cloned())
                        };
                        v.push((n.clone(), from));
                    }
                }
                v
            }
        }
    }

    /// Each node's upstream candidates in order, nearest first, the master last (`None`):
    /// where it reattaches when its feeder stops.
    pub fn upstreams(&self, node: &str) -> Vec<Option<String>> {
        let feeders: BTreeMap<String, Option<String>> = self.feeders().into_iter().collect();
        let mut v = Vec::new();
        let mut cur = feeders.get(node).cloned().flatten();
        while let Some(n) = cur {
            cur = feeders.get(&n).cloned().flatten();
            v.push(Some(n));
        }
        v.push(None);
        v
    }

    /// Streams the master sends.
    pub fn master_streams(&self) -> usize {
        match self {
            Plan::Direct(ns) => ns.len(),
            Plan::Tree { feeds, .. } => feeds.iter().filter(|f| f.is_none()).count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, rack: Option<&str>, subnet: Option<&str>) -> Member {
        Member {
            name: name.into(),
            rack: rack.map(Into::into),
            subnet: subnet.map(Into::into),
            lacks: 1 << 30,
            ..Default::default()
        }
    }

    #[test]
    fn small_sessions_go_direct() {
        let o = Options::default();
        let ms = vec![
            Member {
                lacks: 1 << 20,
                ..m("a", None, None)
            },
            Member {
                lacks: 1 << 20,
                ..m("b", None, None)
            },
        ];
        assert_eq!(plan(&ms, &o), Plan::Direct(vec!["a".into(), "b".into()]));
    }

    #[test]
    fn racks_then_subnets_make_chains_in_name_order() {
        let o = Options {
            direct_below: 0,
            ..Default::default()
        };
        let ms = vec![
            m("n10", Some("r1"), None),
            m("n9", Some("r1"), None),
            m("n2", Some("r2"), None),
            m("x1", None, Some("10.213.1.0/24")),
            Member {
                lacks: 0,
                ..m("done", Some("r1"), None)
            },
        ];
        let Plan::Tree { chains, feeds } = plan(&ms, &o) else {
            panic!("a tree")
        };
        assert_eq!(
            chains,
            vec![
                vec!["n9".to_string(), "n10".into()],
                vec!["n2".into()],
                vec!["x1".into()]
            ]
        );
        assert_eq!(feeds, vec![None, None, Some(0)]);
    }

    #[test]
    fn upstreams_walk_back_to_the_master() {
        let o = Options {
            direct_below: 0,
            fanout: 1,
            max_chain: 3,
        };
        let ms: Vec<_> = (1..=5)
            .map(|i| m(&format!("n{i}"), Some("r"), None))
            .collect();
        let p = plan(&ms, &o);
        assert_eq!(p.master_streams(), 1);
        // n1 n2 n3 | n4 n5, the second chain's head fed by the first's tail.
        assert_eq!(
            p.upstreams("n5"),
            vec![
                Some("n4".to_string()),
                Some("n3".into()),
                Some("n2".into()),
                Some("n1".into()),
                None
            ]
        );
        assert_eq!(p.upstreams("n1"), vec![None]);
    }
}
