//! si's trust layer: the master's certificate authority, the certificates it issues, the
//! rustls configurations every si connection uses, and the signatures on image versions.
//!
//! The model (docs/security.md has the whole of it):
//! - The master keeps a CA of its own ([`ca::Authority`], behind the `ca` feature) in a
//!   root-only directory. It issues the master's certificate (SAN `master.si` plus the names and
//!   addresses it serves) and node certificates (SAN `NODE.node.si`) for keys the nodes made.
//! - Clients are given the CA's [`Fingerprint`] (SHA-256 of the CA certificate's DER). The
//!   server sends its chain *including* the CA certificate; the client finds the certificate
//!   whose fingerprint is the pin, takes it as the only trust anchor, and verifies the chain and
//!   the role name against it ([`tls::client_config`]). A client therefore needs nothing but the
//!   fingerprint, which fits on a kernel command line.
//! - Who a peer is comes from its certificate's SAN ([`Peer`]): `master.si` is the master,
//!   `NODE.node.si` is node NODE. The server config ([`ca::Authority::server_config`]) asks for a
//!   client certificate, verifies it against the CA when one is sent, and lets the service decide
//!   per request what an anonymous or a known peer may do.
//! - The CA key is ed25519 and also signs each image version's manifest digest
//!   ([`sign::version_message`], domain-separated from certificate signatures), so a node that
//!   pinned the CA verifies a version without a second pin.

/// The rustls this crate builds its configurations with, for callers that hold one.
pub use rustls;

/// The handshake-signature half of a rustls verifier, the same for every si verifier: checked
/// with the provider's algorithms (`self.provider`). Only who the peer is differs.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}
pub(crate) use handshake_signatures;

pub mod capture;
pub mod enroll;
pub mod files;
mod fingerprint;
pub mod identity;
pub mod sign;
pub mod tls;

#[cfg(feature = "ca")]
pub mod ca;

pub use fingerprint::Fingerprint;
pub use identity::{NodeIdentity, Peer};
#[cfg(feature = "async")]
pub use tls::{Acceptor, ServerStream};
pub use tls::{ClientStream, Connector};

/// The SAN every master certificate carries; clients check the master's certificate against it
/// whatever address they dialled.
pub const MASTER_NAME: &str = "master.si";
/// The suffix of a node certificate's SAN: node `n1` is `n1.node.si`.
pub const NODE_SUFFIX: &str = ".node.si";

/// The crypto provider every si TLS config uses (ring: no C toolchain beyond cc).
///
/// With AES instructions, AES-128-GCM comes first: it is as safe for a session key as
/// AES-256 and takes 10 rounds instead of 14, which shows on a node decrypting an image at
/// link speed. A host without them (an emulated CPU, a small board) asks for
/// ChaCha20-Poly1305 first: software AES-GCM is several times slower there. The server follows
/// the client's order, so each session gets the cipher that is fast for the client.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let aes = has_aes();
    p.cipher_suites.sort_by_key(|s| suite_rank(s.suite(), aes));
    std::sync::Arc::new(p)
}

/// Where a cipher suite goes in [`provider`]'s order (lower first; a stable sort keeps
/// ring's order among equals).
fn suite_rank(s: rustls::CipherSuite, aes: bool) -> u8 {
    use rustls::CipherSuite as C;
    let chacha = matches!(
        s,
        C::TLS13_CHACHA20_POLY1305_SHA256
            | C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
    );
    let aes128 = matches!(
        s,
        C::TLS13_AES_128_GCM_SHA256
            | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    );
    match (aes, chacha, aes128) {
        (true, _, true) | (false, true, _) => 0,
        _ => 1,
    }
}

/// Whether this CPU has AES and carry-less multiply instructions (AES-GCM in hardware).
fn has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}
