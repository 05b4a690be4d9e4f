//! IPMI commands (chassis, SEL, SDR + sensors, FRU) over any [`Transport`], and the decoders
//! for what BMCs answer. Decoders take untrusted bytes and return errors, never panic.

use super::rmcp::{self, CipherSuite, CompletionError, Session};
use super::{
    Bmc, BmcTarget, BootDevice, Inventory, PowerAction, PowerState, SelEntry, SensorReading,
};
use anyhow::{anyhow, ensure, Context, Result};
use std::collections::HashSet;
use std::time::Instant;

pub const NETFN_CHASSIS: u8 = 0x00;
pub const NETFN_SENSOR: u8 = 0x04;
pub const NETFN_APP: u8 = 0x06;
pub const NETFN_STORAGE: u8 = 0x0A;

/// Sends one IPMI request, returns the response data after a zero completion code; a non-zero
/// completion code must be returned as a [`CompletionError`].
pub trait Transport: Send {
    fn raw(&mut self, netfn: u8, cmd: u8, data: &[u8]) -> Result<Vec<u8>>;
    fn close(self: Box<Self>) -> Result<()>;
}

/// The native RMCP+ transport.
pub struct NativeTransport {
    session: Session,
}

impl NativeTransport {
    pub fn connect(t: &BmcTarget, deadline: Instant) -> Result<NativeTransport> {
        let cs = CipherSuite::from_id(t.cipher_suite)?;
        let addr = rmcp::resolve(&t.host, t.port)?;
        let session =
            Session::open(addr, &t.user, &t.password, cs, deadline).with_context(|| {
                format!(
                    "opening an RMCP+ session (cipher suite {}) to {}:{}",
                    t.cipher_suite, t.host, t.port
                )
            })?;
        Ok(NativeTransport { session })
    }
}

impl NativeTransport {
    /// The RMCP+ session (for payloads other than IPMI messages, such as SOL).
    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }
    pub fn into_session(self) -> Session {
        self.session
    }
}

impl Transport for NativeTransport {
    fn raw(&mut self, netfn: u8, cmd: u8, data: &[u8]) -> Result<Vec<u8>> {
        self.session.command(netfn, cmd, data)
    }
    fn close(self: Box<Self>) -> Result<()> {
        self.session.close().context("closing the session")
    }
}

/// Completion code of an error, if it is one.
pub fn completion_code(e: &anyhow::Error) -> Option<u8> {
    e.downcast_ref::<CompletionError>().map(|c| c.code)
}

/// [`Bmc`] implemented with IPMI commands over a transport.
pub struct IpmiBmc<T: Transport> {
    t: Box<T>,
}

impl<T: Transport> IpmiBmc<T> {
    pub fn new(t: T) -> Self {
        IpmiBmc { t: Box::new(t) }
    }
    fn raw(&mut self, netfn: u8, cmd: u8, data: &[u8]) -> Result<Vec<u8>> {
        self.t.raw(netfn, cmd, data)
    }
}

/// Chassis Control data byte for an action.
pub fn chassis_control_code(a: PowerAction) -> u8 {
    match a {
        PowerAction::Off => 0x00,
        PowerAction::On => 0x01,
        PowerAction::Cycle => 0x02,
        PowerAction::Reset => 0x03,
        PowerAction::Soft => 0x05,
    }
}

/// Boot flags (boot option parameter 5) for a device.
pub fn boot_flags(dev: BootDevice, persistent: bool) -> [u8; 5] {
    let sel = match dev {
        BootDevice::Pxe => 0x04,
        BootDevice::Disk => 0x08,
        BootDevice::Bios => 0x18,
    };
    [0x80 | if persistent { 0x40 } else { 0 }, sel, 0, 0, 0]
}

/// Decodes boot flags back (device, persistent), as read with Get System Boot Options.
pub fn decode_boot_flags(d: &[u8]) -> Result<(Option<BootDevice>, bool)> {
    // Response: parameter version, parameter selector, 5 data bytes.
    ensure!(
        d.len() >= 7 && d[1] & 0x7F == 5,
        "unexpected boot options answer {d:02x?}"
    );
    let valid = d[2] & 0x80 != 0;
    let dev = match (d[3] >> 2) & 0x0F {
        0x1 => Some(BootDevice::Pxe),
        0x2 => Some(BootDevice::Disk),
        0x6 => Some(BootDevice::Bios),
        _ => None,
    };
    Ok((if valid { dev } else { None }, d[2] & 0x40 != 0))
}

impl<T: Transport> IpmiBmc<T> {
    /// Reads back boot flags: (device if a valid override is set, persistent).
    pub fn boot_device(&mut self) -> Result<(Option<BootDevice>, bool)> {
        let d = self
            .raw(NETFN_CHASSIS, 0x09, &[5, 0, 0])
            .context("Get System Boot Options")?;
        decode_boot_flags(&d)
    }

