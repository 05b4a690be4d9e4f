//! The install plan made concrete for this node: which physical disk gets which layout disk,
//! every partition's start and size (aligned to 1 MiB), the arrays, volume groups and
//! filesystems, the mount order, and the boot loader work. Computed and printed before
//! anything is written.

use crate::disks::{min_size, PhysDisk};
use anyhow::{bail, Result};
use serde::Serialize;
use si_proto::layout::{partition_device, Firmware, Layout, Table};
use std::fmt::Write as _;

pub const MIB: u64 = 1 << 20;

/// The msdos extended partition of a layout disk with logical partitions: the one the layout
/// records, or one the installer adds in the first free primary slot.
struct Extended {
    number: u32,
    ptype: String,
    added: bool,
    logicals: u64,
}

impl Extended {
    fn of(ld: &si_proto::layout::Disk) -> Result<Option<Extended>> {
        let logicals = ld.partitions.iter().filter(|p| p.number > 4).count() as u64;
        if ld.table != Table::Msdos {
            return Ok(None);
        }
        let recorded: Vec<_> = ld
            .partitions
            .iter()
            .filter(|p| ld.table.is_extended(&p.ptype))
            .collect();
        match (logicals, recorded.as_slice()) {
            (0, []) => Ok(None),
            (0, [e, ..]) => bail!(
                "layout disk {}: extended partition {} holds no logical partition",
                ld.name,
                e.number
            ),
            (_, [e]) if e.number <= 4 => Ok(Some(Extended {
                number: e.number,
                ptype: e.ptype.clone(),
                added: false,
                logicals,
            })),
            (_, [e]) => bail!(
                "layout disk {}: extended partition {} must be a primary one (1-4)",
                ld.name,
                e.number
            ),
            (_, []) => {
                let free = (1..=4).find(|n| ld.partitions.iter().all(|p| p.number != *n));
                let Some(number) = free else {
                    bail!(
                        "layout disk {}: four primary partitions leave no slot for the extended one its logical partitions need",
                        ld.name
                    );
                };
                Ok(Some(Extended {
                    number,
                    ptype: "0x05".into(),
                    added: true,
                    logicals,
                }))
            }
            (_, _) => bail!("layout disk {}: more than one extended partition", ld.name),
        }
    }
}
pub const GUID_BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
pub const GUID_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

