//! The DHCP lease book: every lease in memory, every change appended to a journal, the
//! journal folded into the inventory's `leases` table five times a second.
//!
//! This is how ISC dhcpd (`dhcpd.leases`) and Kea (memfile) keep leases, and for the same
//! reason: a DHCPACK may go out only once its lease is durable (RFC 2131 4.3.2), and an append
//! of one line is far cheaper than a database commit. Here a burst of requests costs one
//! `write(2)` of its records; SQLite gets the leases in one transaction per fold, off the
//! packet path, and stays the place every other reader (the CLI, exports) finds them.
//!
//! ```text
//! inventory.db-leases.lock   flock: one lease book (one DHCP server process) per inventory
//! inventory.db-leases.<n>    journal segments, oldest first
//! ```
//!
//! A segment is `"SILJ"`, a format version (u32 LE), then records: body length (u32 LE), body
//! (bincode of [`Op`]), the first 8 bytes of the body's BLAKE3. Every op is absolute (the
//! whole lease, or its removal), so replaying a segment twice is harmless. A fold rotates to a
//! new segment, applies the old one's ops in one transaction and then deletes it; on start,
//! whatever segments remain (a crash, a kill) are applied before anything is served. Only the
//! tail of a segment can be torn (appends are sequential): replay stops there, with a warning.
//!
//! Durability is that of the inventory itself (WAL, `synchronous = NORMAL`): a written record
//! survives the process dying, and is on disk at the next fold's checkpoint.

use super::{put_lease_tx, Lease};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tracing::warn;

const MAGIC: &[u8; 4] = b"SILJ";
const FORMAT: u32 = 1;
/// Bytes of a segment's header: magic and format.
const HEADER_LEN: u64 = 8;
/// Largest record body written or read (a lease is ~60 bytes).
const MAX_RECORD: usize = 4096;
/// Ops written but not yet folded beyond which new leases are refused (the inventory has been
/// unwritable for a long time; memory must not grow without bound).
const MAX_PENDING: usize = 1 << 20;
/// How often the journal is folded into the inventory.
const FOLD_EVERY: Duration = Duration::from_millis(200);

/// One change to the lease table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Op {
    /// The whole lease (replacing any other lease on its address), changed at `at`.
    Put { lease: Lease, at: i64 },
    /// `mac` has no lease.
    Drop { mac: String },
}

/// Applies `ops` to the `leases` table (inside the caller's transaction).
fn apply_sql(tx: &rusqlite::Connection, ops: &[Op]) -> Result<()> {
    for op in ops {
        match op {
            Op::Put { lease, at } => put_lease_tx(tx, lease, *at)?,
            Op::Drop { mac } => {
                tx.prepare_cached("DELETE FROM leases WHERE mac = ?1")
                    .and_then(|mut st| st.execute([mac]))
                    .context("deleting a lease")?;
            }
        }
    }
    Ok(())
}

/// Leases by MAC and by address: the book's memory, and what readers lay the journal on.
#[derive(Default)]
struct Table {
    by_mac: HashMap<String, Lease>,
    by_ip: HashMap<Ipv4Addr, String>,
}

impl Table {
    fn of(leases: Vec<Lease>) -> Table {
        let mut t = Table::default();
        for l in leases {
            t.set(&l.mac.clone(), Some(l));
        }
        t
    }

    /// Sets `mac`'s lease (`None`: removes it); returns what it had.
    fn set(&mut self, mac: &str, lease: Option<Lease>) -> Option<Lease> {
        let old = self.by_mac.remove(mac);
        if let Some(o) = &old {
            if self.by_ip.get(&o.ip).is_some_and(|m| m == mac) {
                self.by_ip.remove(&o.ip);
            }
        }
        if let Some(l) = lease {
            self.by_ip.insert(l.ip, mac.to_string());
            self.by_mac.insert(mac.to_string(), l);
        }
        old
    }

    /// Applies `op` as the table in SQL does ([`put_lease_tx`]: a put also drops another
    /// MAC's lease on the address), pushing each (MAC, lease it had) it replaces to `undo`.
    fn apply(&mut self, op: &Op, undo: &mut Vec<(String, Option<Lease>)>) {
        match op {
            Op::Put { lease, .. } => {
                if let Some(other) = self.by_ip.get(&lease.ip).filter(|m| **m != lease.mac) {
                    let other = other.clone();
                    let had = self.set(&other, None);
                    undo.push((other, had));
                }
                let had = self.set(&lease.mac, Some(lease.clone()));
                undo.push((lease.mac.clone(), had));
            }
            Op::Drop { mac } => {
                let had = self.set(mac, None);
                undo.push((mac.clone(), had));
            }
        }
    }
}

