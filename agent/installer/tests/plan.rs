//! The installer's decisions on recorded lsblk outputs, without disks: selection, refusals,
//! partition geometry, fstab, boot loader targets.

use si_installer::disks::{assign, candidates, parse_lsblk, PhysDisk};
use si_installer::plan::{Concrete, MIB};
use si_proto::layout::{Firmware, Layout};
use std::collections::BTreeMap;

const GIB: u64 = 1 << 30;

fn fixture(name: &str) -> String {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/installer/"
    );
    std::fs::read_to_string(format!("{p}{name}")).unwrap()
}

fn no_paths(n: &str) -> Vec<String> {
    vec![format!("pci-0000:00:{n}")]
}

fn disks(name: &str) -> Vec<PhysDisk> {
    candidates(&parse_lsblk(&fixture(name)).unwrap(), &[], &no_paths)
}

/// A layout as `si-prepareclient` records it on a 100 GB disk: ESP, swap, root growing.
fn captured_100g() -> Layout {
    Layout::parse(&format!(
        r#"
format = 1
firmware = "uefi"
bootloader = "grub"
[[disk]]
name = "vda"
table = "gpt"
size = {}
[[disk.partition]]
number = 1
size = 536870912
type = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
flags = ["esp"]
[[disk.partition]]
number = 2
size = 4294967296
type = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
[[disk.partition]]
number = 3
size = 0
grow = true
type = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
[[filesystem]]
device = "vda1"
type = "vfat"
mountpoint = "/boot/efi"
options = "umask=0077"
[[filesystem]]
device = "vda3"
type = "ext4"
mountpoint = "/"
[[filesystem]]
device = "vda2"
type = "swap"
"#,
        100 * GIB
    ))
    .unwrap()
}

fn one(name: &str, size: u64) -> PhysDisk {
    PhysDisk {
        name: name.into(),
        size,
        sector_size: 512,
        rotational: false,
        removable: false,
        transport: "virtio".into(),
        serial: None,
        wwn: None,
        by_path: vec![],
        busy: None,
        holders: vec![],
    }
}

#[test]
fn a_100g_capture_on_60g_and_2t_disks() {
    let l = captured_100g();
    for size in [60 * GIB, 2048 * GIB] {
        let chosen = assign(&l, &[one("vda", size)]).unwrap();
        let c = Concrete::new(&l, &chosen, Firmware::Uefi).unwrap();
        let p = &c.disks[0].partitions;
        assert_eq!(p.len(), 3);
        assert_eq!((p[0].start, p[0].size), (MIB, 512 * MIB));
        assert_eq!((p[1].start, p[1].size), (513 * MIB, 4096 * MIB));
        assert_eq!(p[2].start, 4609 * MIB);
        // The root takes the rest, leaving 1 MiB for the backup GPT; everything MiB-aligned.
        assert_eq!(p[2].start + p[2].size, size - MIB);
        assert!(p.iter().all(|x| x.start % MIB == 0 && x.size % MIB == 0));
        // Mount order: / first; swap last (not mounted).
        let order: Vec<_> = c.filesystems.iter().map(|f| f.mountpoint.clone()).collect();
        assert_eq!(order, [Some("/".into()), Some("/boot/efi".into()), None]);
        let text = c.render();
        assert!(text.contains("disk /dev/vda"), "{text}");
        assert!(text.contains("wiped: vda"), "{text}");
        assert!(text.contains("mount order: / /boot/efi"), "{text}");
    }
    // Fixed sizes that do not fit are refused before anything is written.
    let e = assign(&l, &[one("vda", 4 * GIB)]).unwrap_err().to_string();
    assert!(
        e.contains("disk vda is too small for layout disk vda"),
        "{e}"
    );
}

