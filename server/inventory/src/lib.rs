//! The node inventory: an SQLite database in the server's state directory.
//!
//! ```text
//! /var/lib/si/              (--state-dir, mode 0700 when created)
//! └── inventory.db          (mode 0600: it holds BMC passwords)
//! ```
//!
//! Tables: `nodes` (+ `node_macs`), `groups` (hardware profiles), `subnets`, `leases` (DHCP) and
//! `history` (who changed what, when). The schema is versioned ([`schema`]). Every change to
//! nodes, groups and subnets is recorded in `history` in the same transaction as the change.
//! Passwords never appear in history, `Debug` output or the CLI (`***`).

pub mod catalog;
pub mod cli;
pub mod enroll;
mod leasebook;
pub mod model;
pub mod ranges;
mod schema;

pub use catalog::{ImageCatalog, ListCatalog, NoCatalog, StoreCatalog};
pub use leasebook::LeaseBook;
pub use model::*;

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "inventory.db";

/// Current time, Unix seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// An open inventory. Cheap to share behind an `Arc`; calls are serialised by a mutex.
pub struct Inventory {
    conn: Mutex<Connection>,
    path: PathBuf,
    actor: String,
    /// Held while a background checkpointer runs; it stops when this handle is dropped.
    checkpointer: Mutex<Option<Arc<()>>>,
    /// The DHCP leases, once a DHCP server has asked for them.
    lease_book: Mutex<Option<Arc<LeaseBook>>>,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory")
            .field("path", &self.path)
            .finish()
    }
}

const NODE_COLS: &str = "name, ip, hostname, grp, image, boot_action, boot_kernel, boot_initrd, boot_cmdline, state, permanent, bmc_host, bmc_port, bmc_user, bmc_password, bmc_driver, bmc_cipher_suite";
const GROUP_COLS: &str = "name, description, image, disk_layout, kernel_args, firmware, bmc_host, bmc_port, bmc_user, bmc_password, bmc_driver, bmc_cipher_suite";
const SUBNET_COLS: &str =
    "name, network, prefix, router, dns, domain, pool_start, pool_end, lease_time, permanent";

