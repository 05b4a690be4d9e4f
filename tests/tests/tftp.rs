//! TFTP and HTTP served by si-bootd to real clients (tftp-hpa, atftp, busybox wget/nc), the
//! server in one network namespace and the clients in another (10.213.2.0/24).
//!
//! Needs root and the Debian packages tftp-hpa, atftp, busybox-static.

use anyhow::{Context, Result};
use si_tests::{bin, require_root, wait_for_log, Netns, Proc as Guard};
use std::path::{Path, PathBuf};
use std::process::Stdio;

const SERVER: &str = "10.213.2.1";

struct Setup {
    // Field order matters: the server dies before its namespace is deleted.
    _server: Guard,
    _server_ns: Netns,
    client: Netns,
    root: PathBuf,
    dir: tempfile::TempDir,
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn setup() -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("sub"))?;
    std::fs::write(root.join("big"), pseudo_random(3_000_000 + 77, 1))?;
    std::fs::write(root.join("exact"), pseudo_random(1432 * 40, 2))?;
    std::fs::write(root.join("sub/small"), b"hello\nworld\r\n")?;
    std::fs::write(root.join("empty"), b"")?;
    std::fs::write(dir.path().join("secret"), b"secret")?;
    std::os::unix::fs::symlink("../secret", root.join("escape"))?;
    std::os::unix::fs::symlink("/etc/passwd", root.join("passwd"))?;

    let server_ns = Netns::new()?;
    let client = Netns::new()?;
    server_ns.link(&format!("{SERVER}/24"), &client, "10.213.2.2/24")?;
    let log = dir.path().join("bootd.log");
    let mut child = server_ns
        .cmd(bin("si-bootd"))
        .arg("--tftp-root")
        .arg(&root)
        .args(["--tftp-listen", &format!("{SERVER}:69")])
        .args(["--http-listen", &format!("{SERVER}:8080")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting si-bootd")?;
    wait_for_log(
        &log,
        &["TFTP server listening", "HTTP server listening"],
        &mut child,
    )?;
    Ok(Setup {
        _server: Guard(child),
        _server_ns: server_ns,
        client,
        root,
        dir,
    })
}

impl Setup {
    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// tftp-hpa (no RFC 2347 options in this client); returns its output.
    fn hpa(&self, mode: &str, remote: &str, local: &Path) -> Result<String> {
        let o = self
            .client
            .cmd("tftp")
            .args(["-m", mode, SERVER, "-c", "get", remote])
            .arg(local)
            .output()
            .context("running tftp-hpa")?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }

    fn atftp(&self, options: &[&str], remote: &str, local: &Path) -> Result<(bool, String)> {
        let mut c = self.client.cmd("atftp");
        for o in options {
            c.args(["--option", o]);
        }
        let o = c
            .args(["-g", "-r", remote, "-l"])
            .arg(local)
            .arg(SERVER)
            .output()
            .context("running atftp")?;
        let msg = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Ok((o.status.success(), msg))
    }
}

#[test]
fn tftp_hpa_and_atftp_fetch_files() {
    require_root!();
    let s = setup().unwrap();
    for name in ["big", "exact", "sub/small", "empty"] {
        let want = std::fs::read(s.root.join(name)).unwrap();
        let out = s.out("hpa");
        let msg = s.hpa("binary", name, &out).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == want,
            "tftp-hpa octet {name}: {msg}"
        );
        for opts in [
            &[][..],
            &["blksize 1432", "tsize 0"][..],
            &["blksize 1408"][..],
            &["blksize 1024"][..],
            &["blksize 1468", "windowsize 4", "tsize 0"][..],
            &["blksize 8192", "windowsize 16", "timeout 2"][..],
        ] {
            let out = s.out("atftp");
            let _ = std::fs::remove_file(&out);
            let (ok, msg) = s.atftp(opts, name, &out).unwrap();
            assert!(ok, "atftp {opts:?} {name}: {msg}");
            assert!(
                std::fs::read(&out).unwrap() == want,
                "atftp {opts:?} {name}: content differs"
            );
        }
    }
    // netascii: the client turns CRLF back into LF, so the text round-trips.
    let out = s.out("ascii");
    let msg = s.hpa("netascii", "sub/small", &out).unwrap();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        b"hello\nworld\r\n",
        "netascii: {msg}"
    );
}

#[test]
fn tftp_refuses_paths_outside_root() {
    require_root!();
    let s = setup().unwrap();
    for bad in [
        "../secret",
        "/../secret",
        "sub/../../secret",
        "escape",
        "passwd",
        "/etc/passwd",
        "sub",
        "missing",
    ] {
        let out = s.out("bad");
        let _ = std::fs::remove_file(&out);
        let msg = s.hpa("binary", bad, &out).unwrap();
        assert!(
            msg.contains("Error code"),
            "tftp-hpa {bad}: no error: {msg}"
        );
        let got = std::fs::read(&out).unwrap_or_default();
        assert!(got.is_empty(), "tftp-hpa {bad}: got {} bytes", got.len());
        let _ = std::fs::remove_file(&out);
        let (ok, msg) = s.atftp(&["blksize 1432"], bad, &out).unwrap();
        assert!(
            !ok || std::fs::read(&out).unwrap_or_default().is_empty(),
            "atftp {bad}: {msg}"
        );
    }
    // A write request is refused.
    let src = s.out("upload");
    std::fs::write(&src, b"x").unwrap();
    let o = s
        .client
        .cmd("tftp")
        .args(["-m", "binary", SERVER, "-c", "put"])
        .arg(&src)
        .arg("new")
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(msg.contains("Error code 2"), "put: {msg}");
    assert!(!s.root.join("new").exists());
}