#[test]
fn selection_on_recorded_lsblk_outputs() {
    // virtio (old lsblk: no TRAN): kernel name says virtio; the CD-ROM is not a disk.
    let v = disks("virtio.lsblk.json");
    assert_eq!(
        v.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        ["vda", "vdb"]
    );
    assert!(v
        .iter()
        .all(|d| d.transport == "virtio" && d.busy.is_none()));

    let m = disks("mixed.lsblk.json");
    let by = |n: &str| m.iter().find(|d| d.name == n).unwrap();
    assert_eq!(by("sda").transport, "sata");
    assert!(by("sda").rotational);
    assert_eq!(by("nvme0n1").transport, "nvme");
    assert!(by("sdb").removable, "the USB stick");
    assert!(by("sdb")
        .busy
        .as_deref()
        .unwrap()
        .contains("mounted on /media/stick"));
    assert!(
        !m.iter().any(|d| d.name == "zram0"),
        "zram is never a candidate"
    );

    let layout = |sel: &str| {
        Layout::parse(&format!(
            "format = 2\nfirmware = \"bios\"\n[[disk]]\nname = \"sys\"\ntable = \"gpt\"\n{sel}\n\
             [[disk.partition]]\nnumber = 1\nsize = 0\ngrow = true\ntype = \"0FC63DAF-8483-4772-8E79-3D69D8477DE4\"\n\
             [[filesystem]]\ndevice = \"sys1\"\ntype = \"ext4\"\nmountpoint = \"/\"\n"
        ))
        .unwrap()
    };
    let pick = |sel: &str| assign(&layout(sel), &m).map(|v| v[0].name.clone());
    assert_eq!(
        pick("").unwrap(),
        "nvme0n1",
        "order: the USB stick left alone"
    );
    assert_eq!(
        pick("select = { transport = \"nvme\" }").unwrap(),
        "nvme0n1"
    );
    assert_eq!(pick("select = { rotational = true }").unwrap(), "sda");
    assert_eq!(pick("select = { pick = \"largest\" }").unwrap(), "sda");
    assert_eq!(pick("select = { pick = \"smallest\" }").unwrap(), "nvme0n1");
    assert_eq!(
        pick("select = { wwn = \"0x50014ee2b1234567\" }").unwrap(),
        "sda"
    );
    assert_eq!(
        pick("select = { serial = \"S4EWNX0R123456\" }").unwrap(),
        "nvme0n1"
    );
    assert_eq!(
        pick("select = { by-path = \"pci-0000:00:sda\" }").unwrap(),
        "sda"
    );
    assert_eq!(
        pick("select = { min-size = 1000000000000 }").unwrap(),
        "sda",
        "size range"
    );
    let e = pick("select = { min-size = 100000000000 }")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2 disks match") && e.contains("ambiguous"),
        "{e}"
    );
    // Even asked for by transport, the USB stick is left alone; by serial it is allowed but
    // it is mounted.
    let e = pick("select = { transport = \"usb\" }")
        .unwrap_err()
        .to_string();
    assert!(e.contains("sdb: removable, left alone"), "{e}");
    let e = pick("select = { serial = \"0401abcd\" }")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("disk sdb (for layout disk sys) is in use: sdb1 is mounted on /media/stick"),
        "{e}"
    );
    let e = pick("select = { transport = \"virtio\" }")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no disk for layout disk sys"), "{e}");
    // Named with --disks / si.disks, a removable disk is a candidate like any other.
    let only = candidates(
        &parse_lsblk(&fixture("mixed.lsblk.json")).unwrap(),
        &["/dev/sdb".into()],
        &no_paths,
    );
    assert_eq!(only.len(), 1);
    assert!(!only[0].removable);
}

#[test]
fn disks_in_use_are_refused_and_old_stacks_are_wiped() {
    let b = disks("busy.lsblk.json");
    let by = |n: &str| b.iter().find(|d| d.name == n).unwrap();
    assert_eq!(by("vda").busy.as_deref(), Some("vda2 is mounted on /"));
    assert_eq!(
        by("vdb").busy,
        None,
        "an md+LVM stack not in use is wiped, not refused"
    );
    assert_eq!(by("vdb").holders, ["md127", "old-root"]);
    assert_eq!(
        by("vdc").busy.as_deref(),
        Some("luks-data is held by a crypt device")
    );
    assert_eq!(by("vdd").busy.as_deref(), Some("vdd1 is active swap"));
    let l = Layout::parse(
        "format = 2\nfirmware = \"bios\"\n[[disk]]\nname = \"a\"\ntable = \"msdos\"\n\
         [[disk.partition]]\nnumber = 1\nsize = 0\ngrow = true\ntype = \"0x83\"\n\
         [[filesystem]]\ndevice = \"a1\"\ntype = \"ext4\"\nmountpoint = \"/\"\n",
    )
    .unwrap();
    // By order the first disk is vda, which is in use: refused with the reason.
    let e = assign(&l, &b).unwrap_err().to_string();
    assert!(
        e.contains("disk vda (for layout disk a) is in use: vda2 is mounted on /"),
        "{e}"
    );
    let free: Vec<PhysDisk> = b.iter().filter(|d| d.name == "vdb").cloned().collect();
    let c = Concrete::new(&l, &assign(&l, &free).unwrap(), Firmware::Bios).unwrap();
    assert_eq!(c.disks[0].wipe, ["vdb", "md127", "old-root"]);
    assert!(c.render().contains("wiped: vdb, md127, old-root"));
}

