//! Enrollment: arming a node's install mints a one-time enrollment for it; the installer
//! presents the token derived from it once, and the node's certificate is recorded.
//!
//! The inventory never holds a token. It holds a random nonce and the window; the token is
//! HMAC(master key, node, nonce, expiry), which only the master (holder of the CA key) computes
//! for the node's boot script and checks at enrollment. Reading the database gives no token.
//!
//! A second enrollment for a node whose token is already spent is refused *and* raises an
//! alarm (kept here and shown by `si-node show` until the node is armed again): the firmware
//! stage cannot be authenticated, so a token read off the wire and used first must not go
//! unnoticed, and the node it was meant for fails loudly instead of joining quietly.

use crate::{history, node, now, Inventory};
use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};

/// How long an armed enrollment stays open by default.
pub const DEFAULT_WINDOW_SECS: i64 = 24 * 3600;

/// A node's enrollment record.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Enrollment {
    pub node: String,
    /// Random, hex; the token is derived from it by the master.
    #[serde(skip)]
    pub nonce: String,
    pub armed: i64,
    pub expires: i64,
    /// When the token was used (None: still open).
    pub spent: Option<i64>,
    pub mac: Option<String>,
    pub uuid: Option<String>,
    /// `sha256:HEX` of the node's current certificate; only that one is accepted.
    pub cert: Option<String>,
    pub revoked: bool,
    /// Why the master raised an alarm about this node (a second enrollment attempt...).
    pub alarm: Option<String>,
}

/// Why an enrollment was refused; the caller logs it (and the alarm is already recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotArmed,
    Expired,
    /// The token was already used: an alarm is raised.
    Spent,
    WrongMac,
    WrongUuid,
    BadToken,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::NotArmed => "no install is armed for this node",
            Refusal::Expired => "the enrollment window has closed",
            Refusal::Spent => {
                "this node's token was already used: enrollment refused and an alarm raised"
            }
            Refusal::WrongMac => "the MAC address is not this node's",
            Refusal::WrongUuid => "the SMBIOS UUID is not the one this node enrolled with",
            Refusal::BadToken => "the token is wrong",
        })
    }
}

impl std::error::Error for Refusal {}