    fn sdr_records(&mut self) -> Result<Vec<Vec<u8>>> {
        let info = self
            .raw(NETFN_STORAGE, 0x20, &[])
            .context("Get SDR Repository Info")?;
        ensure!(info.len() >= 3, "short SDR Repository Info");
        let count = u16::from_le_bytes([info[1], info[2]]) as usize;
        let mut out = Vec::new();
        let mut id = 0u16;
        let mut seen = HashSet::new();
        let mut res = self.reserve_sdr()?;
        while id != 0xFFFF && out.len() <= count.min(4096) {
            ensure!(seen.insert(id), "SDR record list loops at record {id:#06x}");
            let mut tries = 0;
            let (next, rec) = loop {
                match self.read_sdr(res, id) {
                    Ok(v) => break v,
                    Err(e) if completion_code(&e) == Some(0xC5) && tries < 3 => {
                        tries += 1;
                        res = self.reserve_sdr()?;
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("reading SDR record {id:#06x}"))
                    }
                }
            };
            out.push(rec);
            id = next;
        }
        Ok(out)
    }

    fn reserve_sdr(&mut self) -> Result<[u8; 2]> {
        let r = self
            .raw(NETFN_STORAGE, 0x22, &[])
            .context("Reserve SDR Repository")?;
        ensure!(r.len() >= 2, "short SDR reservation");
        Ok([r[0], r[1]])
    }

    /// One SDR record: header first, then the body in small pieces (BMCs limit sizes).
    fn read_sdr(&mut self, res: [u8; 2], id: u16) -> Result<(u16, Vec<u8>)> {
        let [lo, hi] = id.to_le_bytes();
        let h = self
            .raw(NETFN_STORAGE, 0x23, &[res[0], res[1], lo, hi, 0, 5])
            .context("Get SDR header")?;
        ensure!(h.len() >= 7, "short SDR header answer");
        let next = u16::from_le_bytes([h[0], h[1]]);
        let mut rec = h[2..7].to_vec();
        let len = rec[4] as usize;
        ensure!(
            len <= 250,
            "SDR record {id:#06x} claims {len} bytes, more than an offset can address"
        );
        let mut off = 0usize;
        while off < len {
            let n = (len - off).min(16);
            let d = self
                .raw(
                    NETFN_STORAGE,
                    0x23,
                    &[res[0], res[1], lo, hi, (5 + off) as u8, n as u8],
                )
                .context("Get SDR body")?;
            ensure!(d.len() > 2, "empty SDR body answer");
            let got = (d.len() - 2).min(n);
            rec.extend_from_slice(&d[2..2 + got]);
            off += got;
        }
        Ok((next, rec))
    }
}

impl<T: Transport> Bmc for IpmiBmc<T> {
    fn power_status(&mut self) -> Result<PowerState> {
        let d = self
            .raw(NETFN_CHASSIS, 0x01, &[])
            .context("Get Chassis Status")?;
        let b = *d
            .first()
            .ok_or_else(|| anyhow!("empty Get Chassis Status answer"))?;
        Ok(if b & 1 != 0 {
            PowerState::On
        } else {
            PowerState::Off
        })
    }

    fn power(&mut self, action: PowerAction) -> Result<()> {
        self.raw(NETFN_CHASSIS, 0x02, &[chassis_control_code(action)])
            .with_context(|| format!("Chassis Control ({})", action.name()))?;
        Ok(())
    }

    fn set_boot_device(&mut self, dev: BootDevice, persistent: bool) -> Result<()> {
        // As ipmitool does: set-in-progress, the flags, then set-complete. Some BMCs do not
        // implement the set-in-progress parameter (0x80 "not supported" in that case), which
        // is harmless; any other failure there is reported.
        let in_progress = self.raw(NETFN_CHASSIS, 0x08, &[0x00, 0x01]);
        if let Err(e) = &in_progress {
            if !matches!(completion_code(e), Some(0x80) | Some(0xCC) | Some(0xC1)) {
                return in_progress
                    .map(|_| ())
                    .context("Set System Boot Options (set in progress)");
            }
        }
        let mut data = vec![0x05];
        data.extend_from_slice(&boot_flags(dev, persistent));
        self.raw(NETFN_CHASSIS, 0x08, &data)
            .with_context(|| format!("Set System Boot Options (boot flags: {})", dev.name()))?;
        if in_progress.is_ok() {
            self.raw(NETFN_CHASSIS, 0x08, &[0x00, 0x00])
                .context("Set System Boot Options (set complete)")?;
        }
        Ok(())
    }

    fn sel(&mut self) -> Result<Vec<SelEntry>> {
        let info = self.raw(NETFN_STORAGE, 0x40, &[]).context("Get SEL Info")?;
        ensure!(info.len() >= 3, "short SEL Info");
        let count = u16::from_le_bytes([info[1], info[2]]) as usize;
        let mut out = Vec::new();
        if count == 0 {
            return Ok(out);
        }
        let mut id = 0u16;
        let mut seen = HashSet::new();
        while id != 0xFFFF && out.len() < count.min(4096) {
            ensure!(seen.insert(id), "SEL record list loops at record {id:#06x}");
            let [lo, hi] = id.to_le_bytes();
            let d = self
                .raw(NETFN_STORAGE, 0x43, &[0, 0, lo, hi, 0, 0xFF])
                .with_context(|| format!("Get SEL Entry {id:#06x}"))?;
            ensure!(d.len() >= 18, "short SEL entry ({} bytes)", d.len());
            out.push(decode_sel(&d[2..18])?);
            id = u16::from_le_bytes([d[0], d[1]]);
        }
        Ok(out)
    }

