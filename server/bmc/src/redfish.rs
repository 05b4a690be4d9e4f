//! Redfish (DMTF, HTTP/JSON) driver.
//!
//! HTTP goes through `curl` (TLS, redirects, chunked bodies handled there): the credentials
//! are passed in a curl config on standard input, never on the command line. The BMC password
//! travels in every request (Basic auth), so the connection is HTTPS on any port and the
//! certificate is verified, by default against the system's CAs (or `SI_REDFISH_CACERT`);
//! [`RedfishTls`] names the explicit alternatives: a CA file, a pinned public key (for the
//! self-signed certificates most BMCs ship), no verification, or plain HTTP, the last two
//! warned about at every use. `host` may carry an `https://` prefix; an `http://` prefix
//! needs `plain-http`.

use super::{
    Bmc, BmcTarget, BootDevice, Inventory, PowerAction, PowerState, RedfishTls, SelEntry,
    SensorReading,
};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Largest response body accepted.
const MAX_BODY: usize = 8 << 20;

pub struct RedfishBmc {
    base: String,
    user: String,
    password: String,
    tls: RedfishTls,
    deadline: Instant,
    system: Option<String>,
}

impl RedfishBmc {
    pub fn new(t: &BmcTarget, deadline: Instant) -> Result<RedfishBmc> {
        let plain = t.redfish_tls == RedfishTls::PlainHttp;
        ensure!(
            !t.host.starts_with("http://") || plain,
            "node {}: BMC address {} is plain http: the password would travel in the clear \
             (set redfish_tls = \"plain-http\" to allow it)",
            t.node,
            t.host
        );
        ensure!(
            !(plain && t.host.starts_with("https://")),
            "node {}: BMC address {} is https but redfish_tls is plain-http",
            t.node,
            t.host
        );
        match &t.redfish_tls {
            RedfishTls::PlainHttp => tracing::warn!(
                node = %t.node,
                host = %t.host,
                "Redfish over plain HTTP: the BMC password travels in the clear"
            ),
            RedfishTls::InsecureSkipVerify => tracing::warn!(
                node = %t.node,
                host = %t.host,
                "Redfish certificate NOT verified: anyone on the path can take the BMC password"
            ),
            _ => {}
        }
        let base = if t.host.starts_with("http://") || t.host.starts_with("https://") {
            t.host.trim_end_matches('/').to_string()
        } else {
            let scheme = if plain { "http" } else { "https" };
            let host = if t.host.contains(':') {
                format!("[{}]", t.host)
            } else {
                t.host.clone()
            };
            format!("{scheme}://{host}:{}", t.port)
        };
        ensure!(
            !t.user.contains(['"', '\n', '\\']) && !t.password.contains(['"', '\n', '\\']),
            "Redfish user or password contains a quote, backslash or newline"
        );
        Ok(RedfishBmc {
            base,
            user: t.user.clone(),
            password: t.password.clone(),
            tls: t.redfish_tls.clone(),
            deadline,
            system: None,
        })
    }

