//! The declarative disk layout of an image, recorded by `si-prepareclient` and used by the
//! installer to partition and format a node's disks.
//!
//! It is a TOML file (format [`LAYOUT_FORMAT`]); an example, with every field:
//!
//! ```toml
//! format = 1
//! firmware = "uefi"            # "bios" or "uefi": how the golden node boots
//! bootloader = "grub"          # bootloader to install on the node
//!
//! [[disk]]
//! name = "sda"                 # kernel name on the golden node (the installer maps disks by order)
//! table = "gpt"                # "gpt" or "msdos"
//! size = 21474836480           # bytes, informative: the last partition may `grow`
//!
//! [[disk.partition]]
//! number = 1
//! size = 536870912             # bytes
//! type = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"  # GPT type GUID or MBR type byte ("0x83")
//! name = "EFI"                 # GPT partition name (optional)
//! flags = ["esp"]              # "boot", "esp", "bios_grub", "lvm", "raid", "swap"
//!
//! [[disk.partition]]
//! number = 2
//! size = 0
//! grow = true                  # take the rest of the disk
//! type = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
//!
//! [[filesystem]]
//! device = "sda1"              # "<disk name><partition number>" (nvme: "nvme0n1p1")
//! type = "vfat"                # ext2/3/4, xfs, btrfs, vfat, swap
//! label = "EFI"
//! uuid = "ABCD-1234"           # optional: keep the golden node's UUID
//! mountpoint = "/boot/efi"
//! options = "umask=0077"
//! ```
//!
//! Format 2 adds, and format 1 files keep parsing:
//!
//! - `[disk.select]`: how the installer picks the physical disk for a layout disk (serial, wwn,
//!   by-path, min-size / max-size, rotational, transport, pick = "smallest" | "largest"; the
//!   layout disk's order among the node's candidate disks is the last fallback);
//! - `percent` on a partition or a logical volume: that share of the disk (or volume group);
//! - `[[raid]]`: md RAID 1 arrays, `members` naming layout partitions (`"sda2"`);
//! - `[[vg]]` with `[[vg.lv]]`: LVM volume groups on partitions or arrays, and their logical
//!   volumes (fixed `size`, `percent` or `grow`); a filesystem on one names it `"VG/LV"`.
//!
//! ```toml
//! format = 2
//! firmware = "uefi"
//!
//! [[disk]]
//! name = "a"
//! table = "gpt"
//! select = { transport = "virtio", pick = "smallest" }
//! [[disk.partition]]
//! number = 1
//! size = 268435456
//! type = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
//! flags = ["esp"]
//! [[disk.partition]]
//! number = 2
//! size = 0
//! grow = true
//! type = "A19D880F-05FC-4D3B-A006-743F0F84911E"
//! flags = ["raid"]
//!
//! [[raid]]
//! name = "md0"
//! level = 1
//! members = ["a2"]
//!
//! [[vg]]
//! name = "sys"
//! pvs = ["md0"]
//! [[vg.lv]]
//! name = "root"
//! percent = 50
//! [[vg.lv]]
//! name = "swap"
//! size = 268435456
//! [[vg.lv]]
//! name = "var"
//! grow = true
//!
//! [[filesystem]]
//! device = "sys/root"
//! type = "ext4"
//! mountpoint = "/"
//! ```

use serde::{Deserialize, Serialize};

/// The format this build writes; it reads [`OLDEST_LAYOUT_FORMAT`] and later.
pub const LAYOUT_FORMAT: u32 = 2;
pub const OLDEST_LAYOUT_FORMAT: u32 = 1;
/// Bounds on what a layout may hold (a layout comes from the network or a file).
pub const MAX_DISKS: usize = 64;
pub const MAX_PARTITIONS: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    Bios,
    Uefi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Table {
    Gpt,
    Msdos,
}

