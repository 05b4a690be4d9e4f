//! The node's side of the image service: fetch a manifest, then objects, pipelined.

use anyhow::{anyhow, bail, Context, Result};
use si_proto::frame::{read_frame, recv_msg, write_msg, Frame};
use si_proto::handshake::{self, Backoff, Credentials, PeerError};
use si_proto::manifest::Manifest;
use si_proto::msg::{ImageVersionInfo, Msg, Role};
use si_proto::stream::{BufStream, Counted, Traffic};
use si_proto::Digest;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long a node keeps retrying a server that answers Busy or cannot be reached (an installer
/// whose master is restarting waits for it; the retries are logged as warnings).
const BUSY_PATIENCE: Duration = Duration::from_secs(600);

/// Digests per `Want`, and how many `Want`s may be outstanding.
const WANT_BATCH: usize = 1024;
const IN_FLIGHT: usize = 2;

pub use si_tree::codec::verify;

pub struct Client {
    conn: BufStream<Counted<TcpStream>>,
    traffic: Traffic,
}

impl Client {
    pub fn connect(server: &str, timeout: Duration) -> Result<Client> {
        let server = if server.contains(':') {
            server.to_string()
        } else {
            format!("{server}:7811")
        };
        let addr = server
            .to_socket_addrs()
            .with_context(|| format!("resolving {server}"))?
            .next()
            .ok_or_else(|| anyhow!("{server} resolves to nothing"))?;
        let creds = Credentials {
            token: String::new(),
            client: si_tree::fsutil::hostname(),
        };
        // A server at its connection cap answers Busy: wait and retry (see si_proto::handshake).
        handshake::retry(
            Backoff::new(BUSY_PATIENCE),
            || Client::open(&addr, timeout, &creds),
            |e, d| tracing::warn!(server = %addr, error = %e, retry_in = ?d, "server busy or unreachable; retrying"),
        )
        .with_context(|| format!("opening a session with {addr}"))
    }

    fn open(
        addr: &std::net::SocketAddr,
        timeout: Duration,
        creds: &Credentials,
    ) -> Result<Client, PeerError> {
        let io = |e: std::io::Error| PeerError::Frame(si_proto::frame::FrameError::Io(e));
        let s = TcpStream::connect_timeout(addr, timeout).map_err(io)?;
        s.set_nodelay(true).ok();
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(io)?;
        let counted = Counted::new(s);
        let traffic = counted.traffic();
        let mut conn = BufStream::with_capacities(1 << 20, 64 << 10, counted);
        handshake::connect(&mut conn, Role::Deploy, creds)?;
        Ok(Client { conn, traffic })
    }

    /// Bytes received from the server so far.
    pub fn received(&self) -> u64 {
        self.traffic.read()
    }

    pub fn list(&mut self) -> Result<Vec<ImageVersionInfo>> {
        write_msg(&mut self.conn, &Msg::ListImages)?;
        self.conn.flush()?;
        match recv_msg(&mut self.conn)? {
            Msg::Images(v) => Ok(v),
            m => bail!("unexpected answer: {m:?}"),
        }
    }

    /// Fetches and decodes a manifest (the newest version when `version` is None).
    pub fn manifest(
        &mut self,
        image: &str,
        version: Option<u32>,
    ) -> Result<(ImageVersionInfo, Manifest, Vec<u8>)> {
        write_msg(
            &mut self.conn,
            &Msg::GetManifest {
                image: image.into(),
                version,
            },
        )?;
        self.conn.flush()?;
        let (info, digest, bytes) = match recv_msg(&mut self.conn)? {
            Msg::ManifestIs {
                info,
                digest,
                bytes,
            } => (info, digest, bytes),
            m => bail!("unexpected answer: {m:?}"),
        };
        if bytes > si_proto::manifest::MAX_MANIFEST_BYTES {
            bail!("manifest of {bytes} bytes is too large");
        }
        let mut data = Vec::with_capacity(bytes.min(64 << 20) as usize);
        while (data.len() as u64) < bytes {
            let part = si_proto::frame::recv_data(&mut self.conn)?;
            data.extend_from_slice(&part);
        }
        if data.len() as u64 != bytes || Digest::of(&data) != digest {
            bail!("manifest of {image} arrived corrupt");
        }
        let m =
            Manifest::decode(&data).with_context(|| format!("decoding the manifest of {image}"))?;
        Ok((info, m, data))
    }

    fn recv_bytes(&mut self, n: u64) -> Result<Vec<u8>> {
        if n > si_proto::manifest::MAX_MANIFEST_BYTES {
            bail!("manifest of {n} bytes is too large");
        }
        let mut data = Vec::with_capacity(n.min(64 << 20) as usize);
        while (data.len() as u64) < n {
            let part = si_proto::frame::recv_data(&mut self.conn)?;
            data.extend_from_slice(&part);
        }
        if data.len() as u64 != n {
            bail!("manifest data has the wrong length");
        }
        Ok(data)
    }

    /// Asks for a version's manifest as the difference from `base` (the image and version
    /// the node has). The answer is a delta when the server still has that base, else the
    /// whole manifest.
    pub fn manifest_or_delta(
        &mut self,
        image: &str,
        version: Option<u32>,
        base: Option<(&str, u32)>,
    ) -> Result<ManifestAnswer> {
        let Some((bimage, bversion)) = base else {
            let (info, m, bytes) = self.manifest(image, version)?;
            return Ok(ManifestAnswer::Full { info, m, bytes });
        };
        write_msg(
            &mut self.conn,
            &Msg::GetManifestDelta {
                image: image.into(),
                version,
                base_image: bimage.into(),
                base_version: bversion,
            },
        )?;
        self.conn.flush()?;
        match recv_msg(&mut self.conn)? {
            Msg::ManifestDeltaIs {
                info,
                digest,
                bytes,
                delta_bytes,
            } => {
                let data = self.recv_bytes(delta_bytes)?;
                let delta = si_proto::manifest::Delta::decode(&data)?;
                Ok(ManifestAnswer::Delta {
                    info,
                    delta,
                    digest,
                    bytes,
                })
            }
            Msg::ManifestIs {
                info,
                digest,
                bytes,
            } => {
                let data = self.recv_bytes(bytes)?;
                if Digest::of(&data) != digest {
                    bail!("manifest of {image} arrived corrupt");
                }
                let m = Manifest::decode(&data)?;
                Ok(ManifestAnswer::Full {
                    info,
                    m,
                    bytes: data,
                })
            }
            m => bail!("unexpected answer: {m:?}"),
        }
    }

    /// Fetches `wants` (digest, expected length), verifying each, and hands them to `f` on
    /// `threads` worker threads, in no particular order.
    pub fn fetch(
        &mut self,
        wants: &[(Digest, u32)],
        threads: usize,
        f: &(dyn Fn(Digest, Vec<u8>) -> Result<()> + Sync),
    ) -> Result<()> {
        let batches: Vec<&[(Digest, u32)]> = wants.chunks(WANT_BATCH).collect();
        let (tx, rx) = crossbeam_channel::bounded::<(Digest, u32, u32, Vec<u8>)>(32);
        let c = &mut self.conn;
        std::thread::scope(|s| -> Result<()> {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    let rx = rx.clone();
                    s.spawn(move || -> Result<()> {
                        for (d, raw, expect, z) in rx {
                            if raw != expect {
                                bail!("object {d}: server says {raw} bytes, manifest {expect}");
                            }
                            let data = verify(&d, raw, &z)?;
                            f(d, data)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            drop(rx);
            let res = (|| -> Result<()> {
                let mut sent = 0;
                while sent < batches.len().min(IN_FLIGHT) {
                    write_msg(c, &Msg::Want(batches[sent].iter().map(|x| x.0).collect()))?;
                    sent += 1;
                }
                c.flush()?;
                for (i, batch) in batches.iter().enumerate() {
                    for &(d, expect) in batch.iter() {
                        let (digest, raw_len) = match recv_msg(c)? {
                            Msg::Blob { digest, raw_len } => (digest, raw_len),
                            m => bail!("expected an object, got {m:?}"),
                        };
                        if digest != d {
                            bail!("server sent {digest} where {d} was due");
                        }
                        let Some(Frame::Data(z)) = read_frame(c)? else {
                            bail!("object {d} without data")
                        };
                        if tx.send((d, raw_len, expect, z)).is_err() {
                            return Ok(()); // a worker failed; its error is reported below
                        }
                    }
                    if sent < batches.len() {
                        write_msg(c, &Msg::Want(batches[sent].iter().map(|x| x.0).collect()))?;
                        c.flush()?;
                        sent += 1;
                    }
                    let _ = i;
                }
                Ok(())
            })();
            drop(tx);
            let mut out = res;
            for h in workers {
                let r = h.join().unwrap_or_else(|_| Err(anyhow!("worker panicked")));
                if out.is_ok() {
                    out = r;
                }
            }
            out
        })
    }

    pub fn report(&mut self, node: &str, state: &str, detail: &str) -> Result<()> {
        write_msg(
            &mut self.conn,
            &Msg::Report {
                node: node.into(),
                state: state.into(),
                detail: detail.into(),
            },
        )?;
        self.conn.flush()?;
        match recv_msg(&mut self.conn)? {
            Msg::Ok => Ok(()),
            m => bail!("unexpected answer: {m:?}"),
        }
    }

    /// Asks the master for a node's install plan (TOML, `si_proto::plan::InstallPlan`).
    pub fn plan(&mut self, node: &str) -> Result<String> {
        write_msg(&mut self.conn, &Msg::GetPlan { node: node.into() })?;
        self.conn.flush()?;
        match recv_msg(&mut self.conn)? {
            Msg::Plan(t) => Ok(t),
            Msg::Error { message, .. } => {
                bail!("the master has no install plan for {node}: {message}")
            }
            m => bail!("unexpected answer: {}", m.name()),
        }
    }

    pub fn bye(mut self) {
        let _ = write_msg(&mut self.conn, &Msg::Bye);
        let _ = self.conn.flush();
    }
}

/// A manifest as the server sent it: whole, or as a delta from the node's installed one.
pub enum ManifestAnswer {
    Full {
        info: ImageVersionInfo,
        m: Manifest,
        bytes: Vec<u8>,
    },
    Delta {
        info: ImageVersionInfo,
        delta: si_proto::manifest::Delta,
        /// Digest and length of the encoded manifest the delta must rebuild.
        digest: Digest,
        bytes: u64,
    },
}

impl ManifestAnswer {
    pub fn info(&self) -> &ImageVersionInfo {
        match self {
            ManifestAnswer::Full { info, .. } | ManifestAnswer::Delta { info, .. } => info,
        }
    }

    /// The manifest and its encoding: the delta applied to `base`, checked against the digest
    /// the server gave. None when the rebuilt manifest does not match (ask for the whole one).
    pub fn into_manifest(self, base: Option<&Manifest>) -> Option<(Manifest, Vec<u8>)> {
        match self {
            ManifestAnswer::Full { m, bytes, .. } => Some((m, bytes)),
            ManifestAnswer::Delta {
                delta,
                digest,
                bytes,
                ..
            } => {
                let m = delta.apply(base?).ok()?;
                let enc = m.encode();
                (enc.len() as u64 == bytes && Digest::of(&enc) == digest).then_some((m, enc))
            }
        }
    }
}
