//! Diskless QEMU VMs (TCG) PXE-boot from si-bootd through a tap on a bridge inside a network
//! namespace (10.213.<n>.0/24, plus a ULA prefix fd00:213:<n>::/64 whose router
//! advertisements spare iPXE its 13 s IPv6 wait). The VM loads a kernel and the test
//! initramfs of `si_initrd::testimage`, which gets an address by DHCP, fetches the marker
//! from the HTTP server named by `si.server=` on its command line (put there by the
//! generated per-node boot configuration) and prints it on the serial console.
//!
//! Paths covered:
//! - BIOS: the NIC's iPXE ROM (e1000) → TFTP `boot.ipxe` → HTTP `boot/<mac>.ipxe` → HTTP kernel + initrd;
//! - UEFI: OVMF's own PXE (virtio-net, no option ROM) → TFTP `ipxe.efi` (blksize 1468,
//!   windowsize 4) → iPXE → the same scripts, `initrd=` on the kernel line for the EFI stub;
//! - BIOS: iPXE ROM → TFTP `pxelinux.0` → `pxelinux.cfg/01-<mac>` → kernel + initrd over TFTP;
//! - UEFI: OVMF's own PXE → TFTP `grubx64.efi` (grub-mkimage) → `grub/grub.cfg-01-<mac>` →
//!   kernel + initrd over TFTP (blksize 1024);
//! - UEFI HTTP boot, no TFTP (si-server alone): OVMF (PXE entries hidden) → DHCP `HTTPClient` →
//!   HTTP `ipxe.efi` → iPXE → HTTP `boot/<mac>.ipxe` → HTTP kernel + initrd;
//! - as a site runs it ([`site_boot`], `site_files_*`): si-server alone, no `--server-ip`,
//!   default listen addresses, an unknown VM, and the site's own `pxelinux.cfg/default`,
//!   `boot.ipxe` and `grub/grub.cfg` (a GRUB image without `regexp`) in the TFTP root, winning
//!   over the generated files of the same names: BIOS pxelinux, BIOS iPXE, UEFI iPXE, UEFI PXE
//!   with GRUB, UEFI HTTP boot.
//!
//! DHCP comes from dnsmasq in DHCP-only mode (`--port=0`) for now: see [`start_dhcp`].
//!
//! Needs root and the Debian packages qemu-system-x86, ipxe-qemu, ipxe, ovmf, pxelinux,
//! syslinux-common, grub-common, grub-efi-amd64-bin, dnsmasq-base, busybox-static and linux-image-amd64 (a kernel in /boot
//! with its modules in /lib/modules).

use anyhow::{bail, Context, Result};
use si_tests::{bin, require_root, wait_for_log, Netns, Proc as Guard};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One VM at a time: they are CPU-bound under TCG.
static VM_LOCK: Mutex<()> = Mutex::new(());

const MAC: &str = "52:54:00:d1:00:01";
const VM_TIMEOUT: Duration = Duration::from_secs(120);
/// NIC modules for the test initramfs, in load order.
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "e1000",
];

/// The newest kernel in /boot and its release.
fn find_kernel() -> Result<(PathBuf, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/boot").context("listing /boot")? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(rel) = name.strip_prefix("vmlinuz-") {
            if Path::new("/lib/modules").join(rel).is_dir() {
                found.push(rel.to_string());
            }
        }
    }
    found.sort();
    let rel = found
        .pop()
        .context("no /boot/vmlinuz-* with modules: apt-get install linux-image-amd64")?;
    Ok((PathBuf::from(format!("/boot/vmlinuz-{rel}")), rel))
}

/// How the VM's firmware starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Firmware {
    /// SeaBIOS with the e1000's iPXE option ROM.
    BiosIpxe,
    /// OVMF's own PXE on virtio-net (no option ROM), chaining ipxe.efi.
    UefiOvmf,
    /// SeaBIOS + iPXE ROM handing over to pxelinux.0.
    BiosPxelinux,
    /// OVMF's own PXE chaining a GRUB network image (built with grub-mkimage).
    UefiGrub,
    /// OVMF's UEFI HTTP boot (its PXE entries hidden): ipxe.efi by HTTP, no TFTP at all.
    UefiHttp,
}

/// Who serves the boot files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provider {
    /// si-bootd: TFTP for the first stage, HTTP for scripts, kernel and initrd.
    Si,
    /// si-bootd, everything over TFTP (the same boot as `Dnsmasq`, for benchmarks).
    SiTftpOnly,
    /// dnsmasq's own TFTP server, everything over TFTP (baseline for benchmarks).
    Dnsmasq,
}

/// What the DHCP server must hand out.
struct DhcpPlan<'a> {
    iface: &'a str,
    server: String,
    range: (String, String),
    ipv6_prefix: String,
    /// Boot file for BIOS PXE, UEFI PXE (arch 7) and iPXE (user class `iPXE`) clients.
    bios_file: &'a str,
    efi_file: &'a str,
    ipxe_file: &'a str,
    /// Also serve TFTP from this directory (dnsmasq baseline only).
    tftp_root: Option<&'a Path>,
}

