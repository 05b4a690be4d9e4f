//! Recognising network boot firmware from a request (RFC 4578, PXE 2.1, UEFI 2.x HTTP boot).

use dhcproto::v4::{DhcpOption, Message, OptionCode};

/// What kind of boot program a client runs, from option 93 (client system architecture).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// 0: x86 BIOS PXE.
    Bios,
    /// 7 or 9: UEFI x64 PXE (7 is "EFI BC", used by x64 firmware in practice).
    UefiX64,
    /// 11: UEFI ARM64 PXE.
    UefiArm64,
    /// 16 (x64) or 19 (ARM64): UEFI HTTP boot.
    UefiHttp,
    Other(u16),
}

/// The boot-relevant facts of a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Client {
    /// Option 60 starts with `PXEClient`.
    pub pxe: bool,
    /// Option 60 starts with `HTTPClient`.
    pub http: bool,
    /// Option 93, the first architecture listed.
    pub arch: Option<u16>,
    /// User class (77) says `iPXE`: the client is already iPXE and gets a script URL.
    pub ipxe: bool,
    /// Option 97 (type byte + 16-byte GUID), echoed back to PXE clients.
    pub uuid: Option<Vec<u8>>,
}

impl Client {
    pub fn from_message(m: &Message) -> Client {
        let o = m.opts();
        let class = match o.get(OptionCode::ClassIdentifier) {
            Some(DhcpOption::ClassIdentifier(v)) => v.as_slice(),
            _ => &[],
        };
        let arch = match o.get(OptionCode::ClientSystemArchitecture) {
            Some(DhcpOption::ClientSystemArchitecture(a)) => Some(u16::from(*a)),
            _ => None,
        };
        let ipxe = match o.get(OptionCode::UserClass) {
            // iPXE sends the bare string "iPXE"; RFC 3004 form is length-prefixed: search both.
            Some(DhcpOption::UserClass(v)) => v.windows(4).any(|w| w == b"iPXE"),
            _ => false,
        };
        let uuid = match o.get(OptionCode::ClientMachineIdentifier) {
            Some(DhcpOption::ClientMachineIdentifier(v)) if v.len() <= 17 => Some(v.clone()),
            _ => None,
        };
        Client {
            pxe: class.starts_with(b"PXEClient"),
            http: class.starts_with(b"HTTPClient"),
            arch,
            ipxe,
            uuid,
        }
    }

    pub fn firmware(&self) -> Firmware {
        if self.http {
            return Firmware::UefiHttp;
        }
        match self.arch {
            None | Some(0) => Firmware::Bios,
            Some(7) | Some(9) => Firmware::UefiX64,
            Some(11) => Firmware::UefiArm64,
            Some(16) | Some(19) => Firmware::UefiHttp,
            Some(a) => Firmware::Other(a),
        }
    }
}
