//! The inventory through its real command lines (`si-node`, `si-group`). Unprivileged.

use si_tests::bin;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn cli(state: &Path, tool: &str, args: &[&str]) -> Output {
    Command::new(bin(tool))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("SI_STORE")
        .output()
        .expect("running the CLI")
}

fn ok(state: &Path, tool: &str, args: &[&str]) -> String {
    let o = cli(state, tool, args);
    assert!(
        o.status.success(),
        "{tool} {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(state: &Path, tool: &str, args: &[&str], needle: &str) {
    let o = cli(state, tool, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{tool} {args:?} should fail");
    assert!(
        err.contains(needle),
        "{tool} {args:?}: expected {needle:?} in {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn cluster(state: &Path) {
    ok(
        state,
        "si-node",
        &[
            "subnet",
            "add",
            "lab",
            "--network",
            "10.213.0.0/16",
            "--pool",
            "10.213.100.1-10.213.100.99",
            "--lease-time",
            "600",
            "--router",
            "10.213.0.1",
        ],
    );
    ok(
        state,
        "si-group",
        &[
            "add",
            "compute",
            "--image",
            "rocky9",
            "--kernel-args",
            "console=ttyS0 quiet",
            "--firmware",
            "uefi",
            "--bmc-user",
            "admin",
            "--bmc-password",
            "Sup3rSecret",
            "--bmc-driver",
            "ipmi",
            "--images",
            "rocky9",
        ],
    );
    ok(
        state,
        "si-node",
        &[
            "add",
            "node[001-128]",
            "--mac",
            "52:54:00:00:00:01",
            "--ip",
            "10.213.0.11",
            "--group",
            "compute",
            "--bmc-host",
            "10.213.200.1",
        ],
    );
}

#[test]
fn ranges_duplicates_and_errors() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path().join("state");
    cluster(&s);
    let list = ok(&s, "si-node", &["list"]);
    assert_eq!(list.lines().count(), 129, "{list}");
    assert!(
        list.contains("node128          52:54:00:00:00:80  10.213.0.138"),
        "{list}"
    );
    let sub = ok(&s, "si-node", &["list", "node[001-003,128]"]);
    assert_eq!(sub.lines().count(), 5);
    fails(
        &s,
        "si-node",
        &["add", "x1", "--mac", "52:54:00:00:00:05"],
        "duplicate MAC",
    );
    fails(
        &s,
        "si-node",
        &["add", "x1", "--ip", "10.213.0.20"],
        "duplicate IP",
    );
    fails(
        &s,
        "si-node",
        &["add", "x1", "--ip", "192.168.7.7"],
        "outside every configured subnet",
    );
    fails(
        &s,
        "si-node",
        &["add", "x1", "--group", "gpu"],
        "unknown group",
    );
    fails(
        &s,
        "si-node",
        &["add", "x1", "--image", "nope", "--images", "rocky9"],
        "unknown image",
    );
    let store = d.path().join("store");
    std::fs::create_dir_all(store.join("images/debian12")).unwrap();
    fails(
        &s,
        "si-node",
        &[
            "add",
            "x1",
            "--image",
            "nope",
            "--store",
            store.to_str().unwrap(),
        ],
        "unknown image",
    );
    ok(
        &s,
        "si-node",
        &[
            "add",
            "x1",
            "--image",
            "debian12",
            "--store",
            store.to_str().unwrap(),
        ],
    );
    fails(&s, "si-node", &["add", "node[001-002]"], "already exists");
    fails(&s, "si-node", &["rm", "ghost"], "unknown node");
    fails(&s, "si-group", &["rm", "compute"], "still used");
    // Whole range refused atomically: node200 would collide on its MAC.
    fails(
        &s,
        "si-node",
        &["add", "node[200-201]", "--mac", "52:54:00:00:00:7f"],
        "duplicate MAC",
    );
    assert!(!ok(&s, "si-node", &["list"]).contains("node200"));
    ok(&s, "si-node", &["rm", "node[100-128]"]);
    assert_eq!(ok(&s, "si-node", &["list"]).lines().count(), 1 + 99 + 1);
}

#[test]
fn secrets_history_and_file_mode() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path().join("state");
    cluster(&s);
    let db = s.join("inventory.db");
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "inventory.db must be private");
    let show = ok(&s, "si-node", &["show", "node002"]);
    assert!(
        show.contains("password=***") && show.contains("host=10.213.200.2"),
        "{show}"
    );
    ok(&s, "si-node", &["installed", "node00[1-2]"]);
    ok(
        &s,
        "si-node",
        &[
            "set",
            "node003",
            "--boot",
            "custom",
            "--kernel",
            "vmlinuz-rescue",
            "--cmdline",
            "single",
        ],
    );
    ok(
        &s,
        "si-group",
        &["set", "compute", "--bmc-password", "Other0ne"],
    );
    let h = ok(&s, "si-node", &["history"]);
    assert!(h.contains("installed node/node001"), "{h}");
    assert!(h.contains("boot: install -> local"), "{h}");
    assert!(h.contains("custom(kernel=vmlinuz-rescue"), "{h}");
    assert!(h.contains("bmc.password changed"), "{h}");
    let all = [
        h,
        show,
        ok(&s, "si-node", &["export"]),
        ok(&s, "si-group", &["show", "compute"]),
        ok(&s, "si-node", &["list"]),
    ]
    .concat();
    assert!(
        !all.contains("Sup3rSecret") && !all.contains("Other0ne"),
        "a password leaked"
    );
    let list = ok(&s, "si-node", &["list", "node00[1-3]"]);
    assert!(list.contains("local") && list.contains("custom"), "{list}");
}

