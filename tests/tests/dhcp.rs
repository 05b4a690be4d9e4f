//! The DHCP service with real clients (dhclient, udhcpc, dhcpcd, dnsmasq as a site DHCP server)
//! in network namespaces. Needs root; addresses only in 10.213.0.0/16 inside the namespaces.
//!
//! Topology: the server namespace holds a bridge `br0` (10.213.0.1/16) where si-dhcpd listens;
//! each client namespace is connected to the bridge by a veth pair.

use anyhow::{bail, Context, Result};
use si_tests::{bin, require_root, run, Netns};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static IFN: AtomicU32 = AtomicU32::new(0);

struct Lab {
    server: Netns,
    dir: tempfile::TempDir,
    dhcpd: Option<Child>,
    dhcpd_args: Vec<String>,
}

struct Client {
    ns: Netns,
    iface: String,
    dir: PathBuf,
}

/// Fails with the Debian package to install when a client program is missing.
fn need(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(found, "{program} is missing: apt-get install {package}");
}

impl Lab {
    fn new() -> Result<Lab> {
        for (p, pkg) in [
            ("dhclient", "isc-dhcp-client"),
            ("busybox", "busybox (udhcpc)"),
            ("dhcpcd", "dhcpcd5"),
            ("dnsmasq", "dnsmasq-base"),
            ("ss", "iproute2"),
        ] {
            need(p, pkg);
        }
        let server = Netns::new()?;
        server.sh("ip link add br0 type bridge && ip addr add 10.213.0.1/16 dev br0 && ip link set br0 up")?;
        let dir = tempfile::tempdir().context("temp dir")?;
        Ok(Lab {
            server,
            dir,
            dhcpd: None,
            dhcpd_args: Vec::new(),
        })
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn si_node(&self, args: &[&str]) -> Result<String> {
        let o = run(Command::new(bin("si-node"))
            .arg("--state-dir")
            .arg(self.state())
            .args(args))?;
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// A namespace attached to the bridge, with `mac` on its interface.
    fn client(&self, mac: &str) -> Result<Client> {
        let ns = Netns::new()?;
        let n = IFN.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}x{n}", std::process::id() % 100000);
        let (a, b) = (format!("sb{tag}"), format!("c{tag}"));
        run(Command::new("ip").args([
            "link",
            "add",
            &a,
            "netns",
            &self.server.name,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &ns.name,
        ]))?;
        self.server
            .ip(&["link", "set", &a, "master", "br0", "up"])?;
        ns.ip(&["link", "set", &b, "address", mac])?;
        ns.ip(&["link", "set", &b, "up"])?;
        let dir = self.dir.path().join(&b);
        std::fs::create_dir_all(&dir)?;
        Ok(Client { ns, iface: b, dir })
    }

    fn start(&mut self, args: &[&str]) -> Result<()> {
        self.dhcpd_args = args.iter().map(|s| s.to_string()).collect();
        self.restart()
    }

    fn restart(&mut self) -> Result<()> {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("dhcpd.log"))?;
        let child = self
            .server
            .cmd(bin("si-dhcpd"))
            .arg("--state-dir")
            .arg(self.state())
            .args(["--interface", "br0"])
            .args(&self.dhcpd_args)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting si-dhcpd")?;
        self.dhcpd = Some(child);
        wait_for(Duration::from_secs(10), || {
            let o = self
                .server
                .cmd("ss")
                .args(["-Hlun", "sport = :67"])
                .output()?;
            Ok(!o.stdout.is_empty())
        })
        .with_context(|| format!("si-dhcpd did not start:\n{}", self.log()))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.dhcpd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dhcpd.log")).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_for(limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after {limit:?}")
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Dhclient,
    Udhcpc,
    Dhcpcd,
}

impl Client {
    fn events(&self) -> String {
        std::fs::read_to_string(self.dir.join("events")).unwrap_or_default()
    }

