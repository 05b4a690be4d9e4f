//! The install as named steps, each timed, logged and reported to the master with
//! SystemImager's monitor states (0-99 percent, 100 imaged, 101 finalizing, negative errors).

use crate::config::{Config, OnError, Reinstall};
use crate::gen;
use crate::plan::{Concrete, MIB};
use anyhow::{anyhow, bail, Context, Result};
use si_agent::pull::Client;
use si_proto::layout::{Firmware, Layout, Table};
use si_proto::plan::{InstallPlan, PostAction, ScriptStage};
use si_trust::{Connector, NodeIdentity};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A relaying installer's memory for its successors (MiB of compressed objects; older ones
/// are read back from the tree).
const RELAY_BUFFER_MIB: usize = 256;
/// An upstream silent this long is left for the next one.
const RELAY_STALL: Duration = Duration::from_secs(5);
/// How long the relay waits for an object a successor asks for before it has it.
const RELAY_WAIT: Duration = Duration::from_secs(30);
/// Once pulled, the pull step goes on serving until no successor asked for this long.
const RELAY_LINGER: Duration = Duration::from_secs(10);

/// The steps, in order (`si.break=` and `si.fail=` take these names).
pub const STEPS: &[&str] = &[
    "plan",
    "disks",
    "pre-scripts",
    "wipe",
    "partition",
    "raid",
    "lvm",
    "mkfs",
    "mount",
    "pull",
    "overrides",
    "configure",
    "post-scripts",
    "initramfs",
    "bootloader",
    "finish",
];

/// Monitor percent when each step starts.
fn percent(step: &str) -> i32 {
    match step {
        "plan" => 1,
        "disks" => 2,
        "pre-scripts" => 3,
        "wipe" => 4,
        "partition" => 5,
        "raid" => 7,
        "lvm" => 8,
        "mkfs" => 9,
        "mount" => 12,
        "pull" => 15,
        "overrides" => 90,
        "configure" => 92,
        "post-scripts" => 94,
        "initramfs" => 96,
        "bootloader" => 98,
        _ => 99,
    }
}

/// The state recorded on the target about the install (`/var/lib/si/install.toml`): what a
/// fast reinstall checks before it updates in place.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct InstallRecord {
    pub node: String,
    pub image: String,
    /// BLAKE3 of the layout TOML installed.
    pub layout: String,
    /// Physical disk ← layout disk, with each disk's size.
    pub disks: Vec<(String, String, u64)>,
    pub when: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct StepTime {
    pub step: String,
    pub seconds: f64,
}

pub struct Installer {
    pub cfg: Config,
    pub target: PathBuf,
    log: Vec<String>,
    pub times: Vec<StepTime>,
    report: Option<Client>,
    /// How this installer reaches the master: TLS pinned to si.ca=, with the node certificate
    /// it enrolled for (si.token=), or plain TCP under si.insecure.
    connector: Option<Connector>,
    /// The identity enrolled for, kept on the installed node (outside the image).
    identity: Option<NodeIdentity>,
    node: String,
    /// What was written, for the error path.
    touched: Vec<String>,
    mounted: Vec<PathBuf>,
    raids_made: Vec<PathBuf>,
    vgs_made: Vec<String>,
    pub plan: Option<InstallPlan>,
    pub concrete: Option<Concrete>,
    layout_text: String,
    uuids: BTreeMap<String, String>,
    md_uuids: BTreeMap<String, String>,
    synced: bool,
    /// Directories of the image the installer writes into, and their mtimes in the image.
    dir_times: Vec<(PathBuf, rustix::fs::Timespec)>,
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// LVM without udev (the installer's initramfs has none): the tools create the nodes.
fn lvm(args: &[&str]) -> Result<String> {
    run(Command::new("lvm")
        .args(args)
        .args(["--config", "activation { udev_sync = 0 udev_rules = 0 }"])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1"))
}

/// The /dev path of an md array of the layout.
pub fn md_path(name: &str) -> PathBuf {
    if name
        .strip_prefix("md")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    {
        Path::new("/dev").join(name)
    } else {
        Path::new("/dev/md").join(name)
    }
}

impl Installer {
    pub fn new(cfg: Config) -> Installer {
        let target = cfg.target.clone().unwrap_or_else(|| PathBuf::from("/a"));
        Installer {
            node: cfg.node.clone().unwrap_or_default(),
            cfg,
            target,
            log: Vec::new(),
            times: Vec::new(),
            report: None,
            connector: None,
            identity: None,
            touched: Vec::new(),
            mounted: Vec::new(),
            raids_made: Vec::new(),
            vgs_made: Vec::new(),
            plan: None,
            concrete: None,
            layout_text: String::new(),
            uuids: BTreeMap::new(),
            md_uuids: BTreeMap::new(),
            synced: false,
            dir_times: Vec::new(),
        }
    }

    fn say(&mut self, line: impl Into<String>) {
        let line = line.into();
        println!("{line}");
        let _ = std::io::stdout().flush();
        self.log.push(line);
    }

    fn send(&mut self, state: &str, detail: &str) {
        let Some(c) = self.report.as_mut() else {
            return;
        };
        let Err(e) = c.report(&self.node, state, detail) else {
            return;
        };
        // The master closes a session that was quiet for its idle timeout (a long pull says
        // nothing on the report session): one new session, then the report again.
        tracing::debug!(
            error = format!("{e:#}"),
            "report session lost; reconnecting"
        );
        self.report = None;
        let (Some(server), Some(conn)) = (self.cfg.server.clone(), self.connector.clone()) else {
            return;
        };
        match Client::connect(&server, Duration::from_secs(10), &conn).and_then(|mut c| {
            c.report(&self.node, state, detail)?;
            Ok(c)
        }) {
            Ok(c) => self.report = Some(c),
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "the master did not take a report")
            }
        }
    }

    /// The install log to the master (state `log`; its last 48 KiB, within a frame).
    fn send_log(&mut self) {
        const MAX: usize = 48 << 10;
        let text = self.log.join("\n");
        let mut start = text.len().saturating_sub(MAX);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        let tail = text[start..].to_string();
        self.send("log", &tail);
    }

    /// The whole install: the steps, then the post-action; on failure the error path.
    pub fn install(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let res = self.steps();
        match res {
            Ok(()) => {
                let secs = t0.elapsed().as_secs_f64();
                self.say(format!(
                    "si-install: {} installed in {secs:.1} s",
                    self.node
                ));
                Ok(())
            }
            Err(e) => {
                let msg = format!("{e:#}");
                // The original error first, to the console and the master.
                eprintln!("si-install: FAILED: {msg}");
                self.log.push(format!("FAILED: {msg}"));
                self.send("failed", &format!("status=-1 {msg}"));
                self.send_log();
                self.on_error();
                Err(e)
            }
        }
    }

    fn step(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        debug_assert!(STEPS.contains(&name));
        if self.cfg.breaks_before(name) {
            self.say(format!(
                "si.break={name}: stopping before {name}; exit the shell to go on"
            ));
            shell();
        }
        let pct = percent(name);
        self.send("installing", &format!("status={pct} step={name}"));
        let t = Instant::now();
        if self.cfg.fail_at.as_deref() == Some(name) {
            bail!("step {name}: failing on purpose (si.fail={name})");
        }
        f(self).with_context(|| format!("step {name}"))?;
        let secs = t.elapsed().as_secs_f64();
        self.say(format!("step {name}: done in {secs:.2} s"));
        self.times.push(StepTime {
            step: name.into(),
            seconds: secs,
        });
        Ok(())
    }

