//! Shared helpers for si's end-to-end tests (the tests themselves are in `tests/tests/`).
//!
//! Privileged tests call [`require_root!`] first: without root they print why they skip and
//! return. Network tests create namespaces through [`Netns`], named `si-t<pid>-<n>`, and only
//! ever use addresses in 10.213.0.0/16 inside them; leftovers of dead test processes are removed
//! by [`Netns::new`], and every namespace is deleted on drop.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

pub fn is_root() -> bool {
    nix_geteuid() == 0
}

fn nix_geteuid() -> u32 {
    // Read from /proc to avoid an unsafe libc call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        })
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

/// Returns from the calling test, with a message, unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!(
                "SKIP {}: needs root (network namespaces, loop devices, mknod); CI runs it as root",
                module_path!()
            );
            return;
        }
    };
}

/// Path of a binary of the workspace (built by `cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the README's test command does)",
        p.display()
    );
    p
}

/// `tests/fixtures/`: the scripts that make trees and the independent comparison.
pub fn fixtures() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Builds the cached debootstrap tree `variant` (`small` or `big`) into `dest`.
pub fn rootfs(dest: &std::path::Path, variant: &str) -> Result<()> {
    run(Command::new("bash")
        .arg(fixtures().join("rootfs.sh"))
        .arg(dest)
        .arg(variant))
    .map(|_| ())
}

/// Compares two trees with `treecmp.py` (an independent walk, no si code); fails on any
/// difference outside `ignore`.
pub fn treecmp(a: &std::path::Path, b: &std::path::Path, ignore: &[&str]) -> Result<()> {
    let mut c = Command::new("python3");
    c.arg(fixtures().join("treecmp.py")).arg(a).arg(b);
    for i in ignore {
        c.args(["--ignore", i]);
    }
    let out = run(&mut c)?;
    eprintln!(
        "{}",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
    );
    Ok(())
}

/// Runs a command, failing with its output if it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

pub fn sh(script: &str) -> Result<Output> {
    run(Command::new("sh").arg("-ec").arg(script))
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace that exists for the life of the value.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Result<Netns> {
        remove_stale_namespaces();
        let name = format!(
            "si-t{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command to run inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    pub fn sh(&self, script: &str) -> Result<Output> {
        run(self.cmd("sh").arg("-ec").arg(script))
    }

    /// Connects `self` and `other` by a veth pair and gives each side an address (CIDR).
    /// Returns the interface names (this side, other side).
    pub fn link(&self, addr: &str, other: &Netns, other_addr: &str) -> Result<(String, String)> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let a = format!("sv{}a{n}", std::process::id() % 100000);
        let b = format!("sv{}b{n}", std::process::id() % 100000);
        run(Command::new("ip").args([
            "link",
            "add",
            &a,
            "netns",
            &self.name,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &other.name,
        ]))?;
        self.ip(&["addr", "add", addr, "dev", &a])?;
        self.ip(&["link", "set", &a, "up"])?;
        other.ip(&["addr", "add", other_addr, "dev", &b])?;
        other.ip(&["link", "set", &b, "up"])?;
        Ok((a, b))
    }
}

/// A master namespace with a bridge at 10.213.`net`.1/24 and node namespaces on it, each
/// joined by a veth pair, node `i` at 10.213.`net`.`first + i`/24.
pub struct Bridged {
    pub master: Netns,
    pub nodes: Vec<Netns>,
    /// The master-side end of each node's link (on the bridge).
    pub ports: Vec<String>,
    /// The node-side end of each node's link.
    pub links: Vec<String>,
}

/// A veth pair from `a`'s namespace to `b`'s; returns the two ends' names.
fn veth(a: &Netns, b: &Netns) -> Result<(String, String)> {
    let k = COUNTER.fetch_add(1, Ordering::SeqCst);
    let x = format!("sb{}m{k}", std::process::id() % 100000);
    let y = format!("sb{}n{k}", std::process::id() % 100000);
    run(Command::new("ip").args([
        "link", "add", &x, "netns", &a.name, "type", "veth", "peer", "name", &y, "netns", &b.name,
    ]))?;
    Ok((x, y))
}

