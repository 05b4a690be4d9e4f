//! End-to-end installs in QEMU (TCG): a VM with a blank disk and the `install` boot action in
//! the inventory netboots from si-server (its DHCP, TFTP and HTTP inside a network namespace),
//! runs the boot package of `si-mkbootpackage` (kernel + initramfs with the static
//! `si-install`), which partitions, formats, pulls the image, installs GRUB, reports and
//! reboots; the VM then boots its own disk to a login prompt showing the name si gave it, and
//! the master's inventory shows the node installed.
//!
//! The image is the `vm` tree of `tests/fixtures/rootfs.sh` (minbase Debian 12 with a kernel,
//! GRUB for BIOS and UEFI, systemd and sshd; cached under /var/cache/si-tests), committed with
//! a layout of `images/layouts/`. Progress is read from the serial console (`-serial file:`),
//! every wait synchronised on a console line, never on a sleep; the times of each stage are
//! printed (`INSTALL-TIMES`).
//!
//! Needs root, what tests/tests/pxe_qemu.rs needs, debootstrap (first run), and the static
//! installer: `RUSTFLAGS='-C target-feature=+crt-static' cargo build -p si-installer --bin
//! si-install --target x86_64-unknown-linux-gnu` (.ci/run does it). Addresses 10.213.80-89.0/24.

use anyhow::{bail, Context, Result};
use si_tests::{bin, require_root, wait_for_log, Netns, Proc as Guard};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One scenario at a time (a scenario runs at most two VMs: TCG is CPU-bound on 2 cores).
static SCENARIO: Mutex<()> = Mutex::new(());

const IMAGE: &str = "deb12";
/// The whole install, from VM start to the login prompt of the installed system.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(40 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Firmware {
    /// SeaBIOS, the e1000's iPXE ROM.
    Bios,
    /// OVMF's own PXE on virtio-net, chaining ipxe.efi.
    Uefi,
}

fn copy(from: impl AsRef<Path>, to: &Path) -> Result<()> {
    let from = from.as_ref();
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} (is its package installed?)", from.display()))?;
    Ok(())
}

/// The master: store with the image, boot package, inventory, si-server in a namespace.
struct Lab {
    _procs: Vec<Guard>,
    ns: Netns,
    dir: tempfile::TempDir,
    state: PathBuf,
}

/// A VM of a lab: its tap, MAC, disks, serial log.
struct Vm {
    name: String,
    mac: String,
    tap: String,
    disks: Vec<VmDisk>,
    /// The disk the BIOS boots first (drive 0x80, what iPXE's local boot `sanboot`s): given a
    /// boot index after the NIC's. None: QEMU's `-boot order=nc` (the first disk).
    boot_disk: Option<usize>,
    serial: PathBuf,
}

/// A raw disk file and how the VM sees it.
struct VmDisk {
    path: PathBuf,
    bus: Bus,
}

enum Bus {
    Virtio,
    /// An NVMe controller with this serial and one namespace.
    Nvme {
        serial: String,
    },
}

/// What the image in the lab's store holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tree {
    /// The cached `vm` tree of tests/fixtures/rootfs.sh: installs and boots.
    Vm,
    /// A few files: for installs that must stop before the pull.
    Tiny,
}