    fn steps(&mut self) -> Result<()> {
        self.step("plan", |s| s.get_plan())?;
        self.step("disks", |s| s.disks())?;
        if self.cfg.dry_run {
            self.say("dry run: nothing written");
            return Ok(());
        }
        self.step("pre-scripts", |s| s.scripts(ScriptStage::Pre))?;
        let mut synced = false;
        if self.try_sync()? {
            self.step("mount", |s| s.mount())?;
            synced = self.check_record()?;
            if !synced {
                self.unmount_all();
            }
        }
        if !synced {
            self.step("wipe", |s| s.wipe())?;
            self.step("partition", |s| s.partition())?;
            self.step("raid", |s| s.raid())?;
            self.step("lvm", |s| s.lvm())?;
            self.step("mkfs", |s| s.mkfs())?;
            self.step("mount", |s| s.mount())?;
        }
        self.step("pull", |s| s.pull())?;
        self.send("imaged", "status=100");
        self.send("finalizing", "status=101");
        self.step("overrides", |s| s.overrides())?;
        self.step("configure", |s| s.configure())?;
        self.step("post-scripts", |s| s.scripts(ScriptStage::Post))?;
        self.step("initramfs", |s| s.initramfs())?;
        self.step("bootloader", |s| s.bootloader())?;
        self.step("finish", |s| s.finish())?;
        let detail = {
            let p = self.plan.as_ref().expect("planned");
            format!("status=101 image={} version={:?}", p.image, p.version)
        };
        self.send_log();
        self.send("installed", &detail);
        Ok(())
    }

    /// The connector to the master, made once: `si.insecure` gives plain TCP; otherwise the CA
    /// pinned by `si.ca=`, and, when the boot script carried `si.token=`, the node certificate
    /// enrolled for with a key made here (see docs/security.md).
    fn connector(&mut self, server: &str) -> Result<Connector> {
        if let Some(c) = &self.connector {
            return Ok(c.clone());
        }
        let c = if self.cfg.insecure {
            Connector::from_options(None, true, None)?
        } else {
            let pin: si_trust::Fingerprint = self
                .cfg
                .ca
                .as_deref()
                .ok_or_else(|| anyhow!("no si.ca= given: the installer pins the master's CA (si-server ca show prints it), or runs si.insecure"))?
                .parse()
                .context("reading si.ca=")?;
            match (&self.cfg.token, &self.cfg.node) {
                (Some(token), Some(node)) => {
                    let mac = boot_mac().unwrap_or_default();
                    let uuid = std::fs::read_to_string("/sys/class/dmi/id/product_uuid")
                        .map(|s| s.trim().to_string())
                        .unwrap_or_default();
                    let id = si_trust::enroll::enroll(server, pin, node, token, &mac, &uuid)
                        .with_context(|| format!("enrolling {node} with the master"))?;
                    self.say(format!("enrolled {node} with the master (MAC {mac})"));
                    let c = Connector::master(pin, Some(&id))?;
                    self.identity = Some(id);
                    c
                }
                (Some(_), None) => bail!("si.token= needs si.node=: a token is bound to its node"),
                _ => Connector::master(pin, None)?,
            }
        };
        self.connector = Some(c.clone());
        Ok(c)
    }

    fn get_plan(&mut self) -> Result<()> {
        if let Some(server) = self.cfg.server.clone() {
            let conn = self.connector(&server)?;
            match Client::connect(&server, Duration::from_secs(10), &conn) {
                Ok(c) => self.report = Some(c),
                Err(e) if self.cfg.config.is_some() => {
                    tracing::warn!(error = format!("{e:#}"), "no master to report to")
                }
                Err(e) => return Err(e.context("connecting to the master")),
            }
        }
        let mut plan: InstallPlan = match &self.cfg.config {
            Some(f) => {
                let t = std::fs::read_to_string(f)
                    .with_context(|| format!("reading the install plan {}", f.display()))?;
                toml::from_str(&t).with_context(|| format!("parsing {}", f.display()))?
            }
            None => {
                let node = match self.cfg.node.clone() {
                    Some(n) => n,
                    // The master knows the node by its MAC.
                    None => boot_mac().ok_or_else(|| {
                        anyhow!("no si.node= given and no network interface with a MAC to identify this node")
                    })?,
                };
                let c = self
                    .report
                    .as_mut()
                    .ok_or_else(|| anyhow!("no si.server= given: cannot fetch the install plan"))?;
                let t = c.plan(&node)?;
                toml::from_str(&t).context("parsing the master's install plan")?
            }
        };
        if let Some(i) = &self.cfg.image {
            plan.image = i.clone();
        }
        if self.cfg.version.is_some() {
            plan.version = self.cfg.version;
        }
        if let Some(p) = self.cfg.post {
            plan.post = p;
        }
        if plan.node.is_empty() {
            plan.node = self.cfg.node.clone().unwrap_or_default();
        }
        plan.check().map_err(|e| anyhow!(e))?;
        if self.node.is_empty() {
            self.node = plan.node.clone();
        }
        self.say(format!(
            "install plan: node {} image {} version {} post {:?}",
            plan.node,
            plan.image,
            plan.version.map_or("newest".into(), |v| v.to_string()),
            plan.post
        ));
        self.plan = Some(plan);
        Ok(())
    }

    fn firmware(&self) -> Firmware {
        match self.cfg.firmware {
            Some(crate::config::FirmwareArg::Bios) => Firmware::Bios,
            Some(crate::config::FirmwareArg::Uefi) => Firmware::Uefi,
            None if Path::new("/sys/firmware/efi").exists() => Firmware::Uefi,
            None => Firmware::Bios,
        }
    }

    fn disks(&mut self) -> Result<()> {
        let plan = self.plan.as_ref().expect("planned");
        let text = plan
            .layout
            .clone()
            .ok_or_else(|| anyhow!("the install plan has no disk layout"))?;
        let layout = Layout::parse(&text).map_err(|e| anyhow!(e))?;
        let devs = crate::disks::lsblk()?;
        let cands = crate::disks::candidates(&devs, &self.cfg.disks, &crate::disks::by_path_names);
        let chosen = crate::disks::assign(&layout, &cands)?;
        let c = Concrete::new(&layout, &chosen, self.firmware())?;
        let rendered = c.render();
        for l in rendered.lines() {
            self.say(l.to_string());
        }
        self.layout_text = text;
        self.concrete = Some(c);
        Ok(())
    }

    fn c(&self) -> &Concrete {
        self.concrete.as_ref().expect("disks step ran")
    }

    /// A fast reinstall: the disks match the layout and hold an earlier si install.
    fn try_sync(&mut self) -> Result<bool> {
        if self.cfg.reinstall != Some(Reinstall::Sync) {
            return Ok(false);
        }
        let c = self.c().clone();
        for d in &c.disks {
            let known = d.partitions.iter().all(|p| {
                crate::disks::partition_node(Path::new("/sys/class/block"), &d.disk, p.number)
                    .is_ok()
            });
            if !known {
                run(Command::new("partx")
                    .arg("-a")
                    .arg(Path::new("/dev").join(&d.disk)))
                .ok();
            }
        }
        // Arrays and volume groups of an earlier install come up first (no udev here).
        if !c.raids.is_empty() {
            run(Command::new("mdadm").args(["--assemble", "--scan"])).ok();
        }
        for g in &c.vgs {
            lvm(&["vgchange", "-ay", g.name.as_str()]).ok();
        }
        // Each filesystem must be there with the type the layout says.
        let mut uuids = BTreeMap::new();
        for f in &c.filesystems {
            let dev = self.device(&f.device)?;
            let got = run(Command::new("blkid")
                .args(["-p", "-s", "TYPE", "-s", "UUID", "-o", "export"])
                .arg(&dev));
            let Ok(got) = got else {
                self.say(format!(
                    "fast reinstall: {} holds no filesystem; wiping",
                    dev.display()
                ));
                return Ok(false);
            };
            let kv: BTreeMap<&str, &str> = got.lines().filter_map(|l| l.split_once('=')).collect();
            if kv.get("TYPE") != Some(&f.fstype.as_str()) {
                self.say(format!(
                    "fast reinstall: {} holds {:?}, the layout wants {}; wiping",
                    dev.display(),
                    kv.get("TYPE"),
                    f.fstype
                ));
                return Ok(false);
            }
            if let Some(u) = kv.get("UUID") {
                uuids.insert(f.device.clone(), u.to_string());
            }
        }
        self.uuids = uuids;
        Ok(true)
    }