#[derive(Clone, Debug, Serialize)]
pub struct PartPlan {
    pub number: u32,
    /// The layout's device name (`a2`): what arrays, volume groups and filesystems refer to.
    pub layout_dev: String,
    pub start: u64,
    pub size: u64,
    pub ptype: String,
    pub name: Option<String>,
    pub flags: Vec<String>,
    /// Added by the installer: a BIOS boot partition on GPT for a BIOS node, or the msdos
    /// extended partition the logical ones need when the layout has none.
    pub added: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiskPlan {
    pub layout_disk: String,
    pub disk: String,
    pub size: u64,
    pub sector_size: u64,
    pub table: Table,
    pub wipe: Vec<String>,
    pub partitions: Vec<PartPlan>,
}

/// One filesystem to make and (unless swap) mount.
#[derive(Clone, Debug, Serialize)]
pub struct FsPlan {
    /// Layout device: partition (`a2`), array (`md0`), logical volume (`vg/lv`).
    pub device: String,
    pub fstype: String,
    pub label: Option<String>,
    pub mountpoint: Option<String>,
    pub options: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Concrete {
    pub firmware: Firmware,
    pub disks: Vec<DiskPlan>,
    pub raids: Vec<si_proto::layout::Raid>,
    pub vgs: Vec<si_proto::layout::VolumeGroup>,
    /// In mount order (parents before children); swap last.
    pub filesystems: Vec<FsPlan>,
}

fn round_mib(n: u64) -> u64 {
    n.div_ceil(MIB) * MIB
}

impl Concrete {
    /// Lays `layout` out on the disks [`crate::disks::assign`] chose, for a node booting with
    /// `firmware`.
    pub fn new(layout: &Layout, chosen: &[PhysDisk], firmware: Firmware) -> Result<Concrete> {
        if chosen.len() != layout.disks.len() {
            bail!(
                "{} layout disks, {} disks chosen",
                layout.disks.len(),
                chosen.len()
            );
        }
        let mut disks = Vec::new();
        for (ld, pd) in layout.disks.iter().zip(chosen) {
            let need = min_size(ld);
            if pd.size < need {
                bail!(
                    "disk {} is too small for layout disk {}: it has {} bytes, the layout needs at least {need}",
                    pd.name, ld.name, pd.size
                );
            }
            let ext = Extended::of(ld)?;
            let mut parts: Vec<(u32, u64, &si_proto::layout::Partition)> = Vec::new();
            // Sizes: fixed, then percent of the disk, then the growing one takes the rest. An
            // extended partition takes its size from its logical partitions, each of which
            // starts 1 MiB into its own stretch (its boot record, aligned).
            let usable = (pd.size / MIB) * MIB - 2 * MIB;
            let mut used = ext.as_ref().map_or(0, |e| e.logicals * MIB);
            for p in &ld.partitions {
                if ld.table.is_extended(&p.ptype) {
                    continue;
                }
                let size = match p.percent {
                    Some(pct) => ((pd.size / 100 * u64::from(pct)) / MIB * MIB).max(MIB),
                    None if p.grow => 0,
                    None => round_mib(p.size),
                };
                used += size;
                parts.push((p.number, size, p));
            }
            let needs_bios_boot = firmware == Firmware::Bios
                && ld.table == Table::Gpt
                && !ld
                    .partitions
                    .iter()
                    .any(|p| p.flags.iter().any(|f| f == "bios_grub"))
                && holds_boot(layout, &ld.name);
            if needs_bios_boot {
                used += MIB;
            }
            if used
                + if ld.partitions.iter().any(|p| p.grow) {
                    MIB
                } else {
                    0
                }
                > usable
            {
                bail!(
                    "disk {} is too small for layout disk {}: its partitions need {} bytes, {} are usable",
                    pd.name, ld.name, used, usable
                );
            }
            let mut start = MIB;
            let mut out = Vec::new();
            if needs_bios_boot {
                let n = ld.partitions.iter().map(|p| p.number).max().unwrap_or(0) + 1;
                out.push(PartPlan {
                    number: n,
                    layout_dev: partition_device(&ld.name, n),
                    start,
                    size: MIB,
                    ptype: GUID_BIOS_BOOT.into(),
                    name: None,
                    flags: vec!["bios_grub".into()],
                    added: true,
                });
                start += MIB;
            }
            // Primaries first, in number order; then the extended partition, holding the
            // logical ones, at the end of the disk (their place on the disk need not follow
            // their numbers).
            let mut logical = Vec::new();
            for (number, size, p) in parts {
                let size = if p.grow { usable - used } else { size };
                let plan = PartPlan {
                    number,
                    layout_dev: partition_device(&ld.name, number),
                    start,
                    size,
                    ptype: p.ptype.clone(),
                    name: p.name.clone(),
                    flags: p.flags.clone(),
                    added: false,
                };
                if number > 4 && ext.is_some() {
                    logical.push(plan);
                } else {
                    out.push(plan);
                    start += size;
                }
            }
            if let Some(e) = &ext {
                let ext_start = start;
                for l in &mut logical {
                    start += MIB;
                    l.start = start;
                    start += l.size;
                }
                out.push(PartPlan {
                    number: e.number,
                    layout_dev: partition_device(&ld.name, e.number),
                    start: ext_start,
                    size: start - ext_start,
                    ptype: e.ptype.clone(),
                    name: None,
                    flags: vec![],
                    added: e.added,
                });
                out.extend(logical);
            }
            let mut wipe = vec![pd.name.clone()];
            wipe.extend(pd.holders.iter().cloned());
            disks.push(DiskPlan {
                layout_disk: ld.name.clone(),
                disk: pd.name.clone(),
                size: pd.size,
                sector_size: pd.sector_size,
                table: ld.table,
                wipe,
                partitions: out,
            });
        }
        if firmware == Firmware::Uefi
            && !disks
                .iter()
                .any(|d| d.partitions.iter().any(|p| is_esp(d.table, p)))
        {
            bail!("the node boots UEFI but the layout has no EFI system partition");
        }
        let mut filesystems: Vec<FsPlan> = layout
            .filesystems
            .iter()
            .map(|f| FsPlan {
                device: f.device.clone(),
                fstype: f.fstype.clone(),
                label: f.label.clone(),
                mountpoint: f.mountpoint.clone().filter(|_| f.fstype != "swap"),
                options: f.options.clone(),
            })
            .collect();
        filesystems.sort_by_key(mount_key);
        if !filesystems
            .iter()
            .any(|f| f.mountpoint.as_deref() == Some("/"))
        {
            bail!("the layout mounts nothing on /");
        }
        Ok(Concrete {
            firmware,
            disks,
            raids: layout.raids.clone(),
            vgs: layout.vgs.clone(),
            filesystems,
        })
    }

