//! `si-server`'s image service: nodes fetch manifests and objects over the si protocol.
//!
//! One task per connection, a semaphore caps connections (the one past the cap gets
//! `Error{Busy}`, which nodes retry with backoff). Whatever a `Want` asks for, a connection
//! holds at most [`GROUP_BYTES`] of compressed objects plus one object (objects are at most
//! one chunk, 1 MiB) read from the store at a time, and its 1 MiB write buffer: about 3 MiB,
//! 1.5 GiB at the default cap of 512 connections. Objects go out compressed exactly as
//! stored; the node verifies them.

use crate::manifest_cache::ManifestCache;
use anyhow::{bail, Context, Result};
use si_proto::frame::{read_frame_async, write_data_async, write_msg_async, Frame, MAX_FRAME};
use si_proto::handshake::{self, Policy};
use si_proto::msg::{self, ErrorKind, ImageVersionInfo, Msg, Role};
use si_store::Store;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

#[derive(Clone)]
pub struct ServeConfig {
    pub max_connections: usize,
    /// Answers an installer's `GetPlan{node}` (a name or a MAC): the install plan as TOML, or
    /// None for a node the master does not know. Any Deploy session may ask (the plan holds
    /// no secret); without a hook the service answers NotFound.
    pub plans: Option<PlanHook>,
}

/// See [`ServeConfig::plans`].
pub type PlanHook = Arc<dyn Fn(&str) -> Result<Option<String>> + Send + Sync>;

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("max_connections", &self.max_connections)
            .field("plans", &self.plans.is_some())
            .finish()
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_connections: 512,
            plans: None,
        }
    }
}

/// Called when a node reports install/update progress or completion.
/// Its error reaches the node: a report that was not stored is never acknowledged.
pub type ReportHook = Arc<dyn Fn(&str, &str, &str) -> Result<()> + Send + Sync>;

/// Where the service finds the objects it sends: the master's store, and later a node's own
/// tree when it relays to its neighbours. Objects go out compressed as the source holds them;
/// the receiver verifies every one against its digest, so a source need not be trusted.
pub trait ObjectFinder: Send + Sync + 'static {
    /// The object's uncompressed length and its zstd-compressed bytes.
    fn object(&self, d: &si_proto::Digest) -> Result<(u32, Vec<u8>)>;
}

impl ObjectFinder for Store {
    fn object(&self, d: &si_proto::Digest) -> Result<(u32, Vec<u8>)> {
        self.get_compressed(d)
    }
}

/// Serves until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    store: Arc<Store>,
    cfg: ServeConfig,
    report: Option<ReportHook>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let sem = Arc::new(Semaphore::new(cfg.max_connections));
    let cache = Arc::new(ManifestCache::default());
    let objects: Arc<dyn ObjectFinder> = store.clone();
    // The delta to each image's newest version is ready before the first node asks.
    // Dropping the set (when this returns) stops the warmer.
    let mut background = tokio::task::JoinSet::new();
    {
        let (store, cache) = (store.clone(), cache.clone());
        background.spawn(async move {
            loop {
                let (store, cache) = (store.clone(), cache.clone());
                let _ = tokio::task::spawn_blocking(move || cache.warm(&store)).await;
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        });
    }
    tokio::pin!(shutdown);
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => r.context("accepting a connection")?,
            _ = &mut shutdown => return Ok(()),
        };
        let store = store.clone();
        let objects = objects.clone();
        let cache = cache.clone();
        let report = report.clone();
        let plans = cfg.plans.clone();
        match sem.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    if let Err(e) = handle(sock, peer, store, objects, cache, report, plans).await {
                        tracing::warn!(%peer, error = format!("{e:#}"), "session failed");
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let mut sock = sock;
                    if let Err(e) = handshake::refuse_busy_async(&mut sock).await {
                        tracing::debug!(%peer, error = %e, "telling a client we are busy");
                    }
                });
            }
        }
    }
}

fn info(store: &Store, image: &str, v: u32) -> Result<ImageVersionInfo> {
    let m = store.meta(image, v)?;
    Ok(ImageVersionInfo {
        image: image.into(),
        version: v,
        created: m.created,
        entries: m.entries,
        bytes: m.bytes,
    })
}

/// The answer to a manifest request: the whole manifest, or the difference from the base the
/// node has when the store still holds that base; the header and the bytes that follow it.
fn manifest_reply(
    store: &Store,
    cache: &ManifestCache,
    image: &str,
    version: Option<u32>,
    base: Option<(String, u32)>,
) -> Result<(Msg, Arc<Vec<u8>>)> {
    let v = store.resolve(image, version)?;
    let target = cache.stored(store, image, v)?;
    let info = info(store, image, v)?;
    let (digest, len) = (target.digest, target.len);
    if let Some(Ok(base)) = base.map(|(bi, bv)| cache.stored(store, &bi, bv)) {
        let delta = cache.delta(&base, &target)?;
        let head = Msg::ManifestDeltaIs {
            info,
            digest,
            bytes: len,
            delta_bytes: delta.len() as u64,
        };
        return Ok((head, delta));
    }
    Ok((
        Msg::ManifestIs {
            info,
            digest,
            bytes: len,
        },
        Arc::new(target.bytes()?),
    ))
}

