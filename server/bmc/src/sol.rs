//! Serial-over-LAN console (IPMI 2.0 SOL payload over an RMCP+ session).
//!
//! Activate Payload (SOL, instance 1, encrypted and authenticated), then SOL packets both ways:
//! `[packet seq | ack seq | accepted count | operation/status | data...]`. Our packets carry
//! a sequence number 1..15 and are resent until acknowledged; the BMC's packets are
//! acknowledged (and printed once, duplicates dropped). `~.` after a newline ends the session
//! when standard input is a terminal; end of input ends it otherwise (after a short drain).

use super::ipmi::{completion_code, NativeTransport};
use super::rmcp::{self, Session};
use super::{BmcTarget, Driver};
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::collections::VecDeque;
use std::io::{IsTerminal, Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Time allowed for output to arrive after standard input ended (non-terminal input).
const DRAIN: Duration = Duration::from_millis(1500);

/// Restores the terminal's settings when dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter() -> Result<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(RawMode(None));
        }
        let saved = tcgetattr(&stdin).context("reading terminal settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("setting the terminal to raw mode")?;
        Ok(RawMode(Some(saved)))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

/// Runs an interactive console on `target` until `~.`, end of input, or the BMC ends it.
pub fn console(target: &BmcTarget, timeout: Duration) -> Result<()> {
    match target.driver {
        Driver::Ipmi => {}
        Driver::Ipmitool => {
            let status = std::process::Command::new("ipmitool")
                .args([
                    "-I",
                    "lanplus",
                    "-H",
                    &target.host,
                    "-p",
                    &target.port.to_string(),
                    "-U",
                    &target.user,
                    "-E",
                ])
                .args(["-C", &target.cipher_suite.to_string(), "sol", "activate"])
                .env("IPMI_PASSWORD", &target.password)
                .status()
                .context("running ipmitool sol activate")?;
            ensure!(status.success(), "ipmitool sol activate failed ({status})");
            return Ok(());
        }
        Driver::Redfish => bail!(
            "{}: the Redfish driver has no serial console (use driver = \"ipmi\")",
            target.node
        ),
    }
    let deadline = Instant::now() + timeout;
    let mut session = NativeTransport::connect(target, deadline)?.into_session();
    let max_out = activate(&mut session, target.port)?;
    // From here on the session lasts as long as the user wants; each exchange still has
    // `timeout` to complete.
    session.set_deadline(Instant::now() + Duration::from_secs(365 * 24 * 3600));
    let result = {
        let _raw = RawMode::enter()?;
        run(&mut session, max_out, std::io::stdin().is_terminal())
    };
    session.set_deadline(Instant::now() + timeout);
    let deact = session
        .command(0x06, 0x49, &[0x01, 0x01, 0, 0, 0, 0])
        .context("Deactivate Payload (SOL)");
    let close = session.close();
    result?;
    deact?;
    close
}

/// Activate Payload (SOL instance 1); returns the largest data chunk we may send.
fn activate(s: &mut Session, port: u16) -> Result<usize> {
    let req = [0x01, 0x01, 0xC0, 0, 0, 0];
    let d = match s.command(0x06, 0x48, &req) {
        Err(e) if completion_code(&e) == Some(0x80) => {
            // Already active (a previous console did not end cleanly): take it over.
            s.command(0x06, 0x49, &[0x01, 0x01, 0, 0, 0, 0])
                .context("deactivating the previous SOL session")?;
            s.command(0x06, 0x48, &req)
                .context("Activate Payload (SOL)")?
        }
        r => r.context("Activate Payload (SOL)")?,
    };
    ensure!(d.len() >= 10, "short Activate Payload answer");
    let inbound = u16::from_le_bytes([d[4], d[5]]) as usize;
    let sol_port = u16::from_le_bytes([d[8], d[9]]);
    ensure!(
        sol_port == port || sol_port == 0,
        "BMC wants SOL on UDP port {sol_port}, which is not supported"
    );
    Ok(inbound.saturating_sub(4).clamp(1, 255))
}

/// A parsed SOL packet from the BMC.
#[derive(Debug, PartialEq, Eq)]
pub struct SolPacket<'a> {
    pub seq: u8,
    pub ack: u8,
    pub accepted: u8,
    pub status: u8,
    pub data: &'a [u8],
}

pub fn parse_sol(p: &[u8]) -> Result<SolPacket<'_>> {
    ensure!(p.len() >= 4, "SOL packet of {} bytes is too short", p.len());
    Ok(SolPacket {
        seq: p[0] & 0x0F,
        ack: p[1] & 0x0F,
        accepted: p[2],
        status: p[3],
        data: &p[4..],
    })
}

