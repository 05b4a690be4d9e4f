//! An automatic install through the distribution's own installer, end to end in QEMU (TCG):
//! Debian 12's netboot installer (the Debian package debian-installer-12-netboot-amd64) is
//! imported with `si-distro import`, a profile with the shipped preseed example is added with
//! `si-profile add`, and a node of the inventory is set to `--action autoinstall`. si-server
//! alone (DHCP, TFTP, HTTP in a network namespace) boots the VM: the NIC's iPXE ROM →
//! `boot/<mac>.ipxe` → d-i's kernel and initrd from `si-distro/deb12/` → d-i gets its address
//! by DHCP and fetches the preseed rendered for this node from `/autoinstall/answer/vm1/<token>`
//! (seen in si-server's log), echoes the inventory's host name to the serial console from the
//! preseed's early_command, and runs with no question asked up to the first step that needs
//! the package mirror: it asks si-server (named as the mirror) for the `Release` file, which the
//! test does not have. A request for the answer file from another address is refused.
//!
//! Needs root and the Debian packages qemu-system-x86, ipxe-qemu, ipxe and
//! debian-installer-12-netboot-amd64.

use anyhow::{bail, Context, Result};
use si_tests::{bin, require_root, wait_for_log, Netns, Proc};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:d1:00:71";
const DI: &str = "/usr/lib/debian-installer/images/12/amd64/text";
/// d-i under TCG: kernel and a 40 MB initrd over HTTP, hardware detection, DHCP, preseed.
const VM_TIMEOUT: Duration = Duration::from_secs(900);

fn text(p: &Path) -> String {
    // ANSI sequences out, for matching and readable failures.
    si_tests::strip_ansi(&String::from_utf8_lossy(
        &std::fs::read(p).unwrap_or_default(),
    ))
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<char> = s.chars().collect();
    v[v.len().saturating_sub(n)..].iter().collect()
}