fn encode_record(op: &Op, out: &mut Vec<u8>) -> Result<()> {
    let body = bincode::serde::encode_to_vec(op, bincode::config::standard())
        .context("encoding a lease record")?;
    if body.len() > MAX_RECORD {
        bail!("lease record of {} bytes is too large", body.len());
    }
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&blake3::hash(&body).as_bytes()[..8]);
    Ok(())
}

/// The segment files of the journal of `db`, oldest first.
fn segments(db: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = format!(
        "{}-leases.",
        db.file_name().unwrap_or_default().to_string_lossy()
    );
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let name = e.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        v.push((seq, e.path()));
    }
    v.sort();
    Ok(v)
}

fn segment_path(db: &Path, seq: u64) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(format!("-leases.{seq}"));
    PathBuf::from(s)
}

/// The ops of one segment. A torn or damaged tail ends the segment with a warning; a file
/// that is not a journal segment at all is an error.
fn read_segment(path: &Path) -> Result<Vec<Op>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = BufReader::new(f);
    let mut head = [0u8; HEADER_LEN as usize];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        // Created and never written to (a crash right after a rotation).
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    if &head[..4] != MAGIC {
        bail!("{} is not a lease journal segment", path.display());
    }
    let format = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    if format != FORMAT {
        bail!(
            "{} is lease journal format {format}; this program reads format {FORMAT}",
            path.display()
        );
    }
    let mut ops = Vec::new();
    let mut body = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(ops),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let len = u32::from_le_bytes(len) as usize;
        let torn = |why: &str| {
            warn!(
                segment = %path.display(),
                records = ops.len(),
                "lease journal ends in a {why} record (torn by a crash?): the records before it are kept"
            );
        };
        if len > MAX_RECORD {
            torn("oversized");
            return Ok(ops);
        }
        body.resize(len + 8, 0);
        match r.read_exact(&mut body) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                torn("truncated");
                return Ok(ops);
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let (data, sum) = body.split_at(len);
        if &blake3::hash(data).as_bytes()[..8] != sum {
            torn("damaged");
            return Ok(ops);
        }
        let decoded = bincode::serde::decode_from_slice::<Op, _>(
            data,
            bincode::config::standard().with_limit::<MAX_RECORD>(),
        );
        match decoded {
            Ok((op, used)) if used == len => ops.push(op),
            _ => {
                torn("undecodable");
                return Ok(ops);
            }
        }
    }
}

fn create_segment(db: &Path, seq: u64) -> Result<File> {
    let path = segment_path(db, seq);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating lease journal {}", path.display()))?;
    let mut head = MAGIC.to_vec();
    head.extend_from_slice(&FORMAT.to_le_bytes());
    f.write_all(&head)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(f)
}

/// The journal's changes not yet folded, for readers that want every lease as it is: read
/// the journal first, then the table, and lay the one on the other
/// ([`apply`](Self::apply)). A fold may commit between the two reads, which at worst shows
/// a lease changed in that instant as it was just before.
pub(super) struct Unfolded(Vec<Op>);

/// Reads the unfolded journal of `db` (without the lock: only appends and whole-file
/// deletions happen to it).
pub(super) fn overlay_reader(db: &Path) -> Result<Unfolded> {
    let mut ops = Vec::new();
    for (_, path) in segments(db)? {
        match read_segment(&path) {
            Ok(o) => ops.extend(o),
            // Folded and deleted between listing and opening.
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Unfolded(ops))
}

impl Unfolded {
    /// `table` with these changes on top, by address.
    pub(super) fn apply(self, table: Vec<Lease>) -> Vec<Lease> {
        let mut t = Table::of(table);
        for op in &self.0 {
            t.apply(op, &mut Vec::new());
        }
        let mut v: Vec<Lease> = t.by_mac.into_values().collect();
        v.sort_by_key(|l| l.ip);
        v
    }
}

struct Book {
    table: Table,
    /// The segment records are appended to, its number and its length.
    seg: File,
    seq: u64,
    seg_len: u64,
    /// Records of changes made since the last commit, and the memory they replaced.
    staged: Vec<u8>,
    staged_ops: Vec<Op>,
    undo: Vec<(String, Option<Lease>)>,
    /// Written to the journal, not yet folded; and the segments holding them.
    pending: Vec<Op>,
    pending_segs: Vec<u64>,
}

impl Book {
    /// Stages `op` and applies it to memory.
    fn change(&mut self, op: Op) -> Result<()> {
        encode_record(&op, &mut self.staged)?;
        self.table.apply(&op, &mut self.undo);
        self.staged_ops.push(op);
        Ok(())
    }

    /// Puts the memory back as it was before the staged changes.
    fn rollback(&mut self) {
        while let Some((mac, had)) = self.undo.pop() {
            self.table.set(&mac, had);
        }
        self.staged.clear();
        self.staged_ops.clear();
    }

    /// Appends from now on to a new segment, the next in number; returns its number.
    fn rotate(&mut self, db: &Path) -> Result<u64> {
        let seq = self.seq + 1;
        self.seg = create_segment(db, seq)?;
        self.seq = seq;
        self.seg_len = HEADER_LEN;
        Ok(seq)
    }
}

/// What folds hold: their connection, and ops taken from the book that a failed fold left
/// (with the segments they came from) for the next one.
struct Folder {
    conn: rusqlite::Connection,
    retry: Option<(Vec<Op>, Vec<u64>)>,
}

struct Shared {
    book: Mutex<Book>,
    /// Held for a whole fold: folds apply ops in the order they were written.
    folder: Mutex<Folder>,
    db: PathBuf,
    stop: AtomicBool,
    fold_every: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The DHCP server's leases (see the module documentation). One per inventory: the lock file
/// keeps a second process from keeping leases of its own.
pub struct LeaseBook {
    shared: Arc<Shared>,
    folder: Option<std::thread::JoinHandle<()>>,
    _lock: File,
}

impl std::fmt::Debug for LeaseBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseBook")
            .field("db", &self.shared.db)
            .finish()
    }
}

