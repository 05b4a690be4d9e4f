//! The node's disks: what `lsblk -J -b -O` and sysfs say about them, whether they are in use,
//! and which physical disk each layout disk gets ([`assign`]).

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use si_proto::layout::{Disk, Layout, Pick, Selector};
use std::path::{Path, PathBuf};

/// One device of lsblk's tree, with its children.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dev {
    pub name: String,
    /// `disk`, `part`, `loop`, `raid1`, `lvm`, `crypt`, `rom`, ...
    pub kind: String,
    pub size: u64,
    pub rota: bool,
    pub removable: bool,
    pub tran: Option<String>,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    pub model: Option<String>,
    pub fstype: Option<String>,
    pub mountpoints: Vec<String>,
    pub log_sec: u64,
    pub children: Vec<Dev>,
}

/// Most devices read from lsblk (input bound).
const MAX_DEVICES: usize = 4096;

/// Parses `lsblk -J -b -O` (or any column set holding at least NAME, TYPE, SIZE).
pub fn parse_lsblk(json: &str) -> Result<Vec<Dev>> {
    let v: Value = serde_json::from_str(json).context("parsing lsblk JSON")?;
    let list = v
        .get("blockdevices")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("lsblk JSON has no \"blockdevices\" array"))?;
    let mut count = 0;
    list.iter().map(|d| dev(d, &mut count, 0)).collect()
}

fn dev(v: &Value, count: &mut usize, depth: usize) -> Result<Dev> {
    *count += 1;
    if *count > MAX_DEVICES || depth > 16 {
        bail!("lsblk lists too many devices");
    }
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let num = |k: &str| match v.get(k) {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    // Booleans: JSON true/false (util-linux >= 2.33) or "0"/"1".
    let flag = |k: &str| match v.get(k) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "1",
        Some(Value::Number(n)) => n.as_u64() == Some(1),
        _ => false,
    };
    let name = s("name").ok_or_else(|| anyhow!("lsblk device without a name"))?;
    let size = num("size")
        .ok_or_else(|| anyhow!("lsblk device {name}: size missing or not in bytes (use -b)"))?;
    let mut mountpoints: Vec<String> = match v.get("mountpoints") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        _ => Vec::new(),
    };
    if let Some(m) = s("mountpoint") {
        mountpoints.push(m);
    }
    let mut children = Vec::new();
    if let Some(c) = v.get("children").and_then(Value::as_array) {
        for x in c {
            children.push(dev(x, count, depth + 1)?);
        }
    }
    Ok(Dev {
        kind: s("type").unwrap_or_default(),
        size,
        rota: flag("rota"),
        removable: flag("rm") || flag("hotplug") && s("tran").as_deref() == Some("usb"),
        tran: s("tran"),
        serial: s("serial"),
        wwn: s("wwn"),
        model: s("model"),
        fstype: s("fstype"),
        mountpoints,
        log_sec: num("log-sec").unwrap_or(512),
        children,
        name,
    })
}

/// A disk the installer may use, as seen on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhysDisk {
    pub name: String,
    pub size: u64,
    pub sector_size: u64,
    pub rotational: bool,
    pub removable: bool,
    /// `nvme`, `sata`, `sas`, `virtio`, `usb`, `mmc`, `loop`, ... (lsblk's TRAN, else from the
    /// kernel name).
    pub transport: String,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    pub by_path: Vec<String>,
    /// Why the disk must not be touched (mounted, swap, held): None when free.
    pub busy: Option<String>,
    /// md arrays and LVM volumes on it that the wipe stops first.
    pub holders: Vec<String>,
}

impl PhysDisk {
    pub fn dev(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }
}

fn transport(d: &Dev) -> String {
    if let Some(t) = &d.tran {
        return t.to_ascii_lowercase();
    }
    let n = d.name.as_str();
    if n.starts_with("nvme") {
        "nvme"
    } else if n.starts_with("vd") {
        "virtio"
    } else if n.starts_with("mmcblk") {
        "mmc"
    } else if n.starts_with("loop") {
        "loop"
    } else if n.starts_with("xvd") {
        "xen"
    } else {
        "unknown"
    }
    .into()
}

/// Why a device tree is in use, if it is: a mount, active swap, or a holder that is neither an
/// md array nor an LVM volume (those the wipe stops). Collects md/LVM holders on the way.
fn busy(d: &Dev, holders: &mut Vec<String>) -> Option<String> {
    if let Some(m) = d.mountpoints.first() {
        if m == "[SWAP]" {
            return Some(format!("{} is active swap", d.name));
        }
        return Some(format!("{} is mounted on {m}", d.name));
    }
    match d.kind.as_str() {
        "disk" | "part" | "loop" => {}
        k if k.starts_with("raid") || k == "lvm" || k == "md" => {
            if !holders.contains(&d.name) {
                holders.push(d.name.clone());
            }
        }
        k => return Some(format!("{} is held by a {k} device", d.name)),
    }
    d.children.iter().find_map(|c| busy(c, holders))
}

