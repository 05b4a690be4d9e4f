//! `si-server`'s image service: nodes fetch manifests and objects over the si protocol.
//!
//! One task per connection, a semaphore caps connections (the one past the cap gets
//! `Error{Busy}`), and each connection holds at most one object in memory at a time whatever a
//! `Want` asks for. Objects go out compressed exactly as stored; the node verifies them.

use crate::manifest_cache::ManifestCache;
use anyhow::{bail, Context, Result};
use si_proto::frame::{read_frame_async, write_data_async, write_msg_async, Frame, MAX_FRAME};
use si_proto::msg::{self, ErrorKind, ImageVersionInfo, Msg, Role};
use si_store::Store;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub max_connections: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_connections: 512,
        }
    }
}

/// Called when a node reports install/update progress or completion.
pub type ReportHook = Arc<dyn Fn(&str, &str, &str) + Send + Sync>;

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
        let cache = cache.clone();
        let report = report.clone();
        match sem.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    if let Err(e) = handle(sock, peer, store, cache, report).await {
                        eprintln!("si-server: {peer}: {e:#}");
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let mut sock = sock;
                    let _ = write_msg_async(
                        &mut sock,
                        &Msg::Error {
                            kind: ErrorKind::Busy,
                            message: "too many connections; retry later".into(),
                        },
                    )
                    .await;
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

async fn handle(
    sock: TcpStream,
    peer: SocketAddr,
    store: Arc<Store>,
    cache: Arc<ManifestCache>,
    report: Option<ReportHook>,
) -> Result<()> {
    sock.set_nodelay(true).ok();
    let (r, w) = sock.into_split();
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
    let mut w = BufWriter::with_capacity(1 << 20, w);
    let hello = tokio::time::timeout(std::time::Duration::from_secs(30), read_frame_async(&mut r))
        .await
        .context("no hello within 30 s")??;
    let Some(Frame::Msg(Msg::Hello {
        magic,
        version,
        min_version,
        role,
        ..
    })) = hello
    else {
        bail!("expected a hello");
    };
    if magic != msg::MAGIC {
        bail!("not an si peer");
    }
    let v = match msg::negotiate(version, min_version) {
        Ok(v) => v,
        Err(m) => {
            write_msg_async(
                &mut w,
                &Msg::Error {
                    kind: ErrorKind::Version,
                    message: m.clone(),
                },
            )
            .await?;
            w.flush().await?;
            bail!(m);
        }
    };
    if role != Role::Deploy {
        write_msg_async(
            &mut w,
            &Msg::Error {
                kind: ErrorKind::BadRequest,
                message: "this service serves deploys".into(),
            },
        )
        .await?;
        w.flush().await?;
        bail!("wrong role {role:?}");
    }
    write_msg_async(
        &mut w,
        &Msg::Welcome {
            version: v,
            server: si_tree::fsutil::hostname(),
        },
    )
    .await?;
    w.flush().await?;
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
                for group in ds.chunks(32) {
                    let st = store.clone();
                    let group = group.to_vec();
                    let objs = tokio::task::spawn_blocking(move || {
                        group
                            .iter()
                            .map(|d| st.get_compressed(d).map(|(raw, z)| (*d, raw, z)))
                            .collect::<Result<Vec<_>>>()
                    })
                    .await?;
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
                eprintln!("si-server: {peer}: node {node}: {state} {detail}");
                if let Some(h) = &report {
                    h(&node, &state, &detail);
                }
                write_msg_async(&mut w, &Msg::Ok).await.map_err(Into::into)
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