impl Bridged {
    pub fn new(net: u8, n: usize, first: u8) -> Result<Bridged> {
        let master = Netns::new()?;
        master.sh(&format!(
            "ip link add br0 type bridge && ip addr add 10.213.{net}.1/24 dev br0 && ip link set br0 up"
        ))?;
        let nodes: Vec<Netns> = (0..n).map(|_| Netns::new()).collect::<Result<_>>()?;
        let (mut ports, mut links) = (Vec::new(), Vec::new());
        for (i, node) in nodes.iter().enumerate() {
            let (a, b) = veth(&master, node)?;
            master.sh(&format!("ip link set {a} master br0 up"))?;
            node.sh(&format!(
                "ip addr add 10.213.{net}.{}/24 dev {b} && ip link set {b} up",
                usize::from(first) + i
            ))?;
            ports.push(a);
            links.push(b);
        }
        Ok(Bridged {
            master,
            nodes,
            ports,
            links,
        })
    }
}

/// Racks on one segment: the master's namespace holds the core bridge (br0,
/// 10.213.`net`.1/24); each rack is a namespace of its own with a bridge (its top-of-rack
/// switch) joined to br0 by one veth pair, the rack's uplink; the rack's nodes hang off its
/// bridge. Node `i` (racks in order, `per_rack` each) is at 10.213.`net`.`first + i`/24.
pub struct Racked {
    /// `ports` are the switch-side ends of the nodes' links (in `switches[rack]`).
    pub net: Bridged,
    pub switches: Vec<Netns>,
    /// The master-side end of each rack's uplink (on br0): its transmit counter is what went
    /// into the rack, its receive counter what came out.
    pub uplinks: Vec<String>,
    /// The switch-side end of each rack's uplink (in `switches[rack]`).
    pub trunks: Vec<String>,
}

