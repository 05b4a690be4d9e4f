use super::*;

fn settings() -> BootSettings {
    BootSettings {
        http_base: "http://10.213.0.1:8080".into(),
        si_server: "10.213.0.1:7000".into(),
        installer_kernel: "si/vmlinuz".into(),
        installer_initrd: "si/initrd.img".into(),
        default_action: BootAction::Local,
    }
}

fn node() -> BootNode {
    BootNode {
        name: "n01".into(),
        macs: vec![[0x52, 0x54, 0x00, 0xAB, 0x00, 0x01]],
        ip: Some(Ipv4Addr::new(10, 213, 10, 5)),
        uuid: Some("b8945908-d6a6-41a9-611d-74a6ab80b83d".into()),
        action: BootAction::Install {
            image: "rocky9".into(),
        },
        kernel_args: "console=ttyS0".into(),
        firmware: Firmware::Any,
    }
}

#[test]
fn pxelinux_order_matches_pxelinux() {
    let n = node();
    let order = pxelinux_lookup_order(n.uuid.as_deref(), &n.macs[0], n.ip);
    assert_eq!(
        order,
        [
            "pxelinux.cfg/b8945908-d6a6-41a9-611d-74a6ab80b83d",
            "pxelinux.cfg/01-52-54-00-ab-00-01",
            "pxelinux.cfg/0AD50A05",
            "pxelinux.cfg/0AD50A0",
            "pxelinux.cfg/0AD50A",
            "pxelinux.cfg/0AD50",
            "pxelinux.cfg/0AD5",
            "pxelinux.cfg/0AD",
            "pxelinux.cfg/0A",
            "pxelinux.cfg/0",
            "pxelinux.cfg/default",
        ]
    );
    let g = grub_lookup_order(&n.macs[0], n.ip);
    assert_eq!(g[0], "grub/grub.cfg-01-52-54-00-ab-00-01");
    assert_eq!(g[1], "grub/grub.cfg-0AD50A05");
    assert_eq!(g.last().unwrap(), "grub/grub.cfg");
}

#[test]
fn renders_install_for_every_loader() {
    let files = render(&settings(), &[node()]).unwrap();
    let cmd = "si.server=10.213.0.1:7000 si.image=rocky9 si.node=n01 console=ttyS0";
    let ipxe = &files["boot/52-54-00-ab-00-01.ipxe"];
    assert!(ipxe.starts_with("#!ipxe\n"));
    assert!(ipxe.contains(&format!(
        "kernel http://10.213.0.1:8080/si/vmlinuz initrd=initrd.img {cmd}\n"
    )));
    assert!(ipxe.contains("initrd http://10.213.0.1:8080/si/initrd.img\n"));
    let pxe = &files["pxelinux.cfg/01-52-54-00-ab-00-01"];
    assert!(pxe.contains("KERNEL si/vmlinuz\n") && pxe.contains(&format!("APPEND {cmd}\n")));
    assert_eq!(&files["pxelinux.cfg/0AD50A05"], pxe);
    assert_eq!(
        &files["pxelinux.cfg/b8945908-d6a6-41a9-611d-74a6ab80b83d"],
        pxe
    );
    let grub = &files["grub/grub.cfg-01-52-54-00-ab-00-01"];
    assert!(
        grub.contains(&format!("linux /si/vmlinuz {cmd}\n"))
            && grub.contains("initrd /si/initrd.img\n")
    );
    assert!(files["boot.ipxe"].contains("boot/${mac:hexhyp}.ipxe"));
}