    /// The disk's partitions that hold data: all but an msdos extended partition.
    pub fn data_partitions(d: &DiskPlan) -> impl Iterator<Item = &PartPlan> {
        d.partitions
            .iter()
            .filter(|p| !d.table.is_extended(&p.ptype))
    }

    /// The physical disk (`/dev` name) holding layout partition `layout_dev`, and its number.
    pub fn partition_of(&self, layout_dev: &str) -> Option<(&DiskPlan, &PartPlan)> {
        self.disks.iter().find_map(|d| {
            d.partitions
                .iter()
                .find(|p| p.layout_dev == layout_dev)
                .map(|p| (d, p))
        })
    }

    /// The physical disks under a layout device (through arrays and volume groups).
    pub fn disks_under(&self, dev: &str) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_disks(dev, &mut out, 0);
        out.sort();
        out.dedup();
        out
    }

    fn collect_disks(&self, dev: &str, out: &mut Vec<String>, depth: usize) {
        if depth > 8 {
            return;
        }
        if let Some((d, _)) = self.partition_of(dev) {
            out.push(d.disk.clone());
        } else if let Some(r) = self.raids.iter().find(|r| r.name == dev) {
            for m in &r.members {
                self.collect_disks(m, out, depth + 1);
            }
        } else if let Some((vg, _)) = dev.split_once('/') {
            if let Some(g) = self.vgs.iter().find(|g| g.name == vg) {
                for pv in &g.pvs {
                    self.collect_disks(pv, out, depth + 1);
                }
            }
        }
    }

    /// The disks grub-install writes to on a BIOS node: every disk holding /boot (or /).
    pub fn boot_disks(&self) -> Vec<String> {
        let boot = self
            .filesystems
            .iter()
            .find(|f| f.mountpoint.as_deref() == Some("/boot"))
            .or_else(|| {
                self.filesystems
                    .iter()
                    .find(|f| f.mountpoint.as_deref() == Some("/"))
            });
        boot.map(|f| self.disks_under(&f.device))
            .unwrap_or_default()
    }

    /// The EFI system partitions (layout devices) on a UEFI node: one per disk of a mirror.
    pub fn esps(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        for d in &self.disks {
            for p in &d.partitions {
                if is_esp(d.table, p) {
                    out.push((d.disk.clone(), p.number));
                }
            }
        }
        out
    }

