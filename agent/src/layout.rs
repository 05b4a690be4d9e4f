//! Disk layout detection and partitioning.
//!
//! [`detect`] records the [`Layout`] of the machine whose root filesystem is mounted at a path
//! (normally `/`): the disks that hold the local disk filesystems mounted there and below
//! (ext2/3/4, xfs, btrfs, vfat; not those below `/media`, `/mnt` and `/run`) and, when the
//! path is `/`, the active swap partitions; their partition tables, partitions, filesystems,
//! the firmware and the bootloader.
//! [`apply_partitions`] writes one disk's partition table back with `sfdisk`.
//!
//! The work is split so that tests run without disks:
//!
//! ```text
//! detect(root)
//!  ├─ /proc/self/mountinfo ── parse_mountinfo ─┐
//!  ├─ lsblk -J -b -o LSBLK_COLUMNS ─ parse_lsblk ─┤
//!  ├─ <root>/etc/fstab ───── parse_fstab ─────┼─ build_layout ─> Layout
//!  ├─ /proc/swaps ───────── parse_swaps ─────┤
//!  └─ sfdisk -J /dev/<disk> ── parse_sfdisk ───┘   (called back per disk)
//! ```
//!
//! Filesystems on md RAID 1 and on LVM (over partitions or arrays) are recorded (layout
//! format 2). What the format cannot describe is an error that says to pass `--layout FILE`:
//! a root that is not on a disk (tmpfs, overlay, NFS, a plain directory), filesystems on
//! dm-crypt, other RAID levels, or a whole disk without a partition table. A btrfs filesystem mounted several times (subvolumes) is
//! recorded once, at its first mount point.

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use si_proto::layout::{
    partition_device, Disk, Filesystem, Firmware, Layout, LogicalVolume, Partition, Raid, Table,
    VolumeGroup, LAYOUT_FORMAT,
};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The columns [`parse_lsblk`] reads.
pub const LSBLK_COLUMNS: &str =
    "NAME,TYPE,SIZE,FSTYPE,LABEL,UUID,PARTTYPE,PARTLABEL,PARTFLAGS,MOUNTPOINTS,PKNAME";

/// Filesystems recorded in a layout (besides swap).
pub const DISK_FSTYPES: &[&str] = &["ext2", "ext3", "ext4", "xfs", "btrfs", "vfat"];

pub const GUID_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const GUID_BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
pub const GUID_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
pub const GUID_LINUX_LVM: &str = "E6D6D379-F507-44C2-A23C-238F2A3DF928";
pub const GUID_LINUX_RAID: &str = "A19D880F-05FC-4D3B-A006-743F0F84911E";
pub const GUID_LINUX_SWAP: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";

const MIB: u64 = 1 << 20;

/// One block device of `lsblk`'s output (the tree flattened).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name (`sda1`, `nvme0n1p2`, a device-mapper name).
    pub name: String,
    /// `disk`, `part`, `loop`, `lvm`, `crypt`, `raid1`, `rom`, ...
    pub kind: String,
    pub size: u64,
    pub fstype: Option<String>,
    pub label: Option<String>,
    pub uuid: Option<String>,
    pub parttype: Option<String>,
    pub partlabel: Option<String>,
    pub partflags: Option<String>,
    pub mountpoints: Vec<String>,
    /// Parent kernel name (`PKNAME`, or the parent in lsblk's tree).
    pub parent: Option<String>,
    /// Every parent lsblk lists it under (the members of an md array, the PVs of a volume).
    pub parents: Vec<String>,
}

/// Parses `lsblk -J -b -o LSBLK_COLUMNS` output. Devices listed under several parents (RAID
/// members) appear once, as first seen.
pub fn parse_lsblk(json: &str) -> Result<Vec<BlockDev>> {
    let v: Value = serde_json::from_str(json).context("parsing lsblk JSON")?;
    let list = v
        .get("blockdevices")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("lsblk JSON has no \"blockdevices\" array"))?;
    let mut out = Vec::new();
    for d in list {
        flatten_lsblk(d, None, &mut out)?;
    }
    Ok(out)
}

fn flatten_lsblk(v: &Value, parent: Option<&str>, out: &mut Vec<BlockDev>) -> Result<()> {
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let name = s("name").ok_or_else(|| anyhow!("lsblk device without a name: {v}"))?;
    // `-b` gives numbers; util-linux before 2.33 printed every value as a string.
    let size = match v.get("size") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| anyhow!("lsblk device {name}: size missing or not in bytes (use -b)"))?;
    let mut mountpoints: Vec<String> = match v.get("mountpoints") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|m| m.as_str())
            .map(String::from)
            .collect(),
        _ => Vec::new(),
    };
    if let Some(m) = v.get("mountpoint").and_then(Value::as_str) {
        mountpoints.push(m.to_string());
    }
    let dev = BlockDev {
        kind: s("type").unwrap_or_default(),
        size,
        fstype: s("fstype"),
        label: s("label"),
        uuid: s("uuid"),
        parttype: s("parttype"),
        partlabel: s("partlabel"),
        partflags: s("partflags"),
        mountpoints,
        parent: s("pkname").or_else(|| parent.map(str::to_string)),
        parents: parent.map(str::to_string).into_iter().collect(),
        name,
    };
    let name = dev.name.clone();
    match out.iter_mut().find(|d: &&mut BlockDev| d.name == name) {
        None => out.push(dev),
        Some(seen) => {
            if let Some(p) = parent {
                if !seen.parents.iter().any(|x| x == p) {
                    seen.parents.push(p.to_string());
                }
            }
        }
    }
    if let Some(children) = v.get("children").and_then(Value::as_array) {
        for c in children {
            flatten_lsblk(c, Some(&name), out)?;
        }
    }
    Ok(())
}

/// A partition table as `sfdisk -J` prints it (sizes in sectors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartTable {
    pub table: Table,
    pub sector_size: u64,
    pub last_lba: Option<u64>,
    pub partitions: Vec<SfPartition>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct SfPartition {
    pub node: String,
    pub start: u64,
    pub size: u64,
    #[serde(rename = "type")]
    pub ptype: String,
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub bootable: bool,
    #[serde(default)]
    pub attrs: Option<String>,
}

impl SfPartition {
    /// The partition number: the digits that end the node name (`/dev/nvme0n1p12` → 12).
    pub fn number(&self) -> Result<u32> {
        let digits: String = self
            .node
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        digits
            .parse()
            .with_context(|| format!("partition node {:?} does not end in a number", self.node))
    }
}

