//! The database schema and its migrations. `PRAGMA user_version` holds the number of migrations
//! applied; each migration runs once, in a transaction, in order.

use anyhow::{bail, Context, Result};
use rusqlite::Connection;

/// Each entry upgrades the schema from version `i` to `i + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    r#"
CREATE TABLE groups (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    image TEXT,
    disk_layout TEXT,
    kernel_args TEXT NOT NULL DEFAULT '',
    firmware TEXT NOT NULL DEFAULT 'auto',
    bmc_host TEXT, bmc_port INTEGER, bmc_user TEXT, bmc_password TEXT,
    bmc_driver TEXT, bmc_cipher_suite INTEGER
);
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    ip TEXT UNIQUE,
    hostname TEXT,
    grp TEXT REFERENCES groups(name),
    image TEXT,
    boot_action TEXT NOT NULL DEFAULT 'install',
    boot_kernel TEXT, boot_initrd TEXT, boot_cmdline TEXT,
    state TEXT NOT NULL DEFAULT 'new',
    permanent INTEGER NOT NULL DEFAULT 0,
    bmc_host TEXT, bmc_port INTEGER, bmc_user TEXT, bmc_password TEXT,
    bmc_driver TEXT, bmc_cipher_suite INTEGER
);
CREATE TABLE node_macs (
    mac TEXT PRIMARY KEY,
    node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE ON UPDATE CASCADE
);
CREATE INDEX node_macs_node ON node_macs(node);
CREATE TABLE subnets (
    name TEXT PRIMARY KEY,
    network TEXT NOT NULL,
    prefix INTEGER NOT NULL,
    router TEXT,
    dns TEXT NOT NULL DEFAULT '',
    domain TEXT,
    pool_start TEXT,
    pool_end TEXT,
    lease_time INTEGER NOT NULL DEFAULT 3600,
    permanent INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE leases (
    mac TEXT PRIMARY KEY,
    ip TEXT NOT NULL UNIQUE,
    expires INTEGER,
    state TEXT NOT NULL,
    hostname TEXT,
    updated INTEGER NOT NULL
);
CREATE TABLE history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    object TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX history_object ON history(object);
"#,
    // 2: automatic-install profiles of nodes and groups (si-autoinstall)
    r#"
ALTER TABLE nodes ADD COLUMN profile TEXT;
ALTER TABLE groups ADD COLUMN profile TEXT;
"#,
    // 3: enrollment and node certificates (see enroll.rs and docs/security.md)
    r#"
CREATE TABLE enrollments (
    node TEXT PRIMARY KEY REFERENCES nodes(name) ON DELETE CASCADE ON UPDATE CASCADE,
    nonce TEXT NOT NULL,
    armed INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    spent INTEGER,
    mac TEXT,
    uuid TEXT,
    cert TEXT,
    revoked INTEGER NOT NULL DEFAULT 0,
    alarm TEXT
);
"#,
    // 4: topology labels of nodes (the install waves' broadcast plan groups by them)
    r#"
ALTER TABLE nodes ADD COLUMN rack TEXT;
ALTER TABLE nodes ADD COLUMN switch TEXT;
"#,
];

/// The schema version this build writes.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

pub fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .context("reading the schema version")?;
    if current > VERSION {
        bail!("the inventory has schema version {current}, newer than this program's {VERSION}: upgrade si");
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction().context("starting a migration")?;
        tx.execute_batch(sql)
            .with_context(|| format!("migrating the inventory schema to version {}", i + 1))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .context("recording the schema version")?;
        tx.commit().context("committing a migration")?;
    }
    Ok(())
}