    fn clear_sel(&mut self) -> Result<()> {
        let r = self.raw(NETFN_STORAGE, 0x42, &[]).context("Reserve SEL")?;
        ensure!(r.len() >= 2, "short SEL reservation");
        self.raw(NETFN_STORAGE, 0x47, &[r[0], r[1], b'C', b'L', b'R', 0xAA])
            .context("Clear SEL")?;
        Ok(())
    }

    fn sensors(&mut self) -> Result<Vec<SensorReading>> {
        let mut out = Vec::new();
        for rec in self.sdr_records()? {
            let Some(sdr) = SensorSdr::parse(&rec)? else {
                continue;
            };
            if sdr.owner != 0x20 || sdr.lun != 0 {
                continue; // owned by another controller: needs IPMB bridging, not done
            }
            let reading = match self.raw(NETFN_SENSOR, 0x2D, &[sdr.number]) {
                Ok(d) => Some(d),
                Err(e) if matches!(completion_code(&e), Some(0xCB) | Some(0xCD) | Some(0xD5)) => {
                    None
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("Get Sensor Reading for {:?}", sdr.name))
                }
            };
            let thresholds = if sdr.threshold_based() && sdr.threshold_access != 0 {
                match self.raw(NETFN_SENSOR, 0x27, &[sdr.number]) {
                    Ok(d) => Some(d),
                    Err(e) if completion_code(&e).is_some() => None,
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("Get Sensor Thresholds for {:?}", sdr.name))
                    }
                }
            } else {
                None
            };
            out.push(sdr.reading(reading.as_deref(), thresholds.as_deref()));
        }
        Ok(out)
    }

    fn inventory(&mut self) -> Result<Inventory> {
        let info = self
            .raw(NETFN_STORAGE, 0x10, &[0])
            .context("Get FRU Inventory Area Info")?;
        ensure!(info.len() >= 3, "short FRU Inventory Area Info");
        let size = u16::from_le_bytes([info[0], info[1]]) as usize;
        let words = info[2] & 1 != 0;
        let mut data = Vec::with_capacity(size);
        while data.len() < size {
            let off = data.len();
            let n = (size - off).min(24);
            let (o, c) = if words { (off / 2, n / 2) } else { (off, n) };
            let [lo, hi] = (o as u16).to_le_bytes();
            let d = self
                .raw(NETFN_STORAGE, 0x11, &[0, lo, hi, c.max(1) as u8])
                .context("Read FRU Data")?;
            ensure!(d.len() >= 2, "empty Read FRU Data answer");
            let got = (d[0] as usize * if words { 2 } else { 1 })
                .min(d.len() - 1)
                .min(size - off);
            ensure!(got > 0, "Read FRU Data returned no bytes");
            data.extend_from_slice(&d[1..1 + got]);
        }
        decode_fru(&data)
    }

    fn close(self: Box<Self>) -> Result<()> {
        self.t.close()
    }
}

// ---------------------------------------------------------------- SEL

pub fn sensor_type_name(t: u8) -> String {
    const NAMES: [&str; 0x2D] = [
        "Reserved",
        "Temperature",
        "Voltage",
        "Current",
        "Fan",
        "Physical Security",
        "Platform Security",
        "Processor",
        "Power Supply",
        "Power Unit",
        "Cooling Device",
        "Other Units-based Sensor",
        "Memory",
        "Drive Slot",
        "POST Memory Resize",
        "System Firmware Progress",
        "Event Logging Disabled",
        "Watchdog 1",
        "System Event",
        "Critical Interrupt",
        "Button / Switch",
        "Module / Board",
        "Microcontroller / Coprocessor",
        "Add-in Card",
        "Chassis",
        "Chip Set",
        "Other FRU",
        "Cable / Interconnect",
        "Terminator",
        "System Boot Initiated",
        "Boot Error",
        "OS Boot",
        "OS Critical Stop",
        "Slot / Connector",
        "System ACPI Power State",
        "Watchdog 2",
        "Platform Alert",
        "Entity Presence",
        "Monitor ASIC",
        "LAN",
        "Management Subsystem Health",
        "Battery",
        "Session Audit",
        "Version Change",
        "FRU State",
    ];
    match NAMES.get(t as usize) {
        Some(n) => n.to_string(),
        None if t >= 0xC0 => format!("OEM {t:#04x}"),
        None => format!("Unknown {t:#04x}"),
    }
}

fn threshold_event(offset: u8) -> &'static str {
    match offset {
        0x00 => "Lower Non-critical going low",
        0x01 => "Lower Non-critical going high",
        0x02 => "Lower Critical going low",
        0x03 => "Lower Critical going high",
        0x04 => "Lower Non-recoverable going low",
        0x05 => "Lower Non-recoverable going high",
        0x06 => "Upper Non-critical going low",
        0x07 => "Upper Non-critical going high",
        0x08 => "Upper Critical going low",
        0x09 => "Upper Critical going high",
        0x0A => "Upper Non-recoverable going low",
        0x0B => "Upper Non-recoverable going high",
        _ => "Unknown threshold event",
    }
}