    /// A hook script that logs events and configures the address (only in the namespace).
    fn script(&self, kind: Kind) -> Result<PathBuf> {
        let ev = self.dir.join("events");
        let body = match kind {
            Kind::Dhclient => format!(
                "#!/bin/sh\necho \"$reason $new_ip_address\" >> {ev}\ncase \"$reason\" in BOUND|RENEW|REBIND|REBOOT) ip addr replace $new_ip_address/16 dev $interface;; EXPIRE|RELEASE|STOP) ip addr flush dev $interface;; esac\nexit 0\n",
                ev = ev.display()
            ),
            Kind::Udhcpc => format!(
                "#!/bin/sh\necho \"$1 $ip\" >> {ev}\ncase \"$1\" in bound|renew) ip addr replace $ip/16 dev $interface;; deconfig) ip addr flush dev $interface;; esac\nexit 0\n",
                ev = ev.display()
            ),
            // dhcpcd configures the address itself; the script replaces its hooks (no
            // resolv.conf, no hostname changes).
            Kind::Dhcpcd => format!("#!/bin/sh\necho \"$reason $new_ip_address\" >> {ev}\nexit 0\n", ev = ev.display()),
        };
        let p = self.dir.join(format!("{kind:?}.sh"));
        std::fs::write(&p, body)?;
        run(Command::new("chmod").arg("+x").arg(&p))?;
        Ok(p)
    }

    fn command(&self, kind: Kind, oneshot: bool) -> Result<Command> {
        let script = self.script(kind)?;
        let d = &self.dir;
        let mut c;
        match kind {
            Kind::Dhclient => {
                c = self.ns.cmd("dhclient");
                c.arg("-d").arg("-v").arg("-sf").arg(&script);
                c.arg("-lf")
                    .arg(d.join("dhclient.leases"))
                    .arg("-pf")
                    .arg(d.join("dhclient.pid"));
                if oneshot {
                    c.arg("-1");
                }
                c.arg(&self.iface);
            }
            Kind::Udhcpc => {
                c = self.ns.cmd("busybox");
                c.args([
                    "udhcpc",
                    "-f",
                    "-i",
                    &self.iface,
                    "-t",
                    "5",
                    "-T",
                    "1",
                    "-A",
                    "1",
                ]);
                c.arg("-s").arg(&script);
                if oneshot {
                    c.args(["-n", "-q"]);
                }
            }
            Kind::Dhcpcd => {
                c = self.ns.cmd("dhcpcd");
                c.args(["-f", "/dev/null", "-4", "-B", "-A", "-L", "-t", "15"]);
                c.arg("-c").arg(&script);
                if oneshot {
                    c.arg("-1");
                }
                c.arg(&self.iface);
            }
        }
        c.stdin(Stdio::null());
        Ok(c)
    }

    /// Runs the client until it has an address, returns the address it holds.
    fn get(&self, kind: Kind) -> Result<Ipv4Addr> {
        if kind == Kind::Dhclient {
            // dhclient -1 daemonises after binding: run it in the foreground until bound.
            let mut c = self
                .command(kind, true)?
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let r = wait_for(Duration::from_secs(30), || Ok(self.addr().is_ok()));
            let _ = c.kill();
            let _ = c.wait();
            r.with_context(|| format!("dhclient got no address; events:\n{}", self.events()))?;
            return self.addr();
        }
        let out = self
            .command(kind, true)?
            .output()
            .with_context(|| format!("running {kind:?}"))?;
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if kind == Kind::Dhcpcd {
            // dhcpcd -1 leaves a listener behind: stop it.
            let _ = self.ns.cmd("dhcpcd").args(["-x", &self.iface]).output();
        }
        self.addr().with_context(|| {
            format!(
                "{kind:?} got no address; events:\n{}\noutput:\n{log}",
                self.events()
            )
        })
    }

    /// The IPv4 address configured on the interface.
    fn addr(&self) -> Result<Ipv4Addr> {
        let o = self
            .ns
            .ip(&["-4", "-o", "addr", "show", "dev", &self.iface])?;
        let s = String::from_utf8_lossy(&o.stdout);
        let a = s
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .context("no inet address")?;
        a.split('/')
            .next()
            .unwrap_or("")
            .parse()
            .context("parsing address")
    }