/// Starts the DHCP server for a plan inside `ns`. dnsmasq for now (DHCP only unless the plan
/// asks for its TFTP); swap this function for si's DHCP server once it exists.
fn start_dhcp(ns: &Netns, dir: &Path, plan: &DhcpPlan) -> Result<Guard> {
    let mut c = ns.cmd("dnsmasq");
    c.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=0",
        "--bind-interfaces",
        "--log-dhcp",
    ])
    .arg(format!("--interface={}", plan.iface))
    .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
    .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
    .arg(format!(
        "--dhcp-range={},{},255.255.255.0,1h",
        plan.range.0, plan.range.1
    ))
    .arg(format!("--dhcp-range={},ra-only", plan.ipv6_prefix))
    .arg("--enable-ra")
    .arg("--dhcp-userclass=set:ipxe,iPXE")
    .arg("--dhcp-match=set:efi64,option:client-arch,7")
    .arg(format!(
        "--dhcp-boot=tag:ipxe,{},,{}",
        plan.ipxe_file, plan.server
    ))
    .arg(format!(
        "--dhcp-boot=tag:!ipxe,tag:efi64,{},,{}",
        plan.efi_file, plan.server
    ))
    .arg(format!(
        "--dhcp-boot=tag:!ipxe,tag:!efi64,{},,{}",
        plan.bios_file, plan.server
    ));
    if let Some(root) = plan.tftp_root {
        c.arg("--enable-tftp")
            .arg(format!("--tftp-root={}", root.display()));
    }
    let log = std::fs::File::create(dir.join("dnsmasq.log"))?;
    let child = c
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting dnsmasq")?;
    Ok(Guard(child))
}

/// A namespace with a bridge, the served files and the servers.
struct Lab {
    // Dropped in order: processes first, then the namespace, then the files.
    _procs: Vec<Guard>,
    ns: Netns,
    dir: tempfile::TempDir,
    marker: String,
}

fn copy(from: impl AsRef<Path>, to: &Path) -> Result<()> {
    let from = from.as_ref();
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} (is its package installed?)", from.display()))?;
    Ok(())
}

/// Puts what every boot loads into `root`: `vmlinuz`, the test initramfs `initrd.img` and a
/// fresh `marker`, which it returns.
fn kernel_initrd_marker(root: &Path) -> Result<String> {
    let (vmlinuz, release) = find_kernel()?;
    std::fs::create_dir_all(root)?;
    copy(&vmlinuz, &root.join("vmlinuz"))?;
    let modules = MODULES
        .iter()
        .map(|m| si_initrd::testimage::find_module(&release, m))
        .collect::<Result<Vec<_>>>()?;
    let image = si_initrd::testimage::TestImage {
        busybox: "/bin/busybox".into(),
        modules,
    };
    std::fs::write(root.join("initrd.img"), image.build()?)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let marker = format!("si-marker-{}-{nanos}", std::process::id());
    std::fs::write(root.join("marker"), format!("{marker}\n"))?;
    Ok(marker)
}

/// Builds a GRUB network image for UEFI with `modules`; its prefix `(tftp)/grub` makes it
/// search `grub/grub.cfg-01-<mac>`, `grub/grub.cfg-<IP hex>`…, `grub/grub.cfg`.
fn grub_image(out: &Path, modules: &[&str]) -> Result<()> {
    si_tests::run(
        std::process::Command::new("grub-mkimage")
            .args(["-O", "x86_64-efi", "-p", "(tftp)/grub", "-o"])
            .arg(out)
            .args(modules),
    )
    .context("building a GRUB network image (grub-common, grub-efi-amd64-bin)")?;
    Ok(())
}

