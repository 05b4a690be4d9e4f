//! The installer's configuration: the kernel command line (`si.KEY=VALUE`), overridden by the
//! command line of `si-install` itself. One struct, [`Config`], is the clap parser and the
//! serde type; [`Config::resolve`] merges a kernel command line into it.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use si_proto::plan::PostAction;
use std::path::PathBuf;

/// What to do with disks that already hold an si install.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Reinstall {
    /// Repartition and reformat, whatever is there.
    #[default]
    Wipe,
    /// When the disks match the layout and hold an earlier si install, update in place.
    Sync,
}

/// What to do when a step fails (after the error is printed and reported).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Keep the disks as they are (evidence) and offer a shell.
    #[default]
    Shell,
    /// Clear the partition tables written so far, so a half-written disk never boots.
    Clear,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FirmwareArg {
    Bios,
    Uefi,
}

/// `si-install`'s configuration. Every field but the `--cmdline`/`--config`/`--target`
/// plumbing also comes from the kernel command line as `si.<name>=` (see docs/installer.md).
#[derive(clap::Parser, Clone, Debug, Default, Serialize, Deserialize)]
#[command(
    name = "si-install",
    about = "Install a node from an si-server: match disks, partition, format, pull the image, configure, boot loader"
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// A kernel command line, or a file holding one (default /proc/cmdline when neither
    /// --cmdline nor --config is given).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// An install plan (TOML, si_proto::plan::InstallPlan) used instead of asking the master.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
    /// Where the node's filesystems are mounted while it is installed.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PathBuf>,
    /// si.server: the si-server (HOST or HOST:PORT, port 7811 by default).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// si.node: the node's name in the inventory (default: its MAC asks the master).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// si.image: overrides the plan's image.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// si.version: overrides the plan's version.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// si.break=STEP[,STEP...]: stop before each STEP with a shell (debugging). The boot
    /// package's own break points (`init`, `modules`, `net`, handled by its /init) may be in
    /// the same list.
    #[arg(long = "break")]
    #[serde(default, rename = "break", skip_serializing_if = "Option::is_none")]
    pub break_at: Option<String>,
    /// si.reinstall: wipe (default) or sync (update an earlier si install in place).
    #[arg(long, value_enum)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reinstall: Option<Reinstall>,
    /// si.post: reboot, poweroff, kexec or shell (default: the plan's, else reboot).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post: Option<PostAction>,
    /// si.onerror: shell (keep the evidence) or clear (wipe the partition tables).
    #[arg(long, value_enum)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onerror: Option<OnError>,
    /// si.ca: the SHA-256 fingerprint of the master's CA (used once the service speaks TLS).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// si.insecure: plain TCP to the master (lab use only; nothing is authenticated, and the
    /// master must run --insecure too).
    #[arg(long)]
    #[serde(default)]
    pub insecure: bool,
    /// si.token: the enrollment token (never printed or reported).
    #[arg(long)]
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    /// si.firmware: bios or uefi (default: uefi when /sys/firmware/efi exists).
    #[arg(long, value_enum)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareArg>,
    /// si.disks=a,b: only these disks (kernel names or /dev paths) are candidates; they may be
    /// loop devices or removable ones.
    #[arg(long, value_delimiter = ',')]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// si.dryrun: print the plan and stop before anything is written.
    #[arg(long)]
    #[serde(default)]
    pub dry_run: bool,
    /// si.fail=STEP: fail on purpose at STEP (tests of the error path).
    #[arg(long, hide = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_at: Option<String>,
}