fn si(state: &Path, tool: &str, args: &[&str]) -> Result<String> {
    let out = si_tests::run(
        Command::new(bin(tool))
            .arg("--state-dir")
            .arg(state)
            .args(["--images", IMAGE])
            .args(args),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the image (a tree + layout) into a store under `dir`.
fn image_store(dir: &Path, layout: &str, kind: Tree) -> Result<PathBuf> {
    let tree = dir.join("tree");
    let t = Instant::now();
    match kind {
        Tree::Vm => si_tests::rootfs(&tree, "vm")
            .context("building the vm tree (tests/fixtures/rootfs.sh)")?,
        Tree::Tiny => {
            std::fs::create_dir_all(tree.join("etc")).context("making the tiny tree")?;
            std::fs::write(tree.join("etc/os-release"), "ID=si-tiny\n")
                .context("writing the tiny tree")?;
        }
    }
    // A Debian installed for UEFI has the ESP's mount point; the cached tree (grub-efi-amd64-bin,
    // not grub-efi-amd64) lacks it. Without it in the image, the pull removes the mounted
    // ESP's directory (EBUSY): reported to the installer.
    std::fs::create_dir_all(tree.join("boot/efi")).context("making boot/efi")?;
    let store_dir = dir.join("store");
    let store = si_store::Store::open(&store_dir)?;
    // Relative to the repository's root.
    let layout_text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(layout),
    )
    .with_context(|| format!("reading layout {layout}"))?;
    si_imaging::getimage::commit_with_layout(
        &store,
        &tree,
        IMAGE,
        &[],
        Some("vm test image".into()),
        Some(&layout_text),
    )?;
    std::fs::remove_dir_all(&tree).context("removing the image tree")?;
    eprintln!("image {IMAGE} in the store after {:.1?}", t.elapsed());
    Ok(store_dir)
}

fn lab(
    subnet: u8,
    layout: &str,
    tree: Tree,
    vms: &[(&str, &str)],
    fw: Firmware,
) -> Result<(Lab, Vec<Vm>)> {
    let installer = si_tests::static_bin("si-install").context(
        "no static si-install: RUSTFLAGS='-C target-feature=+crt-static' cargo build -p \
         si-installer --bin si-install --target x86_64-unknown-linux-gnu",
    )?;
    let dir = tempfile::Builder::new()
        .prefix("si-install-qemu")
        .tempdir_in("/var/tmp")?;
    // No layout: no image either (the boot alone needs none).
    let store = if layout.is_empty() {
        dir.path().join("store")
    } else {
        image_store(dir.path(), layout, tree)?
    };
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    // The boot package, registered where si-server's install action looks by default.
    use clap::Parser;
    let cfg = si_initrd::bootpkg::BootPackageConfig::parse_from([
        std::ffi::OsStr::new("si-mkbootpackage"),
        "--installer".as_ref(),
        installer.as_os_str(),
        "--register".as_ref(),
        root.as_os_str(),
    ]);
    let pkg = si_initrd::bootpkg::build(&cfg)?;
    si_initrd::bootpkg::write(&pkg, &cfg.out_dir()?)?;
    eprintln!(
        "boot package: kernel {}, initrd {} bytes",
        pkg.report.kernel_release, pkg.report.initrd_bytes
    );
    copy("/usr/lib/ipxe/undionly.kpxe", &root.join("undionly.kpxe"))?;
    copy("/usr/lib/ipxe/ipxe.efi", &root.join("ipxe.efi"))?;

    let server = format!("10.213.{subnet}.1");
    let http = format!("{server}:8080");
    let ns = Netns::new()?;
    ns.sh(&format!(
        "ip link add br0 type bridge
         ip addr add {server}/24 dev br0
         ip -6 addr add fd00:213:{subnet}::1/64 dev br0 nodad
         ip link set br0 up"
    ))?;
    let state = dir.path().join("state");
    si(
        &state,
        "si-node",
        &[
            "subnet",
            "add",
            "boot",
            "--network",
            &format!("10.213.{subnet}.0/24"),
            "--pool",
            &format!("10.213.{subnet}.100-10.213.{subnet}.150"),
        ],
    )?;
    si(
        &state,
        "si-group",
        &[
            "add",
            "compute",
            "--image",
            IMAGE,
            "--firmware",
            match fw {
                Firmware::Bios => "bios",
                Firmware::Uefi => "uefi",
            },
            "--kernel-args",
            "console=ttyS0,115200",
        ],
    )?;
    let mut out = Vec::new();
    for (i, (name, mac)) in vms.iter().enumerate() {
        let tap = format!("tap{i}");
        ns.sh(&format!(
            "ip tuntap add {tap} mode tap\nip link set {tap} master br0 up"
        ))?;
        si(
            &state,
            "si-node",
            &[
                "add",
                name,
                "--mac",
                mac,
                "--ip",
                &format!("10.213.{subnet}.{}", 10 + i),
                "--group",
                "compute",
                "--boot",
                "install",
            ],
        )?;
        out.push(Vm {
            name: name.to_string(),
            mac: mac.to_string(),
            tap,
            disks: Vec::new(),
            boot_disk: None,
            serial: dir.path().join(format!("{name}.serial.log")),
        });
    }
    let log = dir.path().join("server.log");
    let mut child = ns
        .cmd(bin("si-server"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--store")
        .arg(&store)
        .args([
            "--listen",
            &format!("{server}:7811"),
            "--dhcp-interface",
            "br0",
            "--server-ip",
            &server,
        ])
        .arg("--tftp-root")
        .arg(&root)
        .args(["--tftp-listen", &format!("{server}:69")])
        .arg("--http-root")
        .arg(&root)
        .args(["--http-listen", &http])
        // The image service says when a node's session opens (after the handshake).
        .env("RUST_LOG", "info,si_imageserver=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting si-server")?;
    wait_for_log(
        &log,
        &["TFTP server listening", "HTTP server listening"],
        &mut child,
    )
    .context("si-server")?;
    let mut procs = vec![Guard(child)];
    // IPv6 router advertisements only, so that iPXE does not wait ~13 s for one.
    let ra = ns
        .cmd("dnsmasq")
        .args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--port=0",
            "--bind-interfaces",
            "--interface=br0",
            "--enable-ra",
        ])
        .arg(format!("--dhcp-range=fd00:213:{subnet}::,ra-only"))
        .arg(format!(
            "--pid-file={}",
            dir.path().join("ra.pid").display()
        ))
        .arg(format!(
            "--dhcp-leasefile={}",
            dir.path().join("ra.leases").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq for router advertisements")?;
    procs.push(Guard(ra));
    Ok((
        Lab {
            _procs: procs,
            ns,
            dir,
            state,
        },
        out,
    ))
}

/// Console milestones, in the order they appear, and what each marks the end of.
const MILESTONES: &[(&str, &str)] = &[
    ("si-boot: init started", "firmware + netboot + kernel"),
    (
        "si-boot: starting si-install",
        "modules + DHCP in the initramfs",
    ),
    ("step plan: done", "plan"),
    ("step disks: done", "disks"),
    ("step wipe: done", "wipe"),
    ("step partition: done", "partition"),
    ("step mkfs: done", "mkfs"),
    ("step mount: done", "mount"),
    ("step pull: done", "pull"),
    ("step configure: done", "overrides + configure"),
    ("step initramfs: done", "post-scripts + initramfs"),
    ("step bootloader: done", "bootloader"),
    ("installed in", "finish (report)"),
    (" login:", "reboot to login"),
];

/// A running VM and when each milestone showed on its console.
struct Running {
    vm: Guard,
    start: Instant,
    seen: Vec<(String, Duration)>,
}

impl Lab {
    /// A blank (sparse) virtio disk of `size` (truncate's syntax).
    fn add_disk(&self, vm: &mut Vm, name: &str, size: &str) -> Result<PathBuf> {
        self.add(vm, name, size, Bus::Virtio)
    }

    /// A blank NVMe disk with `serial`.
    fn add_nvme(&self, vm: &mut Vm, name: &str, size: &str, serial: &str) -> Result<PathBuf> {
        let bus = Bus::Nvme {
            serial: serial.into(),
        };
        self.add(vm, name, size, bus)
    }

    fn add(&self, vm: &mut Vm, name: &str, size: &str, bus: Bus) -> Result<PathBuf> {
        let p = self.dir.path().join(format!("{}-{name}.raw", vm.name));
        si_tests::run(Command::new("truncate").args(["-s", size]).arg(&p))?;
        vm.disks.push(VmDisk {
            path: p.clone(),
            bus,
        });
        Ok(p)
    }

    fn start(&self, vm: &Vm, fw: Firmware) -> Result<Running> {
        let mut c = self.ns.cmd("qemu-system-x86_64");
        c.args(["-accel", "tcg", "-m", "1024", "-display", "none"])
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={},script=no,downscript=no", vm.tap),
            ])
            .arg("-serial")
            .arg(format!("file:{}", vm.serial.display()));
        for (i, d) in vm.disks.iter().enumerate() {
            c.arg("-drive").arg(format!(
                "file={},if=none,id=d{i},format=raw",
                d.path.display()
            ));
            let mut dev = match &d.bus {
                Bus::Virtio => format!("virtio-blk-pci,drive=d{i}"),
                Bus::Nvme { serial } => format!("nvme,drive=d{i},serial={serial}"),
            };
            if vm.boot_disk == Some(i) {
                dev.push_str(",bootindex=2");
            }
            c.args(["-device", &dev]);
        }
        match fw {
            Firmware::Bios => {
                // Network first at every boot: the master decides (install, then local).
                c.args(["-machine", "pc,graphics=off"]);
                if vm.boot_disk.is_some() {
                    // Boot indexes order the boot devices: the NIC, then that disk, which
                    // SeaBIOS makes drive 0x80.
                    c.args([
                        "-device",
                        &format!("e1000,netdev=n0,mac={},bootindex=1", vm.mac),
                    ]);
                } else {
                    c.args(["-boot", "order=nc"])
                        .args(["-device", &format!("e1000,netdev=n0,mac={}", vm.mac)]);
                }
            }
            Firmware::Uefi => {
                let vars = self.dir.path().join(format!("{}-OVMF_VARS.fd", vm.name));
                copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars)?;
                c.args(["-machine", "q35"])
                    .args([
                        "-drive",
                        "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                    ])
                    .arg("-drive")
                    .arg(format!("if=pflash,format=raw,file={}", vars.display()))
                    .args(["-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=no"])
                    .args([
                        "-device",
                        &format!("virtio-net-pci,netdev=n0,mac={},romfile=", vm.mac),
                    ]);
            }
        }
        let qlog = self.dir.path().join(format!("{}.qemu.log", vm.name));
        let child = c
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&qlog)?)
            .spawn()
            .context("starting qemu")?;
        Ok(Running {
            vm: Guard(child),
            start: Instant::now(),
            seen: Vec::new(),
        })
    }

    fn log(&self, name: &str) -> String {
        let text = std::fs::read(self.dir.path().join(name)).unwrap_or_default();
        si_tests::strip_ansi(&String::from_utf8_lossy(&text))
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Running {
    /// Reads the console, records new milestones; returns the console text.
    fn poll(&mut self, vm: &Vm) -> String {
        let text = si_tests::strip_ansi(&String::from_utf8_lossy(
            &std::fs::read(&vm.serial).unwrap_or_default(),
        ));
        for (needle, _) in MILESTONES {
            if !self.seen.iter().any(|(n, _)| n == needle) && text.contains(needle) {
                self.seen.push((needle.to_string(), self.start.elapsed()));
            }
        }
        text
    }

    /// Waits until the console shows `want` (or fails on `fail`, the VM's exit or the timeout).
    fn wait_for(
        &mut self,
        vm: &Vm,
        want: &str,
        fail: &[&str],
        timeout: Duration,
    ) -> Result<String> {
        loop {
            let text = self.poll(vm);
            if text.contains(want) {
                return Ok(text);
            }
            for f in fail {
                if text.contains(f) {
                    bail!("{}: console shows {f:?}:\n{}", vm.name, tail(&text, 80));
                }
            }
            if let Some(st) = self.vm.0.try_wait()? {
                bail!(
                    "{}: qemu exited ({st}) before {want:?}:\n{}",
                    vm.name,
                    tail(&text, 80)
                );
            }
            if self.start.elapsed() > timeout {
                bail!(
                    "{}: no {want:?} after {timeout:?}:\n{}",
                    vm.name,
                    tail(&text, 80)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The milestones with the time each stage took.
    fn times(&self, vm: &Vm) -> String {
        let mut s = format!("INSTALL-TIMES {}:", vm.name);
        let mut last = Duration::ZERO;
        for (needle, what) in MILESTONES {
            if let Some((_, at)) = self.seen.iter().find(|(n, _)| n == needle) {
                s.push_str(&format!(
                    "\n  {what:<34} {:>7.1} s   (at {:>7.1} s)",
                    (*at - last).as_secs_f64(),
                    at.as_secs_f64()
                ));
                last = *at;
            }
        }
        s
    }
}

/// Lines of the console that show the installer failed or the boot went wrong.
const FAILURES: &[&str] = &[
    "si-install: FAILED",
    "si-boot: rescue shell",
    "Kernel panic",
    "No bootable device",
    "grub rescue>",
];

/// Waits until the console of every VM shows `want(vm)`, polling them all (a failure line,
/// a VM's exit or the timeout of any fails the wait). Returns each console's text.
fn wait_all(
    vms: &[Vm],
    runs: &mut [Running],
    want: &dyn Fn(&Vm) -> String,
    fail: &[&str],
    timeout: Duration,
) -> Result<Vec<String>> {
    let mut done: Vec<Option<String>> = vec![None; vms.len()];
    loop {
        for (i, (vm, run)) in vms.iter().zip(runs.iter_mut()).enumerate() {
            if done[i].is_some() {
                continue;
            }
            let text = run.poll(vm);
            let w = want(vm);
            if text.contains(&w) {
                eprintln!("{}: {w:?} after {:.1?}", vm.name, run.start.elapsed());
                done[i] = Some(text);
                continue;
            }
            for f in fail {
                if text.contains(f) {
                    bail!("{}: console shows {f:?}:\n{}", vm.name, tail(&text, 80));
                }
            }
            if let Some(st) = run.vm.0.try_wait()? {
                bail!(
                    "{}: qemu exited ({st}) before {w:?}:\n{}",
                    vm.name,
                    tail(&text, 80)
                );
            }
            if run.start.elapsed() > timeout {
                bail!(
                    "{}: no {w:?} after {timeout:?}:\n{}",
                    vm.name,
                    tail(&text, 80)
                );
            }
        }
        if done.iter().all(Option::is_some) {
            return Ok(done.into_iter().flatten().collect());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Starts every VM of the lab and waits for each to install, reboot and show its login
/// prompt (its own hostname); then checks the master's record of each. Returns the running
/// VMs (still up).
fn install_all(lab: &Lab, vms: &[Vm], fw: Firmware) -> Vec<Running> {
    let mut runs: Vec<Running> = vms.iter().map(|vm| lab.start(vm, fw).unwrap()).collect();
    let result = (|| -> Result<()> {
        let starting = |_: &Vm| "si-boot: starting si-install".to_string();
        wait_all(
            vms,
            &mut runs,
            &starting,
            FAILURES,
            Duration::from_secs(600),
        )?;
        let installed = |_: &Vm| "installed in".to_string();
        wait_all(vms, &mut runs, &installed, FAILURES, INSTALL_TIMEOUT)?;
        // Rebooted: iPXE gets the local boot script, the disk boots to a login prompt.
        let login = |vm: &Vm| format!("{} login:", vm.name);
        wait_all(
            vms,
            &mut runs,
            &login,
            &["Kernel panic", "grub rescue>", "No bootable device"],
            INSTALL_TIMEOUT,
        )?;
        Ok(())
    })();
    for (vm, run) in vms.iter().zip(&runs) {
        eprintln!("{}", run.times(vm));
    }
    if let Err(e) = result {
        panic!(
            "{e:#}\n--- si-server (tail):\n{}",
            tail(&lab.log("server.log"), 60)
        );
    }
    // The master shows each installed, booting locally, with the image version it installed
    // in its history.
    let history = si(&lab.state, "si-node", &["history"]).unwrap();
    for vm in vms {
        let shown = si(&lab.state, "si-node", &["show", &vm.name]).unwrap();
        eprintln!("{shown}");
        assert!(shown.contains("state: installed"), "{shown}");
        assert!(shown.contains("boot: local"), "{shown}");
        let entry = format!("node/{}", vm.name);
        assert!(
            history
                .lines()
                .any(|l| l.contains(&entry) && l.contains(&format!("image {IMAGE}@1"))),
            "{history}"
        );
    }
    runs
}

fn installed_vm(fw: Firmware, subnet: u8, layout: &str) {
    let _one = SCENARIO.lock().unwrap_or_else(|e| e.into_inner());
    let name = match fw {
        Firmware::Bios => "vm-bios",
        Firmware::Uefi => "vm-uefi",
    };
    let mac = format!("52:54:00:d2:{subnet:02x}:01");
    let (lab, mut vms) = lab(subnet, layout, Tree::Vm, &[(name, &mac)], fw).unwrap();
    lab.add_disk(&mut vms[0], "vda", "6G").unwrap();
    install_all(&lab, &vms, fw);
}

/// Whether the first MiB of a disk file is all zeros (a disk nothing wrote a table to).
fn first_mib_is_zero(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .with_context(|| format!("reading the first MiB of {}", path.display()))?;
    Ok(buf.iter().all(|&b| b == 0))
}

/// Bytes of a disk file that are allocated (a sparse file nothing wrote to has none).
fn allocated(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(m.blocks() * 512)
}

/// The first half, which holds whatever the master's install plans can do: the VM netboots
/// the boot package from si-server, `/init` loads its modules, gets the node's address by
/// DHCP and starts si-install, which opens a session with the master's image service (the
/// handshake passed: `session open` from the node's address).
fn reaches_installer(fw: Firmware, subnet: u8) {
    let _one = SCENARIO.lock().unwrap_or_else(|e| e.into_inner());
    let name = "vm-boot";
    let mac = format!("52:54:00:d2:{subnet:02x}:01");
    let (lab, mut vms) = lab(subnet, "", Tree::Tiny, &[(name, &mac)], fw).unwrap();
    let mut vm = vms.remove(0);
    lab.add_disk(&mut vm, "vda", "1G").unwrap();
    let mut run = lab.start(&vm, fw).unwrap();
    let console = run
        .wait_for(
            &vm,
            "si-boot: starting si-install",
            FAILURES,
            Duration::from_secs(600),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\n--- si-server:\n{}",
                tail(&lab.log("server.log"), 60)
            )
        });
    eprintln!(
        "{fw:?}: the installer started after {:.1?}",
        run.start.elapsed()
    );
    let ip = format!("10.213.{subnet}.10");
    assert!(
        console.contains(&format!("si-boot: network up on eth0 ({ip}/24"))
            || console.contains(&format!("({ip}/24")),
        "{}",
        tail(&console, 40)
    );
    // The installer reached the master: a session from the node's address.
    let want = format!("session open peer={ip}:");
    let start = Instant::now();
    while !lab.log("server.log").contains(&want) {
        if start.elapsed() > Duration::from_secs(300) {
            panic!(
                "no {want:?} in si-server's log:\n{}\n--- console:\n{}",
                tail(&lab.log("server.log"), 40),
                tail(&run.poll(&vm), 40)
            );
        }
        if let Some(st) = run.vm.0.try_wait().unwrap() {
            panic!("qemu exited ({st}):\n{}", tail(&run.poll(&vm), 40));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "{fw:?}: si-install's session with the master after {:.1?}",
        run.start.elapsed()
    );
    eprintln!("{}", run.times(&vm));
    // The kernel the master served is the package's, and the package's modules loaded.
    assert!(
        console.contains("si-boot: loaded "),
        "{}",
        tail(&console, 40)
    );
    let log = lab.log("server.log");
    for p in ["/si/vmlinuz", "/si/initrd.img"] {
        assert!(log.contains(&format!("path=\"{p}\" status=200")), "{log}");
    }
}

#[test]
fn bios_netboot_reaches_the_installer_and_the_master() {
    require_root!();
    reaches_installer(Firmware::Bios, 82);
}

#[test]
fn uefi_netboot_reaches_the_installer_and_the_master() {
    require_root!();
    reaches_installer(Firmware::Uefi, 83);
}

#[test]
fn install_bios_virtio_disk_boots_to_login() {
    require_root!();
    installed_vm(Firmware::Bios, 80, "tests/fixtures/install/bios-mbr.toml");
}

#[test]
fn install_uefi_virtio_disk_boots_to_login() {
    require_root!();
    installed_vm(Firmware::Uefi, 81, "images/layouts/uefi-gpt.toml");
}

/// Issue 12: two VMs netboot from one master at the same time and install side by side (two
/// sessions of the image service, two pulls at once); each reboots to the login prompt of its
/// own name, and the inventory shows both installed, booting locally, with the version.
#[test]
fn two_bios_vms_install_at_once() {
    require_root!();
    let _one = SCENARIO.lock().unwrap_or_else(|e| e.into_inner());
    let subnet = 84;
    let nodes = [
        ("vm-one", format!("52:54:00:d2:{subnet:02x}:01")),
        ("vm-two", format!("52:54:00:d2:{subnet:02x}:02")),
    ];
    let nodes: Vec<(&str, &str)> = nodes.iter().map(|(n, m)| (*n, m.as_str())).collect();
    let (lab, mut vms) = lab(
        subnet,
        "tests/fixtures/install/bios-mbr.toml",
        Tree::Vm,
        &nodes,
        Firmware::Bios,
    )
    .unwrap();
    for vm in &mut vms {
        lab.add_disk(vm, "vda", "6G").unwrap();
    }
    let t = Instant::now();
    install_all(&lab, &vms, Firmware::Bios);
    eprintln!("both installed and at login after {:.1?}", t.elapsed());
    // Each pulled the image in its own session (both from their own addresses).
    let log = lab.log("server.log");
    for i in 0..2 {
        let want = format!("session open peer=10.213.{subnet}.{}:", 10 + i);
        assert!(log.contains(&want), "no {want:?} in si-server's log");
    }
}

/// Issue 12: a VM with an NVMe disk and a (smaller) virtio disk; the layout selects the NVMe
/// disk by transport and serial (`tests/fixtures/install/bios-nvme.toml`). The install goes
/// to the NVMe disk, SeaBIOS boots it (as drive 0x80, the disk after the NIC in the boot
/// order) to the login prompt, and the virtio disk is never written.
#[test]
fn install_bios_nvme_beside_virtio_picks_the_nvme_disk() {
    require_root!();
    let _one = SCENARIO.lock().unwrap_or_else(|e| e.into_inner());
    let subnet = 86;
    let name = "vm-nvme";
    let mac = format!("52:54:00:d2:{subnet:02x}:01");
    let (lab, mut vms) = lab(
        subnet,
        "tests/fixtures/install/bios-nvme.toml",
        Tree::Vm,
        &[(name, &mac)],
        Firmware::Bios,
    )
    .unwrap();
    // The virtio disk first on the PCI bus, and of another size. (By order alone the installer
    // would take nvme0n1 too: natural order puts nvme before vd. What this shows is that the
    // selector's transport and serial are read right in the initramfs, which has no udev,
    // and that the other disk is left alone.)
    let virtio = lab.add_disk(&mut vms[0], "vda", "4G").unwrap();
    let nvme = lab
        .add_nvme(&mut vms[0], "nvme", "6G", "SI-NVME-0001")
        .unwrap();
    vms[0].boot_disk = Some(1);
    let runs = install_all(&lab, &vms, Firmware::Bios);
    let console = si_tests::strip_ansi(&String::from_utf8_lossy(
        &std::fs::read(&vms[0].serial).unwrap(),
    ));
    // The installer's plan named the NVMe disk for the layout disk, and GRUB went there.
    assert!(
        console.contains("disk /dev/nvme0n1 (6442450944 bytes) <- layout disk a"),
        "{}",
        tail(&console, 120)
    );
    assert!(
        console.contains("grub-install --target=i386-pc /dev/nvme0n1"),
        "{}",
        tail(&console, 120)
    );
    assert!(
        console.contains("partitioned /dev/nvme0n1"),
        "{}",
        tail(&console, 120)
    );
    assert!(
        !console.contains("partitioned /dev/vd"),
        "{}",
        tail(&console, 120)
    );
    // Stop the VM, then read its disks.
    drop(runs);
    assert!(
        !first_mib_is_zero(&nvme).unwrap(),
        "the NVMe disk has no table"
    );
    assert!(
        first_mib_is_zero(&virtio).unwrap(),
        "the virtio disk was written"
    );
    assert_eq!(
        allocated(&virtio).unwrap(),
        0,
        "the virtio disk has written blocks"
    );
}

/// Issue 12: a layout that needs 8 GiB on a VM whose only disk has 2 GiB. The installer
/// refuses when it matches disks, before anything is written; the console and the master (its
/// report log) carry the failure with the reason; the node stays set to install; the disk
/// was never written.
#[test]
fn install_on_a_too_small_disk_fails_before_writing() {
    require_root!();
    let _one = SCENARIO.lock().unwrap_or_else(|e| e.into_inner());
    let subnet = 85;
    let name = "vm-small";
    let mac = format!("52:54:00:d2:{subnet:02x}:01");
    let (lab, mut vms) = lab(
        subnet,
        "tests/fixtures/install/bios-too-big.toml",
        Tree::Tiny,
        &[(name, &mac)],
        Firmware::Bios,
    )
    .unwrap();
    let disk = lab.add_disk(&mut vms[0], "vda", "2G").unwrap();
    let vm = &vms[0];
    let mut run = lab.start(vm, Firmware::Bios).unwrap();
    let console = run
        .wait_for(
            vm,
            "si-install: FAILED",
            &["Kernel panic", "No bootable device"],
            Duration::from_secs(600),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\n--- si-server:\n{}",
                tail(&lab.log("server.log"), 60)
            )
        });
    eprintln!("{name}: failed after {:.1?}", run.start.elapsed());
    let failed = console
        .lines()
        .find(|l| l.contains("si-install: FAILED"))
        .unwrap_or_default()
        .to_string();
    assert!(
        failed.contains("step disks")
            && failed.contains("disk vda is too small for layout disk a")
            && failed.contains("2147483648 bytes"),
        "{}",
        tail(&console, 60)
    );
    // Refused before the first step that writes.
    for step in ["step wipe", "partitioned", "mkfs "] {
        assert!(!console.contains(step), "{}", tail(&console, 60));
    }
    // The master got the failure with the reason (status -1, the error).
    let start = Instant::now();
    let report = loop {
        let log = lab.log("server.log");
        if let Some(l) = log.lines().find(|l| {
            l.contains("node report")
                && l.contains(&format!("node={name}"))
                && l.contains("state=failed")
        }) {
            break l.to_string();
        }
        if start.elapsed() > Duration::from_secs(120) {
            panic!("no failed report from {name}:\n{}", tail(&log, 40));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("{report}");
    assert!(
        report.contains("status=-1") && report.contains("too small for layout disk a"),
        "{report}"
    );
    // The inventory shows the failure and keeps the node armed: its next netboot installs
    // again; the reason is in its history.
    let shown = si(&lab.state, "si-node", &["show", name]).unwrap();
    eprintln!("{shown}");
    assert!(shown.contains("state: failed"), "{shown}");
    assert!(shown.contains("boot: install"), "{shown}");
    let history = si(&lab.state, "si-node", &["history"]).unwrap();
    assert!(
        history.lines().any(|l| l.contains(&format!("node/{name}"))
            && l.contains("install-failed")
            && l.contains("too small for layout disk a")),
        "{history}"
    );
    drop(run);
    assert!(first_mib_is_zero(&disk).unwrap(), "the disk was written");
    assert_eq!(allocated(&disk).unwrap(), 0, "the disk has written blocks");
}