fn sensor_specific_event(sensor_type: u8, offset: u8) -> Option<&'static str> {
    Some(match (sensor_type, offset) {
        (0x05, 0x00) => "General Chassis intrusion",
        (0x05, 0x01) => "Drive Bay intrusion",
        (0x07, 0x00) => "IERR",
        (0x07, 0x01) => "Thermal Trip",
        (0x07, 0x05) => "Configuration Error",
        (0x07, 0x07) => "Presence detected",
        (0x07, 0x0A) => "Throttled",
        (0x08, 0x00) => "Presence detected",
        (0x08, 0x01) => "Failure detected",
        (0x08, 0x02) => "Predictive failure",
        (0x08, 0x03) => "Power Supply AC lost",
        (0x09, 0x00) => "Power off/down",
        (0x09, 0x01) => "Power cycle",
        (0x09, 0x04) => "AC lost",
        (0x0C, 0x00) => "Correctable ECC",
        (0x0C, 0x01) => "Uncorrectable ECC",
        (0x0C, 0x02) => "Parity",
        (0x0C, 0x05) => "Correctable ECC logging limit reached",
        (0x0C, 0x06) => "Presence detected",
        (0x0D, 0x00) => "Drive Present",
        (0x0D, 0x01) => "Drive Fault",
        (0x0F, 0x00) => "System Firmware Error",
        (0x0F, 0x01) => "System Firmware Hang",
        (0x0F, 0x02) => "System Firmware Progress",
        (0x10, 0x01) => "Event Type Logging Disabled",
        (0x10, 0x02) => "Log area reset/cleared",
        (0x10, 0x04) => "SEL full",
        (0x12, 0x00) => "System Reconfigured",
        (0x12, 0x01) => "OEM System boot event",
        (0x12, 0x05) => "Timestamp Clock Sync",
        (0x13, 0x00) => "Front Panel NMI",
        (0x13, 0x04) => "PCI PERR",
        (0x13, 0x05) => "PCI SERR",
        (0x13, 0x07) => "Bus Correctable error",
        (0x13, 0x08) => "Bus Uncorrectable error",
        (0x13, 0x09) => "Fatal NMI",
        (0x14, 0x00) => "Power Button pressed",
        (0x14, 0x02) => "Reset Button pressed",
        (0x1D, 0x00) => "Initiated by power up",
        (0x1D, 0x01) => "Initiated by hard reset",
        (0x1D, 0x02) => "Initiated by warm reset",
        (0x1E, 0x00) => "No bootable media",
        (0x1E, 0x02) => "PXE server not found",
        (0x1E, 0x03) => "Invalid boot sector",
        (0x20, 0x00) => "Critical stop during OS load",
        (0x20, 0x01) => "Run-time critical stop (kernel panic)",
        (0x20, 0x02) => "OS graceful stop",
        (0x20, 0x03) => "OS graceful shutdown",
        (0x23, 0x00) => "Timer expired",
        (0x23, 0x01) => "Hard reset",
        (0x23, 0x02) => "Power down",
        (0x23, 0x03) => "Power cycle",
        (0x29, 0x00) => "Battery low",
        (0x29, 0x01) => "Battery failed",
        _ => return None,
    })
}

fn generic_discrete_event(event_type: u8, offset: u8) -> Option<&'static str> {
    Some(match (event_type, offset) {
        (0x03, 0x00) => "State Deasserted",
        (0x03, 0x01) => "State Asserted",
        (0x04, 0x00) => "Predictive Failure Deasserted",
        (0x04, 0x01) => "Predictive Failure Asserted",
        (0x05, 0x00) => "Limit Not Exceeded",
        (0x05, 0x01) => "Limit Exceeded",
        (0x07, 0x00) => "Transition to OK",
        (0x07, 0x01) => "Transition to Non-critical from OK",
        (0x07, 0x02) => "Transition to Critical from less severe",
        (0x07, 0x03) => "Transition to Non-recoverable from less severe",
        (0x08, 0x00) => "Device Absent",
        (0x08, 0x01) => "Device Present",
        (0x09, 0x00) => "Device Disabled",
        (0x09, 0x01) => "Device Enabled",
        _ => return None,
    })
}

