//! Protocol messages.
//!
//! # Version handshake
//!
//! The connecting side sends [`Msg::Hello`] with [`MAGIC`], the highest protocol version it
//! speaks and the lowest it accepts; the other side answers [`Msg::Welcome`] with the version
//! both will use, or [`Msg::Error`] and closes. [`negotiate`] implements the choice.
//!
//! # Capture (master connects to the golden client's `si-prepareclient`)
//!
//! ```text
//! master                                   golden client
//! Hello{role: Capture, token}        ->
//!                                    <-    Welcome
//! CaptureStart{excludes}             ->
//! CaptureBase{manifest}              ->    (only when the image has a version: the manifest
//!                                          digest of its newest one)
//!                                    <-    BaseKnown(yes)  (the golden client kept that
//!                                          manifest from an earlier capture)
//! Have([digest..]) ... HaveEnd       ->    (objects the master already has; not sent again.
//!                                          Without a known base the newest version's objects,
//!                                          with one no Have at all: the base's objects count)
//!                                    <-    Layout(toml)
//!                                    <-    Totals{files, bytes}
//!                                    <-    Blob{..} + Data / Progress ... (objects not had)
//!   with a known base:
//!                                    <-    CaptureDelta{digest, bytes} + Data ... (a
//!                                          manifest::Delta from the base to the new tree,
//!                                          `digest` the new manifest's digest)
//!                                    <-    ScanEnd{stats}
//!   and when the master's rebuilt manifest does not have that digest:
//! SendEntries                        ->
//!   without a known base, or after SendEntries:
//!                                    <-    Entries([..]) ...  (the whole tree, any order;
//!                                          MoreChunks([..]) continues a long chunk list)
//!                                    <-    ScanEnd{stats}
//! Bye                                ->    (recorded: the golden client keeps the manifest)
//! ```
//!
//! # Deploy (node connects to `si-server`)
//!
//! ```text
//! node                                     master
//! Hello{role: Deploy}                ->
//!                                    <-    Welcome
//! GetManifest{image, version}        ->
//!                                    <-    ManifestIs{..} + Data ... (manifest bytes)
//!   or, for a node that has a version installed:
//! GetManifestDelta{image, version, base_image, base_version}
//!                                    <-    ManifestDeltaIs{..} + Data ... (a manifest::Delta;
//!                                          the node rebuilds the manifest and checks its digest)
//! Want([digest..])                   ->    (at most MAX_WANT per message)
//!                                    <-    Blob{..} + Data, one per digest, in order
//!                                          (from a relay, `Waiting` between them while an
//!                                          object is still on its way from upstream)
//! ...
//! Bye                                ->
//! ```
//!
//! A node that receives by multicast asks on its Deploy session, before it fetches objects:
//!
//! ```text
//! McastJoin{image, version}          ->
//!                                    <-    McastSession{group, session, key, ..}
//!   (the node joins the group)
//! McastReady{session}                ->
//!                                    <-    Ok
//!   (datagrams on the group: si_mcast; then Want for what did not arrive)
//! ```
//!
//! The installer asks for its plan on a Deploy session before it fetches the image:
//! `GetPlan{node}` → `Plan(toml)` or `Error{NotFound}`.
//!
//! # Push (master connects to a node's `si-agentd`)
//!
//! ```text
//! master                                   node agent
//! Hello{role: Push, token}           ->
//!                                    <-    Welcome
//! PushRate{max_kbit}                 ->    (only with a per-node bandwidth cap)
//! PushUpdate{server, image, ..}      ->    (the node runs the update against `server`)
//!                                    <-    PushDone{ok, detail}
//! ```
//!
//! A [`Msg::Blob`] is always followed by exactly one data frame holding the zstd-compressed
//! object; the receiver decompresses at most `raw_len` bytes and checks the BLAKE3 digest
//! before the object is used.

use crate::digest::Digest;
use crate::manifest::{Chunk, Entry};
use serde::{Deserialize, Serialize};

