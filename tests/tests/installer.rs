//! `si-install` on loop devices, with the real image service on loopback: partition, mkfs,
//! mount the whole layout, pull, configure; fsck every filesystem and compare the tree with
//! the image; a fast reinstall in place; a failure in the middle that clears the tables.
//! RAID 1 + LVM run where the kernel has md and device-mapper.

use si_imaging::getimage as capture;
use si_store::Store;
use si_tests::{bin, fixtures, rand_bytes, require_root, run, treecmp, LoopDisks as Loops};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

type Reports = Arc<Mutex<Vec<(String, String, String)>>>;

/// The image service's settings for these tests: TLS with the test CA (the installer pins it
/// with `si.ca=`/`--ca`), versions signed by it; the gate is open (enrollment is tested in
/// tests/tests/trust.rs).
fn tls_config() -> si_imageserver::service::ServeConfig {
    let ca = si_trust::ca::Authority::open_or_create(&si_tests::test_ca().dir, &[]).unwrap();
    let mut cfg = si_imageserver::service::ServeConfig::new(si_trust::Acceptor::tls(
        ca.server_config().unwrap(),
    ));
    let ca = Arc::new(ca);
    cfg.signer = Some(Arc::new(move |i: &str, v: u32, d: &si_proto::Digest| {
        ca.sign_version(i, v, d)
    }));
    cfg
}

fn pin() -> &'static str {
    &si_tests::test_ca().pin
}

fn start_server(store: &Path, reports: Reports) -> String {
    let store = Arc::new(Store::open(store).unwrap());
    let hook: si_imageserver::service::ReportHook = Arc::new(move |n: &str, s: &str, d: &str| {
        reports.lock().unwrap().push((n.into(), s.into(), d.into()));
        Ok(())
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap().to_string()).unwrap();
            si_imageserver::service::run(
                l,
                store,
                tls_config(),
                Some(hook),
                std::future::pending(),
            )
            .await
            .unwrap();
        });
    });
    rx.recv().unwrap()
}

