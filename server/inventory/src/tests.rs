use super::*;

fn inv() -> (tempfile::TempDir, Inventory) {
    let d = tempfile::tempdir().unwrap();
    let i = Inventory::open_state_dir(&d.path().join("state"))
        .unwrap()
        .with_actor("tester");
    i.put_subnet(&Subnet {
        name: "lab".into(),
        network: "10.213.0.0".parse().unwrap(),
        prefix: 16,
        router: None,
        dns: vec![],
        domain: None,
        pool_start: Some("10.213.100.1".parse().unwrap()),
        pool_end: Some("10.213.100.50".parse().unwrap()),
        lease_time: 60,
        permanent: false,
    })
    .unwrap();
    (d, i)
}

fn node(name: &str, mac: &str, ip: &str) -> Node {
    Node {
        name: name.into(),
        macs: vec![mac.into()],
        ip: Some(ip.parse().unwrap()),
        state: "new".into(),
        ..Default::default()
    }
}

#[test]
fn file_is_private_and_reopens() {
    let (d, i) = inv();
    let p = i.path().to_path_buf();
    drop(i);
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let i = Inventory::open(&p).unwrap();
    assert_eq!(i.subnets().unwrap().len(), 1);
    drop(d);
}

#[test]
fn add_lookup_and_refusals() {
    let (_d, i) = inv();
    i.add_node(&node("n1", "52:54:00:00:00:01", "10.213.0.11"), &NoCatalog)
        .unwrap();
    let n = i.node_by_mac("52-54-00-00-00-01").unwrap().unwrap();
    assert_eq!(n.name, "n1");
    let e = i
        .add_node(&node("n2", "52:54:00:00:00:01", "10.213.0.12"), &NoCatalog)
        .unwrap_err();
    assert!(format!("{e:#}").contains("duplicate MAC"), "{e:#}");
    let e = i
        .add_node(&node("n2", "52:54:00:00:00:02", "10.213.0.11"), &NoCatalog)
        .unwrap_err();
    assert!(format!("{e:#}").contains("duplicate IP"), "{e:#}");
    let e = i
        .add_node(&node("n2", "52:54:00:00:00:02", "192.168.1.1"), &NoCatalog)
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("outside every configured subnet"),
        "{e:#}"
    );
    let mut n2 = node("n2", "52:54:00:00:00:02", "10.213.0.12");
    n2.group = Some("nope".into());
    let e = i.add_node(&n2, &NoCatalog).unwrap_err();
    assert!(format!("{e:#}").contains("unknown group"), "{e:#}");
    n2.group = None;
    n2.image = Some("rocky9".into());
    let e = i
        .add_node(&n2, &ListCatalog(vec!["debian12".into()]))
        .unwrap_err();
    assert!(format!("{e:#}").contains("unknown image"), "{e:#}");
    i.add_node(&n2, &ListCatalog(vec!["rocky9".into()]))
        .unwrap();
    assert_eq!(i.nodes().unwrap().len(), 2);
}

#[test]
fn mark_installed_and_history() {
    let (_d, i) = inv();
    i.add_group(
        &Group {
            name: "compute".into(),
            kernel_args: "console=ttyS0".into(),
            image: Some("img".into()),
            bmc: Bmc {
                user: Some("admin".into()),
                password: Some("s3cret".into()),
                ..Default::default()
            },
            ..Default::default()
        },
        &NoCatalog,
    )
    .unwrap();
    let mut n = node("n1", "52:54:00:00:00:01", "10.213.0.11");
    n.group = Some("compute".into());
    n.bmc.host = Some("10.213.9.1".into());
    i.add_node(&n, &NoCatalog).unwrap();
    i.mark_installed("n1").unwrap();
    let b = i.boot_info_by_mac("52:54:00:00:00:01").unwrap().unwrap();
    assert_eq!(b.action, BootAction::Local);
    assert_eq!(b.image.as_deref(), Some("img"));
    assert_eq!(b.kernel_args, "console=ttyS0");
    let bmc = i.bmc("n1").unwrap().unwrap();
    assert_eq!(bmc.password.as_deref(), Some("s3cret"));
    assert_eq!(bmc.host.as_deref(), Some("10.213.9.1"));
    let h = i.history(Some("node/n1"), 10).unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[1].action, "installed");
    assert_eq!(h[1].actor, "tester");
    let all = i.history(None, 100).unwrap();
    assert!(all.iter().all(|e| !e.detail.contains("s3cret")));
}