/// Parses `sfdisk -J DEVICE` output.
pub fn parse_sfdisk(json: &str) -> Result<PartTable> {
    #[derive(Deserialize)]
    struct Top {
        partitiontable: Raw,
    }
    #[derive(Deserialize)]
    struct Raw {
        label: String,
        #[serde(default)]
        unit: Option<String>,
        #[serde(default)]
        sectorsize: Option<u64>,
        #[serde(default)]
        lastlba: Option<u64>,
        #[serde(default)]
        partitions: Vec<SfPartition>,
    }
    let top: Top = serde_json::from_str(json).context("parsing sfdisk JSON")?;
    let raw = top.partitiontable;
    let table = match raw.label.as_str() {
        "gpt" => Table::Gpt,
        "dos" => Table::Msdos,
        other => bail!("partition table type {other:?} is not supported (only gpt and dos)"),
    };
    if let Some(u) = raw.unit.as_deref() {
        if u != "sectors" {
            bail!("sfdisk JSON in unit {u:?}, expected sectors");
        }
    }
    Ok(PartTable {
        table,
        sector_size: raw.sectorsize.unwrap_or(512),
        last_lba: raw.lastlba,
        partitions: raw.partitions,
    })
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub mountpoint: String,
    /// The directory of the filesystem mounted there (`/` unless a bind mount or subvolume).
    pub fs_root: String,
    pub fstype: String,
    pub source: String,
    /// Per-mount options (`rw,relatime`).
    pub options: String,
}

/// Parses `/proc/self/mountinfo` (see proc(5)); octal escapes (`\040`) are decoded.
pub fn parse_mountinfo(text: &str) -> Result<Vec<Mount>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(' ').collect();
        let sep = f
            .iter()
            .position(|x| *x == "-")
            .filter(|&p| p >= 6 && f.len() >= p + 3)
            .ok_or_else(|| anyhow!("mountinfo line {}: malformed: {line:?}", i + 1))?;
        out.push(Mount {
            fs_root: unescape(f[3]),
            mountpoint: unescape(f[4]),
            options: f[5].to_string(),
            fstype: f[sep + 1].to_string(),
            source: unescape(f[sep + 2]),
        });
    }
    Ok(out)
}

/// One entry of an fstab file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FstabEntry {
    pub spec: String,
    pub file: String,
    pub vfstype: String,
    pub options: String,
}

/// Parses fstab(5) text: comments and blank lines skipped, octal escapes decoded.
pub fn parse_fstab(text: &str) -> Vec<FstabEntry> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| FstabEntry {
                spec: unescape(f[0]),
                file: unescape(f[1]),
                vfstype: f[2].to_string(),
                options: f.get(3).copied().unwrap_or("defaults").to_string(),
            })
        })
        .collect()
}

/// The swap partitions of `/proc/swaps` (device paths).
pub fn parse_swaps(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 2 && f[1] == "partition").then(|| unescape(f[0]))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Everything [`build_layout`] needs besides the partition tables.
#[derive(Clone, Debug, Default)]
pub struct Probe {
    /// Where the golden node's root filesystem is mounted (`/` normally).
    pub root: String,
    pub mounts: Vec<Mount>,
    pub devices: Vec<BlockDev>,
    /// `<root>/etc/fstab`.
    pub fstab: Vec<FstabEntry>,
    /// Active swap partitions (device paths); empty unless `root` is `/`.
    pub swaps: Vec<String>,
    pub uefi: bool,
    pub grub: bool,
}

/// Mount points of removable media and of the moment, whose filesystems are not the node's
/// (the default capture excludes skip their contents too).
pub const TRANSIENT_MOUNTS: &[&str] = &["/media", "/mnt", "/run"];

const PASS_LAYOUT: &str = "pass --layout FILE to describe the disk layout";

