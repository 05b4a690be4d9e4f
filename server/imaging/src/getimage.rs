//! Capturing into the store: `si-getimage` (from a golden client over the network) and
//! `commit` (from a local directory).

use anyhow::{bail, Context, Result};
use serde::Serialize;
use si_proto::frame::{read_frame, recv_bytes, recv_msg, write_msg, Frame};
use si_proto::handshake::{self, Credentials};
use si_proto::manifest::{Delta, Entry, Kind, Manifest, MAX_MANIFEST_BYTES};
use si_proto::msg::{self, Msg, Role, ScanStats};
use si_proto::stream::{BufStream, Counted};
use si_proto::Digest;
use si_store::{verify_object, Store, VersionMeta};
use si_tree::exclude::Excludes;
use si_tree::scan::{self, BlobSink, ScanConfig};
use si_trust::capture::{proof, Side};
use si_trust::ClientStream;
use std::collections::HashSet;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a capture did (printed at the end, and written as JSON with `--summary-json`).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub image: String,
    pub version: u32,
    pub entries: u64,
    pub files: u64,
    /// Logical bytes of the tree.
    pub bytes: u64,
    /// Files and bytes the golden client actually read (the rest came from its stat cache).
    pub files_read: u64,
    pub bytes_read: u64,
    /// Bytes received on the wire.
    pub bytes_sent: u64,
    /// The tree came as a manifest delta against the previous version (not whole).
    pub manifest_delta: bool,
    pub new_objects: u64,
    pub new_bytes: u64,
    pub seconds: f64,
}

impl Summary {
    pub fn print(&self) {
        eprintln!(
            "{}@{}: {} entries, {} files ({}), read {} files ({}), {} on the wire, {} new objects ({}), {:.1}s",
            self.image,
            self.version,
            self.entries,
            self.files,
            human(self.bytes),
            self.files_read,
            human(self.bytes_read),
            human(self.bytes_sent),
            self.new_objects,
            human(self.new_bytes),
            self.seconds
        );
    }
}

pub fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// The excludes a capture uses: the defaults (unless disabled) plus the extra ones.
pub fn capture_excludes(
    defaults: bool,
    extra: &[String],
    files: &[PathBuf],
) -> Result<Vec<String>> {
    let mut v = if defaults {
        si_tree::exclude::default_capture()
    } else {
        vec![]
    };
    v.extend(extra.iter().cloned());
    for f in files {
        v.extend(Excludes::from_file(f)?);
    }
    Excludes::new(&v)?;
    Ok(v)
}

pub struct GetImage {
    pub golden: String,
    pub token: String,
    pub image: String,
    pub excludes: Vec<String>,
    pub progress: bool,
    pub connect_timeout: Duration,
    /// Plain TCP with the token in the clear (the golden client must run `--insecure` too).
    pub insecure: bool,
    /// The master's certificate chain, presented to a golden client that pins the CA.
    pub master_cert: Option<si_trust::capture::Chain>,
}

fn progress_bar(show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    pb
}

/// Pulls a golden client's tree into the store as a new version of `cfg.image`, in stages:
/// prepare (the base: the newest version, if any) → connect → offer (the base's manifest
/// digest, else the objects the master has) → receive (objects into packs; the tree as a
/// manifest delta or whole) → rebuild (the delta applied and checked against the digest the
/// golden client named; on a mismatch the whole tree is asked for) → commit (the version
/// recorded, the golden client told).
pub fn get_image(store: &Store, cfg: &GetImage) -> Result<Summary> {
    let start = Instant::now();
    let mut prepared = prepare(store, cfg)?;
    // The base decodes on its thread while the connection and its TLS handshake are made.
    let connected = connect(cfg);
    let base = prepared.base()?;
    let mut session = connected?;
    let staged = (|| -> Result<(Rebuilt, Received)> {
        let offer = offer(&mut session, store, cfg, base.as_ref())?;
        let received = receive(&mut session, store, cfg.progress)?;
        let rebuilt = rebuild(&mut session, &offer, &received)?;
        Ok((rebuilt, received))
    })();
    let (rebuilt, received) = match staged {
        Ok(x) => x,
        Err(e) => {
            // Tell the golden client, so it does not keep a stat cache for a failed capture.
            let _ = write_msg(
                &mut session.conn,
                &Msg::Error {
                    kind: msg::ErrorKind::Internal,
                    message: format!("{e:#}"),
                },
            );
            let _ = session.conn.flush();
            return Err(e);
        }
    };
    let mut summary = record(store, cfg, &mut session, &rebuilt, &received)?;
    summary.seconds = start.elapsed().as_secs_f64();
    drop(prepared);
    Ok(summary)
}