#[test]
fn http_serves_files_beneath_root() {
    require_root!();
    let s = setup().unwrap();
    let out = s.out("wget");
    let o = s
        .client
        .cmd("busybox")
        .args(["wget", "-q", "-O"])
        .arg(&out)
        .arg(format!("http://{SERVER}:8080/big"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(s.root.join("big")).unwrap());
    // Raw requests, so no client normalises the path for us.
    for (req, want) in [
        ("GET /../secret HTTP/1.0\r\n\r\n", "403"),
        ("GET /%2e%2e/secret HTTP/1.0\r\n\r\n", "403"),
        ("GET /escape HTTP/1.0\r\n\r\n", "403"),
        ("GET /missing HTTP/1.0\r\n\r\n", "404"),
        ("PUT /new HTTP/1.0\r\nContent-Length: 0\r\n\r\n", "405"),
        (
            "GET /sub/small HTTP/1.0\r\nRange: bytes=6-10\r\n\r\n",
            "206",
        ),
    ] {
        let script = format!(
            "(printf '{}'; sleep 1) | busybox nc {SERVER} 8080",
            req.replace('%', "%%")
                .replace('\r', "\\r")
                .replace('\n', "\\n")
        );
        let o = s.client.sh(&script).unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        let status = text.lines().next().unwrap_or("");
        assert!(status.contains(want), "{req:?}: {status}");
        assert!(!text.ends_with("secret"), "{req:?} leaked: {text}");
        if want == "206" {
            assert!(text.ends_with("world"), "range body: {text:?}");
        }
    }
}

/// Hundreds of never-acknowledged read requests asking for a 255 s timeout, from attackers at
/// other addresses of the client network (10.213.2.10-19), cannot lock TFTP out: the long
/// timeout is not granted, each source is capped, and real clients (atftp and tftp-hpa, from
/// 10.213.2.2) are served while the flood is under way.
#[test]
fn never_acknowledged_requests_do_not_lock_tftp_out() {
    require_root!();
    let s = setup().unwrap();
    for i in 10..20 {
        // On the veth end that holds 10.213.2.2.
        s.client
            .sh(&format!(
                "ip addr add 10.213.2.{i}/24 dev $(ip -o -4 addr show | awk '/10.213.2.2\\//{{print $2}}')"
            ))
            .unwrap();
    }
    // 300 requests (30 per source), sent and never acknowledged.
    let flood = r#"
import socket
socks = []
for i in range(300):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("10.213.2.%d" % (10 + i % 10), 0))
    s.sendto(b"\0\1big\0octet\0timeout\0" + b"255\0", ("10.213.2.1", 69))
    socks.append(s)
busy = served = 0
for s in socks:
    s.settimeout(0.3)
    try:
        d, _ = s.recvfrom(2048)
        if d[:2] == b"\0\5" and b"busy" in d:
            busy += 1
        elif d[:4] == b"\0\3\0\1":
            served += 1
    except socket.timeout:
        pass
print(busy, served)
"#;
    let start = std::time::Instant::now();
    let o = s
        .client
        .cmd("python3")
        .args(["-c", flood])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let n: Vec<usize> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    let (busy, served) = (n[0], n[1]);
    eprintln!("flood: {busy} told busy, {served} served a first block (never acknowledged)");
    // At most 8 per source are served (DATA 1 straight away: the 255 s timeout is not
    // granted, so no OACK); the rest are told "busy" at once (a burst may also lose some).
    assert!(
        served <= 10 * 8,
        "{served} served: the per-source cap did not hold"
    );
    assert!(busy >= 150, "{busy} busy answers");
    // While those 80 wait for ACKs that never come, real clients fetch at once.
    let want = std::fs::read(s.root.join("sub/small")).unwrap();
    let out = s.out("flood-atftp");
    let (ok, msg) = s.atftp(&["timeout 255"], "sub/small", &out).unwrap();
    assert!(ok, "{msg}");
    assert_eq!(std::fs::read(&out).unwrap(), want);
    let out = s.out("flood-hpa");
    let msg = s.hpa("octet", "sub/small", &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), want, "{msg}");
    let took = start.elapsed();
    eprintln!("300 stalled requests, then two real fetches: {took:?}");
    // Bounded: nothing waited for a 255 s timeout.
    assert!(took < std::time::Duration::from_secs(30), "{took:?}");
}
