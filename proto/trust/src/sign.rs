//! Signatures on image versions. The master's CA key (ed25519) signs one message per version,
//! built by [`version_message`] alone: a domain tag (so no version signature can pass for a
//! certificate signature or the reverse), the image name, the version number and the
//! manifest digest recorded for the version. Nodes verify against the pinned CA certificate's
//! public key before they apply anything.

use anyhow::{anyhow, bail, Result};
use si_proto::Digest;

const DOMAIN: &[u8] = b"si-version-signature-v1\0";

/// The message signed for `image` version `version` whose manifest digest is `digest`.
pub fn version_message(image: &str, version: u32, digest: &Digest) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + image.len() + 1 + 4 + 32);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(image.as_bytes());
    m.push(0);
    m.extend_from_slice(&version.to_be_bytes());
    m.extend_from_slice(&digest.0);
    m
}

/// The ed25519 public key of a CA certificate (DER).
pub fn ca_public_key(ca_der: &[u8]) -> Result<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|e| anyhow!("parsing the CA certificate: {e}"))?;
    let spki = cert.public_key();
    if spki.algorithm.algorithm.to_id_string() != "1.3.101.112" {
        bail!("the CA key is not ed25519");
    }
    Ok(spki.subject_public_key.data.to_vec())
}

/// Checks `signature` on a version against the CA certificate `ca_der` (the pinned one).
pub fn verify_version(
    ca_der: &[u8],
    image: &str,
    version: u32,
    digest: &Digest,
    signature: &[u8],
) -> Result<()> {
    let key = ca_public_key(ca_der)?;
    if signature.is_empty() {
        bail!("{image} version {version} is not signed");
    }
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(&version_message(image, version, digest), signature)
        .map_err(|_| {
            anyhow!("the signature on {image} version {version} does not verify against the pinned CA: refusing it")
        })
}
