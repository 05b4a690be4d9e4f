//! IPMI through `ipmitool -I lanplus raw ...`: the same commands and decoders as the native
//! driver, with ipmitool's session handling (and its workarounds for odd BMCs). One ipmitool
//! process per request; the password goes through the environment (`-E`), never argv.

use super::ipmi::Transport;
use super::rmcp::CompletionError;
use super::BmcTarget;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct IpmitoolTransport {
    target: BmcTarget,
    deadline: Instant,
    program: String,
}

impl IpmitoolTransport {
    pub fn new(target: &BmcTarget, deadline: Instant) -> Result<Self> {
        ensure!(
            matches!(target.cipher_suite, 0..=17),
            "cipher suite {} out of range",
            target.cipher_suite
        );
        let program = std::env::var("SI_IPMITOOL").unwrap_or_else(|_| "ipmitool".to_string());
        Ok(IpmitoolTransport {
            target: target.clone(),
            deadline,
            program,
        })
    }
}

/// Parses ipmitool's `raw` output: hex bytes separated by whitespace.
pub fn parse_raw_output(s: &str) -> Result<Vec<u8>> {
    s.split_whitespace()
        .map(|w| {
            u8::from_str_radix(w, 16).with_context(|| format!("unexpected ipmitool output {w:?}"))
        })
        .collect()
}

/// Finds `rsp=0x..` in ipmitool's error message (a non-zero completion code).
pub fn parse_completion(stderr: &str) -> Option<u8> {
    let at = stderr.find("rsp=0x")?;
    let hex: String = stderr[at + 6..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    u8::from_str_radix(&hex, 16).ok()
}

impl Transport for IpmitoolTransport {
    fn raw(&mut self, netfn: u8, cmd: u8, data: &[u8]) -> Result<Vec<u8>> {
        let t = &self.target;
        let left = self.deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "timed out before sending netfn {netfn:#04x} cmd {cmd:#04x}"
        );
        let secs = left.as_secs().max(1);
        let mut c = Command::new(&self.program);
        c.args([
            "-I",
            "lanplus",
            "-H",
            &t.host,
            "-p",
            &t.port.to_string(),
            "-U",
            &t.user,
            "-E",
        ])
        .args([
            "-C",
            &t.cipher_suite.to_string(),
            "-N",
            "1",
            "-R",
            &secs.to_string(),
        ])
        .arg("raw")
        .arg(format!("{netfn:#04x}"))
        .arg(format!("{cmd:#04x}"))
        .args(data.iter().map(|b| format!("{b:#04x}")))
        .env("IPMI_PASSWORD", &t.password)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .with_context(|| format!("running {}", self.program))?;
        let status = loop {
            if let Some(s) = child.try_wait().context("waiting for ipmitool")? {
                break s;
            }
            if Instant::now() >= self.deadline {
                child
                    .kill()
                    .context("killing ipmitool after the deadline")?;
                child.wait().context("reaping ipmitool")?;
                bail!("timed out (ipmitool still running at the deadline)");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = child.stdout.take() {
            o.read_to_string(&mut out)
                .context("reading ipmitool output")?;
        }
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut err)
                .context("reading ipmitool errors")?;
        }
        if !status.success() {
            if let Some(code) = parse_completion(&err) {
                return Err(CompletionError { netfn, cmd, code }.into());
            }
            let msg = err
                .lines()
                .filter(|l| !l.contains("Get Channel Cipher Suites"))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(anyhow!("ipmitool failed ({status}): {msg}"));
        }
        parse_raw_output(&out)
    }

    fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_raw_and_errors() {
        assert_eq!(
            parse_raw_output(" 51 00 00\n 80 3e\n").unwrap(),
            vec![0x51, 0, 0, 0x80, 0x3e]
        );
        assert!(parse_raw_output("Error: x").is_err());
        let e = "Unable to send RAW command (channel=0x0 netfn=0xa lun=0x0 cmd=0x99 rsp=0xc1): Invalid command";
        assert_eq!(parse_completion(e), Some(0xC1));
        assert_eq!(
            parse_completion("Error: Unable to establish IPMI v2 / RMCP+ session"),
            None
        );
    }
}
