//! The install plans the image service hands netbooted installers (`Msg::GetPlan`), assembled
//! from the inventory (node, its group), the store (the image's own layout, override images)
//! and the master's layout directory.

use crate::wave::WaveConfig;
use anyhow::{bail, Context, Result};
use si_inventory::{normalize_mac, Inventory};
use si_proto::plan::{InstallPlan, Network};
use si_store::Store;
use std::path::Path;

/// The plan of `node` (a name or a MAC) as TOML; None for a node the inventory lacks.
///
/// - image: the node's, else its group's (required);
/// - layout: the group's `disk-layout` (a name: `LAYOUTS/NAME.toml`; an absolute path), else
///   the layout recorded with the image's newest version;
/// - network: the node's static address with its subnet's prefix, router, DNS and domain,
///   else DHCP;
/// - overrides: the images `override-all`, `override-GROUP`, `override-NODE` that exist, in
///   that order (SystemImager's global, group, host; later wins);
/// - relay: the node's place in its install wave ([`crate::wave`]), unless the wave is
///   served directly. A wave that cannot be planned leaves the node pulling from the master.
pub fn install_plan(
    inv: &Inventory,
    store: &Store,
    layouts: &Path,
    waves: &WaveConfig,
    node: &str,
) -> Result<Option<String>> {
    let info = if node.contains(':') {
        inv.boot_info_by_mac(&normalize_mac(node)?)?
    } else {
        inv.boot_info(node)?
    };
    let Some(b) = info else { return Ok(None) };
    let Some(image) = b.image.clone() else {
        bail!(
            "node {} has no image (set one on the node or its group)",
            b.name
        );
    };
    // The plan names the version it was made for (the newest now): the node pulls that one
    // and reports it, whatever is committed meanwhile.
    let version = store.resolve(&image, None)?;
    let layout = match &b.disk_layout {
        Some(l) if l.starts_with('/') => Some(
            std::fs::read_to_string(l).with_context(|| format!("reading the disk layout {l}"))?,
        ),
        Some(l) => {
            if l.is_empty()
                || !l
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                || l.starts_with('.')
            {
                bail!("bad disk layout name {l:?}");
            }
            let p = layouts.join(format!("{l}.toml"));
            Some(
                std::fs::read_to_string(&p)
                    .with_context(|| format!("reading the disk layout {}", p.display()))?,
            )
        }
        None => store.layout(&image, version)?,
    };
    if let Some(l) = &layout {
        si_proto::layout::Layout::parse(l)
            .map_err(|e| anyhow::anyhow!("the layout of {}: {e}", b.name))?;
    }
    let mut network = Network {
        mac: b.macs.first().cloned(),
        ..Default::default()
    };
    if let Some(ip) = b.ip {
        network.method = Some("static".into());
        network.address = Some(ip);
        if let Some(s) = inv.subnets()?.into_iter().find(|s| s.contains(ip)) {
            network.prefix = Some(s.prefix);
            network.gateway = s.router;
            network.dns = s.dns;
            network.domain = s.domain;
        }
    }
    let mut overrides = Vec::new();
    for o in std::iter::once("all".to_string())
        .chain(b.group.clone())
        .chain(std::iter::once(b.name.clone()))
    {
        let name = format!("override-{o}");
        if store.versions(&name).is_ok_and(|v| !v.is_empty()) {
            overrides.push(name);
        }
    }
    // A relay section only speeds the install up: an install goes on without one.
    let relay = crate::wave::relay_for(inv, store, &b, &image, version, waves).unwrap_or_else(|e| {
        tracing::warn!(node = %b.name, error = format!("{e:#}"), "no install wave for this node: it pulls from the master");
        None
    });
    let plan = InstallPlan {
        node: b.name.clone(),
        image,
        version: Some(version),
        layout,
        hostname: Some(b.hostname.clone()),
        group: b.group.clone(),
        network,
        overrides,
        scripts: Vec::new(),
        post: Default::default(),
        relay,
    };
    plan.check().map_err(|e| anyhow::anyhow!(e))?;
    Ok(Some(toml::to_string(&plan)?))
}