/// Formats seconds since the epoch as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Decodes one 16-byte SEL record.
pub fn decode_sel(r: &[u8]) -> Result<SelEntry> {
    ensure!(
        r.len() == 16,
        "SEL record of {} bytes, expected 16",
        r.len()
    );
    let id = u16::from_le_bytes([r[0], r[1]]);
    let record_type = r[2];
    if record_type != 0x02 {
        let timestamp = (record_type < 0xE0).then(|| u32::from_le_bytes([r[3], r[4], r[5], r[6]]));
        return Ok(SelEntry {
            id,
            record_type,
            timestamp,
            time: timestamp.map(time_text).unwrap_or_default(),
            sensor_type: String::new(),
            sensor_number: 0,
            assertion: true,
            description: format!("OEM record type {record_type:#04x}"),
            raw: r.to_vec(),
        });
    }
    let ts = u32::from_le_bytes([r[3], r[4], r[5], r[6]]);
    let sensor_type = r[10];
    let sensor_number = r[11];
    let dir_type = r[12];
    let event_type = dir_type & 0x7F;
    let offset = r[13] & 0x0F;
    let assertion = dir_type & 0x80 == 0;
    let desc = match event_type {
        0x01 => threshold_event(offset).to_string(),
        0x6F => sensor_specific_event(sensor_type, offset)
            .map(str::to_string)
            .unwrap_or_else(|| format!("sensor-specific offset {offset:#04x}")),
        0x02..=0x0C => generic_discrete_event(event_type, offset)
            .map(str::to_string)
            .unwrap_or_else(|| {
                format!("generic event type {event_type:#04x} offset {offset:#04x}")
            }),
        t => format!("event type {t:#04x} offset {offset:#04x}"),
    };
    let mut description = desc;
    if event_type == 0x01 && r[13] & 0xC0 == 0x40 {
        description.push_str(&format!(" (reading {:#04x}", r[14]));
        if r[13] & 0x30 == 0x10 {
            description.push_str(&format!(", threshold {:#04x}", r[15]));
        }
        description.push(')');
    }
    if !assertion {
        description.push_str(" (deasserted)");
    }
    Ok(SelEntry {
        id,
        record_type,
        timestamp: Some(ts),
        time: time_text(ts),
        sensor_type: sensor_type_name(sensor_type),
        sensor_number,
        assertion,
        description,
        raw: r.to_vec(),
    })
}

fn time_text(ts: u32) -> String {
    if ts <= 0x2000_0000 {
        format!("pre-init +{ts}s")
    } else {
        format!("{} UTC", format_utc(ts as u64))
    }
}

// ---------------------------------------------------------------- SDR and sensors

/// The parts of a Full (type 1) or Compact (type 2) sensor record that matter here.
#[derive(Clone, Debug, PartialEq)]
pub struct SensorSdr {
    pub owner: u8,
    pub lun: u8,
    pub number: u8,
    pub sensor_type: u8,
    pub event_type: u8,
    pub threshold_access: u8,
    pub name: String,
    pub unit: String,
    /// Conversion factors (full records only).
    pub conv: Option<Conversion>,
    /// Thresholds from the SDR (raw), used when the BMC does not answer Get Sensor Thresholds.
    pub sdr_thresholds: Option<(u8, [u8; 6])>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conversion {
    pub format: u8,
    pub linearization: u8,
    pub m: i32,
    pub b: i32,
    pub b_exp: i32,
    pub r_exp: i32,
}

fn sign_extend(v: i32, bits: u32) -> i32 {
    let shift = 32 - bits;
    (v << shift) >> shift
}

impl Conversion {
    pub fn convert(&self, raw: u8) -> Option<f64> {
        let x = match self.format {
            0 => raw as f64,
            1 => {
                (if raw & 0x80 != 0 {
                    -((!raw) as i32)
                } else {
                    raw as i32
                }) as f64
            }
            2 => raw as i8 as f64,
            _ => return None, // "no analog reading"
        };
        let y =
            (self.m as f64 * x + self.b as f64 * 10f64.powi(self.b_exp)) * 10f64.powi(self.r_exp);
        let v = match self.linearization & 0x7F {
            0 => y,
            1 => y.ln(),
            2 => y.log10(),
            3 => y.log2(),
            4 => y.exp(),
            5 => 10f64.powf(y),
            6 => y.exp2(),
            7 => 1.0 / y,
            8 => y * y,
            9 => y * y * y,
            10 => y.sqrt(),
            11 => y.cbrt(),
            _ => return None,
        };
        // Six decimals are far beyond any sensor's accuracy and keep 3.8 from printing as
        // 3.8000000000000003.
        v.is_finite().then_some((v * 1e6).round() / 1e6)
    }
}

pub fn unit_name(code: u8) -> &'static str {
    match code {
        1 => "degrees C",
        2 => "degrees F",
        3 => "degrees K",
        4 => "Volts",
        5 => "Amps",
        6 => "Watts",
        7 => "Joules",
        18 => "RPM",
        19 => "Hz",
        20 => "microseconds",
        21 => "milliseconds",
        22 => "seconds",
        _ => "",
    }
}

/// Decodes an SDR "type/length" ID string.
fn id_string(tl: u8, bytes: &[u8]) -> String {
    let len = (tl & 0x1F) as usize;
    let b = &bytes[..len.min(bytes.len())];
    match tl >> 6 {
        3 | 2 => b
            .iter()
            .take_while(|c| **c != 0)
            .map(|&c| {
                if c.is_ascii_graphic() || c == b' ' {
                    c as char
                } else {
                    '?'
                }
            })
            .collect(),
        _ => b.iter().map(|c| format!("{c:02x}")).collect(),
    }
}