/// What a capture starts from: the store locked for writing, and the newest version's
/// manifest being decoded on a thread of its own.
struct Prepared {
    _lock: si_store::StoreLock,
    decoding: Option<std::thread::JoinHandle<Option<Base>>>,
}

impl Prepared {
    /// The base, once decoded (None: no version yet, or one that is no base).
    fn base(&mut self) -> Result<Option<Base>> {
        match self.decoding.take() {
            None => Ok(None),
            Some(h) => h
                .join()
                .map_err(|_| anyhow::anyhow!("decoding the newest version's manifest panicked")),
        }
    }
}

/// The image's newest version, which the golden client may send a delta against.
struct Base {
    manifest: Manifest,
    digest: Digest,
}

/// Checks the name, takes the writer lock, reads the newest version's manifest (if any) and
/// starts decoding it. A version whose manifest does not decode to the digest its record names
/// is no base (a full capture needs none).
fn prepare(store: &Store, cfg: &GetImage) -> Result<Prepared> {
    si_store::valid_image_name(&cfg.image)?;
    let lock = store.writer_lock()?;
    let decoding = match store.resolve(&cfg.image, None) {
        Err(_) => None,
        Ok(v) => {
            let data = store.manifest_bytes(&cfg.image, v)?;
            let recorded = store.manifest_digest(&cfg.image, v)?;
            let image = cfg.image.clone();
            Some(std::thread::spawn(
                move || match Manifest::decode_with_digest(&data) {
                    Ok((manifest, digest)) if digest == recorded => Some(Base { manifest, digest }),
                    Ok(_) => {
                        tracing::warn!(%image, version = v, "the manifest does not have its recorded digest; capturing without a base");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(%image, version = v, error = %format!("{e:#}"), "the newest version's manifest does not decode; capturing without a base");
                        None
                    }
                },
            ))
        }
    };
    Ok(Prepared {
        _lock: lock,
        decoding,
    })
}

/// A connection to the golden client, past the handshake, counting what it receives.
struct Session {
    conn: BufStream<Counted<ClientStream>>,
    traffic: si_proto::stream::Traffic,
}

fn connect(cfg: &GetImage) -> Result<Session> {
    let addr = cfg
        .golden
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", cfg.golden))?
        .next()
        .with_context(|| format!("{} resolves to no address", cfg.golden))?;
    let stream = TcpStream::connect_timeout(&addr, cfg.connect_timeout)
        .with_context(|| format!("connecting to the golden client {addr}"))?;
    stream.set_nodelay(true).ok();
    // TLS, and each side proves it knows the token for this session (si_trust::capture);
    // under --insecure the token itself goes over plain TCP.
    let stream = if cfg.insecure {
        tracing::warn!(golden = %addr, "--insecure: capturing over plain TCP; the tree and the token cross the network in the clear");
        ClientStream::Plain(stream)
    } else {
        stream.set_read_timeout(Some(handshake::HELLO_TIMEOUT))?;
        let master = cfg
            .master_cert
            .as_ref()
            .map(|(chain, key)| (chain.clone(), key.clone_key()));
        let s = ClientStream::capture(stream, master)?;
        s.tcp().set_read_timeout(None)?;
        s
    };
    let binding = stream.binding()?;
    let counted = Counted::new(stream);
    let traffic = counted.traffic();
    let mut conn = BufStream::with_capacities(1 << 20, 64 << 10, counted);
    let token = match &binding {
        Some(b) => proof(&cfg.token, b, Side::Master),
        None => cfg.token.clone(),
    };
    let creds = Credentials {
        token,
        client: si_tree::fsutil::hostname(),
    };
    handshake::connect(&mut conn, Role::Capture, &creds)
        .context("handshake with the golden client")?;
    if let Some(b) = &binding {
        match recv_msg(&mut conn).context("reading the golden client's proof")? {
            Msg::CaptureProof(p)
                if handshake::ct_eq(
                    p.as_bytes(),
                    proof(&cfg.token, b, Side::Golden).as_bytes(),
                ) => {}
            Msg::CaptureProof(_) => {
                bail!("the golden client did not prove it knows the token: not the host the token came from")
            }
            m => bail!("expected the golden client's proof, got {}", m.name()),
        }
    }
    Ok(Session { conn, traffic })
}

