//! Install waves: the nodes armed for install of one image at the same time pull it as a
//! broadcast session (si-broadcast's planner) rather than each from the master.
//!
//! When si-server serves a node's install plan it gathers the node's wave from the inventory
//! (every node whose boot action is `install` and whose image, its own or its group's, is the
//! same, with a static address), makes one planner member per node (its rack, switch and the
//! /24 of its address; it lacks the whole version), and plans the session. A wave small for
//! the master (`--broadcast-direct-below`) is served directly: no relay section. Otherwise
//! the plan's relay section gives the node its upstreams (`Plan::upstreams`, nearest first,
//! the master left implicit as the last) as `NAME@ADDRESS:RELAY-PORT`, and a listen address
//! when some node is fed by it.
//!
//! Every node of a wave computes the same session: the planner sorts groups by label and
//! members by name, and nothing here depends on the order the inventory lists nodes in or on
//! which node asks first. A node that asks after another one finished (it is no longer armed)
//! sees a smaller wave: its upstreams may differ from what its neighbours were told, which
//! si-relay's healing absorbs (an upstream that refuses or is missing is left for the next).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use si_broadcast::plan::{self as bplan, Member, Options, Plan};
use si_inventory::{BootAction, BootInfo, Inventory};
use si_proto::plan::Relay;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;

fn default_direct_below() -> u64 {
    Options::default().direct_below
}
fn default_fanout() -> usize {
    Options::default().fanout
}
fn default_max_chain() -> usize {
    Options::default().max_chain
}
fn default_relay_port() -> u16 {
    7812
}

/// si-server's install wave settings: flags of si-server, and the same as a TOML file
/// (`--wave-config`).
#[derive(Clone, Debug, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WaveConfig {
    /// Plan no install waves: every installer pulls from the master.
    #[arg(long)]
    #[serde(default)]
    pub no_waves: bool,
    /// A wave whose payload times its nodes is below this many bytes is served directly by
    /// the master (default: 30 s of a 10 Gbit/s link).
    #[arg(long, default_value_t = default_direct_below())]
    #[serde(default = "default_direct_below")]
    pub broadcast_direct_below: u64,
    /// Chains the master feeds (its link's speed over a node's, at least 1).
    #[arg(long, default_value_t = default_fanout())]
    #[serde(default = "default_fanout")]
    pub broadcast_fanout: usize,
    /// Longest chain; a larger rack is split.
    #[arg(long, default_value_t = default_max_chain())]
    #[serde(default = "default_max_chain")]
    pub broadcast_max_chain: usize,
    /// The port installers relay on.
    #[arg(long, default_value_t = default_relay_port())]
    #[serde(default = "default_relay_port")]
    pub relay_port: u16,
    /// A member leaves an upstream relay that has objects to send but delivers fewer kbit/s
    /// than this for 4 s (that relay becomes a leaf); 0: off.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub broadcast_min_rate_kbit: u64,
}

impl Default for WaveConfig {
    fn default() -> WaveConfig {
        WaveConfig {
            no_waves: false,
            broadcast_direct_below: default_direct_below(),
            broadcast_fanout: default_fanout(),
            broadcast_max_chain: default_max_chain(),
            relay_port: default_relay_port(),
            broadcast_min_rate_kbit: 0,
        }
    }
}

impl WaveConfig {
    /// The planner's options.
    pub fn options(&self) -> Options {
        Options {
            direct_below: self.broadcast_direct_below,
            fanout: self.broadcast_fanout.max(1),
            max_chain: self.broadcast_max_chain.max(1),
        }
    }

    /// The settings of a TOML file.
    pub fn from_file(p: &Path) -> Result<WaveConfig> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }
}

/// One node of a wave: what the planner and the relay addresses need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaveNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub rack: Option<String>,
    pub switch: Option<String>,
}

/// The /24 an address is in, as the planner's subnet label (`10.213.5.0/24`).
pub fn slash24(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{}.{}.{}.0/24", o[0], o[1], o[2])
}

