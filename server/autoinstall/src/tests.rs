use super::*;
use crate::distro::{detect, import, Hints};
use crate::render::{boot_action, render_answer};
use si_boot::http::{Method, Route, StatusCode};
use si_inventory::{BootAction, Group, Inventory, NoCatalog, Node, Subnet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

fn write(p: &Path, text: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// A debian-installer netboot tree, as the Debian package ships it.
fn di_tree(dir: &Path) {
    write(&dir.join("debian-installer/amd64/linux"), "kernel");
    write(&dir.join("debian-installer/amd64/initrd.gz"), "initrd");
    write(
        &dir.join("version.info"),
        "Debian version:  12 (bookworm)\nInstaller build: 20230607\n",
    );
}

struct Lab {
    _d: tempfile::TempDir,
    state: std::path::PathBuf,
    store: Store,
    inv: Arc<Inventory>,
    urls: ServerUrls,
}

fn lab(template: &str) -> Lab {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let inv = Arc::new(Inventory::open_state_dir(&state).unwrap());
    for (name, net, prefix) in [("lab", "10.213.0.0", 16), ("lo", "127.0.0.0", 8)] {
        inv.put_subnet(&Subnet {
            name: name.into(),
            network: net.parse().unwrap(),
            prefix,
            router: None,
            dns: vec![],
            domain: None,
            pool_start: None,
            pool_end: None,
            lease_time: 60,
            permanent: false,
        })
        .unwrap();
    }
    inv.add_group(
        &Group {
            name: "compute".into(),
            profile: Some("p1".into()),
            kernel_args: "console=ttyS0".into(),
            disk_layout: Some("two-disks".into()),
            ..Default::default()
        },
        &NoCatalog,
    )
    .unwrap();
    for (i, name) in ["n1", "n2"].iter().enumerate() {
        inv.add_node(
            &Node {
                name: name.to_string(),
                macs: vec![format!("52:54:00:00:00:0{}", i + 1)],
                ip: Some(format!("10.213.0.{}", 11 + i).parse().unwrap()),
                group: Some("compute".into()),
                boot: BootAction::Autoinstall,
                state: "new".into(),
                ..Default::default()
            },
            &NoCatalog,
        )
        .unwrap();
    }
    let store = Store::open(&state).unwrap();
    let tree = d.path().join("tree");
    di_tree(&tree);
    import(&store, "deb12", &tree, &Hints::default(), false).unwrap();
    let p = Profile {
        name: "p1".into(),
        distro: "deb12".into(),
        kernel_args: "priority=critical".into(),
        vars: [("role".to_string(), "profile".to_string())].into(),
        template_source: "test".into(),
    };
    store.put_profile(&p, template).unwrap();
    Lab {
        _d: d,
        state,
        store,
        inv,
        urls: ServerUrls {
            http_base: "http://10.213.0.1:8080".into(),
        },
    }
}

fn render(l: &Lab, node: &str) -> anyhow::Result<String> {
    render_answer(&l.store, &l.inv, node, &l.urls).map(|r| r.text)
}

#[test]
fn names_are_checked_before_they_become_paths() {
    for bad in ["", "..", ".hidden", "-x", "a/b", "a b", &"x".repeat(64)] {
        assert!(check_name("distro", bad).is_err(), "{bad:?}");
    }
    check_name("distro", "debian-12.5_amd64").unwrap();
    let l = lab("x\n");
    assert!(l.store.distro("../etc").is_err());
    assert!(l.store.profile("../../x").is_err());
    assert!(l.store.put_snippet(&Scope::Global, "../x", "y").is_err());
    assert!(l
        .store
        .put_snippet(&Scope::Node("../n".into()), "x", "y")
        .is_err());
    assert!(l.store.token("a/b").is_err());
    assert!(parse_var("a-b=1").is_err());
    assert_eq!(parse_var("a_b=1=2").unwrap(), ("a_b".into(), "1=2".into()));
}

#[test]
fn snippets_are_found_per_node_then_profile_then_distro_then_global() {
    let l = lab("{% include \"part\" %}|{% include \"other\" %}\n");
    l.store
        .put_snippet(&Scope::Global, "part", "global")
        .unwrap();
    l.store
        .put_snippet(&Scope::Global, "other", "g-other")
        .unwrap();
    assert_eq!(render(&l, "n1").unwrap(), "global|g-other\n");
    l.store
        .put_snippet(&Scope::Distro("deb12".into()), "part", "distro")
        .unwrap();
    assert_eq!(render(&l, "n1").unwrap(), "distro|g-other\n");
    l.store
        .put_snippet(&Scope::Profile("p1".into()), "part", "profile")
        .unwrap();
    assert_eq!(render(&l, "n1").unwrap(), "profile|g-other\n");
    l.store
        .put_snippet(&Scope::Node("n1".into()), "part", "node {{ node }}")
        .unwrap();
    assert_eq!(render(&l, "n1").unwrap(), "node n1|g-other\n");
    // n2 has no snippet of its own: the profile's.
    assert_eq!(render(&l, "n2").unwrap(), "profile|g-other\n");
    l.store
        .remove_snippet(&Scope::Profile("p1".into()), "part")
        .unwrap();
    assert_eq!(render(&l, "n2").unwrap(), "distro|g-other\n");
}

#[test]
fn per_node_variables() {
    let l = lab(
        "{{ node }} {{ hostname }} {{ ip }} {{ mac }} {{ macs|join(',') }} {{ group }} \
         {{ disk_layout }} {{ disks|join('+') }} {{ profile }} {{ distro.name }} \
         {{ distro.family }} {{ distro.arch }} {{ server_url }} {{ vars.role }} {{ vars.site }}\n\
         {{ done_url }}\n",
    );
    l.store
        .put_vars(
            "group",
            "compute",
            &[("role".into(), "group".into()), ("site".into(), "g".into())].into(),
        )
        .unwrap();
    l.store
        .put_vars(
            "node",
            "n2",
            &[
                ("role".into(), "node".into()),
                ("disks".into(), "sda,sdb".into()),
            ]
            .into(),
        )
        .unwrap();
    let a = render(&l, "n1").unwrap();
    let t1 = l.store.existing_token("n1").unwrap().unwrap();
    assert_eq!(
        a,
        format!(
            "n1 n1 10.213.0.11 52:54:00:00:00:01 52:54:00:00:00:01 compute two-disks  p1 deb12 \
             debian amd64 http://10.213.0.1:8080 group g\n\
             http://10.213.0.1:8080/autoinstall/done/n1/{t1}\n"
        )
    );
    let b = render(&l, "n2").unwrap();
    assert!(b.starts_with("n2 n2 10.213.0.12 52:54:00:00:00:02"), "{b}");
    assert!(b.contains(" sda+sdb p1 ") && b.contains(" node g\n"), "{b}");
    // The token is the node's own and stays put until used.
    let t2 = l.store.existing_token("n2").unwrap().unwrap();
    assert_ne!(t1, t2);
    assert_eq!(render(&l, "n1").unwrap(), a);
}

#[test]
fn render_errors_are_clear_and_whole() {
    let l = lab("start {{ nosuchvar }} end\n");
    let e = format!("{:#}", render(&l, "n1").unwrap_err());
    assert!(
        e.contains("node n1") && e.contains("unknown variable"),
        "{e}"
    );
    assert!(e.contains("line 1"), "{e}");

    let l = lab("a\n{% include \"nowhere\" %}\n");
    let e = format!("{:#}", render(&l, "n1").unwrap_err());
    assert!(e.contains("missing snippet"), "{e}");
    assert!(
        e.contains("\"nowhere\"") && e.contains("node n1, profile p1, distro deb12, global"),
        "{e}"
    );

    let l = lab("{% include \"a\" %}\n");
    l.store
        .put_snippet(&Scope::Global, "a", "a{% include \"b\" %}")
        .unwrap();
    l.store
        .put_snippet(&Scope::Global, "b", "b{% include \"a\" %}")
        .unwrap();
    let e = format!("{:#}", render(&l, "n1").unwrap_err());
    assert!(e.contains("include loop"), "{e}");

    // An unknown variable inside a snippet names the snippet.
    l.store
        .put_snippet(&Scope::Global, "b", "b\n{{ vars.missing }}")
        .unwrap();
    let e = format!("{:#}", render(&l, "n1").unwrap_err());
    assert!(
        e.contains("unknown variable") && e.contains("in b, line 2"),
        "{e}"
    );

    // Syntax errors are refused when the template or snippet is added.
    let e = format!(
        "{:#}",
        l.store
            .put_snippet(&Scope::Global, "c", "{% if %}")
            .unwrap_err()
    );
    assert!(e.contains("syntax error"), "{e}");
    let p = l.store.profile("p1").unwrap();
    assert!(l.store.put_profile(&p, "{{ unclosed").is_err());
    // A node without a profile, an unknown node.
    l.inv
        .add_node(
            &Node {
                name: "lonely".into(),
                state: "new".into(),
                ..Default::default()
            },
            &NoCatalog,
        )
        .unwrap();
    let e = format!("{:#}", render(&l, "lonely").unwrap_err());
    assert!(e.contains("has no profile"), "{e}");
    assert!(render(&l, "ghost").is_err());
}

#[test]
fn tokens_are_one_time() {
    let l = lab("x\n");
    let t = l.store.token("n1").unwrap();
    assert_eq!(t.len(), 32);
    assert_eq!(l.store.token("n1").unwrap(), t);
    assert!(!l
        .store
        .consume_token("n1", "0".repeat(32).as_str())
        .unwrap());
    assert!(l.store.consume_token("n1", &t).unwrap());
    assert!(!l.store.consume_token("n1", &t).unwrap());
    assert_ne!(l.store.token("n1").unwrap(), t);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(l.store.root().join("tokens/n1"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mode = std::fs::metadata(l.store.root())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn detects_families_and_architectures() {
    let d = tempfile::tempdir().unwrap();
    let rh = d.path().join("rocky");
    write(
        &rh.join(".treeinfo"),
        "[general]\nfamily = Rocky Linux\nversion = 9.4\narch = x86_64\n\n[images-x86_64]\nkernel = images/pxeboot/vmlinuz\ninitrd = images/pxeboot/initrd.img\n",
    );
    write(&rh.join("images/pxeboot/vmlinuz"), "k");
    write(&rh.join("images/pxeboot/initrd.img"), "i");
    let r = detect(&rh, &Hints::default()).unwrap();
    assert_eq!((r.family, r.arch.as_str()), (Family::Redhat, "x86_64"));
    assert_eq!(r.description, "Rocky Linux 9.4");

    let suse = d.path().join("leap");
    write(
        &suse.join("content"),
        "PRODUCT openSUSE\nLABEL openSUSE Leap 15.5\n",
    );
    write(&suse.join("boot/x86_64/loader/linux"), "k");
    write(&suse.join("boot/x86_64/loader/initrd"), "i");
    let r = detect(&suse, &Hints::default()).unwrap();
    assert_eq!((r.family, r.arch.as_str()), (Family::Suse, "x86_64"));
    assert_eq!(r.description, "openSUSE Leap 15.5");

    let deb = d.path().join("debiso");
    write(
        &deb.join(".disk/info"),
        "Debian GNU/Linux 12.5.0 \"Bookworm\" - Official amd64 NETINST with firmware 20240210-11:27",
    );
    write(&deb.join("install.amd/vmlinuz"), "k");
    write(&deb.join("install.amd/initrd.gz"), "i");
    let r = detect(&deb, &Hints::default()).unwrap();
    assert_eq!((r.family, r.arch.as_str()), (Family::Debian, "amd64"));
    assert_eq!(r.kernel, Path::new("install.amd/vmlinuz"));

    let di = d.path().join("netboot");
    di_tree(&di);
    let r = detect(&di, &Hints::default()).unwrap();
    assert_eq!((r.family, r.arch.as_str()), (Family::Debian, "amd64"));
    assert!(r.description.contains("bookworm"), "{}", r.description);

    let none = d.path().join("none");
    write(&none.join("README"), "x");
    let e = format!("{:#}", detect(&none, &Hints::default()).unwrap_err());
    assert!(e.contains("no installation tree"), "{e}");
    // A kernel named outside the tree is refused.
    let h = Hints {
        kernel: Some("../rocky/images/pxeboot/vmlinuz".into()),
        ..Default::default()
    };
    assert!(detect(&rh, &h).is_err());
}

fn bsdtar_available() -> bool {
    std::process::Command::new(distro::EXTRACTOR)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn imports_directories_tarballs_and_isos() {
    if !bsdtar_available() {
        eprintln!("SKIP: bsdtar (libarchive-tools) is not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(&d.path().join("state")).unwrap();
    let tree = d.path().join("tree");
    di_tree(&tree);
    let dist = import(&store, "dir", &tree, &Hints::default(), true).unwrap();
    assert!(dist.tree);
    let dd = store.distro_dir("dir").unwrap();
    assert_eq!(std::fs::read_to_string(dd.join("linux")).unwrap(), "kernel");
    assert!(dd.join("tree/version.info").is_file());
    assert!(import(&store, "dir", &tree, &Hints::default(), false).is_err());

    let tgz = d.path().join("netboot.tar.gz");
    let st = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&tgz)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let dist = import(&store, "tgz", &tgz, &Hints::default(), false).unwrap();
    assert_eq!((dist.family, dist.arch.as_str()), (Family::Debian, "amd64"));
    let iso = d.path().join("netboot.iso");
    let st = std::process::Command::new(distro::EXTRACTOR)
        .args(["--format", "iso9660", "-cf"])
        .arg(&iso)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let dist = import(&store, "iso", &iso, &Hints::default(), true).unwrap();
    assert_eq!(dist.family, Family::Debian);
    assert_eq!(
        std::fs::read_to_string(store.distro_dir("iso").unwrap().join("initrd")).unwrap(),
        "initrd"
    );
    let names: Vec<String> = store
        .distros()
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["dir", "iso", "tgz"]);
    // A broken archive leaves nothing behind.
    let junk = d.path().join("junk.iso");
    std::fs::write(&junk, b"not an archive").unwrap();
    assert!(import(&store, "junk", &junk, &Hints::default(), false).is_err());
    assert!(!store.distro_dir("junk").unwrap().exists());
    let left: Vec<_> = std::fs::read_dir(store.distros_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 3, "{left:?}");
    store.remove_distro("tgz").unwrap();
    assert!(store.distro("tgz").is_err());
}

#[test]
fn distro_in_use_is_not_removed() {
    let l = lab("x\n");
    let e = format!("{:#}", l.store.remove_distro("deb12").unwrap_err());
    assert!(e.contains("p1"), "{e}");
    l.store.remove_profile("p1").unwrap();
    l.store.remove_distro("deb12").unwrap();
}

#[test]
fn boot_action_points_at_the_nodes_answer_file() {
    let l = lab("x\n");
    let b = l.inv.boot_info("n1").unwrap().unwrap();
    let (a, args) = boot_action(&l.store, &b, &l.urls).unwrap();
    let t = l.store.existing_token("n1").unwrap().unwrap();
    assert_eq!(
        a,
        si_boot::bootcfg::BootAction::Autoinstall {
            family: Family::Debian,
            kernel: "si-distro/deb12/linux".into(),
            initrd: "si-distro/deb12/initrd".into(),
            answer_url: format!("http://10.213.0.1:8080/autoinstall/answer/n1/{t}"),
            tree_url: None,
            hostname: "n1".into(),
        }
    );
    // The profile's arguments, then the group's.
    assert_eq!(args, "priority=critical console=ttyS0");
}

fn route(l: &Lab) -> (AnswerRoute, Arc<Mutex<Vec<String>>>) {
    let done = Arc::new(Mutex::new(Vec::new()));
    let (d, inv) = (done.clone(), l.inv.clone());
    let r = AnswerRoute {
        store: l.store.clone(),
        inv: l.inv.clone(),
        urls: l.urls.clone(),
        on_done: Arc::new(move |n: &str| {
            d.lock().unwrap().push(n.to_string());
            inv.mark_installed(n)
        }),
    };
    (r, done)
}

#[test]
fn answer_files_go_only_to_their_node() {
    let l = lab("secret for {{ node }}\n");
    let (r, done) = route(&l);
    let t1 = l.store.token("n1").unwrap();
    let n1: IpAddr = "10.213.0.11".parse().unwrap();
    let n2: IpAddr = "10.213.0.12".parse().unwrap();
    let get = Method::GET;
    let ok = r.answer(n1, &get, &format!("answer/n1/{t1}"));
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.body, b"secret for n1\n");
    // Another node's address, a wrong token, n2's own token for n1's file.
    let t2 = l.store.token("n2").unwrap();
    for (peer, path) in [
        (n2, format!("answer/n1/{t1}")),
        (n1, format!("answer/n1/{}", "0".repeat(32))),
        (n1, format!("answer/n1/{t2}")),
        (n2, format!("answer/n1/{t2}")),
        ("::1".parse().unwrap(), format!("answer/n1/{t1}")),
    ] {
        let rep = r.answer(peer, &get, &path);
        assert_eq!(rep.status, StatusCode::FORBIDDEN, "{peer} {path}");
        assert!(!String::from_utf8_lossy(&rep.body).contains("secret"));
    }
    assert_eq!(
        r.answer(n1, &get, "answer/../../etc/passwd").status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        r.answer(n1, &get, "answer/ghost/x").status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        r.answer(n1, &Method::PUT, &format!("answer/n1/{t1}"))
            .status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    // The callback: only the node, only once; then it boots locally.
    assert_eq!(
        r.answer(n2, &Method::POST, &format!("done/n1/{t1}")).status,
        StatusCode::FORBIDDEN
    );
    assert!(done.lock().unwrap().is_empty());
    let rep = r.answer(n1, &Method::POST, &format!("done/n1/{t1}"));
    assert_eq!(rep.status, StatusCode::OK);
    assert_eq!(*done.lock().unwrap(), ["n1"]);
    let n = l.inv.node("n1").unwrap().unwrap();
    assert_eq!((n.boot, n.state.as_str()), (BootAction::Local, "installed"));
    assert_eq!(
        r.answer(n1, &get, &format!("done/n1/{t1}")).status,
        StatusCode::FORBIDDEN
    );
    // Installed: the answer file is no longer served, even with the old token.
    assert_eq!(
        r.answer(n1, &get, &format!("answer/n1/{t1}")).status,
        StatusCode::FORBIDDEN
    );
}

#[test]
fn a_render_error_serves_nothing() {
    let l = lab("password-hash $6$abc\n{{ oops }}\n");
    let (r, _) = route(&l);
    let t = l.store.token("n1").unwrap();
    let rep = r.answer(
        "10.213.0.11".parse().unwrap(),
        &Method::GET,
        &format!("answer/n1/{t}"),
    );
    assert_eq!(rep.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!String::from_utf8_lossy(&rep.body).contains("password"));
}

/// Through si-server's real HTTP service on loopback: node n1 is 127.0.0.2, n2 127.0.0.3; a
/// request from 127.0.0.3 for n1's file is refused, from 127.0.0.2 it is served.
#[tokio::test]
async fn http_route_refuses_another_nodes_address() {
    let l = lab("for {{ hostname }}\n");
    for (n, ip) in [("n1", "127.0.0.2"), ("n2", "127.0.0.3")] {
        let mut node = l.inv.node(n).unwrap().unwrap();
        node.ip = Some(ip.parse().unwrap());
        l.inv.update_nodes(&[node], &NoCatalog).unwrap();
    }
    let (r, _) = route(&l);
    let root = l.state.join("httproot");
    std::fs::create_dir(&root).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = si_boot::http::HttpConfig {
        root,
        routes: si_boot::http::Routes(vec![Arc::new(r)]),
        ..Default::default()
    };
    let generated = si_boot::bootcfg::Generated::default();
    generated
        .mount(DISTRO_PREFIX, &l.store.distros_dir())
        .unwrap();
    tokio::spawn(si_boot::http::serve(
        listener,
        cfg,
        generated,
        std::future::pending(),
    ));
    let t = l.store.token("n1").unwrap();
    async fn get(from: &str, addr: std::net::SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut c = s.connect(addr).await.unwrap();
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }
    let path = format!("/autoinstall/answer/n1/{t}");
    let r = get("127.0.0.3", addr, &path).await;
    assert!(
        r.starts_with("HTTP/1.1 403") && !r.contains("for n1"),
        "{r}"
    );
    let r = get("127.0.0.2", addr, &path).await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\nfor n1\n"),
        "{r}"
    );
    // The distro's kernel is served from the state directory's mount, to anyone.
    let r = get("127.0.0.3", addr, "/si-distro/deb12/linux").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("kernel"),
        "{r}"
    );
    let r = get("127.0.0.3", addr, "/si-distro/../autoinstall/tokens/n1").await;
    assert!(!r.contains(&t), "{r}");
}

/// The examples in images/autoinstall/ render for a node with only the shipped snippets, and
/// each ends with the callback to si-server.
#[test]
fn shipped_examples_render() {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/autoinstall");
    let l = lab("x\n");
    for e in std::fs::read_dir(ex.join("snippets")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let text = std::fs::read_to_string(e.path()).unwrap();
        l.store.put_snippet(&Scope::Global, &name, &text).unwrap();
    }
    let mut p = l.store.profile("p1").unwrap();
    p.vars
        .insert("repo_url".into(), "http://mirror/rocky".into());
    let token = l.store.token("n1").unwrap();
    let done = format!("http://10.213.0.1:8080/autoinstall/done/n1/{token}");
    for (file, must) in [
        ("debian12.preseed", "d-i netcfg/get_hostname string n1\n"),
        (
            "rocky9.ks",
            "network --bootproto=dhcp --hostname=n1 --activate\n",
        ),
        ("leap15.autoyast.xml", "<hostname>n1</hostname>"),
    ] {
        let t = std::fs::read_to_string(ex.join(file)).unwrap();
        l.store.put_profile(&p, &t).unwrap();
        let out = render(&l, "n1").unwrap_or_else(|e| panic!("{file}: {e:#}"));
        assert!(out.contains(must), "{file}:\n{out}");
        assert!(out.contains(&done), "{file}: no callback:\n{out}");
        assert!(!out.contains("{{") && !out.contains("{%"), "{file}:\n{out}");
    }
}