impl SensorSdr {
    /// Parses a full SDR record (header included); `None` for records that are not sensors.
    pub fn parse(r: &[u8]) -> Result<Option<SensorSdr>> {
        ensure!(r.len() >= 5, "SDR record too short");
        let rtype = r[3];
        ensure!(
            r.len() >= 5 + r[4] as usize,
            "SDR record shorter than its length field"
        );
        match rtype {
            0x01 => {
                ensure!(
                    r.len() >= 48,
                    "full sensor record of {} bytes is too short",
                    r.len()
                );
                let m = sign_extend(r[24] as i32 | ((r[25] as i32 & 0xC0) << 2), 10);
                let b = sign_extend(r[26] as i32 | ((r[27] as i32 & 0xC0) << 2), 10);
                let conv = Conversion {
                    format: r[20] >> 6,
                    linearization: r[23],
                    m,
                    b,
                    r_exp: sign_extend((r[29] >> 4) as i32, 4),
                    b_exp: sign_extend((r[29] & 0x0F) as i32, 4),
                };
                Ok(Some(SensorSdr {
                    owner: r[5],
                    lun: r[6] & 3,
                    number: r[7],
                    sensor_type: r[12],
                    event_type: r[13],
                    threshold_access: (r[11] >> 2) & 3,
                    name: id_string(r[47], &r[48..]),
                    unit: unit_name(r[21]).to_string(),
                    conv: Some(conv),
                    sdr_thresholds: Some((
                        r[18] & 0x3F,
                        [r[41], r[40], r[39], r[38], r[37], r[36]],
                    )),
                }))
            }
            0x02 => {
                ensure!(
                    r.len() >= 32,
                    "compact sensor record of {} bytes is too short",
                    r.len()
                );
                Ok(Some(SensorSdr {
                    owner: r[5],
                    lun: r[6] & 3,
                    number: r[7],
                    sensor_type: r[12],
                    event_type: r[13],
                    threshold_access: (r[11] >> 2) & 3,
                    name: id_string(r[31], &r[32..]),
                    unit: unit_name(r[21]).to_string(),
                    conv: None,
                    sdr_thresholds: None,
                }))
            }
            _ => Ok(None),
        }
    }

    pub fn threshold_based(&self) -> bool {
        self.event_type == 0x01
    }

    /// Builds a reading from Get Sensor Reading and (optionally) Get Sensor Thresholds data.
    pub fn reading(&self, reading: Option<&[u8]>, thresholds: Option<&[u8]>) -> SensorReading {
        let conv = |raw: u8| self.conv.as_ref().and_then(|c| c.convert(raw));
        // Thresholds: (readable mask, [lnc, lc, lnr, unc, uc, unr]).
        let th: Option<(u8, [u8; 6])> = match thresholds {
            Some(d) if d.len() >= 7 => Some((d[0], [d[1], d[2], d[3], d[4], d[5], d[6]])),
            _ => self.sdr_thresholds,
        };
        let t = |i: usize| {
            th.and_then(|(mask, v)| {
                if mask & (1 << i) != 0 {
                    conv(v[i])
                } else {
                    None
                }
            })
        };
        let usable = reading.filter(|d| d.len() >= 2 && d[1] & 0x20 == 0 && d[1] & 0x40 != 0);
        let (value, status) = match usable {
            None => (None, "na".to_string()),
            Some(d) if self.threshold_based() => {
                let s = d.get(2).copied().unwrap_or(0);
                let status = if s & 0x24 != 0 {
                    "nr"
                } else if s & 0x12 != 0 {
                    "cr"
                } else if s & 0x09 != 0 {
                    "nc"
                } else {
                    "ok"
                };
                (conv(d[0]), status.to_string())
            }
            Some(d) => {
                let bits = u16::from_le_bytes([
                    d.get(2).copied().unwrap_or(0),
                    d.get(3).copied().unwrap_or(0),
                ]) & 0x7FFF;
                (None, format!("{bits:#06x}"))
            }
        };
        SensorReading {
            name: self.name.clone(),
            number: self.number,
            sensor_type: sensor_type_name(self.sensor_type),
            value,
            unit: self.unit.clone(),
            status,
            lower_non_critical: t(0),
            lower_critical: t(1),
            lower_non_recoverable: t(2),
            upper_non_critical: t(3),
            upper_critical: t(4),
            upper_non_recoverable: t(5),
        }
    }
}

// ---------------------------------------------------------------- FRU

/// Decodes one FRU type/length field at `at`; returns (text, next offset) or None at the end
/// marker (0xC1).
fn fru_field(a: &[u8], at: usize) -> Result<Option<(String, usize)>> {
    let tl = *a
        .get(at)
        .ok_or_else(|| anyhow!("FRU field at {at} past the area end"))?;
    if tl == 0xC1 {
        return Ok(None);
    }
    let len = (tl & 0x3F) as usize;
    let b = a
        .get(at + 1..at + 1 + len)
        .ok_or_else(|| anyhow!("FRU field at {at} runs past the area end"))?;
    let text = match tl >> 6 {
        0 => b.iter().map(|c| format!("{c:02x}")).collect(),
        1 => b
            .iter()
            .flat_map(|c| [c >> 4, c & 0xF])
            .map(|n| match n {
                0..=9 => (b'0' + n) as char,
                0xA => ' ',
                0xB => '-',
                0xC => '.',
                _ => '?',
            })
            .collect(),
        2 => {
            // 6-bit packed ASCII, 4 characters in 3 bytes.
            let mut s = String::new();
            for chunk in b.chunks(3) {
                let mut v = 0u32;
                for (i, c) in chunk.iter().enumerate() {
                    v |= (*c as u32) << (8 * i);
                }
                for i in 0..(chunk.len() * 8 / 6) {
                    s.push((((v >> (6 * i)) & 0x3F) as u8 + 0x20) as char);
                }
            }
            s
        }
        _ => b
            .iter()
            .map(|&c| {
                if (0x20..0x7F).contains(&c) {
                    c as char
                } else {
                    '?'
                }
            })
            .collect(),
    };
    Ok(Some((text.trim_end().to_string(), at + 1 + len)))
}