/// Combines what was probed into a [`Layout`]; `table(disk_name)` returns the partition table
/// of a disk (`sfdisk -J /dev/<disk>` parsed).
pub fn build_layout(
    probe: &Probe,
    mut table: impl FnMut(&str) -> Result<PartTable>,
) -> Result<Layout> {
    let root = normalize_root(&probe.root);
    // The last mount on a mount point hides the earlier ones.
    let mut visible: Vec<&Mount> = Vec::new();
    for m in &probe.mounts {
        visible.retain(|v| v.mountpoint != m.mountpoint);
        visible.push(m);
    }
    let Some(root_mount) = visible.iter().find(|m| m.mountpoint == root) else {
        let covering = visible
            .iter()
            .filter(|m| under(&root, &m.mountpoint))
            .max_by_key(|m| m.mountpoint.len());
        let what = covering.map_or(String::new(), |m| {
            format!(
                " (it is a directory in the {} filesystem {} mounted at {})",
                m.fstype, m.source, m.mountpoint
            )
        });
        bail!("{root} is not the mount point of a filesystem{what}: cannot detect its disk layout; {PASS_LAYOUT}");
    };
    if !DISK_FSTYPES.contains(&root_mount.fstype.as_str()) {
        bail!(
            "the root filesystem at {root} is {} ({}), not a filesystem on a local disk: \
             cannot detect its disk layout; {PASS_LAYOUT}",
            root_mount.fstype,
            root_mount.source
        );
    }

    // (device, relative mount point, mount) of every disk filesystem at root and below.
    let mut found: Vec<(&BlockDev, String, &Mount)> = Vec::new();
    let mut mounts: Vec<&&Mount> = visible
        .iter()
        .filter(|m| under(&m.mountpoint, &root) && DISK_FSTYPES.contains(&m.fstype.as_str()))
        .filter(|m| {
            let rel = relative_mountpoint(&m.mountpoint, &root);
            !TRANSIENT_MOUNTS.iter().any(|t| under(&rel, t))
        })
        .collect();
    // Parents before children; of several mounts of one filesystem, the first in this order.
    mounts.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
    for m in mounts {
        let dev = probe
            .devices
            .iter()
            .find(|d| d.mountpoints.contains(&m.mountpoint))
            .or_else(|| {
                let base = m.source.rsplit('/').next().unwrap_or(&m.source);
                probe.devices.iter().find(|d| d.name == base)
            })
            .ok_or_else(|| {
                anyhow!(
                    "the {} filesystem mounted at {} comes from {}, which lsblk does not list",
                    m.fstype,
                    m.mountpoint,
                    m.source
                )
            })?;
        if found.iter().any(|(d, _, _)| d.name == dev.name) {
            continue; // bind mount or another subvolume of a filesystem already recorded
        }
        stack_partitions(probe, dev, 0)
            .with_context(|| format!("the {} filesystem mounted at {}", m.fstype, m.mountpoint))?;
        found.push((dev, relative_mountpoint(&m.mountpoint, &root), m));
    }
    let mut swaps: Vec<&BlockDev> = Vec::new();
    for s in &probe.swaps {
        let base = s.rsplit('/').next().unwrap_or(s);
        if let Some(d) = probe.devices.iter().find(|d| d.name == base) {
            if stack_partitions(probe, d, 0).is_ok() && !swaps.iter().any(|x| x.name == d.name) {
                swaps.push(d);
            }
        }
    }

    // Disks in order: the root filesystem's first, then in the order of the mount points,
    // then those with only swap.
    let mut disk_names: Vec<String> = Vec::new();
    for d in found
        .iter()
        .map(|(d, _, _)| *d)
        .chain(swaps.iter().copied())
    {
        for part in stack_partitions(probe, d, 0)? {
            let disk = partition_disk(probe, part)?.name.clone();
            if !disk_names.contains(&disk) {
                disk_names.push(disk);
            }
        }
    }
    let mut disks = Vec::new();
    let mut parts_of: BTreeMap<String, (String, u32)> = BTreeMap::new();
    for name in &disk_names {
        let dev = probe
            .devices
            .iter()
            .find(|d| d.name == *name)
            .ok_or_else(|| anyhow!("disk {name} is not in lsblk's output"))?;
        let pt = table(name).with_context(|| format!("reading the partition table of {name}"))?;
        for p in &pt.partitions {
            let base = p.node.rsplit('/').next().unwrap_or(&p.node).to_string();
            parts_of.insert(base, (name.clone(), p.number()?));
        }
        disks.push(disk_from_table(name, dev.size, &pt)?);
    }

    let part_of = |d: &BlockDev| -> Result<String> {
        let (disk, n) = parts_of.get(&d.name).ok_or_else(|| {
            anyhow!(
                "partition {} is not in the partition table of its disk",
                d.name
            )
        })?;
        Ok(partition_device(disk, *n))
    };
    // md arrays and volume groups under the filesystems, recorded once each.
    let mut raids: Vec<Raid> = Vec::new();
    let mut vgs: Vec<VolumeGroup> = Vec::new();
    let mut device_of = |d: &BlockDev| -> Result<String> {
        describe_stack(probe, d, &part_of, &mut raids, &mut vgs, 0)
    };
    let mut filesystems = Vec::new();
    for (dev, mountpoint, m) in &found {
        let options = probe
            .fstab
            .iter()
            .find(|e| e.file == *mountpoint)
            .map(|e| e.options.clone())
            .unwrap_or_else(|| m.options.clone());
        filesystems.push(Filesystem {
            device: device_of(dev)?,
            fstype: dev.fstype.clone().unwrap_or_else(|| m.fstype.clone()),
            label: dev.label.clone(),
            uuid: dev.uuid.clone(),
            mountpoint: Some(mountpoint.clone()),
            options: Some(options),
        });
    }
    for dev in swaps {
        let options = probe
            .fstab
            .iter()
            .find(|e| e.vfstype == "swap" && fstab_spec_matches(&e.spec, dev))
            .map(|e| e.options.clone());
        filesystems.push(Filesystem {
            device: device_of(dev)?,
            fstype: "swap".into(),
            label: dev.label.clone(),
            uuid: dev.uuid.clone(),
            mountpoint: None,
            options,
        });
    }

    let layout = Layout {
        format: LAYOUT_FORMAT,
        firmware: if probe.uefi {
            Firmware::Uefi
        } else {
            Firmware::Bios
        },
        bootloader: probe.grub.then(|| "grub".to_string()),
        disks,
        raids,
        vgs,
        filesystems,
    };
    layout
        .check()
        .map_err(|e| anyhow!("the detected layout is inconsistent: {e}"))?;
    Ok(layout)
}

/// The partitions under `dev`: itself, or the members of the md array / the PVs of the
/// logical volume it is (format 2 records md RAID 1 and LVM); an error for anything else.
fn stack_partitions<'a>(
    probe: &'a Probe,
    dev: &'a BlockDev,
    depth: usize,
) -> Result<Vec<&'a BlockDev>> {
    if depth > 4 {
        bail!(
            "{} sits on too deep a stack of devices; {PASS_LAYOUT}",
            dev.name
        );
    }
    let kind = dev.kind.as_str();
    if kind == "part" || kind == "disk" || kind == "loop" {
        partition_disk(probe, dev)?;
        return Ok(vec![dev]);
    }
    if kind.starts_with("raid") && kind != "raid1" {
        bail!(
            "{} is a {kind} array; layout format {LAYOUT_FORMAT} records md RAID 1 only; {PASS_LAYOUT}",
            dev.name
        );
    }
    if kind != "raid1" && kind != "lvm" {
        bail!(
            "{} is a {kind} device (encryption, multipath...), which layout format {LAYOUT_FORMAT} \
             cannot describe; {PASS_LAYOUT}",
            dev.name
        );
    }
    let mut out = Vec::new();
    for p in &dev.parents {
        let pd = probe
            .devices
            .iter()
            .find(|d| d.name == *p)
            .ok_or_else(|| anyhow!("{p}, under {}, is not in lsblk's output", dev.name))?;
        out.extend(stack_partitions(probe, pd, depth + 1)?);
    }
    if out.is_empty() {
        bail!("{} has no parent device in lsblk's output", dev.name);
    }
    Ok(out)
}

/// Splits a device-mapper name `VG-LV` (dashes inside names doubled) into its parts.
pub fn split_dm_name(n: &str) -> Option<(String, String)> {
    let b = n.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'-' {
            if b.get(i + 1) == Some(&b'-') {
                i += 2;
                continue;
            }
            let (vg, lv) = (&n[..i], &n[i + 1..]);
            if vg.is_empty() || lv.is_empty() {
                return None;
            }
            return Some((vg.replace("--", "-"), lv.replace("--", "-")));
        }
        i += 1;
    }
    None
}