/// The planner's member for a node that lacks `payload` bytes.
pub fn member(n: &WaveNode, payload: u64) -> Member {
    Member {
        name: n.name.clone(),
        rack: n.rack.clone(),
        switch: n.switch.clone(),
        subnet: Some(slash24(n.ip)),
        lacks: payload,
    }
}

/// The wave of `image` among inventory rows: nodes armed for install (`install` boot action)
/// of that image with an address (a node without one cannot be reached as a relay: it pulls
/// from the master), in name order.
pub fn wave_of(rows: &[BootInfo], image: &str) -> Vec<WaveNode> {
    let mut v: Vec<WaveNode> = rows
        .iter()
        .filter(|b| b.action == BootAction::Install && b.image.as_deref() == Some(image))
        .filter_map(|b| {
            Some(WaveNode {
                name: b.name.clone(),
                ip: b.ip?,
                rack: b.rack.clone(),
                switch: b.switch.clone(),
            })
        })
        .collect();
    v.sort_by(|a, b| si_inventory::ranges::natural_cmp(&a.name, &b.name));
    v.dedup_by(|a, b| a.name == b.name);
    v
}

/// The relay section of `node`'s plan in `wave` (each node lacking `payload` bytes); None when
/// waves are off, the node is not in the wave, or the planner serves the wave directly.
pub fn relay_section(
    wave: &[WaveNode],
    node: &str,
    payload: u64,
    cfg: &WaveConfig,
) -> Option<Relay> {
    if cfg.no_waves {
        return None;
    }
    let by_name: HashMap<&str, &WaveNode> = wave.iter().map(|n| (n.name.as_str(), n)).collect();
    let me = by_name.get(node)?;
    let members: Vec<Member> = wave.iter().map(|n| member(n, payload)).collect();
    let plan = bplan::plan(&members, &cfg.options());
    if matches!(plan, Plan::Direct(_)) {
        return None;
    }
    let at = |n: &WaveNode| format!("{}:{}", n.ip, cfg.relay_port);
    let upstreams: Vec<String> = plan
        .upstreams(node)
        .into_iter()
        .flatten()
        .filter_map(|u| by_name.get(u.as_str()).map(|n| format!("{u}@{}", at(n))))
        .collect();
    let feeds_someone = plan
        .feeders()
        .iter()
        .any(|(_, from)| from.as_deref() == Some(node));
    let listen = feeds_someone.then(|| at(me));
    if upstreams.is_empty() && listen.is_none() {
        // A chain of one fed by the master: nothing to relay.
        return None;
    }
    Some(Relay {
        listen,
        upstreams,
        min_rate_kbit: cfg.broadcast_min_rate_kbit,
    })
}