pub const MAGIC: [u8; 4] = *b"SI\x00P";
/// Protocol version this build speaks.
///
/// 2: manifest digests are [`crate::manifest::digest`] (of the plain encoding, not of the
/// compressed bytes), and a capture can send a manifest delta (`CaptureBase`, `CaptureDelta`).
pub const PROTOCOL_VERSION: u32 = 2;
/// Oldest protocol version this build accepts (a version 1 peer reads digests differently).
pub const MIN_PROTOCOL_VERSION: u32 = 2;
/// Most digests in one `Want` or `Have` message.
pub const MAX_WANT: usize = 16_384;
/// Most chunks in one `MoreChunks` message (an encoded chunk takes at most 47 bytes, so this
/// stays well inside one frame).
pub const MAX_CHUNKS_PER_MSG: usize = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Capture,
    Deploy,
    Push,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    Version,
    Refused,
    NotFound,
    BadRequest,
    Busy,
    Internal,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanStats {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    pub bytes_read: u64,
    pub files_read: u64,
    pub blobs_sent: u64,
    pub bytes_sent: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageVersionInfo {
    pub image: String,
    pub version: u32,
    pub created: String,
    pub entries: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    Hello {
        magic: [u8; 4],
        version: u32,
        min_version: u32,
        role: Role,
        token: String,
        client: String,
    },
    Welcome {
        version: u32,
        server: String,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
    Bye,

    // capture
    CaptureStart {
        excludes: Vec<String>,
    },
    Have(Vec<Digest>),
    HaveEnd,
    Layout(String),
    Entries(Vec<Entry>),
    /// Continues the chunk list of the last entry of the `Entries` before it: a file whose
    /// chunk list does not fit one frame (a VM disk image, a database) is sent as an entry with
    /// the first chunks, then as many of these as it takes. At most [`MAX_CHUNKS_PER_MSG`].
    MoreChunks(Vec<Chunk>),
    Blob {
        digest: Digest,
        raw_len: u32,
    },
    /// Sent once the golden client has walked its tree: what the content pass will cover.
    Totals {
        files: u64,
        bytes: u64,
    },
    /// Content pass progress (files and bytes done, read or found unchanged in the stat cache).
    Progress {
        files: u64,
        bytes: u64,
    },
    ScanEnd {
        stats: ScanStats,
    },

    // deploy
    ListImages,
    Images(Vec<ImageVersionInfo>),
    GetManifest {
        image: String,
        version: Option<u32>,
    },
    /// Followed by data frames holding the `bytes` bytes of the encoded manifest, whose
    /// manifest digest ([`crate::manifest::digest`]) is `digest`.
    ManifestIs {
        info: ImageVersionInfo,
        digest: Digest,
        bytes: u64,
        /// The master's signature on (image, version, digest): see si-trust's `sign`.
        signature: Vec<u8>,
    },
    /// Like `GetManifest`, for a node that has `base_version` of `base_image`: the answer is
    /// `ManifestDeltaIs` (or `ManifestIs` when the server no longer has the base).
    GetManifestDelta {
        image: String,
        version: Option<u32>,
        base_image: String,
        base_version: u32,
    },
    /// Followed by data frames holding an encoded `manifest::Delta`; `digest` is the manifest
    /// digest of the target manifest the delta rebuilds, `bytes` the length of its encoding on
    /// the server (for information: the node's own encoding may differ in length).
    ManifestDeltaIs {
        info: ImageVersionInfo,
        digest: Digest,
        bytes: u64,
        delta_bytes: u64,
        /// The master's signature on (image, version, digest of the whole manifest).
        signature: Vec<u8>,
    },
    Want(Vec<Digest>),
    /// Node reports install progress or completion (free text, bounded by the frame).
    Report {
        node: String,
        state: String,
        detail: String,
    },
    Ok,
    /// An installer asks for its node certificate: the one-time token from its boot script,
    /// the MAC it booted from, its SMBIOS UUID, and the public key it made (SubjectPublicKeyInfo
    /// DER). Answered by `Enrolled` or an error; the token is spent either way it succeeds.
    Enroll {
        node: String,
        token: String,
        mac: String,
        uuid: String,
        public_key: Vec<u8>,
    },
    /// The node's certificate, then the CA's (DER).
    Enrolled {
        chain: Vec<Vec<u8>>,
    },
    /// The installer asks for its install plan (`node`: its name, or a MAC `aa:bb:..`).
    GetPlan {
        node: String,
    },
    /// The answer to `GetPlan`: an [`crate::plan::InstallPlan`] as TOML.
    Plan(String),

    // push (master connects to a node's si-agentd)
    /// Move the node to a version, pulling from `server` (an si-server address).
    PushUpdate {
        server: String,
        image: Option<String>,
        version: Option<u32>,
        verify: bool,
        force: bool,
        dry_run: bool,
    },
    /// The outcome of a push: `ok`, and a one-line summary or the error.
    PushDone {
        ok: bool,
        detail: String,
    },

    // capture, sending the manifest as a delta (protocol 2)
    /// Master to golden client, after `CaptureStart`: the manifest digest of the image's newest
    /// version, which a delta may be made against.
    CaptureBase {
        manifest: Digest,
    },
    /// Golden client to master: whether it holds the manifest `CaptureBase` named.
    BaseKnown(bool),
    /// Followed by data frames holding `bytes` bytes of an encoded `manifest::Delta` from the
    /// base to the captured tree; `digest` is the captured tree's manifest digest.
    CaptureDelta {
        digest: Digest,
        bytes: u64,
    },
    /// Master to golden client, after a `CaptureDelta` that did not rebuild the manifest it
    /// named: send the whole tree as `Entries` after all.
    SendEntries,
    /// Capture over TLS, golden → master right after the welcome: proof that the golden
    /// client knows the one-time token, bound to this TLS session (`si_trust::capture`).
    CaptureProof(String),
    /// A relay to its successor, in answer to a `Want`: the next object is not here yet, it is
    /// waited for from upstream (sent every [`WAITING_EVERY`] while it waits, at most its
    /// `--wait-secs`). It tells an upstream that waits from one that died: the successor's
    /// stall timer counts silence, and a waiting relay is not silent.
    Waiting,
    /// Master to node agent, just before `PushUpdate` and only when the push has a per-node
    /// bandwidth cap (`si-pushupdate --max-rate-kbit`): the node's update reads at most
    /// `max_kbit` kbit/s from the server. (An agent from before this message refuses the push
    /// with "expected PushUpdate" rather than ignore its cap; pushes without a cap never send it.)
    PushRate {
        max_kbit: u64,
    },

    // multicast (node on a Deploy session with the master)
    /// Asks to receive a version by multicast.
    McastJoin {
        image: String,
        version: Option<u32>,
    },
    /// The session the node receives: the group (`IP:PORT`), the session number and its key
    /// (given only to a caller who may read the image), and how long until the sender starts
    /// at the latest.
    McastSession {
        group: String,
        session: u64,
        key: SessionKey,
        version: u32,
        starts_in_ms: u64,
    },
    /// The node has joined the group: the sender may count it (answered `Ok`).
    McastReady {
        session: u64,
    },
}

/// A multicast session key: never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionKey(pub Vec<u8>);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(redacted)")
    }
}