/// Two disks, RAID 1 of /boot and of an LVM PV, LVM with fixed/percent/grow volumes.
fn mirrored(table: &str, firmware: &str) -> Layout {
    let esp = if firmware == "uefi" {
        "[[disk.partition]]\nnumber = 1\nsize = 268435456\ntype = \"C12A7328-F81F-11D2-BA4B-00A0C93EC93B\"\nflags = [\"esp\"]\n"
    } else {
        "[[disk.partition]]\nnumber = 1\nsize = 1048576\ntype = \"21686148-6449-6E6F-744E-656564454649\"\nflags = [\"bios_grub\"]\n"
    };
    let disk = |n: &str| {
        format!(
            "[[disk]]\nname = \"{n}\"\ntable = \"{table}\"\nselect = {{ pick = \"smallest\" }}\n{esp}\
             [[disk.partition]]\nnumber = 2\nsize = 536870912\ntype = \"A19D880F-05FC-4D3B-A006-743F0F84911E\"\nflags = [\"raid\"]\n\
             [[disk.partition]]\nnumber = 3\nsize = 0\ngrow = true\ntype = \"A19D880F-05FC-4D3B-A006-743F0F84911E\"\nflags = [\"raid\"]\n"
        )
    };
    let efi_fs = if firmware == "uefi" {
        "[[filesystem]]\ndevice = \"a1\"\ntype = \"vfat\"\nmountpoint = \"/boot/efi\"\n"
    } else {
        ""
    };
    Layout::parse(&format!(
        "format = 2\nfirmware = \"{firmware}\"\n{}{}\
         [[raid]]\nname = \"md0\"\nlevel = 1\nmembers = [\"a2\", \"b2\"]\nmetadata = \"1.0\"\n\
         [[raid]]\nname = \"md1\"\nlevel = 1\nmembers = [\"a3\", \"b3\"]\n\
         [[vg]]\nname = \"sys\"\npvs = [\"md1\"]\n\
         [[vg.lv]]\nname = \"root\"\nsize = 2147483648\n\
         [[vg.lv]]\nname = \"swap\"\npercent = 10\n\
         [[vg.lv]]\nname = \"var\"\ngrow = true\n\
         [[filesystem]]\ndevice = \"sys/root\"\ntype = \"ext4\"\nmountpoint = \"/\"\n\
         [[filesystem]]\ndevice = \"sys/var\"\ntype = \"ext4\"\nmountpoint = \"/var\"\n\
         [[filesystem]]\ndevice = \"md0\"\ntype = \"ext4\"\nmountpoint = \"/boot\"\n\
         {efi_fs}\
         [[filesystem]]\ndevice = \"sys/swap\"\ntype = \"swap\"\n",
        disk("a"),
        disk("b")
    ))
    .unwrap()
}