    fn forget(&self, kind: Kind) -> Result<()> {
        self.ns.ip(&["addr", "flush", "dev", &self.iface])?;
        let _ = std::fs::remove_file(self.dir.join("dhclient.leases"));
        let _ = std::fs::remove_file(self.dir.join("events"));
        if kind == Kind::Dhcpcd {
            // dhcpcd keeps leases under /var/lib/dhcpcd by interface name; ours are unique.
            let _ = std::fs::remove_file(format!("/var/lib/dhcpcd/{}.lease", self.iface));
        }
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(format!("/var/lib/dhcpcd/{}.lease", self.iface));
    }
}

fn resolv_conf() -> Vec<u8> {
    std::fs::read("/etc/resolv.conf").unwrap_or_default()
}

fn pool_addr(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 10 && o[1] == 213 && o[2] == 100 && (1..=50).contains(&o[3])
}

/// Static address for a known MAC, pool addresses for unknown ones, renewal, and the same pool
/// address after a server restart (the lease table is in the inventory).
fn client_scenario(kind: Kind, n: u8) -> Result<()> {
    let resolv = resolv_conf();
    let mut lab = Lab::new()?;
    lab.si_node(&[
        "subnet",
        "add",
        "lab",
        "--network",
        "10.213.0.0/16",
        "--pool",
        "10.213.100.1-10.213.100.50",
        "--lease-time",
        "6",
    ])?;
    let known = format!("52:54:00:13:{n:02x}:01");
    lab.si_node(&["add", "node1", "--mac", &known, "--ip", "10.213.0.11"])?;
    lab.start(&["--unknown", "discover"])?;

    let c1 = lab.client(&known)?;
    assert_eq!(
        c1.get(kind)?,
        Ipv4Addr::new(10, 213, 0, 11),
        "static address\n{}",
        lab.log()
    );

    let a = lab.client(&format!("52:54:00:13:{n:02x}:0a"))?;
    let b = lab.client(&format!("52:54:00:13:{n:02x}:0b"))?;
    let ia = a.get(kind)?;
    let ib = b.get(kind)?;
    assert!(
        pool_addr(ia) && pool_addr(ib) && ia != ib,
        "pool addresses {ia} {ib}"
    );

    // Renewal: lease 6 s, T1 3 s. Run the client as a daemon and wait for a renewal.
    c1.forget(kind)?;
    let mut d = c1
        .command(kind, false)?
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let renew = wait_for(Duration::from_secs(20), || {
        let e = c1.events().to_lowercase();
        Ok(e.contains("renew") || e.contains("rebind"))
    });
    let _ = d.kill();
    let _ = d.wait();
    if kind == Kind::Dhcpcd {
        let _ = c1.ns.cmd("dhcpcd").args(["-x", &c1.iface]).output();
    }
    renew.with_context(|| {
        format!(
            "{kind:?} did not renew; events:\n{}\nserver:\n{}",
            c1.events(),
            lab.log()
        )
    })?;
    assert_eq!(c1.addr()?, Ipv4Addr::new(10, 213, 0, 11));

    // Restart: b asks first, without remembering anything, and still gets its own address.
    lab.restart()?;
    b.forget(kind)?;
    a.forget(kind)?;
    assert_eq!(
        b.get(kind)?,
        ib,
        "same address after a server restart\n{}",
        lab.log()
    );
    assert_eq!(a.get(kind)?, ia);
    let leases = lab.si_node(&["leases"])?;
    assert!(leases.contains(&ib.to_string()), "{leases}");

    assert_eq!(resolv, resolv_conf(), "/etc/resolv.conf was touched");
    Ok(())
}

#[test]
fn dhclient_static_pool_renew_restart() {
    require_root!();
    client_scenario(Kind::Dhclient, 1).unwrap();
}

#[test]
fn udhcpc_static_pool_renew_restart() {
    require_root!();
    client_scenario(Kind::Udhcpc, 2).unwrap();
}

#[test]
fn dhcpcd_static_pool_renew_restart() {
    require_root!();
    client_scenario(Kind::Dhcpcd, 3).unwrap();
}