/// Reads up to `n` fields of an area starting at `at`, stopping at the end marker.
fn fru_fields(a: &[u8], mut at: usize, n: usize) -> Result<Vec<Option<String>>> {
    let mut v = Vec::new();
    for _ in 0..n {
        match fru_field(a, at)? {
            Some((s, next)) => {
                v.push((!s.is_empty()).then_some(s));
                at = next;
            }
            None => break,
        }
    }
    v.resize(n, None);
    Ok(v)
}

/// Decodes a FRU inventory image (common header, chassis, board and product areas).
pub fn decode_fru(d: &[u8]) -> Result<Inventory> {
    ensure!(d.len() >= 8, "FRU image of {} bytes is too short", d.len());
    ensure!(d[0] & 0x0F == 1, "unknown FRU format version {:#04x}", d[0]);
    ensure!(
        d[..8].iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0,
        "bad FRU common header checksum"
    );
    let area = |idx: usize| -> Result<Option<&[u8]>> {
        let off = d[idx] as usize * 8;
        if off == 0 {
            return Ok(None);
        }
        ensure!(
            off + 2 <= d.len(),
            "FRU area at {off} past the end of the image"
        );
        let len = d[off + 1] as usize * 8;
        ensure!(
            len >= 2 && off + len <= d.len(),
            "FRU area at {off} of length {len} past the end of the image"
        );
        Ok(Some(&d[off..off + len]))
    };
    let mut inv = Inventory::default();
    if let Some(a) = area(2)? {
        let f = fru_fields(a, 3, 2)?;
        inv.chassis_part_number = f[0].clone();
        inv.chassis_serial = f[1].clone();
    }
    if let Some(a) = area(3)? {
        let f = fru_fields(a, 6, 4)?;
        inv.board_manufacturer = f[0].clone();
        inv.board_product = f[1].clone();
        inv.board_serial = f[2].clone();
        inv.board_part_number = f[3].clone();
    }
    if let Some(a) = area(4)? {
        let f = fru_fields(a, 3, 6)?;
        inv.product_manufacturer = f[0].clone();
        inv.product_name = f[1].clone();
        inv.product_part_number = f[2].clone();
        inv.product_version = f[3].clone();
        inv.product_serial = f[4].clone();
        inv.product_asset_tag = f[5].clone();
    }
    Ok(inv)
}

/// Builds a FRU image with board and product areas (8-bit ASCII fields); used by tests and
/// by simulator fixtures.
pub fn build_fru(board: [&str; 4], product: [&str; 6]) -> Result<Vec<u8>> {
    fn area(prefix: &[u8], fields: &[&str]) -> Result<Vec<u8>> {
        let mut a = prefix.to_vec();
        for f in fields {
            ensure!(f.len() < 64, "FRU field {f:?} too long");
            a.push(0xC0 | f.len() as u8);
            a.extend_from_slice(f.as_bytes());
        }
        a.push(0xC1);
        while (a.len() + 1) & 7 != 0 {
            a.push(0);
        }
        a[1] = ((a.len() + 1) / 8) as u8;
        let sum = a.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        a.push(0u8.wrapping_sub(sum));
        Ok(a)
    }
    // Each area ends with an empty FRU file ID field before the end marker.
    let board_area = area(&[1, 0, 0x19, 0, 0, 0], &[&board[..], &[""]].concat())?;
    let product_area = area(&[1, 0, 0x19], &[&product[..], &[""]].concat())?;
    let board_off = 1u8;
    let product_off = board_off + (board_area.len() / 8) as u8;
    let mut h = vec![1, 0, 0, board_off, product_off, 0, 0];
    let sum = h.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    h.push(0u8.wrapping_sub(sum));
    h.extend(board_area);
    h.extend(product_area);
    Ok(h)
}