/// The disks of lsblk's output the installer may consider: whole disks (and loop devices and
/// removable disks only when `only` names them), with their state. `by_path` maps a kernel
/// name to its /dev/disk/by-path names.
pub fn candidates(
    devs: &[Dev],
    only: &[String],
    by_path: &dyn Fn(&str) -> Vec<String>,
) -> Vec<PhysDisk> {
    let named = |n: &str| only.iter().any(|o| o.trim_start_matches("/dev/") == n);
    let mut out = Vec::new();
    for d in devs {
        let listed = named(&d.name);
        if !only.is_empty() && !listed {
            continue;
        }
        let usable = match d.kind.as_str() {
            "disk" => !d.name.starts_with("zram") && !d.name.starts_with("ram"),
            "loop" => listed,
            _ => false,
        };
        if !usable || d.size == 0 {
            continue;
        }
        let tran = transport(d);
        let removable = d.removable || tran == "usb";
        let mut holders = Vec::new();
        let busy = busy(d, &mut holders);
        out.push(PhysDisk {
            name: d.name.clone(),
            size: d.size,
            sector_size: d.log_sec.max(512),
            rotational: d.rota,
            removable: removable && !listed,
            transport: tran,
            serial: d.serial.clone(),
            wwn: d.wwn.clone(),
            by_path: by_path(&d.name),
            busy,
            holders,
        });
    }
    out
}

