//! The master's certificate authority (behind the `ca` feature: nodes need none of this).
//!
//! On disk, in a directory only root may enter (0700; a key with any group or other bit is
//! refused):
//!
//! ```text
//! /var/lib/si/ca/
//!   ca.key    0600  PKCS#8 ed25519: signs certificates and image versions
//!   ca.crt    0644  the CA certificate (DER); its SHA-256 is the fingerprint clients pin
//! ```
//!
//! The master's own certificate (SAN `master.si` plus the names and addresses it serves) is made
//! afresh at each start from a new key held in memory only, so a changed address never leaves a
//! stale certificate behind; clients pin the CA, not the server certificate.

use crate::{files, Fingerprint, Peer};
use anyhow::{anyhow, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ED25519,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const CA_KEY: &str = "ca.key";
pub const CA_CERT: &str = "ca.crt";

/// How long a node certificate is valid: long enough for a node that is rarely updated; a
/// compromised one is cut off by `si-node revoke`, which the master checks on every request.
pub const NODE_CERT_LIFETIME: Duration = Duration::from_secs(5 * 365 * 86400);

pub struct Authority {
    dir: PathBuf,
    ca_der: Vec<u8>,
    ca_key: KeyPair,
    issuer: rcgen::Certificate,
    server_der: Vec<u8>,
    server_key: Vec<u8>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("dir", &self.dir)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn serial() -> Result<SerialNumber> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| anyhow!("drawing a serial number"))?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

fn new_key() -> Result<KeyPair> {
    KeyPair::generate_for(&PKCS_ED25519).context("generating an ed25519 key")
}

fn key_from_pkcs8(der: &[u8]) -> Result<KeyPair> {
    KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der), &PKCS_ED25519)
        .context("loading an ed25519 key")
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "si master CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(20 * 365);
    p
}

fn leaf_params(peer: &Peer, extra: &[String]) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        match peer {
            Peer::Master => "si master".to_string(),
            Peer::Node(n) => n.clone(),
        },
    );
    p.distinguished_name = dn;
    let mut sans = vec![SanType::DnsName(
        peer.san()
            .try_into()
            .context("making the certificate's name")?,
    )];
    for n in extra {
        match n.parse::<std::net::IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => sans.push(SanType::DnsName(
                n.clone()
                    .try_into()
                    .with_context(|| format!("{n:?} is not a DNS name"))?,
            )),
        }
    }
    p.subject_alt_names = sans;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Both: the master is a client of node agents, and a node agent serves the master.
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.serial_number = Some(serial()?);
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

impl Authority {
    /// Opens the CA in `dir`, creating it on first start; `names` are the DNS names and
    /// addresses the master's certificate carries besides `master.si`.
    pub fn open_or_create(dir: &Path, names: &[String]) -> Result<Authority> {
        Authority::open_in(dir, names, true)
    }

    /// Opens the CA in `dir`, which must exist (si-server makes it at first start): a tool
    /// such as si-pushupdate never makes a CA nodes would not trust.
    pub fn open(dir: &Path) -> Result<Authority> {
        if !dir.join(CA_KEY).exists() {
            anyhow::bail!(
                "no CA in {}: si-server makes it at first start (or pass --ca-dir)",
                dir.display()
            );
        }
        Authority::open_in(dir, &[], false)
    }

    fn open_in(dir: &Path, names: &[String], create: bool) -> Result<Authority> {
        files::private_dir(dir)?;
        let key_path = dir.join(CA_KEY);
        let cert_path = dir.join(CA_CERT);
        if create && !key_path.exists() {
            let key = new_key()?;
            let cert = ca_params()
                .self_signed(&key)
                .context("making the CA certificate")?;
            files::write_file(&cert_path, cert.der(), 0o644)?;
            files::write_private(&key_path, &key.serialize_der())?;
            tracing::info!(dir = %dir.display(), fingerprint = %Fingerprint::of(cert.der()), "made a new CA");
        }
        let ca_key = key_from_pkcs8(&files::read_private(&key_path)?)
            .with_context(|| format!("reading {}", key_path.display()))?;
        let ca_der = std::fs::read(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        // The issuer as rcgen wants it: the stored certificate's name and key identifier with
        // the stored key (the re-signed copy is never sent; clients see the stored DER).
        let issuer = CertificateParams::from_ca_cert_der(&CertificateDer::from(ca_der.clone()))
            .context("parsing the CA certificate")?
            .self_signed(&ca_key)
            .context("loading the CA")?;
        if issuer
            .params()
            .distinguished_name
            .get(&DnType::CommonName)
            .is_none()
        {
            anyhow::bail!("{} names no CA", cert_path.display());
        }
        let mut a = Authority {
            dir: dir.to_path_buf(),
            ca_der,
            ca_key,
            issuer,
            server_der: vec![],
            server_key: vec![],
        };
        let skey = new_key()?;
        let scert = leaf_params(&Peer::Master, names)?
            .signed_by(&skey, &a.issuer, &a.ca_key)
            .context("making the master's certificate")?;
        a.server_der = scert.der().to_vec();
        a.server_key = skey.serialize_der();
        Ok(a)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.ca_der)
    }

