//! The capture session's trust (golden client ↔ master): TLS keyed by a one-time token.
//!
//! The golden client is not enrolled (it is any machine an admin wants to capture), so neither
//! side is known by a certificate. They share one secret, the one-time token si-prepareclient
//! prints and the admin hands to si-getimage. The session runs TLS with a throwaway
//! self-signed certificate on the golden side, and each side proves it knows the token with an
//! HMAC over the session's exported keying material (RFC 5705): the proof is bound to this
//! TLS session, so a host in the middle (which necessarily runs two sessions) can neither
//! forward a proof nor learn the token from one. The token itself never crosses the network.
//! The master proves first (in the Hello's token field); the golden client answers with its
//! own proof (`Msg::CaptureProof`) before it sends anything of the tree.

use anyhow::{Context, Result};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;

/// The name in the golden client's throwaway certificate.
pub const GOLDEN_NAME: &str = "golden.si";
const EXPORTER_LABEL: &[u8] = b"EXPORTER-si-capture-token";

/// Which side a proof is from (the two proofs differ, so one cannot be reflected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Master,
    Golden,
}

/// The proof that `side` knows `token` in the session whose exported keying material is
/// `binding`: hex of HMAC-SHA256(token, side || binding).
pub fn proof(token: &str, binding: &[u8; 32], side: Side) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(match side {
        Side::Master => b"si capture: master\0",
        Side::Golden => b"si capture: golden\0",
    });
    ctx.update(binding);
    hex::encode(ctx.sign().as_ref())
}

/// The session's binding: 32 bytes of keying material exported from a finished handshake.
pub fn binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<[u8; 32]> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .context("exporting the TLS session's keying material")
}

/// The golden client's server config: a fresh self-signed ed25519 certificate. The master
/// proves itself with the token; with `pin` (the master's CA, when the golden node has it) it
/// must also present the master's certificate from that CA.
#[cfg(feature = "selfsigned")]
pub fn golden_server_config(pin: Option<crate::Fingerprint>) -> Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).context("making a key")?;
    let cert = rcgen::CertificateParams::new(vec![GOLDEN_NAME.to_string()])
        .context("making the certificate's name")?
        .self_signed(&key)
        .context("making a self-signed certificate")?;
    let b = rustls::ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?;
    let b = match pin {
        Some(pin) => b.with_client_cert_verifier(Arc::new(PinnedClientVerifier::new(pin))),
        None => b.with_no_client_auth(),
    };
    let cfg = b
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .context("loading the certificate")?;
    Ok(Arc::new(cfg))
}

/// A certificate chain and its key, as a client presents them.
pub type Chain = (
    Vec<CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
);

/// The master's client config toward a golden client: any certificate is taken (its
/// signatures over the handshake still checked); who the peer is comes from the token proofs.
/// `master` (the master's chain, when the CA is at hand) is presented to a golden client that
/// pins the CA.
pub fn master_client_config(master: Option<Chain>) -> Result<Arc<rustls::ClientConfig>> {
    let b = rustls::ClientConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TokenBound {
            provider: crate::provider(),
        }));
    let cfg = match master {
        Some((chain, key)) => b
            .with_client_auth_cert(chain, key)
            .context("loading the master's certificate")?,
        None => b.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// A golden client's check of the master, when it pins the CA: the client certificate must
/// chain to the CA whose fingerprint is the pin (the master sends that CA certificate in its
/// chain) and name the master.
#[derive(Debug)]
struct PinnedClientVerifier {
    pin: crate::Fingerprint,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedClientVerifier {
    fn new(pin: crate::Fingerprint) -> PinnedClientVerifier {
        PinnedClientVerifier {
            pin,
            provider: crate::provider(),
        }
    }
}

impl rustls::server::danger::ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| crate::Fingerprint::of(c.as_ref()) == self.pin)
        else {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("building the verifier: {e}")))?;
        let ok = inner.verify_client_cert(end_entity, &[], now)?;
        match crate::Peer::from_cert(end_entity.as_ref()) {
            Ok(crate::Peer::Master) => Ok(ok),
            Ok(p) => Err(rustls::Error::General(format!("{p} is not the master"))),
            Err(e) => Err(rustls::Error::General(format!("{e:#}"))),
        }
    }

    crate::handshake_signatures!();
}

/// Takes the golden client's self-signed certificate: the session is authenticated by the
/// token proofs bound to it, never by the certificate.
#[derive(Debug)]
struct TokenBound {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for TokenBound {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    crate::handshake_signatures!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proofs differ by side, token and session: none stands in for another.
    #[test]
    fn proofs_are_bound_to_side_token_and_session() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let p = proof("t0ken", &a, Side::Master);
        assert_eq!(p.len(), 64);
        assert_eq!(p, proof("t0ken", &a, Side::Master));
        assert_ne!(p, proof("t0ken", &a, Side::Golden));
        assert_ne!(p, proof("t0ken", &b, Side::Master));
        assert_ne!(p, proof("t0ken2", &a, Side::Master));
        assert!(!p.contains("t0ken"));
    }
}