/// How often a relay waiting for an object tells its successor so ([`Msg::Waiting`]); well
/// below the successor's stall limit (`si-relay --stall-secs`, 5 s by default, at least 2).
pub const WAITING_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

impl Msg {
    /// The message's name, for errors and logs (never its contents: they may hold secrets).
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Welcome { .. } => "Welcome",
            Msg::Error { .. } => "Error",
            Msg::Bye => "Bye",
            Msg::CaptureStart { .. } => "CaptureStart",
            Msg::Have { .. } => "Have",
            Msg::HaveEnd => "HaveEnd",
            Msg::Layout { .. } => "Layout",
            Msg::Entries(_) => "Entries",
            Msg::MoreChunks { .. } => "MoreChunks",
            Msg::Blob { .. } => "Blob",
            Msg::Totals { .. } => "Totals",
            Msg::Progress { .. } => "Progress",
            Msg::ScanEnd { .. } => "ScanEnd",
            Msg::ListImages => "ListImages",
            Msg::Images { .. } => "Images",
            Msg::GetManifest { .. } => "GetManifest",
            Msg::ManifestIs { .. } => "ManifestIs",
            Msg::GetManifestDelta { .. } => "GetManifestDelta",
            Msg::ManifestDeltaIs { .. } => "ManifestDeltaIs",
            Msg::Want { .. } => "Want",
            Msg::Report { .. } => "Report",
            Msg::Ok => "Ok",
            Msg::Enroll { .. } => "Enroll",
            Msg::Enrolled { .. } => "Enrolled",
            Msg::GetPlan { .. } => "GetPlan",
            Msg::Plan(_) => "Plan",
            Msg::PushUpdate { .. } => "PushUpdate",
            Msg::PushDone { .. } => "PushDone",
            Msg::CaptureBase { .. } => "CaptureBase",
            Msg::BaseKnown(_) => "BaseKnown",
            Msg::CaptureDelta { .. } => "CaptureDelta",
            Msg::SendEntries => "SendEntries",
            Msg::CaptureProof(_) => "CaptureProof",
            Msg::Waiting => "Waiting",
            Msg::PushRate { .. } => "PushRate",
            Msg::McastJoin { .. } => "McastJoin",
            Msg::McastSession { .. } => "McastSession",
            Msg::McastReady { .. } => "McastReady",
        }
    }
}

/// Chooses the version to speak with a peer that sent `Hello{version, min_version}`.
pub fn negotiate(peer_version: u32, peer_min: u32) -> Result<u32, String> {
    let v = peer_version.min(PROTOCOL_VERSION);
    if v < MIN_PROTOCOL_VERSION || v < peer_min {
        return Err(format!(
            "no common protocol version: peer speaks {peer_min}..={peer_version}, \
             this build {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"
        ));
    }
    Ok(v)
}

pub fn hello(role: Role, token: &str, client: &str) -> Msg {
    Msg::Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        min_version: MIN_PROTOCOL_VERSION,
        role,
        token: token.to_string(),
        client: client.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(2, 2), Ok(2));
        assert_eq!(negotiate(7, 1), Ok(2));
        assert!(
            negotiate(1, 1).is_err(),
            "version 1 digests manifests differently"
        );
        assert!(negotiate(9, 5).is_err());
        assert!(negotiate(0, 0).is_err());
    }
}
