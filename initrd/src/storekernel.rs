//! An image's own kernel and modules, read from the store without checking the image out
//! (SystemImager's "use your own kernel"): only `boot/vmlinuz-<release>` and the files of
//! `lib/modules/<release>` (or `usr/lib/modules/<release>`) the package needs are read, each
//! object verified by the store.

use anyhow::{bail, Context, Result};
use si_proto::manifest::{Entry, Kind, Manifest};
use si_store::Store;
use std::collections::HashMap;
use std::path::Path;

/// Largest file read out of an image for the package (kernels and modules are far smaller).
const MAX_FILE: u64 = 512 << 20;

pub struct ImageKernel {
    store: Store,
    manifest: Manifest,
    by_path: HashMap<Vec<u8>, usize>,
    kernel: usize,
    /// `lib/modules/<release>/` or `usr/lib/modules/<release>/`.
    modules_prefix: Vec<u8>,
    pub release: String,
    pub label: String,
}

impl ImageKernel {
    /// Opens image `reference` (`NAME` or `NAME@VERSION`) of the store at `store` and finds its
    /// newest kernel that has a module directory.
    pub fn open(store: &Path, reference: &str) -> Result<ImageKernel> {
        let (name, version) = si_store::images::parse_ref(reference)?;
        let st =
            Store::open(store).with_context(|| format!("opening store {}", store.display()))?;
        let v = st.resolve(&name, version)?;
        let manifest = st
            .manifest(&name, v)
            .with_context(|| format!("reading the manifest of {name}@{v}"))?;
        let by_path: HashMap<Vec<u8>, usize> = manifest
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.clone(), i))
            .collect();
        let mut found: Vec<(String, usize, Vec<u8>)> = Vec::new();
        for (i, e) in manifest.entries.iter().enumerate() {
            let Some(rel) = e.path.strip_prefix(b"boot/vmlinuz-") else {
                continue;
            };
            let Ok(rel) = std::str::from_utf8(rel) else {
                continue;
            };
            if rel.contains('/') || !matches!(e.kind, Kind::File { .. }) {
                continue;
            }
            for m in ["usr/lib/modules/", "lib/modules/"] {
                let prefix = format!("{m}{rel}/");
                let dep = format!("{prefix}modules.dep");
                if by_path
                    .get(dep.as_bytes())
                    .is_some_and(|&j| matches!(manifest.entries[j].kind, Kind::File { .. }))
                {
                    found.push((rel.to_string(), i, prefix.into_bytes()));
                    break;
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let Some((release, kernel, modules_prefix)) = found.pop() else {
            bail!(
                "image {name}@{v} has no boot/vmlinuz-<release> with lib/modules/<release>/modules.dep"
            );
        };
        Ok(ImageKernel {
            store: st,
            manifest,
            by_path,
            kernel,
            modules_prefix,
            release,
            label: format!("image:{name}@{v}"),
        })
    }

    pub fn kernel(&self) -> Result<Vec<u8>> {
        self.read(&self.manifest.entries[self.kernel])
    }

    /// A file of the module directory by its path relative to it.
    pub fn module_file(&self, rel: &str) -> Result<Vec<u8>> {
        let mut p = self.modules_prefix.clone();
        p.extend_from_slice(rel.as_bytes());
        let Some(&i) = self.by_path.get(&p) else {
            bail!(
                "{}: no {} in the image",
                self.label,
                String::from_utf8_lossy(&p)
            );
        };
        self.read(&self.manifest.entries[i])
    }

    fn read(&self, e: &Entry) -> Result<Vec<u8>> {
        let e = match &e.kind {
            Kind::Hardlink { target } => {
                let &j = self
                    .by_path
                    .get(target)
                    .with_context(|| format!("{}: dangling hard link", e.path_lossy()))?;
                &self.manifest.entries[j]
            }
            _ => e,
        };
        let Kind::File { size, chunks } = &e.kind else {
            bail!("{}: {} is not a regular file", self.label, e.path_lossy());
        };
        if *size > MAX_FILE {
            bail!(
                "{}: {} is {size} bytes, too large",
                self.label,
                e.path_lossy()
            );
        }
        let mut out = vec![0u8; *size as usize];
        for c in chunks {
            let data = self
                .store
                .get(&c.digest)
                .with_context(|| format!("reading {} from the store", e.path_lossy()))?;
            let start = usize::try_from(c.offset).unwrap_or(usize::MAX);
            let end = start.saturating_add(data.len());
            if data.len() != c.len as usize || end > out.len() {
                bail!(
                    "{}: {} has a chunk outside the file",
                    self.label,
                    e.path_lossy()
                );
            }
            out[start..end].copy_from_slice(&data);
        }
        Ok(out)
    }
}
