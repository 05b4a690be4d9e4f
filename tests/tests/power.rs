//! BMC control against OpenIPMI's `ipmi_sim` (Debian packages: openipmi, ipmitool, and
//! qemu-system-x86 for the VM test). Each test has its own UDP/TCP ports, so they run in
//! parallel. What si reads is compared with what `ipmitool -I lanplus` reads from the same
//! simulator.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use si_tests::{bin, require_root, Netns};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/ipmi");

/// One running ipmi_sim, killed on drop.
struct Sim {
    child: Child,
    dir: tempfile::TempDir,
    /// Kept open for the simulator's whole life: ipmi_sim exits when a console connection closes.
    console: Option<TcpStream>,
}

impl Sim {
    fn start(addr: &str, port: u16, console: u16, ns: Option<&Netns>) -> Result<Sim> {
        Sim::start_with(addr, port, console, ns, "")
    }

    /// Like `start`, with extra lines for lan.conf.
    fn start_with(
        addr: &str,
        port: u16,
        console: u16,
        ns: Option<&Netns>,
        extra: &str,
    ) -> Result<Sim> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        std::fs::copy(
            format!("{FIX}/chassis_control.sh"),
            d.join("chassis_control.sh"),
        )?;
        std::fs::create_dir(d.join("state"))?;
        std::fs::create_dir(d.join("persist"))?;
        let conf = std::fs::read_to_string(format!("{FIX}/lan.conf.in"))?
            .replace("@NAME@", &format!("si{port}"))
            .replace("@ADDR@", addr)
            .replace("@PORT@", &port.to_string())
            .replace("@CONSOLE@", &console.to_string())
            .replace("@DIR@", &d.display().to_string())
            .replace("@PASSWORD@", "secret")
            + extra;
        std::fs::write(d.join("lan.conf"), conf)?;
        let mut cmd = match ns {
            Some(ns) => ns.cmd("ipmi_sim"),
            None => Command::new("ipmi_sim"),
        };
        cmd.arg("-c")
            .arg(d.join("lan.conf"))
            .arg("-f")
            .arg(format!("{FIX}/sim.emu"));
        cmd.arg("-s").arg(d.join("persist")).arg("-n");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(d.join("sim.log"))?));
        let child = cmd.spawn().context("starting ipmi_sim")?;
        let mut sim = Sim {
            child,
            dir,
            console: None,
        };
        // Ready when its LAN port is bound (and, on loopback, its console accepts connections).
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let mut ss = match ns {
                None => Command::new("ss"),
                Some(ns) => ns.cmd("ss"),
            };
            let bound = ss
                .args(["-Hlun", &format!("sport = :{port}")])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false);
            if bound && ns.is_some() {
                return Ok(sim);
            }
            if bound {
                if let Ok(c) = TcpStream::connect(("127.0.0.1", console)) {
                    sim.console = Some(c);
                    return Ok(sim);
                }
            }
            if Instant::now() > until {
                bail!(
                    "ipmi_sim did not start: {}",
                    std::fs::read_to_string(sim.dir.path().join("sim.log"))?
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs an emulator command on the simulator's console (loopback simulators only).
    fn console(&mut self, line: &str) -> Result<String> {
        let s = self.console.as_mut().context("no console")?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.write_all(format!("{line}\n").as_bytes())?;
        std::thread::sleep(Duration::from_millis(300));
        let mut buf = vec![0; 4096];
        let mut text = String::new();
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if text.ends_with("> ") {
                break;
            }
        }
        Ok(text)
    }

    fn state(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("state").join(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.console = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a BMC directory (mode 0600) with `[nodes.NAME]` tables given as TOML snippets.
fn bmc_file(dir: &Path, nodes: &[(&str, &str)]) -> PathBuf {
    let mut t = format!(
        "state_dir = \"{}\"\n[defaults]\nuser = \"admin\"\npassword = \"secret\"\ncipher_suite = 3\n",
        dir.join("si-state").display()
    );
    for (name, body) in nodes {
        t.push_str(&format!("[nodes.{name}]\n{body}\n"));
    }
    let p = dir.join("bmc.toml");
    std::fs::write(&p, t).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn si(ns: Option<&Netns>, name: &str, args: &[&str], file: &Path) -> Output {
    let mut c = match ns {
        Some(ns) => ns.cmd(bin(name)),
        None => Command::new(bin(name)),
    };
    c.args(args).arg("--bmc-file").arg(file).output().unwrap()
}

fn si_json(name: &str, args: &[&str], file: &Path) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let o = si(None, name, &a, file);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{name} {args:?}: {e}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn ipmitool(port: u16, cs: u8, args: &str) -> String {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ipmitool -I lanplus -C {cs} -H 127.0.0.1 -p {port} -U admin -P secret {args}"
        ))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ipmitool {args}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn result_of(v: &Value, node: &str) -> Value {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == node)
        .cloned()
        .unwrap()
}

#[test]
fn power_and_bootdev_agree_with_ipmitool() {
    require_root!();
    let sim = Sim::start("127.0.0.1", 16301, 16302, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let f = bmc_file(
        tmp.path(),
        &[
            ("n1", "host = \"127.0.0.1\"\nport = 16301"),
            (
                "t1",
                "host = \"127.0.0.1\"\nport = 16301\ndriver = \"ipmitool\"",
            ),
        ],
    );
    let st = si_json("si-power", &["status", "n1,t1"], &f);
    assert_eq!(result_of(&st, "n1")["result"], "off", "{st}");
    assert_eq!(result_of(&st, "t1")["result"], "off", "{st}");
    assert!(ipmitool(16301, 3, "power status").contains("is off"));

    let o = si(None, "si-power", &["on", "n1"], &f);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(sim.state("power"), "1");
    assert!(ipmitool(16301, 3, "power status").contains("is on"));
    assert_eq!(
        result_of(&si_json("si-power", &["status", "n1,t1"], &f), "t1")["result"],
        "on"
    );

    for (dev, ipmitool_says, sim_says) in [
        ("pxe", "Force PXE", "pxe"),
        ("disk", "Hard-Drive", "default"),
    ] {
        let o = si(None, "si-bootdev", &[dev, "n1"], &f);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        assert!(
            ipmitool(16301, 3, "chassis bootparam get 5").contains(ipmitool_says),
            "{dev}"
        );
        assert_eq!(sim.state("boot"), sim_says);
    }
    // The ipmitool driver sets the same thing.
    assert!(si(None, "si-bootdev", &["pxe", "t1"], &f).status.success());
    assert!(ipmitool(16301, 3, "chassis bootparam get 5").contains("Force PXE"));

    assert!(si(None, "si-power", &["off", "t1"], &f).status.success());
    assert_eq!(
        result_of(&si_json("si-power", &["status", "n1"], &f), "n1")["result"],
        "off"
    );

    let hist = std::fs::read_to_string(tmp.path().join("si-state/history.jsonl")).unwrap();
    assert!(
        hist.contains("\"power on\"")
            && hist.contains("\"bootdev pxe\"")
            && hist.contains("\"power off\""),
        "{hist}"
    );
    assert!(!hist.contains("secret"));
}

#[test]
fn sel_sensors_fru_agree_with_ipmitool() {
    require_root!();
    let mut sim = Sim::start("127.0.0.1", 16311, 16312, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let f = bmc_file(tmp.path(), &[("n1", "host = \"127.0.0.1\"\nport = 16311")]);

    // Events: one written directly (uncorrectable ECC on memory sensor 7), two from a
    // temperature crossing its upper non-critical and critical thresholds.
    let r = sim
        .console(
            "sel_add 0x20 0x02 0x00 0xf1 0x53 0x65 0x20 0x00 0x04 0x0c 0x07 0x6f 0x01 0xff 0xff",
        )
        .unwrap();
    assert!(r.contains("Added record"), "{r}");
    sim.console("sensor_set_value 0x20 0 1 0x5f 1").unwrap();

    let v = si_json("si-sel", &["n1"], &f);
    let entries = result_of(&v, "n1")["result"].as_array().unwrap().clone();
    let descr: Vec<String> = entries
        .iter()
        .map(|e| e["description"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(entries.len(), 3, "{v}");
    assert_eq!(descr[0], "Uncorrectable ECC");
    assert_eq!(entries[0]["sensor_type"], "Memory");
    // ipmi_sim stamps entries with its own clock, which starts "pre-init" (seconds since boot).
    assert!(
        entries[0]["time"]
            .as_str()
            .unwrap()
            .starts_with("pre-init +"),
        "{v}"
    );
    assert!(
        descr[1].starts_with("Upper Non-critical going high"),
        "{descr:?}"
    );
    assert!(
        descr[2].starts_with("Upper Critical going high"),
        "{descr:?}"
    );
    let theirs = ipmitool(16311, 3, "sel elist");
    assert_eq!(theirs.lines().count(), 3, "{theirs}");
    for (line, d) in theirs.lines().zip(&descr) {
        let first = d.split(" (").next().unwrap();
        assert!(line.contains(first), "ipmitool: {line} / si: {d}");
    }

    // Sensors: values, status and thresholds as ipmitool reads them.
    let v = si_json("si-sensors", &["n1"], &f);
    let sensors = result_of(&v, "n1")["result"].as_array().unwrap().clone();
    assert_eq!(sensors.len(), 3, "{v}");
    let theirs = ipmitool(16311, 3, "sensor");
    for s in &sensors {
        let name = s["name"].as_str().unwrap();
        let line = theirs
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not in {theirs}"));
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let val: f64 = cols[1].parse().unwrap();
        assert!(
            (s["value"].as_f64().unwrap() - val).abs() < 1e-3,
            "{name}: {s} vs {line}"
        );
        assert_eq!(s["status"].as_str().unwrap(), cols[3], "{name}");
        for (i, key) in [
            "lower_non_recoverable",
            "lower_critical",
            "lower_non_critical",
            "upper_non_critical",
            "upper_critical",
            "upper_non_recoverable",
        ]
        .iter()
        .enumerate()
        {
            let t: f64 = cols[4 + i].parse().unwrap();
            assert!(
                (s[key].as_f64().unwrap() - t).abs() < 1e-3,
                "{name} {key}: {s} vs {line}"
            );
        }
    }
    assert_eq!(sensors[0]["status"], "cr");
    assert_eq!(sensors[1]["value"], 1.2);
    assert_eq!(sensors[2]["unit"], "RPM");

    // FRU.
    let v = si_json("si-inventory", &["n1"], &f);
    let inv = result_of(&v, "n1")["result"].clone();
    let theirs = ipmitool(16311, 3, "fru print 0");
    for (key, label) in [
        ("product_serial", "Product Serial"),
        ("product_name", "Product Name"),
        ("product_manufacturer", "Product Manufacturer"),
        ("board_serial", "Board Serial"),
    ] {
        let line = theirs
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap();
        assert_eq!(
            inv[key].as_str().unwrap(),
            line.split(": ").nth(1).unwrap().trim(),
            "{key}"
        );
    }
    assert_eq!(inv["product_serial"], "PSN-4242");

    // Clear.
    assert!(si(None, "si-sel", &["n1", "--clear"], &f).status.success());
    let v = si_json("si-sel", &["n1"], &f);
    assert!(
        result_of(&v, "n1")["result"].as_array().unwrap().len() <= 1,
        "{v}"
    );
}

#[test]
fn wrong_password_and_cipher_17_are_clear_errors() {
    require_root!();
    let _sim = Sim::start("127.0.0.1", 16321, 16322, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let f = bmc_file(
        tmp.path(),
        &[
            (
                "bad",
                "host = \"127.0.0.1\"\nport = 16321\npassword = \"nope\"",
            ),
            (
                "baduser",
                "host = \"127.0.0.1\"\nport = 16321\nuser = \"mallory\"",
            ),
            (
                "cs17",
                "host = \"127.0.0.1\"\nport = 16321\ncipher_suite = 17",
            ),
        ],
    );
    let o = si(None, "si-power", &["status", "bad,baduser,cs17"], &f);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("bad: ERROR") && out.contains("wrong password"),
        "{out}"
    );
    assert!(
        out.contains("baduser: ERROR") && out.contains("unauthorized name"),
        "{out}"
    );
    // OpenIPMI 2.0.33's ipmi_sim has no RAKP-HMAC-SHA256: the BMC's refusal is reported as is.
    assert!(
        out.contains("cs17: ERROR") && out.contains("invalid authentication algorithm"),
        "{out}"
    );
    assert!(!out.contains("nope") && !out.contains("secret"), "{out}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("3 of 3 nodes failed"));
}

#[test]
fn unreachable_bmc_times_out_beside_a_reachable_one_in_a_namespace() {
    require_root!();
    let ns = Netns::new().unwrap();
    // A veth pair inside the namespace; the far end has no address, and a permanent neighbour
    // entry sends datagrams for the missing hosts into it, where they vanish (no ARP failure,
    // no ICMP): a BMC that is switched off or cut off.
    ns.ip(&[
        "link", "add", "bmcnet", "type", "veth", "peer", "name", "bmcsink",
    ])
    .unwrap();
    ns.ip(&["addr", "add", "10.213.7.1/24", "dev", "bmcnet"])
        .unwrap();
    ns.ip(&["link", "set", "bmcnet", "up"]).unwrap();
    ns.ip(&["link", "set", "bmcsink", "up"]).unwrap();
    for ghost in ["10.213.7.98", "10.213.7.99"] {
        ns.ip(&[
            "neigh",
            "add",
            ghost,
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "bmcnet",
            "nud",
            "permanent",
        ])
        .unwrap();
    }
    let _sim = Sim::start("10.213.7.1", 623, 16332, Some(&ns)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let f = bmc_file(
        tmp.path(),
        &[
            ("up", "host = \"10.213.7.1\""),
            ("ghost", "host = \"10.213.7.99\""),
            ("ghost2", "host = \"10.213.7.98\"\ndriver = \"ipmitool\""),
        ],
    );
    let start = Instant::now();
    let o = si(
        Some(&ns),
        "si-power",
        &["status", "up,ghost,ghost2", "--timeout", "2", "--json"],
        &f,
    );
    let took = start.elapsed();
    assert!(!o.status.success());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(result_of(&v, "up")["result"], "off", "{v}");
    assert!(
        result_of(&v, "ghost")["error"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{v}"
    );
    assert!(
        result_of(&v, "ghost2")["error"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{v}"
    );
    assert_eq!(v["failed"], serde_json::json!(["ghost", "ghost2"]));
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(took >= Duration::from_millis(1900), "took {took:?}");
}

#[test]
fn reinstall_sets_pxe_boot_action_and_power_with_history() {
    require_root!();
    let sim = Sim::start("127.0.0.1", 16341, 16342, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let f = bmc_file(tmp.path(), &[("n1", "host = \"127.0.0.1\"\nport = 16341")]);
    let o = si(None, "si-reinstall", &["n1"], &f);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("power on"));
    assert_eq!(sim.state("boot"), "pxe");
    assert_eq!(sim.state("power"), "1");
    // Already on: the second time it power-cycles.
    let o = si(None, "si-reinstall", &["n1"], &f);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("power cycle"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let actions: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("si-state/boot-actions.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(actions["n1"], "install");
    let hist = std::fs::read_to_string(tmp.path().join("si-state/history.jsonl")).unwrap();
    let steps: Vec<Value> = hist
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = steps
        .iter()
        .map(|s| s["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "reinstall: bootdev pxe",
            "reinstall: boot-action install",
            "reinstall: power",
            "reinstall: bootdev pxe",
            "reinstall: boot-action install",
            "reinstall: power"
        ]
    );
    assert!(steps.iter().all(|s| s["outcome"] == "ok"));
    assert_eq!(steps[5]["detail"], "power cycle");
}

#[test]
fn power_on_boots_a_qemu_vm_and_off_stops_it() {
    require_root!();
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: qemu-system-x86_64 not installed (Debian package qemu-system-x86)");
        return;
    }
    let sim = Sim::start("127.0.0.1", 16351, 16352, None).unwrap();
    // The chassis is a diskless VM: one NIC on a QEMU hub with nothing else on it (no traffic
    // leaves QEMU), firmware output on the serial port, boot order from the boot device.
    let start = sim.state_dir().join("vm-start");
    std::fs::write(
        &start,
        "#!/bin/sh\nst=$1\norder=c\n[ \"$(cat $st/boot 2>/dev/null)\" = pxe ] && order=n\n\
         exec qemu-system-x86_64 -accel tcg -display none -machine pc,graphics=off -m 64 -nodefaults \
         -netdev hubport,id=n0,hubid=0 -device e1000,netdev=n0 -boot order=$order \
         -serial file:$st/serial.log -daemonize -pidfile $st/vm.pid\n",
    )
    .unwrap();
    std::fs::set_permissions(&start, std::fs::Permissions::from_mode(0o755)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let f = bmc_file(tmp.path(), &[("vm", "host = \"127.0.0.1\"\nport = 16351")]);
    assert_eq!(
        result_of(&si_json("si-power", &["status", "vm"], &f), "vm")["result"],
        "off"
    );
    assert!(si(None, "si-bootdev", &["pxe", "vm"], &f).status.success());
    let o = si(None, "si-power", &["on", "vm"], &f);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let pid = sim.state("vm.pid");
    assert!(
        !pid.is_empty(),
        "no VM started: {}",
        sim.state("vm-start.log")
    );
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(
        result_of(&si_json("si-power", &["status", "vm"], &f), "vm")["result"],
        "on"
    );
    // The firmware reaches the network boot ROM (iPXE) because the boot device is PXE.
    let until = Instant::now() + Duration::from_secs(60);
    let serial = sim.state_dir().join("serial.log");
    loop {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        if log.contains("iPXE") {
            break;
        }
        assert!(
            Instant::now() < until,
            "no iPXE banner on the VM's serial port:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let o = si(None, "si-power", &["off", "vm"], &f);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let until = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < until,
            "VM {pid} still running after power off"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        result_of(&si_json("si-power", &["status", "vm"], &f), "vm")["result"],
        "off"
    );
}

#[test]
fn serial_over_lan_console_both_ways() {
    require_root!();
    // ipmi_sim connects its SOL port to this TCP "serial line".
    let line = std::net::TcpListener::bind("127.0.0.1:16363").unwrap();
    let serial = std::thread::spawn(move || {
        let (mut c, _) = line.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&got).contains("hello") {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "serial line closed");
            got.extend_from_slice(&buf[..n]);
        }
        c.write_all(b"login: reply-from-the-serial-port\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_secs(5));
        String::from_utf8_lossy(&got).into_owned()
    });
    let _sim = Sim::start_with(
        "127.0.0.1",
        16361,
        16362,
        None,
        "sol \"tcp:127.0.0.1:16363\" 115200\n",
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let f = bmc_file(tmp.path(), &[("n1", "host = \"127.0.0.1\"\nport = 16361")]);
    let mut c = Command::new(bin("si-console"))
        .args(["n1", "--bmc-file"])
        .arg(&f)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    drop(stdin); // end of input ends the console after a short drain
    let o = c.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("login: reply-from-the-serial-port"), "{out}");
    assert!(serial.join().unwrap().contains("hello"));
    let hist = std::fs::read_to_string(tmp.path().join("si-state/history.jsonl")).unwrap();
    assert!(
        hist.contains("\"console\"") && hist.contains("\"ok\""),
        "{hist}"
    );
}

/// The BMC settings live in the inventory (node, then group); `si-reinstall` sets the boot
/// action there and every step lands in the node's history.
#[test]
fn inventory_holds_bmc_settings_and_reinstall_history() {
    require_root!();
    let sim = Sim::start("127.0.0.1", 16371, 16372, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let node = |args: &[&str]| {
        let o = Command::new(bin("si-node"))
            .arg("--state-dir")
            .arg(&state)
            .args(["--images", "img"])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let o = Command::new(bin("si-group"))
        .arg("--state-dir")
        .arg(&state)
        .args([
            "add",
            "compute",
            "--bmc-user",
            "admin",
            "--bmc-password",
            "secret",
            "--bmc-cipher-suite",
            "3",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    node(&[
        "add",
        "n1",
        "--group",
        "compute",
        "--boot",
        "local",
        "--bmc-host",
        "127.0.0.1",
        "--bmc-port",
        "16371",
    ]);
    let status = Command::new(bin("si-power"))
        .arg("--state-dir")
        .arg(&state)
        .args(["status", "n1", "--json"])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let o = Command::new(bin("si-reinstall"))
        .arg("--state-dir")
        .arg(&state)
        .arg("n1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(sim.state("boot"), "pxe");
    assert_eq!(sim.state("power"), "1");
    let shown = node(&["show", "n1"]);
    assert!(shown.contains("install"), "{shown}");
    assert!(
        !shown.contains("secret"),
        "the password is never shown: {shown}"
    );
    let hist = node(&["history", "n1"]);
    for step in ["reinstall: bootdev pxe", "reinstall: power", "boot"] {
        assert!(hist.contains(step), "{step} missing from history:\n{hist}");
    }
}
