//! Deploy, differential update, resume and push, end to end over the real binaries: one master
//! and several nodes, each in its own network namespace with its own address (10.213.0.0/16).

use si_tests::{bin, require_root, rootfs, run, treecmp, wait_port, Netns, Proc};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn si_image(store: &Path) -> Command {
    let mut c = Command::new(bin("si-image"));
    c.arg("--store").arg(store);
    c
}

fn start_server(master: &Netns, store: &Path) -> Proc {
    let p = master
        .cmd(bin("si-server"))
        .arg("--ca-dir")
        .arg(&si_tests::test_ca().dir)
        .arg("--store")
        .arg(store)
        .arg("--state-dir")
        .arg(store.with_extension("state"))
        .args(["--listen", "0.0.0.0:7811"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(master, "127.0.0.1:7811").unwrap();
    Proc(p)
}

/// Enrolls a node as its installer would: the inventory learns it (a MAC, image debian), an
/// install is armed (which opens its one-time enrollment), the master gives its token, and
/// si-enroll in the node's namespace keeps key and certificate in `id_dir`. Returns `id_dir`.
fn enroll(
    node: &Netns,
    server: &str,
    store: &Path,
    name: &str,
    id_dir: &Path,
) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let i = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mac = format!("52:54:00:13:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff);
    let state = store.with_extension("state");
    let si_node = |args: &[&str]| {
        run(Command::new(bin("si-node"))
            .arg("--state-dir")
            .arg(&state)
            .args(["--images", "debian"])
            .args(args))
        .unwrap()
    };
    si_node(&[
        "add", name, "--mac", &mac, "--image", "debian", "--boot", "local",
    ]);
    si_node(&["set", name, "--boot", "install"]);
    let out = run(Command::new(bin("si-server"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--ca-dir")
        .arg(&si_tests::test_ca().dir)
        .args(["ca", "token", name]))
    .unwrap();
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    run(node
        .cmd(bin("si-enroll"))
        .env("SI_CA_FINGERPRINT", &si_tests::test_ca().pin)
        .args([
            "--server", server, "--node", name, "--token", &token, "--mac", &mac,
        ])
        .args(["--uuid", &format!("uuid-{name}")])
        .arg("--identity-dir")
        .arg(id_dir))
    .unwrap();
    id_dir.to_path_buf()
}

fn update(node: &Netns, server: &str, root: &Path, extra: &[&str]) -> std::process::Output {
    let summary = root.with_extension("json");
    let out = node
        .cmd(bin("si-updateclient"))
        .env("SI_CA_FINGERPRINT", &si_tests::test_ca().pin)
        .args([
            "--server",
            server,
            "--image",
            "debian",
            "--no-default-excludes",
        ])
        .arg("--root")
        .arg(root)
        .arg("--state-dir")
        .arg(root.with_extension("state"))
        .arg("--summary-json")
        .arg(&summary)
        .arg("--identity-dir")
        .arg(root.with_extension("id"))
        .args(extra)
        .output()
        .unwrap();
    out
}

fn summary(root: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(root.with_extension("json")).unwrap()).unwrap()
}

fn rand_file(p: &Path, mb: usize, seed: u64) {
    run(Command::new("sh").arg("-c").arg(format!(
        "openssl enc -aes-128-ctr -nosalt -pass pass:{seed} < /dev/zero 2>/dev/null | head -c {}M > {}",
        mb,
        p.display()
    )))
    .unwrap();
}

#[test]
fn deploy_update_and_resume_across_namespaces() {
    require_root!();
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = t.path().join("golden");
    rootfs(&src, "small").unwrap();
    rand_file(&src.join("var/big.img"), 200, 1);
    let store = t.path().join("store");
    run(si_image(&store).arg("commit").arg(&src).arg("debian")).unwrap();

    let master = Netns::new().unwrap();
    let nodes: Vec<Netns> = (0..3).map(|_| Netns::new().unwrap()).collect();
    let mut links = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        links.push(
            master
                .link(
                    &format!("10.213.{}.1/24", i + 1),
                    n,
                    &format!("10.213.{}.2/24", i + 1),
                )
                .unwrap(),
        );
    }
    let server = start_server(&master, &store);

    // Fresh deploys on three nodes, compared exactly with the golden tree.
    for (i, n) in nodes.iter().enumerate() {
        let root = t.path().join(format!("node{i}"));
        enroll(
            n,
            &format!("10.213.{}.1", i + 1),
            &store,
            &format!("node{i}"),
            &root.with_extension("id"),
        );
        let out = update(n, &format!("10.213.{}.1", i + 1), &root, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        treecmp(&src, &root, &[]).unwrap();
    }

    // Version 2: files added, changed (1 MiB inside the 200 MiB file), deleted, a file turned
    // into a directory and a directory into a symlink.
    std::fs::write(src.join("etc/added.conf"), b"new\n").unwrap();
    std::fs::write(src.join("etc/motd"), b"changed\n").unwrap();
    run(Command::new("sh").arg("-c").arg(format!(
        "head -c 1M /dev/urandom | dd of={} bs=1M seek=100 conv=notrunc status=none",
        src.join("var/big.img").display()
    )))
    .unwrap();
    std::fs::remove_file(src.join("etc/issue.net")).unwrap();
    std::fs::remove_file(src.join("etc/issue")).unwrap();
    std::fs::create_dir(src.join("etc/issue")).unwrap();
    std::fs::write(src.join("etc/issue/inside"), b"x\n").unwrap();
    std::fs::remove_dir_all(src.join("usr/share/doc/apt")).unwrap();
    std::os::unix::fs::symlink("dpkg", src.join("usr/share/doc/apt")).unwrap();
    run(si_image(&store).arg("commit").arg(&src).arg("debian")).unwrap();
    let root = t.path().join("node0");
    let out = update(&nodes[0], "10.213.1.1", &root, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    treecmp(&src, &root, &[]).unwrap();
    let s = summary(&root);
    assert_eq!(s["version"], 2);
    let wire = s["wire_bytes"].as_u64().unwrap();
    assert!(
        wire < 4 << 20,
        "1 MiB changed inside 200 MiB moved {wire} bytes"
    );

    // Kill the master halfway through a deploy; the node resumes and ends exact.
    let (mif, _) = &links[1];
    master
        .sh(&format!(
            "tc qdisc add dev {mif} root tbf rate 200mbit burst 64kb latency 100ms"
        ))
        .unwrap();
    let root1 = t.path().join("node-resume");
    // Node 1 deploying into another root: the identity it enrolled with.
    std::os::unix::fs::symlink(t.path().join("node1.id"), root1.with_extension("id")).unwrap();
    let child = nodes[1]
        .cmd(bin("si-updateclient"))
        .env("SI_CA_FINGERPRINT", &si_tests::test_ca().pin)
        .args([
            "--server",
            "10.213.2.1",
            "--image",
            "debian",
            "--no-default-excludes",
        ])
        .arg("--root")
        .arg(&root1)
        .arg("--state-dir")
        .arg(root1.with_extension("state"))
        .arg("--identity-dir")
        .arg(root1.with_extension("id"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let big = root1.join("var/big.img");
    for _ in 0..600 {
        if big.metadata().map(|m| m.len() > 40 << 20).unwrap_or(false) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(server);
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the pull should have failed when the master died"
    );
    let server = start_server(&master, &store);
    let out = update(&nodes[1], "10.213.2.1", &root1, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    treecmp(&src, &root1, &[]).unwrap();
    let s = summary(&root1);
    assert!(
        s["local_objects"].as_u64().unwrap() > 0,
        "what was already in place is reused: {s}"
    );
    drop(server);
}

/// A master namespace with a bridge at 10.213.`net`.1/24 and `n` node namespaces on it
/// (10.213.`net`.11, .12, ...), each joined by a veth pair.
fn bridged(net: u8, n: usize) -> si_tests::Bridged {
    si_tests::Bridged::new(net, n, 11).unwrap()
}

/// Enrolls `name` from `node` (identity in ROOT.id) and starts its si-agentd on port 7812,
/// updating `root` from `server`; returns once the agent listens.
fn start_agent(node: &Netns, server: &str, store: &Path, name: &str, root: &Path) -> Proc {
    std::fs::create_dir_all(root).unwrap();
    let id = enroll(node, server, store, name, &root.with_extension("id"));
    let p = Proc(
        node.cmd(bin("si-agentd"))
            .arg("--identity-dir")
            .arg(&id)
            .env("SI_CA_FINGERPRINT", &si_tests::test_ca().pin)
            .args(["--listen", "0.0.0.0:7812", "--master", server])
            .arg("--root")
            .arg(root)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(node, "127.0.0.1:7812").unwrap();
    p
}

/// si-pushupdate to eight nodes' si-agentd over TLS (the master's certificate from the CA;
/// no shared token), one of them down: seven update, the eighth is reported with why. The
/// push carries a per-node bandwidth cap, and each agent says it updated under it.
#[test]
fn push_to_eight_nodes_with_one_down() {
    require_root!();
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = t.path().join("golden");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/role"), b"compute\n").unwrap();
    let store = t.path().join("store");
    run(si_image(&store).arg("commit").arg(&src).arg("debian")).unwrap();
    // One boot network: a bridge in the master's namespace, each node on it by a veth pair.
    let si_tests::Bridged { master, nodes, .. } = bridged(9, 8);
    let _server = start_server(&master, &store);
    let mut agents = Vec::new();
    for (i, n) in nodes.iter().enumerate().take(7) {
        let root = t.path().join(format!("node{i}"));
        agents.push(start_agent(
            n,
            "10.213.9.1",
            &store,
            &format!("node{i}"),
            &root,
        ));
    }
    // Node 8 (10.213.9.18) is down: its namespace runs no agent.
    let results = t.path().join("results");
    let out = master
        .cmd(bin("si-pushupdate"))
        .args([
            "10.213.9.[11-18]",
            "--server",
            "10.213.9.1",
            "--image",
            "debian",
            "--timeout",
            "30",
            "--fanout",
            "4",
            // A per-node cap (well above what the test moves): it reaches each agent.
            "--max-rate-kbit",
            "100000",
        ])
        .arg("--ca-dir")
        .arg(&si_tests::test_ca().dir)
        .arg("--results")
        .arg(&results)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a failed node makes the push fail");
    assert!(stdout.contains("7 succeeded, 1 failed"), "{stdout}");
    assert!(stdout.contains("FAILED 10.213.9.18"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("at most 100000 kbit/s").count(),
        7,
        "each agent ran its update under the cap: {stderr}"
    );
    let ok = std::fs::read_to_string(results.join("pushupdate.ok")).unwrap();
    assert_eq!(ok.lines().count(), 7, "{ok}");
    let f = std::fs::read_to_string(results.join("pushupdate.failed")).unwrap();
    assert!(f.starts_with("10.213.9.18\t"), "{f}");
    for i in 0..7 {
        assert_eq!(
            std::fs::read(t.path().join(format!("node{i}/etc/role"))).unwrap(),
            b"compute\n"
        );
    }
}

/// The rollout budget: canaries first, and a stop on the first failure. Four nodes, the first
/// (10.213.13.11) without an agent. With it as the canary nothing else is touched; with a
/// healthy canary, `--on-failure stop` and one node at a time, the canary updates, the node
/// without an agent fails, and the two after it are never started. Every node not reached still
/// has an empty tree, and pushupdate.failed lists it with why, for a retry.
#[test]
fn a_failed_canary_stops_the_push() {
    require_root!();
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = t.path().join("golden");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/role"), b"compute\n").unwrap();
    let store = t.path().join("store");
    run(si_image(&store).arg("commit").arg(&src).arg("debian")).unwrap();
    let si_tests::Bridged { master, nodes, .. } = bridged(13, 4);
    let _server = start_server(&master, &store);
    let root = |i: usize| t.path().join(format!("node{i}"));
    let mut agents = Vec::new();
    for (i, n) in nodes.iter().enumerate().skip(1) {
        agents.push(start_agent(
            n,
            "10.213.13.1",
            &store,
            &format!("node{i}"),
            &root(i),
        ));
    }
    let push = |nodes: &[&str], extra: &[&str], results: &Path| {
        let out = master
            .cmd(bin("si-pushupdate"))
            .args(nodes)
            .args([
                "--server",
                "10.213.13.1",
                "--image",
                "debian",
                "--timeout",
                "30",
            ])
            .args(extra)
            .arg("--ca-dir")
            .arg(&si_tests::test_ca().dir)
            .arg("--results")
            .arg(results)
            .output()
            .unwrap();
        assert!(!out.status.success(), "a failed node makes the push fail");
        let failed = std::fs::read_to_string(results.join("pushupdate.failed")).unwrap();
        (String::from_utf8_lossy(&out.stdout).into_owned(), failed)
    };
    let updated = |i: usize| root(i).join("etc/role").exists();

    // The canary has no agent: nobody else is pushed.
    let (stdout, failed) = push(
        &["10.213.13.[11-14]"],
        &["--canary", "10.213.13.11"],
        &t.path().join("r1"),
    );
    assert!(
        stdout.contains("0 succeeded, 1 failed, 3 not started"),
        "{stdout}"
    );
    assert!(stdout.contains("FAILED 10.213.13.11"), "{stdout}");
    for i in 1..4 {
        assert!(!updated(i), "node{i} was pushed after its canary failed");
        let ip = format!("10.213.13.{}", 11 + i);
        assert!(
            failed.contains(&format!("{ip}\tnot started: canary 10.213.13.11 failed")),
            "{failed}"
        );
    }

    // A healthy canary, then one at a time, stopping at the first failure.
    let (stdout, failed) = push(
        &[
            "10.213.13.12",
            "10.213.13.11",
            "10.213.13.13",
            "10.213.13.14",
        ],
        &["--canary", "1", "--on-failure", "stop", "--fanout", "1"],
        &t.path().join("r2"),
    );
    assert!(
        stdout.contains("1 succeeded, 1 failed, 2 not started"),
        "{stdout}"
    );
    assert!(updated(1), "the canary was not updated: {stdout}");
    assert!(
        !updated(2) && !updated(3),
        "nodes started after a failure: {stdout}"
    );
    let lines: Vec<&str> = failed.lines().collect();
    assert_eq!(lines.len(), 3, "{failed}");
    assert!(lines[0].starts_with("10.213.13.11\t"), "{failed}");
    for (l, ip) in lines[1..].iter().zip(["10.213.13.13", "10.213.13.14"]) {
        assert_eq!(
            *l,
            format!("{ip}\tnot started: stopped after 10.213.13.11 failed")
        );
    }
}

/// The push's other transport: ssh to each node, which runs si-updateclient against the master
/// (real sshd in each node's namespace, key authentication). A node without sshd fails with
/// ssh's reason; the others end up with the image.
#[test]
fn push_over_ssh() {
    require_root!();
    if !Path::new("/usr/sbin/sshd").exists() {
        eprintln!("SKIP push_over_ssh: needs sshd (apt-get install openssh-server)");
        return;
    }
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = t.path();
    let src = d.join("golden");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/role"), b"login\n").unwrap();
    let store = d.join("store");
    run(si_image(&store).arg("commit").arg(&src).arg("debian")).unwrap();
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(d.join("hostkey")))
    .unwrap();
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(d.join("id")))
    .unwrap();
    std::fs::copy(d.join("id.pub"), d.join("authorized_keys")).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap(); // sshd's privilege separation directory

    let si_tests::Bridged { master, nodes, .. } = bridged(10, 3);
    let _server = start_server(&master, &store);
    let mut sshds = Vec::new();
    for (i, n) in nodes.iter().enumerate().take(2) {
        let cfg = d.join(format!("sshd{i}.conf"));
        std::fs::write(
            &cfg,
            format!(
                "ListenAddress 0.0.0.0:22\nHostKey {d}/hostkey\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile {d}/sshd{i}.pid\n",
                d = d.display()
            ),
        )
        .unwrap();
        let p = n
            .cmd("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        sshds.push(Proc(p));
        wait_port(n, "127.0.0.1:22").unwrap();
        let ip = format!("10.213.10.{}", 11 + i);
        enroll(
            n,
            "10.213.10.1",
            &store,
            &format!("ssh{i}"),
            &d.join(format!("{ip}.id")),
        );
    }
    // Node 3 (10.213.10.13) runs no sshd.
    let results = d.join("results");
    let out = master
        .cmd(bin("si-pushupdate"))
        .args(["10.213.10.[11-13]", "--server", "10.213.10.1", "--image", "debian", "--ssh"])
        .args(["--timeout", "60", "--ssh-command"])
        .arg(format!(
            "ssh -i {}/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            d.display()
        ))
        .arg("--remote-command")
        .arg(format!(
            "{} --root {d}/{{node}} --state-dir {d}/{{node}}.state --identity-dir {d}/{{node}}.id --no-default-excludes --ca-fingerprint {pin}",
            bin("si-updateclient").display(),
            pin = si_tests::test_ca().pin,
            d = d.display()
        ))
        .arg("--results")
        .arg(&results)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stdout.contains("2 succeeded, 1 failed"),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("FAILED 10.213.10.13: ssh:"), "{stdout}");
    assert!(stdout.to_lowercase().contains("refused"), "{stdout}");
    assert!(
        stderr.contains("debian@1: 2 created"),
        "the node's summary is the detail: {stderr}"
    );
    for i in 0..2 {
        assert_eq!(
            std::fs::read(d.join(format!("10.213.10.{}/etc/role", 11 + i))).unwrap(),
            b"login\n"
        );
    }
    assert!(!d.join("10.213.10.13").exists());
}

/// A node whose disk fills up: a fresh deploy fails with the system's reason, and an update
/// that cannot fit is refused before anything on the node changes.
#[test]
fn full_disk_is_a_clear_error_and_loses_nothing() {
    require_root!();
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = t.path().join("golden");
    std::fs::create_dir_all(src.join("data")).unwrap();
    rand_file(&src.join("data/a"), 12, 1);
    let store = t.path().join("store");
    run(si_image(&store).arg("commit").arg(&src).arg("debian")).unwrap();
    let ns = Netns::new().unwrap();
    let _server = start_server(&ns, &store);
    let disk = t.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=20m", "tmpfs"])
        .arg(&disk))
    .unwrap();
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Unmount(&disk);

    // Version 1 (12 MiB) fits.
    let root = disk.join("root");
    enroll(&ns, "127.0.0.1", &store, "full", &root.with_extension("id"));
    let out = update(&ns, "127.0.0.1", &root, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Version 2 adds 16 MiB: the update is refused up front, the node keeps version 1.
    rand_file(&src.join("data/b"), 16, 2);
    run(si_image(&store).arg("commit").arg(&src).arg("debian")).unwrap();
    let out = update(&ns, "127.0.0.1", &root, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not enough space"), "{err}");
    assert!(!root.join("data/b").exists());
    assert_eq!(
        std::fs::read(root.join("data/a")).unwrap(),
        std::fs::read(src.join("data/a")).unwrap()
    );
    let installed =
        std::fs::read_to_string(root.with_extension("state").join("installed.toml")).unwrap();
    assert!(installed.contains("version = 1"), "{installed}");

    // A fresh deploy of version 2 into the same small disk: refused before writing.
    let fresh = disk.join("fresh");
    // The same node, deploying afresh: its identity is the one it enrolled with.
    std::os::unix::fs::symlink(root.with_extension("id"), fresh.with_extension("id")).unwrap();
    let out = update(&ns, "127.0.0.1", &fresh, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("No space left on device") || err.contains("not enough space"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    eprintln!("fresh deploy on a full disk: {err}");
}

/// Lossy, slow links: 1 % and 10 % packet loss in both directions of a node's link (an
/// iptables `statistic` match in the node's namespace: this kernel has no netem), and 50 ms of
/// delay each way: tc netem where the kernel has it, else a relay in the node's namespace that
/// holds every byte 50 ms each way (`si_tests::delay_proxy`). Enrollment, a fresh deploy and an
/// update all complete, and each node ends exactly equal to the image.
#[test]
fn deploy_and_update_complete_under_loss_and_delay() {
    require_root!();
    if !Path::new("/usr/sbin/iptables-legacy").exists() {
        eprintln!("SKIP deploy_and_update_complete_under_loss_and_delay: needs iptables (apt-get install iptables)");
        return;
    }
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = t.path().join("golden");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::create_dir_all(src.join("var")).unwrap();
    std::fs::write(src.join("etc/role"), b"compute\n").unwrap();
    rand_file(&src.join("var/a"), 2, 21);
    rand_file(&src.join("var/b"), 2, 22);
    let store = t.path().join("store");
    run(si_image(&store).arg("commit").arg(&src).arg("debian")).unwrap();
    let net = 12;
    let si_tests::Bridged {
        master,
        nodes,
        ports,
        links,
    } = bridged(net, 2);
    let _server = start_server(&master, &store);
    let server = format!("10.213.{net}.1");
    let mut via = [server.clone(), server.clone()];
    for (i, loss) in [(0usize, 1u32), (1, 10)] {
        let p = f64::from(loss) / 100.0;
        // Packets of one segment each (no 64 KiB GSO batches), so the loss rule drops real
        // packets at its rate.
        nodes[i]
            .sh(&format!("ip link set dev {} gso_max_size 1500", links[i]))
            .unwrap();
        master
            .sh(&format!("ip link set dev {} gso_max_size 1500", ports[i]))
            .unwrap();
        for (chain, lo) in [("INPUT", "-i lo"), ("OUTPUT", "-o lo")] {
            nodes[i]
                .sh(&format!(
                    "iptables-legacy -A {chain} {lo} -j ACCEPT
                     iptables-legacy -A {chain} -m statistic --mode random --probability {p} -j DROP"
                ))
                .unwrap();
        }
        let delay = "netem delay 50ms";
        let ok = master
            .sh(&format!("tc qdisc add dev {} root {delay}", ports[i]))
            .is_ok()
            && nodes[i]
                .sh(&format!("tc qdisc add dev {} root {delay}", links[i]))
                .is_ok();
        if !ok {
            let proxy = si_tests::delay_proxy(
                &nodes[i],
                format!("{server}:7811").parse().unwrap(),
                Duration::from_millis(50),
            )
            .unwrap();
            eprintln!("note: this kernel has no netem; node {i} gets {loss} % loss and 50 ms each way through {proxy}");
            via[i] = proxy.to_string();
        }
    }
    let roots: Vec<_> = (0..2)
        .map(|i| {
            let root = t.path().join(format!("lossy{i}"));
            enroll(
                &nodes[i],
                &server,
                &store,
                &format!("lossy{i}"),
                &root.with_extension("id"),
            );
            root
        })
        .collect();
    for (i, root) in roots.iter().enumerate() {
        let t0 = Instant::now();
        let out = update(&nodes[i], &via[i], root, &[]);
        eprintln!("node {i}: deployed in {:.1?}", t0.elapsed());
        assert!(
            out.status.success(),
            "deploy over a lossy link ({i}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        treecmp(&src, root, &[]).unwrap();
    }
    // An update: one file changed, one added.
    rand_file(&src.join("var/a"), 1, 23);
    std::fs::write(src.join("etc/new"), b"v2\n").unwrap();
    run(si_image(&store).arg("commit").arg(&src).arg("debian")).unwrap();
    for (i, root) in roots.iter().enumerate() {
        let out = update(&nodes[i], &via[i], root, &[]);
        assert!(
            out.status.success(),
            "update over a lossy link ({i}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        treecmp(&src, root, &[]).unwrap();
        assert_eq!(summary(root)["version"], 2);
    }
    // The links really lost packets.
    for (i, n) in nodes.iter().enumerate() {
        let out = n.sh("iptables-legacy -L -v -x -n").unwrap();
        let dropped: u64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("DROP") && l.contains("statistic"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        assert!(dropped > 0, "node {i} lost no packet");
        eprintln!("node {i}: {dropped} packets dropped");
    }
}
