//! A tiny initramfs that proves a node booted from the network (used by the PXE tests).
//!
//! It contains a static busybox, optional kernel modules (NIC drivers) and an `/init` that
//! loads the modules, gets an address with `udhcpc`, fetches `http://<si.http or si.server>/marker`
//! (from the kernel command line) with `wget`, prints it between `SI-MARKER-BEGIN` and
//! `SI-MARKER-END` on the console and powers off.

use crate::cpio::Archive;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

const INIT: &str = r#"#!/bin/sh
export PATH=/bin
mkdir -p /proc /sys /tmp /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in /lib/modules/*.ko; do [ -e "$m" ] && insmod "$m"; done
echo "SI-INIT: userspace reached"
ip link set lo up
server=
http=
for w in $(cat /proc/cmdline); do
  case "$w" in si.server=*) server="${w#si.server=}";; si.http=*) http="${w#si.http=}";; esac
done
[ -n "$http" ] && server=$http
ok=
for i in 1 2 3 4 5 6 7 8 9 10; do
  for ifc in $(ls /sys/class/net); do
    [ "$ifc" = lo ] && continue
    ip link set "$ifc" up
    if udhcpc -i "$ifc" -n -q -t 3 -T 1 -s /bin/udhcpc.script; then ok=$ifc; break 2; fi
  done
  sleep 1
done
echo "SI-DHCP: ${ok:-failed} $(ip -4 addr show dev ${ok:-lo} | grep inet)"
if wget -q -O /tmp/marker "http://$server/marker"; then
  echo "SI-MARKER-BEGIN $(cat /tmp/marker) SI-MARKER-END"
else
  echo "SI-MARKER-FAILED server=$server"
fi
sync
poweroff -f
"#;

const UDHCPC: &str = r#"#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via ${router%% *} dev "$interface"
    ;;
esac
exit 0
"#;

/// Applets linked to busybox in `/bin`.
const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "insmod", "ip", "cat", "ls", "udhcpc", "sleep", "wget", "poweroff",
    "sync", "grep",
];

/// Inputs of the test initramfs.
pub struct TestImage {
    /// A statically linked busybox (Debian: busybox-static, `/bin/busybox`).
    pub busybox: PathBuf,
    /// Kernel modules loaded in order (e.g. `e1000.ko`), uncompressed.
    pub modules: Vec<PathBuf>,
}

impl TestImage {
    /// Builds the uncompressed newc archive.
    pub fn build(&self) -> Result<Vec<u8>> {
        let mut a = Archive::new();
        for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
            a.dir(d)?;
        }
        a.char_dev("dev/console", 0o600, 5, 1)?;
        a.char_dev("dev/null", 0o666, 1, 3)?;
        let bb = std::fs::read(&self.busybox)
            .with_context(|| format!("reading {}", self.busybox.display()))?;
        a.file("bin/busybox", 0o755, &bb)?;
        for app in APPLETS {
            a.symlink(&format!("bin/{app}"), "busybox")?;
        }
        a.file("bin/udhcpc.script", 0o755, UDHCPC.as_bytes())?;
        a.file("init", 0o755, INIT.as_bytes())?;
        for (i, m) in self.modules.iter().enumerate() {
            let data =
                std::fs::read(m).with_context(|| format!("reading module {}", m.display()))?;
            let name = file_name(m)?;
            a.file(&format!("lib/modules/{i:02}-{name}"), 0o644, &data)?;
        }
        Ok(a.finish())
    }
}

fn file_name(p: &Path) -> Result<String> {
    p.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .with_context(|| format!("{} has no file name", p.display()))
}

/// The running system's module file for `name` (e.g. `e1000`) under `/lib/modules/<release>`.
pub fn find_module(release: &str, name: &str) -> Result<PathBuf> {
    let dir = Path::new("/lib/modules").join(release).join("kernel");
    let want = format!("{name}.ko");
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("listing {}", d.display()))?;
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == want.as_str()) {
                return Ok(p);
            }
        }
    }
    anyhow::bail!("module {want} not found under {}", dir.display())
}