/// The layout device name of `d` (a partition `sda2`, an array `md0`, a volume `vg/lv`),
/// recording the arrays and volume groups it sits on.
fn describe_stack(
    probe: &Probe,
    d: &BlockDev,
    part_of: &dyn Fn(&BlockDev) -> Result<String>,
    raids: &mut Vec<Raid>,
    vgs: &mut Vec<VolumeGroup>,
    depth: usize,
) -> Result<String> {
    if depth > 4 {
        bail!("{} sits on too deep a stack of devices", d.name);
    }
    let parents = || -> Result<Vec<&BlockDev>> {
        d.parents
            .iter()
            .map(|p| {
                probe
                    .devices
                    .iter()
                    .find(|x| x.name == *p)
                    .ok_or_else(|| anyhow!("{p} is not in lsblk's output"))
            })
            .collect()
    };
    match d.kind.as_str() {
        "raid1" => {
            if !raids.iter().any(|r| r.name == d.name) {
                let mut members = Vec::new();
                for p in parents()? {
                    members.push(describe_stack(probe, p, part_of, raids, vgs, depth + 1)?);
                }
                raids.push(Raid {
                    name: d.name.clone(),
                    level: 1,
                    members,
                    metadata: None,
                });
            }
            Ok(d.name.clone())
        }
        "lvm" => {
            let (vg, lv) = split_dm_name(&d.name).ok_or_else(|| {
                anyhow!(
                    "{} is not a VG-LV device-mapper name; {PASS_LAYOUT}",
                    d.name
                )
            })?;
            let mut pvs = Vec::new();
            let mut pv_bytes = 0;
            for p in parents()? {
                pvs.push(describe_stack(probe, p, part_of, raids, vgs, depth + 1)?);
                pv_bytes += p.size;
            }
            // Every volume of the group lsblk shows on these PVs, in its order; the last one
            // grows when the volumes fill the group (within 1%).
            if !vgs.iter().any(|g| g.name == vg) {
                let mut lvs: Vec<LogicalVolume> = Vec::new();
                for x in probe.devices.iter().filter(|x| x.kind == "lvm") {
                    if let Some((xv, xl)) = split_dm_name(&x.name) {
                        if xv == vg && !lvs.iter().any(|l| l.name == xl) {
                            lvs.push(LogicalVolume {
                                name: xl,
                                size: x.size,
                                percent: None,
                                grow: false,
                            });
                        }
                    }
                }
                let used: u64 = lvs.iter().map(|l| l.size).sum();
                if used + pv_bytes / 100 >= pv_bytes {
                    if let Some(last) = lvs.last_mut() {
                        last.grow = true;
                        last.size = 0;
                    }
                }
                vgs.push(VolumeGroup {
                    name: vg.clone(),
                    pvs,
                    lvs,
                });
            }
            Ok(format!("{vg}/{lv}"))
        }
        _ => part_of(d),
    }
}

/// The disk that `dev` is a partition of; an error for anything a layout cannot describe.
fn partition_disk<'a>(probe: &'a Probe, dev: &BlockDev) -> Result<&'a BlockDev> {
    match dev.kind.as_str() {
        "part" => {}
        "disk" | "loop" => bail!(
            "{} is a whole {} without a partition table, which layout format {LAYOUT_FORMAT} \
             cannot describe; {PASS_LAYOUT}",
            dev.name,
            dev.kind
        ),
        other => bail!(
            "{} is a {other} device (LVM, RAID, encryption...), which layout format \
             {LAYOUT_FORMAT} cannot describe; {PASS_LAYOUT}",
            dev.name
        ),
    }
    let parent = dev.parent.as_deref().ok_or_else(|| {
        anyhow!(
            "partition {} has no parent disk in lsblk's output",
            dev.name
        )
    })?;
    let disk = probe
        .devices
        .iter()
        .find(|d| d.name == parent)
        .ok_or_else(|| {
            anyhow!(
                "disk {parent} of partition {} is not in lsblk's output",
                dev.name
            )
        })?;
    if disk.kind != "disk" && disk.kind != "loop" {
        bail!(
            "partition {} is on a {} device {parent}, which layout format {LAYOUT_FORMAT} cannot \
             describe; {PASS_LAYOUT}",
            dev.name,
            disk.kind
        );
    }
    Ok(disk)
}

fn fstab_spec_matches(spec: &str, dev: &BlockDev) -> bool {
    if let Some(u) = spec.strip_prefix("UUID=") {
        return dev
            .uuid
            .as_deref()
            .is_some_and(|x| x.eq_ignore_ascii_case(u));
    }
    if let Some(l) = spec.strip_prefix("LABEL=") {
        return dev.label.as_deref() == Some(l);
    }
    spec.rsplit('/').next() == Some(dev.name.as_str())
}

/// The [`Disk`] described by a partition table; `disk_size` in bytes. The last partition grows
/// when it ends within 1% of the end of the disk.
pub fn disk_from_table(name: &str, disk_size: u64, pt: &PartTable) -> Result<Disk> {
    let ss = pt.sector_size;
    let mut parts: Vec<(u32, &SfPartition)> = pt
        .partitions
        .iter()
        .map(|p| Ok((p.number()?, p)))
        .collect::<Result<_>>()?;
    parts.sort_by_key(|(n, _)| *n);
    let mut partitions = Vec::new();
    for (number, p) in &parts {
        let (ptype, mut flags) = match pt.table {
            Table::Gpt => {
                let guid = p.ptype.to_ascii_uppercase();
                let flag = match guid.as_str() {
                    GUID_ESP => Some("esp"),
                    GUID_BIOS_BOOT => Some("bios_grub"),
                    GUID_LINUX_LVM => Some("lvm"),
                    GUID_LINUX_RAID => Some("raid"),
                    GUID_LINUX_SWAP => Some("swap"),
                    _ => None,
                };
                (guid, flag.into_iter().map(String::from).collect::<Vec<_>>())
            }
            Table::Msdos => {
                let t = p.ptype.trim_start_matches("0x").to_ascii_lowercase();
                let byte = u8::from_str_radix(&t, 16)
                    .with_context(|| format!("partition {}: MBR type {:?}", p.node, p.ptype))?;
                let flag = match byte {
                    0xef => Some("esp"),
                    0x8e => Some("lvm"),
                    0xfd => Some("raid"),
                    0x82 => Some("swap"),
                    _ => None,
                };
                (
                    format!("0x{byte:02x}"),
                    flag.into_iter().map(String::from).collect(),
                )
            }
        };
        let legacy_boot = p
            .attrs
            .as_deref()
            .is_some_and(|a| a.split_whitespace().any(|x| x == "LegacyBIOSBootable"));
        if p.bootable || legacy_boot {
            flags.insert(0, "boot".into());
        }
        partitions.push(Partition {
            number: *number,
            size: p.size * ss,
            percent: None,
            grow: false,
            ptype,
            name: p.name.clone().filter(|n| !n.is_empty()),
            flags,
        });
    }
    if let (Some(last), Some((_, lp))) = (partitions.last_mut(), parts.last()) {
        let end = (lp.start + lp.size) * ss;
        let ends_last = parts
            .iter()
            .all(|(_, p)| p.start + p.size <= lp.start + lp.size);
        if ends_last && disk_size > 0 && end + disk_size / 100 >= disk_size {
            last.grow = true;
        }
    }
    Ok(Disk {
        name: name.to_string(),
        table: pt.table,
        size: disk_size,
        select: None,
        partitions,
    })
}