#[test]
fn renders_local_and_custom() {
    let s = settings();
    let local = BootAction::Local;
    assert!(pxelinux_config(&s, "a", "", &local).contains("LOCALBOOT 0"));
    assert!(ipxe_script(&s, "a", "", &local, Firmware::Bios)
        .contains("sanboot --no-describe --drive 0x80"));
    assert!(ipxe_script(&s, "a", "", &local, Firmware::Uefi).contains("\nexit 1\n"));
    assert!(grub_config(&s, "a", "", &local).contains("  exit\n"));
    let custom = BootAction::Custom {
        kernel: "k/vmlinuz".into(),
        initrd: None,
        cmdline: "quiet".into(),
    };
    let ipxe = ipxe_script(&s, "a", "", &custom, Firmware::Uefi);
    assert!(
        ipxe.contains("kernel http://10.213.0.1:8080/k/vmlinuz quiet\n")
            && !ipxe.contains("initrd")
    );
}

#[test]
fn refuses_bad_nodes() {
    let mut n = node();
    n.name = "../x".into();
    assert!(render(&settings(), &[n]).is_err());
    let (a, mut b) = (node(), node());
    b.name = "n02".into();
    b.uuid = None;
    b.ip = None;
    assert!(render(&settings(), &[a, b]).is_err(), "duplicate MAC");
}

#[test]
fn parses_nodes_file() {
    let nodes = parse_nodes(
        r#"
        [[node]]
        name = "n01"
        macs = ["52:54:00:AB:00:01"]
        ip = "10.213.10.5"
        action = { type = "install", image = "rocky9" }
        kernel-args = "console=ttyS0"
        firmware = "uefi"
        [[node]]
        name = "n02"
        macs = ["52-54-00-ab-00-02"]
        action = { type = "local" }
        "#,
    )
    .unwrap();
    assert_eq!(nodes[0].macs[0], [0x52, 0x54, 0, 0xab, 0, 1]);
    assert_eq!(nodes[0].firmware, Firmware::Uefi);
    assert_eq!(nodes[1].action, BootAction::Local);
    assert!(parse_nodes("[[node]]\nname='x'\nmacs=['zz']\naction={type='local'}").is_err());
}

#[test]
fn writes_tree_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let files = render(&settings(), &[node()]).unwrap();
    write_tree(dir.path(), &files).unwrap();
    for (rel, body) in &files {
        assert_eq!(
            &std::fs::read_to_string(dir.path().join(rel)).unwrap(),
            body
        );
    }
    // Rewriting replaces files in place of the old ones, leaving no temporaries.
    write_tree(dir.path(), &files).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("pxelinux.cfg"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "si-tmp")
        })
        .collect();
    assert!(leftovers.is_empty());
    let g = Generated::new(files);
    assert!(g.get("boot.ipxe").is_some() && g.get("nope").is_none());
}

fn site_root() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("pxelinux.cfg")).unwrap();
    std::fs::write(root.join("pxelinux.cfg/default"), b"site\n").unwrap();
    std::fs::write(dir.path().join("secret"), b"s").unwrap();
    std::os::unix::fs::symlink("../secret", root.join("boot.ipxe")).unwrap();
    let root = std::fs::canonicalize(&root).unwrap();
    (dir, root)
}

fn generated_files() -> BTreeMap<String, String> {
    let s = settings();
    render(&s, &[node()]).unwrap()
}

#[test]
fn root_first_serves_the_operators_file_and_fills_in_the_rest() {
    let (_d, root) = site_root();
    let g = Generated::new(generated_files());
    assert_eq!(g.config().boot_files, Precedence::RootFirst);
    assert_eq!(
        g.lookup(&root, "pxelinux.cfg/default"),
        Ok(Found::File(root.join("pxelinux.cfg/default")))
    );
    assert!(matches!(
        g.lookup(&root, "pxelinux.cfg/01-52-54-00-ab-00-01"),
        Ok(Found::Generated(_))
    ));
    // A root path that is refused stays refused: it does not fall through to generated.
    assert_eq!(g.lookup(&root, "boot.ipxe"), Err(PathError::Escape));
    assert_eq!(g.lookup(&root, "nope"), Err(PathError::NotFound));
    assert_eq!(g.shared_with(&root), ["boot.ipxe", "pxelinux.cfg/default"]);
}

