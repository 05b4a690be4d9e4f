//! Who a peer is (from its certificate), and a node's own identity on disk.

use crate::files;
use anyhow::{anyhow, bail, Context, Result};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::Path;

/// A peer as its certificate names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The master (SAN `master.si`): admin rights.
    Master,
    /// An enrolled node (SAN `NAME.node.si`).
    Node(String),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Master => f.write_str("master"),
            Peer::Node(n) => write!(f, "node {n}"),
        }
    }
}

impl Peer {
    /// The peer named by an end-entity certificate the TLS layer already verified against the
    /// CA. A certificate with no si name, or with both, names nobody.
    pub fn from_cert(der: &[u8]) -> Result<Peer> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow!("parsing a peer certificate: {e}"))?;
        let mut found = None;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| anyhow!("reading a peer certificate's SAN: {e}"))?;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            let x509_parser::extensions::GeneralName::DNSName(n) = name else {
                continue;
            };
            let p = if *n == crate::MASTER_NAME {
                Peer::Master
            } else if let Some(node) = n.strip_suffix(crate::NODE_SUFFIX) {
                Peer::Node(node.to_string())
            } else {
                continue;
            };
            if found.as_ref().is_some_and(|f| *f != p) {
                bail!("a certificate names two si identities");
            }
            found = Some(p);
        }
        found.ok_or_else(|| anyhow!("the certificate names no si identity"))
    }

    /// The SAN a certificate for this peer carries.
    pub fn san(&self) -> String {
        match self {
            Peer::Master => crate::MASTER_NAME.to_string(),
            Peer::Node(n) => format!("{n}{}", crate::NODE_SUFFIX),
        }
    }
}

/// The SHA-256 of a certificate, as the inventory records a node's current one.
pub fn cert_fingerprint(der: &[u8]) -> crate::Fingerprint {
    crate::Fingerprint::of(der)
}

/// A node's key and certificate chain (node certificate, then the CA's), as enrollment gives
/// them and as they are kept in `/etc/si` (outside every captured image).
pub struct NodeIdentity {
    pub name: String,
    /// PKCS#8 DER of the node's private key.
    pub key: Vec<u8>,
    /// The node's certificate, then the CA's (DER).
    pub chain: Vec<Vec<u8>>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("name", &self.name)
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

pub const KEY_FILE: &str = "node.key";
pub const CERT_FILE: &str = "node.crt";
pub const CA_FILE: &str = "ca.crt";
/// The pinned fingerprint, as node clients read it when none is given.
pub const PIN_FILE: &str = "ca.fingerprint";

impl NodeIdentity {
    /// A fresh key pair for `name` (the certificate comes from enrollment).
    pub fn generate_key() -> Result<Vec<u8>> {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| anyhow!("generating a node key"))?;
        Ok(doc.as_ref().to_vec())
    }

    /// The SubjectPublicKeyInfo (DER) of a PKCS#8 ed25519 key: what a node sends to enroll.
    pub fn public_key_der(key: &[u8]) -> Result<Vec<u8>> {
        use ring::signature::KeyPair;
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(key)
            .map_err(|_| anyhow!("the node key is not an ed25519 PKCS#8 key"))?;
        // SEQUENCE { SEQUENCE { OID 1.3.101.112 } BIT STRING { 0, key } }
        let mut spki = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        spki.extend_from_slice(kp.public_key().as_ref());
        Ok(spki)
    }

    pub fn cert(&self) -> &[u8] {
        &self.chain[0]
    }

    pub fn ca(&self) -> &[u8] {
        self.chain.last().map(|c| &c[..]).unwrap_or(&[])
    }

    /// Certificates and key as rustls wants them.
    pub fn rustls(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let chain = self
            .chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        (chain, key)
    }

    /// Saves key (0600), certificate and CA certificate (0644) into `dir` (made 0700).
    pub fn save(&self, dir: &Path) -> Result<()> {
        files::private_dir(dir)?;
        files::write_private(&dir.join(KEY_FILE), &self.key)?;
        files::write_file(&dir.join(CERT_FILE), self.cert(), 0o644)?;
        files::write_file(&dir.join(CA_FILE), self.ca(), 0o644)?;
        let pin = format!("{}\n", crate::Fingerprint::of(self.ca()));
        files::write_file(&dir.join(PIN_FILE), pin.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Loads an identity saved by [`NodeIdentity::save`]; the key must be private, the CA must
    /// be the pinned one, and the certificate must name a node.
    pub fn load(dir: &Path, pin: &crate::Fingerprint) -> Result<NodeIdentity> {
        files::private_dir(dir)?;
        let key = files::read_private(&dir.join(KEY_FILE))?;
        let read = |f: &str| {
            let p = dir.join(f);
            std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
        };
        let cert = read(CERT_FILE)?;
        let ca = read(CA_FILE)?;
        if crate::Fingerprint::of(&ca) != *pin {
            bail!(
                "{} is not the pinned CA ({pin})",
                dir.join(CA_FILE).display()
            );
        }
        let Peer::Node(name) = Peer::from_cert(&cert)? else {
            bail!(
                "{} is not a node certificate",
                dir.join(CERT_FILE).display()
            );
        };
        Ok(NodeIdentity {
            name,
            key,
            chain: vec![cert, ca],
        })
    }
}