/// What was agreed before the scan: the base both sides hold, if any.
struct Offer<'a> {
    base: Option<&'a Base>,
}

/// Starts the capture: offers the base's manifest digest; when the golden client does not
/// hold that manifest (or there is no base), sends the objects the store has of the newest
/// version instead.
fn offer<'a>(
    s: &mut Session,
    store: &Store,
    cfg: &GetImage,
    base: Option<&'a Base>,
) -> Result<Offer<'a>> {
    let conn = &mut s.conn;
    write_msg(
        conn,
        &Msg::CaptureStart {
            excludes: cfg.excludes.clone(),
        },
    )?;
    // A base whose objects are not all here cannot be relied on (the golden client would
    // send none of them).
    let base = base.filter(|b| b.manifest.digests().all(|c| store.contains(&c.digest)));
    let mut known = false;
    if let Some(b) = base {
        write_msg(conn, &Msg::CaptureBase { manifest: b.digest })?;
        conn.flush()?;
        known = match recv_msg(conn).context("asking the golden client for its base")? {
            Msg::BaseKnown(k) => k,
            m => bail!("unexpected {} from the golden client", m.name()),
        };
    }
    if !known {
        // What the previous version holds need not be sent again.
        let have: Vec<Digest> = match base {
            Some(b) => {
                let set: HashSet<Digest> = b.manifest.digests().map(|c| c.digest).collect();
                set.into_iter().collect()
            }
            None => Vec::new(),
        };
        for batch in have.chunks(msg::MAX_WANT) {
            write_msg(conn, &Msg::Have(batch.to_vec()))?;
        }
    }
    write_msg(conn, &Msg::HaveEnd)?;
    conn.flush()?;
    Ok(Offer {
        base: base.filter(|_| known),
    })
}

/// How the tree arrived.
enum Tree {
    /// Every entry (sorted here).
    Entries(Vec<Entry>),
    /// A delta from the base, and the manifest digest it must rebuild.
    Delta { delta: Delta, digest: Digest },
}

/// What the scan sent: its objects are in the store's packs by now.
struct Received {
    layout: Option<String>,
    tree: Tree,
    stats: ScanStats,
    new_objects: u64,
    new_bytes: u64,
}

/// Receives the scan: objects (verified on worker threads and written to packs), the layout,
/// and the tree, up to `ScanEnd`. Every pack is durable when it returns.
fn receive(s: &mut Session, store: &Store, progress: bool) -> Result<Received> {
    let pb = progress_bar(progress);
    let writer = Mutex::new(store.pack_writer()?);
    let mut layout = None;
    let verifiers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (tx, rx) = crossbeam_channel::bounded::<(Digest, u32, Vec<u8>)>(64);
    let conn = &mut s.conn;
    let scanned: Result<(Tree, ScanStats)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..verifiers)
            .map(|_| {
                let rx = rx.clone();
                let writer = &writer;
                sc.spawn(move || -> Result<()> {
                    for (d, raw, z) in rx {
                        verify_object(&d, raw, &z)?;
                        writer.lock().expect("pack writer").add(d, raw, &z)?;
                    }
                    Ok(())
                })
            })
            .collect();
        let res = read_scan(conn, |m, conn| {
            match m {
                Msg::Layout(l) => layout = (!l.is_empty()).then_some(l),
                Msg::Totals { bytes, .. } => pb.set_length(bytes),
                Msg::Progress { files, bytes } => {
                    pb.set_position(bytes);
                    pb.set_message(format!("{files} files"));
                }
                Msg::Blob { digest, raw_len } => {
                    let Some(Frame::Data(z)) = read_frame(conn)? else {
                        bail!("object {digest} announced but no data followed");
                    };
                    if tx.send((digest, raw_len, z)).is_err() {
                        bail!("object verification stopped");
                    }
                }
                other => bail!("unexpected {} from the golden client", other.name()),
            }
            Ok(())
        });
        drop(tx);
        let mut out = res;
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("verifier panicked")));
            if let (Ok(_), Err(e)) = (&out, r) {
                out = Err(e);
            }
        }
        out
    });
    let (tree, stats) = scanned?;
    pb.finish_and_clear();
    let (new_objects, new_bytes) = writer.into_inner().expect("pack writer").finish()?;
    Ok(Received {
        layout,
        tree,
        stats,
        new_objects,
        new_bytes,
    })
}

