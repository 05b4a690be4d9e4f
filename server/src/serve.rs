//! `si-server`'s image service: nodes fetch manifests and objects over the si protocol.
//!
//! One task per connection, a semaphore caps connections (the one past the cap gets
//! `Error{Busy}`), and each connection holds at most one object in memory at a time whatever a
//! `Want` asks for. Objects go out compressed exactly as stored; the node verifies them.

use crate::store::Store;
use anyhow::{bail, Context, Result};
use si_proto::frame::{read_frame_async, write_data_async, write_msg_async, Frame, MAX_FRAME};
use si_proto::msg::{self, ErrorKind, ImageVersionInfo, Msg, Role};
use si_proto::Digest;
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
    tokio::pin!(shutdown);
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => r.context("accepting a connection")?,
            _ = &mut shutdown => return Ok(()),
        };
        let store = store.clone();
        let report = report.clone();
        match sem.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    if let Err(e) = handle(sock, peer, store, report).await {
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

async fn handle(
    sock: TcpStream,
    peer: SocketAddr,
    store: Arc<Store>,
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
            server: crate::hostname(),
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
            Msg::GetManifest { image, version } => {
                let st = store.clone();
                let got =
                    tokio::task::spawn_blocking(move || -> Result<(ImageVersionInfo, Vec<u8>)> {
                        let v = st.resolve(&image, version)?;
                        Ok((info(&st, &image, v)?, st.manifest_bytes(&image, v)?))
                    })
                    .await?;
                match got {
                    Ok((info, bytes)) => {
                        write_msg_async(
                            &mut w,
                            &Msg::ManifestIs {
                                info,
                                digest: Digest::of(&bytes),
                                bytes: bytes.len() as u64,
                            },
                        )
                        .await?;
                        for part in bytes.chunks(MAX_FRAME / 2) {
                            write_data_async(&mut w, part).await?;
                        }
                        Ok(())
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
                        Ok(())
                    }
                }
            }
            Msg::GetManifestDelta {
                image,
                version,
                base_image,
                base_version,
            } => {
                let st = store.clone();
                let got = tokio::task::spawn_blocking(
                    move || -> Result<(ImageVersionInfo, Vec<u8>, Option<Vec<u8>>)> {
                        let v = st.resolve(&image, version)?;
                        let bytes = st.manifest_bytes(&image, v)?;
                        let delta = match st.manifest(&base_image, base_version) {
                            Ok(base) => {
                                let target = si_proto::Manifest::decode(&bytes)?;
                                Some(si_proto::manifest::Delta::between(&base, &target).encode())
                            }
                            Err(_) => None,
                        };
                        Ok((info(&st, &image, v)?, bytes, delta))
                    },
                )
                .await?;
                match got {
                    Ok((info, bytes, Some(delta))) => {
                        write_msg_async(
                            &mut w,
                            &Msg::ManifestDeltaIs {
                                info,
                                digest: Digest::of(&bytes),
                                bytes: bytes.len() as u64,
                                delta_bytes: delta.len() as u64,
                            },
                        )
                        .await?;
                        for part in delta.chunks(MAX_FRAME / 2) {
                            write_data_async(&mut w, part).await?;
                        }
                        Ok(())
                    }
                    Ok((info, bytes, None)) => {
                        write_msg_async(
                            &mut w,
                            &Msg::ManifestIs {
                                info,
                                digest: Digest::of(&bytes),
                                bytes: bytes.len() as u64,
                            },
                        )
                        .await?;
                        for part in bytes.chunks(MAX_FRAME / 2) {
                            write_data_async(&mut w, part).await?;
                        }
                        Ok(())
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
                        Ok(())
                    }
                }
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
