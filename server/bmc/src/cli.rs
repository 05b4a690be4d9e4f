//! What the power binaries do; `src/bin/si-*.rs` only parse arguments and call these.

use super::directory::{BmcDirectory, HistoryEvent, TomlDirectory};
use super::run::{for_each_node, with_bmc, NodeOutcome};
use super::{BmcTarget, BootDevice, PowerAction, PowerState};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The BMC directory: a TOML file when one is named, else the inventory.
pub fn open_directory(
    bmc_file: Option<&std::path::Path>,
    state_dir: &std::path::Path,
) -> Result<Box<dyn BmcDirectory>> {
    Ok(match bmc_file {
        Some(f) => Box::new(TomlDirectory::open(f)?),
        None => Box::new(super::invdir::InventoryDirectory::open(state_dir)?),
    })
}

/// Options shared by every power command.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Nodes: `node[01-64]`, `n[1-3,7]`, `a,b,c`, `@group`.
    pub nodes: String,
    /// BMC directory as a TOML file (mode 0600) instead of the inventory.
    #[arg(long)]
    pub bmc_file: Option<PathBuf>,
    /// Server state directory holding the inventory (BMC settings of nodes and groups).
    #[arg(long, env = "SI_STATE_DIR", default_value = "/var/lib/si")]
    pub state_dir: PathBuf,
    /// Nodes handled at the same time (a thread each, mostly waiting on the network).
    #[arg(long, default_value_t = 1024)]
    pub fanout: usize,
    /// Per-node time limit, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

