//! Disk layout detection and partitioning on loop devices (privileged).
//!
//! This kernel makes no `loopNp1` devices, so each partition is mapped by a loop device of its
//! own (`losetup -o OFFSET --sizelimit SIZE`) to format it; the partition table is read from
//! the whole-disk loop device. Loops and mounts are released by Drop guards.

use anyhow::{Context, Result};
use si_agent::layout::{
    apply_partitions, detect, device_size, disk_layout, probe_with_blkid, run_lsblk, run_sfdisk,
    GUID_ESP, GUID_LINUX,
};
use si_proto::layout::{Disk, Table};
use si_tests::{run, sh};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

/// A loop device, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path, offset: u64, size: Option<u64>) -> Result<Loop> {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show", "--offset", &offset.to_string()]);
        if let Some(s) = size {
            cmd.args(["--sizelimit", &s.to_string()]);
        }
        let out = run(cmd.arg(file))?;
        let dev = String::from_utf8(out.stdout)?.trim().to_string();
        anyhow::ensure!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Ok(Loop(PathBuf::from(dev)))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A mount, unmounted on drop (lazily if still busy).
struct Mount(PathBuf);

impl Mount {
    fn new(args: &[&str], target: &Path) -> Result<Mount> {
        std::fs::create_dir_all(target)?;
        run(Command::new("mount").args(args).arg(target))?;
        Ok(Mount(target.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn sparse_image(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    Ok(())
}

#[test]
fn gpt_loop_disk_is_read_and_rewritten() {
    si_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sparse_image(&img, 256 * MIB).unwrap();
    sh(&format!(
        "printf 'label: gpt\\nsize=32MiB, type=U, name=\"EFI\"\\ntype=L, name=\"root\"\\n' | sfdisk --quiet {}",
        img.display()
    ))
    .unwrap();

    let disk = Loop::attach(&img, 0, None).unwrap();
    let table = run_sfdisk(&disk.0).unwrap();
    assert_eq!(table.table, Table::Gpt);
    assert_eq!(table.partitions.len(), 2);
    let parts: Vec<Loop> = table
        .partitions
        .iter()
        .map(|p| Loop::attach(&img, p.start * 512, Some(p.size * 512)).unwrap())
        .collect();
    run(Command::new("mkfs.vfat")
        .args(["-n", "ESP"])
        .arg(&parts[0].0))
    .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-L", "root"])
        .arg(&parts[1].0))
    .unwrap();

    // lsblk: the whole-disk loop device and its size.
    let devs = run_lsblk(Some(&disk.0)).unwrap();
    let name = disk.0.file_name().unwrap().to_str().unwrap();
    let d = devs
        .iter()
        .find(|d| d.name == name)
        .expect("lsblk lists the loop device");
    assert_eq!((d.kind.as_str(), d.size), ("loop", 256 * MIB));
    // The filesystems on the partitions, through lsblk or, without udev, blkid.
    for (part, (fstype, label)) in parts.iter().zip([("vfat", "ESP"), ("ext4", "root")]) {
        let mut devs = run_lsblk(Some(&part.0)).unwrap();
        let dev = &mut devs[0];
        probe_with_blkid(dev, &part.0).unwrap();
        assert_eq!(dev.fstype.as_deref(), Some(fstype));
        assert_eq!(dev.label.as_deref(), Some(label));
        assert!(dev.uuid.is_some());
    }

    // sfdisk: the partition table of the whole-disk loop device.
    let got = disk_layout(&disk.0).unwrap();
    // sfdisk ends the last partition on a 1 MiB boundary before the backup GPT.
    let last_lba = table.last_lba.expect("gpt has a last LBA");
    assert!((last_lba + 1) * 512 - 33 * MIB - table.partitions[1].size * 512 < MIB);
    assert_eq!(got.name, name);
    assert_eq!((got.table, got.size), (Table::Gpt, 256 * MIB));
    let summary: Vec<_> = got
        .partitions
        .iter()
        .map(|p| {
            (
                p.number,
                p.size,
                p.grow,
                p.ptype.as_str(),
                p.name.as_deref(),
                p.flags.join(","),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, 32 * MIB, false, GUID_ESP, Some("EFI"), "esp".to_string()),
            (
                2,
                table.partitions[1].size * 512,
                true,
                GUID_LINUX,
                Some("root"),
                String::new()
            ),
        ]
    );

    // Apply the detected layout to a bigger disk image (the last partition grows), and to a
    // loop device of the same size; read both back.
    let img2 = dir.path().join("disk2.img");
    sparse_image(&img2, 512 * MIB).unwrap();
    apply_partitions(&img2, &got, 512 * MIB).unwrap();
    assert_same_table(&got, &disk_layout(&img2).unwrap(), 512 * MIB);

    let img3 = dir.path().join("disk3.img");
    sparse_image(&img3, 256 * MIB).unwrap();
    let disk3 = Loop::attach(&img3, 0, None).unwrap();
    let size3 = device_size(&disk3.0).unwrap();
    apply_partitions(&disk3.0, &got, size3).unwrap();
    let again = disk_layout(&disk3.0).unwrap();
    assert_same_table(&got, &again, 256 * MIB);
    assert_eq!(again.partitions, got.partitions);

    // A disk too small for the fixed partitions is refused before sfdisk runs.
    let small = dir.path().join("small.img");
    sparse_image(&small, 16 * MIB).unwrap();
    let e = apply_partitions(&small, &got, 16 * MIB).unwrap_err();
    assert!(format!("{e:#}").contains("need at least"), "{e:#}");
}

fn assert_same_table(want: &Disk, got: &Disk, disk_size: u64) {
    assert_eq!(got.table, want.table);
    assert_eq!(got.size, disk_size);
    assert_eq!(got.partitions.len(), want.partitions.len());
    for (w, g) in want.partitions.iter().zip(&got.partitions) {
        assert_eq!(
            (g.number, &g.ptype, &g.name, &g.flags, g.grow),
            (w.number, &w.ptype, &w.name, &w.flags, w.grow)
        );
        if w.grow {
            // The growing partition (starting at 33 MiB) ends on the last 1 MiB boundary
            // before the backup GPT.
            let end = 33 * MIB + g.size;
            assert!(end <= disk_size - 33 * 512, "partition {}: {g:?}", w.number);
            assert!(
                end + MIB + 33 * 512 > disk_size,
                "partition {}: {g:?}",
                w.number
            );
        } else {
            assert_eq!(g.size, w.size, "partition {}", w.number);
        }
    }
}

#[test]
fn msdos_layout_with_logical_partitions_is_applied() {
    si_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let layout =
        si_proto::layout::Layout::parse(include_str!("../../images/layouts/bios-msdos.toml"))
            .unwrap();
    let img = dir.path().join("disk.img");
    sparse_image(&img, 4096 * MIB).unwrap();
    apply_partitions(&img, &layout.disks[0], 4096 * MIB).unwrap();
    let got = disk_layout(&img).unwrap();
    assert_eq!(got.table, Table::Msdos);
    let summary: Vec<_> = got
        .partitions
        .iter()
        .map(|p| (p.number, p.ptype.as_str(), p.flags.join(","), p.grow))
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "0x83", "boot".to_string(), false),
            (2, "0x05", String::new(), false),
            (5, "0x82", "swap".to_string(), false),
            (6, "0x83", String::new(), true),
        ]
    );
    assert_eq!(got.partitions[0].size, 512 * MIB);
    assert_eq!(got.partitions[2].size, 2048 * MIB);
}

