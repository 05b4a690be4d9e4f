//! An install wave end to end: the real si-server in a master namespace with a bridge
//! (10.213.160.0/24), three nodes armed for install of one image in their own namespaces, each
//! running `si-install` (outside a boot: `--cmdline`, `--target`, loop disks, as
//! tests/tests/installer.rs does). The master plans the wave (a threshold of one byte makes it
//! chain; fanout 1 with two racks strings the racks' chains into one: node0 → node1 → node2)
//! and hands each installer its relay section; every node enrolls, then pulls through the
//! chain, presenting its new certificate to its neighbours. Each node's tree must end exactly
//! equal to the image, nodes 1 and 2 must get every object from their predecessor, and the
//! master's egress (its bridge's transmit counter) must stay near one payload.

use si_tests::{
    bin, fixtures, rand_bytes, require_root, run, treecmp, wait_port, Bridged, LoopDisks, Proc,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NET: u8 = 160;
const N: usize = 3;
const RELAY_PORT: u16 = 7812;

/// One disk, one filesystem: what every node of the wave installs.
const LAYOUT: &str = r#"
format = 2
firmware = "bios"

[[disk]]
name = "a"
table = "msdos"
[[disk.partition]]
number = 1
size = 0
grow = true
type = "0x83"

[[filesystem]]
device = "a1"
type = "ext4"
mountpoint = "/"
"#;

/// What the installer writes on purpose, left out of the comparison with the image.
const CONFIGURED: &[&str] = &[
    "etc/fstab",
    "etc/hostname",
    "etc/hosts",
    "etc/machine-id",
    "etc/ssh",
    "etc/systemd",
    "etc/si",
    "var/lib/si",
    "var/log/si-install.log",
    "lost+found",
];

/// The image: every special case (special.sh), an /etc the installer configures, and 24 MiB
/// of noise, so the payload dwarfs what the master says besides.
fn make_image(src: &Path) {
    run(Command::new("bash")
        .arg(fixtures().join("special.sh"))
        .arg(src))
    .unwrap();
    for d in ["var/lib/app", "var/log", "etc/ssh", "tmp", "boot"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    std::fs::write(src.join("var/lib/app/big.bin"), rand_bytes(24 << 20, 160)).unwrap();
    std::fs::write(src.join("boot/vmlinuz-test"), rand_bytes(1 << 20, 161)).unwrap();
    std::fs::write(src.join("etc/hostname"), "golden\n").unwrap();
    std::fs::write(
        src.join("etc/hosts"),
        "127.0.0.1\tlocalhost\n127.0.1.1\tgolden\n",
    )
    .unwrap();
}

/// Bytes the master has sent (its bridge's transmit counter: what it sent itself, not what
/// the bridge forwarded between nodes).
fn master_tx(lab: &Bridged) -> u64 {
    let out = lab.master.ip(&["-s", "-j", "link", "show", "br0"]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["stats64"]["tx"]["bytes"].as_u64().unwrap()
}

fn mac(i: usize) -> String {
    format!("52:54:00:16:00:{i:02x}")
}

fn addr(i: usize) -> String {
    format!("10.213.{NET}.{}", 10 + i)
}

/// `relay: OBJECTS objects (BYTES bytes) from UPSTREAM` lines of an install's output.
fn relay_lines(out: &str) -> Vec<(u64, u64, String)> {
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("relay: ")?;
            let (objs, rest) = rest.split_once(" objects (")?;
            let (bytes, up) = rest.split_once(" bytes) from ")?;
            Some((objs.parse().ok()?, bytes.parse().ok()?, up.to_string()))
        })
        .collect()
}

/// The objects the version needs, from `pulled IMAGE@V through the wave: N objects, ...`.
fn pulled_objects(out: &str) -> Option<u64> {
    out.lines().find_map(|l| {
        let rest = l.split_once(" through the wave: ")?.1;
        rest.split_once(" objects")?.0.parse().ok()
    })
}

#[test]
fn three_nodes_install_in_one_wave_through_the_chain() {
    require_root!();
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = t.path().join("golden");
    make_image(&src);
    let store = t.path().join("store");
    run(Command::new(bin("si-image"))
        .arg("--store")
        .arg(&store)
        .arg("commit")
        .arg(&src)
        .arg("img"))
    .unwrap();

    // The inventory: a subnet, a group with the layout and the image, three armed nodes in two
    // racks.
    let state = t.path().join("state");
    std::fs::create_dir_all(state.join("layouts")).unwrap();
    std::fs::write(state.join("layouts/wave.toml"), LAYOUT).unwrap();
    let inv = |args: &[&str], tool: &str| {
        run(Command::new(bin(tool))
            .arg("--state-dir")
            .arg(&state)
            .args(["--images", "img"])
            .args(args))
        .unwrap()
    };
    inv(
        &[
            "subnet",
            "add",
            "wave",
            "--network",
            &format!("10.213.{NET}.0/24"),
        ],
        "si-node",
    );
    inv(
        &["add", "compute", "--image", "img", "--disk-layout", "wave"],
        "si-group",
    );
    for (i, rack) in ["r1", "r1", "r2"].iter().enumerate() {
        inv(
            &[
                "add",
                &format!("node{i}"),
                "--mac",
                &mac(i),
                "--ip",
                &addr(i),
                "--group",
                "compute",
                "--rack",
                rack,
            ],
            "si-node",
        );
    }
    let shown = String::from_utf8_lossy(&inv(&["show", "node2"], "si-node").stdout).to_string();
    assert!(shown.contains("rack: r2"), "{shown}");

    let lab = Bridged::new(NET, N, 10).unwrap();
    // Each installer enrolls with the MAC of its interface: the inventory's.
    for i in 0..N {
        let l = &lab.links[i];
        lab.nodes[i]
            .sh(&format!(
                "ip link set {l} down && ip link set {l} address {} && ip link set {l} up",
                mac(i)
            ))
            .unwrap();
    }
    let server_log = t.path().join("server.log");
    let server = Proc(
        lab.master
            .cmd(bin("si-server"))
            .env("RUST_LOG", "info")
            .arg("--ca-dir")
            .arg(&si_tests::test_ca().dir)
            .arg("--store")
            .arg(&store)
            .arg("--state-dir")
            .arg(&state)
            .args(["--listen", "0.0.0.0:7811"])
            .args(["--broadcast-direct-below", "1", "--broadcast-fanout", "1"])
            .args(["--relay-port", &RELAY_PORT.to_string()])
            .stderr(std::fs::File::create(&server_log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_port(&lab.master, "127.0.0.1:7811").unwrap();
    let tokens: Vec<String> = (0..N)
        .map(|i| {
            let out = run(Command::new(bin("si-server"))
                .arg("--state-dir")
                .arg(&state)
                .arg("--ca-dir")
                .arg(&si_tests::test_ca().dir)
                .args(["ca", "token", &format!("node{i}")]))
            .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .collect();

    let mut loops = LoopDisks::new(t.path(), &[192; N]);
    let before = master_tx(&lab);
    let started = Instant::now();
    let out_of = |i: usize| t.path().join(format!("node{i}.out"));
    let err_of = |i: usize| t.path().join(format!("node{i}.err"));
    let mut kids: Vec<Option<Child>> = (0..N)
        .map(|i| {
            let cmdline = format!(
                "si.server=10.213.{NET}.1 si.ca={} si.node=node{i} si.token={} si.firmware=bios si.disks=/dev/{}",
                si_tests::test_ca().pin,
                tokens[i],
                loops.devs[i]
            );
            Some(
                lab.nodes[i]
                    .cmd(bin("si-install"))
                    .env("RUST_LOG", "info")
                    .arg("--cmdline")
                    .arg(cmdline)
                    .arg("--target")
                    .arg(t.path().join(format!("target{i}")))
                    .stdin(Stdio::null())
                    .stdout(std::fs::File::create(out_of(i)).unwrap())
                    .stderr(std::fs::File::create(err_of(i)).unwrap())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let logs = || {
        (0..N)
            .map(|i| {
                format!(
                    "--- node{i} stdout\n{}\n--- node{i} stderr\n{}",
                    read(out_of(i)),
                    read(err_of(i))
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Every installer exits by itself (a deadline on that event, no sleep as synchronisation).
    let deadline = Duration::from_secs(900);
    let mut ok = [false; N];
    while kids.iter().any(Option::is_some) {
        for (i, k) in kids.iter_mut().enumerate() {
            if let Some(st) = k.as_mut().and_then(|c| c.try_wait().unwrap()) {
                ok[i] = st.success();
                *k = None;
            }
        }
        assert!(
            started.elapsed() < deadline,
            "installs still running after {deadline:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let secs = started.elapsed().as_secs_f64();
    let sent = master_tx(&lab) - before;
    drop(server);
    for (i, ok) in ok.iter().enumerate() {
        assert!(ok, "node{i} failed\n{}", logs());
    }

    // The master planned one wave, and told each node its place.
    let slog = si_tests::strip_ansi(&read(server_log.clone()));
    assert!(slog.matches("install wave planned").count() >= N, "{slog}");

    // Who gave whom what: node0 everything from the master, node1 from node0, node2 from
    // node1, with no reattach.
    let mut payload = 0;
    let mut per_node = Vec::new();
    for i in 0..N {
        let out = read(out_of(i));
        let from = relay_lines(&out);
        let total = pulled_objects(&out)
            .unwrap_or_else(|| panic!("node{i} did not pull through the wave:\n{out}"));
        let want = if i == 0 {
            format!("master 10.213.{NET}.1")
        } else {
            format!("node{}@{}:{RELAY_PORT}", i - 1, addr(i - 1))
        };
        assert_eq!(from.len(), 1, "node{i}: {from:?}\n{out}");
        assert_eq!(from[0].2, want, "node{i}: {from:?}");
        assert_eq!(from[0].0, total, "node{i}: {from:?}");
        assert!(out.contains("reattaches"), "{out}");
        if i == 0 {
            payload = from[0].1;
        }
        per_node.push(from[0].clone());
    }
    assert!(payload > 24 << 20, "payload {payload}");
    assert!(
        (sent as f64) < 1.5 * payload as f64,
        "the master sent {sent} bytes for a payload of {payload}"
    );

    // Each tree is the image exactly, and its install log (on the node's disk) says where its
    // objects came from.
    for (i, d) in loops.devs.clone().iter().enumerate() {
        let m = t.path().join(format!("check{i}"));
        std::fs::create_dir_all(&m).unwrap();
        run(Command::new("mount")
            .arg(si_tests::partition_node(d, 1))
            .arg(&m))
        .unwrap();
        loops.mounts.push(m.clone());
        treecmp(&src, &m, CONFIGURED).unwrap_or_else(|e| panic!("node{i}: {e:#}"));
        let log = std::fs::read_to_string(m.join("var/log/si-install.log")).unwrap();
        let line = format!(
            "relay: {} objects ({} bytes) from {}",
            per_node[i].0, per_node[i].1, per_node[i].2
        );
        assert!(log.contains(&line), "node{i}: {line:?} not in\n{log}");
        assert_eq!(
            std::fs::read_to_string(m.join("etc/hostname")).unwrap(),
            format!("node{i}\n")
        );
        run(Command::new("umount").arg(&m)).unwrap();
        loops.mounts.pop();
    }
    eprintln!(
        "WAVE FIGURES: {N} nodes installed in {secs:.1}s; payload {payload} bytes; master sent {sent} bytes ({:.2}x); {per_node:?}",
        sent as f64 / payload as f64
    );
}