    /// With the layout mounted: whether the record of the earlier install names this layout
    /// and these disks.
    fn check_record(&mut self) -> Result<bool> {
        let rec = std::fs::read_to_string(self.target.join("var/lib/si/install.toml"));
        let rec: Option<InstallRecord> = rec.ok().and_then(|t| toml::from_str(&t).ok());
        let want = self.disk_record();
        let layout = si_proto::Digest::of(self.layout_text.as_bytes()).to_hex();
        match rec {
            Some(r) if r.layout == layout && r.disks == want => {
                self.say(format!(
                    "fast reinstall: the disks hold {}'s earlier install of {}; updating in place",
                    r.node, r.image
                ));
                self.synced = true;
                Ok(true)
            }
            Some(_) => {
                self.say("fast reinstall: the earlier install used another layout or other disks; wiping");
                self.uuids.clear();
                Ok(false)
            }
            None => {
                self.say("fast reinstall: no earlier si install found; wiping");
                self.uuids.clear();
                Ok(false)
            }
        }
    }

    fn disk_record(&self) -> Vec<(String, String, u64)> {
        self.c()
            .disks
            .iter()
            .map(|d| (d.disk.clone(), d.layout_disk.clone(), d.size))
            .collect()
    }

    fn scripts(&mut self, stage: ScriptStage) -> Result<()> {
        let plan = self.plan.clone().expect("planned");
        let host = plan.hostname.clone().unwrap_or_else(|| plan.node.clone());
        for s in gen::scripts_for(&plan, stage, &host) {
            let t = Instant::now();
            let mut cmd = match stage {
                ScriptStage::Pre => {
                    let p = std::env::temp_dir().join(format!("si-{}", s.name));
                    write_exec(&p, &s.body)?;
                    Command::new(p)
                }
                ScriptStage::Post => {
                    let rel = format!("tmp/si-{}", s.name);
                    write_exec(&self.target.join(&rel), &s.body)?;
                    let mut c = Command::new("chroot");
                    c.arg(&self.target).arg(format!("/{rel}"));
                    c
                }
            };
            cmd.env("SI_IMAGE", &plan.image)
                .env("SI_NODE", &plan.node)
                .env("SI_HOSTNAME", &host)
                .env("SI_TARGET", &self.target);
            let out = run(&mut cmd).with_context(|| format!("script {}", s.name))?;
            for l in out.lines() {
                self.log.push(format!("  {}: {l}", s.name));
            }
            if stage == ScriptStage::Post {
                std::fs::remove_file(self.target.join(format!("tmp/si-{}", s.name))).ok();
            }
            self.say(format!(
                "script {} ran in {:.2} s",
                s.name,
                t.elapsed().as_secs_f64()
            ));
        }
        Ok(())
    }

    /// Stops md arrays and LVM on the chosen disks, then wipes every signature.
    fn wipe(&mut self) -> Result<()> {
        let c = self.c().clone();
        let disks: Vec<PathBuf> = c
            .disks
            .iter()
            .map(|d| Path::new("/dev").join(&d.disk))
            .collect();
        // Volume groups with a PV on these disks (or on arrays on them).
        let mut parts: Vec<PathBuf> = Vec::new();
        for d in &c.disks {
            parts.extend(sys_partitions(&d.disk));
        }
        let pvs = lvm(&["pvs", "--noheadings", "-o", "pv_name,vg_name"]).unwrap_or_default();
        let mut holders: Vec<String> = Vec::new();
        for d in &c.disks {
            holders.extend(sys_holders(&d.disk));
        }
        let mut vgs: Vec<String> = Vec::new();
        for l in pvs.lines() {
            let mut w = l.split_whitespace();
            let (Some(pv), Some(vg)) = (w.next(), w.next()) else {
                continue;
            };
            let pvname = pv.trim_start_matches("/dev/");
            let ours = disks.iter().chain(parts.iter()).any(|p| p == Path::new(pv))
                || holders
                    .iter()
                    .any(|h| h == pvname || sys_name(pv).is_some_and(|n| &n == h));
            if ours && !vgs.contains(&vg.to_string()) {
                vgs.push(vg.to_string());
            }
        }
        for vg in &vgs {
            self.say(format!("deactivating volume group {vg}"));
            lvm(&["vgchange", "-an", vg])
                .with_context(|| format!("deactivating volume group {vg}"))?;
        }
        for h in holders.iter().filter(|h| h.starts_with("md")) {
            self.say(format!("stopping md array {h}"));
            run(Command::new("mdadm")
                .arg("--stop")
                .arg(Path::new("/dev").join(h)))?;
        }
        for p in parts.iter().chain(disks.iter()) {
            wipefs(p).with_context(|| format!("wiping {}", p.display()))?;
        }
        Ok(())
    }