#[test]
fn roots_not_on_a_partitioned_disk_are_refused() {
    si_tests::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let tmpfs_root = dir.path().join("tmpfs");
    let _m = Mount::new(&["-t", "tmpfs", "si-test"], &tmpfs_root).unwrap();
    let e = format!("{:#}", detect(&tmpfs_root).unwrap_err());
    assert!(e.contains("tmpfs") && e.contains("--layout FILE"), "{e}");

    // A plain directory.
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let e = format!("{:#}", detect(&plain).unwrap_err());
    assert!(
        e.contains("not the mount point") && e.contains("--layout FILE"),
        "{e}"
    );

    // A filesystem on a whole (loop) disk.
    let img = dir.path().join("fs.img");
    sparse_image(&img, 64 * MIB).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-L", "whole"])
        .arg(&img))
    .unwrap();
    let lo = Loop::attach(&img, 0, None).unwrap();
    let mnt = dir.path().join("mnt");
    let _m2 = Mount::new(&[lo.0.to_str().unwrap()], &mnt).unwrap();
    let e = format!("{:#}", detect(&mnt).unwrap_err());
    assert!(
        e.contains("without a partition table") && e.contains("--layout FILE"),
        "{e}"
    );
}

/// The independent tree comparison that the capture tests rely on catches every kind of
/// difference it claims to (tests/fixtures/treecmp_selftest.sh; it sits here with the other
/// fixture-level checks of this branch).
#[test]
fn treecmp_self_test() {
    si_tests::require_root!();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/treecmp_selftest.sh");
    let out = run(&mut Command::new(&script)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("treecmp_selftest: ok"), "{text}");
}
