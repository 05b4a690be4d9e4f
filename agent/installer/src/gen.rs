//! Files the installer writes into the installed system: fstab (by the new UUIDs),
//! mdadm.conf, the network configuration, and the scripts' order.

use crate::plan::{Concrete, FsPlan};
use si_proto::plan::{InstallPlan, Network, Script, ScriptStage};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// fstab for `c`, given each layout device's new filesystem UUID.
pub fn fstab(c: &Concrete, uuids: &BTreeMap<String, String>) -> String {
    let mut s = String::from("# written by si-install\n");
    for f in &c.filesystems {
        let spec = match uuids.get(&f.device) {
            Some(u) => format!("UUID={u}"),
            None => format!("/dev/{}", dev_name(&f.device)),
        };
        let _ = writeln!(s, "{}", fstab_line(f, &spec));
    }
    s
}

fn fstab_line(f: &FsPlan, spec: &str) -> String {
    if f.fstype == "swap" {
        return format!("{spec} none swap sw 0 0");
    }
    let m = f.mountpoint.as_deref().unwrap_or("none");
    let pass = match (m, f.fstype.as_str()) {
        ("/", _) => 1,
        (_, "xfs" | "btrfs") => 0,
        _ => 2,
    };
    let opts = f
        .options
        .as_deref()
        .filter(|o| !o.is_empty())
        .unwrap_or("defaults");
    format!("{spec} {m} {} {opts} 0 {pass}", f.fstype)
}

/// The /dev path (without /dev/) of a layout device name that is not a partition: an array
/// (`md/NAME`) or a logical volume (`mapper`-free `VG/LV`).
pub fn dev_name(layout_dev: &str) -> String {
    if layout_dev.contains('/') {
        layout_dev.to_string()
    } else {
        format!("md/{layout_dev}")
    }
}

/// mdadm.conf listing the arrays by UUID (`uuids`: array name → mdadm UUID).
pub fn mdadm_conf(uuids: &BTreeMap<String, String>) -> String {
    let mut s = String::from("# written by si-install\nHOMEHOST <system>\nMAILADDR root\n");
    for (name, u) in uuids {
        let _ = writeln!(s, "ARRAY /dev/md/{name} metadata=1.2 UUID={u} name={name}");
    }
    s
}

/// /etc/network/interfaces-style and systemd-networkd configuration for the plan's network.
/// Returns (relative path, contents) pairs.
pub fn network_files(n: &Network, ifname_hint: Option<&str>) -> Vec<(String, String)> {
    let statik = n.method.as_deref() == Some("static") && n.address.is_some();
    let mut networkd = String::from("# written by si-install\n[Match]\n");
    match (&n.mac, ifname_hint) {
        (Some(m), _) => {
            let _ = writeln!(networkd, "MACAddress={m}");
        }
        (None, Some(i)) => {
            let _ = writeln!(networkd, "Name={i}");
        }
        (None, None) => networkd.push_str("Name=en* eth*\n"),
    }
    networkd.push_str("\n[Network]\n");
    if statik {
        let a = n.address.expect("checked");
        let _ = writeln!(networkd, "Address={a}/{}", n.prefix.unwrap_or(24));
        if let Some(g) = n.gateway {
            let _ = writeln!(networkd, "Gateway={g}");
        }
        for d in &n.dns {
            let _ = writeln!(networkd, "DNS={d}");
        }
        if let Some(d) = &n.domain {
            let _ = writeln!(networkd, "Domains={d}");
        }
    } else {
        networkd.push_str("DHCP=yes\n");
    }
    vec![("etc/systemd/network/50-si.network".into(), networkd)]
}

/// The scripts of `stage` that apply to this node, in run order: SystemImager's
/// `NN.CLASS[.rest]` names, CLASS one of `all`, the image, the group, the hostname; by NN,
/// then name.
pub fn scripts_for<'a>(
    plan: &'a InstallPlan,
    stage: ScriptStage,
    hostname: &str,
) -> Vec<&'a Script> {
    let classes: Vec<&str> = ["all", plan.image.as_str(), hostname]
        .into_iter()
        .chain(plan.group.as_deref())
        .collect();
    let mut v: Vec<(u32, &Script)> = plan
        .scripts
        .iter()
        .filter(|s| s.stage == stage)
        .filter_map(|s| {
            let digits: String = s.name.chars().take_while(char::is_ascii_digit).collect();
            let n: u32 = digits.parse().ok()?;
            let rest = s.name[digits.len()..].trim_start_matches('.');
            let class = rest.split('.').next().unwrap_or("");
            classes.contains(&class).then_some((n, s))
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    v.into_iter().map(|(_, s)| s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_by_class_and_number() {
        let s = |name: &str| Script {
            stage: ScriptStage::Post,
            name: name.into(),
            body: String::new(),
        };
        let plan = InstallPlan {
            node: "n1".into(),
            image: "deb".into(),
            group: Some("compute".into()),
            scripts: vec![
                s("20all.b"),
                s("10n1.host"),
                s("5compute"),
                s("10deb.image"),
                s("30other.nope"),
                s("noprefix.all"),
                Script {
                    stage: ScriptStage::Pre,
                    ..s("1all.pre")
                },
            ],
            ..Default::default()
        };
        let names: Vec<&str> = scripts_for(&plan, ScriptStage::Post, "n1")
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["5compute", "10deb.image", "10n1.host", "20all.b"]);
    }

    #[test]
    fn static_network() {
        let n = Network {
            method: Some("static".into()),
            mac: Some("52:54:00:12:34:56".into()),
            address: Some("10.213.1.5".parse().unwrap()),
            prefix: Some(16),
            gateway: Some("10.213.0.1".parse().unwrap()),
            dns: vec!["10.213.0.1".parse().unwrap()],
            domain: Some("cluster".into()),
        };
        let f = network_files(&n, None);
        assert!(f[0].1.contains("MACAddress=52:54:00:12:34:56"));
        assert!(f[0].1.contains(
            "Address=10.213.1.5/16\nGateway=10.213.0.1\nDNS=10.213.0.1\nDomains=cluster"
        ));
        let d = network_files(&Network::default(), Some("ens3"));
        assert!(d[0].1.contains("Name=ens3") && d[0].1.contains("DHCP=yes"));
    }
}
