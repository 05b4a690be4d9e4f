//! Capturing into the store: `si-getimage` (from a golden client over the network) and
//! `commit` (from a local directory).

use anyhow::{bail, Context, Result};
use serde::Serialize;
use si_proto::frame::{read_frame, write_msg, Frame};
use si_proto::handshake::{self, Credentials};
use si_proto::manifest::{Entry, Kind, Manifest};
use si_proto::msg::{self, Msg, Role};
use si_proto::stream::{BufStream, Counted};
use si_proto::Digest;
use si_store::{verify_object, Store, VersionMeta};
use si_tree::exclude::Excludes;
use si_tree::scan::{self, BlobSink, ScanConfig};
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

/// Pulls a golden client's tree into the store as a new version of `cfg.image`.
pub fn get_image(store: &Store, cfg: &GetImage) -> Result<Summary> {
    si_store::valid_image_name(&cfg.image)?;
    let _lock = store.writer_lock()?;
    let start = Instant::now();
    let addr = cfg
        .golden
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", cfg.golden))?
        .next()
        .with_context(|| format!("{} resolves to no address", cfg.golden))?;
    let stream = TcpStream::connect_timeout(&addr, cfg.connect_timeout)
        .with_context(|| format!("connecting to the golden client {addr}"))?;
    stream.set_nodelay(true).ok();
    let counted = Counted::new(stream);
    let traffic = counted.traffic();
    let mut conn = BufStream::with_capacities(1 << 20, 64 << 10, counted);
    let creds = Credentials {
        token: cfg.token.clone(),
        client: si_tree::fsutil::hostname(),
    };
    handshake::connect(&mut conn, Role::Capture, &creds)
        .context("handshake with the golden client")?;
    // What the previous version holds need not be sent again.
    let mut have: Vec<Digest> = Vec::new();
    if let Ok(v) = store.resolve(&cfg.image, None) {
        let m = store.manifest(&cfg.image, v)?;
        let set: HashSet<Digest> = m.digests().map(|c| c.digest).collect();
        have = set.into_iter().filter(|d| store.contains(d)).collect();
    }
    write_msg(
        &mut conn,
        &Msg::CaptureStart {
            excludes: cfg.excludes.clone(),
        },
    )?;
    for batch in have.chunks(msg::MAX_WANT) {
        write_msg(&mut conn, &Msg::Have(batch.to_vec()))?;
    }
    write_msg(&mut conn, &Msg::HaveEnd)?;
    conn.flush()?;

    let pb = progress_bar(cfg.progress);
    let writer = Mutex::new(store.pack_writer()?);
    let mut entries: Vec<Entry> = Vec::new();
    let mut layout = None;
    let mut stats = None;
    let verifiers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (tx, rx) = crossbeam_channel::bounded::<(Digest, u32, Vec<u8>)>(64);
    let recv_result: Result<()> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..verifiers)
            .map(|_| {
                let rx = rx.clone();
                let writer = &writer;
                s.spawn(move || -> Result<()> {
                    for (d, raw, z) in rx {
                        verify_object(&d, raw, &z)?;
                        writer.lock().expect("pack writer").add(d, raw, &z)?;
                    }
                    Ok(())
                })
            })
            .collect();
        let res = (|| -> Result<()> {
            loop {
                let f = read_frame(&mut conn).context("receiving from the golden client")?;
                match f {
                    Some(Frame::Msg(Msg::Layout(l))) => layout = (!l.is_empty()).then_some(l),
                    Some(Frame::Msg(Msg::Totals { bytes, .. })) => pb.set_length(bytes),
                    Some(Frame::Msg(Msg::Progress { files, bytes })) => {
                        pb.set_position(bytes);
                        pb.set_message(format!("{files} files"));
                    }
                    Some(Frame::Msg(Msg::Blob { digest, raw_len })) => {
                        let Some(Frame::Data(z)) = read_frame(&mut conn)? else {
                            bail!("object {digest} announced but no data followed");
                        };
                        if tx.send((digest, raw_len, z)).is_err() {
                            bail!("object verification stopped");
                        }
                    }
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
                    Some(Frame::Msg(Msg::ScanEnd { stats: st })) => {
                        stats = Some(st);
                        return Ok(());
                    }
                    Some(Frame::Msg(Msg::Error { message, .. })) => {
                        bail!("golden client failed: {message}")
                    }
                    Some(Frame::Msg(other)) => {
                        bail!("unexpected {} from the golden client", other.name())
                    }
                    Some(Frame::Data(_)) => bail!("unexpected data frame from the golden client"),
                    None => {
                        bail!("the golden client closed the connection before the end of the scan")
                    }
                }
            }
        })();
        drop(tx);
        let mut out = res;
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("verifier panicked")));
            if out.is_ok() {
                out = r;
            }
        }
        out
    });
    if let Err(e) = recv_result {
        let _ = write_msg(
            &mut conn,
            &Msg::Error {
                kind: msg::ErrorKind::Internal,
                message: format!("{e:#}"),
            },
        );
        let _ = conn.flush();
        return Err(e);
    }
    pb.finish_and_clear();
    let (new_objects, new_bytes) = writer.into_inner().expect("pack writer").finish()?;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let manifest = Manifest { entries };
    let stats = stats.expect("set at ScanEnd");
    let meta = VersionMeta {
        source: format!("golden:{}", cfg.golden),
        excludes: cfg.excludes.clone(),
        ..Default::default()
    };
    let meta = store
        .record_version(&cfg.image, &manifest, meta, layout.as_deref())
        .context("recording the captured version")?;
    write_msg(&mut conn, &Msg::Bye)?;
    conn.flush()?;
    Ok(Summary {
        image: cfg.image.clone(),
        version: meta.version,
        entries: meta.entries,
        files: meta.files,
        bytes: meta.bytes,
        files_read: stats.files_read,
        bytes_read: stats.bytes_read,
        bytes_sent: traffic.read(),
        new_objects,
        new_bytes,
        seconds: start.elapsed().as_secs_f64(),
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
        new_objects,
        new_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}