/// A connection of the lease book's own (the fold thread's, and the one start-up uses).
fn connect(db: &Path) -> Result<rusqlite::Connection> {
    let c = rusqlite::Connection::open(db)
        .with_context(|| format!("opening {} for the lease journal", db.display()))?;
    c.busy_timeout(Duration::from_secs(10))?;
    c.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(c)
}

/// Applies `ops` in one transaction.
fn fold_into(conn: &mut rusqlite::Connection, ops: &[Op]) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .context("starting a lease fold")?;
    apply_sql(&tx, ops)?;
    tx.commit().context("committing a lease fold")
}

impl LeaseBook {
    /// Takes the book of the inventory at `db`: folds any journal left by an earlier run,
    /// loads every lease and starts folding.
    pub(super) fn open(db: &Path) -> Result<LeaseBook> {
        Self::open_folding_every(db, FOLD_EVERY)
    }

    fn open_folding_every(db: &Path, fold_every: Duration) -> Result<LeaseBook> {
        let lock_path = {
            let mut s = db.as_os_str().to_owned();
            s.push("-leases.lock");
            PathBuf::from(s)
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            bail!(
                "another process keeps the DHCP leases of {} (it holds {}): run one DHCP server per inventory",
                db.display(),
                lock_path.display()
            );
        }
        let mut conn = connect(db)?;
        let old = segments(db)?;
        let mut ops = Vec::new();
        for (_, path) in &old {
            ops.extend(read_segment(path)?);
        }
        fold_into(&mut conn, &ops).context("folding the lease journal of an earlier run")?;
        for (_, path) in &old {
            std::fs::remove_file(path)
                .with_context(|| format!("removing folded {}", path.display()))?;
        }
        let leases = super::all_leases(&conn)?;
        let seq = old.last().map_or(1, |(s, _)| s + 1);
        let seg = create_segment(db, seq)?;
        let shared = Arc::new(Shared {
            book: Mutex::new(Book {
                table: Table::of(leases),
                seg,
                seq,
                seg_len: HEADER_LEN,
                staged: Vec::new(),
                staged_ops: Vec::new(),
                undo: Vec::new(),
                pending: Vec::new(),
                pending_segs: vec![seq],
            }),
            folder: Mutex::new(Folder { conn, retry: None }),
            db: db.to_path_buf(),
            stop: AtomicBool::new(false),
            fold_every,
        });
        let folder = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("si-lease-fold".into())
                .spawn(move || fold_loop(&shared))
                .context("starting the lease fold thread")?
        };
        Ok(LeaseBook {
            shared,
            folder: Some(folder),
            _lock: lock,
        })
    }

    /// The lease of `mac`.
    pub fn get(&self, mac: &str) -> Option<Lease> {
        self.shared.lock().table.by_mac.get(mac).cloned()
    }

    /// Whether a lease of someone other than `mac` holds `ip` at `now`.
    pub fn held_by_other(&self, ip: Ipv4Addr, mac: &str, now: i64) -> bool {
        let b = self.shared.lock();
        let t = &b.table;
        t.by_ip.get(&ip).is_some_and(|m| {
            m != mac
                && t.by_mac
                    .get(m)
                    .is_some_and(|l| l.expires.is_none_or(|e| e > now))
        })
    }

    /// Records `l` (replacing the MAC's previous lease and any other lease on the address).
    /// Takes effect in memory at once; durable at the next [`commit`](Self::commit).
    pub fn put(&self, l: Lease) -> Result<()> {
        self.shared.lock().change(Op::Put {
            lease: l,
            at: super::now(),
        })
    }

    /// Ends the lease of `mac` at `now` (DHCPRELEASE); the address stays remembered for it.
    pub fn release(&self, mac: &str, now: i64) -> Result<()> {
        let mut b = self.shared.lock();
        let Some(mut l) = b.table.by_mac.get(mac).cloned() else {
            return Ok(());
        };
        l.state = "released".into();
        l.expires = Some(now);
        b.change(Op::Put { lease: l, at: now })
    }

    /// Forgets the lease of `mac`.
    pub fn remove(&self, mac: &str) -> Result<()> {
        let mut b = self.shared.lock();
        if !b.table.by_mac.contains_key(mac) {
            return Ok(());
        }
        b.change(Op::Drop {
            mac: mac.to_string(),
        })
    }

    /// Makes the changes since the last commit durable: one append to the journal. If it
    /// fails (a full disk), they are undone in memory too and the error says so: the caller
    /// must not promise them (no DHCPACK).
    pub fn commit(&self) -> Result<()> {
        let mut guard = self.shared.lock();
        let b = &mut *guard;
        if b.staged.is_empty() {
            b.undo.clear();
            return Ok(());
        }
        if b.pending.len() >= MAX_PENDING {
            b.rollback();
            bail!(
                "{} lease changes are waiting to be folded into the inventory (is it writable?): refusing more",
                b.pending.len()
            );
        }
        if let Err(e) = b.seg.write_all(&b.staged) {
            b.rollback();
            // A partial record would end the segment for replay: cut it off, or move on to
            // a new segment if even that fails.
            if b.seg.set_len(b.seg_len).is_err() {
                match b.rotate(&self.shared.db) {
                    Ok(seq) => b.pending_segs.push(seq),
                    Err(e2) => warn!(
                        error = format!("{e2:#}"),
                        "cannot start a new lease journal segment"
                    ),
                }
            }
            return Err(e).context("appending to the lease journal");
        }
        b.seg_len += b.staged.len() as u64;
        b.staged.clear();
        b.undo.clear();
        let ops = std::mem::take(&mut b.staged_ops);
        b.pending.extend(ops);
        Ok(())
    }

    /// Folds everything committed so far into the inventory now (tests, and shutdown).
    pub fn flush(&self) -> Result<()> {
        fold_once(&self.shared)
    }

    /// Makes the next journal append fail as on a full disk.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn break_journal(&self) {
        self.shared.lock().seg = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
    }
}