/// dnsmasq sending IPv6 router advertisements on br0 of `ns` and nothing else (no DHCP, no
/// TFTP), so that iPXE does not wait ~13 s for one.
fn ra_only(ns: &Netns, dir: &Path, subnet: u8) -> Result<Guard> {
    ns.sh(&format!(
        "ip -6 addr add fd00:213:{subnet}::1/64 dev br0 nodad"
    ))?;
    let child = ns
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
        .arg(format!("--pid-file={}", dir.join("ra.pid").display()))
        .arg(format!(
            "--dhcp-leasefile={}",
            dir.join("ra.leases").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq for router advertisements")?;
    Ok(Guard(child))
}

fn lab(subnet: u8, fw: Firmware, provider: Provider) -> Result<Lab> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    let marker = kernel_initrd_marker(&root)?;
    copy("/usr/lib/ipxe/undionly.kpxe", &root.join("undionly.kpxe"))?;
    copy("/usr/lib/ipxe/ipxe.efi", &root.join("ipxe.efi"))?;
    copy("/usr/lib/PXELINUX/pxelinux.0", &root.join("pxelinux.0"))?;
    copy(
        "/usr/lib/syslinux/modules/bios/ldlinux.c32",
        &root.join("ldlinux.c32"),
    )?;
    if fw == Firmware::UefiGrub {
        let mods = [
            "normal",
            "configfile",
            "linux",
            "efinet",
            "tftp",
            "net",
            "echo",
            "test",
            "regexp",
            "gzio",
        ];
        grub_image(&root.join("grubx64.efi"), &mods)?;
    }

    let server = format!("10.213.{subnet}.1");
    let http = format!("{server}:8080");
    let args = "console=ttyS0 quiet panic=-1";
    let ns = Netns::new()?;
    ns.sh(&format!(
        "ip link add br0 type bridge
         ip addr add {server}/24 dev br0
         ip -6 addr add fd00:213:{subnet}::1/64 dev br0 nodad
         ip link set br0 up
         ip tuntap add tap0 mode tap
         ip link set tap0 master br0 up"
    ))?;

    let mut procs = Vec::new();
    let tftp_script = |base: &str| {
        let mut s = String::from("#!ipxe\n");
        let _ = writeln!(s, "kernel {base}/vmlinuz initrd=initrd.img si.server={http} si.image=test si.node=vm1 {args}");
        let _ = writeln!(s, "initrd {base}/initrd.img\nboot");
        s
    };
    let ipxe_file = match (fw, provider) {
        (Firmware::BiosPxelinux, _) => "pxelinux.0",
        (_, Provider::Si) => "boot.ipxe",
        (_, Provider::SiTftpOnly | Provider::Dnsmasq) => {
            std::fs::write(
                root.join("tftp.ipxe"),
                tftp_script(&format!("tftp://{server}")),
            )?;
            "tftp.ipxe"
        }
    };
    if provider == Provider::Dnsmasq {
        // Only the marker comes over HTTP (busybox httpd); the boot itself is dnsmasq's TFTP.
        let child = ns
            .cmd("busybox")
            .args(["httpd", "-f", "-p", &http, "-h"])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting busybox httpd")?;
        procs.push(Guard(child));
    } else {
        let nodes = dir.path().join("nodes.toml");
        std::fs::write(
            &nodes,
            format!(
                "[[node]]\nname = \"vm1\"\nmacs = [\"{MAC}\"]\nip = \"{server}0\"\n\
                 action = {{ type = \"install\", image = \"test\" }}\nkernel-args = \"{args}\"\n"
            ),
        )?;
        let log = dir.path().join("bootd.log");
        let mut child = ns
            .cmd(bin("si-bootd"))
            .arg("--tftp-root")
            .arg(&root)
            .args([
                "--tftp-listen",
                &format!("{server}:69"),
                "--http-listen",
                &http,
            ])
            .arg("--nodes")
            .arg(&nodes)
            .args([
                "--si-server",
                &http,
                "--installer-kernel",
                "vmlinuz",
                "--installer-initrd",
                "initrd.img",
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting si-bootd")?;
        wait_for_log(
            &log,
            &["TFTP server listening", "HTTP server listening"],
            &mut child,
        )
        .context("si-bootd")?;
        procs.push(Guard(child));
    }
    let plan = DhcpPlan {
        iface: "br0",
        server: server.clone(),
        range: (
            format!("10.213.{subnet}.100"),
            format!("10.213.{subnet}.150"),
        ),
        ipv6_prefix: format!("fd00:213:{subnet}::"),
        bios_file: if fw == Firmware::BiosPxelinux {
            "pxelinux.0"
        } else {
            "undionly.kpxe"
        },
        efi_file: if fw == Firmware::UefiGrub {
            "grubx64.efi"
        } else {
            "ipxe.efi"
        },
        ipxe_file,
        tftp_root: (provider == Provider::Dnsmasq).then_some(root.as_path()),
    };
    procs.push(start_dhcp(&ns, dir.path(), &plan)?);
    Ok(Lab {
        _procs: procs,
        ns,
        dir,
        marker,
    })
}

impl Lab {
    fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        // ANSI colours out, for readable failures.
        si_tests::strip_ansi(&text)
    }

    /// Boots the VM until the marker shows on its serial console; returns the time it took
    /// and the console text.
    fn boot(&self, fw: Firmware) -> Result<(Duration, String)> {
        let serial = self.dir.path().join("serial.log");
        let mut c = self.ns.cmd("qemu-system-x86_64");
        c.args([
            "-accel",
            "tcg",
            "-m",
            "512",
            "-display",
            "none",
            "-no-reboot",
            "-boot",
            "n",
        ])
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()));
        match fw {
            Firmware::BiosIpxe | Firmware::BiosPxelinux => {
                c.args([
                    "-machine",
                    "pc,graphics=off",
                    "-device",
                    &format!("e1000,netdev=n0,mac={MAC}"),
                ]);
            }
            Firmware::UefiOvmf | Firmware::UefiGrub | Firmware::UefiHttp => {
                if fw == Firmware::UefiHttp {
                    // The boot manager lists PXEv4, PXEv6, HTTPv4, HTTPv6 in that order;
                    // without PXE entries it tries HTTP boot over IPv4 first.
                    c.args(["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=no"]);
                }
                let vars = self.dir.path().join("OVMF_VARS.fd");
                copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars)?;
                c.args(["-machine", "q35"])
                    .args([
                        "-drive",
                        "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                    ])
                    .arg("-drive")
                    .arg(format!("if=pflash,format=raw,file={}", vars.display()))
                    .args(["-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=no"])
                    // No option ROM: OVMF's own virtio-net driver and PXE client.
                    .args([
                        "-device",
                        &format!("virtio-net-pci,netdev=n0,mac={MAC},romfile="),
                    ]);
            }
        }
        let start = Instant::now();
        let mut vm = Guard(
            c.stdout(Stdio::null())
                .stderr(std::fs::File::create(self.dir.path().join("qemu.log"))?)
                .spawn()
                .context("starting qemu")?,
        );
        let want = format!("SI-MARKER-BEGIN {} SI-MARKER-END", self.marker);
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let text =
                String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
            if text.contains(&want) {
                let took = start.elapsed();
                // Let it power off by itself; the guard kills it otherwise.
                for _ in 0..50 {
                    if vm.0.try_wait()?.is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                return Ok((took, text));
            }
            let tail = || {
                text.chars()
                    .rev()
                    .take(3000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<String>()
            };
            if text.contains("SI-MARKER-FAILED") {
                bail!("the VM could not fetch the marker:\n{}", tail());
            }
            if let Some(st) = vm.0.try_wait()? {
                bail!(
                    "qemu exited ({st}) without the marker:\n{}\nqemu: {}",
                    tail(),
                    self.log("qemu.log")
                );
            }
            if start.elapsed() > VM_TIMEOUT {
                bail!("no marker after {VM_TIMEOUT:?}:\n{}", tail());
            }
        }
    }

    fn boot_or_explain(&self, fw: Firmware) -> (Duration, String) {
        match self.boot(fw) {
            Ok(r) => r,
            Err(e) => panic!(
                "{fw:?} boot failed: {e:#}\n--- si-bootd:\n{}\n--- dnsmasq:\n{}",
                self.log("bootd.log"),
                self.log("dnsmasq.log")
            ),
        }
    }
}

fn vm_lock() -> std::sync::MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn pxe_bios_ipxe_rom_boots_over_http() {
    require_root!();
    let _l = vm_lock();
    let lab = lab(11, Firmware::BiosIpxe, Provider::Si).unwrap();
    let (took, console) = lab.boot_or_explain(Firmware::BiosIpxe);
    eprintln!("BIOS/iPXE boot to marker: {took:.1?}");
    let log = lab.log("bootd.log");
    assert!(log.contains("file=\"boot.ipxe\""), "{log}");
    assert!(
        log.contains("path=\"/boot/52-54-00-d1-00-01.ipxe\" status=200"),
        "{log}"
    );
    assert!(
        log.contains("path=\"/vmlinuz\" status=200")
            && log.contains("path=\"/initrd.img\" status=200")
    );
    assert!(console.contains("si: booting vm1"), "{console}");
}

#[test]
fn pxe_uefi_ovmf_boots_ipxe_efi_over_tftp() {
    require_root!();
    let _l = vm_lock();
    let lab = lab(12, Firmware::UefiOvmf, Provider::Si).unwrap();
    let (took, console) = lab.boot_or_explain(Firmware::UefiOvmf);
    eprintln!("UEFI/OVMF boot to marker: {took:.1?}");
    let log = lab.log("bootd.log");
    // OVMF's PXE asks for windowsize 4.
    assert!(
        log.contains("file=\"ipxe.efi\"") && log.contains("\"windowsize\", \"4\""),
        "{log}"
    );
    assert!(
        log.contains("path=\"/boot/52-54-00-d1-00-01.ipxe\" status=200"),
        "{log}"
    );
    assert!(console.contains("si: booting vm1"), "{console}");
}

#[test]
fn pxe_bios_pxelinux_boots_over_tftp() {
    require_root!();
    let _l = vm_lock();
    let lab = lab(13, Firmware::BiosPxelinux, Provider::Si).unwrap();
    let (took, _console) = lab.boot_or_explain(Firmware::BiosPxelinux);
    eprintln!("BIOS/pxelinux boot to marker: {took:.1?}");
    let log = lab.log("bootd.log");
    assert!(
        log.contains("file=\"pxelinux.cfg/01-52-54-00-d1-00-01\""),
        "{log}"
    );
    assert!(log.contains("file=\"vmlinuz\""), "{log}");
    // pxelinux asks for 1408-byte blocks.
    assert!(log.contains("(\"blksize\", \"1408\")"), "{log}");
}

#[test]
fn pxe_uefi_grub_boots_over_tftp() {
    require_root!();
    let _l = vm_lock();
    let lab = lab(15, Firmware::UefiGrub, Provider::Si).unwrap();
    let (took, console) = lab.boot_or_explain(Firmware::UefiGrub);
    eprintln!("UEFI/GRUB boot to marker: {took:.1?}");
    let log = lab.log("bootd.log");
    assert!(
        log.contains("file=\"/grub/grub.cfg-01-52-54-00-d1-00-01\""),
        "{log}"
    );
    assert!(
        log.contains("file=\"/vmlinuz\"") && log.contains("(\"blksize\", \"1024\")"),
        "{log}"
    );
    assert!(console.contains("si: vm1"), "{console}");
}

/// `bench/pxe.sh`: seconds from VM start to the marker: si-bootd (behind dnsmasq's DHCP) vs
/// dnsmasq's TFTP, and si-server alone (its DHCP, TFTP and HTTP).
#[test]
#[ignore = "benchmark: run by bench/pxe.sh"]
fn bench_pxe() {
    require_root!();
    let runs: usize = std::env::var("SI_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let report = |what: &str, mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        println!(
            "BENCH pxe {what}: median {:.1} s over {runs} runs {times:.1?}",
            times[times.len() / 2]
        );
    };
    let vm = vm_lock();
    for (provider, what) in [
        (
            Provider::Si,
            "si-bootd, iPXE script + kernel/initrd over HTTP",
        ),
        (Provider::SiTftpOnly, "si-bootd, all over TFTP"),
        (Provider::Dnsmasq, "dnsmasq, all over its own TFTP"),
    ] {
        let mut times = Vec::new();
        for _ in 0..runs {
            let lab = lab(14, Firmware::BiosIpxe, provider).unwrap();
            let (took, _) = lab.boot_or_explain(Firmware::BiosIpxe);
            times.push(took.as_secs_f64());
        }
        report(what, times);
    }
    drop(vm);
    let times = (0..runs)
        .map(|_| full_stack(Firmware::BiosIpxe, 63, true).2.as_secs_f64())
        .collect();
    report(
        "si-server: DHCP from its inventory, script + kernel/initrd by HTTP (dnsmasq: IPv6 RAs only)",
        times,
    );
}

/// The whole master in one process: `si-server` answers DHCP from its inventory, serves iPXE
/// over TFTP and the per-node script, kernel and initrd over HTTP, and when the node reports a
/// finished install (`si-report`) flips it to local boot in the inventory and in its boot files.
#[test]
fn si_server_full_stack_bios_boot_then_local() {
    require_root!();
    full_stack(Firmware::BiosIpxe, 60, false);
}

/// The same with UEFI firmware (OVMF's own PXE client fetches ipxe.efi from si's TFTP).
#[test]
fn si_server_full_stack_uefi_boot_then_local() {
    require_root!();
    full_stack(Firmware::UefiOvmf, 61, false);
}

/// UEFI HTTP boot, no PXE and no TFTP: OVMF (PXE entries hidden) sends DHCP with vendor class
/// `HTTPClient`, si-server answers with the URL of ipxe.efi, the firmware downloads it over HTTP
/// and starts it; iPXE asks DHCP again (user class iPXE) and gets the node's script URL, then
/// kernel and initrd over HTTP. si-server runs without a TFTP server.
#[test]
fn si_server_full_stack_uefi_http_boot() {
    require_root!();
    let (log, console, _) = full_stack(Firmware::UefiHttp, 62, false);
    // The firmware's boot manager started its HTTP boot entry, got the URL from si's DHCP
    // answer and started what it downloaded (iPXE); no PXE attempt.
    for want in [
        "Start HTTP Boot over IPv4",
        "URI: http://10.213.62.1:8080/ipxe.efi",
        "\"UEFI HTTPv4 (MAC:525400D10001)\"",
        "iPXE initialising devices",
        "Filename: http://10.213.62.1:8080/boot/52-54-00-d1-00-01.ipxe",
        "si: booting vm1",
    ] {
        assert!(console.contains(want), "no {want:?} in:\n{console}");
    }
    assert!(!console.contains("Start PXE"), "{console}");
    // si-server saw an HTTP boot client (vendor class HTTPClient), then iPXE; files by HTTP only.
    assert!(log.contains("firmware=UefiHttp ipxe=false"), "{log}");
    for path in [
        "/ipxe.efi",
        "/boot/52-54-00-d1-00-01.ipxe",
        "/vmlinuz",
        "/initrd.img",
    ] {
        assert!(
            log.contains(&format!("method=GET path=\"{path}\" status=200")),
            "no GET {path} in:\n{log}"
        );
    }
    assert!(!log.contains("TFTP"), "{log}");
}

/// Boots a node of the inventory through si-server alone; returns si-server's log, the serial
/// console and the time from VM start to the marker. With `ra`, dnsmasq sends IPv6 router
/// advertisements beside it (and nothing else: no DHCP, no TFTP), as in the [`lab`] setups, so
/// that iPXE does not wait ~13 s for one.
/// A fresh namespace with a bridge holding `server`/24 and the VM's tap on it.
fn bridged_netns(server: &str) -> Result<Netns> {
    let ns = Netns::new()?;
    ns.sh(&format!(
        "ip link add br0 type bridge
         ip addr add {server}/24 dev br0
         ip link set br0 up
         ip tuntap add tap0 mode tap
         ip link set tap0 master br0 up"
    ))?;
    Ok(ns)
}

/// Runs si-server (`cmd`, made in `ns`) with its log in `dir/server.log`, waits for the
/// `ready` lines, sends router advertisements on `ra_subnet` if given, and boots the VM with
/// `fw`. Returns the lab (which stops everything when dropped), the time to the marker and the
/// serial console; a failed boot panics with si-server's log.
fn server_lab(
    mut cmd: std::process::Command,
    ready: &[&str],
    ns: Netns,
    dir: tempfile::TempDir,
    marker: String,
    ra_subnet: Option<u8>,
    fw: Firmware,
) -> (Lab, Duration, String) {
    let log = dir.path().join("server.log");
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_log(&log, ready, &mut child).unwrap();
    let mut procs = vec![Guard(child)];
    if let Some(subnet) = ra_subnet {
        procs.push(ra_only(&ns, dir.path(), subnet).unwrap());
    }
    let lab = Lab {
        _procs: procs,
        ns,
        dir,
        marker,
    };
    match lab.boot(fw) {
        Ok((took, console)) => (lab, took, console),
        Err(e) => panic!("{fw:?}: {e:#}\n--- si-server:\n{}", lab.log("server.log")),
    }
}

fn full_stack(fw: Firmware, subnet: u8, ra: bool) -> (String, String, std::time::Duration) {
    let _vm = vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let marker = kernel_initrd_marker(&root).unwrap();
    copy("/usr/lib/ipxe/undionly.kpxe", &root.join("undionly.kpxe")).unwrap();
    copy("/usr/lib/ipxe/ipxe.efi", &root.join("ipxe.efi")).unwrap();
    // UEFI HTTP boot needs no TFTP server: si-server runs without one, and the firmware gets
    // the same ipxe.efi at the default URL `{http}/ipxe.efi`.
    let tftp = fw != Firmware::UefiHttp;

    let server = format!("10.213.{subnet}.1");
    let http = format!("{server}:8080");
    let ns = bridged_netns(&server).unwrap();
    let state = dir.path().join("state");
    let si = |tool: &str, args: &[&str]| {
        si_tests::run(
            std::process::Command::new(bin(tool))
                .arg("--state-dir")
                .arg(&state)
                .args(["--images", "compute"])
                .args(args),
        )
        .unwrap()
    };
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
        ],
    );
    let firmware = if fw == Firmware::UefiHttp {
        "uefi"
    } else {
        "auto"
    };
    si(
        "si-group",
        &[
            "add",
            "compute",
            "--image",
            "compute",
            "--firmware",
            firmware,
            "--kernel-args",
            &format!("console=ttyS0 quiet panic=-1 si.http={http}"),
        ],
    );
    si(
        "si-node",
        &[
            "add",
            "vm1",
            "--mac",
            MAC,
            "--ip",
            &format!("10.213.{subnet}.10"),
            "--group",
            "compute",
            "--boot",
            "install",
        ],
    );

    let store = dir.path().join("store");
    let mut cmd = ns.cmd(bin("si-server"));
    cmd.arg("--ca-dir")
        .arg(&si_tests::test_ca().dir)
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
        ]);
    if tftp {
        cmd.arg("--tftp-root")
            .arg(&root)
            .args(["--tftp-listen", &format!("{server}:69")]);
    }
    cmd.arg("--http-root").arg(&root).args([
        "--http-listen",
        &http,
        "--installer-kernel",
        "vmlinuz",
        "--installer-initrd",
        "initrd.img",
    ]);
    let ready: &[&str] = if tftp {
        &["TFTP server listening", "HTTP server listening"]
    } else {
        &["HTTP server listening"]
    };
    let (lab, took, console) = server_lab(cmd, ready, ns, dir, marker, ra.then_some(subnet), fw);
    eprintln!("full stack {fw:?} boot: marker after {took:?}");
    let script_url = format!("http://{http}/boot/52-54-00-d1-00-01.ipxe");
    let before = lab
        .ns
        .sh(&format!("busybox wget -q -O - {script_url}"))
        .unwrap();
    assert!(
        String::from_utf8_lossy(&before.stdout).contains("vmlinuz"),
        "install script serves the installer"
    );
    // The installer enrolled first: arming the install opened vm1's one-time enrollment, the
    // token comes from the master (on the boot script, once the installer carries it).
    si("si-node", &["set", "vm1", "--boot", "install"]);
    let token = si_tests::run(
        std::process::Command::new(bin("si-server"))
            .arg("--state-dir")
            .arg(&state)
            .arg("--ca-dir")
            .arg(&si_tests::test_ca().dir)
            .args(["ca", "token", "vm1"]),
    )
    .unwrap();
    let token = String::from_utf8_lossy(&token.stdout).trim().to_string();
    let id = lab.dir.path().join("vm1-identity");
    si_tests::run(
        lab.ns
            .cmd(bin("si-enroll"))
            .env("SI_CA_FINGERPRINT", &si_tests::test_ca().pin)
            .args(["--server", &format!("{server}:7811"), "--node", "vm1"])
            .args([
                "--token",
                &token,
                "--mac",
                "52:54:00:d1:00:01",
                "--uuid",
                "vm1",
            ])
            .arg("--identity-dir")
            .arg(&id),
    )
    .unwrap();
    // The installer's last step: report; the node boots its disk from now on.
    si_tests::run(
        lab.ns
            .cmd(bin("si-report"))
            .env("SI_CA_FINGERPRINT", &si_tests::test_ca().pin)
            .arg("--identity-dir")
            .arg(&id)
            .args([
                "--server",
                &format!("{server}:7811"),
                "--node",
                "vm1",
                "--state",
                "installed",
            ]),
    )
    .unwrap();
    let shown = si("si-node", &["show", "vm1"]);
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("local"),
        "{}",
        String::from_utf8_lossy(&shown.stdout)
    );
    let after = lab
        .ns
        .sh(&format!("busybox wget -q -O - {script_url}"))
        .unwrap();
    let after = String::from_utf8_lossy(&after.stdout);
    assert!(
        after.contains("sanboot") || after.contains("exit"),
        "{after}"
    );
    assert!(!after.contains("vmlinuz"), "{after}");
    (lab.log("server.log"), console, took)
}