#[test]
fn export_import_round_trip() {
    let (_d, i) = inv();
    i.add_group(
        &Group {
            name: "compute".into(),
            bmc: Bmc {
                password: Some("pw".into()),
                ..Default::default()
            },
            ..Default::default()
        },
        &NoCatalog,
    )
    .unwrap();
    let mut n = node("n1", "52:54:00:00:00:01", "10.213.0.11");
    n.group = Some("compute".into());
    n.boot = BootAction::Custom {
        kernel: "vmlinuz".into(),
        initrd: Some("initrd.img".into()),
        cmdline: "quiet".into(),
    };
    i.add_node(&n, &NoCatalog).unwrap();
    let c = i.export(false).unwrap();
    let text = toml::to_string(&c).unwrap();
    assert!(!text.contains("\"pw\""));
    let back: Cluster = toml::from_str(&text).unwrap();
    assert_eq!(back, c);
    // Re-import into the same inventory: nothing changes, password kept.
    i.import(&back, &NoCatalog, false).unwrap();
    assert_eq!(
        i.export(true).unwrap().groups[0].bmc.password.as_deref(),
        Some("pw")
    );
    // Into a fresh one, with secrets.
    let (_d2, j) = inv();
    j.import(&i.export(true).unwrap(), &NoCatalog, true)
        .unwrap();
    assert_eq!(j.export(true).unwrap(), i.export(true).unwrap());
}

#[test]
fn leases() {
    let (_d, i) = inv();
    i.add_node(&node("n1", "52:54:00:00:00:01", "10.213.0.11"), &NoCatalog)
        .unwrap();
    let ip: Ipv4Addr = "10.213.0.11".parse().unwrap();
    assert!(i.static_ip_taken(ip, "aa:aa:aa:aa:aa:aa").unwrap());
    assert!(!i.static_ip_taken(ip, "52:54:00:00:00:01").unwrap());
    assert!(!i
        .static_ip_taken("10.213.0.12".parse().unwrap(), "aa:aa:aa:aa:aa:aa")
        .unwrap());
    let l = Lease {
        mac: "aa:aa:aa:aa:aa:aa".into(),
        ip: "10.213.100.1".parse().unwrap(),
        expires: Some(now() + 60),
        state: "bound".into(),
        hostname: None,
    };
    i.put_lease(&l).unwrap();
    assert_eq!(i.leases().unwrap(), vec![l.clone()]);
    // Another MAC on the same address replaces it.
    let m = Lease {
        mac: "bb:bb:bb:bb:bb:bb".into(),
        ..l
    };
    i.put_lease(&m).unwrap();
    assert_eq!(i.leases().unwrap(), vec![m]);
}

#[test]
fn profiles_of_nodes_and_groups() {
    let (_d, i) = inv();
    i.add_group(
        &Group {
            name: "compute".into(),
            profile: Some("deb12".into()),
            ..Default::default()
        },
        &NoCatalog,
    )
    .unwrap();
    let mut n = node("n1", "52:54:00:00:00:01", "10.213.0.11");
    n.group = Some("compute".into());
    n.boot = BootAction::Autoinstall;
    i.add_node(&n, &NoCatalog).unwrap();
    i.add_node(&node("n2", "52:54:00:00:00:02", "10.213.0.12"), &NoCatalog)
        .unwrap();
    // The group's profile, until the node has its own.
    let b = i.boot_info("n1").unwrap().unwrap();
    assert_eq!(b.action, BootAction::Autoinstall);
    assert_eq!(b.profile.as_deref(), Some("deb12"));
    assert_eq!(i.boot_info("n2").unwrap().unwrap().profile, None);
    n.profile = Some("rocky9".into());
    i.update_nodes(&[n.clone()], &NoCatalog).unwrap();
    let got = i.node("n1").unwrap().unwrap();
    assert_eq!(got.profile.as_deref(), Some("rocky9"));
    assert_eq!(got.boot, BootAction::Autoinstall);
    assert_eq!(
        i.boot_info("n1").unwrap().unwrap().profile.as_deref(),
        Some("rocky9")
    );
    assert!(i
        .history(Some("node/n1"), 10)
        .unwrap()
        .iter()
        .any(|h| h.detail.contains("profile: - -> rocky9")));
    // A profile name becomes a path in si-autoinstall: checked here too.
    n.profile = Some("../etc".into());
    assert!(i.update_nodes(&[n], &NoCatalog).is_err());
    // Installed: back to local boot.
    i.mark_installed("n1").unwrap();
    assert_eq!(i.node("n1").unwrap().unwrap().boot, BootAction::Local);
}