#[test]
fn unknown_machines_ignored_by_default() {
    require_root!();
    let mut lab = Lab::new().unwrap();
    lab.si_node(&[
        "subnet",
        "add",
        "lab",
        "--network",
        "10.213.0.0/16",
        "--pool",
        "10.213.100.1-10.213.100.50",
    ])
    .unwrap();
    lab.start(&[]).unwrap();
    let c = lab.client("52:54:00:13:04:01").unwrap();
    let out = c.command(Kind::Udhcpc, true).unwrap().output().unwrap();
    assert!(!out.status.success(), "an unknown machine got an answer");
    assert!(c.addr().is_err());
    assert!(
        lab.log().contains("ignoring unknown machine"),
        "{}",
        lab.log()
    );
}

mod pxe {
    //! A tiny PXE client: DHCP messages built with dhcproto, sent from a thread that has
    //! entered the client's network namespace.
    use super::*;
    use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
    use dhcproto::{Decodable, Decoder, Encodable, Encoder};
    use std::net::{SocketAddrV4, UdpSocket};

    pub fn in_netns<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || -> Result<T> {
            let fd = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering the namespace")?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))?
    }

    pub fn socket(iface: &str, port: u16) -> Result<UdpSocket> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        s.set_reuse_address(true)?;
        s.set_broadcast(true)?;
        s.bind_device(Some(iface.as_bytes()))?;
        s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
        let u: UdpSocket = s.into();
        u.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(u)
    }

    pub fn pxe_message(mac: [u8; 6], t: MessageType, extra: Vec<DhcpOption>) -> Vec<u8> {
        let mut m = Message::new_with_id(
            0x5153_0001,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        m.set_flags(dhcproto::v4::Flags::default().set_broadcast());
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(t));
        o.insert(DhcpOption::ClassIdentifier(
            b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
        ));
        o.insert(DhcpOption::ClientSystemArchitecture(0.into()));
        o.insert(DhcpOption::ClientNetworkInterface(1, 2, 1));
        o.insert(DhcpOption::ClientMachineIdentifier(
            [vec![0u8], vec![0x11; 16]].concat(),
        ));
        o.insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::BootfileName,
            OptionCode::TFTPServerName,
            OptionCode::VendorExtensions,
            OptionCode::ClassIdentifier,
        ]));
        for e in extra {
            o.insert(e);
        }
        let mut b = Vec::new();
        m.encode(&mut Encoder::new(&mut b)).expect("encoding");
        b
    }

    /// Collects replies with our xid for `wait`.
    pub fn collect(s: &UdpSocket, wait: Duration) -> Vec<(Ipv4Addr, Message)> {
        let mut out = Vec::new();
        let t = Instant::now();
        let mut buf = [0u8; 1500];
        while t.elapsed() < wait {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                if let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) {
                    if m.xid() == 0x5153_0001 && m.opcode() == dhcproto::v4::Opcode::BootReply {
                        let ip = match from {
                            std::net::SocketAddr::V4(a) => *a.ip(),
                            _ => continue,
                        };
                        out.push((ip, m));
                    }
                }
            }
        }
        out
    }
}

/// The `file` field up to its first NUL.
fn fname(m: &dhcproto::v4::Message) -> String {
    let f = m.fname().unwrap_or_default();
    let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
    String::from_utf8_lossy(&f[..end]).into_owned()
}