fn normalize_root(root: &str) -> String {
    let t = root.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.to_string()
    }
}

/// Whether `path` is `dir` or below it.
fn under(path: &str, dir: &str) -> bool {
    dir == "/" || path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

fn relative_mountpoint(mp: &str, root: &str) -> String {
    if root == "/" {
        return mp.to_string();
    }
    match mp.strip_prefix(root) {
        Some("") | None => "/".into(),
        Some(r) => r.to_string(),
    }
}

fn command_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("output of {cmd:?} is not UTF-8"))
}

/// Runs lsblk on every device, or on `dev` only.
pub fn run_lsblk(dev: Option<&Path>) -> Result<Vec<BlockDev>> {
    let mut cmd = Command::new("lsblk");
    cmd.args(["-J", "-b", "-o", LSBLK_COLUMNS]);
    if let Some(d) = dev {
        cmd.arg(d);
    }
    parse_lsblk(&command_output(&mut cmd)?)
}

/// Parses `blkid -o export` output into (TYPE, LABEL, UUID).
pub fn parse_blkid_export(text: &str) -> (Option<String>, Option<String>, Option<String>) {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .filter(|v| !v.is_empty())
            .map(|v| v.replace("\\ ", " "))
    };
    (get("TYPE"), get("LABEL"), get("UUID"))
}

