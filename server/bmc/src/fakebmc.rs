//! A minimal RMCP+ BMC (the other side of [`super::rmcp`]) for tests: one user, one session
//! at a time, cipher suites 3 and 17, Get Channel Authentication Capabilities, Set Session
//! Privilege Level, Get Chassis Status, Chassis Control and Close Session.
//!
//! Its purpose is the cross-check that OpenIPMI's simulator cannot give: ipmi_sim 2.0.33 has
//! no RAKP-HMAC-SHA256, so cipher suite 17 is verified by having *ipmitool* (an independent
//! implementation) open sessions with this BMC, whose key derivation is the one the client uses.
//! If ipmitool accepts RAKP 2 / RAKP 4 and the encrypted, authenticated responses, the SIK,
//! K1, K2, AuthCodes and AES framing agree with ipmitool's.

use super::rmcp::{self, CipherSuite, Keys, RakpParams};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct FakeBmc {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Chassis power (0/1), changed by Chassis Control.
    pub power: Arc<AtomicU8>,
    /// When set, the AuthCode of every IPMI response is corrupted.
    pub corrupt: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Sess {
    cs: CipherSuite,
    console_sid: u32,
    bmc_sid: u32,
    console_rand: [u8; 16],
    bmc_rand: [u8; 16],
    role: u8,
    user: Vec<u8>,
    keys: Option<Keys>,
    seq: u32,
}

const GUID: [u8; 16] = *b"si-fake-bmc-guid";

impl FakeBmc {
    pub fn start(user: &str, password: &str) -> FakeBmc {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind fake BMC");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = sock.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let power = Arc::new(AtomicU8::new(0));
        let (user, password) = (user.as_bytes().to_vec(), password.as_bytes().to_vec());
        let corrupt = Arc::new(AtomicBool::new(false));
        let (st, pw, co) = (stop.clone(), power.clone(), corrupt.clone());
        let thread = std::thread::spawn(move || serve(sock, &user, &password, &st, &pw, &co));
        FakeBmc {
            addr,
            stop,
            power,
            corrupt,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeBmc {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn cksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// Response message for a request message `req` (already checked to be >= 7 bytes).
fn response(req: &[u8], cc: u8, data: &[u8]) -> Vec<u8> {
    let mut m = vec![req[3], ((req[1] >> 2) | 1) << 2 | (req[4] & 3)];
    m.push(cksum(&m));
    m.extend_from_slice(&[req[0], req[4], req[5], cc]);
    m.extend_from_slice(data);
    let c = cksum(&m[3..]);
    m.push(c);
    m
}

fn serve(
    sock: UdpSocket,
    user: &[u8],
    password: &[u8],
    stop: &AtomicBool,
    power: &AtomicU8,
    corrupt: &AtomicBool,
) {
    let mut buf = [0u8; 2048];
    let mut sess: Option<Sess> = None;
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let d = &buf[..n];
        if n < 14 || d[0] != 6 || d[3] != 7 {
            continue;
        }
        if d[4] == 0x00 {
            // IPMI 1.5 session-less request: RMCP | authtype | seq(4) | sid(4) | len | msg.
            let msg = &d[14..];
            if msg.len() < 7 {
                continue;
            }
            let rsp = if msg[1] >> 2 == 0x06 && msg[5] == 0x38 {
                // Channel 1, RMCP+ supported, IPMI 2.0 extended capabilities.
                response(msg, 0, &[0x01, 0x80 | 0x04, 0x04, 0x02, 0, 0, 0, 0])
            } else {
                response(msg, 0xC1, &[])
            };
            let mut p = d[..14].to_vec();
            p[13] = rsp.len() as u8;
            p.extend_from_slice(&rsp);
            let _ = sock.send_to(&p, from);
            continue;
        }
        let keys = sess.as_ref().and_then(|s| s.keys.clone());
        let Ok(p) = rmcp::decode(d, keys.as_ref()) else {
            continue;
        };
        let reply = |t: u8, sid: u32, payload: &[u8], k: Option<&Keys>, seq: u32| {
            if let Ok(mut pkt) = rmcp::encode(t, sid, seq, payload, k, [7; 16]) {
                if k.is_some() && corrupt.load(Ordering::SeqCst) {
                    if let Some(last) = pkt.last_mut() {
                        *last ^= 0x55;
                    }
                }
                let _ = sock.send_to(&pkt, from);
            }
        };
        let m = &p.payload;
        match p.payload_type {
            rmcp::PAYLOAD_OPEN_REQ if m.len() >= 32 => {
                let console_sid = u32::from_le_bytes([m[4], m[5], m[6], m[7]]);
                let cs = match (m[12], m[20], m[28]) {
                    (1, 1, 1) => CipherSuite::Cs3,
                    (3, 4, 1) => CipherSuite::Cs17,
                    _ => {
                        let mut r = vec![m[0], 0x11, 0, 0];
                        r.extend_from_slice(&console_sid.to_le_bytes());
                        reply(rmcp::PAYLOAD_OPEN_RSP, 0, &r, None, 0);
                        continue;
                    }
                };
                let (a, i, c) = cs.algorithms();
                let bmc_sid = 0x0BADC0DE;
                let mut r = vec![m[0], 0, 4, 0];
                r.extend_from_slice(&console_sid.to_le_bytes());
                r.extend_from_slice(&u32::to_le_bytes(bmc_sid));
                r.extend_from_slice(&[
                    0, 0, 0, 8, a, 0, 0, 0, 1, 0, 0, 8, i, 0, 0, 0, 2, 0, 0, 8, c, 0, 0, 0,
                ]);
                sess = Some(Sess {
                    cs,
                    console_sid,
                    bmc_sid,
                    console_rand: [0; 16],
                    bmc_rand: *b"bmc-random-16byt",
                    role: 0,
                    user: Vec::new(),
                    keys: None,
                    seq: 0,
                });
                reply(rmcp::PAYLOAD_OPEN_RSP, 0, &r, None, 0);
            }
            rmcp::PAYLOAD_RAKP1 if m.len() >= 28 => {
                let Some(s) = sess.as_mut() else { continue };
                let ulen = m[27] as usize;
                let Some(name) = m.get(28..28 + ulen) else {
                    continue;
                };
                s.console_rand.copy_from_slice(&m[8..24]);
                s.role = m[24];
                s.user = name.to_vec();
                let mut r = vec![m[0], 0, 0, 0];
                r.extend_from_slice(&s.console_sid.to_le_bytes());
                if name != user {
                    r[1] = 0x0D;
                    reply(rmcp::PAYLOAD_RAKP2, 0, &r, None, 0);
                    continue;
                }
                let params = RakpParams {
                    console_sid: s.console_sid,
                    bmc_sid: s.bmc_sid,
                    console_rand: s.console_rand,
                    bmc_rand: s.bmc_rand,
                    bmc_guid: GUID,
                    role: s.role,
                    user: &s.user,
                };
                r.extend_from_slice(&s.bmc_rand);
                r.extend_from_slice(&GUID);
                r.extend_from_slice(&params.rakp2_hmac(s.cs, password));
                reply(rmcp::PAYLOAD_RAKP2, 0, &r, None, 0);
            }
            rmcp::PAYLOAD_RAKP3 if m.len() >= 8 => {
                let Some(s) = sess.as_mut() else { continue };
                let params = RakpParams {
                    console_sid: s.console_sid,
                    bmc_sid: s.bmc_sid,
                    console_rand: s.console_rand,
                    bmc_rand: s.bmc_rand,
                    bmc_guid: GUID,
                    role: s.role,
                    user: &s.user,
                };
                let mut r = vec![m[0], 0, 0, 0];
                r.extend_from_slice(&s.console_sid.to_le_bytes());
                if !rmcp::ct_eq(&params.rakp3_hmac(s.cs, password), &m[8..]) {
                    r[1] = 0x0F;
                    reply(rmcp::PAYLOAD_RAKP4, 0, &r, None, 0);
                    continue;
                }
                let keys = params.keys(s.cs, password);
                r.extend_from_slice(&params.rakp4_icv(&keys));
                s.keys = Some(keys);
                reply(rmcp::PAYLOAD_RAKP4, 0, &r, None, 0);
            }
            rmcp::PAYLOAD_IPMI if m.len() >= 7 => {
                let Some(s) = sess.as_mut() else { continue };
                let Some(k) = s.keys.clone() else { continue };
                let (netfn, cmd) = (m[1] >> 2, m[5]);
                let rsp = match (netfn, cmd) {
                    (0x06, 0x3B) => response(m, 0, &[m.get(6).copied().unwrap_or(4)]),
                    (0x06, 0x3C) => response(m, 0, &[]),
                    (0x00, 0x01) => response(m, 0, &[power.load(Ordering::SeqCst), 0, 0, 0]),
                    (0x00, 0x02) => {
                        match m.get(6) {
                            Some(0) | Some(5) => power.store(0, Ordering::SeqCst),
                            Some(1) | Some(2) | Some(3) => power.store(1, Ordering::SeqCst),
                            _ => {}
                        }
                        response(m, 0, &[])
                    }
                    _ => response(m, 0xC1, &[]),
                };
                s.seq += 1;
                reply(rmcp::PAYLOAD_IPMI, s.console_sid, &rsp, Some(&k), s.seq);
                if (netfn, cmd) == (0x06, 0x3C) {
                    sess = None;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ipmi, Bmc, BmcTarget, Driver, PowerAction, PowerState};
    use std::process::Command;
    use std::time::Instant;

    fn ipmitool_available() -> bool {
        Command::new("ipmitool").arg("-V").output().is_ok()
    }

    fn ipmitool(bmc: &FakeBmc, cs: u8, password: &str, args: &[&str]) -> (bool, String) {
        let o = Command::new("ipmitool")
            .args([
                "-I",
                "lanplus",
                "-H",
                "127.0.0.1",
                "-p",
                &bmc.addr.port().to_string(),
                "-U",
                "admin",
                "-E",
            ])
            .args(["-C", &cs.to_string(), "-N", "1", "-R", "2"])
            .args(args)
            .env("IPMI_PASSWORD", password)
            .output()
            .expect("running ipmitool");
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    }

    /// ipmitool (independent implementation) against this crate's RAKP/key derivation:
    /// cipher suites 3 and 17 both establish sessions and exchange encrypted commands.
    #[test]
    fn ipmitool_accepts_our_rakp_and_keys_for_suites_3_and_17() {
        if !ipmitool_available() {
            eprintln!("SKIP: ipmitool not installed (Debian package ipmitool)");
            return;
        }
        for cs in [3u8, 17] {
            let bmc = FakeBmc::start("admin", "s3cr3t-pw");
            let (ok, out) = ipmitool(&bmc, cs, "s3cr3t-pw", &["power", "status"]);
            assert!(
                ok && out.contains("Chassis Power is off"),
                "suite {cs}: {out}"
            );
            let (ok, out) = ipmitool(&bmc, cs, "s3cr3t-pw", &["power", "on"]);
            assert!(ok, "suite {cs}: {out}");
            assert_eq!(bmc.power.load(Ordering::SeqCst), 1);
            // A wrong password fails in RAKP on ipmitool's side too.
            let (ok, out) = ipmitool(&bmc, cs, "nope", &["power", "status"]);
            assert!(!ok, "suite {cs}: wrong password accepted: {out}");
        }
    }

    /// A BMC whose answers fail integrity checks: a clear error by the deadline.
    #[test]
    fn bad_integrity_data_is_an_error() {
        let bmc = FakeBmc::start("admin", "pw");
        let t = BmcTarget {
            node: "f".into(),
            host: "127.0.0.1".into(),
            port: bmc.addr.port(),
            user: "admin".into(),
            password: "pw".into(),
            driver: Driver::Ipmi,
            cipher_suite: 17,
            redfish_tls: Default::default(),
        };
        let start = Instant::now();
        let mut b = ipmi::IpmiBmc::new(
            ipmi::NativeTransport::connect(&t, start + Duration::from_millis(2500)).unwrap(),
        );
        bmc.corrupt.store(true, Ordering::SeqCst);
        let e = format!("{:#}", b.power_status().unwrap_err());
        assert!(e.contains("integrity check failed"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(4));
    }

    /// A hostile BMC answering every datagram with random or mutated packets: the client
    /// returns an error by its deadline, never panics, never hangs.
    #[test]
    fn hostile_bmc_answers() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let port = sock.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let bmc = std::thread::spawn(move || {
            let mut x = 0x2545F4914F6CDD1Du64;
            let mut rnd = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::SeqCst) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                // The request's header with a plausible payload type and a random body:
                // right tags, wrong lengths, garbage status codes, truncations.
                let mut p = buf[..n.min(16)].to_vec();
                if p.len() > 5 {
                    p[5] = [0x11, 0x13, 0x15, 0xC0][(rnd() % 4) as usize];
                }
                let len = (rnd() % 80) as usize;
                let body: Vec<u8> = (0..len)
                    .map(|i| {
                        if i == 0 {
                            1 + (rnd() % 3) as u8
                        } else {
                            rnd() as u8
                        }
                    })
                    .collect();
                if p.len() >= 16 {
                    let l = if rnd() % 3 == 0 {
                        rnd() as u16
                    } else {
                        len as u16
                    };
                    p[14..16].copy_from_slice(&l.to_le_bytes());
                }
                p.extend_from_slice(&body);
                if rnd() % 2 == 0 {
                    let keep = (rnd() % (p.len() as u64 + 1)) as usize;
                    p.truncate(keep);
                }
                for _ in 0..(rnd() % 3) {
                    let _ = sock.send_to(&p, from);
                }
            }
        });
        for cs in [3u8, 17] {
            for _ in 0..20 {
                let t = BmcTarget {
                    node: "h".into(),
                    host: "127.0.0.1".into(),
                    port,
                    user: "admin".into(),
                    password: "pw".into(),
                    driver: Driver::Ipmi,
                    cipher_suite: cs,
                    redfish_tls: Default::default(),
                };
                let start = Instant::now();
                let r = ipmi::NativeTransport::connect(&t, start + Duration::from_millis(150));
                assert!(r.is_err());
                assert!(start.elapsed() < Duration::from_millis(1000));
            }
        }
        stop.store(true, Ordering::SeqCst);
        bmc.join().unwrap();
    }

    #[test]
    fn native_client_against_fake_bmc() {
        for cs in [3u8, 17] {
            let bmc = FakeBmc::start("admin", "pw");
            let t = BmcTarget {
                node: "f".into(),
                host: "127.0.0.1".into(),
                port: bmc.addr.port(),
                user: "admin".into(),
                password: "pw".into(),
                driver: Driver::Ipmi,
                cipher_suite: cs,
                redfish_tls: Default::default(),
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut b = ipmi::IpmiBmc::new(ipmi::NativeTransport::connect(&t, deadline).unwrap());
            assert_eq!(b.power_status().unwrap(), PowerState::Off);
            b.power(PowerAction::On).unwrap();
            assert_eq!(b.power_status().unwrap(), PowerState::On);
            let e = b.sel().unwrap_err();
            assert_eq!(ipmi::completion_code(&e), Some(0xC1), "{e:#}");
            Box::new(b).close().unwrap();
            let bad = BmcTarget {
                password: "wrong".into(),
                ..t
            };
            let e = ipmi::NativeTransport::connect(&bad, Instant::now() + Duration::from_secs(5))
                .err()
                .unwrap();
            assert!(format!("{e:#}").contains("wrong password"), "{e:#}");
        }
    }
}