impl Inventory {
    /// Opens (creating if needed) `<state_dir>/inventory.db`.
    pub fn open_state_dir(state_dir: &Path) -> Result<Inventory> {
        if !state_dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(state_dir)
                .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        }
        Inventory::open(&state_dir.join(DB_FILE))
    }

    /// Opens (creating if needed) the database at `path`, makes it mode 0600 and applies
    /// pending migrations.
    pub fn open(path: &Path) -> Result<Inventory> {
        // Create the file ourselves so it is never world-readable, even for an instant; but
        // only when it does not exist. Closing a descriptor of a file drops every POSIX lock
        // this process holds on it, SQLite's included: a handle opened while another one of
        // this process is open would let another process believe it is the last reader,
        // checkpoint and delete the WAL, and every later write of the first handle would go
        // to a file nobody else reads.
        match std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("creating inventory {}", path.display()))
            }
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} mode 0600", path.display()))?;
        let mut conn = Connection::open(path)
            .with_context(|| format!("opening inventory {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .context("setting the busy timeout")?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .context("enabling foreign keys")?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .context("enabling WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .context("setting synchronous mode")?;
        schema::migrate(&mut conn)
            .with_context(|| format!("migrating inventory {}", path.display()))?;
        Ok(Inventory {
            conn: Mutex::new(conn),
            checkpointer: Mutex::new(None),
            lease_book: Mutex::new(None),
            path: path.to_path_buf(),
            actor: default_actor(),
        })
    }

    /// Who is recorded in history for changes made through this handle.
    pub fn with_actor(mut self, actor: impl Into<String>) -> Inventory {
        self.actor = actor.into();
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable (SQLite rolls back).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` in one transaction.
    fn write<T>(&self, f: impl FnOnce(&Connection, &str) -> Result<T>) -> Result<T> {
        let mut c = self.conn();
        // IMMEDIATE: take the write lock up front (waiting up to the busy timeout), so that a
        // CLI and the server writing at once never fail on a read-to-write upgrade.
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .context("starting a transaction")?;
        let v = f(&tx, &self.actor)?;
        tx.commit().context("committing to the inventory")?;
        Ok(v)
    }

    /// Moves WAL checkpoints (which fsync) off this handle's callers onto a thread of their
    /// own with its own connection: a server answering DHCP never waits for one. Five a second
    /// keep the WAL small and each fsync short (DHCP tail latency). Idempotent; the thread
    /// ends when this handle is dropped.
    pub fn checkpoint_in_background(&self) -> Result<()> {
        let mut slot = self.checkpointer.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Ok(());
        }
        let conn = Connection::open(&self.path)
            .with_context(|| format!("opening {} for checkpoints", self.path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(1))?;
        let token = Arc::new(());
        let alive = Arc::downgrade(&token);
        std::thread::Builder::new()
            .name("si-inventory-checkpoint".into())
            .spawn(move || {
                while alive.strong_count() > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                }
            })
            .context("starting the checkpoint thread")?;
        self.conn()
            .pragma_update(None, "wal_autocheckpoint", 0)
            .context("turning off automatic checkpoints")?;
        *slot = Some(token);
        Ok(())
    }

    /// Runs `f` with every read it makes through this handle in one read transaction: one
    /// snapshot and one round of file locking instead of one per statement (what a burst of
    /// DHCP packets needs). Give it a handle of its own: writes through the handle from other
    /// threads meanwhile would join the transaction.
    pub fn reading<T>(&self, f: impl FnOnce() -> T) -> T {
        let begun = self
            .conn()
            .prepare_cached("BEGIN")
            .and_then(|mut st| st.execute([]))
            .is_ok();
        let v = f();
        if begun {
            let c = self.conn();
            if c.prepare_cached("COMMIT")
                .and_then(|mut st| st.execute([]))
                .is_err()
            {
                let _ = c.execute_batch("ROLLBACK");
            }
        }
        v
    }

    /// The DHCP leases ([`LeaseBook`]): taken on the first call (folding the journal an
    /// earlier run left), shared by every later caller in this process. Another process
    /// holding them is an error.
    pub fn lease_book(&self) -> Result<Arc<LeaseBook>> {
        let mut slot = self.lease_book.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = &*slot {
            return Ok(b.clone());
        }
        let b = Arc::new(LeaseBook::open(&self.path)?);
        *slot = Some(b.clone());
        Ok(b)
    }

    // ----- subnets -----

    pub fn subnets(&self) -> Result<Vec<Subnet>> {
        subnets(&self.conn())
    }

    /// Adds or replaces a subnet.
    pub fn put_subnet(&self, s: &Subnet) -> Result<()> {
        self.write(|tx, actor| put_subnet(tx, actor, s))
    }

    pub fn remove_subnet(&self, name: &str) -> Result<()> {
        self.write(|tx, actor| {
            let n = tx
                .execute("DELETE FROM subnets WHERE name = ?1", [name])
                .context("deleting subnet")?;
            if n == 0 {
                bail!("unknown subnet {name:?}");
            }
            history(tx, actor, &format!("subnet/{name}"), "rm", "")
        })
    }

    // ----- groups -----

    pub fn groups(&self) -> Result<Vec<Group>> {
        let c = self.conn();
        let mut st = c
            .prepare(&format!("SELECT {GROUP_COLS}, profile FROM groups"))
            .context("listing groups")?;
        let mut v = st
            .query_map([], group_from_row)
            .context("listing groups")?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("reading groups")?;
        v.sort_by(|a, b| crate::ranges::natural_cmp(&a.name, &b.name));
        Ok(v)
    }

    pub fn group(&self, name: &str) -> Result<Option<Group>> {
        group(&self.conn(), name)
    }

    pub fn add_group(&self, g: &Group, catalog: &dyn ImageCatalog) -> Result<()> {
        self.write(|tx, actor| {
            if group(tx, &g.name)?.is_some() {
                bail!("group {:?} already exists", g.name);
            }
            put_group(tx, actor, g, catalog)
        })
    }

    /// Replaces an existing group.
    pub fn update_group(&self, g: &Group, catalog: &dyn ImageCatalog) -> Result<()> {
        self.write(|tx, actor| {
            if group(tx, &g.name)?.is_none() {
                bail!("unknown group {:?}", g.name);
            }
            put_group(tx, actor, g, catalog)
        })
    }

    pub fn remove_group(&self, name: &str) -> Result<()> {
        self.write(|tx, actor| {
            let users: Vec<String> = {
                let mut st = tx
                    .prepare("SELECT name FROM nodes WHERE grp = ?1 LIMIT 5")
                    .context("finding the group's nodes")?;
                let r = st
                    .query_map([name], |r| r.get(0))
                    .context("finding the group's nodes")?
                    .collect::<rusqlite::Result<_>>()
                    .context("reading node names")?;
                r
            };
            if !users.is_empty() {
                bail!(
                    "group {name:?} is still used by nodes ({}...): move or remove them first",
                    users.join(", ")
                );
            }
            let n = tx
                .execute("DELETE FROM groups WHERE name = ?1", [name])
                .context("deleting group")?;
            if n == 0 {
                bail!("unknown group {name:?}");
            }
            history(tx, actor, &format!("group/{name}"), "rm", "")
        })
    }

    // ----- nodes -----

    /// All nodes, in natural name order.
    pub fn nodes(&self) -> Result<Vec<Node>> {
        let c = self.conn();
        let mut v = {
            let mut st = c
                .prepare(&format!(
                    "SELECT {NODE_COLS}, profile, rack, switch FROM nodes"
                ))
                .context("listing nodes")?;
            let r = st
                .query_map([], node_from_row)
                .context("listing nodes")?
                .collect::<rusqlite::Result<Vec<_>>>()
                .context("reading nodes")?;
            r
        };
        let mut st = c
            .prepare("SELECT mac, node FROM node_macs ORDER BY rowid")
            .context("listing MACs")?;
        let macs = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .context("listing MACs")?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("reading MACs")?;
        let mut by_node: std::collections::HashMap<String, Vec<String>> = Default::default();
        for (mac, node) in macs {
            by_node.entry(node).or_default().push(mac);
        }
        for n in &mut v {
            n.macs = by_node.remove(&n.name).unwrap_or_default();
        }
        v.sort_by(|a, b| crate::ranges::natural_cmp(&a.name, &b.name));
        Ok(v)
    }

    pub fn node(&self, name: &str) -> Result<Option<Node>> {
        node(&self.conn(), name)
    }

    /// The node owning `mac` (any notation).
    pub fn node_by_mac(&self, mac: &str) -> Result<Option<Node>> {
        let mac = normalize_mac(mac)?;
        let c = self.conn();
        let name: Option<String> = c
            .prepare_cached("SELECT node FROM node_macs WHERE mac = ?1")
            .and_then(|mut st| st.query_row([&mac], |r| r.get(0)).optional())
            .context("looking up MAC")?;
        match name {
            Some(n) => node(&c, &n),
            None => Ok(None),
        }
    }

    /// Adds nodes, all or none.
    pub fn add_nodes(&self, nodes: &[Node], catalog: &dyn ImageCatalog) -> Result<()> {
        self.write(|tx, actor| {
            for n in nodes {
                if node(tx, &n.name)?.is_some() {
                    bail!("node {:?} already exists", n.name);
                }
                put_node(tx, actor, n, None, catalog)?;
            }
            Ok(())
        })
    }

    pub fn add_node(&self, n: &Node, catalog: &dyn ImageCatalog) -> Result<()> {
        self.add_nodes(std::slice::from_ref(n), catalog)
    }

    /// Replaces existing nodes (matched by name), all or none.
    pub fn update_nodes(&self, nodes: &[Node], catalog: &dyn ImageCatalog) -> Result<()> {
        self.write(|tx, actor| {
            for n in nodes {
                let old =
                    node(tx, &n.name)?.with_context(|| format!("unknown node {:?}", n.name))?;
                put_node(tx, actor, n, Some(&old), catalog)?;
            }
            Ok(())
        })
    }

    pub fn remove_nodes(&self, names: &[String]) -> Result<()> {
        self.write(|tx, actor| {
            for name in names {
                let n = tx
                    .execute("DELETE FROM nodes WHERE name = ?1", [name])
                    .context("deleting node")?;
                if n == 0 {
                    bail!("unknown node {name:?}");
                }
                history(tx, actor, &format!("node/{name}"), "rm", "")?;
            }
            Ok(())
        })
    }

    /// Sets the boot action of a node whose installation finished to `local`, and its state
    /// to `installed`.
    pub fn mark_installed(&self, name: &str) -> Result<()> {
        self.mark_installed_with(name, None)
    }

    /// [`Inventory::mark_installed`], recording in the history what was installed
    /// (`IMAGE@VERSION`, as the node reported it).
    pub fn mark_installed_with(&self, name: &str, image: Option<&str>) -> Result<()> {
        self.write(|tx, actor| {
            let old = node(tx, name)?.with_context(|| format!("unknown node {name:?}"))?;
            let n = tx
                .execute(
                    "UPDATE nodes SET boot_action = 'local', boot_kernel = NULL, boot_initrd = NULL, boot_cmdline = NULL, state = 'installed' WHERE name = ?1",
                    [name],
                )
                .context("marking node installed")?;
            debug_assert_eq!(n, 1);
            history(
                tx,
                actor,
                &format!("node/{name}"),
                "installed",
                &format!(
                    "boot: {} -> local; state: {} -> installed{}",
                    old.boot,
                    old.state,
                    image.map(|i| format!("; image {i}")).unwrap_or_default()
                ),
            )
        })
    }

    /// Sets a node to reinstall at its next network boot (boot action `install`).
    pub fn set_boot_install(&self, name: &str) -> Result<()> {
        self.write(|tx, actor| {
            let old = node(tx, name)?.with_context(|| format!("unknown node {name:?}"))?;
            tx.execute(
                "UPDATE nodes SET boot_action = 'install', boot_kernel = NULL, boot_initrd = NULL, boot_cmdline = NULL WHERE name = ?1",
                [name],
            )
            .context("setting the boot action")?;
            history(tx, actor, &format!("node/{name}"), "boot", &format!("boot: {} -> install", old.boot))
        })?;
        // Arming an install opens the node's one-time enrollment.
        self.arm_enrollment(name, enroll::DEFAULT_WINDOW_SECS)?;
        Ok(())
    }

    /// Sets a node to be installed by its distribution's installer at its next network boot
    /// (boot action `autoinstall`, see si-autoinstall).
    pub fn set_boot_autoinstall(&self, name: &str) -> Result<()> {
        self.write(|tx, actor| {
            let old = node(tx, name)?.with_context(|| format!("unknown node {name:?}"))?;
            tx.execute(
                "UPDATE nodes SET boot_action = 'autoinstall', boot_kernel = NULL, boot_initrd = NULL, boot_cmdline = NULL WHERE name = ?1",
                [name],
            )
            .context("setting the boot action")?;
            history(tx, actor, &format!("node/{name}"), "boot", &format!("boot: {} -> autoinstall", old.boot))
        })
    }

    /// Records an event about a node that changes nothing in the inventory (a power action,
    /// a boot device change), so the node's history tells the whole story.
    pub fn record_event(&self, name: &str, action: &str, detail: &str) -> Result<()> {
        self.write(|tx, actor| history(tx, actor, &format!("node/{name}"), action, detail))
    }

    /// Records a failed install: state `failed`, and the installer's reason (already cleaned
    /// and bounded by the image service) in the node's history, in one transaction.
    pub fn mark_failed(&self, name: &str, reason: &str) -> Result<()> {
        self.write(|tx, actor| {
            let old = node(tx, name)?.with_context(|| format!("unknown node {name:?}"))?;
            tx.execute("UPDATE nodes SET state = 'failed' WHERE name = ?1", [name])
                .context("setting node state")?;
            history(
                tx,
                actor,
                &format!("node/{name}"),
                "install-failed",
                &format!("state: {} -> failed: {reason}", old.state),
            )
        })
    }

    /// Sets the free-text state of a node (`installing`, `failed`...).
    pub fn set_state(&self, name: &str, state: &str) -> Result<()> {
        self.write(|tx, actor| {
            let old = node(tx, name)?.with_context(|| format!("unknown node {name:?}"))?;
            tx.execute("UPDATE nodes SET state = ?2 WHERE name = ?1", [name, state])
                .context("setting node state")?;
            history(
                tx,
                actor,
                &format!("node/{name}"),
                "state",
                &format!("state: {} -> {state}", old.state),
            )
        })
    }

    /// Boot information of a node by name.
    pub fn boot_info(&self, name: &str) -> Result<Option<BootInfo>> {
        let c = self.conn();
        match node(&c, name)? {
            Some(n) => boot_info(&c, n).map(Some),
            None => Ok(None),
        }
    }

    /// Boot information of every node, from two queries (nodes and groups), not one per node.
    pub fn boot_infos(&self) -> Result<Vec<BootInfo>> {
        let groups: std::collections::HashMap<String, Group> = self
            .groups()?
            .into_iter()
            .map(|g| (g.name.clone(), g))
            .collect();
        Ok(self
            .nodes()?
            .into_iter()
            .map(|n| {
                let g = n.group.as_ref().and_then(|g| groups.get(g));
                boot_info_in(n, g)
            })
            .collect())
    }

    /// Boot information of the node owning `mac`.
    pub fn boot_info_by_mac(&self, mac: &str) -> Result<Option<BootInfo>> {
        match self.node_by_mac(mac)? {
            Some(n) => boot_info(&self.conn(), n).map(Some),
            None => Ok(None),
        }
    }

    /// The BMC settings of a node, completed from its group. Holds the password: do not print.
    pub fn bmc(&self, name: &str) -> Result<Option<Bmc>> {
        let c = self.conn();
        let Some(n) = node(&c, name)? else {
            return Ok(None);
        };
        let g = match &n.group {
            Some(g) => group(&c, g)?.map(|g| g.bmc).unwrap_or_default(),
            None => Bmc::default(),
        };
        Ok(Some(n.bmc.or(&g)))
    }

    /// The most recent `limit` changes, optionally of one object (`node/n001`, `group/compute`).
    pub fn history(&self, object: Option<&str>, limit: usize) -> Result<Vec<HistoryEntry>> {
        let c = self.conn();
        let mut st = c
            .prepare(
                "SELECT id, datetime(at, 'unixepoch'), actor, object, action, detail FROM history
                 WHERE ?1 IS NULL OR object = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .context("reading history")?;
        let mut v = st
            .query_map(params![object, limit as i64], |r| {
                Ok(HistoryEntry {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    actor: r.get(2)?,
                    object: r.get(3)?,
                    action: r.get(4)?,
                    detail: r.get(5)?,
                })
            })
            .context("reading history")?
            .collect::<rusqlite::Result<Vec<_>>>()
            .context("reading history")?;
        v.reverse();
        Ok(v)
    }

    // ----- export / import -----

    /// The whole cluster. Without `with_secrets`, passwords are written as `***`, which
    /// [`Inventory::import`] reads as "keep the stored password".
    pub fn export(&self, with_secrets: bool) -> Result<Cluster> {
        let mut c = Cluster {
            subnets: self.subnets()?,
            groups: self.groups()?,
            nodes: self.nodes()?,
        };
        if !with_secrets {
            for g in &mut c.groups {
                g.bmc = g.bmc.redacted();
            }
            for n in &mut c.nodes {
                n.bmc = n.bmc.redacted();
            }
        }
        Ok(c)
    }

    /// Adds or replaces every subnet, group and node of `cluster`, in one transaction. Objects
    /// not mentioned are left alone unless `prune` is set, which removes nodes, then groups,
    /// then subnets absent from the file.
    pub fn import(&self, cluster: &Cluster, catalog: &dyn ImageCatalog, prune: bool) -> Result<()> {
        self.write(|tx, actor| {
            if prune {
                // Nodes first, so that their MACs and addresses are free for renamed nodes.
                let names: Vec<&str> = cluster.nodes.iter().map(|n| n.name.as_str()).collect();
                for n in all_names(tx, "nodes")? {
                    if !names.contains(&n.as_str()) {
                        tx.execute("DELETE FROM nodes WHERE name = ?1", [&n])
                            .context("pruning node")?;
                        history(tx, actor, &format!("node/{n}"), "rm", "import --prune")?;
                    }
                }
            }
            for s in &cluster.subnets {
                put_subnet(tx, actor, s)?;
            }
            for g in &cluster.groups {
                let mut g = g.clone();
                let old = group(tx, &g.name)?;
                if g.bmc.password.as_deref() == Some(REDACTED) {
                    g.bmc.password = old.as_ref().and_then(|o| o.bmc.password.clone());
                }
                if old.as_ref() != Some(&g) {
                    put_group(tx, actor, &g, catalog)?;
                }
            }
            // Free the MACs and IPs of nodes being changed first, so that swaps work.
            let mut pending = Vec::new();
            for n in &cluster.nodes {
                let mut n = n.clone();
                let old = node(tx, &n.name)?;
                if n.bmc.password.as_deref() == Some(REDACTED) {
                    n.bmc.password = old.as_ref().and_then(|o| o.bmc.password.clone());
                }
                if old.as_ref() != Some(&n) {
                    pending.push((n, old));
                }
            }
            for (n, old) in &pending {
                if old.is_some() {
                    tx.execute("DELETE FROM node_macs WHERE node = ?1", [&n.name])
                        .context("freeing MACs")?;
                    tx.execute("UPDATE nodes SET ip = NULL WHERE name = ?1", [&n.name])
                        .context("freeing IP")?;
                }
            }
            for (n, old) in &pending {
                put_node(tx, actor, n, old.as_ref(), catalog)
                    .with_context(|| format!("importing node {}", n.name))?;
            }
            if prune {
                let keep = |list: &[String], name: &str| list.iter().any(|n| n == name);
                let names: Vec<String> = cluster.groups.iter().map(|n| n.name.clone()).collect();
                for n in all_names(tx, "groups")? {
                    if !keep(&names, &n) {
                        tx.execute("DELETE FROM groups WHERE name = ?1", [&n])
                            .with_context(|| format!("pruning group {n}"))?;
                        history(tx, actor, &format!("group/{n}"), "rm", "import --prune")?;
                    }
                }
                let names: Vec<String> = cluster.subnets.iter().map(|n| n.name.clone()).collect();
                for n in all_names(tx, "subnets")? {
                    if !keep(&names, &n) {
                        tx.execute("DELETE FROM subnets WHERE name = ?1", [&n])
                            .context("pruning subnet")?;
                        history(tx, actor, &format!("subnet/{n}"), "rm", "import --prune")?;
                    }
                }
            }
            Ok(())
        })
    }

    // ----- DHCP leases -----

    /// Every lease: the table, with the changes the DHCP server has journaled and not yet
    /// folded into it.
    pub fn leases(&self) -> Result<Vec<Lease>> {
        let journal_first = leasebook::overlay_reader(&self.path)?;
        let table = all_leases(&self.conn())?;
        Ok(journal_first.apply(table))
    }

    /// Whether `ip` is the static address of a node that `mac` does not belong to.
    pub fn static_ip_taken(&self, ip: Ipv4Addr, mac: &str) -> Result<bool> {
        self.conn()
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM nodes n WHERE n.ip = ?1 AND NOT EXISTS
                   (SELECT 1 FROM node_macs m WHERE m.node = n.name AND m.mac = ?2))",
            )
            .and_then(|mut st| st.query_row([&ip.to_string(), mac], |r| r.get(0)))
            .context("checking static addresses")
    }

    /// Writes a lease straight into the table (the DHCP server goes through its
    /// [`LeaseBook`] instead).
    pub fn put_lease(&self, l: &Lease) -> Result<()> {
        self.write(|tx, _| put_lease_tx(tx, l, now()))
    }
}

/// Every row of the `leases` table.
fn all_leases(c: &Connection) -> Result<Vec<Lease>> {
    let mut st = c
        .prepare_cached("SELECT mac, ip, expires, state, hostname FROM leases")
        .context("listing leases")?;
    let v = st
        .query_map([], lease_from_row)
        .context("listing leases")?
        .collect::<rusqlite::Result<Vec<_>>>()
        .context("reading leases")?;
    Ok(v)
}

/// Records a lease changed at `at`, replacing the MAC's previous one and any other lease on
/// the address.
fn put_lease_tx(tx: &Connection, l: &Lease, at: i64) -> Result<()> {
    let ip = l.ip.to_string();
    tx.prepare_cached("DELETE FROM leases WHERE ip = ?1 AND mac <> ?2")
        .and_then(|mut st| st.execute([&ip, &l.mac]))
        .context("replacing an old lease")?;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO leases (mac, ip, expires, state, hostname, updated)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut st| st.execute(params![l.mac, ip, l.expires, l.state, l.hostname, at]))
    .context("writing lease")?;
    Ok(())
}

fn default_actor() -> String {
    if let Ok(u) = std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")) {
        return u;
    }
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => u.name,
        _ => format!("uid {uid}"),
    }
}

fn history(tx: &Connection, actor: &str, object: &str, action: &str, detail: &str) -> Result<()> {
    tx.execute(
        "INSERT INTO history (at, actor, object, action, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![now(), actor, object, action, detail],
    )
    .context("recording history")?;
    Ok(())
}

fn all_names(c: &Connection, table: &str) -> Result<Vec<String>> {
    let mut st = c
        .prepare(&format!("SELECT name FROM {table}"))
        .with_context(|| format!("listing {table}"))?;
    let v = st
        .query_map([], |r| r.get(0))
        .with_context(|| format!("listing {table}"))?
        .collect::<rusqlite::Result<Vec<String>>>()
        .with_context(|| format!("reading {table}"))?;
    Ok(v)
}

fn parse_ip_col(s: Option<String>, idx: usize) -> rusqlite::Result<Option<Ipv4Addr>> {
    match s {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
        }),
    }
}

fn bmc_from_row(r: &Row<'_>, first: usize) -> rusqlite::Result<Bmc> {
    Ok(Bmc {
        host: r.get(first)?,
        port: r.get(first + 1)?,
        user: r.get(first + 2)?,
        password: r.get(first + 3)?,
        driver: r.get(first + 4)?,
        cipher_suite: r.get(first + 5)?,
    })
}

fn node_from_row(r: &Row<'_>) -> rusqlite::Result<Node> {
    let action: String = r.get(5)?;
    let boot = match action.as_str() {
        "local" => BootAction::Local,
        "autoinstall" => BootAction::Autoinstall,
        "custom" => BootAction::Custom {
            kernel: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
            initrd: r.get(7)?,
            cmdline: r.get::<_, Option<String>>(8)?.unwrap_or_default(),
        },
        _ => BootAction::Install,
    };
    Ok(Node {
        name: r.get(0)?,
        macs: Vec::new(),
        ip: parse_ip_col(r.get(1)?, 1)?,
        hostname: r.get(2)?,
        group: r.get(3)?,
        image: r.get(4)?,
        boot,
        state: r.get(9)?,
        permanent: r.get(10)?,
        bmc: bmc_from_row(r, 11)?,
        profile: r.get(17)?,
        rack: r.get(18)?,
        switch: r.get(19)?,
    })
}

fn group_from_row(r: &Row<'_>) -> rusqlite::Result<Group> {
    let fw: String = r.get(5)?;
    Ok(Group {
        name: r.get(0)?,
        description: r.get(1)?,
        image: r.get(2)?,
        disk_layout: r.get(3)?,
        kernel_args: r.get(4)?,
        firmware: Firmware::parse(&fw).unwrap_or_default(),
        bmc: bmc_from_row(r, 6)?,
        profile: r.get(12)?,
    })
}

fn subnet_from_row(r: &Row<'_>) -> rusqlite::Result<Subnet> {
    let dns: String = r.get(4)?;
    let mut d = Vec::new();
    for s in dns.split(',').filter(|s| !s.is_empty()) {
        if let Some(ip) = parse_ip_col(Some(s.to_string()), 4)? {
            d.push(ip);
        }
    }
    Ok(Subnet {
        name: r.get(0)?,
        network: parse_ip_col(r.get(1)?, 1)?.unwrap_or(Ipv4Addr::UNSPECIFIED),
        prefix: r.get(2)?,
        router: parse_ip_col(r.get(3)?, 3)?,
        dns: d,
        domain: r.get(5)?,
        pool_start: parse_ip_col(r.get(6)?, 6)?,
        pool_end: parse_ip_col(r.get(7)?, 7)?,
        lease_time: r.get(8)?,
        permanent: r.get(9)?,
    })
}

fn lease_from_row(r: &Row<'_>) -> rusqlite::Result<Lease> {
    Ok(Lease {
        mac: r.get(0)?,
        ip: parse_ip_col(r.get(1)?, 1)?.unwrap_or(Ipv4Addr::UNSPECIFIED),
        expires: r.get(2)?,
        state: r.get(3)?,
        hostname: r.get(4)?,
    })
}

fn subnets(c: &Connection) -> Result<Vec<Subnet>> {
    let mut st = c
        .prepare_cached(&format!("SELECT {SUBNET_COLS} FROM subnets ORDER BY name"))
        .context("listing subnets")?;
    let v = st
        .query_map([], subnet_from_row)
        .context("listing subnets")?
        .collect::<rusqlite::Result<Vec<_>>>()
        .context("reading subnets")?;
    Ok(v)
}

fn group(c: &Connection, name: &str) -> Result<Option<Group>> {
    c.query_row(
        &format!("SELECT {GROUP_COLS}, profile FROM groups WHERE name = ?1"),
        [name],
        group_from_row,
    )
    .optional()
    .with_context(|| format!("looking up group {name:?}"))
}

fn node(c: &Connection, name: &str) -> Result<Option<Node>> {
    let Some(mut n) = c
        .prepare_cached(&format!(
            "SELECT {NODE_COLS}, profile, rack, switch FROM nodes WHERE name = ?1"
        ))
        .and_then(|mut st| st.query_row([name], node_from_row).optional())
        .with_context(|| format!("looking up node {name:?}"))?
    else {
        return Ok(None);
    };
    let mut st = c
        .prepare_cached("SELECT mac FROM node_macs WHERE node = ?1 ORDER BY rowid")
        .context("listing MACs")?;
    n.macs = st
        .query_map([name], |r| r.get(0))
        .context("listing MACs")?
        .collect::<rusqlite::Result<Vec<String>>>()
        .context("reading MACs")?;
    Ok(Some(n))
}

fn boot_info(c: &Connection, n: Node) -> Result<BootInfo> {
    let g = match &n.group {
        Some(g) => group(c, g)?,
        None => None,
    };
    Ok(boot_info_in(n, g.as_ref()))
}

/// A node's boot information, completed from its group (`g`, the node's group if it has one).
fn boot_info_in(n: Node, g: Option<&Group>) -> BootInfo {
    BootInfo {
        hostname: n.hostname.clone().unwrap_or_else(|| n.name.clone()),
        image: n.image.clone().or_else(|| g.and_then(|g| g.image.clone())),
        kernel_args: g.map(|g| g.kernel_args.clone()).unwrap_or_default(),
        disk_layout: g.and_then(|g| g.disk_layout.clone()),
        firmware: g.map(|g| g.firmware).unwrap_or_default(),
        profile: n
            .profile
            .clone()
            .or_else(|| g.and_then(|g| g.profile.clone())),
        rack: n.rack,
        switch: n.switch,
        name: n.name,
        macs: n.macs,
        ip: n.ip,
        group: n.group,
        action: n.boot,
        state: n.state,
    }
}

fn check_image(catalog: &dyn ImageCatalog, image: &Option<String>) -> Result<()> {
    if let Some(img) = image {
        if catalog.has_image(img)? == Some(false) {
            bail!("unknown image {img:?}");
        }
    }
    Ok(())
}

fn put_subnet(tx: &Connection, actor: &str, s: &Subnet) -> Result<()> {
    s.validate()
        .with_context(|| format!("checking subnet {:?}", s.name))?;
    let dns: Vec<String> = s.dns.iter().map(|d| d.to_string()).collect();
    let old = subnets(tx)?.into_iter().find(|o| o.name == s.name);
    if old.as_ref() == Some(s) {
        return Ok(());
    }
    tx.execute(
        &format!("INSERT OR REPLACE INTO subnets ({SUBNET_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
        params![
            s.name,
            s.network.to_string(),
            s.prefix,
            s.router.map(|r| r.to_string()),
            dns.join(","),
            s.domain,
            s.pool_start.map(|r| r.to_string()),
            s.pool_end.map(|r| r.to_string()),
            s.lease_time,
            s.permanent
        ],
    )
    .context("writing subnet")?;
    history(
        tx,
        actor,
        &format!("subnet/{}", s.name),
        if old.is_some() { "set" } else { "add" },
        &format!(
            "{}/{} pool={:?}-{:?} lease={}s",
            s.network, s.prefix, s.pool_start, s.pool_end, s.lease_time
        ),
    )
}

fn put_group(tx: &Connection, actor: &str, g: &Group, catalog: &dyn ImageCatalog) -> Result<()> {
    crate::ranges::check_name(&g.name)?;
    if let Some(p) = &g.profile {
        crate::ranges::check_name(p)
            .with_context(|| format!("checking the profile of group {}", g.name))?;
    }
    check_image(catalog, &g.image).with_context(|| format!("checking group {:?}", g.name))?;
    let old = group(tx, &g.name)?;
    tx.execute(
        &format!("INSERT OR REPLACE INTO groups ({GROUP_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
        params![
            g.name,
            g.description,
            g.image,
            g.disk_layout,
            g.kernel_args,
            g.firmware.as_str(),
            g.bmc.host,
            g.bmc.port,
            g.bmc.user,
            g.bmc.password,
            g.bmc.driver,
            g.bmc.cipher_suite
        ],
    )
    .context("writing group")?;
    tx.execute(
        "UPDATE groups SET profile = ?2 WHERE name = ?1",
        params![g.name, g.profile],
    )
    .context("writing the group's profile")?;
    let detail = match &old {
        Some(o) => password_change(&o.bmc, &g.bmc, diff(&group_fields(o), &group_fields(g))),
        None => describe(&group_fields(g)),
    };
    history(
        tx,
        actor,
        &format!("group/{}", g.name),
        if old.is_some() { "set" } else { "add" },
        &detail,
    )
}

/// Writes `n` (validated) over `old` if given.
fn put_node(
    tx: &Connection,
    actor: &str,
    n: &Node,
    old: Option<&Node>,
    catalog: &dyn ImageCatalog,
) -> Result<()> {
    crate::ranges::check_name(&n.name)?;
    if let Some(p) = &n.profile {
        crate::ranges::check_name(p)
            .with_context(|| format!("checking the profile of node {}", n.name))?;
    }
    for (what, label) in [("rack", &n.rack), ("switch", &n.switch)] {
        if let Some(l) = label {
            crate::ranges::check_name(l)
                .with_context(|| format!("checking the {what} of node {}", n.name))?;
        }
    }
    let mut n = n.clone();
    n.macs = n
        .macs
        .iter()
        .map(|m| normalize_mac(m))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("node {}", n.name))?;
    for (i, m) in n.macs.iter().enumerate() {
        if n.macs[..i].contains(m) {
            bail!("node {}: MAC {m} given twice", n.name);
        }
        let owner: Option<String> = tx
            .query_row("SELECT node FROM node_macs WHERE mac = ?1", [m], |r| {
                r.get(0)
            })
            .optional()
            .context("checking MAC")?;
        if let Some(o) = owner.filter(|o| *o != n.name) {
            bail!(
                "duplicate MAC: {m} already belongs to node {o} (wanted for {})",
                n.name
            );
        }
    }
    if let Some(ip) = n.ip {
        let owner: Option<String> = tx
            .query_row(
                "SELECT name FROM nodes WHERE ip = ?1",
                [ip.to_string()],
                |r| r.get(0),
            )
            .optional()
            .context("checking IP")?;
        if let Some(o) = owner.filter(|o| *o != n.name) {
            bail!(
                "duplicate IP: {ip} is already assigned to node {o} (wanted for {})",
                n.name
            );
        }
        let subnets = subnets(tx)?;
        if !subnets.iter().any(|s| s.contains(ip)) {
            let list: Vec<String> = subnets
                .iter()
                .map(|s| format!("{}/{}", s.network, s.prefix))
                .collect();
            bail!(
                "IP {ip} of node {} is outside every configured subnet ({}); add one with `si-node subnet add`",
                n.name,
                if list.is_empty() { "none configured".to_string() } else { list.join(", ") }
            );
        }
    }
    if let Some(g) = &n.group {
        if group(tx, g)?.is_none() {
            bail!(
                "unknown group {g:?} for node {} (see `si-group list`)",
                n.name
            );
        }
    }
    check_image(catalog, &n.image).with_context(|| format!("checking node {}", n.name))?;
    if let BootAction::Custom { kernel, .. } = &n.boot {
        if kernel.is_empty() {
            bail!("node {}: a custom boot action needs a kernel", n.name);
        }
    }
    let (kernel, initrd, cmdline) = match &n.boot {
        BootAction::Custom {
            kernel,
            initrd,
            cmdline,
        } => (Some(kernel.clone()), initrd.clone(), Some(cmdline.clone())),
        _ => (None, None, None),
    };
    if old.is_some() {
        tx.execute("DELETE FROM node_macs WHERE node = ?1", [&n.name])
            .context("replacing MACs")?;
    }
    tx.execute(
        &format!("INSERT INTO nodes ({NODE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
          ON CONFLICT(name) DO UPDATE SET ip=excluded.ip, hostname=excluded.hostname, grp=excluded.grp,
          image=excluded.image, boot_action=excluded.boot_action, boot_kernel=excluded.boot_kernel,
          boot_initrd=excluded.boot_initrd, boot_cmdline=excluded.boot_cmdline, state=excluded.state,
          permanent=excluded.permanent, bmc_host=excluded.bmc_host, bmc_port=excluded.bmc_port,
          bmc_user=excluded.bmc_user, bmc_password=excluded.bmc_password, bmc_driver=excluded.bmc_driver,
          bmc_cipher_suite=excluded.bmc_cipher_suite"),
        params![
            n.name,
            n.ip.map(|i| i.to_string()),
            n.hostname,
            n.group,
            n.image,
            n.boot.kind(),
            kernel,
            initrd,
            cmdline,
            n.state,
            n.permanent,
            n.bmc.host,
            n.bmc.port,
            n.bmc.user,
            n.bmc.password,
            n.bmc.driver,
            n.bmc.cipher_suite
        ],
    )
    .with_context(|| format!("writing node {}", n.name))?;
    tx.execute(
        "UPDATE nodes SET profile = ?2, rack = ?3, switch = ?4 WHERE name = ?1",
        params![n.name, n.profile, n.rack, n.switch],
    )
    .with_context(|| format!("writing the profile and labels of node {}", n.name))?;
    for m in &n.macs {
        tx.execute(
            "INSERT INTO node_macs (mac, node) VALUES (?1, ?2)",
            [m, &n.name],
        )
        .with_context(|| format!("writing MAC {m}"))?;
    }
    let detail = match old {
        Some(o) => password_change(&o.bmc, &n.bmc, diff(&node_fields(o), &node_fields(&n))),
        None => describe(&node_fields(&n)),
    };
    history(
        tx,
        actor,
        &format!("node/{}", n.name),
        if old.is_some() { "set" } else { "add" },
        &detail,
    )
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".into())
}

fn bmc_fields(b: &Bmc, out: &mut Vec<(&'static str, String)>) {
    out.push(("bmc.host", opt(&b.host)));
    out.push(("bmc.port", opt(&b.port)));
    out.push(("bmc.user", opt(&b.user)));
    // Only whether a password is set, never its value.
    out.push((
        "bmc.password",
        if b.password.is_some() {
            REDACTED.into()
        } else {
            "-".into()
        },
    ));
    out.push(("bmc.driver", opt(&b.driver)));
    out.push(("bmc.cipher-suite", opt(&b.cipher_suite)));
}

fn node_fields(n: &Node) -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("macs", n.macs.join(",")),
        ("ip", opt(&n.ip)),
        ("hostname", opt(&n.hostname)),
        ("group", opt(&n.group)),
        ("image", opt(&n.image)),
        ("boot", n.boot.to_string()),
        ("state", n.state.clone()),
        ("permanent", n.permanent.to_string()),
        ("profile", opt(&n.profile)),
        ("rack", opt(&n.rack)),
        ("switch", opt(&n.switch)),
    ];
    bmc_fields(&n.bmc, &mut v);
    v
}

fn group_fields(g: &Group) -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("description", g.description.clone()),
        ("image", opt(&g.image)),
        ("disk-layout", opt(&g.disk_layout)),
        ("kernel-args", g.kernel_args.clone()),
        ("firmware", g.firmware.as_str().into()),
        ("profile", opt(&g.profile)),
    ];
    bmc_fields(&g.bmc, &mut v);
    v
}

fn password_change(old: &Bmc, new: &Bmc, mut detail: String) -> String {
    if old.password.is_some() && new.password.is_some() && old.password != new.password {
        if !detail.is_empty() {
            detail.push_str("; ");
        }
        detail.push_str("bmc.password changed");
    }
    detail
}

fn describe(f: &[(&str, String)]) -> String {
    f.iter()
        .filter(|(_, v)| v != "-" && !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn diff(a: &[(&str, String)], b: &[(&str, String)]) -> String {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.1 != y.1)
        .map(|(x, y)| format!("{}: {} -> {}", x.0, x.1, y.1))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests;