/// Fills in the filesystem type, label and UUID of a device that lsblk left empty (lsblk
/// reads them from the udev database, which an initramfs or a container may not have) by
/// probing it with `blkid -p`.
pub fn probe_with_blkid(dev: &mut BlockDev, path: &Path) -> Result<()> {
    if dev.fstype.is_some() {
        return Ok(());
    }
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running blkid")?;
    match out.status.code() {
        Some(0) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let (t, l, u) = parse_blkid_export(&text);
            dev.fstype = t;
            dev.label = dev.label.take().or(l);
            dev.uuid = dev.uuid.take().or(u);
            Ok(())
        }
        Some(2) => Ok(()), // nothing recognized
        _ => bail!(
            "blkid -p {} failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// Runs `sfdisk -J` on a disk (device or image file).
pub fn run_sfdisk(dev: &Path) -> Result<PartTable> {
    let text = command_output(Command::new("sfdisk").arg("-J").arg(dev))?;
    parse_sfdisk(&text).with_context(|| format!("partition table of {}", dev.display()))
}

/// The partition table of one disk (a block device or an image file) as a [`Disk`] named
/// after the file.
pub fn disk_layout(dev: &Path) -> Result<Disk> {
    let name = dev
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{} has no file name", dev.display()))?;
    let size = device_size(dev)?;
    disk_from_table(name, size, &run_sfdisk(dev)?)
}

/// Size in bytes of a block device or a file.
pub fn device_size(dev: &Path) -> Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    let md = std::fs::metadata(dev).with_context(|| format!("reading {}", dev.display()))?;
    if md.file_type().is_block_device() {
        let out = command_output(Command::new("blockdev").arg("--getsize64").arg(dev))?;
        out.trim()
            .parse()
            .with_context(|| format!("size of {}: {out:?}", dev.display()))
    } else {
        Ok(md.len())
    }
}

/// Records the disk layout of the machine whose root filesystem is mounted at `root`.
pub fn detect(root: &Path) -> Result<Layout> {
    let root_str = root
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", root.display()))?;
    let root_abs = if root.is_absolute() {
        PathBuf::from(root_str)
    } else {
        std::env::current_dir()
            .context("reading the current directory")?
            .join(root)
    };
    let root_abs = root_abs
        .canonicalize()
        .with_context(|| format!("resolving {}", root.display()))?;
    let root_str = root_abs
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", root_abs.display()))?
        .to_string();
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let fstab_path = root_abs.join("etc/fstab");
    let fstab = match std::fs::read_to_string(&fstab_path) {
        Ok(t) => parse_fstab(&t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", fstab_path.display())),
    };
    let swaps = if root_str == "/" {
        parse_swaps(&std::fs::read_to_string("/proc/swaps").context("reading /proc/swaps")?)
    } else {
        Vec::new()
    };
    let mut devices = run_lsblk(None)?;
    // Only the partitions in use (mounted, or swap: lsblk knows these from the kernel) can end
    // up in the layout.
    for d in devices
        .iter_mut()
        .filter(|d| d.kind == "part" && !d.mountpoints.is_empty())
    {
        let path = Path::new("/dev").join(&d.name);
        probe_with_blkid(d, &path).with_context(|| format!("probing {}", path.display()))?;
    }
    let probe = Probe {
        mounts: parse_mountinfo(&mountinfo)?,
        devices,
        fstab,
        swaps,
        uefi: Path::new("/sys/firmware/efi").exists(),
        grub: root_abs.join("boot/grub").is_dir() || root_abs.join("boot/efi/EFI").is_dir(),
        root: root_str,
    };
    build_layout(&probe, |disk| run_sfdisk(&Path::new("/dev").join(disk)))
}

/// The `sfdisk` script that creates the partition table of `disk`, for a disk of `disk_size`
/// bytes with `sector_size`-byte sectors. Partitions keep their numbers and sizes, the `grow`
/// one takes the rest of the disk; types, GPT names and the `boot` flag are written (the other
/// flags follow from the type).
pub fn sfdisk_script(disk: &Disk, disk_size: u64, sector_size: u64) -> Result<String> {
    if sector_size < 512 || !sector_size.is_power_of_two() {
        bail!("sector size {sector_size} is not a power of two of at least 512");
    }
    let fixed: u64 = disk
        .partitions
        .iter()
        .filter(|p| !p.grow && !is_extended(disk.table, &p.ptype))
        .map(|p| p.size.div_ceil(MIB) * MIB)
        .sum();
    let grows = disk.partitions.iter().any(|p| p.grow);
    // 1 MiB alignment before the first partition, the backup GPT at the end, 1 MiB for EBRs
    // and at least 1 MiB for a growing partition.
    let needed = MIB + fixed + MIB + if grows { MIB } else { 0 };
    if needed > disk_size {
        bail!(
            "the partitions of disk {} need at least {needed} bytes; the target disk has {disk_size}",
            disk.name
        );
    }
    if disk.table == Table::Msdos && disk_size / sector_size > u32::MAX as u64 {
        bail!(
            "disk {}: an msdos partition table cannot address {disk_size} bytes; use gpt",
            disk.name
        );
    }
    let mut s = String::new();
    s.push_str(match disk.table {
        Table::Gpt => "label: gpt\n",
        Table::Msdos => "label: dos\n",
    });
    s.push_str("unit: sectors\n\n");
    let logical_grows = disk
        .partitions
        .iter()
        .any(|p| p.grow && p.number > 4 && disk.table == Table::Msdos);
    for p in &disk.partitions {
        if p.number == 0 {
            bail!("disk {}: partition number 0", disk.name);
        }
        let mut fields = Vec::new();
        let extended = is_extended(disk.table, &p.ptype);
        let open_ended = p.grow || (extended && logical_grows);
        if !open_ended {
            if p.size == 0 || p.size % sector_size != 0 {
                bail!(
                    "disk {} partition {}: size {} is not a positive multiple of the sector size {sector_size}",
                    disk.name,
                    p.number,
                    p.size
                );
            }
            fields.push(format!("size={}", p.size / sector_size));
        }
        let ptype = match disk.table {
            Table::Gpt => p.ptype.clone(),
            Table::Msdos => p.ptype.trim_start_matches("0x").to_string(),
        };
        if ptype.is_empty() || !ptype.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!(
                "disk {} partition {}: bad type {:?}",
                disk.name,
                p.number,
                p.ptype
            );
        }
        fields.push(format!("type={ptype}"));
        if let Some(name) = &p.name {
            if disk.table != Table::Gpt {
                bail!(
                    "disk {} partition {}: names need a gpt table",
                    disk.name,
                    p.number
                );
            }
            if name.contains(['"', '\n', '\\']) {
                bail!(
                    "disk {} partition {}: name {name:?} cannot be written",
                    disk.name,
                    p.number
                );
            }
            fields.push(format!("name=\"{name}\""));
        }
        for f in &p.flags {
            match (f.as_str(), disk.table) {
                ("boot", Table::Msdos) => fields.push("bootable".into()),
                ("boot", Table::Gpt) => fields.push("attrs=\"LegacyBIOSBootable\"".into()),
                ("esp" | "bios_grub" | "lvm" | "raid" | "swap", _) => {}
                (other, _) => bail!(
                    "disk {} partition {}: unknown flag {other:?}",
                    disk.name,
                    p.number
                ),
            }
        }
        s.push_str(&format!("part{} : {}\n", p.number, fields.join(", ")));
    }
    Ok(s)
}

fn is_extended(table: Table, ptype: &str) -> bool {
    table.is_extended(ptype)
}

/// Writes the partition table of `layout_disk` on `disk` (a block device or an image file) of
/// `disk_size` bytes with sfdisk, wiping the signatures of what was there.
pub fn apply_partitions(disk: &Path, layout_disk: &Disk, disk_size: u64) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let md = std::fs::metadata(disk).with_context(|| format!("reading {}", disk.display()))?;
    let sector_size = if md.file_type().is_block_device() {
        let out = command_output(Command::new("blockdev").arg("--getss").arg(disk))?;
        out.trim()
            .parse()
            .with_context(|| format!("sector size of {}: {out:?}", disk.display()))?
    } else {
        512
    };
    let script = sfdisk_script(layout_disk, disk_size, sector_size)
        .with_context(|| format!("planning the partitions of {}", disk.display()))?;
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--wipe", "always", "--wipe-partitions", "always"])
        .arg(disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running sfdisk")?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .context("writing the sfdisk script")?;
    let out = child.wait_with_output().context("waiting for sfdisk")?;
    if !out.status.success() {
        bail!(
            "sfdisk {} failed ({}): {}\nscript:\n{script}",
            disk.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../../tests/fixtures/layout/", $name))
        };
    }

    fn probe(root: &str, lsblk: &str, mountinfo: &str, fstab: &str, uefi: bool) -> Probe {
        Probe {
            root: root.into(),
            mounts: parse_mountinfo(mountinfo).unwrap(),
            devices: parse_lsblk(lsblk).unwrap(),
            fstab: parse_fstab(fstab),
            swaps: Vec::new(),
            uefi,
            grub: true,
        }
    }

    #[test]
    fn bios_msdos_vm() {
        let mut p = probe(
            "/",
            fixture!("bios-msdos.lsblk.json"),
            fixture!("bios-msdos.mountinfo"),
            fixture!("bios-msdos.fstab"),
            false,
        );
        p.swaps = parse_swaps(fixture!("bios-msdos.swaps"));
        let l = build_layout(&p, |d| {
            assert_eq!(d, "sda");
            parse_sfdisk(fixture!("bios-msdos.sfdisk-sda.json"))
        })
        .unwrap();
        assert_eq!(l.firmware, Firmware::Bios);
        assert_eq!(l.disks.len(), 1);
        let d = &l.disks[0];
        assert_eq!(
            (d.name.as_str(), d.table, d.size),
            ("sda", Table::Msdos, 21474836480)
        );
        let summary: Vec<_> = d
            .partitions
            .iter()
            .map(|p| {
                (
                    p.number,
                    p.size,
                    p.grow,
                    p.ptype.as_str(),
                    p.flags.join(","),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (1, 19327352832, false, "0x83", "boot".to_string()),
                (2, 2145387520, false, "0x05", String::new()),
                (5, 2145386496, true, "0x82", "swap".to_string()),
            ]
        );
        assert_eq!(l.filesystems.len(), 2);
        let root = &l.filesystems[0];
        assert_eq!(root.device, "sda1");
        assert_eq!(root.fstype, "ext4");
        assert_eq!(root.mountpoint.as_deref(), Some("/"));
        assert_eq!(root.options.as_deref(), Some("errors=remount-ro"));
        assert_eq!(
            root.uuid.as_deref(),
            Some("3e6b2b8c-7f0e-4d0a-9a43-5c1f0a6f8d21")
        );
        let swap = &l.filesystems[1];
        assert_eq!(
            (swap.device.as_str(), swap.fstype.as_str()),
            ("sda5", "swap")
        );
        assert_eq!(swap.options.as_deref(), Some("sw"));
        assert_eq!(Layout::parse(&l.to_toml()).unwrap(), l);
    }

    #[test]
    fn uefi_gpt_disk() {
        let mut p = probe(
            "/",
            fixture!("uefi-gpt.lsblk.json"),
            fixture!("uefi-gpt.mountinfo"),
            fixture!("uefi-gpt.fstab"),
            true,
        );
        p.swaps = parse_swaps(fixture!("uefi-gpt.swaps"));
        let l = build_layout(&p, |_| parse_sfdisk(fixture!("uefi-gpt.sfdisk-vda.json"))).unwrap();
        assert_eq!(l.firmware, Firmware::Uefi);
        assert_eq!(l.bootloader.as_deref(), Some("grub"));
        let d = &l.disks[0];
        assert_eq!((d.name.as_str(), d.table), ("vda", Table::Gpt));
        let summary: Vec<_> = d
            .partitions
            .iter()
            .map(|p| {
                (
                    p.number,
                    p.size,
                    p.grow,
                    p.name.as_deref(),
                    p.flags.join(","),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    1,
                    536870912,
                    false,
                    Some("EFI system partition"),
                    "esp".to_string()
                ),
                (2, 2147483648, false, Some("swap"), "swap".to_string()),
                (3, 40264252928, true, Some("root"), String::new()),
            ]
        );
        assert_eq!(d.partitions[0].ptype, GUID_ESP);
        let fs: Vec<_> = l
            .filesystems
            .iter()
            .map(|f| {
                (
                    f.device.as_str(),
                    f.fstype.as_str(),
                    f.mountpoint.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            fs,
            vec![
                ("vda3", "ext4", Some("/")),
                ("vda1", "vfat", Some("/boot/efi")),
                ("vda2", "swap", None),
            ]
        );
        assert_eq!(l.filesystems[1].options.as_deref(), Some("umask=0077"));
        assert_eq!(l.filesystems[1].label.as_deref(), Some("EFI"));
        Layout::parse(&l.to_toml()).unwrap();

        // The same machine seen from a rescue system with the tree mounted at /mnt/sysimage;
        // the rescue system's swap is not the node's.
        let mi = fixture!("uefi-gpt.mountinfo")
            .replace(" / / ", " / /mnt/sysimage ")
            .replace(" /boot/efi ", " /mnt/sysimage/boot/efi ");
        let lsblk = fixture!("uefi-gpt.lsblk.json")
            .replace("\"/\"", "\"/mnt/sysimage\"")
            .replace("\"/boot/efi\"", "\"/mnt/sysimage/boot/efi\"");
        let p2 = probe(
            "/mnt/sysimage/",
            &lsblk,
            &mi,
            fixture!("uefi-gpt.fstab"),
            true,
        );
        let l2 = build_layout(&p2, |_| parse_sfdisk(fixture!("uefi-gpt.sfdisk-vda.json"))).unwrap();
        assert_eq!(l2.filesystems.len(), 2);
        assert_eq!(l2.filesystems[..], l.filesystems[..2]);
    }

    #[test]
    fn nvme_disk() {
        let p = probe(
            "/",
            fixture!("nvme.lsblk.json"),
            fixture!("nvme.mountinfo"),
            fixture!("nvme.fstab"),
            true,
        );
        let l = build_layout(&p, |d| {
            assert_eq!(d, "nvme0n1");
            parse_sfdisk(fixture!("nvme.sfdisk-nvme0n1.json"))
        })
        .unwrap();
        // The USB stick mounted below /media is not part of the node.
        assert_eq!(l.disks.len(), 1);
        let d = &l.disks[0];
        assert_eq!(d.name, "nvme0n1");
        assert_eq!(d.partitions.len(), 3);
        assert!(d.partitions[2].grow);
        assert_eq!(d.partitions[1].ptype, GUID_LINUX);
        let fs: Vec<_> = l
            .filesystems
            .iter()
            .map(|f| {
                (
                    f.device.as_str(),
                    f.fstype.as_str(),
                    f.mountpoint.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            fs,
            vec![
                ("nvme0n1p2", "ext4", Some("/")),
                ("nvme0n1p1", "vfat", Some("/boot/efi")),
                ("nvme0n1p3", "xfs", Some("/home")),
            ]
        );
        // /home's options come from mountinfo when fstab does not list it.
        assert_eq!(l.filesystems[2].options.as_deref(), Some("rw,noatime"));
        Layout::parse(&l.to_toml()).unwrap();
    }

    #[test]
    fn roots_that_are_not_on_a_disk_are_errors() {
        let lsblk = fixture!("uefi-gpt.lsblk.json");
        let fstab = fixture!("uefi-gpt.fstab");
        let mi = "21 1 0:20 / / rw,relatime - overlay overlay rw,lowerdir=/a,upperdir=/b\n";
        let e = build_layout(&probe("/", lsblk, mi, fstab, false), |_| unreachable!()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("overlay") && msg.contains("--layout FILE"),
            "{msg}"
        );

        let mi = "21 1 0:20 / / rw - tmpfs tmpfs rw\n";
        let msg = format!(
            "{:#}",
            build_layout(&probe("/", lsblk, mi, fstab, false), |_| unreachable!()).unwrap_err()
        );
        assert!(
            msg.contains("tmpfs") && msg.contains("--layout FILE"),
            "{msg}"
        );

        // A plain directory is not a root filesystem.
        let mi = fixture!("uefi-gpt.mountinfo");
        let msg = format!(
            "{:#}",
            build_layout(
                &probe("/srv/tree", lsblk, mi, fstab, false),
                |_| unreachable!()
            )
            .unwrap_err()
        );
        assert!(
            msg.contains("not the mount point") && msg.contains("--layout FILE"),
            "{msg}"
        );

        // Whole-disk, encrypted and RAID 5 filesystems cannot be described.
        let lsblk_crypt = r#"{"blockdevices": [
          {"name": "sda", "type": "disk", "size": 1000000000, "mountpoints": [null], "children": [
            {"name": "sda1", "type": "part", "size": 999000000, "pkname": "sda", "fstype": "crypto_LUKS", "mountpoints": [null], "children": [
              {"name": "root", "type": "crypt", "size": 900000000, "pkname": "sda1", "fstype": "ext4", "mountpoints": ["/"]}]}]}]}"#;
        let mi = "21 1 253:0 / / rw,relatime - ext4 /dev/mapper/root rw\n";
        let msg = format!(
            "{:#}",
            build_layout(&probe("/", lsblk_crypt, mi, "", false), |_| unreachable!()).unwrap_err()
        );
        assert!(
            msg.contains("crypt device") && msg.contains("--layout FILE"),
            "{msg}"
        );
        let lsblk_r5 = lsblk_crypt.replace("\"crypt\"", "\"raid5\"");
        let msg = format!(
            "{:#}",
            build_layout(&probe("/", &lsblk_r5, mi, "", false), |_| unreachable!()).unwrap_err()
        );
        assert!(msg.contains("md RAID 1 only"), "{msg}");
        let lsblk_whole = r#"{"blockdevices": [{"name": "vda", "type": "disk", "size": 1000, "fstype": null, "mountpoints": ["/"]}]}"#;
        let mi = "21 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n";
        let msg = format!(
            "{:#}",
            build_layout(&probe("/", lsblk_whole, mi, "", false), |_| unreachable!()).unwrap_err()
        );
        assert!(
            msg.contains("without a partition table") && msg.contains("--layout FILE"),
            "{msg}"
        );
    }

    /// A golden node on two disks: /boot on md RAID 1, an LVM volume group on a second
    /// mirror holding /, swap and /home.
    #[test]
    fn raid1_and_lvm_are_recorded() {
        let mut p = probe(
            "/",
            fixture!("raid-lvm.lsblk.json"),
            fixture!("raid-lvm.mountinfo"),
            fixture!("raid-lvm.fstab"),
            false,
        );
        p.swaps = vec!["/dev/mapper/vg0-swap".into()];
        let l = build_layout(&p, |d| match d {
            "sda" => parse_sfdisk(fixture!("raid-lvm.sfdisk-sda.json")),
            "sdb" => parse_sfdisk(fixture!("raid-lvm.sfdisk-sdb.json")),
            other => panic!("{other}"),
        })
        .unwrap();
        assert_eq!(l.format, 2);
        let names: Vec<_> = l.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["sda", "sdb"]);
        assert!(l.disks[0].partitions[1].flags.contains(&"raid".to_string()));
        let raids: Vec<_> = l
            .raids
            .iter()
            .map(|r| (r.name.as_str(), r.level, r.members.clone()))
            .collect();
        assert_eq!(
            raids,
            [
                ("md1", 1, vec!["sda3".to_string(), "sdb3".to_string()]),
                ("md0", 1, vec!["sda2".to_string(), "sdb2".to_string()]),
            ]
        );
        assert_eq!(l.vgs.len(), 1);
        let vg = &l.vgs[0];
        assert_eq!(
            (vg.name.as_str(), vg.pvs.clone()),
            ("vg0", vec!["md1".to_string()])
        );
        let lvs: Vec<_> = vg
            .lvs
            .iter()
            .map(|v| (v.name.as_str(), v.size, v.grow))
            .collect();
        assert_eq!(
            lvs,
            [
                ("root", 8 << 30, false),
                ("swap", 1 << 30, false),
                ("home", 0, true)
            ]
        );
        let fs: Vec<_> = l
            .filesystems
            .iter()
            .map(|f| {
                (
                    f.device.as_str(),
                    f.fstype.as_str(),
                    f.mountpoint.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            fs,
            [
                ("vg0/root", "ext4", Some("/")),
                ("md0", "ext4", Some("/boot")),
                ("vg0/home", "ext4", Some("/home")),
                ("vg0/swap", "swap", None),
            ]
        );
        // What is recorded parses back.
        assert_eq!(Layout::parse(&l.to_toml()).unwrap(), l);
        assert_eq!(
            split_dm_name("my--vg-lv--x"),
            Some(("my-vg".into(), "lv-x".into()))
        );
        assert_eq!(split_dm_name("nodash"), None);
    }

    #[test]
    fn parsers() {
        let m = parse_mountinfo(
            "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n",
        )
        .unwrap();
        assert_eq!(m[0].mountpoint, "/mnt two");
        assert_eq!(m[0].fs_root, "/mnt1");
        assert_eq!(
            (m[0].fstype.as_str(), m[0].source.as_str()),
            ("ext3", "/dev/root")
        );
        assert!(parse_mountinfo("garbage\n").is_err());
        let f = parse_fstab(
            "# c\n\nUUID=x /data\\040x ext4 defaults,noatime 0 2\n/dev/sdb1 none swap\n",
        );
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].file, "/data x");
        assert_eq!(f[1].options, "defaults");
        assert!(parse_sfdisk(r#"{"partitiontable": {"label": "sun", "partitions": []}}"#).is_err());
        let old = parse_lsblk(r#"{"blockdevices": [{"name": "sda", "type": "disk", "size": "42", "mountpoint": "/x"}]}"#).unwrap();
        assert_eq!((old[0].size, old[0].mountpoints[0].as_str()), (42, "/x"));
        let b = parse_blkid_export(
            "DEVNAME=/dev/loop1\nLABEL=my\\ disk\nUUID=96353574-8e6b\nBLOCK_SIZE=1024\nTYPE=ext4\n",
        );
        assert_eq!(
            b,
            (
                Some("ext4".into()),
                Some("my disk".into()),
                Some("96353574-8e6b".into())
            )
        );
    }

    #[test]
    fn scripts_for_sfdisk() {
        let l = Layout::parse(include_str!("../../images/layouts/uefi-gpt.toml")).unwrap();
        let s = sfdisk_script(&l.disks[0], 8 << 30, 512).unwrap();
        assert_eq!(
            s,
            format!(
                "label: gpt\nunit: sectors\n\n\
                 part1 : size=1048576, type={GUID_ESP}, name=\"EFI\"\n\
                 part2 : size=4194304, type={GUID_LINUX_SWAP}, name=\"swap\"\n\
                 part3 : type={GUID_LINUX}, name=\"root\"\n"
            )
        );
        let e = sfdisk_script(&l.disks[0], 1 << 30, 512).unwrap_err();
        assert!(e.to_string().contains("need at least"), "{e}");

        let l = Layout::parse(include_str!("../../images/layouts/bios-msdos.toml")).unwrap();
        let s = sfdisk_script(&l.disks[0], 8 << 30, 512).unwrap();
        assert_eq!(
            s,
            "label: dos\nunit: sectors\n\npart1 : size=1048576, type=83, bootable\npart2 : type=05\npart5 : size=4194304, type=82\npart6 : type=83\n"
        );
    }

    #[test]
    fn sample_layouts_parse() {
        for (text, fw) in [
            (
                include_str!("../../images/layouts/bios-msdos.toml"),
                Firmware::Bios,
            ),
            (
                include_str!("../../images/layouts/uefi-gpt.toml"),
                Firmware::Uefi,
            ),
        ] {
            let l = Layout::parse(text).unwrap();
            assert_eq!(l.firmware, fw);
            assert_eq!(
                l.filesystems
                    .iter()
                    .filter(|f| f.mountpoint.as_deref() == Some("/"))
                    .count(),
                1
            );
            assert_eq!(Layout::parse(&l.to_toml()).unwrap(), l);
        }
    }
}