impl Table {
    /// Whether a partition of this type is an msdos extended partition (`0x05`, `0x0f`,
    /// `0x85`): a container of the logical partitions (numbers 5 and up), holding no
    /// filesystem.
    pub fn is_extended(self, ptype: &str) -> bool {
        self == Table::Msdos
            && matches!(
                ptype.trim_start_matches("0x").to_ascii_lowercase().as_str(),
                "5" | "05" | "f" | "0f" | "85"
            )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Layout {
    pub format: u32,
    pub firmware: Firmware,
    #[serde(default)]
    pub bootloader: Option<String>,
    #[serde(default, rename = "disk")]
    pub disks: Vec<Disk>,
    #[serde(default, rename = "raid", skip_serializing_if = "Vec::is_empty")]
    pub raids: Vec<Raid>,
    #[serde(default, rename = "vg", skip_serializing_if = "Vec::is_empty")]
    pub vgs: Vec<VolumeGroup>,
    #[serde(default, rename = "filesystem")]
    pub filesystems: Vec<Filesystem>,
}

/// How the installer chooses the physical disk for a layout disk. Every given field must
/// match; among the disks that match, `pick` chooses (none: the first in kernel order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn: Option<String>,
    /// A name under /dev/disk/by-path (`pci-0000:00:05.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotational: Option<bool>,
    /// `nvme`, `sata`, `sas`, `virtio`, `usb`, `mmc`, `loop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pick: Option<Pick>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pick {
    /// The smallest disk that matches (and fits the layout disk).
    Smallest,
    /// The largest disk that matches.
    Largest,
}

/// An md array (RAID 1 only: the installer mirrors boot and system disks).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Raid {
    /// `md0`, `md1`, ...
    pub name: String,
    pub level: u32,
    /// Layout partitions (`"a2"`, `"b2"`).
    pub members: Vec<String>,
    /// mdadm metadata version (default 1.2; 1.0 for an ESP or /boot read by firmware).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VolumeGroup {
    pub name: String,
    /// Layout partitions or arrays.
    pub pvs: Vec<String>,
    #[serde(default, rename = "lv")]
    pub lvs: Vec<LogicalVolume>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogicalVolume {
    pub name: String,
    /// Bytes (rounded up to the extent size).
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default)]
    pub grow: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Disk {
    pub name: String,
    pub table: Table,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<Selector>,
    #[serde(default, rename = "partition")]
    pub partitions: Vec<Partition>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Partition {
    pub number: u32,
    #[serde(default)]
    pub size: u64,
    /// Format 2: this share of the disk instead of a fixed size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default)]
    pub grow: bool,
    #[serde(rename = "type")]
    pub ptype: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub flags: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Filesystem {
    pub device: String,
    #[serde(rename = "type")]
    pub fstype: String,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub mountpoint: Option<String>,
    #[serde(default)]
    pub options: Option<String>,
}

impl Layout {
    pub fn parse(s: &str) -> Result<Layout, String> {
        let l: Layout = toml::from_str(s).map_err(|e| format!("disk layout: {e}"))?;
        if !(OLDEST_LAYOUT_FORMAT..=LAYOUT_FORMAT).contains(&l.format) {
            return Err(format!(
                "disk layout format {} is not supported (this build reads {OLDEST_LAYOUT_FORMAT} to {LAYOUT_FORMAT})",
                l.format
            ));
        }
        if l.format < 2 {
            let v2 = !l.raids.is_empty()
                || !l.vgs.is_empty()
                || l.disks.iter().any(|d| {
                    d.select.is_some() || d.partitions.iter().any(|p| p.percent.is_some())
                });
            if v2 {
                return Err(
                    "disk layout format 1 has no select, percent, raid or vg: write format = 2"
                        .into(),
                );
            }
        }
        l.check()?;
        Ok(l)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("layout serializes")
    }

    /// Consistency checks: unique partition numbers, one `grow` partition at most and last,
    /// filesystems on existing partitions, one root mount point.
    pub fn check(&self) -> Result<(), String> {
        if self.disks.len() > MAX_DISKS {
            return Err(format!("more than {MAX_DISKS} disks"));
        }
        let mut names: Vec<&str> = self.disks.iter().map(|d| d.name.as_str()).collect();
        names.sort();
        names.dedup();
        if names.len() != self.disks.len() {
            return Err("duplicate disk names".into());
        }
        for d in &self.disks {
            check_name("disk", &d.name)?;
            if d.partitions.len() > MAX_PARTITIONS {
                return Err(format!(
                    "disk {}: more than {MAX_PARTITIONS} partitions",
                    d.name
                ));
            }
            let pct: u32 = d.partitions.iter().filter_map(|p| p.percent).sum();
            if pct > 100 {
                return Err(format!(
                    "disk {}: partition percentages add up to {pct}",
                    d.name
                ));
            }
            for p in &d.partitions {
                if p.percent == Some(0) || (p.percent.is_some() && p.grow) {
                    return Err(format!(
                        "disk {} partition {}: percent must be 1-100 and not with grow",
                        d.name, p.number
                    ));
                }
            }
            let mut nums: Vec<u32> = d.partitions.iter().map(|p| p.number).collect();
            nums.sort();
            nums.dedup();
            if nums.len() != d.partitions.len() {
                return Err(format!("disk {}: duplicate partition numbers", d.name));
            }
            let grows = d.partitions.iter().filter(|p| p.grow).count();
            if grows > 1 || (grows == 1 && !d.partitions.last().is_some_and(|p| p.grow)) {
                return Err(format!("disk {}: only the last partition may grow", d.name));
            }
        }
        let is_part = |dev: &str| {
            self.disks.iter().any(|d| {
                d.partitions
                    .iter()
                    .any(|p| partition_device(&d.name, p.number) == dev)
            })
        };
        let mut used: Vec<&str> = Vec::new();
        for r in &self.raids {
            check_name("array", &r.name)?;
            if r.level != 1 {
                return Err(format!("array {}: only RAID level 1 is supported", r.name));
            }
            if r.members.is_empty() {
                return Err(format!("array {}: no members", r.name));
            }
            for m in &r.members {
                if !is_part(m) {
                    return Err(format!(
                        "array {}: member {m} is not a layout partition",
                        r.name
                    ));
                }
                used.push(m);
            }
        }
        let is_array = |dev: &str| self.raids.iter().any(|r| r.name == dev);
        for vg in &self.vgs {
            check_name("volume group", &vg.name)?;
            for pv in &vg.pvs {
                if !is_part(pv) && !is_array(pv) {
                    return Err(format!(
                        "volume group {}: {pv} is neither a layout partition nor an array",
                        vg.name
                    ));
                }
                used.push(pv);
            }
            let grows = vg.lvs.iter().filter(|l| l.grow).count();
            let pct: u32 = vg.lvs.iter().filter_map(|l| l.percent).sum();
            if grows > 1 || pct > 100 {
                return Err(format!(
                    "volume group {}: at most one growing volume and 100 percent",
                    vg.name
                ));
            }
            for lv in &vg.lvs {
                check_name("logical volume", &lv.name)?;
                if !lv.grow && lv.percent.is_none() && lv.size == 0 {
                    return Err(format!("volume {}/{}: no size", vg.name, lv.name));
                }
            }
        }
        let is_lv = |dev: &str| {
            dev.split_once('/').is_some_and(|(v, l)| {
                self.vgs
                    .iter()
                    .any(|g| g.name == v && g.lvs.iter().any(|x| x.name == l))
            })
        };
        let mut roots = 0;
        for f in &self.filesystems {
            if f.mountpoint.as_deref() == Some("/") {
                roots += 1;
            }
            let known = is_part(&f.device)
                || is_array(&f.device)
                || is_lv(&f.device)
                || self.disks.iter().any(|d| d.name == f.device);
            if !known && !self.disks.is_empty() {
                return Err(format!("filesystem on unknown device {}", f.device));
            }
            used.push(&f.device);
            if let Some(m) = &f.mountpoint {
                if !m.starts_with('/') || m.split('/').any(|c| c == ".." || c == ".") {
                    return Err(format!("filesystem on {}: bad mount point {m:?}", f.device));
                }
            }
        }
        let mut sorted = used.clone();
        sorted.sort();
        for w in sorted.windows(2) {
            if w[0] == w[1] {
                return Err(format!("device {} is used twice", w[0]));
            }
        }
        if roots > 1 {
            return Err("more than one filesystem mounted on /".into());
        }
        Ok(())
    }
}

/// Names become device paths and command arguments: letters, digits, `_`, `-`, `.`, not
/// starting with `-` or `.`.
fn check_name(what: &str, n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && !n.starts_with(['-', '.'])
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!("bad {what} name {n:?}"))
    }
}

