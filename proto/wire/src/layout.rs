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

use serde::{Deserialize, Serialize};

pub const LAYOUT_FORMAT: u32 = 1;

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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Layout {
    pub format: u32,
    pub firmware: Firmware,
    #[serde(default)]
    pub bootloader: Option<String>,
    #[serde(default, rename = "disk")]
    pub disks: Vec<Disk>,
    #[serde(default, rename = "filesystem")]
    pub filesystems: Vec<Filesystem>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Disk {
    pub name: String,
    pub table: Table,
    #[serde(default)]
    pub size: u64,
    #[serde(default, rename = "partition")]
    pub partitions: Vec<Partition>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Partition {
    pub number: u32,
    pub size: u64,
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
        if l.format != LAYOUT_FORMAT {
            return Err(format!(
                "disk layout format {} is not supported (this build reads {LAYOUT_FORMAT})",
                l.format
            ));
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
        for d in &self.disks {
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
        let mut roots = 0;
        for f in &self.filesystems {
            if f.mountpoint.as_deref() == Some("/") {
                roots += 1;
            }
            let known = self.disks.iter().any(|d| {
                d.partitions
                    .iter()
                    .any(|p| partition_device(&d.name, p.number) == f.device)
            }) || self.disks.iter().any(|d| d.name == f.device);
            if !known && !self.disks.is_empty() {
                return Err(format!("filesystem on unknown device {}", f.device));
            }
        }
        if roots > 1 {
            return Err("more than one filesystem mounted on /".into());
        }
        Ok(())
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
    fn rejects_inconsistent_layouts() {
        assert!(Layout::parse("format = 2\nfirmware = \"bios\"").is_err());
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