/// Reads the golden client's messages up to `ScanEnd`: the tree (entries, or a delta) is
/// gathered here, anything else goes to `other`.
fn read_scan<C: std::io::Read>(
    conn: &mut C,
    mut other: impl FnMut(Msg, &mut C) -> Result<()>,
) -> Result<(Tree, ScanStats)> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut delta = None;
    loop {
        let f = read_frame(conn).context("receiving from the golden client")?;
        match f {
            Some(Frame::Msg(Msg::Entries(es))) => entries.extend(es),
            Some(Frame::Msg(Msg::MoreChunks(more))) => {
                if more.len() > msg::MAX_CHUNKS_PER_MSG {
                    bail!("MoreChunks of {} chunks is too large", more.len());
                }
                match entries.last_mut().map(|e| &mut e.kind) {
                    Some(Kind::File { chunks, .. }) => chunks.extend(more),
                    _ => bail!("MoreChunks does not follow a file entry"),
                }
            }
            Some(Frame::Msg(Msg::CaptureDelta { digest, bytes })) => {
                let data = recv_bytes(conn, bytes, MAX_MANIFEST_BYTES)
                    .context("receiving the manifest delta")?;
                let d = Delta::decode(&data).context("decoding the manifest delta")?;
                delta = Some(Tree::Delta { delta: d, digest });
            }
            Some(Frame::Msg(Msg::ScanEnd { stats })) => {
                let tree = match delta {
                    Some(d) if entries.is_empty() => d,
                    Some(_) => bail!("the golden client sent both a delta and entries"),
                    None => {
                        entries.sort_by(|a, b| a.path.cmp(&b.path));
                        Tree::Entries(entries)
                    }
                };
                return Ok((tree, stats));
            }
            Some(Frame::Msg(Msg::Error { message, .. })) => {
                bail!("golden client failed: {message}")
            }
            Some(Frame::Msg(m)) => other(m, conn)?,
            Some(Frame::Data(_)) => bail!("unexpected data frame from the golden client"),
            None => bail!("the golden client closed the connection before the end of the scan"),
        }
    }
}

/// The captured manifest: the entries as sent, or the delta applied to the base and checked
/// against the digest the golden client named. When the delta does not rebuild that manifest,
/// the golden client is asked for the whole tree (`SendEntries`).
fn rebuild(s: &mut Session, offer: &Offer, received: &Received) -> Result<Rebuilt> {
    let whole = |entries| Rebuilt {
        manifest: Manifest { entries },
        via_delta: false,
    };
    let (delta, digest) = match &received.tree {
        Tree::Entries(entries) => return Ok(whole(entries.clone())),
        Tree::Delta { delta, digest } => (delta, digest),
    };
    let Some(base) = offer.base else {
        bail!("the golden client sent a delta though no base was agreed");
    };
    match delta.apply(&base.manifest) {
        Ok(m) if m.digest() == *digest => {
            return Ok(Rebuilt {
                manifest: m,
                via_delta: true,
            })
        }
        Ok(_) => tracing::warn!("the manifest delta does not rebuild the digest the golden client named; asking for the whole tree"),
        Err(e) => tracing::warn!(error = %e, "the manifest delta does not apply; asking for the whole tree"),
    }
    write_msg(&mut s.conn, &Msg::SendEntries)?;
    s.conn.flush()?;
    match read_scan(&mut s.conn, |m, _| {
        bail!("unexpected {} from the golden client", m.name())
    })? {
        (Tree::Entries(entries), _) => Ok(whole(entries)),
        (Tree::Delta { .. }, _) => bail!("the golden client sent a delta where entries were due"),
    }
}