/// The kernel name of partition `n` of disk `disk` (`sda` → `sda1`, `nvme0n1` → `nvme0n1p1`).
pub fn partition_device(disk: &str, n: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{n}")
    } else {
        format!("{disk}{n}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example_parses() {
        let doc = include_str!("layout.rs");
        let start = doc.find("//! format = 1").unwrap();
        let end = doc[start..].find("//! ```").unwrap() + start;
        let text: String = doc[start..end]
            .lines()
            .map(|l| l.trim_start_matches("//!").strip_prefix(' ').unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let l = Layout::parse(&text).unwrap();
        assert_eq!(l.firmware, Firmware::Uefi);
        assert_eq!(l.disks[0].partitions.len(), 2);
        assert_eq!(l.filesystems[0].mountpoint.as_deref(), Some("/boot/efi"));
        assert_eq!(Layout::parse(&l.to_toml()).unwrap(), l);
    }

    #[test]
    fn format_2_example_parses_and_checks() {
        let doc = include_str!("layout.rs");
        let start = doc.find("//! format = 2").unwrap();
        let end = doc[start..].find("//! ```").unwrap() + start;
        let text: String = doc[start..end]
            .lines()
            .map(|l| l.trim_start_matches("//!").strip_prefix(' ').unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let l = Layout::parse(&text).unwrap();
        assert_eq!(l.raids[0].members, ["a2"]);
        assert_eq!(l.vgs[0].lvs.len(), 3);
        assert_eq!(
            l.disks[0].select.as_ref().unwrap().pick,
            Some(Pick::Smallest)
        );
        assert_eq!(Layout::parse(&l.to_toml()).unwrap(), l);
        // Refusals name what is wrong.
        let e = Layout::parse(&text.replace("members = [\"a2\"]", "members = [\"a9\"]"));
        assert!(e.unwrap_err().contains("member a9"));
        let e = Layout::parse(&text.replace("level = 1", "level = 5"));
        assert!(e.unwrap_err().contains("RAID level 1"));
        let e = Layout::parse(&text.replace("device = \"sys/root\"", "device = \"sys/nope\""));
        assert!(e.unwrap_err().contains("unknown device sys/nope"));
        let e = Layout::parse(&text.replace("pvs = [\"md0\"]", "pvs = [\"a2\"]"));
        assert!(e.unwrap_err().contains("used twice"));
        let e = Layout::parse(&text.replace("format = 2", "format = 1"));
        assert!(e.unwrap_err().contains("format = 2"));
        let e = Layout::parse(&text.replace("name = \"sys\"", "name = \"../x\""));
        assert!(e.unwrap_err().contains("bad volume group name"));
    }

    #[test]
    fn rejects_inconsistent_layouts() {
        assert!(Layout::parse("format = 3\nfirmware = \"bios\"").is_err());
        assert!(Layout::parse("format = 1\nfirmware = \"bios\"\nbogus = 1").is_err());
        let bad = r#"
format = 1
firmware = "bios"
[[disk]]
name = "sda"
table = "msdos"
[[disk.partition]]
number = 1
size = 0
grow = true
type = "0x83"
[[disk.partition]]
number = 2
size = 10
type = "0x82"
"#;
        assert!(Layout::parse(bad).unwrap_err().contains("grow"));
        assert_eq!(partition_device("nvme0n1", 2), "nvme0n1p2");
        assert_eq!(partition_device("vda", 2), "vda2");
    }
}