#[test]
fn generated_first_shadows_the_root() {
    let (_d, root) = site_root();
    let cfg = GenerateConfig {
        boot_files: Precedence::GeneratedFirst,
        no_generate: vec![],
    };
    let g = Generated::with_config(cfg, generated_files());
    match g.lookup(&root, "pxelinux.cfg/default") {
        Ok(Found::Generated(d)) => assert!(d.starts_with(b"# si: default")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        g.lookup(&root, "boot.ipxe"),
        Ok(Found::Generated(_))
    ));
}

#[test]
fn no_generate_leaves_a_loader_to_the_site() {
    let (_d, root) = site_root();
    let cfg = GenerateConfig {
        boot_files: Precedence::GeneratedFirst,
        no_generate: vec![Loader::Pxelinux, Loader::Grub],
    };
    let g = Generated::with_config(cfg, generated_files());
    assert_eq!(
        g.lookup(&root, "pxelinux.cfg/default"),
        Ok(Found::File(root.join("pxelinux.cfg/default")))
    );
    let paths = g.paths();
    assert!(
        paths.iter().all(|p| Loader::of(p) == Some(Loader::Ipxe)),
        "{paths:?}"
    );
    assert!(paths.contains(&"boot/52-54-00-ab-00-01.ipxe".to_string()));
    // Replacing the set (an inventory change) keeps the filter.
    g.replace(generated_files());
    assert!(g.get("grub/grub.cfg").is_none() && g.get("boot.ipxe").is_some());
}

#[test]
fn generate_config_is_flags_and_toml() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        g: GenerateConfig,
    }
    use clap::Parser;
    let c = Cli::parse_from([
        "x",
        "--boot-files",
        "generated-first",
        "--no-generate",
        "ipxe,grub",
    ])
    .g;
    assert_eq!(c.boot_files, Precedence::GeneratedFirst);
    assert_eq!(c.no_generate, [Loader::Ipxe, Loader::Grub]);
    let t: GenerateConfig =
        toml::from_str("boot-files = \"generated-first\"\nno-generate = [\"ipxe\", \"grub\"]\n")
            .unwrap();
    assert_eq!(t, c);
    assert_eq!(Cli::parse_from(["x"]).g, GenerateConfig::default());
    assert!(toml::from_str::<GenerateConfig>("boot-file = \"root-first\"").is_err());
}

#[test]
fn grub_entry_chains_by_grubs_own_mac_variable_without_modules() {
    let e = grub_entry(&settings());
    assert!(
        e.starts_with("configfile \"$prefix/grub.cfg-01-$net_default_mac\"\n"),
        "{e}"
    );
    // Nothing that needs the regexp or test modules; the default entry boots at once.
    assert!(!e.contains("regexp") && !e.contains("[ "), "{e}");
    assert!(e.contains("set timeout=0\nmenuentry 'si: default'"), "{e}");
    let files = render(&settings(), &[node()]).unwrap();
    assert_eq!(
        files["grub/grub.cfg-01-52:54:00:ab:00:01"],
        files["grub/grub.cfg-01-52-54-00-ab-00-01"]
    );
}