/// A site's own boot files, under the names si also generates (`pxelinux.cfg/default`,
/// `boot.ipxe`, `grub/grub.cfg`), served by si-server alone as a new site runs it: its DHCP on
/// br0 with no `--server-ip`, TFTP, HTTP and the image service on their default (wildcard)
/// addresses, the VM unknown to the inventory (`--unknown discover`, a pool address). Every
/// answer naming a TFTP file must carry the next server, every URL the interface's address, and
/// the root's files must win over the generated ones (`--boot-files root-first`, the default).
/// Returns si-server's log, the serial console and the time from VM start to the marker.
fn site_boot(fw: Firmware, subnet: u8) -> (String, String, Duration) {
    let _vm = vm_lock();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let marker = kernel_initrd_marker(&root).unwrap();
    let server = format!("10.213.{subnet}.1");
    let cmdline = "console=ttyS0 quiet panic=-1";
    // The site's files: Debian's loaders, and configurations of its own.
    copy("/usr/lib/ipxe/ipxe.efi", &root.join("ipxe.efi")).unwrap();
    copy("/usr/lib/PXELINUX/pxelinux.0", &root.join("pxelinux.0")).unwrap();
    copy(
        "/usr/lib/syslinux/modules/bios/ldlinux.c32",
        &root.join("ldlinux.c32"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("pxelinux.cfg")).unwrap();
    std::fs::write(
        root.join("pxelinux.cfg/default"),
        format!(
            "SAY site: pxelinux.cfg/default\nDEFAULT site\nPROMPT 0\nTIMEOUT 0\nLABEL site\n  \
             KERNEL vmlinuz\n  INITRD initrd.img\n  APPEND si.http={server} {cmdline}\n"
        ),
    )
    .unwrap();
    // Relative names resolve against the script's own tftp:// URL; the kernel is told the
    // server the DHCP answer named.
    std::fs::write(
        root.join("boot.ipxe"),
        format!(
            "#!ipxe\necho site: boot.ipxe from ${{next-server}}\n\
             kernel vmlinuz initrd=initrd.img si.http=${{next-server}} {cmdline}\n\
             initrd initrd.img\nboot\n"
        ),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("grub")).unwrap();
    std::fs::write(
        root.join("grub/grub.cfg"),
        format!(
            "set timeout=0\nmenuentry 'site' {{\n  echo 'site: grub.cfg'\n  \
             linux /vmlinuz si.http={server} {cmdline}\n  initrd /initrd.img\n}}\n"
        ),
    )
    .unwrap();
    if fw == Firmware::UefiGrub {
        // A site's GRUB: no regexp (nor anything else si's own grub.cfg might use).
        let mods = [
            "normal",
            "configfile",
            "linux",
            "efinet",
            "tftp",
            "net",
            "echo",
            "gzio",
        ];
        grub_image(&root.join("grubx64.efi"), &mods).unwrap();
    }

    let ns = bridged_netns(&server).unwrap();
    let state = dir.path().join("state");
    si_tests::run(
        std::process::Command::new(bin("si-node"))
            .arg("--state-dir")
            .arg(&state)
            .args(["subnet", "add", "boot", "--network"])
            .arg(format!("10.213.{subnet}.0/24"))
            .arg("--pool")
            .arg(format!("10.213.{subnet}.100-10.213.{subnet}.150")),
    )
    .unwrap();
    // The site's choice of first stage: iPXE ROMs and iPXE itself get the iPXE script (or
    // pxelinux.0 when the site boots pxelinux), UEFI PXE ipxe.efi (or GRUB), UEFI HTTP boot
    // the default URL {http}/ipxe.efi.
    let (ipxe_file, uefi_file) = match fw {
        Firmware::BiosPxelinux => ("pxelinux.0", "ipxe.efi"),
        Firmware::UefiGrub => ("boot.ipxe", "grubx64.efi"),
        _ => ("boot.ipxe", "ipxe.efi"),
    };
    let mut cmd = ns.cmd(bin("si-server"));
    cmd.arg("--state-dir")
        .arg(&state)
        .arg("--store")
        .arg(dir.path().join("store"))
        .args(["--dhcp-interface", "br0", "--unknown", "discover"])
        .arg("--tftp-root")
        .arg(&root)
        .arg("--http-root")
        .arg(&root)
        .args([
            "--boot-discovery-script",
            ipxe_file,
            "--boot-uefi",
            uefi_file,
        ]);
    let ready = [
        "TFTP server listening",
        "HTTP server listening",
        "DHCP service started",
    ];
    let (lab, took, console) = server_lab(cmd, &ready, ns, dir, marker, Some(subnet), fw);
    eprintln!("site {fw:?} boot from si-server alone: marker after {took:.1?}");
    let log = lab.log("server.log");
    // URLs name the interface's address, never the wildcard the services listen on.
    assert!(
        log.contains(&format!("http_base=http://{server} ")),
        "{log}"
    );
    assert!(!log.contains("http://0.0.0.0"), "{log}");
    // The site's files share names with generated ones; the site's are served.
    for p in ["pxelinux.cfg/default", "boot.ipxe", "grub/grub.cfg"] {
        assert!(
            log.lines()
                .any(|l| l.contains("shares a path with the root") && l.contains(p)),
            "{p}: {log}"
        );
    }
    (log, console, took)
}

/// What si-server's TFTP was asked for (`file="…"` of its read requests).
fn tftp_reads(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("TFTP read request"))
        .filter_map(|l| {
            l.split("file=\"")
                .nth(1)?
                .split('"')
                .next()
                .map(String::from)
        })
        .collect()
}