/// Returns an error naming the completion code in `e` if it is the "not supported" kind.
pub fn is_unsupported(e: &anyhow::Error) -> bool {
    matches!(completion_code(e), Some(0xC1) | Some(0xCC) | Some(0xD5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn sel_threshold_event() {
        // id 1, system event, ts 1700000000, gen 0x20, rev 4, temperature #1, threshold
        // assertion, offset 9 (upper critical going high) with trigger reading and threshold.
        let ts = 1_700_000_000u32.to_le_bytes();
        let r = [
            1, 0, 2, ts[0], ts[1], ts[2], ts[3], 0x20, 0, 4, 0x01, 0x01, 0x01, 0x59, 0x5F, 0x5A,
        ];
        let e = decode_sel(&r).unwrap();
        assert_eq!(e.sensor_type, "Temperature");
        assert_eq!(e.sensor_number, 1);
        assert!(
            e.description.starts_with("Upper Critical going high"),
            "{}",
            e.description
        );
        assert_eq!(e.time, "2023-11-14 22:13:20 UTC");
    }

    #[test]
    fn sel_sensor_specific_deassert() {
        let r = [
            2, 0, 2, 5, 0, 0, 0, 0x20, 0, 4, 0x0C, 0x07, 0xEF, 0x01, 0xFF, 0xFF,
        ];
        let e = decode_sel(&r).unwrap();
        assert_eq!(e.description, "Uncorrectable ECC (deasserted)");
        assert_eq!(e.time, "pre-init +5s");
        assert!(decode_sel(&r[..15]).is_err());
    }

    fn full_sdr(
        name: &str,
        num: u8,
        stype: u8,
        unit: u8,
        m: i32,
        rexp: i32,
        th: [u8; 6],
    ) -> Vec<u8> {
        let mut r = vec![0u8; 48];
        r[2] = 0x51;
        r[3] = 0x01;
        r[5] = 0x20;
        r[7] = num;
        r[11] = 0x68;
        r[12] = stype;
        r[13] = 0x01;
        r[18] = 0x3F;
        r[21] = unit;
        r[24] = (m & 0xFF) as u8;
        r[25] = ((m >> 2) & 0xC0) as u8;
        r[29] = ((rexp & 0xF) << 4) as u8;
        r[36..42].copy_from_slice(&th);
        r[47] = 0xC0 | name.len() as u8;
        r.extend_from_slice(name.as_bytes());
        r[4] = (r.len() - 5) as u8;
        r
    }

    #[test]
    fn sdr_conversion_and_status() {
        let r = full_sdr("Vcore", 2, 0x02, 4, 2, -2, [200, 190, 180, 20, 30, 40]);
        let s = SensorSdr::parse(&r).unwrap().unwrap();
        assert_eq!(s.name, "Vcore");
        let rd = s.reading(Some(&[60, 0x40, 0x00]), None);
        assert_eq!(rd.value, Some(1.2));
        assert_eq!(rd.status, "ok");
        assert_eq!(rd.unit, "Volts");
        assert_eq!(rd.upper_critical, Some(3.8));
        assert_eq!(rd.lower_non_critical, Some(0.8));
        assert_eq!(s.reading(Some(&[60, 0x40, 0x10]), None).status, "cr");
        assert_eq!(s.reading(Some(&[60, 0x60, 0x00]), None).status, "na");
        // Negative M (10-bit two's complement).
        let r = full_sdr("Neg", 3, 0x01, 1, -3, 0, [0; 6]);
        let s = SensorSdr::parse(&r).unwrap().unwrap();
        assert_eq!(s.conv.unwrap().m, -3);
    }

    #[test]
    fn fru_roundtrip() {
        let img = build_fru(
            ["Acme", "Board X", "BSN123", "BPN"],
            ["Acme", "Server 9", "PN9", "v1", "SN-42", "tag"],
        )
        .unwrap();
        let inv = decode_fru(&img).unwrap();
        assert_eq!(inv.board_serial.as_deref(), Some("BSN123"));
        assert_eq!(inv.product_name.as_deref(), Some("Server 9"));
        assert_eq!(inv.product_serial.as_deref(), Some("SN-42"));
        assert_eq!(inv.product_manufacturer.as_deref(), Some("Acme"));
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Errors are fine, panics are bugs: SEL, SDR and FRU decoders on random and mutated input.
    #[test]
    fn fuzz_decoders() {
        let mut rng = Rng(77);
        let fru = build_fru(["a", "b", "c", "d"], ["e", "f", "g", "h", "i", "j"]).unwrap();
        let sdr = full_sdr("Temp", 1, 1, 1, 1, 0, [1, 2, 3, 4, 5, 6]);
        for i in 0..30_000 {
            let base: Vec<u8> = match i % 3 {
                0 => fru.clone(),
                1 => sdr.clone(),
                _ => (0..(rng.next() % 80) as usize)
                    .map(|_| rng.next() as u8)
                    .collect(),
            };
            let mut d = base;
            for _ in 0..(rng.next() % 4) {
                if d.is_empty() {
                    break;
                }
                let at = (rng.next() as usize) % d.len();
                d[at] = rng.next() as u8;
            }
            if rng.next() & 3 == 0 {
                let n = (rng.next() as usize) % (d.len() + 1);
                d.truncate(n);
            }
            let _ = decode_fru(&d);
            if let Ok(Some(s)) = SensorSdr::parse(&d) {
                let _ = s.reading(Some(&d), Some(&d));
            }
            let _ = decode_sel(&d);
            let _ = decode_boot_flags(&d);
            if d.len() >= 16 {
                let _ = decode_sel(&d[..16]);
            }
        }
    }
}