/// Scans typed bytes for `~.` at the start of a line; returns true when found.
fn escape_seen(state: &mut u8, bytes: &[u8]) -> bool {
    // state 0: start of line, 1: in line, 2: saw '~' at start of line
    for &b in bytes {
        *state = match (*state, b) {
            (2, b'.') => return true,
            (0, b'~') => 2,
            (_, b'\r') | (_, b'\n') => 0,
            _ => 1,
        };
    }
    false
}

fn run(s: &mut Session, max_out: usize, tty: bool) -> Result<()> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Vec::new());
                    return;
                }
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut out = std::io::stdout().lock();
    let mut queue: VecDeque<u8> = VecDeque::new();
    let mut pending: Option<(u8, Vec<u8>, Instant, u32)> = None;
    let mut next_seq = 1u8;
    let mut last_in: Option<u8> = None;
    let mut esc = 0u8;
    let mut eof_at: Option<Instant> = None;
    let mut last_activity = Instant::now();
    loop {
        while let Ok(chunk) = rx.try_recv() {
            if chunk.is_empty() {
                eof_at.get_or_insert_with(Instant::now);
            } else if tty && escape_seen(&mut esc, &chunk) {
                writeln!(out, "\r\n[si-console: closed]\r").context("writing to the terminal")?;
                return Ok(());
            } else {
                queue.extend(chunk);
            }
        }
        if pending.is_none() && !queue.is_empty() {
            let n = queue.len().min(max_out);
            let data: Vec<u8> = queue.drain(..n).collect();
            let seq = next_seq;
            next_seq = if next_seq >= 15 { 1 } else { next_seq + 1 };
            send(s, seq, 0, 0, &data)?;
            pending = Some((seq, data, Instant::now(), 1));
        }
        if let Some((seq, data, at, tries)) = &mut pending {
            if at.elapsed() > Duration::from_secs(1) {
                ensure!(*tries < 8, "the BMC stopped acknowledging console input");
                send(s, *seq, 0, 0, data)?;
                *at = Instant::now();
                *tries += 1;
            }
        }
        if let Some(t) = eof_at {
            if queue.is_empty() && pending.is_none() && t.elapsed() > DRAIN {
                return Ok(());
            }
        }
        if last_activity.elapsed() > Duration::from_secs(30) {
            // Keep the session alive: Get Device ID, answer ignored.
            s.send_payload(
                rmcp::PAYLOAD_IPMI,
                &rmcp::ipmi_request(0x06, 0x01, 0x3F, &[]),
            )?;
            last_activity = Instant::now();
        }
        let Some(p) = s.recv_payload(Duration::from_millis(50))? else {
            continue;
        };
        if p.payload_type != rmcp::PAYLOAD_SOL {
            continue;
        }
        last_activity = Instant::now();
        let sol = parse_sol(&p.payload)?;
        if let Some((seq, data, _, _)) = &pending {
            if sol.ack == *seq && sol.ack != 0 {
                if sol.status & 0x40 == 0 {
                    let taken = (sol.accepted as usize).min(data.len());
                    for b in data[taken..].iter().rev() {
                        queue.push_front(*b);
                    }
                }
                // NACK: the whole chunk goes back to the queue after a pause.
                if sol.status & 0x40 != 0 {
                    for b in data.iter().rev() {
                        queue.push_front(*b);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                pending = None;
            }
        }
        if sol.seq != 0 {
            if last_in != Some(sol.seq) && !sol.data.is_empty() {
                out.write_all(sol.data).context("writing console output")?;
                out.flush().context("writing console output")?;
            }
            last_in = Some(sol.seq);
            send(s, 0, sol.seq, sol.data.len().min(255) as u8, &[])?;
        }
        if sol.status & 0x10 != 0 {
            return Err(anyhow!(
                "the BMC deactivated the console (SOL deactivating)"
            ));
        }
    }
}

fn send(s: &mut Session, seq: u8, ack: u8, accepted: u8, data: &[u8]) -> Result<()> {
    let mut p = vec![seq, ack, accepted, 0];
    p.extend_from_slice(data);
    s.send_payload(rmcp::PAYLOAD_SOL, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_and_parse() {
        let mut st = 0;
        assert!(!escape_seen(&mut st, b"ls ~."));
        assert!(escape_seen(&mut st, b"\r~."));
        let mut st = 0;
        assert!(escape_seen(&mut st, b"~."));
        assert!(parse_sol(&[1, 2]).is_err());
        let p = parse_sol(&[0x13, 0x02, 5, 0x40, b'h', b'i']).unwrap();
        assert_eq!(
            (p.seq, p.ack, p.accepted, p.status, p.data),
            (3, 2, 5, 0x40, &b"hi"[..])
        );
    }
}