    fn partition(&mut self) -> Result<()> {
        let c = self.c().clone();
        for d in &c.disks {
            let ss = d.sector_size;
            let mut script = String::from(match d.table {
                Table::Gpt => "label: gpt\n",
                Table::Msdos => "label: dos\n",
            });
            script.push_str("unit: sectors\n\n");
            for p in &d.partitions {
                let ptype = match d.table {
                    Table::Gpt => p.ptype.clone(),
                    Table::Msdos => p.ptype.trim_start_matches("0x").to_string(),
                };
                if ptype.is_empty() || !ptype.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                {
                    bail!(
                        "disk {} partition {}: bad type {:?}",
                        d.disk,
                        p.number,
                        p.ptype
                    );
                }
                let mut f = vec![
                    format!("start={}", p.start / ss),
                    format!("size={}", p.size / ss),
                    format!("type={ptype}"),
                ];
                if let (Some(n), Table::Gpt) = (&p.name, d.table) {
                    if !n.contains(['"', '\n', '\\']) {
                        f.push(format!("name=\"{n}\""));
                    }
                }
                if p.flags.iter().any(|x| x == "boot") {
                    f.push(match d.table {
                        Table::Msdos => "bootable".into(),
                        Table::Gpt => "attrs=\"LegacyBIOSBootable\"".into(),
                    });
                }
                let dev = Path::new("/dev").join(&d.disk);
                script.push_str(&format!(
                    "{}{} : {}\n",
                    dev.display(),
                    part_suffix(&d.disk, p.number),
                    f.join(", ")
                ));
            }
            self.touched.push(d.disk.clone());
            let dev = Path::new("/dev").join(&d.disk);
            let mut child = Command::new("sfdisk")
                .args([
                    "--quiet",
                    "--wipe",
                    "always",
                    "--wipe-partitions",
                    "always",
                    "--no-reread",
                    "--no-tell-kernel",
                ])
                .arg(&dev)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("running sfdisk")?;
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(script.as_bytes())?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!(
                    "sfdisk {} failed: {}\nscript:\n{script}",
                    dev.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            // The kernel learns the new table (loop devices need partscan, which losetup -P sets).
            run(Command::new("blockdev").arg("--rereadpt").arg(&dev))
                .or_else(|_| run(Command::new("partx").arg("-u").arg(&dev)))
                .with_context(|| {
                    format!(
                        "telling the kernel about the partitions of {}",
                        dev.display()
                    )
                })?;
            // A kernel without this table's parser (or a loop device without partscan) learns
            // the partitions from partx.
            let missing = d.partitions.iter().any(|p| {
                crate::disks::partition_node(Path::new("/sys/class/block"), &d.disk, p.number)
                    .is_err()
            });
            if missing {
                run(Command::new("partx").arg("-a").arg(&dev)).with_context(|| {
                    format!("adding the partitions of {} with partx", dev.display())
                })?;
            }
            // Not the extended partition: its first sector is the first logical's boot
            // record, which a wipe would take for a partition table and erase.
            for p in Concrete::data_partitions(d) {
                let node = wait_partition(&d.disk, p.number)?;
                wipefs(&node)?;
            }
            self.say(format!(
                "partitioned /dev/{} ({} partitions)",
                d.disk,
                d.partitions.len()
            ));
        }
        Ok(())
    }

    /// The node of a layout device on this machine.
    pub fn device(&self, layout_dev: &str) -> Result<PathBuf> {
        let c = self.c();
        if let Some((d, p)) = c.partition_of(layout_dev) {
            return crate::disks::partition_node(Path::new("/sys/class/block"), &d.disk, p.number);
        }
        if c.raids.iter().any(|r| r.name == layout_dev) {
            return Ok(md_path(layout_dev));
        }
        if let Some((vg, lv)) = layout_dev.split_once('/') {
            return Ok(Path::new("/dev").join(vg).join(lv));
        }
        bail!("unknown layout device {layout_dev}")
    }

    fn raid(&mut self) -> Result<()> {
        let c = self.c().clone();
        for r in &c.raids {
            let members: Vec<PathBuf> = r
                .members
                .iter()
                .map(|m| self.device(m))
                .collect::<Result<_>>()?;
            let md = md_path(&r.name);
            if let Some(p) = md.parent() {
                std::fs::create_dir_all(p).ok();
            }
            let meta = r.metadata.clone().unwrap_or_else(|| "1.2".into());
            // A one-disk mirror is a degraded RAID 1 waiting for its pair.
            let n = members.len().max(2);
            let mut cmd = Command::new("mdadm");
            cmd.args(["--create", "--run", "--quiet", "--level=1"])
                .arg(&md)
                .arg(format!("--raid-devices={n}"))
                .arg(format!("--metadata={meta}"))
                .arg(format!("--name={}", r.name))
                .arg("--homehost=any")
                .args(&members);
            if members.len() < 2 {
                cmd.arg("missing");
            }
            run(&mut cmd).with_context(|| format!("creating md array {}", r.name))?;
            self.raids_made.push(md.clone());
            let detail = run(Command::new("mdadm")
                .args(["--detail", "--export"])
                .arg(&md))?;
            if let Some(u) = detail.lines().find_map(|l| l.strip_prefix("MD_UUID=")) {
                self.md_uuids.insert(r.name.clone(), u.to_string());
            }
            self.say(format!(
                "md array {} <- {}",
                md.display(),
                members
                    .iter()
                    .map(|m| m.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" + ")
            ));
        }
        Ok(())
    }

    fn lvm(&mut self) -> Result<()> {
        let c = self.c().clone();
        for g in &c.vgs {
            let pvs: Vec<String> = g
                .pvs
                .iter()
                .map(|p| self.device(p).map(|d| d.display().to_string()))
                .collect::<Result<_>>()?;
            let mut a = vec!["pvcreate", "-ff", "-y", "-q"];
            a.extend(pvs.iter().map(String::as_str));
            lvm(&a).with_context(|| format!("making physical volumes for {}", g.name))?;
            let mut a = vec!["vgcreate", "-q", "-y", g.name.as_str()];
            a.extend(pvs.iter().map(String::as_str));
            lvm(&a).with_context(|| format!("creating volume group {}", g.name))?;
            self.vgs_made.push(g.name.clone());
            let mut lvs: Vec<&si_proto::layout::LogicalVolume> = g.lvs.iter().collect();
            lvs.sort_by_key(|l| l.grow);
            for lv in lvs {
                let size = if lv.grow {
                    vec!["-l".to_string(), "100%FREE".into()]
                } else if let Some(p) = lv.percent {
                    vec!["-l".to_string(), format!("{p}%VG")]
                } else {
                    vec![
                        "-L".to_string(),
                        format!("{}b", lv.size.div_ceil(MIB) * MIB),
                    ]
                };
                let mut a = vec![
                    "lvcreate",
                    "-q",
                    "-y",
                    "-W",
                    "y",
                    "-Z",
                    "y",
                    "-n",
                    lv.name.as_str(),
                ];
                a.extend(size.iter().map(String::as_str));
                a.push(g.name.as_str());
                lvm(&a).with_context(|| format!("creating volume {}/{}", g.name, lv.name))?;
            }
            lvm(&["vgmknodes", g.name.as_str()]).ok();
            self.say(format!(
                "volume group {} <- {} ({} volumes)",
                g.name,
                pvs.join(" + "),
                g.lvs.len()
            ));
        }
        Ok(())
    }

    fn mkfs(&mut self) -> Result<()> {
        let c = self.c().clone();
        for f in &c.filesystems {
            let dev = self.device(&f.device)?;
            let mut cmd = match f.fstype.as_str() {
                t @ ("ext2" | "ext3" | "ext4") => {
                    let mut c = Command::new(format!("mkfs.{t}"));
                    c.args(["-F", "-q"]);
                    if let Some(l) = &f.label {
                        c.arg("-L").arg(l);
                    }
                    c
                }
                "xfs" | "btrfs" => {
                    let mut c = Command::new(format!("mkfs.{}", f.fstype));
                    c.arg("-f");
                    if let Some(l) = &f.label {
                        c.arg("-L").arg(l);
                    }
                    c
                }
                "vfat" => {
                    let mut c = Command::new("mkfs.vfat");
                    if let Some(l) = &f.label {
                        c.arg("-n").arg(l);
                    }
                    c
                }
                "swap" => {
                    let mut c = Command::new("mkswap");
                    if let Some(l) = &f.label {
                        c.arg("-L").arg(l);
                    }
                    c
                }
                t => bail!("cannot make a {t} filesystem"),
            };
            run(cmd.arg(&dev))
                .with_context(|| format!("making {} on {}", f.fstype, dev.display()))?;
            let u = run(Command::new("blkid")
                .args(["-p", "-s", "UUID", "-o", "value"])
                .arg(&dev))?;
            self.uuids.insert(f.device.clone(), u.trim().to_string());
            self.say(format!(
                "mkfs {} on {} (UUID {})",
                f.fstype,
                dev.display(),
                u.trim()
            ));
        }
        Ok(())
    }

    /// Mounts the whole layout under the target, parents first, before any file is written.
    fn mount(&mut self) -> Result<()> {
        let c = self.c().clone();
        std::fs::create_dir_all(&self.target)
            .with_context(|| format!("creating {}", self.target.display()))?;
        for f in &c.filesystems {
            let Some(m) = &f.mountpoint else { continue };
            let dir = self.target.join(m.trim_start_matches('/'));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let dev = self.device(&f.device)?;
            rustix::mount::mount(
                &dev,
                &dir,
                f.fstype.as_str(),
                rustix::mount::MountFlags::empty(),
                None,
            )
            .with_context(|| format!("mounting {} on {}", dev.display(), dir.display()))?;
            self.mounted.push(dir.clone());
            self.say(format!("mounted {} on {}", dev.display(), dir.display()));
        }
        Ok(())
    }

    fn pull(&mut self) -> Result<()> {
        let plan = self.plan.clone().expect("planned");
        let server = self
            .cfg
            .server
            .clone()
            .ok_or_else(|| anyhow!("no si.server= given"))?;
        // The filesystems' own lost+found are not the image's.
        let mut ex: Vec<String> = self
            .c()
            .filesystems
            .iter()
            .filter_map(|f| f.mountpoint.as_deref())
            .map(|m| format!("{}/lost+found", m.trim_end_matches('/')))
            .collect();
        ex.push("/var/lib/si/install.toml".into());
        ex.push("/var/log/si-install.log".into());
        let trust = self.connector(&server)?;
        if let Some(relay) = &plan.relay {
            let why_not = if self.synced {
                Some("the tree is updated in place")
            } else if self.identity.is_none() && !matches!(trust, Connector::Insecure) {
                Some("no node identity to relay with (no si.token= enrollment)")
            } else {
                None
            };
            match why_not {
                Some(why) => self.say(format!(
                    "install wave: {why}; pulling from the master alone"
                )),
                None => match self.pull_relayed(&server, &plan, relay, &ex, &trust) {
                    Ok(()) => return Ok(()),
                    // What the chain wrote is kept; the update below finishes it from the
                    // master, checking every file.
                    Err(e) => self.say(format!(
                        "install wave: the relayed pull failed ({e:#}); pulling the rest from the master"
                    )),
                },
            }
        }
        let o = si_agent::update::UpdateOptions {
            server,
            image: plan.image.clone(),
            version: plan.version,
            root: self.target.clone(),
            excludes: si_tree::exclude::Excludes::new(&ex)?,
            state_dir: None,
            dry_run: false,
            verify: false,
            force: true,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            node: self.node.clone(),
            pre_hooks: vec![],
            post_hooks: vec![],
            trust,
            max_rate_kbit: 0,
        };
        let mut out = Vec::new();
        let sum = si_agent::update::update(&o, &mut out)?;
        self.say(format!(
            "pulled {}@{}: {} entries created, {} replaced, {} deleted; {} objects, {} bytes, {:.1} s",
            sum.image, sum.version, sum.created, sum.replaced, sum.deleted, sum.fetched_objects, sum.fetched_bytes, sum.seconds
        ));
        if let Some(p) = self.plan.as_mut() {
            p.version = Some(sum.version);
        }
        Ok(())
    }

    /// The pull as a member of an install wave: objects from the upstreams the plan names
    /// (nearest first, the master last), served on to this node's successors from the tree
    /// being written (si-relay, presenting the node's enrolled certificate); returns once
    /// deployed and the successors stopped asking. The install log says which upstream gave
    /// how many objects.
    fn pull_relayed(
        &mut self,
        server: &str,
        plan: &InstallPlan,
        relay: &si_proto::plan::Relay,
        excludes: &[String],
        trust: &Connector,
    ) -> Result<()> {
        self.say(format!(
            "install wave: upstreams {} (then the master){}",
            if relay.upstreams.is_empty() {
                "none".to_string()
            } else {
                relay.upstreams.join(", ")
            },
            relay
                .listen
                .as_ref()
                .map(|l| format!("; relaying on {l}"))
                .unwrap_or_default()
        ));
        let d = si_relay::Deploy {
            server: server.to_string(),
            image: plan.image.clone(),
            version: plan.version,
            root: self.target.clone(),
            state_dir: None,
            relay_from: relay.upstreams.clone(),
            relay_listen: relay.listen.clone(),
            buffer_mib: RELAY_BUFFER_MIB,
            stall: RELAY_STALL,
            min_rate: relay.min_rate_kbit.saturating_mul(125),
            wait: RELAY_WAIT,
            linger: RELAY_LINGER,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            master: trust.clone(),
            identity: self.identity.as_ref(),
            excludes: si_tree::exclude::Excludes::new(excludes)?,
            multicast: false,
        };
        let s = si_relay::deploy(&d)?;
        for f in &s.from {
            self.say(format!(
                "relay: {} objects ({} bytes) from {}",
                f.objects, f.bytes, f.upstream
            ));
        }
        self.say(format!(
            "pulled {}@{} through the wave: {} objects, {} bytes; {} reattaches; relayed {} objects ({} bytes); {:.1} s",
            s.image, s.version, s.objects, s.bytes, s.reattaches, s.served_objects, s.served_bytes, s.seconds
        ));
        // The master hears of the version as from an update.
        self.send("updated", &format!("{}@{}", s.image, s.version));
        if let Some(p) = self.plan.as_mut() {
            p.version = Some(s.version);
        }
        Ok(())
    }

    /// Override images, in the plan's order (global, group, host: later wins), written over
    /// the tree.
    fn overrides(&mut self) -> Result<()> {
        let plan = self.plan.clone().expect("planned");
        if plan.overrides.is_empty() {
            return Ok(());
        }
        let server = self
            .cfg
            .server
            .clone()
            .ok_or_else(|| anyhow!("no si.server= given"))?;
        let conn = self.connector(&server)?;
        for o in &plan.overrides {
            let mut c = Client::connect(&server, Duration::from_secs(10), &conn)?;
            let (info, m, _) = c
                .manifest(o, None)
                .with_context(|| format!("fetching override {o}"))?;
            let n = apply_override(&mut c, &m, &self.target)
                .with_context(|| format!("applying override {o}"))?;
            c.bye();
            self.say(format!(
                "override {o}@{}: {n} entries written",
                info.version
            ));
        }
        Ok(())
    }

    fn configure(&mut self) -> Result<()> {
        let plan = self.plan.clone().expect("planned");
        let c = self.c().clone();
        let t = self.target.clone();
        if self.synced {
            // The UUIDs are those found; the files are rewritten all the same.
        }
        let etc = t.join("etc");
        std::fs::create_dir_all(&etc)?;
        std::fs::write(etc.join("fstab"), gen::fstab(&c, &self.uuids))
            .context("writing /etc/fstab")?;
        // The node keeps the key and certificate it enrolled for (never part of an image:
        // /etc/si is excluded from captures and updates), for its updates and reports.
        if let Some(id) = &self.identity {
            id.save(&etc.join("si"))
                .context("keeping the node identity in /etc/si")?;
            self.say("kept the node's key and certificate in /etc/si");
        }
        if !c.raids.is_empty() {
            if self.md_uuids.is_empty() {
                for r in &c.raids {
                    let d = run(Command::new("mdadm")
                        .args(["--detail", "--export"])
                        .arg(md_path(&r.name)))?;
                    if let Some(u) = d.lines().find_map(|l| l.strip_prefix("MD_UUID=")) {
                        self.md_uuids.insert(r.name.clone(), u.to_string());
                    }
                }
            }
            std::fs::create_dir_all(etc.join("mdadm"))?;
            std::fs::write(
                etc.join("mdadm/mdadm.conf"),
                gen::mdadm_conf(&self.md_uuids),
            )
            .context("writing /etc/mdadm/mdadm.conf")?;
        }
        let host = plan.hostname.clone().unwrap_or_else(|| plan.node.clone());
        if !host.is_empty() {
            std::fs::write(etc.join("hostname"), format!("{host}\n"))
                .context("writing /etc/hostname")?;
            let hosts = etc.join("hosts");
            let old =
                std::fs::read_to_string(&hosts).unwrap_or_else(|_| "127.0.0.1\tlocalhost\n".into());
            let mut new: String = old
                .lines()
                .filter(|l| !l.starts_with("127.0.1.1"))
                .map(|l| format!("{l}\n"))
                .collect();
            new.push_str(&format!("127.0.1.1\t{host}\n"));
            std::fs::write(&hosts, new).context("writing /etc/hosts")?;
        }
        for (rel, body) in gen::network_files(&plan.network, None) {
            let p = t.join(rel);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))?;
        }
        // Its own machine-id and ssh host keys: never the golden node's.
        let mut id = [0u8; 16];
        rustix::rand::getrandom(&mut id, rustix::rand::GetRandomFlags::empty())
            .context("random machine-id")?;
        let id = format!(
            "{}\n",
            id.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        std::fs::write(etc.join("machine-id"), &id).context("writing /etc/machine-id")?;
        let dbus = t.join("var/lib/dbus/machine-id");
        if dbus.is_file() && !dbus.is_symlink() {
            std::fs::write(&dbus, &id).ok();
        }
        if let Ok(rd) = std::fs::read_dir(etc.join("ssh")) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                    std::fs::remove_file(e.path()).ok();
                }
            }
            if t.join("usr/bin/ssh-keygen").exists() {
                run(Command::new("chroot").arg(&t).args(["ssh-keygen", "-A"]))
                    .context("making ssh host keys")?;
                self.say("ssh host keys made");
            }
        }
        self.say(format!(
            "configured: fstab, hostname {host}, network, machine-id"
        ));
        Ok(())
    }

    fn initramfs(&mut self) -> Result<()> {
        let c = self.c();
        if c.raids.is_empty() && c.vgs.is_empty() {
            return Ok(());
        }
        if !self.target.join("usr/sbin/update-initramfs").exists() {
            self.say("initramfs: the image has no update-initramfs; not rebuilt");
            return Ok(());
        }
        let _b = Binds::new(&self.target)?;
        run(Command::new("chroot").arg(&self.target).args([
            "update-initramfs",
            "-u",
            "-k",
            "all",
        ]))?;
        self.say("initramfs rebuilt for md/LVM");
        Ok(())
    }

    fn bootloader(&mut self) -> Result<()> {
        let c = self.c().clone();
        let t = self.target.clone();
        let grub_install = ["usr/sbin/grub-install", "usr/bin/grub-install"]
            .iter()
            .any(|p| t.join(p).exists());
        if !grub_install {
            self.say("boot loader: the image has no grub-install; none installed");
            return Ok(());
        }
        let _b = Binds::new(&t)?;
        match c.firmware {
            Firmware::Bios => {
                for d in c.boot_disks() {
                    run(Command::new("chroot")
                        .arg(&t)
                        .args(["grub-install", "--target=i386-pc"])
                        .arg(format!("/dev/{d}")))
                    .with_context(|| format!("grub-install on /dev/{d}"))?;
                    self.say(format!("grub-install --target=i386-pc /dev/{d}"));
                }
            }
            Firmware::Uefi => {
                run(Command::new("chroot").arg(&t).args([
                    "grub-install",
                    "--target=x86_64-efi",
                    "--efi-directory=/boot/efi",
                    "--bootloader-id=si",
                    "--no-nvram",
                ]))?;
                let efi = t.join("boot/efi/EFI");
                let loader = ["si/shimx64.efi", "si/grubx64.efi"]
                    .iter()
                    .map(|p| efi.join(p))
                    .find(|p| p.exists())
                    .ok_or_else(|| anyhow!("grub-install left no loader in /boot/efi/EFI/si"))?;
                std::fs::create_dir_all(efi.join("BOOT"))?;
                std::fs::copy(&loader, efi.join("BOOT/BOOTX64.EFI"))?;
                if loader.ends_with("shimx64.efi") {
                    std::fs::copy(efi.join("si/grubx64.efi"), efi.join("BOOT/grubx64.efi")).ok();
                }
                // The other ESPs of a mirror get the same files.
                let first = c
                    .filesystems
                    .iter()
                    .find(|f| f.mountpoint.as_deref() == Some("/boot/efi"))
                    .map(|f| f.device.clone());
                for (disk, n) in c.esps() {
                    let dev =
                        crate::disks::partition_node(Path::new("/sys/class/block"), &disk, n)?;
                    let is_first = first
                        .as_ref()
                        .is_some_and(|f| self.device(f).ok().as_ref() == Some(&dev));
                    if !is_first {
                        let m = tempfile_dir()?;
                        if run(Command::new("mount").arg(&dev).arg(&m)).is_err() {
                            run(Command::new("mkfs.vfat").arg(&dev))?;
                            run(Command::new("mount").arg(&dev).arg(&m))?;
                        }
                        let r = run(Command::new("cp").arg("-a").arg(&efi).arg(&m));
                        run(Command::new("umount").arg(&m)).ok();
                        std::fs::remove_dir(&m).ok();
                        r?;
                    }
                    if Path::new("/sys/firmware/efi/efivars").is_dir() {
                        self.efibootmgr(&disk, n, &loader)?;
                    }
                }
            }
        }
        if t.join("usr/sbin/update-grub").exists() {
            run(Command::new("chroot").arg(&t).arg("update-grub"))?;
        } else {
            run(Command::new("chroot").arg(&t).args([
                "grub-mkconfig",
                "-o",
                "/boot/grub/grub.cfg",
            ]))?;
        }
        self.say("boot loader installed");
        Ok(())
    }

    /// One NVRAM entry per ESP (older "si" entries on that disk removed), network boot first.
    fn efibootmgr(&mut self, disk: &str, n: u32, loader: &Path) -> Result<()> {
        let list = run(&mut Command::new("efibootmgr"))?;
        for l in list.lines() {
            if let Some(rest) = l.strip_prefix("Boot") {
                if rest.contains(&format!(" si {disk}")) {
                    let num: String = rest.chars().take(4).collect();
                    run(Command::new("efibootmgr").args(["-q", "-B", "-b", &num]))?;
                }
            }
        }
        let rel = loader
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("grubx64.efi");
        run(Command::new("efibootmgr")
            .args(["-q", "-c", "-d"])
            .arg(format!("/dev/{disk}"))
            .args([
                "-p",
                &n.to_string(),
                "-L",
                &format!("si {disk}"),
                "-l",
                &format!("\\EFI\\si\\{rel}"),
            ]))?;
        // Network boot first, so the master decides the next boots; then this install's
        // disks; then every other entry. Only the network entry that booted the installer (or
        // else the first one) goes before the disks: a firmware tries its entries in order,
        // and HTTP or IPv6 boot entries that get no answer cost minutes before the disk.
        let list = run(&mut Command::new("efibootmgr"))?;
        let order = boot_order(&list);
        if !order.is_empty() {
            run(Command::new("efibootmgr").args(["-q", "-o", &order.join(",")]))?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        let rec = InstallRecord {
            node: self.node.clone(),
            image: self
                .plan
                .as_ref()
                .map(|p| p.image.clone())
                .unwrap_or_default(),
            layout: si_proto::Digest::of(self.layout_text.as_bytes()).to_hex(),
            disks: self.disk_record(),
            when: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        let dir = self.target.join("var/lib/si");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("install.toml"), toml::to_string_pretty(&rec)?)?;
        std::fs::write(dir.join("install-plan.txt"), self.c().render())?;
        self.write_log()?;
        // What the installer writes is the node's; the directories it wrote into get the
        // image's times back, so the tree is as exact as the image everywhere else.
        let m = std::fs::read(dir.join("installed.manifest"))
            .context("reading the installed manifest")
            .and_then(|b| {
                si_proto::Manifest::decode(&b)
                    .map_err(|e| anyhow!("decoding the installed manifest: {e}"))
            })?;
        for e in m.entries.iter().filter(|e| e.kind == si_proto::Kind::Dir) {
            if WRITTEN_DIRS.contains(&String::from_utf8_lossy(&e.path).as_ref()) {
                let t = rustix::fs::Timespec {
                    tv_sec: e.mtime,
                    tv_nsec: e.mtime_nsec as _,
                };
                self.dir_times.push((
                    self.target.join(String::from_utf8_lossy(&e.path).as_ref()),
                    t,
                ));
            }
        }
        for (p, t) in std::mem::take(&mut self.dir_times) {
            let ts = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                last_modification: t,
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                &p,
                &ts,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .with_context(|| format!("restoring the time of {}", p.display()))?;
        }
        self.unmount_all();
        rustix::fs::sync();
        Ok(())
    }

    fn write_log(&mut self) -> Result<()> {
        let p = self.target.join("var/log/si-install.log");
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        let mut text = self.log.join("\n");
        text.push('\n');
        for s in &self.times {
            text.push_str(&format!("time {} {:.3}\n", s.step, s.seconds));
        }
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    }

    fn unmount_all(&mut self) {
        while let Some(m) = self.mounted.pop() {
            if let Err(e) = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::empty()) {
                tracing::warn!(mount = %m.display(), error = %e, "unmounting");
                rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH).ok();
            }
        }
    }

    /// After a failure: keep the evidence (and a log on the target when it is mounted), or
    /// clear every partition table written so a half-written disk never boots.
    fn on_error(&mut self) {
        if !self.mounted.is_empty() {
            self.write_log().ok();
        }
        match self.cfg.onerror.unwrap_or_default() {
            OnError::Shell => {
                self.unmount_all();
                if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                    eprintln!("si-install: the disks are left as they are; a shell follows");
                    shell();
                }
            }
            OnError::Clear => {
                self.unmount_all();
                for vg in std::mem::take(&mut self.vgs_made) {
                    lvm(&["vgchange", "-an", &vg]).ok();
                }
                for md in std::mem::take(&mut self.raids_made) {
                    run(Command::new("mdadm").arg("--stop").arg(&md)).ok();
                }
                for d in std::mem::take(&mut self.touched) {
                    for p in sys_partitions(&d) {
                        wipefs(&p).ok();
                    }
                    let dev = Path::new("/dev").join(&d);
                    match wipefs(&dev) {
                        Ok(_) => eprintln!(
                            "si-install: cleared the partition table of {}",
                            dev.display()
                        ),
                        Err(e) => eprintln!("si-install: could not clear {}: {e:#}", dev.display()),
                    }
                    run(Command::new("blockdev").arg("--rereadpt").arg(&dev)).ok();
                    run(Command::new("partx").arg("-d").arg(&dev)).ok();
                }
            }
        }
    }

    /// The plan's post-action, only when running from a netboot (the configuration came from
    /// /proc/cmdline and / is the initramfs): a test run never reboots its host.
    pub fn post_action(&mut self) -> Result<()> {
        let post = self.plan.as_ref().map(|p| p.post).unwrap_or_default();
        let booted = self.cfg.cmdline.is_none()
            && self.cfg.config.is_none()
            && self.cfg.target.is_none()
            && in_initramfs();
        if !booted {
            self.say(format!(
                "post-action {post:?} skipped: not running from a netboot"
            ));
            return Ok(());
        }
        rustix::fs::sync();
        match post {
            PostAction::Reboot => rustix::system::reboot(rustix::system::RebootCommand::Restart)?,
            PostAction::Poweroff => {
                rustix::system::reboot(rustix::system::RebootCommand::PowerOff)?
            }
            PostAction::Kexec => {
                run(Command::new("kexec").arg("-e"))?;
            }
            PostAction::Shell => shell(),
        }
        Ok(())
    }
}