/// The image: every special case (special.sh) plus a /boot and a /var that go on their own
/// filesystems, and an /etc the installer configures.
fn make_image(src: &Path) {
    run(Command::new("bash")
        .arg(fixtures().join("special.sh"))
        .arg(src))
    .unwrap();
    for d in [
        "boot/grub",
        "var/lib/app",
        "var/log",
        "etc/ssh",
        "tmp",
        "var/lib/dbus",
    ] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    std::fs::write(src.join("boot/vmlinuz-test"), rand_bytes(3 << 20, 7)).unwrap();
    std::fs::write(src.join("boot/grub/grub.cfg"), "# test\n").unwrap();
    std::fs::write(src.join("var/lib/app/data.bin"), rand_bytes(5 << 20, 8)).unwrap();
    std::fs::write(src.join("etc/hostname"), "golden\n").unwrap();
    std::fs::write(
        src.join("etc/machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    std::fs::write(src.join("etc/ssh/ssh_host_ed25519_key"), "golden's key\n").unwrap();
    std::fs::write(
        src.join("etc/hosts"),
        "127.0.0.1\tlocalhost\n127.0.1.1\tgolden\n",
    )
    .unwrap();
    std::fs::set_permissions(
        src.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
}

/// What the installer writes on purpose, left out of the comparison with the image.
const CONFIGURED: &[&str] = &[
    "etc/motd",
    "etc/site.conf",
    "etc/fstab",
    "etc/hostname",
    "etc/hosts",
    "etc/machine-id",
    "etc/ssh",
    "etc/systemd",
    "etc/mdadm",
    "var/lib/si",
    "var/log/si-install.log",
    "lost+found",
    "boot/lost+found",
    "var/lost+found",
    "var/lib/app/lost+found",
];

fn plan_toml(layout: &str, node: &str, overrides: &[&str]) -> String {
    let plan = si_proto::plan::InstallPlan {
        node: node.into(),
        image: "img".into(),
        layout: Some(layout.into()),
        hostname: Some(node.into()),
        overrides: overrides.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    };
    toml::to_string(&plan).unwrap()
}

fn install(
    server: &str,
    plan: &Path,
    target: &Path,
    disks: &[String],
    extra: &[&str],
) -> std::process::Output {
    let t = std::time::Instant::now();
    let out = Command::new(bin("si-install"))
        .arg("--config")
        .arg(plan)
        .arg("--target")
        .arg(target)
        .args(["--server", server, "--ca", pin(), "--firmware", "bios"])
        .arg(format!(
            "--disks={}",
            disks
                .iter()
                .map(|d| format!("/dev/{d}"))
                .collect::<Vec<_>>()
                .join(",")
        ))
        .args(extra)
        .output()
        .unwrap();
    eprintln!(
        "si-install {extra:?}: {} in {:.1} s\n{}\n{}",
        out.status,
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn node(disk: &str, n: u32) -> PathBuf {
    si_tests::partition_node(disk, n)
}

fn blkid(dev: &Path, tag: &str) -> String {
    let out = run(Command::new("blkid")
        .args(["-p", "-s", tag, "-o", "value"])
        .arg(dev))
    .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn fsck_ext(dev: &Path) {
    let out = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(dev)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck {}: {}\n{}",
        dev.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const LAYOUT_TWO_DISKS: &str = r#"
format = 2
firmware = "bios"
bootloader = "grub"

[[disk]]
name = "a"
table = "gpt"
select = { pick = "smallest" }
[[disk.partition]]
number = 1
size = 67108864
type = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
[[disk.partition]]
number = 2
size = 33554432
type = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
[[disk.partition]]
number = 3
size = 0
grow = true
type = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"

[[disk]]
name = "b"
table = "msdos"
[[disk.partition]]
number = 1
percent = 50
type = "0x83"
[[disk.partition]]
number = 5
size = 33554432
type = "0x82"
[[disk.partition]]
number = 6
size = 67108864
type = "0x83"

[[filesystem]]
device = "a3"
type = "ext4"
label = "root"
mountpoint = "/"
[[filesystem]]
device = "a1"
type = "ext4"
mountpoint = "/boot"
[[filesystem]]
device = "a2"
type = "swap"
[[filesystem]]
device = "b1"
type = "ext4"
mountpoint = "/var"
[[filesystem]]
device = "b5"
type = "swap"
[[filesystem]]
device = "b6"
type = "ext4"
mountpoint = "/var/lib/app"
"#;

#[test]
fn install_on_loop_disks_then_fast_reinstall_then_failure_clears() {
    require_root!();
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = t.path().join("golden");
    make_image(&src);
    let store_dir = t.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    // Overrides: global then host; the later one wins where both write.
    for (name, files) in [
        (
            "override-all",
            &[("etc/motd", "global\n"), ("etc/site.conf", "site\n")][..],
        ),
        ("override-n01", &[("etc/motd", "host n01\n")][..]),
    ] {
        let o = t.path().join(name);
        std::fs::create_dir_all(o.join("etc")).unwrap();
        for (p, body) in files {
            std::fs::write(o.join(p), body).unwrap();
        }
        capture::commit(&store, &o, name, &[], None).unwrap();
    }
    let reports: Reports = Arc::default();
    let server = start_server(&store_dir, reports.clone());

    // 1.2 GiB and 600 MiB: `pick = "smallest"` gives layout disk a the smaller one.
    let mut loops = Loops::new(t.path(), &[1200, 600]);
    let (big, small) = (loops.devs[0].clone(), loops.devs[1].clone());
    let plan = t.path().join("plan.toml");
    std::fs::write(
        &plan,
        plan_toml(LAYOUT_TWO_DISKS, "n01", &["override-all", "override-n01"]),
    )
    .unwrap();
    let target = t.path().join("target");

    let out = install(&server, &plan, &target, &loops.devs, &[]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The plan was printed before anything was written.
    let plan_at = stdout
        .find(&format!("disk /dev/{small} "))
        .expect("plan printed");
    let wipe_at = stdout.find("step wipe").expect("wipe step");
    assert!(plan_at < wipe_at, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "disk /dev/{big} ({} bytes) <- layout disk b",
            1200u64 << 20
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("mount order: / /boot /var /var/lib/app"),
        "{stdout}"
    );
    assert!(
        stdout.contains("(added: extended, holding the logical partitions)"),
        "{stdout}"
    );

    // Every filesystem is clean; b5 and b6 are logical partitions in an extended partition 2
    // the installer added.
    let (root, boot, swap, var, swap2, app) = (
        node(&small, 3),
        node(&small, 1),
        node(&small, 2),
        node(&big, 1),
        node(&big, 5),
        node(&big, 6),
    );
    for d in [&root, &boot, &var, &app] {
        fsck_ext(d);
    }
    assert_eq!(blkid(&swap, "TYPE"), "swap");
    assert_eq!(blkid(&swap2, "TYPE"), "swap");
    assert_eq!(blkid(&root, "LABEL"), "root");
    // The layout's geometry: 1 MiB aligned, b1 half of its disk.
    let sf = run(Command::new("sfdisk")
        .args(["-J"])
        .arg(format!("/dev/{big}")))
    .unwrap();
    let sf: serde_json::Value = serde_json::from_slice(&sf.stdout).unwrap();
    let p1 = &sf["partitiontable"]["partitions"][0];
    assert_eq!(p1["start"].as_u64(), Some(2048));
    assert_eq!(p1["size"].as_u64().unwrap() * 512, 600 << 20);
    let types: Vec<(String, String)> = sf["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["node"].as_str().unwrap().to_string(),
                p["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect: Vec<(String, String)> = [(1, "83"), (2, "5"), (5, "82"), (6, "83")]
        .iter()
        .map(|(n, t)| (node(&big, *n).display().to_string(), t.to_string()))
        .collect();
    assert_eq!(types, expect);
    // A BIOS node on GPT got a BIOS boot partition on the disk holding /boot.
    let sf = run(Command::new("sfdisk")
        .args(["-J"])
        .arg(format!("/dev/{small}")))
    .unwrap();
    let text = String::from_utf8_lossy(&sf.stdout).to_ascii_uppercase();
    assert!(
        text.contains("21686148-6449-6E6F-744E-656564454649"),
        "{text}"
    );

    // Mount the result and compare it with the image exactly.
    let m = t.path().join("check");
    let mount = |loops: &mut Loops| {
        for (dev, dir) in [
            (&root, m.clone()),
            (&boot, m.join("boot")),
            (&var, m.join("var")),
            (&app, m.join("var/lib/app")),
        ] {
            std::fs::create_dir_all(&dir).unwrap();
            run(Command::new("mount").arg(dev).arg(&dir)).unwrap();
            loops.mounts.push(dir);
        }
    };
    let umount = |loops: &mut Loops| {
        while let Some(d) = loops.mounts.pop() {
            run(Command::new("umount").arg(&d)).unwrap();
        }
    };
    mount(&mut loops);
    treecmp(&src, &m, CONFIGURED).unwrap();
    // Configured for this node: fstab by the new UUIDs, its own identity.
    let fstab = std::fs::read_to_string(m.join("etc/fstab")).unwrap();
    for (dev, mp) in [
        (&root, "/ ext4"),
        (&boot, "/boot ext4"),
        (&var, "/var ext4"),
        (&app, "/var/lib/app ext4"),
        (&swap, "none swap"),
        (&swap2, "none swap"),
    ] {
        let line = format!("UUID={} {mp}", blkid(dev, "UUID"));
        assert!(fstab.contains(&line), "{line} not in\n{fstab}");
    }
    assert_eq!(
        std::fs::read_to_string(m.join("etc/hostname")).unwrap(),
        "n01\n"
    );
    assert!(std::fs::read_to_string(m.join("etc/hosts"))
        .unwrap()
        .contains("127.0.1.1\tn01"));
    let id = std::fs::read_to_string(m.join("etc/machine-id")).unwrap();
    assert!(
        id.len() == 33 && id != "0123456789abcdef0123456789abcdef\n",
        "{id:?}"
    );
    assert!(
        !m.join("etc/ssh/ssh_host_ed25519_key").exists(),
        "the golden node's key is gone"
    );
    let log = std::fs::read_to_string(m.join("var/log/si-install.log")).unwrap();
    assert!(
        log.contains("time pull") && log.contains("step mkfs: done"),
        "{log}"
    );
    assert!(m.join("var/lib/si/install.toml").exists());
    umount(&mut loops);
    {
        let r = reports.lock().unwrap();
        let states: Vec<&str> = r.iter().map(|x| x.1.as_str()).collect();
        assert!(
            r.iter()
                .any(|x| x.1 == "log" && x.2.contains("step mkfs: done")),
            "the log reached the master"
        );
        for s in ["installing", "imaged", "finalizing", "updated", "installed"] {
            assert!(states.contains(&s), "{s} not reported: {states:?}");
        }
        assert!(r.iter().any(|x| x.2 == "status=5 step=partition"), "{r:?}");
        assert!(r.iter().all(|x| x.0 == "n01"));
    }

    // Fast reinstall: 20 files change in the image; the disks match, the install is updated
    // in place (no mkfs), and the result is as exact as a wipe.
    for i in 0..20 {
        std::fs::write(
            src.join(format!("var/lib/app/changed-{i}")),
            rand_bytes(4096, 100 + i),
        )
        .unwrap();
    }
    std::fs::remove_file(src.join("boot/vmlinuz-test")).unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let uuid_before = blkid(&root, "UUID");
    let out = install(
        &server,
        &plan,
        &target,
        &loops.devs,
        &["--reinstall", "sync"],
    );
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("updating in place"), "{stdout}");
    assert!(!stdout.contains("step mkfs"), "{stdout}");
    assert_eq!(blkid(&root, "UUID"), uuid_before, "not reformatted");
    for d in [&root, &boot, &var, &app] {
        fsck_ext(d);
    }
    mount(&mut loops);
    treecmp(&src, &m, CONFIGURED).unwrap();
    umount(&mut loops);

    // A failure in the middle (the pull) with si.onerror=clear: the original error comes first
    // and no partition table is left.
    let out = install(
        &server,
        &plan,
        &target,
        &loops.devs,
        &["--fail-at", "pull", "--onerror", "clear"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr
        .lines()
        .find(|l| l.contains("si-install"))
        .unwrap_or("");
    assert!(
        first.contains("FAILED: step pull: failing on purpose"),
        "{stderr}"
    );
    for d in [&small, &big] {
        let o = Command::new("blkid")
            .args(["-p"])
            .arg(format!("/dev/{d}"))
            .output()
            .unwrap();
        assert!(
            o.stdout.is_empty(),
            "/dev/{d} still holds {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let o = Command::new("sfdisk")
            .arg("-d")
            .arg(format!("/dev/{d}"))
            .output()
            .unwrap();
        assert!(!o.status.success(), "/dev/{d} still has a table");
    }
    assert!(reports
        .lock()
        .unwrap()
        .iter()
        .any(|x| x.1 == "failed" && x.2.contains("failing on purpose")));

    // A disk too small fails before anything is written, with the disk and the reason.
    let tiny = Loops::new(&t.path().join("tiny").tap_mkdir(), &[64]);
    let out = install(&server, &plan, &target, &tiny.devs, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no disk for layout disk b") || stderr.contains("too small"),
        "{stderr}"
    );
}

trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}
impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

const LAYOUT_RAID_LVM: &str = r#"
format = 2
firmware = "uefi"

[[disk]]
name = "a"
table = "gpt"
[[disk.partition]]
number = 1
size = 67108864
type = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
flags = ["esp"]
[[disk.partition]]
number = 2
size = 134217728
type = "A19D880F-05FC-4D3B-A006-743F0F84911E"
[[disk.partition]]
number = 3
size = 0
grow = true
type = "A19D880F-05FC-4D3B-A006-743F0F84911E"

[[disk]]
name = "b"
table = "gpt"
[[disk.partition]]
number = 1
size = 67108864
type = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
flags = ["esp"]
[[disk.partition]]
number = 2
size = 134217728
type = "A19D880F-05FC-4D3B-A006-743F0F84911E"
[[disk.partition]]
number = 3
size = 0
grow = true
type = "A19D880F-05FC-4D3B-A006-743F0F84911E"

[[raid]]
name = "md201"
level = 1
members = ["a2", "b2"]
metadata = "1.0"
[[raid]]
name = "md202"
level = 1
members = ["a3", "b3"]

[[vg]]
name = "VGNAME"
pvs = ["md202"]
[[vg.lv]]
name = "root"
size = 314572800
[[vg.lv]]
name = "swap"
percent = 10
[[vg.lv]]
name = "var"
grow = true

[[filesystem]]
device = "VGNAME/root"
type = "ext4"
mountpoint = "/"
[[filesystem]]
device = "md201"
type = "ext4"
mountpoint = "/boot"
[[filesystem]]
device = "a1"
type = "vfat"
mountpoint = "/boot/efi"
[[filesystem]]
device = "VGNAME/var"
type = "ext4"
mountpoint = "/var"
[[filesystem]]
device = "VGNAME/swap"
type = "swap"
"#;

#[test]
fn raid1_lvm_esp_on_loop_disks() {
    require_root!();
    let missing: Vec<&str> = [
        ("/proc/mdstat", "md"),
        ("/dev/mapper/control", "device-mapper"),
    ]
    .iter()
    .filter(|(p, _)| !Path::new(p).exists())
    .map(|(_, w)| *w)
    .collect::<Vec<_>>();
    let vfat = std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .contains("vfat");
    if !missing.is_empty() || !vfat {
        eprintln!(
            "SKIP raid1_lvm_esp_on_loop_disks: this kernel lacks {}{} (modprobe raid1 dm_mod vfat); CI kernels have them",
            missing.join(", "),
            if vfat { "" } else { " vfat" }
        );
        return;
    }
    let t = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = t.path().join("golden");
    make_image(&src);
    std::fs::create_dir_all(src.join("boot/efi")).unwrap();
    let store_dir = t.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    capture::commit(&store, &src, "img", &[], None).unwrap();
    let reports: Reports = Arc::default();
    let server = start_server(&store_dir, reports);
    let mut loops = Loops::new(t.path(), &[1024, 1024]);
    let vg = format!("sit{}", std::process::id());
    loops.vgs.push(vg.clone());
    let plan = t.path().join("plan.toml");
    std::fs::write(
        &plan,
        plan_toml(&LAYOUT_RAID_LVM.replace("VGNAME", &vg), "n02", &[]),
    )
    .unwrap();
    let target = t.path().join("target");
    let out = Command::new(bin("si-install"))
        .arg("--config")
        .arg(&plan)
        .arg("--target")
        .arg(&target)
        .args(["--server", &server, "--ca", pin(), "--firmware", "uefi"])
        .arg(format!(
            "--disks=/dev/{},/dev/{}",
            loops.devs[0], loops.devs[1]
        ))
        .output()
        .unwrap();
    eprintln!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    for lv in ["root", "var"] {
        fsck_ext(&Path::new("/dev").join(&vg).join(lv));
    }
    fsck_ext(Path::new("/dev/md201"));
    for d in &loops.devs {
        let o = run(Command::new("fsck.vfat").arg("-n").arg(node(d, 1))).unwrap();
        assert!(o.status.success());
    }
    let m = t.path().join("check");
    for (dev, dir) in [
        (Path::new("/dev").join(&vg).join("root"), m.clone()),
        (PathBuf::from("/dev/md201"), m.join("boot")),
        (node(&loops.devs[0], 1), m.join("boot/efi")),
        (Path::new("/dev").join(&vg).join("var"), m.join("var")),
    ] {
        run(Command::new("mount").arg(&dev).arg(&dir)).unwrap();
        loops.mounts.push(dir);
    }
    let mut ignore = CONFIGURED.to_vec();
    ignore.push("boot/efi");
    treecmp(&src, &m, &ignore).unwrap();
    let conf = std::fs::read_to_string(m.join("etc/mdadm/mdadm.conf")).unwrap();
    assert!(
        conf.contains("ARRAY /dev/md/md201") && conf.contains("ARRAY /dev/md/md202"),
        "{conf}"
    );
}

/// The master assembles a node's plan from its inventory (`GetPlan` on the image service);
/// `si-install` fetches it and, in a dry run, prints what it would do and writes nothing.
#[test]
fn the_master_serves_install_plans_from_the_inventory() {
    use si_inventory::{Group, Inventory, NoCatalog, Node, Subnet};
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let inv = Arc::new(Inventory::open_state_dir(&state).unwrap());
    inv.put_subnet(&Subnet {
        name: "lab".into(),
        network: "10.213.0.0".parse().unwrap(),
        prefix: 16,
        router: Some("10.213.0.1".parse().unwrap()),
        dns: vec!["10.213.0.2".parse().unwrap()],
        domain: Some("cluster".into()),
        pool_start: None,
        pool_end: None,
        lease_time: 3600,
        permanent: false,
    })
    .unwrap();
    inv.add_group(
        &Group {
            name: "compute".into(),
            image: Some("img".into()),
            disk_layout: Some("mirror".into()),
            ..Default::default()
        },
        &NoCatalog,
    )
    .unwrap();
    inv.add_node(
        &Node {
            name: "n07".into(),
            macs: vec!["52:54:00:00:00:07".into()],
            ip: Some("10.213.1.7".parse().unwrap()),
            group: Some("compute".into()),
            state: "new".into(),
            ..Default::default()
        },
        &NoCatalog,
    )
    .unwrap();
    std::fs::create_dir_all(state.join("layouts")).unwrap();
    std::fs::write(state.join("layouts/mirror.toml"), LAYOUT_TWO_DISKS).unwrap();
    let store_dir = t.path().join("store");
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    let store = Arc::new(Store::open(&store_dir).unwrap());
    capture::commit(&store, &src, "img", &[], None).unwrap();
    capture::commit(&store, &src, "override-compute", &[], None).unwrap();

    let plans: si_imageserver::service::PlanHook = {
        let (inv, store, layouts) = (inv.clone(), store.clone(), state.join("layouts"));
        Arc::new(move |n: &str| {
            si_server::plans::install_plan(&inv, &store, &layouts, &Default::default(), n)
        })
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let st = store.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap().to_string()).unwrap();
            let mut cfg = tls_config();
            cfg.plans = Some(plans);
            si_imageserver::service::run(l, st, cfg, None, std::future::pending())
                .await
                .unwrap();
        });
    });
    let server = rx.recv().unwrap();

    let mut c = si_agent::pull::Client::connect(
        &server,
        std::time::Duration::from_secs(5),
        &si_trust::Connector::master(pin().parse().unwrap(), None).unwrap(),
    )
    .unwrap();
    for who in ["n07", "52:54:00:00:00:07"] {
        let p: si_proto::plan::InstallPlan = toml::from_str(&c.plan(who).unwrap()).unwrap();
        assert_eq!(p.node, "n07");
        assert_eq!(p.image, "img");
        assert_eq!(p.group.as_deref(), Some("compute"));
        assert_eq!(p.layout.as_deref(), Some(LAYOUT_TWO_DISKS));
        assert_eq!(p.overrides, ["override-compute"]);
        assert_eq!(p.network.address, Some("10.213.1.7".parse().unwrap()));
        assert_eq!(p.network.prefix, Some(16));
        assert_eq!(p.network.gateway, Some("10.213.0.1".parse().unwrap()));
        assert_eq!(p.network.mac.as_deref(), Some("52:54:00:00:00:07"));
    }
    let e = format!("{:#}", c.plan("nobody").unwrap_err());
    assert!(e.contains("no install plan for nobody"), "{e}");
    c.bye();

    // si-install from a kernel command line: the plan comes from the master; with the only
    // candidate disk a name that does not exist, the disks step refuses, naming the layout
    // disk, and nothing is written.
    let out = Command::new(bin("si-install"))
        .arg("--cmdline")
        .arg(format!(
            "quiet si.server={server} si.ca={} si.node=n07 si.dryrun si.disks=nosuchdisk9",
            pin()
        ))
        .arg("--target")
        .arg(t.path().join("target"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("install plan: node n07 image img"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("FAILED: step disks: no disk for layout disk a"),
        "{stderr}"
    );
    assert!(!t.path().join("target").exists());
}
