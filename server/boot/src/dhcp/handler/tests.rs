use super::*;
use si_inventory::{NoCatalog, Subnet};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);

fn setup(cfg: DhcpConfig) -> (tempfile::TempDir, Handler) {
    let d = tempfile::tempdir().unwrap();
    let inv = Inventory::open(&d.path().join("inv.db")).unwrap();
    inv.put_subnet(&Subnet {
        name: "lab".into(),
        network: "10.213.0.0".parse().unwrap(),
        prefix: 16,
        router: Some(SERVER),
        dns: vec![SERVER],
        domain: Some("cluster".into()),
        pool_start: Some("10.213.100.1".parse().unwrap()),
        pool_end: Some("10.213.100.3".parse().unwrap()),
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
    inv.add_node(
        &Node {
            name: "n2".into(),
            macs: vec!["52:54:00:00:00:02".into()],
            permanent: true,
            state: "new".into(),
            ..Default::default()
        },
        &NoCatalog,
    )
    .unwrap();
    (d, Handler::new(cfg, Arc::new(inv), SERVER).unwrap())
}

fn cfg() -> DhcpConfig {
    let mut c = DhcpConfig::new("veth0");
    c.server_ip = Some(SERVER);
    c
}

fn mac(last: u8) -> [u8; 6] {
    [0x52, 0x54, 0, 0, 0, last]
}

fn packet(mac: [u8; 6], t: MessageType, extra: &[DhcpOption]) -> Vec<u8> {
    let mut m = Message::new_with_id(
        0x1234,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    m.opts_mut().insert(DhcpOption::MessageType(t));
    for o in extra {
        m.opts_mut().insert(o.clone());
    }
    let mut b = Vec::new();
    m.encode(&mut Encoder::new(&mut b)).unwrap();
    b
}

/// A REQUEST for `ip` from `mac`, naming this server.
fn request(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    packet(
        mac,
        MessageType::Request,
        &[
            DhcpOption::ServerIdentifier(SERVER),
            DhcpOption::RequestedIpAddress(ip),
        ],
    )
}

/// `h`'s answer to a DISCOVER from `mac` with options `o` on port 67.
fn discover(h: &Handler, mac: [u8; 6], o: &[DhcpOption]) -> Option<Reply> {
    h.handle(&packet(mac, MessageType::Discover, o), src(), Port::Dhcp)
}

fn src() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)
}

fn opt(m: &Message, c: OptionCode) -> Option<&DhcpOption> {
    m.opts().get(c)
}

#[test]
fn static_node_dora() {
    let (_d, h) = setup(cfg());
    let r = discover(&h, mac(1), &[]).unwrap();
    assert_eq!(r.msg.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(r.msg.yiaddr(), Ipv4Addr::new(10, 213, 0, 11));
    assert_eq!(r.dest, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
    assert_eq!(
        opt(&r.msg, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(120))
    );
    assert_eq!(
        opt(&r.msg, OptionCode::Hostname),
        Some(&DhcpOption::Hostname("n1".into()))
    );
    assert!(
        opt(&r.msg, OptionCode::BootfileName).is_none(),
        "no boot file for a non-PXE client"
    );
    let req = packet(
        mac(1),
        MessageType::Request,
        &[
            DhcpOption::ServerIdentifier(SERVER),
            DhcpOption::RequestedIpAddress("10.213.0.11".parse().unwrap()),
        ],
    );
    let r = h.handle(&req, src(), Port::Dhcp).unwrap();
    assert_eq!(r.msg.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(r.msg.yiaddr(), Ipv4Addr::new(10, 213, 0, 11));
    // A wrong address is refused.
    let req = packet(
        mac(1),
        MessageType::Request,
        &[DhcpOption::RequestedIpAddress(
            "10.213.0.12".parse().unwrap(),
        )],
    );
    let r = h.handle(&req, src(), Port::Dhcp).unwrap();
    assert_eq!(r.msg.opts().msg_type(), Some(MessageType::Nak));
}

#[test]
fn unknown_ignored_or_pooled() {
    let (_d, h) = setup(cfg());
    assert!(discover(&h, mac(9), &[]).is_none());
    let mut c = cfg();
    c.unknown = UnknownPolicy::Discover;
    let (_d, h) = setup(c);
    let mut seen = Vec::new();
    for i in 10..13 {
        let r = h
            .handle(
                &packet(mac(i), MessageType::Discover, &[]),
                src(),
                Port::Dhcp,
            )
            .unwrap();
        assert!(h.reader.subnets().unwrap()[0].in_pool(r.msg.yiaddr()));
        assert!(!seen.contains(&r.msg.yiaddr()));
        seen.push(r.msg.yiaddr());
    }
    // Pool of three is exhausted while the offers are held.
    assert!(discover(&h, mac(14), &[]).is_none());
    // The same client gets the same address again.
    let r = discover(&h, mac(10), &[]).unwrap();
    assert_eq!(r.msg.yiaddr(), seen[0]);
}

#[test]
fn permanent_node_from_pool() {
    let (_d, h) = setup(cfg());
    let r = discover(&h, mac(2), &[]).unwrap();
    let ip = r.msg.yiaddr();
    assert_eq!(
        opt(&r.msg, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(u32::MAX))
    );
    let req = request(mac(2), ip);
    let r = h.handle(&req, src(), Port::Dhcp).unwrap();
    assert_eq!(r.msg.opts().msg_type(), Some(MessageType::Ack));
    let l = h.leases.clone().unwrap().get("52:54:00:00:00:02").unwrap();
    assert_eq!(l.expires, None);
}

#[test]
fn pxe_firmwares() {
    let (_d, h) = setup(cfg());
    let pxe = |arch: u16, ipxe: bool| {
        let mut o = vec![
            DhcpOption::ClassIdentifier(
                format!("PXEClient:Arch:{arch:05}:UNDI:003016").into_bytes(),
            ),
            DhcpOption::ClientSystemArchitecture(arch.into()),
            DhcpOption::ClientMachineIdentifier(vec![0; 17]),
        ];
        if ipxe {
            o.push(DhcpOption::UserClass(b"iPXE".to_vec()));
        }
        let r = discover(&h, mac(1), &o).unwrap();
        let f = match opt(&r.msg, OptionCode::BootfileName) {
            Some(DhcpOption::BootfileName(f)) => {
                // NUL-terminated (see `add_boot`).
                let f = f.strip_suffix(b"\0").expect("option 67 ends with NUL");
                String::from_utf8(f.to_vec()).unwrap()
            }
            o => panic!("{o:?}"),
        };
        (f, r.msg)
    };
    let (f, m) = pxe(0, false);
    assert_eq!(f, "undionly.kpxe");
    assert_eq!(m.siaddr(), SERVER);
    assert_eq!(
        opt(&m, OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
    );
    assert_eq!(
        opt(&m, OptionCode::TFTPServerName),
        Some(&DhcpOption::TFTPServerName(b"10.213.0.1".to_vec()))
    );
    assert!(opt(&m, OptionCode::ClientMachineIdentifier).is_some());
    assert_eq!(pxe(7, false).0, "ipxe.efi");
    assert_eq!(pxe(9, false).0, "ipxe.efi");
    assert_eq!(
        pxe(0, true).0,
        "http://10.213.0.1/boot/52-54-00-00-00-01.ipxe"
    );
    assert_eq!(
        pxe(9, true).0,
        "http://10.213.0.1/boot/52-54-00-00-00-01.ipxe"
    );
    // UEFI HTTP boot.
    assert_http_boot(&discover(&h, mac(1), &http_client()).unwrap());
    // An iPXE answer with a URL names no TFTP server: the URL does.
    let (_, m) = pxe(0, true);
    assert_eq!(m.siaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(opt(&m, OptionCode::TFTPServerName).is_none());
}

/// A UEFI node that boots its disk gets an address but no boot file from its firmware's PXE
/// or HTTP client, so the firmware goes on to the disk; BIOS nodes and iPXE still get theirs
/// (the BIOS script boots the first disk itself).
#[test]
fn uefi_local_boot_gets_no_boot_file() {
    let (d, h) = setup(cfg());
    let inv = Inventory::open(&d.path().join("inv.db")).unwrap();
    inv.mark_installed("n1").unwrap();
    let pxe = |arch: u16, ipxe: bool| {
        let mut o = vec![
            DhcpOption::ClassIdentifier(
                format!("PXEClient:Arch:{arch:05}:UNDI:003016").into_bytes(),
            ),
            DhcpOption::ClientSystemArchitecture(arch.into()),
        ];
        if ipxe {
            o.push(DhcpOption::UserClass(b"iPXE".to_vec()));
        }
        discover(&h, mac(1), &o).unwrap().msg
    };
    for arch in [7, 9] {
        let m = pxe(arch, false);
        assert!(opt(&m, OptionCode::BootfileName).is_none(), "arch {arch}");
        assert!(
            opt(&m, OptionCode::ClassIdentifier).is_none(),
            "arch {arch}"
        );
        assert_eq!(m.yiaddr(), "10.213.0.11".parse::<Ipv4Addr>().unwrap());
    }
    let http = discover(&h, mac(1), &http_client()).unwrap().msg;
    assert!(opt(&http, OptionCode::BootfileName).is_none());
    assert!(opt(&pxe(0, false), OptionCode::BootfileName).is_some());
    assert!(opt(&pxe(7, true), OptionCode::BootfileName).is_some());
    // Armed for an install again: the firmware gets its boot file.
    inv.set_boot_install("n1").unwrap();
    assert!(opt(&pxe(7, false), OptionCode::BootfileName).is_some());
}

/// A site's iPXE script kept in the TFTP root: iPXE (BIOS and UEFI, known or discovered) is told
/// which server has it (siaddr and option 66), as it is for every other TFTP boot file.
#[test]
fn ipxe_tftp_script_names_the_next_server() {
    let mut c = cfg();
    c.unknown = UnknownPolicy::Discover;
    c.next_server = Some(Ipv4Addr::new(10, 213, 0, 9));
    c.boot.ipxe_script = "site/{name}.ipxe".into();
    c.boot.discovery_script = "site/discover.ipxe".into();
    let (_d, h) = setup(c);
    for (m, arch, file) in [
        (mac(1), 0u16, "site/n1.ipxe"),
        (mac(1), 7, "site/n1.ipxe"),
        (mac(66), 0, "site/discover.ipxe"),
    ] {
        let o = [
            DhcpOption::ClassIdentifier(
                format!("PXEClient:Arch:{arch:05}:UNDI:002001").into_bytes(),
            ),
            DhcpOption::ClientSystemArchitecture(arch.into()),
            DhcpOption::UserClass(b"iPXE".to_vec()),
        ];
        let r = discover(&h, m, &o).unwrap();
        assert_eq!(r.msg.fname_str(), Some(Ok(file)));
        assert_eq!(r.msg.siaddr(), Ipv4Addr::new(10, 213, 0, 9), "{file}");
        assert_eq!(
            opt(&r.msg, OptionCode::TFTPServerName),
            Some(&DhcpOption::TFTPServerName(b"10.213.0.9".to_vec()))
        );
    }
}

#[test]
fn urls_and_tftp_paths() {
    for u in [
        "http://10.213.0.1/boot.ipxe",
        "https://x/y",
        "tftp://10.213.0.1/a",
    ] {
        assert!(is_url(u), "{u}");
    }
    for f in [
        "boot.ipxe",
        "pxelinux.0",
        "site/a.ipxe",
        "://x",
        "a b://c",
        "",
    ] {
        assert!(!is_url(f), "{f}");
    }
}

/// What OVMF's HTTP boot client sends in a DISCOVER.
fn http_client() -> [DhcpOption; 2] {
    [
        DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016:UNDI:003016".to_vec()),
        DhcpOption::ClientSystemArchitecture(16.into()),
    ]
}

/// `r` gives a UEFI HTTP boot client what it needs: the URL of iPXE, and the HTTPClient class
/// without which OVMF ignores the offer.
fn assert_http_boot(r: &Reply) {
    assert_eq!(
        opt(&r.msg, OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()))
    );
    assert_eq!(
        opt(&r.msg, OptionCode::BootfileName),
        Some(&DhcpOption::BootfileName(
            b"http://10.213.0.1/ipxe.efi\0".to_vec()
        ))
    );
}

/// The options of a reply as sent: (code, data), in wire order.
fn wire_options(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = MIN_LEN;
    while bytes[i] != 255 {
        let len = usize::from(bytes[i + 1]);
        out.push((bytes[i], bytes[i + 2..i + 2 + len].to_vec()));
        i += 2 + len;
    }
    out
}

#[test]
fn wire_order_is_fixed_and_bootfile_nul_terminated() {
    let (_d, h) = setup(cfg());
    let o = [
        DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016:UNDI:003000".to_vec()),
        DhcpOption::ClientSystemArchitecture(16.into()),
        DhcpOption::ClientMachineIdentifier(vec![0; 17]),
    ];
    let req = packet(mac(1), MessageType::Discover, &o);
    let first = h.handle(&req, src(), Port::Dhcp).unwrap().bytes;
    let opts = wire_options(&first);
    // Message type first, then by code: the same bytes for the same answer, every time
    // (dhcproto alone writes them in hash map order).
    assert_eq!(opts[0], (53, vec![2]));
    let codes: Vec<u8> = opts[1..].iter().map(|o| o.0).collect();
    let mut sorted = codes.clone();
    sorted.sort();
    assert_eq!(codes, sorted);
    for _ in 0..20 {
        assert_eq!(h.handle(&req, src(), Port::Dhcp).unwrap().bytes, first);
    }
    // edk2 writes a NUL after option 67 when its last byte is not one, over the next option.
    let file = &opts.iter().find(|o| o.0 == 67).unwrap().1;
    assert_eq!(file.as_slice(), b"http://10.213.0.1/ipxe.efi\0");
}

#[test]
fn proxy_mode_gives_no_address() {
    let mut c = cfg();
    c.mode = Mode::Proxy;
    let (_d, h) = setup(c);
    let o = [
        DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
        DhcpOption::ClientSystemArchitecture(0.into()),
    ];
    let r = discover(&h, mac(1), &o).unwrap();
    assert_eq!(r.msg.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(r.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(r.msg.siaddr(), SERVER);
    assert_eq!(r.msg.fname_str(), Some(Ok("undionly.kpxe")));
    assert!(opt(&r.msg, OptionCode::AddressLeaseTime).is_none());
    // Not a PXE client: nothing. A request on 4011: an ACK to the sender.
    assert!(discover(&h, mac(1), &[]).is_none());
    let from = SocketAddrV4::new("10.213.5.5".parse().unwrap(), 68);
    let r = h
        .handle(&packet(mac(1), MessageType::Request, &o), from, Port::Pxe)
        .unwrap();
    assert_eq!(r.msg.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(r.dest, from);
    assert_eq!(r.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
    // UEFI HTTP boot beside the site's DHCP server: the URL only, and the HTTPClient class
    // OVMF needs to take the offer.
    let r = discover(&h, mac(1), &http_client()).unwrap();
    assert_eq!(r.msg.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(r.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(opt(&r.msg, OptionCode::AddressLeaseTime).is_none());
    assert_http_boot(&r);
}

#[test]
fn relayed_request_goes_back_to_relay() {
    let (_d, h) = setup(cfg());
    let mut m = decode(&packet(mac(1), MessageType::Discover, &[])).unwrap();
    m.set_giaddr(Ipv4Addr::new(10, 213, 7, 1));
    let mut b = Vec::new();
    m.encode(&mut Encoder::new(&mut b)).unwrap();
    let r = h
        .handle(
            &b,
            SocketAddrV4::new(Ipv4Addr::new(10, 213, 7, 1), 67),
            Port::Dhcp,
        )
        .unwrap();
    assert_eq!(r.dest, SocketAddrV4::new(Ipv4Addr::new(10, 213, 7, 1), 67));
    assert_eq!(r.msg.giaddr(), Ipv4Addr::new(10, 213, 7, 1));
    // A relay outside every subnet: no answer.
    m.set_giaddr(Ipv4Addr::new(192, 0, 2, 1));
    let mut b = Vec::new();
    m.encode(&mut Encoder::new(&mut b)).unwrap();
    assert!(h.handle(&b, src(), Port::Dhcp).is_none());
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Errors are fine, panics are bugs: feed mutated and random packets to every mode.
#[test]
fn fuzz_no_panic() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let seeds: Vec<Vec<u8>> = vec![
        packet(mac(1), MessageType::Discover, &[]),
        packet(
            mac(9),
            MessageType::Request,
            &[
                DhcpOption::ServerIdentifier(SERVER),
                DhcpOption::RequestedIpAddress("10.213.100.1".parse().unwrap()),
                DhcpOption::ClassIdentifier(b"PXEClient:Arch:00007".to_vec()),
                DhcpOption::ClientSystemArchitecture(7.into()),
                DhcpOption::UserClass(b"iPXE".to_vec()),
                DhcpOption::ClientMachineIdentifier(vec![0; 17]),
            ],
        ),
        packet(
            mac(2),
            MessageType::Inform,
            &[DhcpOption::ClassIdentifier(b"HTTPClient".to_vec())],
        ),
        packet(
            mac(3),
            MessageType::Decline,
            &[DhcpOption::RequestedIpAddress(
                "10.213.100.2".parse().unwrap(),
            )],
        ),
        packet(mac(1), MessageType::Release, &[]),
    ];
    let mut modes = Vec::new();
    for (mode, unknown) in [
        (Mode::Full, UnknownPolicy::Discover),
        (Mode::Proxy, UnknownPolicy::Discover),
        (Mode::Full, UnknownPolicy::Ignore),
    ] {
        let mut c = cfg();
        c.mode = mode;
        c.unknown = unknown;
        modes.push(setup(c));
    }
    let mut answered = 0;
    for i in 0..6000 {
        let mut p = seeds[rng.below(seeds.len())].clone();
        match rng.below(6) {
            0 => {
                // Random bytes anywhere.
                for _ in 0..1 + rng.below(8) {
                    let j = rng.below(p.len());
                    p[j] = rng.next() as u8;
                }
            }
            1 => {
                // Corrupt the options area (lengths, codes).
                for _ in 0..1 + rng.below(4) {
                    let j = 240 + rng.below(p.len() - 240);
                    p[j] = rng.next() as u8;
                }
            }
            2 => p.truncate(rng.below(p.len() + 1)),
            3 => {
                // Trailing garbage, long options.
                let n = rng.below(1400);
                p.extend((0..n).map(|_| rng.next() as u8));
            }
            4 => {
                p = (0..rng.below(1600)).map(|_| rng.next() as u8).collect();
                if p.len() > 240 {
                    p[236..240].copy_from_slice(&v4::MAGIC);
                    p[0] = 1;
                }
            }
            _ => {
                // hlen / htype fields.
                p[1] = rng.next() as u8;
                p[2] = rng.next() as u8;
            }
        }
        let (_, h) = &modes[i % modes.len()];
        let port = if rng.below(4) == 0 {
            Port::Pxe
        } else {
            Port::Dhcp
        };
        if let Some(r) = h.handle(&p, src(), port) {
            assert!(r.bytes.len() <= MAX_LEN);
            decode(&r.bytes).expect("our replies decode");
            answered += 1;
        }
    }
    assert!(
        answered > 0,
        "some mutated packets should still be answered"
    );
}

/// dhcproto asserts (debug) on option 94 with a length other than 3: such a packet must be
/// answered as if the option were absent, not crash the server.
#[test]
fn bad_option_94_does_not_panic() {
    let (_d, h) = setup(cfg());
    let mut p = packet(mac(1), MessageType::Discover, &[]);
    let end = p.iter().rposition(|&b| b == 255).unwrap();
    p.truncate(end);
    p.extend_from_slice(&[94, 1, 1, 255]);
    let r = h.handle(&p, src(), Port::Dhcp).unwrap();
    assert_eq!(r.msg.yiaddr(), Ipv4Addr::new(10, 213, 0, 11));
    // Truncated option framing: dropped.
    let n = p.len();
    p[n - 3] = 200;
    assert!(h.handle(&p, src(), Port::Dhcp).is_none());
}

#[test]
fn unknown_ipxe_gets_discovery_script() {
    let mut c = cfg();
    c.unknown = UnknownPolicy::Discover;
    c.http_base = Some("http://10.213.0.1:8080/".into());
    let (_d, h) = setup(c);
    let o = [
        DhcpOption::ClassIdentifier(b"PXEClient:Arch:00007:UNDI:003016".to_vec()),
        DhcpOption::ClientSystemArchitecture(7.into()),
        DhcpOption::UserClass(b"iPXE".to_vec()),
    ];
    let r = discover(&h, mac(77), &o).unwrap();
    assert!(h.reader.subnets().unwrap()[0].in_pool(r.msg.yiaddr()));
    assert_eq!(
        opt(&r.msg, OptionCode::BootfileName),
        Some(&DhcpOption::BootfileName(
            b"http://10.213.0.1:8080/boot/discovery.ipxe\0".to_vec()
        ))
    );
    // iPXE gets no PXE menu control (option 43).
    assert!(opt(&r.msg, OptionCode::VendorExtensions).is_none());
}

#[test]
fn release_frees_the_pool_address() {
    let mut c = cfg();
    c.unknown = UnknownPolicy::Discover;
    let (_d, h) = setup(c);
    let r = discover(&h, mac(20), &[]).unwrap();
    let ip = r.msg.yiaddr();
    let req = request(mac(20), ip);
    assert_eq!(
        h.handle(&req, src(), Port::Dhcp)
            .unwrap()
            .msg
            .opts()
            .msg_type(),
        Some(MessageType::Ack)
    );
    let book = h.leases.clone().unwrap();
    assert!(book.held_by_other(ip, "52:54:00:00:00:15", si_inventory::now()));
    let mut m = decode(&packet(mac(20), MessageType::Release, &[])).unwrap();
    m.set_ciaddr(ip);
    let mut b = Vec::new();
    m.encode(&mut Encoder::new(&mut b)).unwrap();
    assert!(h.handle(&b, src(), Port::Dhcp).is_none());
    assert!(!book.held_by_other(ip, "52:54:00:00:00:15", si_inventory::now() + 1));
    assert_eq!(book.get("52:54:00:00:00:14").unwrap().state, "released");
    // What the CLI lists (table and journal) and, once folded, the table alone agree.
    let listed = h.reader.leases().unwrap();
    book.flush().unwrap();
    assert_eq!(h.reader.leases().unwrap(), listed);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, "released");
}

#[test]
fn relay_agent_information_is_echoed() {
    let (_d, h) = setup(cfg());
    let mut m = decode(&packet(mac(1), MessageType::Discover, &[])).unwrap();
    m.set_giaddr(Ipv4Addr::new(10, 213, 7, 1));
    let mut b = Vec::new();
    m.encode(&mut Encoder::new(&mut b)).unwrap();
    let end = b.iter().rposition(|&x| x == 255).unwrap();
    b.truncate(end);
    b.extend_from_slice(&[82, 6, 1, 4, b'p', b'o', b'r', b't', 255]);
    let r = h
        .handle(
            &b,
            SocketAddrV4::new(Ipv4Addr::new(10, 213, 7, 1), 67),
            Port::Dhcp,
        )
        .unwrap();
    assert!(
        r.bytes
            .windows(8)
            .any(|w| w == [82, 6, 1, 4, b'p', b'o', b'r', b't']),
        "option 82 echoed"
    );
    // RFC 3046 2.1: the relay agent information is the last option.
    assert_eq!(wire_options(&r.bytes).last().unwrap().0, 82);
}

/// Handler cost alone (no sockets): `cargo test --release -p si-server --lib dora_cost --
/// --ignored --nocapture`. 5000 clients, one DISCOVER and one REQUEST each, a big pool.
#[test]
#[ignore = "benchmark"]
fn dora_cost() {
    let d = tempfile::tempdir().unwrap();
    let inv = Inventory::open(&d.path().join("inv.db")).unwrap();
    inv.put_subnet(&Subnet {
        name: "lab".into(),
        network: "10.213.0.0".parse().unwrap(),
        prefix: 16,
        router: Some(SERVER),
        dns: vec![SERVER],
        domain: None,
        pool_start: Some("10.213.100.0".parse().unwrap()),
        pool_end: Some("10.213.139.255".parse().unwrap()),
        lease_time: 3600,
        permanent: false,
    })
    .unwrap();
    let mut c = cfg();
    c.unknown = UnknownPolicy::Discover;
    let h = Handler::new(c, Arc::new(inv), SERVER).unwrap();
    let n = 5000u32;
    let t = std::time::Instant::now();
    let mut in_discover = std::time::Duration::ZERO;
    for i in 0..n {
        let m = [0x52, 0x55, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
        let td = std::time::Instant::now();
        let offer = discover(&h, m, &[]).expect("offer");
        in_discover += td.elapsed();
        let req = request(m, offer.msg.yiaddr());
        let ack = h.handle(&req, src(), Port::Dhcp).expect("ack");
        assert_eq!(ack.msg.opts().msg_type(), Some(MessageType::Ack));
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!(
        "one packet at a time: {us:.1} µs per DISCOVER+REQUEST ({:.0} DORA/s on one core; DISCOVER {:.1} µs)",
        1e6 / us,
        in_discover.as_secs_f64() * 1e6 / n as f64
    );

    // The same in bursts of 32, as the service takes them when requests queue up.
    let t = std::time::Instant::now();
    for b in 0..n / 32 {
        let macs: Vec<[u8; 6]> = (0..32u32)
            .map(|j| {
                let i = b * 32 + j;
                [0x52, 0x56, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]
            })
            .collect();
        let discovers: Vec<Vec<u8>> = macs
            .iter()
            .map(|m| packet(*m, MessageType::Discover, &[]))
            .collect();
        let mut offers = Vec::new();
        h.handle_many(
            &discovers
                .iter()
                .map(|p| (p.as_slice(), src(), Port::Dhcp))
                .collect::<Vec<_>>(),
            |r, _| offers.push(r),
        );
        assert_eq!(offers.len(), 32);
        let requests: Vec<Vec<u8>> = macs
            .iter()
            .zip(&offers)
            .map(|(m, o)| request(*m, o.msg.yiaddr()))
            .collect();
        let mut acks = 0;
        h.handle_many(
            &requests
                .iter()
                .map(|p| (p.as_slice(), src(), Port::Dhcp))
                .collect::<Vec<_>>(),
            |r, _| {
                assert_eq!(r.msg.opts().msg_type(), Some(MessageType::Ack));
                acks += 1
            },
        );
        assert_eq!(acks, 32);
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / (n / 32 * 32) as f64;
    println!(
        "bursts of 32: {us:.1} µs per DISCOVER+REQUEST ({:.0} DORA/s on one core)",
        1e6 / us
    );
}

#[test]
fn no_ack_when_the_lease_cannot_be_recorded() {
    let mut c = cfg();
    c.unknown = UnknownPolicy::Discover;
    let (_d, h) = setup(c);
    let offer = discover(&h, mac(30), &[]).unwrap();
    let ip = offer.msg.yiaddr();
    let book = h.leases.clone().unwrap();
    book.break_journal();
    // The append fails as on a full disk: no ACK, and no lease either.
    assert!(h.handle(&request(mac(30), ip), src(), Port::Dhcp).is_none());
    assert_eq!(book.get("52:54:00:00:00:1e"), None);
    // The book went on to a new segment: the client's retransmission is acknowledged.
    let r = h.handle(&request(mac(30), ip), src(), Port::Dhcp).unwrap();
    assert_eq!(r.msg.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(book.get("52:54:00:00:00:1e").unwrap().ip, ip);
}

fn decline(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    packet(
        mac,
        MessageType::Decline,
        &[
            DhcpOption::ServerIdentifier(SERVER),
            DhcpOption::RequestedIpAddress(ip),
        ],
    )
}

/// Forged DECLINEs with a registered MAC (n1's) naming every pool address quarantine nothing:
/// only the address a client was offered or holds can be declined. Before, one MAC emptied the
/// pool and the next client got no address.
#[test]
fn forged_declines_do_not_quarantine_the_pool() {
    let mut c = cfg();
    c.unknown = UnknownPolicy::Discover;
    let (_d, h) = setup(c);
    let book = h.leases.clone().unwrap();
    for last in 1..=3 {
        let ip = Ipv4Addr::new(10, 213, 100, last);
        assert!(h.handle(&decline(mac(1), ip), src(), Port::Dhcp).is_none());
        assert!(
            !book.held_by_other(ip, "52:54:00:00:00:30", si_inventory::now()),
            "{ip} quarantined"
        );
    }
    // Three other clients still get the three addresses.
    let mut got = Vec::new();
    for m in 30..33 {
        let r = discover(&h, mac(m), &[]).expect("an address for a new client");
        got.push(r.msg.yiaddr());
    }
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 3);
}

/// A real DECLINE (of the address the client was just offered) quarantines that address, for a
/// bounded time; a client's further DECLINEs past its bound are ignored.
#[test]
fn a_real_decline_quarantines_its_address_for_a_while() {
    let mut c = cfg();
    c.unknown = UnknownPolicy::Discover;
    let (_d, h) = setup(c);
    let book = h.leases.clone().unwrap();
    let m = mac(40);
    let mut declined = Vec::new();
    for _ in 0..DECLINES_PER_CLIENT + 1 {
        let ip = discover(&h, m, &[]).unwrap().msg.yiaddr();
        assert!(h.handle(&decline(m, ip), src(), Port::Dhcp).is_none());
        declined.push(ip);
    }
    let now = si_inventory::now();
    let other = "52:54:00:00:00:99";
    for ip in &declined[..DECLINES_PER_CLIENT] {
        assert!(book.held_by_other(*ip, other, now), "{ip} not quarantined");
        // Quarantine ends (the subnet's lease time, 120 s here, is under QUARANTINE_MAX).
        assert!(
            !book.held_by_other(*ip, other, now + 121),
            "{ip} quarantined for ever"
        );
    }
    let last = declined[DECLINES_PER_CLIENT];
    assert!(
        !book.held_by_other(last, other, now),
        "{last}: the bound did not hold"
    );
}

#[test]
fn declines_are_bounded_in_all() {
    let mut d = Declines::default();
    let t = 1_000_000;
    for i in 0..DECLINES_TOTAL {
        d.allow(&format!("m{i}"), t).unwrap();
    }
    assert!(d.allow("another", t).is_err());
    // The window moves on.
    d.allow("another", t + DECLINE_WINDOW + 1).unwrap();
    let mut d = Declines::default();
    for _ in 0..DECLINES_PER_CLIENT {
        d.allow("m", t).unwrap();
    }
    assert!(d.allow("m", t + 1).is_err());
    d.allow("m", t + DECLINE_WINDOW + 1).unwrap();
}
