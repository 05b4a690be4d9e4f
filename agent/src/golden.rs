//! `si-prepareclient`: the golden client's side of a capture.
//!
//! It listens on one address, accepts a connection from the named master only, requires the
//! one-time token it printed, serves exactly one capture (protocol in `si_proto::msg`) and
//! exits; with no capture before the timeout it exits with an error. The stat cache is saved
//! only after the master confirms (`Bye`) that the image is durably recorded.

use anyhow::{anyhow, bail, Context, Result};
use si_proto::frame::{self, recv_msg, write_data, write_msg};
use si_proto::manifest::{Entry, Kind};
use si_proto::msg::{self, ErrorKind, Msg, Role, ScanStats};
use si_proto::Digest;
use si_tree::exclude::Excludes;
use si_tree::scan::{self, BlobSink, ScanConfig};
use std::collections::HashSet;
use std::io::{BufWriter, Write};
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
            eprintln!(
                "si-prepareclient: refused a connection from {peer}: only {} may capture",
                cfg.master
            );
            continue;
        }
        stream.set_nonblocking(false)?;
        match handshake(&stream, cfg) {
            Ok(()) => return capture(stream, cfg),
            Err(e) => eprintln!("si-prepareclient: refused {peer}: {e:#}"),
        }
    }
}

fn handshake(stream: &TcpStream, cfg: &ServeConfig) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = stream;
    let mut w = stream;
    let hello = recv_msg(&mut r).context("reading the master's hello")?;
    let refuse = |w: &mut &TcpStream, kind, m: String| -> Result<()> {
        let _ = write_msg(
            w,
            &Msg::Error {
                kind,
                message: m.clone(),
            },
        );
        Err(anyhow!(m))
    };
    let Msg::Hello {
        magic,
        version,
        min_version,
        role,
        token,
        ..
    } = hello
    else {
        return refuse(&mut w, ErrorKind::BadRequest, "expected Hello".into());
    };
    if magic != msg::MAGIC {
        return refuse(&mut w, ErrorKind::BadRequest, "not an si peer".into());
    }
    let v = match msg::negotiate(version, min_version) {
        Ok(v) => v,
        Err(m) => return refuse(&mut w, ErrorKind::Version, m),
    };
    if role != Role::Capture {
        return refuse(
            &mut w,
            ErrorKind::BadRequest,
            "this service only serves captures".into(),
        );
    }
    if !si_proto::handshake::ct_eq(token.as_bytes(), cfg.token.as_bytes()) {
        return refuse(&mut w, ErrorKind::Refused, "wrong token".into());
    }
    write_msg(
        &mut w,
        &Msg::Welcome {
            version: v,
            server: si_tree::fsutil::hostname(),
        },
    )?;
    stream.set_read_timeout(None)?;
    Ok(())
}

fn capture(stream: TcpStream, cfg: &ServeConfig) -> Result<ScanStats> {
    stream.set_nodelay(true).ok();
    let mut r = std::io::BufReader::new(stream.try_clone()?);
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
    let mut w = BufWriter::with_capacity(1 << 20, stream);
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
    let mut batch = Vec::new();
    let mut size = 0;
    for e in res.manifest.entries {
        size += approx_size(&e);
        batch.push(e);
        if size >= BATCH_BYTES {
            write_msg(&mut w, &Msg::Entries(std::mem::take(&mut batch)))?;
            size = 0;
        }
    }
    if !batch.is_empty() {
        write_msg(&mut w, &Msg::Entries(batch))?;
    }
    write_msg(
        &mut w,
        &Msg::ScanEnd {
            stats: res.stats.clone(),
        },
    )?;
    w.flush()?;
    match frame::read_frame(&mut r) {
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
