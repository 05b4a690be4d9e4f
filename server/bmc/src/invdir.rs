//! The BMC directory backed by the node inventory: a node's BMC address, port, user, password,
//! driver and cipher suite come from the node, gaps filled from its group; power actions and
//! boot changes go into the node's history.

use super::directory::{BmcDirectory, HistoryEvent};
use super::{BmcTarget, Driver};
use anyhow::{bail, Context, Result};
use si_inventory::Inventory;

pub struct InventoryDirectory {
    inv: Inventory,
}

impl InventoryDirectory {
    pub fn open(state_dir: &std::path::Path) -> Result<InventoryDirectory> {
        let inv = Inventory::open_state_dir(state_dir)
            .with_context(|| format!("opening the inventory in {}", state_dir.display()))?
            .with_actor("si-power");
        Ok(InventoryDirectory { inv })
    }
}

fn driver(s: Option<&str>) -> Result<Driver> {
    Ok(match s.unwrap_or("ipmi") {
        "ipmi" | "lanplus" => Driver::Ipmi,
        "ipmitool" => Driver::Ipmitool,
        "redfish" => Driver::Redfish,
        other => bail!("unknown BMC driver {other:?} (ipmi, ipmitool, redfish)"),
    })
}

impl BmcDirectory for InventoryDirectory {
    fn expand(&self, expr: &str) -> Result<Vec<String>> {
        if let Some(group) = expr.strip_prefix('@') {
            let v: Vec<String> = self
                .inv
                .nodes()?
                .into_iter()
                .filter(|n| n.group.as_deref() == Some(group))
                .map(|n| n.name)
                .collect();
            if v.is_empty() {
                bail!("group {group} has no nodes");
            }
            return Ok(v);
        }
        si_inventory::ranges::expand(expr)
    }

    fn resolve(&self, nodes: &[String]) -> Result<Vec<BmcTarget>> {
        nodes
            .iter()
            .map(|n| {
                let b = self
                    .inv
                    .bmc(n)?
                    .with_context(|| format!("unknown node {n}"))?;
                let host = b.host.clone().with_context(|| {
                    format!("node {n} has no BMC address (si-node set {n} --bmc-host ...)")
                })?;
                let driver = driver(b.driver.as_deref())?;
                Ok(BmcTarget {
                    node: n.clone(),
                    host,
                    port: b
                        .port
                        .unwrap_or(if driver == Driver::Redfish { 443 } else { 623 }),
                    user: b.user.clone().unwrap_or_else(|| "ADMIN".into()),
                    password: b.password.clone().unwrap_or_default(),
                    driver,
                    cipher_suite: b.cipher_suite.unwrap_or(3),
                    redfish_tls: Default::default(),
                })
            })
            .collect()
    }

    fn record(&self, e: &HistoryEvent) -> Result<()> {
        self.inv
            .record_event(&e.node, &e.action, &format!("{}: {}", e.outcome, e.detail))
    }

    fn set_boot_action(&self, node: &str, action: &str) -> Result<()> {
        match action {
            "install" => self.inv.set_boot_install(node),
            "autoinstall" => self.inv.set_boot_autoinstall(node),
            "local" => self.inv.mark_installed(node),
            other => {
                bail!("boot action {other:?} cannot be set here (install, autoinstall or local)")
            }
        }
    }
}
