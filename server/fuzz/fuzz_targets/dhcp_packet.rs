//! Invariant: whatever bytes arrive on UDP 67 or 4011, the DHCP handler answers or drops them
//! and never panics; a reply it builds always fits a datagram. The first input byte picks the
//! server (full with unknown machines served, full ignoring them, ProxyDHCP) and the port, the
//! rest is the datagram. The handlers keep their state (offers, leases) from input to input,
//! so sequences of packets are explored too.
#![no_main]
use libfuzzer_sys::fuzz_target;
use si_boot::dhcp::{DhcpConfig, Handler, Mode, Port, UnknownPolicy};
use si_inventory::{Inventory, NoCatalog, Node, Subnet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, LazyLock};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);

struct Servers {
    _dir: tempfile::TempDir,
    handlers: Vec<Handler>,
}

static SERVERS: LazyLock<Servers> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let mut handlers = Vec::new();
    for (i, (mode, unknown)) in [
        (Mode::Full, UnknownPolicy::Discover),
        (Mode::Full, UnknownPolicy::Ignore),
        (Mode::Proxy, UnknownPolicy::Discover),
    ]
    .into_iter()
    .enumerate()
    {
        // One inventory each: one process keeps the leases of an inventory.
        let inv = Inventory::open(&dir.path().join(format!("inv{i}.db"))).unwrap();
        inv.put_subnet(&Subnet {
            name: "lab".into(),
            network: "10.213.0.0".parse().unwrap(),
            prefix: 16,
            router: Some(SERVER),
            dns: vec![SERVER],
            domain: Some("cluster".into()),
            pool_start: Some("10.213.100.1".parse().unwrap()),
            pool_end: Some("10.213.100.40".parse().unwrap()),
            lease_time: 120,
            permanent: false,
        })
        .unwrap();
        inv.add_node(
            &Node {
                name: "n1".into(),
                macs: vec!["52:54:00:00:00:01".into()],
                ip: Some("10.213.0.11".parse().unwrap()),
                state: "new".into(),
                ..Default::default()
            },
            &NoCatalog,
        )
        .unwrap();
        let mut cfg = DhcpConfig::new("fuzz0");
        cfg.server_ip = Some(SERVER);
        cfg.mode = mode;
        cfg.unknown = unknown;
        handlers.push(Handler::new(cfg, Arc::new(inv), SERVER).unwrap());
    }
    Servers {
        _dir: dir,
        handlers,
    }
});

fuzz_target!(|data: &[u8]| {
    let Some((&sel, pkt)) = data.split_first() else {
        return;
    };
    let h = &SERVERS.handlers[usize::from(sel & 3) % 3];
    let port = if sel & 4 == 0 { Port::Dhcp } else { Port::Pxe };
    let src = SocketAddrV4::new(Ipv4Addr::new(10, 213, 0, 2), 68);
    if let Some(r) = h.handle(pkt, src, port) {
        assert!(r.bytes.len() <= si_boot::dhcp::handler::MAX_LEN);
    }
});