#[test]
fn export_import_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    cluster(&a);
    ok(
        &a,
        "si-node",
        &[
            "set",
            "node005",
            "--permanent",
            "true",
            "--hostname",
            "five",
        ],
    );
    let secret = ok(&a, "si-node", &["export", "--with-secrets"]);
    let file = d.path().join("cluster.toml");
    std::fs::write(&file, &secret).unwrap();
    // Into an empty inventory: the same cluster comes out.
    let b = d.path().join("b");
    ok(&b, "si-node", &["import", file.to_str().unwrap()]);
    let strip = |s: String| s.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(
        strip(ok(&b, "si-node", &["export", "--with-secrets"])),
        strip(secret.clone())
    );
    // Re-importing the redacted export changes nothing, and keeps the password.
    let redacted = ok(&b, "si-node", &["export"]);
    assert!(redacted.contains("password = \"***\""));
    let f2 = d.path().join("redacted.toml");
    std::fs::write(&f2, &redacted).unwrap();
    let before = ok(&b, "si-node", &["history", "--limit", "100000"])
        .lines()
        .count();
    ok(&b, "si-node", &["import", f2.to_str().unwrap()]);
    let after = ok(&b, "si-node", &["history", "--limit", "100000"])
        .lines()
        .count();
    assert_eq!(before, after, "a no-op import records no change");
    assert_eq!(
        strip(ok(&b, "si-node", &["export", "--with-secrets"])),
        strip(secret)
    );
    // Edit the file declaratively: one node moves, one disappears with --prune.
    let edited = redacted
        .replace("ip = \"10.213.0.12\"", "ip = \"10.213.1.12\"")
        .replace("name = \"node128\"", "name = \"node999\"");
    std::fs::write(&f2, edited).unwrap();
    ok(&b, "si-node", &["import", "--prune", f2.to_str().unwrap()]);
    let list = ok(&b, "si-node", &["list"]);
    assert!(
        list.contains("10.213.1.12") && list.contains("node999") && !list.contains("node128"),
        "{list}"
    );
    // A broken file is refused as a whole.
    std::fs::write(&f2, "[[node]]\nname = \"n\"\nbogus = 1\n").unwrap();
    fails(&b, "si-node", &["import", f2.to_str().unwrap()], "bogus");
}

/// A process that holds the inventory open twice (si-server does: its own handle and the DHCP
/// reader's) keeps its writes visible to other processes. Regression: opening the second handle
/// used to open and close a plain descriptor of the database, which dropped the process's
/// SQLite locks; the next CLI then believed it was the last reader, checkpointed and deleted
/// the WAL, and the server's enrollments and reports from then on went to an unlinked file.
#[test]
fn a_second_handle_keeps_the_first_handles_writes_visible() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path();
    ok(
        state,
        "si-node",
        &["add", "n1", "--mac", "52:54:00:00:00:01"],
    );
    let first = si_inventory::Inventory::open_state_dir(state).unwrap();
    let _second = si_inventory::Inventory::open_state_dir(state).unwrap();
    // Another process reads and closes the inventory while both handles are open.
    ok(state, "si-node", &["list"]);
    ok(state, "si-node", &["set", "n1", "--boot", "local"]);
    // It knew it was not the last reader: the WAL this process writes to is still the file's.
    assert!(
        state.join("inventory.db-wal").exists(),
        "another process deleted the WAL of an inventory this process holds open"
    );
    first.arm_enrollment("n1", 3600).unwrap();
    let shown = ok(state, "si-node", &["show", "n1"]);
    assert!(shown.contains("enrollment: open until"), "{shown}");
    let history = ok(state, "si-node", &["history", "n1"]);
    assert!(history.contains("enroll-armed"), "{history}");
}
