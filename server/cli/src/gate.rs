//! The master's per-request authorisation for the image service, from the inventory: enrolled
//! nodes (their current, unrevoked certificate) read their own or their group's image and
//! report about themselves; the master's own certificate may do everything; a host without a
//! certificate may only enroll, with a one-time token.

use anyhow::{bail, Context, Result};
use si_imageserver::service::{Caller, EnrollRequest, Gate};
use si_inventory::enroll::Refusal;
use si_inventory::Inventory;
use si_trust::ca::Authority;
use si_trust::Peer;
use std::sync::Arc;

pub struct InventoryGate {
    pub inv: Arc<Inventory>,
    pub ca: Arc<Authority>,
}

impl InventoryGate {
    /// The enrolled node the caller is (None: the master), or the refusal.
    fn known(&self, c: &Caller) -> Result<Option<String>> {
        match &c.peer {
            Some(Peer::Master) => Ok(None),
            None => bail!("not enrolled: this request needs a node certificate"),
            Some(Peer::Node(n)) => {
                let e = self
                    .inv
                    .enrollment(n)?
                    .with_context(|| format!("{n} is not enrolled"))?;
                if e.revoked {
                    bail!("{n}'s certificate is revoked");
                }
                let presented = c.cert.map(|f| f.to_string());
                if e.cert.is_none() || e.cert != presented {
                    bail!("{n} presented a certificate that is not its current one");
                }
                Ok(Some(n.clone()))
            }
        }
    }
}

impl Gate for InventoryGate {
    fn may_read_image(&self, c: &Caller, image: &str) -> Result<()> {
        let Some(node) = self.known(c)? else {
            return Ok(());
        };
        if !self.inv.entitled_images(&node)?.iter().any(|i| i == image) {
            bail!("{node} is not entitled to image {image}");
        }
        Ok(())
    }

    fn may_fetch_objects(&self, c: &Caller) -> Result<()> {
        self.known(c).map(|_| ())
    }

    fn may_report(&self, c: &Caller, node: &str) -> Result<()> {
        match self.known(c)? {
            None => Ok(()),
            Some(n) if n == node => Ok(()),
            Some(n) => bail!("{n} may report only about itself, not {node}"),
        }
    }

    fn enroll(&self, c: &Caller, req: &EnrollRequest) -> Result<Vec<Vec<u8>>> {
        let node = &req.node;
        if node.is_empty() || node.len() > 64 || node.contains('/') {
            bail!("not a node name");
        }
        if self.inv.node(node)?.is_none() {
            bail!("no node {node:?} in the inventory");
        }
        // What the peer says about itself is checked before it is logged or stored.
        if !is_mac(&req.mac) {
            bail!("not a MAC address: {:?}", req.mac);
        }
        // An SMBIOS UUID as sysfs prints it; firmware that fills it badly still gives a plain
        // word, never control characters or spaces.
        if req.uuid.len() > 64
            || !req
                .uuid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!("not an SMBIOS UUID: {:?}", req.uuid);
        }
        let cert = self
            .ca
            .issue_node(node, &req.public_key, si_trust::ca::NODE_CERT_LIFETIME)?;
        let fp = si_trust::Fingerprint::of(&cert).to_string();
        let ca = self.ca.clone();
        let token_ok = |nonce: &str, expires: i64| {
            let want = ca.enrollment_token(node, nonce, expires);
            !nonce.is_empty() && si_proto::handshake::ct_eq(want.as_bytes(), req.token.as_bytes())
        };
        match self
            .inv
            .spend_enrollment(node, &req.mac, &req.uuid, &fp, &token_ok)?
        {
            Ok(()) => {
                tracing::info!(%node, peer = %c.addr, mac = %req.mac, certificate = %fp, "node enrolled");
                Ok(vec![cert, self.ca.ca_der().to_vec()])
            }
            Err(Refusal::Spent) => {
                tracing::error!(%node, peer = %c.addr, mac = %req.mac, "ALARM: second enrollment attempt for a node whose token is spent; refused (si-node show {node})");
                bail!("{}", Refusal::Spent)
            }
            Err(r) => {
                tracing::warn!(%node, peer = %c.addr, reason = %r, "enrollment refused");
                bail!("{r}")
            }
        }
    }
}

/// The token the master hands node `node`'s installer (on its boot script), if an
/// enrollment is open for it. For the boot configuration and the installer's tests.
/// `aa:bb:cc:dd:ee:ff` (or with dashes), as an installer reads it from sysfs.
fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    s.len() == 17
        && parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

pub fn enrollment_token(inv: &Inventory, ca: &Authority, node: &str) -> Result<Option<String>> {
    Ok(inv
        .enrollment(node)?
        .filter(|e| e.spent.is_none() && e.expires > si_inventory::now() && !e.nonce.is_empty())
        .map(|e| ca.enrollment_token(node, &e.nonce, e.expires)))
}

#[cfg(test)]
mod tests {
    use super::is_mac;

    /// An enrollment's MAC is checked before it is logged or stored: a newline or any other
    /// text is refused.
    #[test]
    fn only_macs_pass() {
        assert!(is_mac("52:54:00:12:34:56"));
        assert!(is_mac("52-54-00-AB-cd-EF"));
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:56\nERROR forged",
            "525400123456aaaaa",
        ] {
            assert!(!is_mac(bad), "{bad:?}");
        }
    }
}
