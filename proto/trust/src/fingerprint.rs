//! The CA fingerprint clients pin: SHA-256 of the CA certificate's DER, written `sha256:HEX`.

use anyhow::{bail, Result};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a certificate in DER.
    pub fn of(der: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = anyhow::Error;
    /// `sha256:HEX` (the prefix may be left off; colons between bytes are allowed, as
    /// `openssl x509 -fingerprint` prints them).
    fn from_str(s: &str) -> Result<Fingerprint> {
        let s = s.trim();
        let body = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("SHA256:"))
            .unwrap_or(s);
        let hexed: String = body.chars().filter(|c| *c != ':').collect();
        if hexed.len() != 64 {
            bail!(
                "a CA fingerprint is sha256: and 64 hex digits, not {} characters",
                s.len()
            );
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(&hexed, &mut out)
            .map_err(|e| anyhow::anyhow!("parsing the CA fingerprint: {e}"))?;
        Ok(Fingerprint(out))
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Fingerprint, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_accepts_openssl_form() {
        let f = Fingerprint::of(b"x");
        let s = f.to_string();
        assert!(s.starts_with("sha256:"));
        assert_eq!(s.parse::<Fingerprint>().unwrap(), f);
        let colons: Vec<String> = f.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(colons.join(":").parse::<Fingerprint>().unwrap(), f);
        assert!("sha256:abcd".parse::<Fingerprint>().is_err());
        assert!(format!("sha256:{}", "zz".repeat(32))
            .parse::<Fingerprint>()
            .is_err());
    }
}