impl Common {
    fn setup(&self) -> Result<(Box<dyn BmcDirectory>, Vec<BmcTarget>, Duration)> {
        let dir = open_directory(self.bmc_file.as_deref(), &self.state_dir)?;
        let nodes = dir.expand(&self.nodes)?;
        let targets = dir.resolve(&nodes)?;
        let timeout = Duration::try_from_secs_f64(self.timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--timeout must be a positive number of seconds")?;
        Ok((dir, targets, timeout))
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerCmd {
    On,
    Off,
    Soft,
    Cycle,
    Reset,
    Status,
}

#[derive(Serialize)]
struct Report<'a, T> {
    results: &'a [NodeOutcome<T>],
    failed: Vec<&'a str>,
}

/// Prints results (text or JSON) and returns the exit code: failure if any node failed.
fn finish<T: Serialize>(
    out: &[NodeOutcome<T>],
    json: bool,
    text: impl Fn(&T) -> String,
) -> Result<ExitCode> {
    let failed: Vec<&str> = out
        .iter()
        .filter(|o| !o.ok())
        .map(|o| o.node.as_str())
        .collect();
    let mut w = std::io::stdout().lock();
    let written = (|| -> std::io::Result<()> {
        if json {
            let r = Report {
                results: out,
                failed: failed.clone(),
            };
            writeln!(w, "{}", serde_json::to_string_pretty(&r)?)?;
        } else {
            for o in out {
                match (&o.result, &o.error) {
                    (Some(v), _) => writeln!(w, "{}: {}", o.node, text(v))?,
                    (_, Some(e)) => writeln!(w, "{}: ERROR {e}", o.node)?,
                    _ => {}
                }
            }
        }
        w.flush()
    })();
    match written {
        // A closed pipe (`| head`) is the reader's choice, not a failure of the work.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.context("writing results")?,
    }
    if !json && !failed.is_empty() {
        eprintln!(
            "{} of {} nodes failed: {}",
            failed.len(),
            out.len(),
            failed.join(",")
        );
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Records `result` in the history; a failure to record turns success into an error.
fn recorded<T>(
    dir: &dyn BmcDirectory,
    node: &str,
    action: &str,
    result: Result<T>,
    detail: impl Fn(&T) -> String,
) -> Result<T> {
    let ev = HistoryEvent::new(
        node,
        action,
        &result
            .as_ref()
            .map(&detail)
            .map_err(|e| anyhow::anyhow!("{e:#}")),
    );
    let rec = dir.record(&ev);
    let v = result?;
    rec.with_context(|| format!("{action} succeeded but recording it in the history failed"))?;
    Ok(v)
}

pub fn power(cmd: PowerCmd, c: &Common) -> Result<ExitCode> {
    let (dir, targets, timeout) = c.setup()?;
    let action = match cmd {
        PowerCmd::On => Some(PowerAction::On),
        PowerCmd::Off => Some(PowerAction::Off),
        PowerCmd::Soft => Some(PowerAction::Soft),
        PowerCmd::Cycle => Some(PowerAction::Cycle),
        PowerCmd::Reset => Some(PowerAction::Reset),
        PowerCmd::Status => None,
    };
    let out = for_each_node(&targets, c.fanout, timeout, |t, deadline| match action {
        None => with_bmc(t, deadline, |b| b.power_status()).map(|s| match s {
            PowerState::On => "on".to_string(),
            PowerState::Off => "off".to_string(),
        }),
        Some(a) => {
            let r = with_bmc(t, deadline, |b| b.power(a));
            recorded(
                dir.as_ref(),
                &t.node,
                &format!("power {}", a.name()),
                r,
                |_| String::new(),
            )
            .map(|_| a.name().to_string())
        }
    });
    finish(&out, c.json, |s| s.clone())
}

pub fn bootdev(dev: BootDevice, persistent: bool, c: &Common) -> Result<ExitCode> {
    let (dir, targets, timeout) = c.setup()?;
    let what = format!(
        "bootdev {}{}",
        dev.name(),
        if persistent { " persistent" } else { "" }
    );
    let out = for_each_node(&targets, c.fanout, timeout, |t, deadline| {
        let r = with_bmc(t, deadline, |b| b.set_boot_device(dev, persistent));
        recorded(dir.as_ref(), &t.node, &what, r, |_| String::new()).map(|_| what.clone())
    });
    finish(&out, c.json, |s| s.clone())
}

pub fn sel(clear: bool, c: &Common) -> Result<ExitCode> {
    let (dir, targets, timeout) = c.setup()?;
    let out = for_each_node(&targets, c.fanout, timeout, |t, deadline| {
        if clear {
            let r = with_bmc(t, deadline, |b| b.clear_sel());
            recorded(dir.as_ref(), &t.node, "sel clear", r, |_| String::new()).map(|_| Vec::new())
        } else {
            with_bmc(t, deadline, |b| b.sel())
        }
    });
    finish(&out, c.json, |v| {
        if clear {
            return "SEL cleared".into();
        }
        let mut s = format!("{} entries", v.len());
        for e in v {
            s.push_str(&format!(
                "\n  {:>4x} | {} | {} #{:#04x} | {}",
                e.id, e.time, e.sensor_type, e.sensor_number, e.description
            ));
        }
        s
    })
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "na".into())
}

pub fn sensors(c: &Common) -> Result<ExitCode> {
    let (_dir, targets, timeout) = c.setup()?;
    let out = for_each_node(&targets, c.fanout, timeout, |t, deadline| {
        with_bmc(t, deadline, |b| b.sensors())
    });
    finish(&out, c.json, |v| {
        let mut s = format!("{} sensors", v.len());
        for r in v {
            s.push_str(&format!(
                "\n  {:<16} | {:<12} | {:>10} {:<9} | {:<6} | lnr {} lcr {} lnc {} unc {} ucr {} unr {}",
                r.name,
                r.sensor_type,
                fmt_opt(r.value),
                r.unit,
                r.status,
                fmt_opt(r.lower_non_recoverable),
                fmt_opt(r.lower_critical),
                fmt_opt(r.lower_non_critical),
                fmt_opt(r.upper_non_critical),
                fmt_opt(r.upper_critical),
                fmt_opt(r.upper_non_recoverable)
            ));
        }
        s
    })
}

pub fn inventory(c: &Common) -> Result<ExitCode> {
    let (_dir, targets, timeout) = c.setup()?;
    let out = for_each_node(&targets, c.fanout, timeout, |t, deadline| {
        with_bmc(t, deadline, |b| b.inventory())
    });
    finish(&out, c.json, |i| {
        let o = |x: &Option<String>| x.clone().unwrap_or_else(|| "-".into());
        format!(
            "vendor {} | product {} | serial {} | board {} {} serial {}",
            o(&i.product_manufacturer
                .clone()
                .or_else(|| i.board_manufacturer.clone())),
            o(&i.product_name),
            o(&i.product_serial),
            o(&i.board_manufacturer),
            o(&i.board_product),
            o(&i.board_serial)
        )
    })
}

/// PXE for the next boot, boot action `install`, then power cycle (or on if off); each step
/// is recorded in the node's history.
/// `action` is the boot action armed: `install` (an image) or `autoinstall` (the
/// distribution's installer with the node's profile).
pub fn reinstall(c: &Common, action: &str) -> Result<ExitCode> {
    let (dir, targets, timeout) = c.setup()?;
    let out = for_each_node(&targets, c.fanout, timeout, |t, deadline| {
        with_bmc(t, deadline, |b| {
            let r = b.set_boot_device(BootDevice::Pxe, false);
            recorded(dir.as_ref(), &t.node, "reinstall: bootdev pxe", r, |_| {
                String::new()
            })?;
            let r = dir.set_boot_action(&t.node, action);
            recorded(
                dir.as_ref(),
                &t.node,
                &format!("reinstall: boot-action {action}"),
                r,
                |_| String::new(),
            )?;
            let r = b.power_status().and_then(|s| {
                let a = if s == PowerState::On {
                    PowerAction::Cycle
                } else {
                    PowerAction::On
                };
                b.power(a).map(|_| a)
            });
            let a = recorded(dir.as_ref(), &t.node, "reinstall: power", r, |a| {
                format!("power {}", a.name())
            })?;
            Ok(format!(
                "reinstalling (pxe, boot action {action}, power {})",
                a.name()
            ))
        })
    });
    finish(&out, c.json, |s| s.clone())
}

/// Options of `si-console`.
#[derive(Args, Debug, Clone)]
pub struct ConsoleArgs {
    /// One node.
    pub node: String,
    /// BMC directory as a TOML file (mode 0600) instead of the inventory.
    #[arg(long)]
    pub bmc_file: Option<PathBuf>,
    /// Server state directory holding the inventory.
    #[arg(long, env = "SI_STATE_DIR", default_value = "/var/lib/si")]
    pub state_dir: PathBuf,
    /// Time limit for connecting and for each exchange, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

/// Serial-over-LAN console on one node; `~.` ends it.
pub fn console(a: &ConsoleArgs) -> Result<ExitCode> {
    let dir = open_directory(a.bmc_file.as_deref(), &a.state_dir)?;
    let nodes = dir.expand(&a.node)?;
    anyhow::ensure!(
        nodes.len() == 1,
        "si-console takes one node, not {}",
        nodes.len()
    );
    let target = dir.resolve(&nodes)?.remove(0);
    let timeout = Duration::try_from_secs_f64(a.timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--timeout must be a positive number of seconds")?;
    let r = super::sol::console(&target, timeout);
    let ev = HistoryEvent::new(
        &target.node,
        "console",
        &r.as_ref()
            .map(|_| String::new())
            .map_err(|e| anyhow::anyhow!("{e:#}")),
    );
    dir.record(&ev)
        .context("recording the console session in the history")?;
    r.with_context(|| format!("console on {}", target.node))?;
    Ok(ExitCode::SUCCESS)
}