/// The relay section of the plan si-server serves `node` for `image@version`, from the
/// inventory (the wave) and the store (the payload: the version's bytes).
pub fn relay_for(
    inv: &Inventory,
    store: &si_store::Store,
    node: &BootInfo,
    image: &str,
    version: u32,
    cfg: &WaveConfig,
) -> Result<Option<Relay>> {
    if cfg.no_waves || node.action != BootAction::Install || node.ip.is_none() {
        return Ok(None);
    }
    let payload = store
        .meta(image, version)
        .with_context(|| format!("reading the size of {image}@{version}"))?
        .bytes;
    let wave = wave_of(&inv.boot_infos()?, image);
    let relay = relay_section(&wave, &node.name, payload, cfg);
    tracing::info!(
        node = %node.name,
        image,
        version,
        wave = wave.len(),
        payload,
        upstreams = ?relay.as_ref().map(|r| &r.upstreams),
        listen = ?relay.as_ref().and_then(|r| r.listen.as_ref()),
        "install wave planned"
    );
    Ok(relay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, ip: Option<&str>, image: Option<&str>, action: BootAction) -> BootInfo {
        BootInfo {
            name: name.into(),
            hostname: name.into(),
            macs: vec![],
            ip: ip.map(|i| i.parse().unwrap()),
            image: image.map(Into::into),
            group: None,
            action,
            kernel_args: String::new(),
            disk_layout: None,
            firmware: Default::default(),
            state: "new".into(),
            profile: None,
            rack: None,
            switch: None,
        }
    }

    fn chained() -> WaveConfig {
        WaveConfig {
            broadcast_direct_below: 0,
            ..Default::default()
        }
    }

    /// The wave is the armed nodes of the image that have an address, in natural name order;
    /// members carry the labels and the /24.
    #[test]
    fn members_come_from_inventory_rows() {
        let mut rows = vec![
            row("n10", Some("10.213.5.20"), Some("deb"), BootAction::Install),
            row("n9", Some("10.213.6.19"), Some("deb"), BootAction::Install),
            row("n2", Some("10.213.5.12"), Some("deb"), BootAction::Local),
            row(
                "n3",
                Some("10.213.5.13"),
                Some("rocky"),
                BootAction::Install,
            ),
            row("n4", None, Some("deb"), BootAction::Install),
            row("n5", Some("10.213.5.15"), None, BootAction::Install),
            row(
                "n6",
                Some("10.213.5.16"),
                Some("deb"),
                BootAction::Autoinstall,
            ),
        ];
        rows[0].rack = Some("r1".into());
        rows[1].switch = Some("sw2".into());
        let w = wave_of(&rows, "deb");
        let names: Vec<&str> = w.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["n9", "n10"]);
        let m = member(&w[1], 1000);
        assert_eq!(
            m,
            Member {
                name: "n10".into(),
                rack: Some("r1".into()),
                switch: None,
                subnet: Some("10.213.5.0/24".into()),
                lacks: 1000,
            }
        );
        assert_eq!(member(&w[0], 1).switch.as_deref(), Some("sw2"));
        assert_eq!(slash24("192.168.1.254".parse().unwrap()), "192.168.1.0/24");
    }

    fn wave(n: usize) -> Vec<WaveNode> {
        (0..n)
            .map(|i| WaveNode {
                name: format!("node{i}"),
                ip: format!("10.213.7.{}", 10 + i).parse().unwrap(),
                rack: None,
                switch: None,
            })
            .collect()
    }

    /// Small waves (or waves off) get no relay section; a large one chains, each node's
    /// upstreams nearest first, and only nodes that feed someone listen.
    #[test]
    fn direct_when_small_else_a_chain() {
        let w = wave(3);
        let small = WaveConfig {
            broadcast_direct_below: 3 * 100 + 1,
            ..Default::default()
        };
        for n in &w {
            assert_eq!(relay_section(&w, &n.name, 100, &small), None);
        }
        let cfg = WaveConfig {
            broadcast_fanout: 1,
            ..chained()
        };
        let r: Vec<Option<Relay>> = w
            .iter()
            .map(|n| relay_section(&w, &n.name, 100, &cfg))
            .collect();
        assert_eq!(
            r[0],
            Some(Relay {
                listen: Some("10.213.7.10:7812".into()),
                upstreams: vec![],
                ..Default::default()
            })
        );
        assert_eq!(
            r[1],
            Some(Relay {
                listen: Some("10.213.7.11:7812".into()),
                upstreams: vec!["node0@10.213.7.10:7812".into()],
                ..Default::default()
            })
        );
        assert_eq!(
            r[2],
            Some(Relay {
                listen: None,
                upstreams: vec![
                    "node1@10.213.7.11:7812".into(),
                    "node0@10.213.7.10:7812".into()
                ],
                ..Default::default()
            })
        );
        // Every section is one an installer accepts.
        for s in r.iter().flatten() {
            let p = si_proto::plan::InstallPlan {
                node: "x".into(),
                image: "deb".into(),
                relay: Some(s.clone()),
                ..Default::default()
            };
            p.check().unwrap();
        }
        let off = WaveConfig {
            no_waves: true,
            ..cfg.clone()
        };
        assert_eq!(relay_section(&w, "node1", 100, &off), None);
        // A node outside the wave (not armed, no address) pulls from the master.
        assert_eq!(relay_section(&w, "node7", 100, &cfg), None);
        // A wave of one is no chain.
        assert_eq!(relay_section(&w[..1], "node0", 100, &cfg), None);
        let other_port = WaveConfig {
            relay_port: 9000,
            ..cfg
        };
        assert_eq!(
            relay_section(&w, "node2", 100, &other_port)
                .unwrap()
                .upstreams[0],
            "node1@10.213.7.11:9000"
        );
    }

    /// Racks make separate chains: with fanout 1, rack r2's head is fed by the tail of r1's
    /// chain; with the default fanout 2 both heads are fed by the master.
    #[test]
    fn labels_shape_the_chains() {
        let mut w = wave(4);
        for (n, r) in w.iter_mut().zip(["r2", "r1", "r2", "r1"]) {
            n.rack = Some(r.into());
        }
        let one = WaveConfig {
            broadcast_fanout: 1,
            ..chained()
        };
        // r1: node1 node3; r2: node0 node2 (fed by node3).
        assert_eq!(
            relay_section(&w, "node0", 1, &one).unwrap().upstreams,
            ["node3@10.213.7.13:7812", "node1@10.213.7.11:7812"]
        );
        assert_eq!(
            relay_section(&w, "node3", 1, &one)
                .unwrap()
                .listen
                .as_deref(),
            Some("10.213.7.13:7812")
        );
        let two = chained();
        let r0 = relay_section(&w, "node0", 1, &two).unwrap();
        assert!(r0.upstreams.is_empty(), "{r0:?}");
        assert_eq!(r0.listen.as_deref(), Some("10.213.7.10:7812"));
        assert_eq!(
            relay_section(&w, "node3", 1, &two),
            Some(Relay {
                listen: None,
                upstreams: vec!["node1@10.213.7.11:7812".into()],
                ..Default::default()
            })
        );
        // Without racks, switches then subnets group.
        let mut w = wave(2);
        w[1].ip = "10.213.8.10".parse().unwrap();
        assert_eq!(
            relay_section(&w, "node1", 1, &one).unwrap().upstreams,
            ["node0@10.213.7.10:7812"]
        );
    }

    /// Every node computes the same session whatever order the inventory lists the wave in.
    #[test]
    fn every_node_computes_the_same_wave() {
        let mut rows: Vec<BootInfo> = (0..12)
            .map(|i| {
                let mut r = row(
                    &format!("n{i}"),
                    Some(&format!("10.213.{}.{}", 9 + i % 2, 10 + i)),
                    Some("deb"),
                    BootAction::Install,
                );
                r.rack = (i % 3 != 0).then(|| format!("r{}", i % 3));
                r
            })
            .collect();
        let cfg = chained();
        let sections = |rows: &[BootInfo]| -> Vec<Option<Relay>> {
            let w = wave_of(rows, "deb");
            (0..12)
                .map(|i| relay_section(&w, &format!("n{i}"), 5000, &cfg))
                .collect()
        };
        let a = sections(&rows);
        rows.reverse();
        let b = sections(&rows);
        rows.swap(0, 7);
        rows.swap(3, 11);
        let c = sections(&rows);
        assert_eq!(a, b);
        assert_eq!(a, c);
        // The sections agree with each other: a node's first upstream listens.
        for s in a.iter().flatten() {
            if let Some(first) = s.upstreams.first() {
                let (name, addr) = first.split_once('@').unwrap();
                let i: usize = name[1..].parse().unwrap();
                assert_eq!(a[i].as_ref().unwrap().listen.as_deref(), Some(addr));
            }
        }
    }

    #[test]
    fn the_config_file_says_what_the_flags_say() {
        let c: WaveConfig =
            toml::from_str("broadcast-direct-below = 1\nbroadcast-fanout = 1\nrelay-port = 7900\n")
                .unwrap();
        assert_eq!(
            c,
            WaveConfig {
                broadcast_direct_below: 1,
                broadcast_fanout: 1,
                relay_port: 7900,
                ..Default::default()
            }
        );
        assert!(toml::from_str::<WaveConfig>("fanout = 1\n").is_err());
        let t = toml::to_string(&WaveConfig::default()).unwrap();
        assert_eq!(
            toml::from_str::<WaveConfig>(&t).unwrap(),
            WaveConfig::default()
        );
    }
}