#[test]
fn mirrored_layout_plan_fstab_and_boot_loader_targets() {
    let l = mirrored("gpt", "bios");
    let two = [
        one("vdb", 20 * GIB),
        one("vda", 20 * GIB),
        one("vdc", 100 * GIB),
    ];
    let chosen = assign(&l, &two).unwrap();
    assert_eq!(
        chosen.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        ["vda", "vdb"]
    );
    let c = Concrete::new(&l, &chosen, Firmware::Bios).unwrap();
    // BIOS: grub on both disks of the /boot mirror.
    assert_eq!(c.boot_disks(), ["vda", "vdb"]);
    assert_eq!(c.disks_under("sys/var"), ["vda", "vdb"]);
    let order: Vec<_> = c
        .filesystems
        .iter()
        .filter_map(|f| f.mountpoint.as_deref())
        .collect();
    assert_eq!(order, ["/", "/boot", "/var"]);
    let uuids: BTreeMap<String, String> = [
        ("sys/root", "11111111-1111-1111-1111-111111111111"),
        ("sys/var", "22222222-2222-2222-2222-222222222222"),
        ("md0", "33333333-3333-3333-3333-333333333333"),
        ("sys/swap", "44444444-4444-4444-4444-444444444444"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    let fstab = si_installer::gen::fstab(&c, &uuids);
    assert_eq!(
        fstab,
        "# written by si-install\n\
         UUID=11111111-1111-1111-1111-111111111111 / ext4 defaults 0 1\n\
         UUID=33333333-3333-3333-3333-333333333333 /boot ext4 defaults 0 2\n\
         UUID=22222222-2222-2222-2222-222222222222 /var ext4 defaults 0 2\n\
         UUID=44444444-4444-4444-4444-444444444444 none swap sw 0 0\n"
    );
    let text = c.render();
    assert!(text.contains("md RAID 1 /dev/md0 <- a2 + b2"), "{text}");
    assert!(text.contains("volume sys/swap: 10% of the group"), "{text}");
    assert!(
        text.contains("grub-install --target=i386-pc on vda, vdb"),
        "{text}"
    );

    // UEFI: an ESP on each disk of the mirror.
    let l = mirrored("gpt", "uefi");
    let c = Concrete::new(&l, &assign(&l, &two).unwrap(), Firmware::Uefi).unwrap();
    assert_eq!(c.esps(), [("vda".to_string(), 1), ("vdb".to_string(), 1)]);
    assert!(c.render().contains("BOOTX64.EFI"));

    // A BIOS node on a GPT layout without a BIOS boot partition gets one added.
    let l = captured_100g();
    let mut bios = l.clone();
    bios.firmware = Firmware::Bios;
    let c = Concrete::new(&bios, &[one("vda", 60 * GIB)], Firmware::Bios).unwrap();
    let added: Vec<_> = c.disks[0].partitions.iter().filter(|p| p.added).collect();
    assert_eq!(added.len(), 1);
    assert_eq!(
        (added[0].number, added[0].start, added[0].size),
        (4, MIB, MIB)
    );
    // A UEFI node needs an ESP.
    let mut no_esp = bios.clone();
    no_esp.disks[0].partitions[0].flags.clear();
    no_esp.disks[0].partitions[0].ptype = "0FC63DAF-8483-4772-8E79-3D69D8477DE4".into();
    let e = Concrete::new(&no_esp, &[one("vda", 60 * GIB)], Firmware::Uefi).unwrap_err();
    assert!(e.to_string().contains("no EFI system partition"), "{e}");
}

#[test]
fn percent_partitions() {
    let l = Layout::parse(
        "format = 2\nfirmware = \"bios\"\n[[disk]]\nname = \"a\"\ntable = \"msdos\"\n\
         [[disk.partition]]\nnumber = 1\npercent = 25\ntype = \"0x83\"\n\
         [[disk.partition]]\nnumber = 2\nsize = 0\ngrow = true\ntype = \"0x83\"\n\
         [[filesystem]]\ndevice = \"a1\"\ntype = \"ext4\"\nmountpoint = \"/\"\n\
         [[filesystem]]\ndevice = \"a2\"\ntype = \"ext4\"\nmountpoint = \"/srv\"\n",
    )
    .unwrap();
    let c = Concrete::new(&l, &[one("sda", 100 * GIB)], Firmware::Bios).unwrap();
    let p = &c.disks[0].partitions;
    assert_eq!(p[0].size, 25 * GIB);
    assert_eq!(p[1].start, MIB + 25 * GIB);
    assert_eq!(p[1].start + p[1].size, 100 * GIB - MIB);
}

#[test]
fn the_sample_mirror_layout_picks_the_pair_and_leaves_the_rest() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../images/layouts/mirror-lvm.toml"
    ))
    .unwrap();
    let l = Layout::parse(&text).unwrap();
    let mut stick = one("sda", 32 * GIB);
    stick.removable = true;
    stick.transport = "usb".into();
    let node = [
        stick,
        one("nvme0n1", 2048 * GIB),
        one("vda", 40 * GIB),
        one("vdb", 40 * GIB),
        one("vdc", 8 * GIB),
    ];
    let chosen = assign(&l, &node).unwrap();
    let names: Vec<_> = chosen.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["vda", "vdb"], "the smallest pair of at least 16 GB");
    let c = Concrete::new(&l, &chosen, Firmware::Uefi).unwrap();
    assert_eq!(c.esps().len(), 2);
    assert_eq!(c.disks_under("sys/root"), ["vda", "vdb"]);
    let mounts: Vec<_> = c
        .filesystems
        .iter()
        .filter_map(|f| f.mountpoint.as_deref())
        .collect();
    assert_eq!(mounts, ["/", "/boot", "/var", "/boot/efi"]);
}