/// Directories of the image that receive the installer's files.
const WRITTEN_DIRS: &[&str] = &[
    "",
    "etc",
    "etc/ssh",
    "etc/mdadm",
    "etc/systemd",
    "etc/systemd/network",
    "tmp",
    "var",
    "var/lib",
    "var/lib/dbus",
    "var/log",
    "var/lib/si",
];

/// The MAC of the first network interface that is up (not loopback), as the master's
/// inventory writes it.
fn boot_mac() -> Option<String> {
    let mut names: Vec<_> = std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    names.into_iter().find_map(|p| {
        let up = std::fs::read_to_string(p.join("operstate")).is_ok_and(|s| s.trim() == "up");
        let mac = std::fs::read_to_string(p.join("address"))
            .ok()?
            .trim()
            .to_ascii_lowercase();
        (up && mac.len() == 17 && mac != "00:00:00:00:00:00").then_some(mac)
    })
}

/// `wipefs -a`, retried for up to 3 s while the device is busy (a just-unmounted filesystem
/// or a prober can hold it for a moment; there is no event to wait for without udev).
fn wipefs(dev: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match run(Command::new("wipefs").args(["-a", "-q"]).arg(dev)) {
            Err(e) if format!("{e:#}").contains("busy") && Instant::now() < deadline => {
                tracing::warn!(dev = %dev.display(), "device busy; retrying wipefs");
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

fn in_initramfs() -> bool {
    rustix::fs::statfs("/").is_ok_and(|s| {
        // ramfs, tmpfs
        matches!(s.f_type, 0x858458f6 | 0x01021994)
    })
}

fn shell() {
    let _ = Command::new("/bin/sh").status();
}

fn write_exec(p: &Path, body: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(p, body).with_context(|| format!("writing {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let mut n = [0u8; 8];
    rustix::rand::getrandom(&mut n, rustix::rand::GetRandomFlags::empty())?;
    let p = std::env::temp_dir().join(format!(
        "si-install.{}",
        n.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ));
    std::fs::create_dir(&p)?;
    Ok(p)
}

/// `/dev` nodes of a disk's partitions, from sysfs.
fn sys_partitions(disk: &str) -> Vec<PathBuf> {
    let dir = Path::new("/sys/class/block").join(disk);
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            if e.path().join("partition").exists() {
                out.push(Path::new("/dev").join(e.file_name()));
            }
        }
    }
    out.sort();
    out
}

/// Kernel names holding a disk or its partitions (md arrays, device-mapper).
fn sys_holders(disk: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![Path::new("/sys/class/block").join(disk)];
    for p in sys_partitions(disk) {
        if let Some(n) = p.file_name() {
            dirs.push(Path::new("/sys/class/block").join(n));
        }
    }
    for d in dirs {
        if let Ok(rd) = std::fs::read_dir(d.join("holders")) {
            for e in rd.flatten() {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The kernel name behind a /dev path (`/dev/sys/root` → `dm-0`).
fn sys_name(p: &str) -> Option<String> {
    std::fs::canonicalize(p)
        .ok()
        .and_then(|c| c.file_name().map(|f| f.to_string_lossy().into_owned()))
}

/// The suffix sfdisk wants after the disk path for partition `n` (its naming, only for the
/// script: the kernel's node is found through sysfs afterwards).
fn part_suffix(disk: &str, n: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("p{n}")
    } else {
        n.to_string()
    }
}

/// Waits (bounded) for the kernel to publish partition `n` of `disk` and its /dev node.
fn wait_partition(disk: &str, n: u32) -> Result<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match crate::disks::partition_node(Path::new("/sys/class/block"), disk, n) {
            Ok(p) if p.exists() => return Ok(p),
            r => {
                if Instant::now() > deadline {
                    return Err(r.err().unwrap_or_else(|| {
                        anyhow!("/dev node of {disk} partition {n} never appeared")
                    }));
                }
                // Polling a kernel state change: there is no event to wait on without udev.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// /dev, /proc and /sys bind-mounted into the target for chrooted tools; undone on drop.
struct Binds {
    mounted: Vec<PathBuf>,
}

impl Binds {
    fn new(root: &Path) -> Result<Binds> {
        let mut b = Binds { mounted: vec![] };
        for d in ["dev", "proc", "sys"] {
            let t = root.join(d);
            std::fs::create_dir_all(&t)?;
            rustix::mount::mount_bind(Path::new("/").join(d), &t)
                .with_context(|| format!("bind-mounting /{d} into the target"))?;
            b.mounted.push(t);
        }
        Ok(b)
    }
}

impl Drop for Binds {
    fn drop(&mut self) {
        while let Some(m) = self.mounted.pop() {
            rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH).ok();
        }
    }
}

/// Most bytes of content an override image may hold (it is held in memory while applied).
const MAX_OVERRIDE_BYTES: u64 = 256 << 20;

/// Writes the entries of an override manifest over the tree at `root` (later wins): existing
/// directories are kept as they are, anything else is replaced.
/// Every object is verified as it arrives.
pub fn apply_override(c: &mut Client, m: &si_proto::Manifest, root: &Path) -> Result<u64> {
    use si_proto::path as mpath;
    use si_proto::Kind;
    use si_tree::apply;
    use std::ffi::OsStr;
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;
    m.validate()?;
    let mut wants: Vec<(si_proto::Digest, u32)> = m.digests().map(|c| (c.digest, c.len)).collect();
    wants.sort();
    wants.dedup();
    let total: u64 = wants.iter().map(|w| u64::from(w.1)).sum();
    if total > MAX_OVERRIDE_BYTES {
        bail!("override of {total} bytes is larger than {MAX_OVERRIDE_BYTES}");
    }
    let objects = std::sync::Mutex::new(std::collections::HashMap::new());
    c.fetch(&wants, 2, &|d, data| {
        objects.lock().expect("not poisoned").insert(d, data);
        Ok(())
    })?;
    struct Objects(std::collections::HashMap<si_proto::Digest, Vec<u8>>);
    impl apply::ObjectSource for Objects {
        fn get(&self, d: &si_proto::Digest, _: u32) -> Result<Vec<u8>> {
            self.0
                .get(d)
                .cloned()
                .ok_or_else(|| anyhow!("object {d} missing"))
        }
    }
    let objects = Objects(objects.into_inner().expect("not poisoned"));
    let rootfd = apply::open_root(root)?;
    let rfd = rootfd.as_fd();
    let mut n = 0;
    let mut links = Vec::new();
    let mut made_dirs = Vec::new();
    for e in m.entries.iter().skip(1) {
        let pd = apply::open_dir_beneath(rfd, mpath::parent(&e.path).expect("non-root"))?;
        let name = OsStr::from_bytes(mpath::file_name(&e.path));
        let old = rustix::fs::statat(&pd, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).ok();
        let old_dir = old.as_ref().is_some_and(|st| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
        });
        if e.kind == Kind::Dir && old_dir {
            continue;
        }
        if e.kind == Kind::Dir {
            made_dirs.push(e);
        }
        if old.is_some() {
            si_agent::update::remove_tree(rfd, &e.path)?;
        }
        if matches!(e.kind, Kind::Hardlink { .. }) {
            links.push(e);
            continue;
        }
        apply::create_at(pd.as_fd(), name, e, &objects)?;
        n += 1;
    }
    for e in links {
        let pd = apply::open_dir_beneath(rfd, mpath::parent(&e.path).expect("non-root"))?;
        apply::link_at(
            rfd,
            pd.as_fd(),
            OsStr::from_bytes(mpath::file_name(&e.path)),
            e,
        )?;
        n += 1;
    }
    for e in made_dirs.into_iter().rev() {
        let d = apply::open_dir_beneath(rfd, &e.path)?;
        apply::set_meta_fd(d.as_fd(), e)?;
    }
    Ok(n)
}

/// The boot order for `efibootmgr` output: the network entry the machine booted from
/// (`BootCurrent`, when it is a network one; else the first network entry of the order), then
/// si's disk entries (`si DISK`), then the rest of the order as it was.
pub fn boot_order(list: &str) -> Vec<String> {
    let label = |num: &str| {
        list.lines()
            .find_map(|l| l.strip_prefix(&format!("Boot{num}")))
            .map(|rest| rest.trim_start_matches('*').trim().to_string())
            .unwrap_or_default()
    };
    let is_net = |num: &str| {
        let l = label(num);
        l.contains("PXE") || l.contains("Network") || l.contains("HTTP") || l.contains("MAC(")
    };
    let order: Vec<String> = list
        .lines()
        .find_map(|l| l.strip_prefix("BootOrder: "))
        .map(|o| o.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_default();
    let current = list
        .lines()
        .find_map(|l| l.strip_prefix("BootCurrent: "))
        .map(|s| s.trim().to_string())
        .filter(|c| is_net(c))
        .or_else(|| order.iter().find(|n| is_net(n)).cloned());
    let mut out: Vec<String> = current.into_iter().collect();
    let mut si: Vec<String> = order
        .iter()
        .filter(|n| label(n).starts_with("si "))
        .cloned()
        .collect();
    // Entries made now but not yet in the order.
    for l in list.lines() {
        if let Some(rest) = l.strip_prefix("Boot") {
            let num: String = rest.chars().take(4).collect();
            if num.len() == 4
                && num.chars().all(|c| c.is_ascii_hexdigit())
                && label(&num).starts_with("si ")
                && !si.contains(&num)
            {
                si.push(num);
            }
        }
    }
    for n in si {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    for n in order {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// The network entry that booted, then si's disks, then the rest: HTTP and IPv6 entries
    /// that get no answer no longer stand between the firmware and the disk.
    #[test]
    fn boot_order_puts_the_disks_right_after_the_netboot() {
        let list = "BootCurrent: 0003\nBootOrder: 0001,0002,0003,0004,0005,0006\n\
            Boot0001* UEFI QEMU DVD-ROM QM00005\nBoot0002* UEFI Misc Device\n\
            Boot0003* UEFI PXEv4 (MAC:525400D25101)\nBoot0004* UEFI HTTPv4 (MAC:525400D25101)\n\
            Boot0005* UEFI PXEv6 (MAC:525400D25101)\nBoot0006* UEFI HTTPv6 (MAC:525400D25101)\n\
            Boot0007* si vda\n";
        assert_eq!(
            super::boot_order(list),
            ["0003", "0007", "0001", "0002", "0004", "0005", "0006"]
        );
        // Booted from the disk (a reinstall from a running system): the first network entry.
        let list = list.replace("BootCurrent: 0003", "BootCurrent: 0002");
        assert_eq!(super::boot_order(&list)[..2], ["0003", "0007"]);
    }
}