/// GRUB's own parser accepts every generated GRUB file (`grub-script-check`, grub-common).
#[test]
fn grub_files_parse_with_grub_script_check() {
    let Ok(out) = std::process::Command::new("grub-script-check")
        .arg("--version")
        .output()
    else {
        eprintln!(
            "SKIP grub_files_parse_with_grub_script_check: needs grub-script-check (grub-common)"
        );
        return;
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    for (path, body) in render(&settings(), &[node()]).unwrap() {
        if Loader::of(&path) != Some(Loader::Grub) {
            continue;
        }
        let f = dir.path().join("grub.cfg");
        std::fs::write(&f, &body).unwrap();
        let out = std::process::Command::new("grub-script-check")
            .arg(&f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{path}: {}\n{body}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn autoinstall(family: Family, tree: Option<&str>) -> BootNode {
    BootNode {
        action: BootAction::Autoinstall {
            family,
            kernel: "si-distro/d/linux".into(),
            initrd: "si-distro/d/initrd".into(),
            answer_url: "http://10.213.0.1:8080/autoinstall/answer/n01/abc123".into(),
            tree_url: tree.map(str::to_string),
            hostname: "n01.lab".into(),
        },
        ..node()
    }
}

#[test]
fn autoinstall_boots_the_distros_installer_per_family() {
    let url = "http://10.213.0.1:8080/autoinstall/answer/n01/abc123";
    let tree = "http://10.213.0.1:8080/si-distro/d/tree";
    for (family, t, args) in [
        (
            Family::Debian,
            None,
            format!("auto=true priority=critical url={url} interface=auto hostname=n01.lab"),
        ),
        (Family::Redhat, None, format!("inst.ks={url}")),
        (
            Family::Redhat,
            Some(tree),
            format!("inst.ks={url} inst.repo={tree}"),
        ),
        (Family::Suse, None, format!("autoyast={url}")),
        (
            Family::Suse,
            Some(tree),
            format!("autoyast={url} install={tree}"),
        ),
    ] {
        let files = render(&settings(), &[autoinstall(family, t)]).unwrap();
        let cmd = format!("{args} console=ttyS0");
        let ipxe = &files["boot/52-54-00-ab-00-01.ipxe"];
        assert!(
            ipxe.contains(&format!(
                "kernel http://10.213.0.1:8080/si-distro/d/linux initrd=initrd {cmd}\n\
                 initrd http://10.213.0.1:8080/si-distro/d/initrd\nboot\n"
            )),
            "{family}: {ipxe}"
        );
        let pxe = &files["pxelinux.cfg/01-52-54-00-ab-00-01"];
        assert!(
            pxe.contains(&format!(
                "  KERNEL si-distro/d/linux\n  INITRD si-distro/d/initrd\n  APPEND {cmd}\n"
            )),
            "{family}: {pxe}"
        );
        assert_eq!(pxe, &files["pxelinux.cfg/0AD50A05"]);
        let grub = &files["grub/grub.cfg-01-52-54-00-ab-00-01"];
        assert!(
            grub.contains(&format!(
                "  linux /si-distro/d/linux {cmd}\n  initrd /si-distro/d/initrd\n"
            )),
            "{family}: {grub}"
        );
    }
}

#[test]
fn autoinstall_fields_must_be_plain_words() {
    for bad in [
        "http://x/a b",
        "http://x/a;reboot",
        "http://x/${mac}",
        "u\nrl",
        "",
    ] {
        let mut n = autoinstall(Family::Debian, None);
        if let BootAction::Autoinstall { answer_url, .. } = &mut n.action {
            *answer_url = bad.into();
        }
        let e = render(&settings(), &[n]).unwrap_err().to_string();
        assert!(e.contains("answer URL"), "{bad:?}: {e}");
    }
}

#[test]
fn mounted_directories_are_served_beneath_their_prefix() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let mounted = d.path().join("distros");
    std::fs::create_dir_all(mounted.join("deb")).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(mounted.join("deb/linux"), "k").unwrap();
    std::fs::write(d.path().join("secret"), "s").unwrap();
    std::os::unix::fs::symlink("../../secret", mounted.join("deb/out")).unwrap();
    let g = Generated::default();
    g.mount("si-distro", &mounted).unwrap();
    let root = std::fs::canonicalize(&root).unwrap();
    match g.lookup(&root, "si-distro/deb/linux").unwrap() {
        Found::File(p) => assert_eq!(std::fs::read_to_string(p).unwrap(), "k"),
        f => panic!("{f:?}"),
    }
    assert_eq!(g.lookup(&root, "si-distro/deb/out"), Err(PathError::Escape));
    assert_eq!(
        g.lookup(&root, "si-distro/deb/none"),
        Err(PathError::NotFound)
    );
    assert!(g.mount("a/b", &mounted).is_err());
}