/// Debian's installer default on an msdos disk, as `si-prepareclient` records it: root on 1,
/// an extended partition 2, swap as logical 5 growing to the end. On a smaller disk the
/// extended partition is sized from its logical one (its recorded size is the golden disk's),
/// and the logical starts 1 MiB into it (its boot record, aligned).
#[test]
fn logical_msdos_partitions() {
    let parse = |parts: &str| {
        Layout::parse(&format!(
            "format = 2\nfirmware = \"bios\"\n[[disk]]\nname = \"a\"\ntable = \"msdos\"\n{parts}\
             [[filesystem]]\ndevice = \"a1\"\ntype = \"ext4\"\nmountpoint = \"/\"\n\
             [[filesystem]]\ndevice = \"a5\"\ntype = \"swap\"\n"
        ))
        .unwrap()
    };
    let debian = parse(
        "[[disk.partition]]\nnumber = 1\nsize = 19327352832\ntype = \"0x83\"\nflags = [\"boot\"]\n\
         [[disk.partition]]\nnumber = 2\nsize = 2145387520\ntype = \"0x05\"\n\
         [[disk.partition]]\nnumber = 5\nsize = 0\ngrow = true\ntype = \"0x82\"\n",
    );
    let c = Concrete::new(&debian, &[one("sda", 30 * GIB)], Firmware::Bios).unwrap();
    let p = &c.disks[0].partitions;
    let geometry: Vec<_> = p.iter().map(|p| (p.number, p.start, p.size)).collect();
    let root_end = MIB + 18 * GIB;
    assert_eq!(
        geometry,
        vec![
            (1, MIB, 18 * GIB),
            (2, root_end, 30 * GIB - MIB - root_end),
            (5, root_end + MIB, 30 * GIB - 2 * MIB - root_end),
        ]
    );
    assert!(!p[1].added);
    assert!(c.render().contains("partition  5 (a5)"), "{}", c.render());

    // Two logical partitions and no extended one recorded: one is added in the first free
    // primary slot, after the primaries, holding both.
    let two = parse(
        "[[disk.partition]]\nnumber = 1\nsize = 1073741824\ntype = \"0x83\"\n\
         [[disk.partition]]\nnumber = 5\nsize = 536870912\ntype = \"0x82\"\n\
         [[disk.partition]]\nnumber = 6\nsize = 268435456\ntype = \"0x83\"\n",
    );
    let c = Concrete::new(&two, &[one("sda", 4 * GIB)], Firmware::Bios).unwrap();
    let p = &c.disks[0].partitions;
    let geometry: Vec<_> = p.iter().map(|p| (p.number, p.start, p.size)).collect();
    assert_eq!(
        geometry,
        vec![
            (1, MIB, GIB),
            (2, MIB + GIB, 768 * MIB + 2 * MIB),
            (5, 2 * MIB + GIB, 512 * MIB),
            (6, 3 * MIB + GIB + 512 * MIB, 256 * MIB),
        ]
    );
    assert!(p[1].added && p[1].ptype == "0x05");
    assert!(
        c.render()
            .contains("(added: extended, holding the logical partitions)"),
        "{}",
        c.render()
    );
    let data: Vec<u32> = Concrete::data_partitions(&c.disks[0])
        .map(|p| p.number)
        .collect();
    assert_eq!(data, vec![1, 5, 6], "the extended partition holds no data");

    // Refused with a clear message: no free primary slot, an extended partition with no
    // logical one, and a disk too small once the boot records count.
    let full = parse(
        "[[disk.partition]]\nnumber = 1\nsize = 1048576\ntype = \"0x83\"\n\
         [[disk.partition]]\nnumber = 2\nsize = 1048576\ntype = \"0x83\"\n\
         [[disk.partition]]\nnumber = 3\nsize = 1048576\ntype = \"0x83\"\n\
         [[disk.partition]]\nnumber = 4\nsize = 1048576\ntype = \"0x83\"\n\
         [[disk.partition]]\nnumber = 5\nsize = 1048576\ntype = \"0x82\"\n",
    );
    let e = format!(
        "{:#}",
        Concrete::new(&full, &[one("sda", GIB)], Firmware::Bios).unwrap_err()
    );
    assert!(e.contains("no slot for the extended one"), "{e}");
    let lonely = Layout::parse(
        "format = 2\nfirmware = \"bios\"\n[[disk]]\nname = \"a\"\ntable = \"msdos\"\n\
         [[disk.partition]]\nnumber = 1\nsize = 1073741824\ntype = \"0x83\"\n\
         [[disk.partition]]\nnumber = 2\nsize = 1073741824\ntype = \"0x05\"\n\
         [[filesystem]]\ndevice = \"a1\"\ntype = \"ext4\"\nmountpoint = \"/\"\n",
    )
    .unwrap();
    let e = format!(
        "{:#}",
        Concrete::new(&lonely, &[one("sda", 4 * GIB)], Firmware::Bios).unwrap_err()
    );
    assert!(e.contains("holds no logical partition"), "{e}");
    // 1 GiB + 512 + 256 MiB and three MiB of boot records and alignment do not fit 1.75 GiB.
    let e = format!(
        "{:#}",
        Concrete::new(&two, &[one("sda", 1792 * MIB)], Firmware::Bios).unwrap_err()
    );
    assert!(e.contains("too small"), "{e}");
}
