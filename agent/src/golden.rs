//! `si-prepareclient`: the golden client's side of a capture.
//!
//! It listens on one address, accepts a connection from the named master only, requires the
//! one-time token it printed, serves exactly one capture (protocol in `si_proto::msg`) and
//! exits; with no capture before the timeout it exits with an error. The stat cache is saved
//! only after the master confirms (`Bye`) that the image is durably recorded.

use anyhow::{bail, Context, Result};
use si_proto::frame::{self, recv_msg, write_data, write_msg};
use si_proto::handshake::{self, Policy};
use si_proto::manifest::{Entry, Kind};
use si_proto::msg::{self, Msg, Role, ScanStats};
use si_proto::stream::BufStream;
use si_proto::Digest;
use si_tree::exclude::Excludes;
use si_tree::scan::{self, BlobSink, ScanConfig};
use std::collections::HashSet;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct ServeConfig {
    pub listen: SocketAddr,
    /// The only peer address accepted.
    pub master: IpAddr,
    pub token: String,
    pub root: PathBuf,
    /// The disk layout (TOML) to hand to the master.
    pub layout: Option<String>,
    /// Where the stat cache lives.
    pub state_dir: PathBuf,
    pub timeout: Duration,
}

/// Largest encoded size of one `Entries` batch.
const BATCH_BYTES: usize = 4 << 20;

fn approx_size(e: &Entry) -> usize {
    let k = match &e.kind {
        Kind::File { chunks, .. } => chunks.len() * 48,
        Kind::Symlink { target } | Kind::Hardlink { target } => target.len(),
        _ => 0,
    };
    64 + e.path.len()
        + k
        + e.xattrs
            .iter()
            .map(|x| x.name.len() + x.value.len() + 8)
            .sum::<usize>()
}

struct NetSink<W: Write> {
    w: W,
}

impl<W: Write> BlobSink for NetSink<W> {
    fn blob(&mut self, digest: Digest, raw_len: u32, zdata: Vec<u8>) -> Result<()> {
        write_msg(&mut self.w, &Msg::Blob { digest, raw_len })?;
        write_data(&mut self.w, &zdata)?;
        Ok(())
    }
    fn totals(&mut self, files: u64, bytes: u64) -> Result<()> {
        write_msg(&mut self.w, &Msg::Totals { files, bytes })?;
        Ok(())
    }
    fn progress(&mut self, files: u64, bytes: u64) -> Result<()> {
        write_msg(&mut self.w, &Msg::Progress { files, bytes })?;
        Ok(())
    }
}

/// Sends the tree as `Entries` batches of about [`BATCH_BYTES`]; a file whose chunk list alone
/// is larger goes out with its first chunks, the rest following in `MoreChunks` messages.
fn send_entries<W: Write>(w: &mut W, entries: Vec<Entry>) -> Result<()> {
    let mut batch = Vec::new();
    let mut size = 0;
    for mut e in entries {
        let mut rest = Vec::new();
        if let Kind::File { chunks, .. } = &mut e.kind {
            if chunks.len() > msg::MAX_CHUNKS_PER_MSG {
                rest = chunks.split_off(msg::MAX_CHUNKS_PER_MSG);
            }
        }
        size += approx_size(&e);
        batch.push(e);
        if size >= BATCH_BYTES || !rest.is_empty() {
            write_msg(w, &Msg::Entries(std::mem::take(&mut batch)))?;
            size = 0;
        }
        for part in rest.chunks(msg::MAX_CHUNKS_PER_MSG) {
            write_msg(w, &Msg::MoreChunks(part.to_vec()))?;
        }
    }
    if !batch.is_empty() {
        write_msg(w, &Msg::Entries(batch))?;
    }
    Ok(())
}

/// Waits for the master, serves one capture, returns its statistics.
pub fn serve_once(cfg: &ServeConfig) -> Result<ScanStats> {
    let listener =
        TcpListener::bind(cfg.listen).with_context(|| format!("listening on {}", cfg.listen))?;
    serve_on(listener, cfg)
}

/// [`serve_once`] on a listener the caller has bound (`cfg.listen` is not used).
pub fn serve_on(listener: TcpListener, cfg: &ServeConfig) -> Result<ScanStats> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + cfg.timeout;
    loop {
        if Instant::now() >= deadline {
            bail!(
                "no capture from {} within {:?}; exiting",
                cfg.master,
                cfg.timeout
            );
        }
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(e).context("accepting a connection"),
        };
        if peer.ip() != cfg.master {
            tracing::warn!(%peer, master = %cfg.master, "refused a connection: only the master may capture");
            continue;
        }
        stream.set_nonblocking(false)?;
        match handshake(&stream, cfg) {
            Ok(()) => return capture(stream, cfg),
            Err(e) => tracing::warn!(%peer, error = format!("{e:#}"), "refused a connection"),
        }
    }
}