fn random_hex() -> Result<String> {
    let mut b = [0u8; 16];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
        .context("drawing a random nonce")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Enrollment> {
    Ok(Enrollment {
        node: r.get(0)?,
        nonce: r.get(1)?,
        armed: r.get(2)?,
        expires: r.get(3)?,
        spent: r.get(4)?,
        mac: r.get(5)?,
        uuid: r.get(6)?,
        cert: r.get(7)?,
        revoked: r.get::<_, i64>(8)? != 0,
        alarm: r.get(9)?,
    })
}

const COLS: &str = "node, nonce, armed, expires, spent, mac, uuid, cert, revoked, alarm";

fn get(c: &rusqlite::Connection, name: &str) -> Result<Option<Enrollment>> {
    c.query_row(
        &format!("SELECT {COLS} FROM enrollments WHERE node = ?1"),
        [name],
        row,
    )
    .optional()
    .context("reading an enrollment")
}

impl Inventory {
    /// Opens a fresh enrollment window for `name` (the install was armed): a new nonce, so an
    /// older token no longer works; the alarm is cleared (the admin acted). The certificate the
    /// node has stays valid until the new enrollment replaces it.
    pub fn arm_enrollment(&self, name: &str, window_secs: i64) -> Result<Enrollment> {
        let nonce = random_hex()?;
        let t = now();
        self.write(|tx, actor| {
            node(tx, name)?.with_context(|| format!("unknown node {name:?}"))?;
            tx.execute(
                "INSERT INTO enrollments (node, nonce, armed, expires) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(node) DO UPDATE SET nonce = ?2, armed = ?3, expires = ?4, spent = NULL, alarm = NULL",
                params![name, nonce, t, t + window_secs],
            )
            .context("arming the enrollment")?;
            history(
                tx,
                actor,
                &format!("node/{name}"),
                "enroll-armed",
                &format!("window {window_secs} s"),
            )?;
            get(tx, name)?.context("reading back the enrollment")
        })
    }

    pub fn enrollment(&self, name: &str) -> Result<Option<Enrollment>> {
        get(&self.conn(), name)
    }

    /// Spends `name`'s token, in one transaction: the window must be open and unspent, the MAC
    /// one of the node's, the UUID the one it enrolled with before (when it did), and
    /// `token_ok(nonce, expires)` must confirm the token. On success the node's new certificate
    /// (`cert`, a fingerprint) becomes the only one accepted and a revocation is lifted. A
    /// spent token raises the alarm.
    pub fn spend_enrollment(
        &self,
        name: &str,
        mac: &str,
        uuid: &str,
        cert: &str,
        token_ok: &dyn Fn(&str, i64) -> bool,
    ) -> Result<std::result::Result<(), Refusal>> {
        let t = now();
        self.write(|tx, actor| {
            let obj = format!("node/{name}");
            let Some(n) = node(tx, name)? else {
                return Ok(Err(Refusal::NotArmed));
            };
            let Some(e) = get(tx, name)? else {
                return Ok(Err(Refusal::NotArmed));
            };
            let refuse = |r: Refusal| -> Result<std::result::Result<(), Refusal>> {
                history(tx, actor, &obj, "enroll-refused", &r.to_string())?;
                Ok(Err(r))
            };
            if e.spent.is_some() {
                let why = format!(
                    "second enrollment attempt at {t} (token spent at {}); presented MAC {mac}",
                    e.spent.unwrap_or_default()
                );
                tx.execute(
                    "UPDATE enrollments SET alarm = ?2 WHERE node = ?1",
                    params![name, why],
                )
                .context("raising the alarm")?;
                history(tx, actor, &obj, "alarm", &why)?;
                return Ok(Err(Refusal::Spent));
            }
            if !token_ok(&e.nonce, e.expires) {
                return refuse(Refusal::BadToken);
            }
            if t > e.expires {
                return refuse(Refusal::Expired);
            }
            let mac_n = mac.to_ascii_lowercase().replace('-', ":");
            if !n.macs.contains(&mac_n) {
                return refuse(Refusal::WrongMac);
            }
            if let Some(u) = &e.uuid {
                if !u.eq_ignore_ascii_case(uuid) {
                    return refuse(Refusal::WrongUuid);
                }
            }
            tx.execute(
                "UPDATE enrollments SET spent = ?2, mac = ?3, uuid = ?4, cert = ?5, revoked = 0 WHERE node = ?1",
                params![name, t, mac_n, uuid.to_ascii_lowercase(), cert],
            )
            .context("spending the token")?;
            history(tx, actor, &obj, "enrolled", &format!("mac {mac_n}, certificate {cert}"))?;
            Ok(Ok(()))
        })
    }

    /// Cuts a node off: its certificate is refused from the next request on.
    pub fn revoke(&self, name: &str) -> Result<()> {
        self.write(|tx, actor| {
            node(tx, name)?.with_context(|| format!("unknown node {name:?}"))?;
            tx.execute(
                "INSERT INTO enrollments (node, nonce, armed, expires, revoked) VALUES (?1, '', 0, 0, 1)
                 ON CONFLICT(node) DO UPDATE SET revoked = 1",
                [name],
            )
            .context("revoking the node")?;
            history(tx, actor, &format!("node/{name}"), "revoked", "")
        })
    }

    /// The images `name` may fetch: its own, else its group's.
    pub fn entitled_images(&self, name: &str) -> Result<Vec<String>> {
        let c = self.conn();
        let Some(n) = node(&c, name)? else {
            return Ok(vec![]);
        };
        if let Some(i) = n.image {
            return Ok(vec![i]);
        }
        let Some(g) = n.group else {
            return Ok(vec![]);
        };
        let img: Option<String> = c
            .query_row("SELECT image FROM groups WHERE name = ?1", [g], |r| {
                r.get(0)
            })
            .optional()
            .context("reading the node's group")?
            .flatten();
        Ok(img.into_iter().collect())
    }
}