/// A site that already runs DHCP (dnsmasq, addresses only) and si in ProxyDHCP mode: the
/// client gets its address from dnsmasq and its boot file from si, on port 67 and on 4011.
#[test]
fn proxy_dhcp_beside_dnsmasq() {
    use dhcproto::v4::{DhcpOption, MessageType, OptionCode};
    require_root!();
    let mut lab = Lab::new().unwrap();
    // The site's DHCP server, in its own namespace on the same bridge.
    let site = lab.client("52:54:00:13:05:fe").unwrap();
    site.ns
        .ip(&["addr", "add", "10.213.0.2/16", "dev", &site.iface])
        .unwrap();
    let dns_dir = site.dir.clone();
    let mut dnsmasq = site
        .ns
        .cmd("dnsmasq")
        .args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--port=0",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--log-dhcp",
        ])
        .arg(format!("--interface={}", site.iface))
        .arg("--dhcp-range=10.213.150.10,10.213.150.50,255.255.0.0,120")
        .arg(format!(
            "--dhcp-leasefile={}",
            dns_dir.join("dnsmasq.leases").display()
        ))
        .arg(format!(
            "--pid-file={}",
            dns_dir.join("dnsmasq.pid").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dns_dir.join("dnsmasq.log")).unwrap(),
        ))
        .spawn()
        .unwrap();

    lab.si_node(&["subnet", "add", "lab", "--network", "10.213.0.0/16"])
        .unwrap();
    let mac = [0x52, 0x54, 0, 0x13, 0x05, 0x01];
    lab.si_node(&["add", "pxe1", "--mac", "52:54:00:13:05:01"])
        .unwrap();
    lab.start(&["--mode", "proxy"]).unwrap();
    let client = lab.client("52:54:00:13:05:01").unwrap();
    let iface = client.iface.clone();
    std::thread::sleep(Duration::from_millis(500));

    let ns = client.ns.name.clone();
    let iface2 = iface.clone();
    let offers = pxe::in_netns(&ns, move || {
        let s = pxe::socket(&iface2, 68)?;
        let msg = pxe::pxe_message(mac, MessageType::Discover, vec![]);
        let mut all = Vec::new();
        for _ in 0..3 {
            s.send_to(&msg, "255.255.255.255:67")?;
            all.extend(pxe::collect(&s, Duration::from_secs(1)));
            if all
                .iter()
                .any(|(ip, _)| *ip == Ipv4Addr::new(10, 213, 0, 1))
                && all
                    .iter()
                    .any(|(ip, _)| *ip == Ipv4Addr::new(10, 213, 0, 2))
            {
                break;
            }
        }
        Ok(all)
    })
    .unwrap();
    let dnsmasq_log = std::fs::read_to_string(dns_dir.join("dnsmasq.log")).unwrap_or_default();
    let site_offer = offers
        .iter()
        .find(|(ip, _)| *ip == Ipv4Addr::new(10, 213, 0, 2))
        .unwrap_or_else(|| panic!("no offer from dnsmasq: {offers:?}\n{dnsmasq_log}"));
    let yiaddr = site_offer.1.yiaddr();
    assert!(yiaddr.octets()[2] == 150, "dnsmasq's address {yiaddr}");
    let (_, proxy) = offers
        .iter()
        .find(|(ip, _)| *ip == Ipv4Addr::new(10, 213, 0, 1))
        .unwrap_or_else(|| panic!("no ProxyDHCP offer from si: {offers:?}\n{}", lab.log()));
    assert_eq!(
        proxy.yiaddr(),
        Ipv4Addr::UNSPECIFIED,
        "ProxyDHCP must not offer an address"
    );
    assert_eq!(proxy.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(proxy.siaddr(), Ipv4Addr::new(10, 213, 0, 1));
    assert_eq!(fname(proxy), "undionly.kpxe");
    assert_eq!(
        proxy.opts().get(OptionCode::BootfileName),
        Some(&DhcpOption::BootfileName(b"undionly.kpxe\0".to_vec()))
    );
    assert_eq!(
        proxy.opts().get(OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
    );
    assert!(proxy.opts().get(OptionCode::AddressLeaseTime).is_none());

    // The client takes dnsmasq's address, then asks the boot server on port 4011.
    client
        .ns
        .ip(&["addr", "add", &format!("{yiaddr}/16"), "dev", &iface])
        .unwrap();
    let iface3 = iface.clone();
    let acks = pxe::in_netns(&ns, move || {
        let s = pxe::socket(&iface3, 4011)?;
        let msg = pxe::pxe_message(mac, MessageType::Request, vec![]);
        let mut all = Vec::new();
        for _ in 0..3 {
            s.send_to(&msg, "10.213.0.1:4011")?;
            all.extend(pxe::collect(&s, Duration::from_secs(1)));
            if !all.is_empty() {
                break;
            }
        }
        Ok(all)
    })
    .unwrap();
    let (_, ack) = acks
        .first()
        .unwrap_or_else(|| panic!("no answer on 4011\n{}", lab.log()));
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(fname(ack), "undionly.kpxe");
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
}