    /// One HTTP request; returns the parsed JSON body (Null for an empty one).
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "timed out before {method} {path}");
        let url = format!("{}{}", self.base, path);
        let mut c = Command::new("curl");
        c.args([
            "-sS",
            "--config",
            "-",
            "-X",
            method,
            "-H",
            "Accept: application/json",
            "-w",
            "\n%{http_code}",
        ])
        .args([
            "--max-time",
            &format!("{:.3}", left.as_secs_f64().max(0.001)),
        ])
        .args(["--max-filesize", &MAX_BODY.to_string()]);
        // curl itself refuses any other scheme than the one chosen.
        let proto = if self.tls == RedfishTls::PlainHttp {
            "=http"
        } else {
            "=https"
        };
        c.args(["--proto", proto]);
        match &self.tls {
            RedfishTls::Verify => {
                if let Some(ca) = std::env::var_os("SI_REDFISH_CACERT") {
                    c.arg("--cacert").arg(ca);
                }
            }
            RedfishTls::Ca(ca) => {
                c.arg("--cacert").arg(ca);
            }
            // The chain is not checked (self-signed), the key is: curl refuses any other.
            RedfishTls::Pin(k) => {
                c.arg("-k").args(["--pinnedpubkey", k]);
            }
            RedfishTls::InsecureSkipVerify => {
                c.arg("-k");
            }
            RedfishTls::PlainHttp => {}
        }
        let payload = body.map(|b| b.to_string());
        if let Some(p) = &payload {
            c.args(["-H", "Content-Type: application/json", "--data-binary", p]);
        }
        c.arg(&url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().context("running curl")?;
        {
            let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("curl stdin"))?;
            stdin
                .write_all(format!("user = \"{}:{}\"\n", self.user, self.password).as_bytes())
                .context("passing credentials to curl")?;
        }
        let mut out = Vec::new();
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("curl stdout"))?
            .take(MAX_BODY as u64 + 16)
            .read_to_end(&mut out)
            .context("reading curl output")?;
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut err).context("reading curl errors")?;
        }
        let status = child.wait().context("waiting for curl")?;
        ensure!(
            status.success(),
            "{method} {url}: curl failed ({status}): {}",
            err.trim()
        );
        let text = String::from_utf8_lossy(&out);
        let (body, code) = text
            .rsplit_once('\n')
            .ok_or_else(|| anyhow!("{method} {url}: no status from curl"))?;
        let code: u16 = code
            .trim()
            .parse()
            .with_context(|| format!("{method} {url}: bad HTTP status {code:?}"))?;
        if code == 401 || code == 403 {
            bail!("{method} {url}: HTTP {code}: authentication failed (user or password wrong)");
        }
        ensure!(
            (200..300).contains(&code),
            "{method} {url}: HTTP {code}: {}",
            extended_message(body)
        );
        if body.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(body).with_context(|| format!("{method} {url}: response is not JSON"))
    }

    fn get(&self, path: &str) -> Result<Value> {
        self.request("GET", path, None)
    }

    fn system(&mut self) -> Result<String> {
        if let Some(s) = &self.system {
            return Ok(s.clone());
        }
        let v = self.get("/redfish/v1/Systems")?;
        let s = first_member(&v).context("no ComputerSystem in /redfish/v1/Systems")?;
        self.system = Some(s.clone());
        Ok(s)
    }

    fn first_chassis(&self) -> Result<String> {
        first_member(&self.get("/redfish/v1/Chassis")?).context("no Chassis in /redfish/v1/Chassis")
    }
}

fn extended_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| body.chars().take(200).collect())
}

fn first_member(v: &Value) -> Option<String> {
    v.get("Members")?
        .as_array()?
        .first()?
        .get("@odata.id")?
        .as_str()
        .map(str::to_string)
}

fn s(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .filter(|s| !s.is_empty())
}

fn f(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

pub fn reset_type(a: PowerAction) -> &'static str {
    match a {
        PowerAction::On => "On",
        PowerAction::Off => "ForceOff",
        PowerAction::Soft => "GracefulShutdown",
        PowerAction::Cycle => "PowerCycle",
        PowerAction::Reset => "ForceRestart",
    }
}

/// Status like the IPMI driver's from a Redfish threshold set and reading.
fn status_from(v: &Value) -> String {
    match v.pointer("/Status/Health").and_then(Value::as_str) {
        _ if v
            .pointer("/Status/State")
            .and_then(Value::as_str)
            .is_some_and(|s| s != "Enabled") =>
        {
            "na".into()
        }
        Some("OK") => "ok".into(),
        Some("Warning") => "nc".into(),
        Some("Critical") => "cr".into(),
        _ => "na".into(),
    }
}