#[test]
fn site_files_bios_pxelinux() {
    require_root!();
    let (log, console, _) = site_boot(Firmware::BiosPxelinux, 70);
    let reads = tftp_reads(&log);
    for want in [
        "pxelinux.0",
        "pxelinux.cfg/default",
        "vmlinuz",
        "initrd.img",
    ] {
        assert!(
            reads.iter().any(|r| r == want),
            "{want} not read: {reads:?}"
        );
    }
    assert!(console.contains("site: pxelinux.cfg/default"), "{console}");
}

#[test]
fn site_files_bios_ipxe() {
    require_root!();
    let (log, console, _) = site_boot(Firmware::BiosIpxe, 71);
    assert!(
        console.contains("site: boot.ipxe from 10.213.71.1"),
        "{console}"
    );
    let reads = tftp_reads(&log);
    assert!(reads.iter().any(|r| r == "boot.ipxe"), "{reads:?}");
}

#[test]
fn site_files_uefi_ipxe() {
    require_root!();
    let (log, console, _) = site_boot(Firmware::UefiOvmf, 72);
    assert!(
        console.contains("site: boot.ipxe from 10.213.72.1"),
        "{console}"
    );
    let reads = tftp_reads(&log);
    assert!(
        reads.iter().any(|r| r == "ipxe.efi") && reads.iter().any(|r| r == "boot.ipxe"),
        "{reads:?}"
    );
}

#[test]
fn site_files_uefi_grub_without_regexp() {
    require_root!();
    let (log, console, _) = site_boot(Firmware::UefiGrub, 73);
    assert!(console.contains("site: grub.cfg"), "{console}");
    let reads = tftp_reads(&log);
    for want in ["grubx64.efi", "/grub/grub.cfg", "/vmlinuz"] {
        assert!(
            reads.iter().any(|r| r == want),
            "{want} not read: {reads:?}"
        );
    }
}

#[test]
fn site_files_uefi_http() {
    require_root!();
    let (log, console, _) = site_boot(Firmware::UefiHttp, 74);
    assert!(
        console.contains("URI: http://10.213.74.1/ipxe.efi"),
        "{console}"
    );
    assert!(
        console.contains("site: boot.ipxe from 10.213.74.1"),
        "{console}"
    );
    assert!(
        log.contains("method=GET path=\"/ipxe.efi\" status=200"),
        "{log}"
    );
}