/// Compressed object bytes one connection reads from the store in one trip: small objects
/// travel in groups (one blocking call for many), and a connection never holds more than this
/// plus one object.
const GROUP_BYTES: usize = 1 << 20;

/// An object as it goes out: digest, uncompressed length, compressed bytes.
type Outgoing = (si_proto::Digest, u32, Vec<u8>);

/// Reads objects from the front of `want` until their compressed bytes reach `budget` (at
/// least one object); returns them and how many digests of `want` they cover.
fn read_group(
    source: &dyn ObjectFinder,
    want: &[si_proto::Digest],
    budget: usize,
) -> (Result<Vec<Outgoing>>, usize) {
    let mut out = Vec::new();
    let mut held = 0;
    for (i, d) in want.iter().enumerate() {
        if held >= budget {
            return (Ok(out), i);
        }
        match source.object(d) {
            Ok((raw, z)) => {
                held += z.len();
                out.push((*d, raw, z));
            }
            Err(e) => return (Err(e), i + 1),
        }
    }
    (Ok(out), want.len())
}

async fn handle(
    sock: TcpStream,
    peer: SocketAddr,
    store: Arc<Store>,
    objects: Arc<dyn ObjectFinder>,
    cache: Arc<ManifestCache>,
    report: Option<ReportHook>,
    plans: Option<PlanHook>,
) -> Result<()> {
    sock.set_nodelay(true).ok();
    let mut sock = sock;
    let policy = Policy {
        roles: vec![Role::Deploy],
        token: None,
        server: si_tree::fsutil::hostname(),
    };
    let peer_hello = handshake::accept_async(&mut sock, &policy)
        .await
        .context("handshake")?;
    tracing::debug!(%peer, client = %peer_hello.client, version = peer_hello.version, "session open");
    let (r, w) = tokio::io::split(sock);
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
    let mut w = BufWriter::with_capacity(1 << 20, w);
    loop {
        let Some(frame) = read_frame_async(&mut r).await? else {
            return Ok(());
        };
        let Frame::Msg(m) = frame else {
            bail!("unexpected data frame")
        };
        let res: Result<()> = match m {
            Msg::Bye => return Ok(()),
            Msg::ListImages => {
                let st = store.clone();
                let list = tokio::task::spawn_blocking(move || -> Result<Vec<ImageVersionInfo>> {
                    let mut out = Vec::new();
                    for n in st.images()? {
                        for v in st.versions(&n)? {
                            out.push(info(&st, &n, v)?);
                        }
                    }
                    Ok(out)
                })
                .await??;
                write_msg_async(&mut w, &Msg::Images(list))
                    .await
                    .map_err(Into::into)
            }
            m @ (Msg::GetManifest { .. } | Msg::GetManifestDelta { .. }) => {
                let (image, version, base) = match m {
                    Msg::GetManifestDelta {
                        image,
                        version,
                        base_image,
                        base_version,
                    } => (image, version, Some((base_image, base_version))),
                    Msg::GetManifest { image, version } => (image, version, None),
                    _ => unreachable!("matched above"),
                };
                let (st, c) = (store.clone(), cache.clone());
                let got = tokio::task::spawn_blocking(move || {
                    manifest_reply(&st, &c, &image, version, base)
                })
                .await?;
                match got {
                    Ok((head, data)) => {
                        write_msg_async(&mut w, &head).await?;
                        for part in data.chunks(MAX_FRAME / 2) {
                            write_data_async(&mut w, part).await?;
                        }
                    }
                    Err(e) => {
                        let m = Msg::Error {
                            kind: ErrorKind::NotFound,
                            message: format!("{e:#}"),
                        };
                        write_msg_async(&mut w, &m).await?;
                    }
                }
                Ok(())
            }
            Msg::Want(ds) => {
                if ds.len() > msg::MAX_WANT {
                    bail!("Want of {} digests exceeds {}", ds.len(), msg::MAX_WANT);
                }
                let mut rest = &ds[..];
                while !rest.is_empty() {
                    let src = objects.clone();
                    let todo = rest.to_vec();
                    let (objs, taken) =
                        tokio::task::spawn_blocking(move || read_group(&*src, &todo, GROUP_BYTES))
                            .await?;
                    rest = &rest[taken..];
                    match objs {
                        Ok(objs) => {
                            for (d, raw, z) in objs {
                                write_msg_async(
                                    &mut w,
                                    &Msg::Blob {
                                        digest: d,
                                        raw_len: raw,
                                    },
                                )
                                .await?;
                                write_data_async(&mut w, &z).await?;
                            }
                        }
                        Err(e) => {
                            write_msg_async(
                                &mut w,
                                &Msg::Error {
                                    kind: ErrorKind::NotFound,
                                    message: format!("{e:#}"),
                                },
                            )
                            .await?;
                            w.flush().await?;
                            bail!("{e:#}");
                        }
                    }
                }
                Ok(())
            }
            Msg::Report {
                node,
                state,
                detail,
            } => {
                tracing::info!(%peer, %node, %state, %detail, "node report");
                if let Some(h) = &report {
                    if let Err(e) = h(&node, &state, &detail) {
                        tracing::error!(%node, %state, error = format!("{e:#}"), "report not stored");
                        let m = Msg::Error {
                            kind: ErrorKind::Internal,
                            message: format!("report not stored: {e:#}"),
                        };
                        write_msg_async(&mut w, &m).await?;
                        w.flush().await?;
                        bail!("report from {node} not stored: {e:#}");
                    }
                }
                write_msg_async(&mut w, &Msg::Ok).await.map_err(Into::into)
            }
            Msg::GetPlan { node } => {
                let answer = match &plans {
                    Some(h) => {
                        let h = h.clone();
                        let n = node.clone();
                        tokio::task::spawn_blocking(move || h(&n)).await?
                    }
                    None => Ok(None),
                };
                let m = match answer {
                    Ok(Some(plan)) => Msg::Plan(plan),
                    Ok(None) => Msg::Error {
                        kind: ErrorKind::NotFound,
                        message: format!("no install plan for {node}"),
                    },
                    Err(e) => {
                        tracing::error!(%node, error = format!("{e:#}"), "assembling an install plan");
                        Msg::Error {
                            kind: ErrorKind::Internal,
                            message: format!("assembling the install plan of {node}: {e:#}"),
                        }
                    }
                };
                tracing::info!(%peer, %node, found = matches!(m, Msg::Plan(_)), "install plan asked");
                write_msg_async(&mut w, &m).await.map_err(Into::into)
            }
            other => {
                write_msg_async(
                    &mut w,
                    &Msg::Error {
                        kind: ErrorKind::BadRequest,
                        message: format!("unexpected {:?}", std::mem::discriminant(&other)),
                    },
                )
                .await?;
                w.flush().await?;
                bail!("unexpected message");
            }
        };
        res?;
        w.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use si_proto::manifest::{Entry, Kind, Manifest};

    /// The bound holds whatever a Want asks for: a group stops once its bytes reach the
    /// budget, and the groups together cover the request in order.
    #[test]
    fn object_groups_are_bounded_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.pack_writer().unwrap();
        let mut want = Vec::new();
        let mut x = 7u64;
        for i in 0..40u32 {
            // 100 KiB of noise each: zstd cannot shrink it much.
            let data: Vec<u8> = (0..100 << 10)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8 ^ i as u8
                })
                .collect();
            want.push(w.add_raw(&data).unwrap());
        }
        w.finish().unwrap();
        let budget = 256 << 10;
        let mut rest = &want[..];
        let mut sent = Vec::new();
        while !rest.is_empty() {
            let (objs, taken) = read_group(&store, rest, budget);
            let objs = objs.unwrap();
            let held: usize = objs.iter().map(|o| o.2.len()).sum();
            let largest = objs.iter().map(|o| o.2.len()).max().unwrap();
            assert!(held < budget + largest, "{held} bytes held");
            assert_eq!(objs.len(), taken);
            sent.extend(objs.into_iter().map(|o| o.0));
            rest = &rest[taken..];
        }
        assert_eq!(sent, want);
    }

    /// A node's `GetManifestDelta{base_image}` names a base the service looks up in the store:
    /// a name that climbs out of `images/` finds nothing there, even when a version waits at the
    /// place it points to, and the node gets the whole manifest.
    #[test]
    fn delta_base_name_cannot_leave_the_store() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("store")).unwrap();
        let m = Manifest {
            entries: vec![Entry {
                path: vec![],
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                xattrs: vec![],
            }],
        };
        store
            .record_version("img", &m, Default::default(), None)
            .unwrap();
        let planted = t.path().join("planted/1");
        std::fs::create_dir_all(&planted).unwrap();
        std::fs::copy(
            store.manifest_path("img", 1).unwrap(),
            planted.join("manifest"),
        )
        .unwrap();
        let cache = ManifestCache::default();
        // The control: a real base gets a delta.
        let (head, _) =
            manifest_reply(&store, &cache, "img", None, Some(("img".into(), 1))).unwrap();
        assert!(matches!(head, Msg::ManifestDeltaIs { .. }), "{head:?}");
        let abs = t.path().join("planted").to_str().unwrap().to_string();
        for bad in ["../../planted".to_string(), abs, "a/b".into(), "".into()] {
            let (head, data) =
                manifest_reply(&store, &cache, "img", None, Some((bad.clone(), 1))).unwrap();
            assert!(matches!(head, Msg::ManifestIs { .. }), "{bad:?}: {head:?}");
            assert_eq!(*data, store.manifest_bytes("img", 1).unwrap());
        }
        // The image asked for is checked the same way.
        assert!(manifest_reply(&store, &cache, "../../planted", Some(1), None).is_err());
    }
}