#[test]
fn rack_and_switch_labels_are_kept_checked_and_recorded() {
    let (_d, i) = inv();
    let mut n = node("n1", "52:54:00:00:00:01", "10.213.0.11");
    n.rack = Some("r07".into());
    i.add_node(&n, &NoCatalog).unwrap();
    let b = i.boot_info("n1").unwrap().unwrap();
    assert_eq!(
        (b.rack.as_deref(), b.switch.as_deref()),
        (Some("r07"), None)
    );
    n.rack = None;
    n.switch = Some("sw-2".into());
    i.update_nodes(&[n.clone()], &NoCatalog).unwrap();
    let got = i.node("n1").unwrap().unwrap();
    assert_eq!((got.rack, got.switch.as_deref()), (None, Some("sw-2")));
    assert!(i
        .history(Some("node/n1"), 10)
        .unwrap()
        .iter()
        .any(|h| h.detail.contains("rack: r07 -> -") && h.detail.contains("switch: - -> sw-2")));
    // Validated like every other name.
    for bad in ["", "r 1", "../r", &"r".repeat(64)] {
        n.rack = Some(bad.into());
        let e = i.update_nodes(&[n.clone()], &NoCatalog).unwrap_err();
        assert!(format!("{e:#}").contains("rack of node n1"), "{bad}: {e:#}");
    }
    // Exported and imported with the rest of the cluster.
    let c = i.export(false).unwrap();
    let text = toml::to_string(&c).unwrap();
    assert!(text.contains("switch = \"sw-2\""), "{text}");
}

/// A database written before the labels existed (schema 3) opens, migrates, and keeps its nodes.
#[test]
fn an_old_database_gains_the_labels() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("inventory.db");
    {
        let mut c = rusqlite::Connection::open(&p).unwrap();
        for (v, sql) in crate::schema::MIGRATIONS[..3].iter().enumerate() {
            let tx = c.transaction().unwrap();
            tx.execute_batch(sql).unwrap();
            tx.pragma_update(None, "user_version", (v + 1) as i64)
                .unwrap();
            tx.commit().unwrap();
        }
        c.execute(
            "INSERT INTO nodes (name, ip, state) VALUES ('old1', NULL, 'installed')",
            [],
        )
        .unwrap();
    }
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    let i = Inventory::open(&p).unwrap();
    let n = i.node("old1").unwrap().unwrap();
    assert_eq!(
        (n.rack, n.switch, n.state.as_str()),
        (None, None, "installed")
    );
    let v: i64 = i
        .conn()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, crate::schema::VERSION);
    let mut n = i.node("old1").unwrap().unwrap();
    n.rack = Some("r1".into());
    i.update_nodes(&[n], &NoCatalog).unwrap();
    assert_eq!(i.node("old1").unwrap().unwrap().rack.as_deref(), Some("r1"));
}

/// A failed install shows as the node's state, the installer's reason in its history, and the
/// node stays armed so its next boot installs again.
#[test]
fn a_failed_install_is_recorded_with_its_reason() {
    let (_d, i) = inv();
    let mut n = node("n1", "52:54:00:00:00:01", "10.213.0.11");
    n.boot = BootAction::Install;
    i.add_node(&n, &NoCatalog).unwrap();
    i.mark_failed(
        "n1",
        "status=-1 disks: vda is 1.0 GiB, the layout needs 8.0 GiB",
    )
    .unwrap();
    let got = i.node("n1").unwrap().unwrap();
    assert_eq!(got.state, "failed");
    assert_eq!(got.boot, BootAction::Install);
    let h = i.history(Some("node/n1"), 10).unwrap();
    assert!(
        h.iter()
            .any(|e| e.action == "install-failed" && e.detail.contains("the layout needs 8.0 GiB")),
        "{h:?}"
    );
    assert!(i.mark_failed("nope", "x").is_err());
}