impl Bmc for RedfishBmc {
    fn power_status(&mut self) -> Result<PowerState> {
        let sys = self.system()?;
        let v = self.get(&sys)?;
        match v.get("PowerState").and_then(Value::as_str) {
            Some("On") | Some("PoweringOff") => Ok(PowerState::On),
            Some("Off") | Some("PoweringOn") => Ok(PowerState::Off),
            other => bail!("unexpected PowerState {other:?}"),
        }
    }

    fn power(&mut self, action: PowerAction) -> Result<()> {
        let sys = self.system()?;
        let v = self.get(&sys)?;
        let target = v
            .pointer("/Actions/#ComputerSystem.Reset/target")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("{sys}/Actions/ComputerSystem.Reset"));
        self.request(
            "POST",
            &target,
            Some(&json!({ "ResetType": reset_type(action) })),
        )
        .with_context(|| format!("ComputerSystem.Reset {}", reset_type(action)))?;
        Ok(())
    }

    fn set_boot_device(&mut self, dev: BootDevice, persistent: bool) -> Result<()> {
        let sys = self.system()?;
        let target = match dev {
            BootDevice::Pxe => "Pxe",
            BootDevice::Disk => "Hdd",
            BootDevice::Bios => "BiosSetup",
        };
        let enabled = if persistent { "Continuous" } else { "Once" };
        let body = json!({ "Boot": { "BootSourceOverrideTarget": target, "BootSourceOverrideEnabled": enabled } });
        self.request("PATCH", &sys, Some(&body))
            .context("setting the boot override")?;
        Ok(())
    }

    fn sel(&mut self) -> Result<Vec<SelEntry>> {
        let sys = self.system()?;
        let logs = self.get(&format!("{sys}/LogServices"))?;
        let log = first_member(&logs).context("the system has no LogService")?;
        let entries = self.get(&format!("{log}/Entries"))?;
        let members = entries
            .get("Members")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        Ok(members
            .iter()
            .take(4096)
            .enumerate()
            .map(|(i, e)| SelEntry {
                id: s(e, "Id").and_then(|x| x.parse().ok()).unwrap_or(i as u16),
                record_type: 0x02,
                timestamp: None,
                time: s(e, "Created").unwrap_or_default(),
                sensor_type: s(e, "SensorType").unwrap_or_default(),
                sensor_number: e
                    .get("SensorNumber")
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
                    .min(255) as u8,
                assertion: true,
                description: s(e, "Message").unwrap_or_default(),
                raw: Vec::new(),
            })
            .collect())
    }

    fn clear_sel(&mut self) -> Result<()> {
        let sys = self.system()?;
        let logs = self.get(&format!("{sys}/LogServices"))?;
        let log = first_member(&logs).context("the system has no LogService")?;
        self.request(
            "POST",
            &format!("{log}/Actions/LogService.ClearLog"),
            Some(&json!({})),
        )?;
        Ok(())
    }

    fn sensors(&mut self) -> Result<Vec<SensorReading>> {
        let ch = self.first_chassis()?;
        let mut out = Vec::new();
        let th = self.get(&format!("{ch}/Thermal"))?;
        let reading =
            |v: &Value, ty: &str, value: Option<f64>, unit: &str, i: usize| SensorReading {
                name: s(v, "Name").unwrap_or_default(),
                number: v
                    .get("SensorNumber")
                    .and_then(Value::as_u64)
                    .unwrap_or(i as u64)
                    .min(255) as u8,
                sensor_type: ty.into(),
                value,
                unit: unit.into(),
                status: status_from(v),
                lower_non_recoverable: f(v, "LowerThresholdFatal"),
                lower_critical: f(v, "LowerThresholdCritical"),
                lower_non_critical: f(v, "LowerThresholdNonCritical"),
                upper_non_critical: f(v, "UpperThresholdNonCritical"),
                upper_critical: f(v, "UpperThresholdCritical"),
                upper_non_recoverable: f(v, "UpperThresholdFatal"),
            };
        for (i, t) in th
            .get("Temperatures")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            out.push(reading(
                t,
                "Temperature",
                f(t, "ReadingCelsius"),
                "degrees C",
                i,
            ));
        }
        for (i, t) in th
            .get("Fans")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let unit = if s(t, "ReadingUnits").as_deref() == Some("Percent") {
                "percent"
            } else {
                "RPM"
            };
            out.push(reading(t, "Fan", f(t, "Reading"), unit, i));
        }
        let pw = self.get(&format!("{ch}/Power"))?;
        for (i, t) in pw
            .get("Voltages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            out.push(reading(t, "Voltage", f(t, "ReadingVolts"), "Volts", i));
        }
        Ok(out)
    }

    fn inventory(&mut self) -> Result<Inventory> {
        let sys = self.system()?;
        let v = self.get(&sys)?;
        Ok(Inventory {
            product_manufacturer: s(&v, "Manufacturer"),
            product_name: s(&v, "Model"),
            product_serial: s(&v, "SerialNumber"),
            product_part_number: s(&v, "PartNumber"),
            product_asset_tag: s(&v, "AssetTag"),
            ..Inventory::default()
        })
    }

    fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Against a small in-process HTTP fixture that behaves like a Redfish service.
    use super::*;
    use crate::Driver;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[derive(Default)]
    struct State {
        power: String,
        boot: Value,
        requests: Vec<(String, String, String)>,
    }

    fn serve(state: Arc<Mutex<State>>) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let mut parts = line.split_whitespace();
                let (method, path) = (
                    parts.next().unwrap_or("").to_string(),
                    parts.next().unwrap_or("").to_string(),
                );
                let mut len = 0;
                let mut auth = String::new();
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if lower.starts_with("authorization:") {
                        auth = h.trim().to_string();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let body = String::from_utf8(body).unwrap();
                let mut st = state.lock().unwrap();
                st.requests
                    .push((method.clone(), path.clone(), body.clone()));
                // Basic base64("root:calvin")
                let (code, resp) = if auth != "Authorization: Basic cm9vdDpjYWx2aW4=" {
                    (401, json!({"error": {"message": "bad auth"}}))
                } else {
                    match (method.as_str(), path.as_str()) {
                        ("GET", "/redfish/v1/Systems") => (
                            200,
                            json!({"Members": [{"@odata.id": "/redfish/v1/Systems/1"}]}),
                        ),
                        ("GET", "/redfish/v1/Systems/1") => (
                            200,
                            json!({
                            "PowerState": st.power, "Manufacturer": "Dell Inc.", "Model": "PowerEdge R650",
                            "SerialNumber": "ABC1234", "Boot": st.boot,
                            "Actions": {"#ComputerSystem.Reset": {"target": "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset"}}}),
                        ),
                        ("POST", "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset") => {
                            let v: Value = serde_json::from_str(&body).unwrap();
                            match v["ResetType"].as_str() {
                                Some("On") => st.power = "On".into(),
                                Some("ForceOff") => st.power = "Off".into(),
                                _ => {}
                            }
                            (204, Value::Null)
                        }
                        ("PATCH", "/redfish/v1/Systems/1") => {
                            let v: Value = serde_json::from_str(&body).unwrap();
                            st.boot = v["Boot"].clone();
                            (200, Value::Null)
                        }
                        ("GET", "/redfish/v1/Systems/1/LogServices") => (
                            200,
                            json!({"Members": [{"@odata.id": "/redfish/v1/Systems/1/LogServices/SEL"}]}),
                        ),
                        ("GET", "/redfish/v1/Systems/1/LogServices/SEL/Entries") => (
                            200,
                            json!({"Members": [
                            {"Id": "1", "Created": "2026-11-25T10:00:00Z", "Message": "CPU 1 temperature above critical", "SensorType": "Temperature", "SensorNumber": 1}]}),
                        ),
                        ("GET", "/redfish/v1/Chassis") => (
                            200,
                            json!({"Members": [{"@odata.id": "/redfish/v1/Chassis/1"}]}),
                        ),
                        ("GET", "/redfish/v1/Chassis/1/Thermal") => (
                            200,
                            json!({
                            "Temperatures": [{"Name": "CPU1 Temp", "ReadingCelsius": 41.0, "UpperThresholdCritical": 90.0, "Status": {"State": "Enabled", "Health": "OK"}}],
                            "Fans": [{"Name": "Fan1", "Reading": 5400, "ReadingUnits": "RPM", "Status": {"State": "Enabled", "Health": "Warning"}}]}),
                        ),
                        ("GET", "/redfish/v1/Chassis/1/Power") => (
                            200,
                            json!({"Voltages": [{"Name": "12V", "ReadingVolts": 12.1, "Status": {"State": "Enabled", "Health": "OK"}}]}),
                        ),
                        _ => (404, json!({"error": {"message": "no such resource"}})),
                    }
                };
                drop(st);
                let text = if resp.is_null() {
                    String::new()
                } else {
                    resp.to_string()
                };
                let _ = write!(c, "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
            }
        });
        port
    }

    fn target(port: u16, password: &str) -> BmcTarget {
        BmcTarget {
            node: "r1".into(),
            host: "127.0.0.1".into(),
            port,
            user: "root".into(),
            password: password.into(),
            driver: Driver::Redfish,
            cipher_suite: 0,
            redfish_tls: Default::default(),
        }
    }

    #[test]
    fn redfish_against_fixture() {
        let st = Arc::new(Mutex::new(State {
            power: "Off".into(),
            ..State::default()
        }));
        let port = serve(st.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        // The fixture speaks plain HTTP: allowed only when asked for.
        let plain = |pw: &str| BmcTarget {
            redfish_tls: RedfishTls::PlainHttp,
            ..target(port, pw)
        };
        let mut b = RedfishBmc::new(&plain("calvin"), deadline).unwrap();
        assert_eq!(b.power_status().unwrap(), PowerState::Off);
        b.power(PowerAction::On).unwrap();
        assert_eq!(b.power_status().unwrap(), PowerState::On);
        b.set_boot_device(BootDevice::Pxe, false).unwrap();
        assert_eq!(st.lock().unwrap().boot["BootSourceOverrideTarget"], "Pxe");
        assert_eq!(st.lock().unwrap().boot["BootSourceOverrideEnabled"], "Once");
        let inv = b.inventory().unwrap();
        assert_eq!(inv.product_serial.as_deref(), Some("ABC1234"));
        let sel = b.sel().unwrap();
        assert_eq!(sel[0].description, "CPU 1 temperature above critical");
        let sensors = b.sensors().unwrap();
        assert_eq!(sensors.len(), 3);
        assert_eq!(
            (
                sensors[0].value,
                sensors[0].upper_critical,
                sensors[0].status.as_str()
            ),
            (Some(41.0), Some(90.0), "ok")
        );
        assert_eq!(sensors[1].status, "nc");
        // The password never appears on a command line; a wrong one is a clear error.
        let mut bad = RedfishBmc::new(&plain("badpass"), deadline).unwrap();
        let e = format!("{:#}", bad.power_status().unwrap_err());
        assert!(e.contains("authentication failed"), "{e}");
        assert!(!e.contains("badpass"), "{e}");
    }

    /// By default the driver speaks HTTPS on any port: against a plain-HTTP BMC it fails, and
    /// the BMC never sees a request (so never the password); an `http://` address is refused
    /// before anything is sent.
    #[test]
    fn plain_http_is_refused_by_default() {
        let st = Arc::new(Mutex::new(State {
            power: "Off".into(),
            ..State::default()
        }));
        let port = serve(st.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut b = RedfishBmc::new(&target(port, "calvin"), deadline).unwrap();
        assert!(b.base.starts_with("https://"), "{}", b.base);
        let e = format!("{:#}", b.power_status().unwrap_err());
        assert!(!e.contains("calvin"), "{e}");
        assert!(
            st.lock().unwrap().requests.is_empty(),
            "the BMC got a request in the clear"
        );
        let t = BmcTarget {
            host: format!("http://127.0.0.1:{port}"),
            ..target(port, "calvin")
        };
        let e = format!("{:#}", RedfishBmc::new(&t, deadline).err().unwrap());
        assert!(e.contains("plain-http"), "{e}");
    }

    /// A BMC with a self-signed certificate (openssl s_server serving fixture files): refused
    /// by default, accepted with its CA, with its pinned key, or with verification skipped;
    /// a wrong pin is refused.
    #[test]
    fn https_with_verification_pinning_and_skip() {
        if Command::new("openssl").arg("version").output().is_err() {
            eprintln!("SKIP: openssl not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let sh = |script: &str| {
            let o = Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(d)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::from_utf8(o.stdout).unwrap()
        };
        sh(
            "openssl req -x509 -newkey rsa:2048 -nodes -keyout key.pem -out cert.pem -days 2 \
            -subj /CN=bmc -addext subjectAltName=IP:127.0.0.1 2>/dev/null",
        );
        let pin = sh(
            "openssl x509 -in cert.pem -pubkey -noout | openssl pkey -pubin -outform der \
                      | openssl dgst -sha256 -binary | base64",
        );
        let pin = format!("sha256//{}", pin.trim());
        std::fs::create_dir_all(d.join("www/redfish/v1")).unwrap();
        std::fs::write(
            d.join("www/redfish/v1/Systems"),
            r#"{"Members": [{"@odata.id": "/sys1"}]}"#,
        )
        .unwrap();
        std::fs::write(d.join("www/sys1"), r#"{"PowerState": "On"}"#).unwrap();
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut child = Kill(
            Command::new("openssl")
                .args(["s_server", "-quiet", "-WWW", "-accept"])
                .arg(format!("127.0.0.1:{port}"))
                .args(["-cert", "../cert.pem", "-key", "../key.pem"])
                .current_dir(d.join("www"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Ready once it accepts connections.
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "s_server did not start"
            );
            assert!(child.0.try_wait().unwrap().is_none(), "s_server exited");
            std::thread::yield_now();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = |tls: RedfishTls| {
            let t = BmcTarget {
                redfish_tls: tls,
                ..target(port, "calvin")
            };
            RedfishBmc::new(&t, deadline).unwrap().power_status()
        };
        let e = format!("{:#}", status(RedfishTls::Verify).unwrap_err());
        assert!(e.contains("certificate"), "{e}");
        assert_eq!(
            status(RedfishTls::Ca(d.join("cert.pem"))).unwrap(),
            PowerState::On
        );
        assert_eq!(status(RedfishTls::Pin(pin)).unwrap(), PowerState::On);
        let wrong = format!("sha256//{}=", "A".repeat(43));
        assert!(status(RedfishTls::Pin(wrong)).is_err());
        assert_eq!(
            status(RedfishTls::InsecureSkipVerify).unwrap(),
            PowerState::On
        );
    }

    #[test]
    fn tls_settings_parse() {
        for s in [
            "verify",
            "ca:/etc/si/bmc-ca.pem",
            "insecure-skip-verify",
            "plain-http",
        ] {
            assert_eq!(s.parse::<RedfishTls>().unwrap().to_string(), s);
        }
        let pin = format!("pin:sha256//{}=", "A".repeat(43));
        assert_eq!(pin.parse::<RedfishTls>().unwrap().to_string(), pin);
        for bad in ["", "ca:", "pin:abc", "pin:sha256//short", "http"] {
            assert!(bad.parse::<RedfishTls>().is_err(), "{bad:?}");
        }
    }
}