impl Racked {
    pub fn new(net: u8, racks: usize, per_rack: usize, first: u8) -> Result<Racked> {
        let master = Netns::new()?;
        master.sh(&format!(
            "ip link add br0 type bridge && ip addr add 10.213.{net}.1/24 dev br0 && ip link set br0 up"
        ))?;
        let (mut switches, mut uplinks, mut trunks) = (Vec::new(), Vec::new(), Vec::new());
        let (mut nodes, mut ports, mut links) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..racks {
            let sw = Netns::new()?;
            sw.sh("ip link add br0 type bridge && ip link set br0 up")?;
            let (up, down) = veth(&master, &sw)?;
            master.sh(&format!("ip link set {up} master br0 up"))?;
            sw.sh(&format!("ip link set {down} master br0 up"))?;
            for j in 0..per_rack {
                let node = Netns::new()?;
                let (a, b) = veth(&sw, &node)?;
                sw.sh(&format!("ip link set {a} master br0 up"))?;
                node.sh(&format!(
                    "ip addr add 10.213.{net}.{}/24 dev {b} && ip link set {b} up",
                    usize::from(first) + r * per_rack + j
                ))?;
                nodes.push(node);
                ports.push(a);
                links.push(b);
            }
            switches.push(sw);
            uplinks.push(up);
            trunks.push(down);
        }
        Ok(Racked {
            net: Bridged {
                master,
                nodes,
                ports,
                links,
            },
            switches,
            uplinks,
            trunks,
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process killed on drop.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until a server's log shows every needle (it is ready), failing if it exits first or
/// takes more than 10 s.
pub fn wait_for_log(
    log: &std::path::Path,
    needles: &[&str],
    child: &mut std::process::Child,
) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if needles.iter().all(|n| text.contains(n)) {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!("exited ({st}) before it was ready:\n{text}");
        }
        if start.elapsed() > std::time::Duration::from_secs(10) {
            bail!("not ready after 10 s:\n{text}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Waits until `addr` accepts TCP connections inside `ns` (or fails after ~10 s).
pub fn wait_port(ns: &Netns, addr: &str) -> Result<()> {
    let (host, port) = addr.rsplit_once(':').context("addr needs a port")?;
    for _ in 0..200 {
        let ok = ns
            .cmd("bash")
            .arg("-c")
            .arg(format!("exec 3<>/dev/tcp/{host}/{port}"))
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bail!("{addr} never accepted connections")
}

/// Deletes `si-t<pid>-*` namespaces whose test process is gone.
pub fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("si-t") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        // Only names of our own form (`si-t<pid>-<n>`): benchmarks use other `si-t*` names.
        let ours = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
        if ours && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), for test content that does not compress.
pub fn rand_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The CA every si-server a test process starts uses (`--ca-dir`), made once per process by the
/// real `si-server ca show`, and the fingerprint clients pin (`--ca-fingerprint` or the
/// `SI_CA_FINGERPRINT` environment variable).
pub struct TestCa {
    pub dir: PathBuf,
    pub pin: String,
}

pub fn test_ca() -> &'static TestCa {
    static CA: std::sync::OnceLock<TestCa> = std::sync::OnceLock::new();
    CA.get_or_init(|| {
        let t = tempfile::Builder::new()
            .prefix("si-test-ca")
            .tempdir()
            .expect("making the test CA's directory");
        // Kept for the life of the test process.
        let root = t.keep();
        let dir = root.join("ca");
        let out = run(Command::new(bin("si-server"))
            .arg("--state-dir")
            .arg(&root)
            .arg("--ca-dir")
            .arg(&dir)
            .args(["ca", "show"]))
        .expect("si-server ca show");
        let text = String::from_utf8_lossy(&out.stdout);
        let pin = text
            .lines()
            .find_map(|l| l.strip_prefix("fingerprint:"))
            .map(|f| f.trim().to_string())
            .unwrap_or_else(|| panic!("no fingerprint in: {text}"));
        assert!(pin.starts_with("sha256:"), "{pin}");
        TestCa { dir, pin }
    })
}

/// A workspace binary built static for the boot package (`RUSTFLAGS='-C
/// target-feature=+crt-static' cargo build -p si-installer --target x86_64-unknown-linux-gnu`,
/// as .ci/run does): `target/x86_64-unknown-linux-gnu/<profile>/<name>`, if it was built.
pub fn static_bin(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/deps/<test>
    let profile_dir = exe.parent()?.parent()?;
    let profile = profile_dir.file_name()?;
    let p = profile_dir
        .parent()?
        .join("x86_64-unknown-linux-gnu")
        .join(profile)
        .join(name);
    p.exists().then_some(p)
}

/// `text` without ANSI escape sequences (colours in logs, cursor moves on a serial console), for
/// matching and for readable failures.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut esc = false;
    for c in text.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, c) if c.is_ascii_alphabetic() => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// A TCP relay inside a namespace that holds every byte for `delay` in each direction before
/// passing it on: the latency of a long link, for kernels without netem. A client in `ns`
/// dials the returned address instead of `upstream`; the relay dials `upstream` from `ns` too,
/// so the far side sees the client's namespace address. TLS and the si protocol pass through
/// untouched. The relay lives as long as the test process (its threads block in accept/read).
pub fn delay_proxy(
    ns: &Netns,
    upstream: std::net::SocketAddr,
    delay: std::time::Duration,
) -> Result<std::net::SocketAddr> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let path = format!("/run/netns/{}", ns.name);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let bound = (|| -> Result<TcpListener> {
            let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // This thread only (and the threads it starts) enter the namespace.
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering the namespace")?;
            Ok(TcpListener::bind("127.0.0.1:0")?)
        })();
        let l = match bound {
            Ok(l) => {
                let _ = tx.send(l.local_addr().map_err(anyhow::Error::from));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        // One direction: read, stamp, hand to a writer that sends each piece when it is due.
        fn pump(mut from: TcpStream, mut to: TcpStream, delay: std::time::Duration) {
            let (q, due) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
            std::thread::spawn(move || {
                for (at, piece) in due {
                    if let Some(wait) = at.checked_duration_since(std::time::Instant::now()) {
                        std::thread::sleep(wait); // the emulated latency, not a synchronisation
                    }
                    if to.write_all(&piece).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
            // Pieces of about one segment: written one by one, they leave as packets of their
            // own, so a loss rule on the link counts packets, not 64 KiB GSO batches.
            let mut buf = vec![0u8; 1400];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if q.send((std::time::Instant::now() + delay, buf[..n].to_vec()))
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        }
        for client in l.incoming().flatten() {
            let Ok(server) = TcpStream::connect(upstream) else {
                continue;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                continue;
            };
            std::thread::spawn(move || pump(client, s2, delay));
            std::thread::spawn(move || pump(server, c2, delay));
        }
    });
    rx.recv().context("the delay proxy's thread")?
}

/// Loop devices backed by sparse files; detached (with whatever is on them) on drop.
pub struct LoopDisks {
    /// Kernel names (`loop3`).
    pub devs: Vec<String>,
    /// Mounted by the test: unmounted (lazily, last first) on drop.
    pub mounts: Vec<PathBuf>,
    /// Volume groups the test made: deactivated on drop.
    pub vgs: Vec<String>,
}

impl LoopDisks {
    /// One disk per size (MiB), each a sparse file in `dir` on a loop device with partitions
    /// scanned.
    pub fn new(dir: &std::path::Path, sizes_mib: &[u64]) -> LoopDisks {
        let mut devs = Vec::new();
        for (i, s) in sizes_mib.iter().enumerate() {
            let f = dir.join(format!("disk{i}.img"));
            std::fs::File::create(&f).unwrap().set_len(s << 20).unwrap();
            let out = run(Command::new("losetup").args(["-f", "--show", "-P"]).arg(&f)).unwrap();
            devs.push(
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .trim_start_matches("/dev/")
                    .to_string(),
            );
        }
        LoopDisks {
            devs,
            mounts: vec![],
            vgs: vec![],
        }
    }
}

impl Drop for LoopDisks {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        for vg in &self.vgs {
            let _ = Command::new("lvm").args(["vgchange", "-an", vg]).output();
        }
        for d in &self.devs {
            // Arrays on our partitions.
            if let Ok(rd) = std::fs::read_dir(format!("/sys/class/block/{d}")) {
                for e in rd.flatten() {
                    if let Ok(h) = std::fs::read_dir(e.path().join("holders")) {
                        for x in h.flatten() {
                            let _ = Command::new("mdadm")
                                .arg("--stop")
                                .arg(std::path::Path::new("/dev").join(x.file_name()))
                                .output();
                        }
                    }
                }
            }
            let _ = Command::new("partx")
                .args(["-d", &format!("/dev/{d}")])
                .output();
            let _ = Command::new("losetup")
                .args(["-d", &format!("/dev/{d}")])
                .output();
        }
    }
}

/// The device node of partition `n` of `disk`, found through sysfs (never by appending a digit).
pub fn partition_node(disk: &str, n: u32) -> PathBuf {
    for e in std::fs::read_dir(format!("/sys/class/block/{disk}"))
        .unwrap()
        .flatten()
    {
        if std::fs::read_to_string(e.path().join("partition"))
            .is_ok_and(|s| s.trim() == n.to_string())
        {
            return std::path::Path::new("/dev").join(e.file_name());
        }
    }
    panic!("{disk} has no partition {n}");
}