    /// Issues a certificate for node `name` over the public key `spki_der` (SubjectPublicKeyInfo
    /// DER, as [`crate::NodeIdentity::public_key_der`] makes it), valid from now for `lifetime`.
    pub fn issue_node(&self, name: &str, spki_der: &[u8], lifetime: Duration) -> Result<Vec<u8>> {
        let now = time::OffsetDateTime::now_utc();
        let life = time::Duration::try_from(lifetime).context("converting the lifetime")?;
        self.issue_node_between(name, spki_der, now - time::Duration::minutes(5), now + life)
    }

    /// Like [`Authority::issue_node`] with explicit bounds (tests make expired ones).
    pub fn issue_node_between(
        &self,
        name: &str,
        spki_der: &[u8],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<Vec<u8>> {
        let key = rcgen::SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| anyhow!("parsing the node's public key: {e}"))?;
        let mut p = leaf_params(&Peer::Node(name.to_string()), &[])?;
        p.not_before = not_before;
        p.not_after = not_after;
        let cert = p
            .signed_by(&key, &self.issuer, &self.ca_key)
            .with_context(|| format!("issuing a certificate for {name}"))?;
        Ok(cert.der().to_vec())
    }

    /// Signs a version (see [`crate::sign::version_message`]).
    pub fn sign_version(
        &self,
        image: &str,
        version: u32,
        digest: &si_proto::Digest,
    ) -> Result<Vec<u8>> {
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(
            self.ca_key.serialized_der(),
        )
        .map_err(|_| anyhow!("loading the CA key for signing"))?;
        Ok(kp
            .sign(&crate::sign::version_message(image, version, digest))
            .as_ref()
            .to_vec())
    }

    /// The one-time enrollment token of `node` for the enrollment the inventory recorded
    /// (its nonce and expiry): HMAC-SHA256 under a key derived from the CA key, 128 bits in
    /// hex. The inventory keeps only the nonce, so reading it yields no token; the master
    /// computes the token for the node's boot script and again to check it.
    pub fn enrollment_token(&self, node: &str, nonce: &str, expires: i64) -> String {
        let mut seed = b"si-enrollment-token-v1\0".to_vec();
        seed.extend_from_slice(self.ca_key.serialized_der());
        let key_bytes = ring::digest::digest(&ring::digest::SHA256, &seed);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key_bytes.as_ref());
        let mut m = Vec::new();
        for part in [
            node.as_bytes(),
            nonce.as_bytes(),
            expires.to_string().as_bytes(),
        ] {
            m.extend_from_slice(part);
            m.push(0);
        }
        hex::encode(&ring::hmac::sign(&key, &m).as_ref()[..16])
    }

    fn roots(&self) -> Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca_der.clone()))
            .context("adding the CA as a root")?;
        Ok(Arc::new(roots))
    }

    /// The master's certificate chain (its certificate, then the CA's) and key, for a
    /// client config that presents it (a capture to a golden client that pins the CA).
    pub fn master_chain(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![
                CertificateDer::from(self.server_der.clone()),
                CertificateDer::from(self.ca_der.clone()),
            ],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone())),
        )
    }

    /// The master's server config: its chain includes the CA certificate (clients find their
    /// pin in it); a client certificate is asked for, verified against the CA when sent, and
    /// optional (an installer enrolling has none yet; the service decides per request).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots()?, crate::provider())
                .allow_unauthenticated()
                .build()
                .context("building the client verifier")?;
        let (chain, key) = self.master_chain();
        let cfg = ServerConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .context("choosing TLS versions")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .context("loading the master's certificate")?;
        Ok(Arc::new(cfg))
    }

    /// The master's client config toward a node agent (si-pushupdate): the agent must present
    /// a node certificate from this CA (node `expect`'s when given, see
    /// [`crate::tls::NodeVerifier`]); the master presents its own.
    pub fn agent_client_config(&self, expect: Option<&str>) -> Result<Arc<rustls::ClientConfig>> {
        let (chain, key) = self.master_chain();
        let verifier = crate::tls::NodeVerifier::new(&self.ca_der, expect)?;
        let cfg = rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .context("choosing TLS versions")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)
            .context("loading the master's certificate")?;
        Ok(Arc::new(cfg))
    }
}

/// The server name a node agent's certificate carries.
pub fn node_server_name(node: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(Peer::Node(node.to_string()).san())
        .map_err(|e| anyhow!("{node} cannot be a server name: {e}"))
}