/// /dev/disk/by-path names of `name` on this machine.
pub fn by_path_names(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/dev/disk/by-path") {
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_link(e.path()) {
                if t.file_name().and_then(|f| f.to_str()) == Some(name) {
                    out.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
    }
    out.sort();
    out
}

/// Runs `lsblk -J -b -O` on this machine.
pub fn lsblk() -> Result<Vec<Dev>> {
    let out = std::process::Command::new("lsblk")
        .args(["-J", "-b", "-O"])
        .output()
        .context("running lsblk")?;
    if !out.status.success() {
        bail!(
            "lsblk failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_lsblk(&String::from_utf8_lossy(&out.stdout))
}

/// The device node of partition `n` of `disk`, found through sysfs
/// (`/sys/class/block/<disk>/<part>/partition` holds the number), never by appending a digit.
pub fn partition_node(sys_block: &Path, disk: &str, n: u32) -> Result<PathBuf> {
    let dir = sys_block.join(disk);
    let rd = std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
    for e in rd.flatten() {
        let p = e.path().join("partition");
        if let Ok(s) = std::fs::read_to_string(&p) {
            if s.trim().parse::<u32>().ok() == Some(n) {
                return Ok(Path::new("/dev").join(e.file_name()));
            }
        }
    }
    bail!("disk {disk} has no partition {n} (per {})", dir.display())
}

/// Natural order of kernel names: by family (`mmcblk`, `nvme`, `sd`, `vd`, ...), then index
/// (`sda` < `sdb` < `sdaa`, `nvme0n2` < `nvme0n10`).
fn natural_key(n: &str) -> (String, Vec<u64>) {
    for fam in ["sd", "vd", "hd", "xvd"] {
        if let Some(letters) = n.strip_prefix(fam) {
            if !letters.is_empty() && letters.bytes().all(|b| b.is_ascii_lowercase()) {
                let idx = letters.bytes().fold(0u64, |a, b| {
                    a.saturating_mul(26).saturating_add(u64::from(b - b'a' + 1))
                });
                return (fam.into(), vec![idx]);
            }
        }
    }
    let family: String = n.chars().take_while(|c| !c.is_ascii_digit()).collect();
    let nums = n[family.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(u64::MAX))
        .collect();
    (family, nums)
}

/// The smallest disk a layout disk fits on: 1 MiB before the first partition, fixed sizes
/// rounded up to MiB, 1 MiB at least for every percent or growing partition, 1 MiB at the end
/// (the backup GPT).
pub fn min_size(d: &Disk) -> u64 {
    const MIB: u64 = 1 << 20;
    // An msdos extended partition is as large as its logical partitions and their 1 MiB
    // gaps (each logical's boot record): those count, its own recorded size does not.
    let parts: u64 = d
        .partitions
        .iter()
        .map(|p| {
            if d.table.is_extended(&p.ptype) {
                0
            } else if p.grow || p.percent.is_some() {
                MIB
            } else {
                p.size.div_ceil(MIB) * MIB
            }
        })
        .sum();
    let gaps = if d.table == si_proto::layout::Table::Msdos {
        d.partitions.iter().filter(|p| p.number > 4).count() as u64 * MIB
    } else {
        0
    };
    let parts = parts + gaps;
    2 * MIB + parts
}

fn matches(s: &Selector, p: &PhysDisk) -> bool {
    let eq = |a: &Option<String>, b: &Option<String>| match a {
        None => true,
        Some(want) => b.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(want)),
    };
    eq(&s.serial, &p.serial)
        && eq(&s.wwn, &p.wwn)
        && s.by_path
            .as_ref()
            .is_none_or(|w| p.by_path.iter().any(|b| b == w))
        && s.min_size.is_none_or(|m| p.size >= m)
        && s.max_size.is_none_or(|m| p.size <= m)
        && s.rotational.is_none_or(|r| p.rotational == r)
        && s.transport
            .as_ref()
            .is_none_or(|t| p.transport.eq_ignore_ascii_case(t))
}

/// Which physical disk each layout disk gets, in layout order, or the reason none can be
/// chosen (before anything is written). Busy disks are never chosen; removable ones only when
/// a selector names them by serial, WWN or path.
pub fn assign(layout: &Layout, disks: &[PhysDisk]) -> Result<Vec<PhysDisk>> {
    let mut pool: Vec<&PhysDisk> = disks.iter().collect();
    pool.sort_by_key(|d| natural_key(&d.name));
    let mut taken: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for (i, ld) in layout.disks.iter().enumerate() {
        let sel = ld.select.clone().unwrap_or_default();
        let by_identity = sel.serial.is_some() || sel.wwn.is_some() || sel.by_path.is_some();
        let need = min_size(ld);
        let matching: Vec<&PhysDisk> = pool
            .iter()
            .copied()
            .filter(|p| !taken.contains(&p.name))
            .filter(|p| !p.removable || by_identity)
            .filter(|p| matches(&sel, p))
            .collect();
        let describe = |v: &[&PhysDisk]| {
            v.iter()
                .map(|p| format!("{} ({} bytes, {})", p.name, p.size, p.transport))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if matching.is_empty() {
            let seen = pool
                .iter()
                .map(|p| {
                    let why = if taken.contains(&p.name) {
                        "already chosen".to_string()
                    } else if p.removable && !by_identity {
                        "removable, left alone".to_string()
                    } else if let Some(b) = &p.busy {
                        format!("in use: {b}")
                    } else {
                        "does not match".to_string()
                    };
                    format!("{}: {why}", p.name)
                })
                .collect::<Vec<_>>()
                .join("; ");
            bail!(
                "no disk for layout disk {} (select {}): {}",
                ld.name,
                describe_selector(&sel),
                if seen.is_empty() {
                    "the node has no disks".into()
                } else {
                    seen
                }
            );
        }
        // Identity selectors and plain filters without `pick` must name one disk among those
        // left for this layout disk and the ones after it with the same selector.
        let same_later = layout.disks[i..]
            .iter()
            .filter(|d| d.select.clone().unwrap_or_default() == sel)
            .count();
        let filtered = sel != Selector::default();
        if filtered && sel.pick.is_none() && matching.len() > same_later {
            bail!(
                "layout disk {}: {} disks match select {} ({}): ambiguous; add pick = \"smallest\"|\"largest\", a serial, a wwn or a by-path",
                ld.name,
                matching.len(),
                describe_selector(&sel),
                describe(&matching)
            );
        }
        let fitting: Vec<&PhysDisk> = matching
            .iter()
            .copied()
            .filter(|p| p.size >= need)
            .collect();
        let chosen = match sel.pick {
            Some(Pick::Smallest) => fitting.iter().min_by_key(|p| p.size).copied(),
            Some(Pick::Largest) => fitting.iter().max_by_key(|p| p.size).copied(),
            None => fitting.first().copied(),
        };
        let Some(p) = chosen else {
            let p = matching[0];
            bail!(
                "disk {} is too small for layout disk {}: it has {} bytes, the layout needs at least {need}",
                p.name,
                ld.name,
                p.size
            );
        };
        if let Some(b) = &p.busy {
            bail!(
                "disk {} (for layout disk {}) is in use: {b}",
                p.name,
                ld.name
            );
        }
        taken.push(p.name.clone());
        out.push(p.clone());
    }
    Ok(out)
}

fn describe_selector(s: &Selector) -> String {
    if *s == Selector::default() {
        return "{} (by order)".into();
    }
    toml::to_string(s)
        .unwrap_or_default()
        .lines()
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, size: u64, tran: &str) -> PhysDisk {
        PhysDisk {
            name: name.into(),
            size,
            sector_size: 512,
            rotational: false,
            removable: tran == "usb",
            transport: tran.into(),
            serial: Some(format!("SER-{name}")),
            wwn: None,
            by_path: vec![format!("pci-{name}")],
            busy: None,
            holders: vec![],
        }
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["sdaa", "sdb", "sda", "nvme0n10", "nvme0n2", "vda"];
        v.sort_by_key(|n| natural_key(n));
        assert_eq!(v, ["nvme0n2", "nvme0n10", "sda", "sdb", "sdaa", "vda"]);
    }

    #[test]
    fn partition_nodes_come_from_sysfs() {
        let t = tempfile::tempdir().unwrap();
        for (disk, part, n) in [
            ("nvme0n1", "nvme0n1p1", 1),
            ("nvme0n1", "nvme0n1p2", 2),
            ("vda", "vda1", 1),
            ("sda", "sda1", 1),
            ("md0", "md0p1", 1),
            ("mmcblk0", "mmcblk0p1", 1),
            ("loop7", "loop7p3", 3),
        ] {
            let d = t.path().join(disk).join(part);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("partition"), format!("{n}\n")).unwrap();
            assert_eq!(
                partition_node(t.path(), disk, n).unwrap(),
                Path::new("/dev").join(part)
            );
        }
        std::fs::create_dir_all(t.path().join("sda/queue")).unwrap();
        let e = partition_node(t.path(), "sda", 9).unwrap_err().to_string();
        assert!(e.contains("sda has no partition 9"), "{e}");
    }

    #[test]
    fn selection_by_rule_with_usb_left_alone() {
        let disks = vec![
            disk("sda", 16 << 30, "usb"),
            disk("nvme0n1", 512 << 30, "nvme"),
            disk("vda", 40 << 30, "virtio"),
        ];
        let layout = |sel: &str| {
            Layout::parse(&format!(
                "format = 2\nfirmware = \"bios\"\n[[disk]]\nname = \"a\"\ntable = \"gpt\"\n{sel}\n[[disk.partition]]\nnumber = 1\nsize = 0\ngrow = true\ntype = \"L\"\n"
            ))
            .unwrap()
        };
        let pick = |sel: &str| assign(&layout(sel), &disks).map(|v| v[0].name.clone());
        assert_eq!(pick("").unwrap(), "nvme0n1", "order skips the USB stick");
        assert_eq!(pick("select = { transport = \"virtio\" }").unwrap(), "vda");
        assert_eq!(pick("select = { pick = \"smallest\" }").unwrap(), "vda");
        assert_eq!(pick("select = { pick = \"largest\" }").unwrap(), "nvme0n1");
        assert_eq!(pick("select = { serial = \"ser-vda\" }").unwrap(), "vda");
        assert_eq!(
            pick("select = { by-path = \"pci-nvme0n1\" }").unwrap(),
            "nvme0n1"
        );
        assert_eq!(
            pick("select = { serial = \"SER-sda\" }").unwrap(),
            "sda",
            "named: allowed"
        );
        assert_eq!(pick("select = { max-size = 100000000000 }").unwrap(), "vda");
        let e = pick("select = { transport = \"usb\" }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sda: removable, left alone"), "{e}");
        let e = pick("select = { min-size = 1 }").unwrap_err().to_string();
        assert!(
            e.contains("ambiguous") && e.contains("nvme0n1") && e.contains("vda"),
            "{e}"
        );
    }

    #[test]
    fn busy_and_small_disks_are_refused_with_the_reason() {
        let mut d = vec![disk("vda", 8 << 30, "virtio")];
        d[0].busy = Some("vda2 is mounted on /".into());
        let l = Layout::parse(
            "format = 2\nfirmware = \"bios\"\n[[disk]]\nname = \"a\"\ntable = \"gpt\"\n[[disk.partition]]\nnumber = 1\nsize = 4294967296\ntype = \"L\"\n",
        )
        .unwrap();
        let e = assign(&l, &d).unwrap_err().to_string();
        assert!(
            e.contains("vda") && e.contains("in use: vda2 is mounted on /"),
            "{e}"
        );
        let small = vec![disk("vda", 2 << 30, "virtio")];
        let e = assign(&l, &small).unwrap_err().to_string();
        assert!(e.contains("disk vda is too small for layout disk a"), "{e}");
    }
}