/// Waits until every `(file, needle)` shows, or the VM exits, or the time is up.
fn wait_all(
    vm: &mut Proc,
    start: Instant,
    wants: &[(&Path, &str)],
    serial: &Path,
    log: &Path,
) -> Result<()> {
    loop {
        if wants.iter().all(|(f, w)| text(f).contains(w)) {
            return Ok(());
        }
        let missing: Vec<&str> = wants
            .iter()
            .filter(|(f, w)| !text(f).contains(w))
            .map(|(_, w)| *w)
            .collect();
        if let Some(st) = vm.0.try_wait()? {
            bail!(
                "qemu exited ({st}) before {missing:?}\n--- console:\n{}\n--- si-server:\n{}",
                tail(&text(serial), 4000),
                tail(&text(log), 4000)
            );
        }
        if start.elapsed() > VM_TIMEOUT {
            bail!(
                "no {missing:?} after {VM_TIMEOUT:?}\n--- console:\n{}\n--- si-server:\n{}",
                tail(&text(serial), 4000),
                tail(&text(log), 4000)
            );
        }
        // Polling the files the VM and si-server write: the console lines are the signal.
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn debian_installer_autoinstalls_from_si_server() {
    require_root!();
    for p in [
        "/usr/bin/qemu-system-x86_64",
        "/usr/lib/ipxe/undionly.kpxe",
        &format!("{DI}/debian-installer/amd64/linux"),
    ] {
        if !Path::new(p).exists() {
            eprintln!("SKIP: {p} missing (install qemu-system-x86, ipxe, debian-installer-12-netboot-amd64)");
            return;
        }
    }
    run().unwrap();
}

fn run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    std::fs::create_dir(&root)?;
    std::fs::copy("/usr/lib/ipxe/undionly.kpxe", root.join("undionly.kpxe"))?;
    let state = dir.path().join("state");
    let subnet = 70;
    let server = format!("10.213.{subnet}.1");
    let http = format!("{server}:8080");
    let si = |tool: &str, args: &[&str]| -> Result<String> {
        let out = si_tests::run(
            std::process::Command::new(bin(tool))
                .arg("--state-dir")
                .arg(&state)
                .args(args),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let imported = si("si-distro", &["import", "--name", "deb12", "--path", DI])?;
    assert!(imported.contains("deb12 (debian, amd64)"), "{imported}");
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/autoinstall");
    for e in std::fs::read_dir(ex.join("snippets"))? {
        let p: PathBuf = e?.path();
        let name = p
            .file_name()
            .context("snippet name")?
            .to_string_lossy()
            .into_owned();
        si(
            "si-profile",
            &["snippet", "add", &name, "--file", &p.to_string_lossy()],
        )?;
    }
    si(
        "si-profile",
        &[
            "add",
            "--name",
            "deb12-compute",
            "--distro",
            "deb12",
            "--template",
            &ex.join("debian12.preseed").to_string_lossy(),
            // The serial console, and d-i's plain-text frontend on it.
            "--kernel-args",
            "console=ttyS0 DEBIAN_FRONTEND=text",
            "--var",
            &format!("mirror_host={http}"),
            "--var",
            "mirror_dir=/no-mirror/debian",
        ],
    )?;
    si(
        "si-node",
        &[
            "subnet",
            "add",
            "boot",
            "--network",
            &format!("10.213.{subnet}.0/24"),
            "--pool",
            &format!("10.213.{subnet}.100-10.213.{subnet}.150"),
            // Before it has its preseed, d-i asks "Continue without a default route?" when
            // DHCP names no router, and for name servers when it names none.
            "--router",
            &server,
            "--dns",
            &server,
            "--domain",
            "lab.example",
        ],
    )?;
    si(
        "si-group",
        &["add", "compute", "--profile", "deb12-compute"],
    )?;
    si(
        "si-node",
        &[
            "add",
            "vm1",
            "--mac",
            MAC,
            "--ip",
            &format!("10.213.{subnet}.10"),
            "--hostname",
            "vm1-from-inventory",
            "--group",
            "compute",
            "--action",
            "autoinstall",
        ],
    )?;
    let shown = si("si-node", &["show", "vm1"])?;
    assert!(
        shown.contains("boot: autoinstall") && shown.contains("profile: deb12-compute"),
        "{shown}"
    );

    let ns = Netns::new()?;
    ns.sh(&format!(
        "ip link add br0 type bridge
         ip addr add {server}/24 dev br0
         ip link set br0 up
         ip tuntap add tap0 mode tap
         ip link set tap0 master br0 up"
    ))?;
    let log = dir.path().join("server.log");
    let mut child = ns
        .cmd(bin("si-server"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--store")
        .arg(dir.path().join("store"))
        .args([
            "--listen",
            &format!("{server}:7811"),
            "--dhcp-interface",
            "br0",
            "--server-ip",
            &server,
            "--tftp-listen",
            &format!("{server}:69"),
            "--http-listen",
            &http,
        ])
        .arg("--tftp-root")
        .arg(&root)
        .arg("--http-root")
        .arg(&root)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting si-server")?;
    wait_for_log(
        &log,
        &["TFTP server listening", "HTTP server listening"],
        &mut child,
    )?;
    let _server = Proc(child);

    // What the node will get, as the operator sees it; the server renders the same.
    let rendered = si("si-profile", &["render", "vm1"])?;
    assert!(
        rendered.contains("d-i netcfg/get_hostname string vm1-from-inventory\n"),
        "{rendered}"
    );
    let token = std::fs::read_to_string(state.join("autoinstall/tokens/vm1"))?;
    let answer = format!("http://{http}/autoinstall/answer/vm1/{token}");
    assert!(rendered.contains(&format!("/autoinstall/done/vm1/{token}")));
    // The boot script boots d-i with the node's answer file.
    let script = ns.sh(&format!(
        "busybox wget -q -O - http://{http}/boot/52-54-00-d1-00-71.ipxe"
    ))?;
    let script = String::from_utf8_lossy(&script.stdout);
    assert!(
        script.contains(&format!(
            "kernel http://{http}/si-distro/deb12/linux initrd=initrd auto=true priority=critical url={answer} interface=auto hostname=vm1-from-inventory console=ttyS0 DEBIAN_FRONTEND=text"
        )),
        "{script}"
    );
    // Another address than the node's gets nothing.
    let other = ns
        .cmd("busybox")
        .args(["wget", "-q", "-O", "-", &answer])
        .output()?;
    assert!(
        !other.status.success(),
        "the answer file was served to the server's own address"
    );
    assert!(!String::from_utf8_lossy(&other.stdout).contains("d-i"));

    let serial = dir.path().join("serial.log");
    let start = Instant::now();
    let mut vm = Proc(
        ns.cmd("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "1024",
                "-display",
                "none",
                "-no-reboot",
                "-boot",
                "n",
                "-machine",
                "pc,graphics=off",
            ])
            .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
            .args(["-device", &format!("e1000,netdev=n0,mac={MAC}")])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("qemu.log"))?)
            .spawn()
            .context("starting qemu")?,
    );
    wait_all(
        &mut vm,
        start,
        &[
            (&log, "served answer file"),
            (&serial, "si-autoinstall: preseed for vm1-from-inventory"),
        ],
        &serial,
        &log,
    )?;
    let preseed_at = start.elapsed();
    // No question asked: d-i goes on by itself to the first step that needs the mirror.
    wait_all(
        &mut vm,
        start,
        &[(&log, "path=\"/no-mirror/debian/dists/")],
        &serial,
        &log,
    )?;
    let mirror_at = start.elapsed();
    eprintln!(
        "d-i: preseed fetched and applied after {preseed_at:?}, mirror asked after {mirror_at:?}"
    );
    let server_log = text(&log);
    assert!(
        server_log.contains(&format!(
            "path=\"/autoinstall/answer/vm1/{token}\" status=200"
        )),
        "{}",
        tail(&server_log, 4000)
    );
    let served = server_log
        .lines()
        .find(|l| l.contains("served answer file"))
        .context("no answer file served")?;
    assert!(
        served.contains("peer=10.213.70.10") && served.contains("profile=deb12-compute"),
        "{served}"
    );
    for path in ["/si-distro/deb12/linux", "/si-distro/deb12/initrd"] {
        assert!(
            server_log.contains(&format!("path=\"{path}\" status=200")),
            "no GET {path}:\n{}",
            tail(&server_log, 4000)
        );
    }
    drop(vm);
    // The node's install callback (what the preseed's late_command runs) from another address
    // is refused; the token is still there.
    let refused = ns
        .cmd("busybox")
        .args([
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{http}/autoinstall/done/vm1/{token}"),
        ])
        .output()?;
    assert!(!refused.status.success());
    assert!(si("si-node", &["show", "vm1"])?.contains("boot: autoinstall"));
    Ok(())
}