/// The captured manifest, and whether the delta built it.
struct Rebuilt {
    manifest: Manifest,
    via_delta: bool,
}

/// Records the version and tells the golden client (which then keeps its stat cache and the
/// manifest, the base of the next capture).
fn record(
    store: &Store,
    cfg: &GetImage,
    s: &mut Session,
    rebuilt: &Rebuilt,
    received: &Received,
) -> Result<Summary> {
    let meta = VersionMeta {
        source: format!("golden:{}", cfg.golden),
        excludes: cfg.excludes.clone(),
        ..Default::default()
    };
    let meta = store
        .record_version(
            &cfg.image,
            &rebuilt.manifest,
            meta,
            received.layout.as_deref(),
        )
        .context("recording the captured version")?;
    write_msg(&mut s.conn, &Msg::Bye)?;
    s.conn.flush()?;
    Ok(Summary {
        image: cfg.image.clone(),
        version: meta.version,
        entries: meta.entries,
        files: meta.files,
        bytes: meta.bytes,
        files_read: received.stats.files_read,
        bytes_read: received.stats.bytes_read,
        bytes_sent: s.traffic.read(),
        manifest_delta: rebuilt.via_delta,
        new_objects: received.new_objects,
        new_bytes: received.new_bytes,
        seconds: 0.0,
    })
}

struct StoreSink<'a, 'b> {
    writer: &'b mut si_store::PackWriter<'a>,
}

impl BlobSink for StoreSink<'_, '_> {
    fn blob(&mut self, digest: Digest, raw_len: u32, zdata: Vec<u8>) -> Result<()> {
        self.writer.add(digest, raw_len, &zdata)?;
        Ok(())
    }
}

/// Records the tree at `dir` as a new version of `image`, storing only new objects. The disk
/// layout of the previous version, if any, carries over.
pub fn commit(
    store: &Store,
    dir: &Path,
    image: &str,
    excludes: &[String],
    message: Option<String>,
) -> Result<Summary> {
    commit_with_layout(store, dir, image, excludes, message, None)
}

/// [`commit`], with the new version's disk layout (TOML, checked by
/// `si_proto::layout::Layout::parse`) instead of the previous version's.
pub fn commit_with_layout(
    store: &Store,
    dir: &Path,
    image: &str,
    excludes: &[String],
    message: Option<String>,
    layout: Option<&str>,
) -> Result<Summary> {
    si_store::valid_image_name(image)?;
    if let Some(l) = layout {
        si_proto::layout::Layout::parse(l)
            .map_err(|e| anyhow::anyhow!("the disk layout is not valid: {e}"))?;
    }
    let _lock = store.writer_lock()?;
    let start = Instant::now();
    let mut cfg = ScanConfig::new(dir);
    cfg.excludes = Excludes::new(excludes)?;
    let have: HashSet<Digest> = store.all_digests();
    let mut writer = store.pack_writer()?;
    let res = scan::scan(
        &cfg,
        &have,
        &mut StoreSink {
            writer: &mut writer,
        },
    )?;
    let (new_objects, new_bytes) = writer.finish()?;
    let layout = match (layout, store.resolve(image, None)) {
        (Some(l), _) => Some(l.to_string()),
        (None, Ok(v)) => store.layout(image, v)?,
        (None, Err(_)) => None,
    };
    let meta = VersionMeta {
        source: format!("commit:{}", dir.display()),
        excludes: excludes.to_vec(),
        message,
        ..Default::default()
    };
    let meta = store.record_version(image, &res.manifest, meta, layout.as_deref())?;
    Ok(Summary {
        image: image.to_string(),
        version: meta.version,
        entries: meta.entries,
        files: meta.files,
        bytes: meta.bytes,
        files_read: res.stats.files_read,
        bytes_read: res.stats.bytes_read,
        bytes_sent: 0,
        manifest_delta: false,
        new_objects,
        new_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}