impl Drop for LeaseBook {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.folder.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        // Everything folded: the empty segment is not left behind.
        let b = self.shared.lock();
        if b.pending.is_empty() && b.seg_len == HEADER_LEN && b.pending_segs == [b.seq] {
            let _ = std::fs::remove_file(segment_path(&self.shared.db, b.seq));
        }
    }
}

/// One fold: the ops committed since the last one go into the inventory, their segments are
/// deleted. A failed fold keeps its ops and segments for the next attempt.
fn fold_once(shared: &Shared) -> Result<()> {
    let mut folder = shared.folder.lock().unwrap_or_else(|e| e.into_inner());
    let Folder { conn, retry } = &mut *folder;
    loop {
        let (ops, segs) = match retry.take() {
            Some(r) => r,
            None => {
                let mut b = shared.lock();
                if b.pending.is_empty() {
                    return Ok(());
                }
                let seq = b.rotate(&shared.db)?;
                let segs = std::mem::replace(&mut b.pending_segs, vec![seq]);
                (std::mem::take(&mut b.pending), segs)
            }
        };
        if let Err(e) = fold_into(conn, &ops) {
            *retry = Some((ops, segs));
            return Err(e);
        }
        for s in segs {
            let p = segment_path(&shared.db, s);
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(segment = %p.display(), error = %e, "cannot remove a folded lease journal segment");
                }
            }
        }
    }
}

fn fold_loop(shared: &Shared) {
    let mut failing = false;
    let mut next = std::time::Instant::now() + shared.fold_every;
    loop {
        let stopping = shared.stop.load(Ordering::Relaxed);
        if !stopping {
            let now = std::time::Instant::now();
            if now < next {
                std::thread::park_timeout(next - now);
                continue;
            }
            next = now + shared.fold_every;
        }
        match fold_once(shared) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                warn!(error = format!("{e:#}"), "cannot fold the lease journal into the inventory (will retry; leases stay in the journal)");
                failing = true;
            }
            Err(_) => {}
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