/// The kernel command line split into words; double quotes group (`si.x="a b"`).
pub fn split_cmdline(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// Longest kernel command line read (the kernel's own limit is a few KiB).
const MAX_CMDLINE: usize = 64 << 10;

impl Config {
    /// Reads `--cmdline` (a file when it names one, else the text itself; /proc/cmdline when
    /// neither it nor `--config` is given) and fills what the command line left unset.
    pub fn resolve(mut self) -> Result<Config> {
        let text = match &self.cmdline {
            Some(c) if std::path::Path::new(c).is_file() => {
                read_bounded(c).with_context(|| format!("reading the kernel command line {c}"))?
            }
            Some(c) => c.clone(),
            None if self.config.is_none() => {
                read_bounded("/proc/cmdline").context("reading /proc/cmdline")?
            }
            None => String::new(),
        };
        self.merge_cmdline(&text)?;
        Ok(self)
    }

    /// Fills the fields still unset from `si.KEY=VALUE` words (the command line wins).
    pub fn merge_cmdline(&mut self, text: &str) -> Result<()> {
        for w in split_cmdline(text) {
            let Some(kv) = w.strip_prefix("si.") else {
                continue;
            };
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = v.to_string();
            let bad = |what: &str| format!("kernel command line si.{k}={v}: {what}");
            match k {
                "server" => set(&mut self.server, v),
                "node" => set(&mut self.node, v),
                "image" => set(&mut self.image, v),
                "version" => {
                    let n = v.parse().with_context(|| bad("not a version number"))?;
                    set(&mut self.version, n)
                }
                "break" => set(&mut self.break_at, v),
                "reinstall" => {
                    let r = match v.as_str() {
                        "sync" => Reinstall::Sync,
                        "wipe" => Reinstall::Wipe,
                        _ => bail!(bad("expected sync or wipe")),
                    };
                    set(&mut self.reinstall, r)
                }
                "post" => {
                    let p = v.parse().map_err(|e: String| anyhow::anyhow!(bad(&e)))?;
                    set(&mut self.post, p)
                }
                "onerror" => {
                    let o = match v.as_str() {
                        "shell" => OnError::Shell,
                        "clear" => OnError::Clear,
                        _ => bail!(bad("expected shell or clear")),
                    };
                    set(&mut self.onerror, o)
                }
                "ca" => set(&mut self.ca, v),
                "token" => set(&mut self.token, v),
                "firmware" => {
                    let f = match v.as_str() {
                        "bios" => FirmwareArg::Bios,
                        "uefi" => FirmwareArg::Uefi,
                        _ => bail!(bad("expected bios or uefi")),
                    };
                    set(&mut self.firmware, f)
                }
                "disks" => {
                    if self.disks.is_empty() {
                        self.disks = v
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect();
                    }
                }
                "dryrun" => self.dry_run = true,
                "insecure" => self.insecure = true,
                "fail" => set(&mut self.fail_at, v),
                _ => tracing::warn!(key = %k, "unknown si.* kernel parameter ignored"),
            }
        }
        if let Some(s) = &self.break_at {
            for step in s.split(',') {
                if !crate::steps::STEPS.contains(&step) && !BOOT_BREAKS.contains(&step) {
                    bail!(
                        "si.break={s}: no such step {step:?} (steps: {}; the boot package's: {})",
                        crate::steps::STEPS.join(", "),
                        BOOT_BREAKS.join(", ")
                    );
                }
            }
        }
        Ok(())
    }
}

/// The break points the boot package's /init handles before the installer runs.
pub const BOOT_BREAKS: &[&str] = &["init", "modules", "net"];

impl Config {
    /// Whether `si.break` asks for a stop before installer step `step`.
    pub fn breaks_before(&self, step: &str) -> bool {
        self.break_at
            .as_deref()
            .is_some_and(|b| b.split(',').any(|s| s == step))
    }
}

fn set<T>(slot: &mut Option<T>, v: T) {
    if slot.is_none() {
        *slot = Some(v);
    }
}

fn read_bounded(p: impl AsRef<std::path::Path>) -> Result<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(p.as_ref())?
        .take(MAX_CMDLINE as u64)
        .read_to_string(&mut s)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn kernel_command_line_fills_what_the_command_line_left() {
        let mut c = Config::parse_from(["si-install", "--image", "cli-image", "--target", "/t"]);
        c.merge_cmdline(
            "BOOT_IMAGE=/vmlinuz quiet si.server=10.213.0.1:7811 si.node=n01 si.image=deb \
             si.version=3 si.break=partition si.reinstall=sync si.post=poweroff si.onerror=clear \
             si.ca=ab:cd si.token=s3cret si.disks=vda,vdb si.firmware=uefi si.future=1 \
             si.dryrun console=ttyS0",
        )
        .unwrap();
        assert_eq!(c.server.as_deref(), Some("10.213.0.1:7811"));
        assert_eq!(c.node.as_deref(), Some("n01"));
        assert_eq!(
            c.image.as_deref(),
            Some("cli-image"),
            "the command line wins"
        );
        assert_eq!(c.version, Some(3));
        assert_eq!(c.break_at.as_deref(), Some("partition"));
        assert_eq!(c.reinstall, Some(Reinstall::Sync));
        assert_eq!(c.post, Some(PostAction::Poweroff));
        assert_eq!(c.onerror, Some(OnError::Clear));
        assert_eq!(c.disks, ["vda", "vdb"]);
        assert_eq!(c.firmware, Some(FirmwareArg::Uefi));
        assert!(c.dry_run);
        // The token never reaches serialized output.
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("s3cret"), "{json}");
        assert!(json.contains("\"ca\":\"ab:cd\""));
    }

    #[test]
    fn boot_package_break_points_pass_through() {
        let mut c = Config::default();
        c.merge_cmdline("si.break=net,partition").unwrap();
        assert!(c.breaks_before("partition"));
        assert!(!c.breaks_before("pull"));
        let mut c = Config::default();
        c.merge_cmdline("si.break=init").unwrap();
        assert!(crate::steps::STEPS.iter().all(|s| !c.breaks_before(s)));
    }

    #[test]
    fn bad_values_are_clear_errors() {
        for (line, want) in [
            ("si.version=x", "si.version=x: not a version number"),
            ("si.reinstall=maybe", "expected sync or wipe"),
            ("si.post=halt", "expected reboot"),
            ("si.break=nosuchstep", "no such step"),
            ("si.break=net,nosuchstep", "no such step \"nosuchstep\""),
        ] {
            let mut c = Config::default();
            let e = format!("{:#}", c.merge_cmdline(line).unwrap_err());
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn quotes_group_words() {
        assert_eq!(
            split_cmdline("a  si.x=\"b c\" d\n"),
            vec!["a".to_string(), "si.x=b c".into(), "d".into()]
        );
    }
}