fn handshake(stream: &TcpStream, cfg: &ServeConfig) -> Result<()> {
    stream.set_read_timeout(Some(handshake::HELLO_TIMEOUT))?;
    let policy = Policy {
        roles: vec![Role::Capture],
        token: Some(cfg.token.clone()),
        server: si_tree::fsutil::hostname(),
    };
    handshake::accept(&mut &*stream, &policy)?;
    stream.set_read_timeout(None)?;
    Ok(())
}

fn capture(stream: TcpStream, cfg: &ServeConfig) -> Result<ScanStats> {
    stream.set_nodelay(true).ok();
    let mut r = BufStream::with_capacities(64 << 10, 1 << 20, stream);
    let Msg::CaptureStart { excludes } = recv_msg(&mut r)? else {
        bail!("expected CaptureStart")
    };
    let mut have = HashSet::new();
    loop {
        match recv_msg(&mut r)? {
            Msg::Have(ds) => {
                if ds.len() > msg::MAX_WANT {
                    bail!("Have batch too large");
                }
                have.extend(ds)
            }
            Msg::HaveEnd => break,
            m => bail!("unexpected {m:?} during the have list"),
        }
    }
    let mut w = r;
    write_msg(&mut w, &Msg::Layout(cfg.layout.clone().unwrap_or_default()))?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let cache_path = cfg.state_dir.join(format!(
        "statcache-{}",
        &Digest::of(cfg.root.to_string_lossy().as_bytes()).to_hex()[..16]
    ));
    let mut scfg = ScanConfig::new(&cfg.root);
    scfg.excludes = Excludes::new(&excludes)?;
    scfg.stat_cache = Some(cache_path.clone());
    let mut sink = NetSink { w };
    let t = std::time::Instant::now();
    let res = scan::scan(&scfg, &have, &mut sink)?;
    if std::env::var_os("SI_TIMING").is_some() {
        eprintln!("si-prepareclient: scan {:.3}s", t.elapsed().as_secs_f64());
    }
    let mut w = sink.w;
    send_entries(&mut w, res.manifest.entries)?;
    write_msg(
        &mut w,
        &Msg::ScanEnd {
            stats: res.stats.clone(),
        },
    )?;
    w.flush()?;
    match frame::read_frame(&mut w) {
        Ok(Some(frame::Frame::Msg(Msg::Bye))) => {
            res.cache.save(&cache_path)?;
            Ok(res.stats)
        }
        Ok(Some(frame::Frame::Msg(Msg::Error { message, .. }))) => {
            bail!("the master failed: {message}")
        }
        Ok(other) => bail!("the master closed without confirming ({other:?})"),
        Err(e) => Err(e).context("waiting for the master's confirmation"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use si_proto::frame::{read_frame, Frame, MAX_FRAME};
    use si_proto::manifest::Chunk;

    fn file(path: &str, chunks: usize) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: Kind::File {
                size: (chunks as u64) << 18,
                chunks: (0..chunks)
                    .map(|i| Chunk {
                        offset: (i as u64) << 18,
                        len: 256 << 10,
                        digest: Digest::of(&i.to_le_bytes()),
                    })
                    .collect(),
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1,
            mtime_nsec: 0,
            xattrs: vec![],
        }
    }

    /// A file of ~60 GiB (240k chunks) goes out in frames the master accepts, and comes back
    /// whole when the continuations are appended to the entry before them.
    #[test]
    fn a_chunk_list_larger_than_a_frame_is_split() {
        let entries = vec![file("small", 3), file("vm.img", 240_000), file("after", 1)];
        let mut wire = Vec::new();
        send_entries(&mut wire, entries.clone()).unwrap();
        let mut r = &wire[..];
        let mut got: Vec<Entry> = Vec::new();
        let mut frames = 0;
        while let Some(f) = read_frame(&mut r).unwrap() {
            frames += 1;
            match f {
                Frame::Msg(Msg::Entries(es)) => got.extend(es),
                Frame::Msg(Msg::MoreChunks(more)) => match &mut got.last_mut().unwrap().kind {
                    Kind::File { chunks, .. } => chunks.extend(more),
                    k => panic!("continuation after a {}", k.name()),
                },
                f => panic!("unexpected frame {f:?}"),
            }
        }
        assert!(frames >= 4, "{frames} frames");
        assert!(wire.len() > MAX_FRAME, "the test must exceed one frame");
        assert_eq!(got, entries);
    }
}