    /// The human-readable plan, printed and recorded before anything is written.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "firmware: {:?}", self.firmware);
        for d in &self.disks {
            let _ = writeln!(
                s,
                "disk /dev/{} ({} bytes) <- layout disk {}: {:?} table; wiped: {}",
                d.disk,
                d.size,
                d.layout_disk,
                d.table,
                d.wipe.join(", ")
            );
            for p in &d.partitions {
                let _ = writeln!(
                    s,
                    "  partition {:>2} ({}): start {} MiB, size {} MiB, type {}{}{}",
                    p.number,
                    p.layout_dev,
                    p.start / MIB,
                    p.size / MIB,
                    p.ptype,
                    if p.flags.is_empty() {
                        String::new()
                    } else {
                        format!(", flags {}", p.flags.join(","))
                    },
                    match (p.added, d.table.is_extended(&p.ptype)) {
                        (false, _) => "",
                        (true, true) => " (added: extended, holding the logical partitions)",
                        (true, false) => " (added: BIOS boot on GPT)",
                    }
                );
            }
        }
        for r in &self.raids {
            let _ = writeln!(
                s,
                "md RAID {} {} <- {}",
                r.level,
                crate::steps::md_path(&r.name).display(),
                r.members.join(" + ")
            );
        }
        for g in &self.vgs {
            let _ = writeln!(s, "LVM volume group {} <- {}", g.name, g.pvs.join(" + "));
            for lv in &g.lvs {
                let size = if lv.grow {
                    "the rest".to_string()
                } else if let Some(p) = lv.percent {
                    format!("{p}% of the group")
                } else {
                    format!("{} MiB", round_mib(lv.size) / MIB)
                };
                let _ = writeln!(s, "  volume {}/{}: {size}", g.name, lv.name);
            }
        }
        for f in &self.filesystems {
            let _ = writeln!(
                s,
                "mkfs {} on {}{}",
                f.fstype,
                f.device,
                f.mountpoint
                    .as_deref()
                    .map(|m| format!(", mounted on {m}"))
                    .unwrap_or_default()
            );
        }
        let order: Vec<&str> = self
            .filesystems
            .iter()
            .filter_map(|f| f.mountpoint.as_deref())
            .collect();
        let _ = writeln!(s, "mount order: {}", order.join(" "));
        match self.firmware {
            Firmware::Bios => {
                let _ = writeln!(
                    s,
                    "boot loader: grub-install --target=i386-pc on {}",
                    self.boot_disks().join(", ")
                );
            }
            Firmware::Uefi => {
                let e: Vec<String> = self
                    .esps()
                    .iter()
                    .map(|(d, n)| format!("{d} partition {n}"))
                    .collect();
                let _ = writeln!(
                    s,
                    "boot loader: EFI loader on every ESP ({}), and \\EFI\\BOOT\\BOOTX64.EFI",
                    e.join(", ")
                );
            }
        }
        s
    }
}

fn is_esp(table: Table, p: &PartPlan) -> bool {
    p.flags.iter().any(|f| f == "esp")
        || (table == Table::Gpt && p.ptype.eq_ignore_ascii_case(GUID_ESP))
        || (table == Table::Msdos && p.ptype.trim_start_matches("0x").eq_ignore_ascii_case("ef"))
}

/// Whether layout disk `disk` holds /boot (or / when there is no /boot).
fn holds_boot(layout: &Layout, disk: &str) -> bool {
    let boot = layout
        .filesystems
        .iter()
        .find(|f| f.mountpoint.as_deref() == Some("/boot"))
        .or_else(|| {
            layout
                .filesystems
                .iter()
                .find(|f| f.mountpoint.as_deref() == Some("/"))
        });
    let Some(f) = boot else { return false };
    let mut stack = vec![f.device.clone()];
    let mut seen = 0;
    while let Some(dev) = stack.pop() {
        seen += 1;
        if seen > 256 {
            break;
        }
        if layout.disks.iter().any(|d| {
            d.name == disk
                && d.partitions
                    .iter()
                    .any(|p| partition_device(&d.name, p.number) == dev)
        }) {
            return true;
        }
        if let Some(r) = layout.raids.iter().find(|r| r.name == dev) {
            stack.extend(r.members.iter().cloned());
        }
        if let Some((vg, _)) = dev.split_once('/') {
            if let Some(g) = layout.vgs.iter().find(|g| g.name == vg) {
                stack.extend(g.pvs.iter().cloned());
            }
        }
    }
    false
}

/// Mount order: by depth, then name; unmounted ones (swap) last.
fn mount_key(f: &FsPlan) -> (usize, String) {
    match &f.mountpoint {
        Some(m) if m == "/" => (0, String::new()),
        Some(m) => (m.trim_end_matches('/').matches('/').count(), m.clone()),
        None => (usize::MAX, f.device.clone()),
    }
}
