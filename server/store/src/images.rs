//! Named, versioned images: version records, manifests, and image management
//! (list, remove, copy, rename, diff, fsck, gc).

use super::{pack, PackWriter, Store};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use si_proto::manifest::{self, Manifest};
use si_proto::Digest;
use std::collections::HashSet;
use std::path::PathBuf;

/// What a version records besides its manifest (`meta.toml`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VersionMeta {
    pub image: String,
    pub version: u32,
    /// RFC 3339, UTC.
    pub created: String,
    /// Where the tree came from: `golden:HOST`, `commit:DIR`, `import:FILE`, `copy:IMAGE@V`.
    pub source: String,
    #[serde(default)]
    pub excludes: Vec<String>,
    /// The manifest digest ([`manifest::digest`], hex): what the version is verified and, later,
    /// signed by. Empty in versions recorded by older builds (store format 1 before it), which
    /// have only [`VersionMeta::manifest`]; [`Store::manifest_digest`] reads both.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manifest_digest: String,
    /// Older builds only: BLAKE3 of the compressed manifest file. Never written now; read to
    /// check an old version's file before its manifest digest is computed from it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manifest: String,
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    #[serde(default)]
    pub parent: Option<u32>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub has_layout: bool,
}

/// Image names: letters, digits, `.`, `_`, `-`; not starting with `.`; at most 64 bytes
/// (`si_proto::path::image_name`, the rule the inventory applies too).
pub fn valid_image_name(name: &str) -> Result<()> {
    Ok(si_proto::path::image_name(name)?)
}

/// Parses `NAME` or `NAME@VERSION`.
pub fn parse_ref(s: &str) -> Result<(String, Option<u32>)> {
    match s.split_once('@') {
        Some((n, v)) => {
            valid_image_name(n)?;
            let v: u32 = v
                .trim_start_matches('v')
                .parse()
                .with_context(|| format!("bad version in {s:?}"))?;
            Ok((n.to_string(), Some(v)))
        }
        None => {
            valid_image_name(s)?;
            Ok((s.to_string(), None))
        }
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Store {
    /// Where image `name` lives. Every path the store builds from a name comes from here, and
    /// the name is checked here: a name from a client (`../x`, `a/b`, `/etc`) never reaches the
    /// filesystem.
    fn image_dir(&self, name: &str) -> Result<PathBuf> {
        valid_image_name(name)?;
        Ok(self.root.join("images").join(name))
    }

    fn version_dir(&self, name: &str, v: u32) -> Result<PathBuf> {
        Ok(self.image_dir(name)?.join(v.to_string()))
    }

    /// Image names, sorted.
    pub fn images(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let dir = self.root.join("images");
        for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e?;
            if let Some(n) = e.file_name().to_str() {
                if valid_image_name(n).is_ok() && e.path().is_dir() {
                    out.push(n.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Version numbers of an image, ascending.
    pub fn versions(&self, name: &str) -> Result<Vec<u32>> {
        let dir = self.image_dir(name)?;
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("no image named {name:?}"),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        let mut out: Vec<u32> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// The newest version, or the one asked for (which must exist).
    pub fn resolve(&self, name: &str, version: Option<u32>) -> Result<u32> {
        let vs = self.versions(name)?;
        match version {
            Some(v) if vs.contains(&v) => Ok(v),
            Some(v) => bail!("image {name} has no version {v} (it has {vs:?})"),
            None => vs
                .last()
                .copied()
                .ok_or_else(|| anyhow!("image {name} has no versions")),
        }
    }

    pub fn meta(&self, name: &str, v: u32) -> Result<VersionMeta> {
        let p = self.version_dir(name, v)?.join("meta.toml");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    /// The master's signature on `name@v` (see si-trust's `sign`), if it has one yet.
    pub fn signature(&self, name: &str, v: u32) -> Result<Option<Vec<u8>>> {
        let p = self.version_dir(name, v)?.join("signature");
        match std::fs::read(&p) {
            Ok(b) if b.len() <= 1024 => Ok(Some(b)),
            Ok(b) => bail!("{} is {} bytes: not a signature", p.display(), b.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Stores the signature on `name@v` beside the version (written atomically).
    pub fn write_signature(&self, name: &str, v: u32, sig: &[u8]) -> Result<()> {
        let p = self.version_dir(name, v)?.join("signature");
        si_tree::fsutil::write_atomic(&p, sig).with_context(|| format!("writing {}", p.display()))
    }

    /// Where the encoded manifest of `name@v` lives.
    pub fn manifest_path(&self, name: &str, v: u32) -> Result<PathBuf> {
        Ok(self.version_dir(name, v)?.join("manifest"))
    }

    pub fn manifest_bytes(&self, name: &str, v: u32) -> Result<Vec<u8>> {
        let p = self.manifest_path(name, v)?;
        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
    }

    pub fn manifest(&self, name: &str, v: u32) -> Result<Manifest> {
        let data = self.manifest_bytes(name, v)?;
        Manifest::decode(&data).with_context(|| format!("decoding the manifest of {name}@{v}"))
    }

    /// The manifest digest of `name@v`, from its version record. A version recorded before
    /// the record held one (it has only the BLAKE3 of the compressed file) has its file checked
    /// against that, and the digest computed from it: old stores serve and update unchanged.
    pub fn manifest_digest(&self, name: &str, v: u32) -> Result<Digest> {
        let meta = self.meta(name, v)?;
        self.digest_of(name, v, &meta, None)
    }

    /// [`Store::manifest_digest`] with the record (and, if the caller has read it, the
    /// manifest file) in hand.
    pub fn digest_of(
        &self,
        name: &str,
        v: u32,
        meta: &VersionMeta,
        file: Option<&[u8]>,
    ) -> Result<Digest> {
        if !meta.manifest_digest.is_empty() {
            return Digest::from_hex(&meta.manifest_digest)
                .with_context(|| format!("{name}@{v}: bad manifest digest in meta.toml"));
        }
        if meta.manifest.is_empty() {
            bail!("{name}@{v}: meta.toml records no manifest digest");
        }
        let read;
        let data = match file {
            Some(d) => d,
            None => {
                read = self.manifest_bytes(name, v)?;
                &read
            }
        };
        if Digest::of(data).to_hex() != meta.manifest {
            bail!("{name}@{v}: manifest does not match its recorded digest");
        }
        manifest::digest_of_encoded(data)
            .with_context(|| format!("decoding the manifest of {name}@{v}"))
    }

    pub fn layout(&self, name: &str, v: u32) -> Result<Option<String>> {
        let p = self.version_dir(name, v)?.join("layout.toml");
        match std::fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Records a new version of `name`. Every object the manifest references must be in the
    /// store already (finish the pack writer first). Returns the version number.
    pub fn record_version(
        &self,
        name: &str,
        m: &Manifest,
        mut meta: VersionMeta,
        layout: Option<&str>,
    ) -> Result<VersionMeta> {
        let idir = self.image_dir(name)?;
        m.validate()?;
        for c in m.digests() {
            if !self.contains(&c.digest) {
                bail!(
                    "refusing to record {name}: object {} is missing from the store",
                    c.digest
                );
            }
        }
        let (enc, digest) = m.encode_with_digest();
        meta.image = name.to_string();
        meta.manifest_digest = digest.to_hex();
        meta.manifest = String::new();
        meta.entries = m.entries.len() as u64;
        meta.files = m
            .entries
            .iter()
            .filter(|e| matches!(e.kind, manifest::Kind::File { .. }))
            .count() as u64;
        meta.bytes = m.total_bytes();
        meta.has_layout = layout.is_some();
        if meta.created.is_empty() {
            meta.created = now_rfc3339();
        }
        crate::private_dir_all(&idir)?;
        let existing = self.versions(name)?;
        meta.parent = existing.last().copied();
        let mut v = existing.last().map_or(1, |v| v + 1);
        loop {
            meta.version = v;
            let tmp = self.tmp_path("version");
            crate::private_dir(&tmp)?;
            crate::write_private(&tmp.join("manifest"), &enc)?;
            if let Some(l) = layout {
                crate::write_private(&tmp.join("layout.toml"), l.as_bytes())?;
            }
            let text = toml::to_string_pretty(&meta).context("encoding version metadata")?;
            crate::write_private(&tmp.join("meta.toml"), text.as_bytes())?;
            // rename(2) onto an existing non-empty directory fails: a version is never replaced.
            match std::fs::rename(&tmp, self.version_dir(name, v)?) {
                Ok(()) => {
                    si_tree::fsutil::sync_dir(&idir)?;
                    return Ok(meta);
                }
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) =>
                {
                    std::fs::remove_dir_all(&tmp).ok();
                    v += 1;
                }
                Err(e) => {
                    std::fs::remove_dir_all(&tmp).ok();
                    return Err(e).context("recording the version");
                }
            }
        }
    }

    /// Removes a whole image or one version (objects go at the next gc).
    pub fn remove(&self, name: &str, version: Option<u32>) -> Result<()> {
        let target = match version {
            Some(v) => {
                self.resolve(name, Some(v))?;
                self.version_dir(name, v)?
            }
            None => {
                self.versions(name)?;
                self.image_dir(name)?
            }
        };
        let tmp = self.tmp_path("removed");
        std::fs::rename(&target, &tmp).with_context(|| format!("removing {}", target.display()))?;
        std::fs::remove_dir_all(&tmp).with_context(|| format!("deleting {}", tmp.display()))?;
        if version.is_some() && self.versions(name)?.is_empty() {
            std::fs::remove_dir(self.image_dir(name)?).ok();
        }
        Ok(())
    }

    /// Copies an image (all versions; objects are shared, not copied).
    pub fn copy(&self, src: &str, dst: &str) -> Result<()> {
        let vs = self.versions(src)?;
        let dst_dir = self.image_dir(dst)?;
        if dst_dir.exists() {
            bail!("image {dst} already exists");
        }
        let tmp = self.tmp_path("copy");
        crate::private_dir(&tmp)?;
        for v in vs {
            let from = self.version_dir(src, v)?;
            let to = tmp.join(v.to_string());
            crate::private_dir(&to)?;
            for f in ["manifest", "layout.toml"] {
                if from.join(f).exists() {
                    let data = std::fs::read(from.join(f))?;
                    crate::write_private(&to.join(f), &data)?;
                }
            }
            let mut meta = self.meta(src, v)?;
            meta.image = dst.to_string();
            crate::write_private(
                &to.join("meta.toml"),
                toml::to_string_pretty(&meta)?.as_bytes(),
            )?;
        }
        std::fs::rename(&tmp, &dst_dir).with_context(|| format!("creating image {dst}"))?;
        Ok(())
    }

    /// Renames an image.
    pub fn rename(&self, src: &str, dst: &str) -> Result<()> {
        self.versions(src)?;
        if self.image_dir(dst)?.exists() {
            bail!("image {dst} already exists");
        }
        self.copy(src, dst)?;
        self.remove(src, None)
    }

    /// Re-reads every object and checks it against its digest; checks every manifest's
    /// references. Returns the problems found (empty: the store is sound).
    pub fn fsck(&self) -> Result<FsckReport> {
        let mut rep = FsckReport::default();
        let mut present = HashSet::new();
        for id in self.list_packs()? {
            let idx_path = self.pack_path(&id, "idx");
            let idx = match pack::read_index(&idx_path) {
                Ok(i) => i,
                Err(e) => {
                    rep.problems.push(format!("{e:#}"));
                    continue;
                }
            };
            let mut seen = Vec::new();
            let res = pack::scan_pack(&self.pack_path(&id, "pack"), |e, z| {
                rep.objects += 1;
                rep.bytes += z.len() as u64;
                if let Err(err) = super::verify_object(&e.digest, e.raw_len, z) {
                    rep.problems.push(format!("pack {id}: {err:#}"));
                } else {
                    present.insert(e.digest);
                }
                seen.push(e);
                Ok(())
            });
            match res {
                Ok(h) if h != id => rep
                    .problems
                    .push(format!("pack {id}: content hashes to {h}")),
                Ok(_) => {}
                Err(e) => rep.problems.push(format!("{e:#}")),
            }
            if seen != idx {
                rep.problems.push(format!(
                    "pack {id}: index does not match the pack's records"
                ));
            }
            rep.packs += 1;
        }
        for name in self.images()? {
            for v in self.versions(&name)? {
                rep.versions += 1;
                let meta = self.meta(&name, v);
                let data = self.manifest_bytes(&name, v);
                let (meta, data) = match (meta, data) {
                    (Ok(m), Ok(d)) => (m, d),
                    (Err(e), _) | (_, Err(e)) => {
                        rep.problems.push(format!("{name}@{v}: {e:#}"));
                        continue;
                    }
                };
                let want = match self.digest_of(&name, v, &meta, Some(&data)) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        rep.problems.push(format!("{e:#}"));
                        None
                    }
                };
                match Manifest::decode_with_digest(&data) {
                    Ok((m, got)) => {
                        if want.is_some_and(|w| w != got) {
                            rep.problems.push(format!(
                                "{name}@{v}: manifest does not match its recorded digest"
                            ));
                        }
                        let missing = m.digests().filter(|c| !present.contains(&c.digest)).count();
                        if missing > 0 {
                            rep.problems.push(format!(
                                "{name}@{v}: {missing} referenced objects missing or corrupt"
                            ));
                        }
                    }
                    Err(e) => rep.problems.push(format!("{name}@{v}: {e}")),
                }
            }
        }
        Ok(rep)
    }

    /// Removes objects no version references. Waits for running captures to finish (they hold
    /// the store lock shared) and blocks new ones while it runs.
    pub fn gc(&self, wait: bool) -> Result<GcReport> {
        let _lock = self.lock(true, wait)?;
        self.load_index()?;
        let mut live: HashSet<Digest> = HashSet::new();
        for name in self.images()? {
            for v in self.versions(&name)? {
                live.extend(self.manifest(&name, v)?.digests().map(|c| c.digest));
            }
        }
        let mut rep = GcReport::default();
        let mut writer = PackWriter::new(self)?;
        writer.force = true;
        let mut doomed = Vec::new();
        for id in self.list_packs()? {
            let idx = pack::read_index(&self.pack_path(&id, "idx"))?;
            let nlive = idx.iter().filter(|e| live.contains(&e.digest)).count();
            if nlive == idx.len() {
                continue;
            }
            rep.removed_objects += (idx.len() - nlive) as u64;
            for e in idx.iter().filter(|e| !live.contains(&e.digest)) {
                rep.freed_bytes += e.comp_len as u64;
            }
            if nlive > 0 {
                for e in idx.iter().filter(|e| live.contains(&e.digest)) {
                    let (raw, z) = self.get_compressed(&e.digest)?;
                    writer.add(e.digest, raw, &z)?;
                }
                rep.repacked_objects += nlive as u64;
            }
            doomed.push(id);
        }
        writer.finish()?;
        for id in &doomed {
            for ext in ["idx", "pack"] {
                let p = self.pack_path(id, ext);
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
        rep.removed_packs = doomed.len() as u64;
        // Anything left in tmp/ belongs to a writer that died: no writer runs now.
        let tmp = self.root.join("tmp");
        for e in std::fs::read_dir(&tmp)? {
            let p = e?.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).ok();
            } else {
                std::fs::remove_file(&p).ok();
            }
        }
        self.load_index()?;
        Ok(rep)
    }
}

#[derive(Debug, Default)]
pub struct FsckReport {
    pub packs: u64,
    pub objects: u64,
    pub bytes: u64,
    pub versions: u64,
    pub problems: Vec<String>,
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed_objects: u64,
    pub repacked_objects: u64,
    pub removed_packs: u64,
    pub freed_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use si_proto::manifest::{Entry, Kind};

    fn root_only() -> Manifest {
        Manifest {
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
        }
    }

    /// Every store function that turns a name into a path refuses a name that could leave
    /// `images/`, even when a matching tree exists outside the store.
    #[test]
    fn names_never_reach_the_filesystem_unchecked() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("store")).unwrap();
        store
            .record_version("good", &root_only(), VersionMeta::default(), None)
            .unwrap();
        // A version planted outside the store where `images/../../planted` would find it.
        let planted = t.path().join("planted/1");
        std::fs::create_dir_all(&planted).unwrap();
        std::fs::copy(
            store.manifest_path("good", 1).unwrap(),
            planted.join("manifest"),
        )
        .unwrap();
        std::fs::copy(
            store.root().join("images/good/1/meta.toml"),
            planted.join("meta.toml"),
        )
        .unwrap();
        let abs = t.path().join("planted");
        let abs = abs.to_str().unwrap();
        for bad in ["../../planted", "../x", "a/b", "", ".", "..", abs, "/etc"] {
            assert!(store.versions(bad).is_err(), "versions({bad:?})");
            assert!(store.resolve(bad, None).is_err(), "resolve({bad:?})");
            assert!(store.meta(bad, 1).is_err(), "meta({bad:?})");
            assert!(
                store.manifest_path(bad, 1).is_err(),
                "manifest_path({bad:?})"
            );
            assert!(
                store.manifest_bytes(bad, 1).is_err(),
                "manifest_bytes({bad:?})"
            );
            assert!(store.manifest(bad, 1).is_err(), "manifest({bad:?})");
            assert!(store.layout(bad, 1).is_err(), "layout({bad:?})");
            assert!(store.remove(bad, None).is_err(), "remove({bad:?})");
            assert!(store.remove(bad, Some(1)).is_err(), "remove({bad:?}@1)");
            assert!(store.copy(bad, "copy").is_err(), "copy({bad:?})");
            assert!(store.copy("good", bad).is_err(), "copy(_, {bad:?})");
            assert!(store.rename("good", bad).is_err(), "rename(_, {bad:?})");
            let err = store
                .record_version(bad, &root_only(), VersionMeta::default(), None)
                .unwrap_err();
            assert!(format!("{err:#}").contains("invalid image name"), "{err:#}");
        }
        assert!(
            planted.join("manifest").exists(),
            "the planted tree is untouched"
        );
        assert_eq!(store.images().unwrap(), vec!["good".to_string()]);
        assert_eq!(store.versions("good").unwrap(), vec![1]);
    }

    /// A version recorded by an older build (meta.toml holds only the BLAKE3 of the compressed
    /// file) has the same manifest digest as a new one, passes fsck, and a corrupted file is
    /// caught through the old field.
    #[test]
    fn an_old_format_version_has_the_same_manifest_digest() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let meta = store
            .record_version("img", &root_only(), VersionMeta::default(), None)
            .unwrap();
        assert!(meta.manifest.is_empty());
        let want = root_only().digest();
        assert_eq!(meta.manifest_digest, want.to_hex());
        assert_eq!(store.manifest_digest("img", 1).unwrap(), want);
        let text = std::fs::read_to_string(store.root().join("images/img/1/meta.toml")).unwrap();
        assert!(text.contains("manifest-digest = "), "{text}");

        downgrade(&store, "img", 1);
        let old = store.meta("img", 1).unwrap();
        assert!(old.manifest_digest.is_empty() && !old.manifest.is_empty());
        assert_eq!(store.manifest_digest("img", 1).unwrap(), want);
        assert!(store.fsck().unwrap().problems.is_empty());

        let p = store.manifest_path("img", 1).unwrap();
        let mut data = std::fs::read(&p).unwrap();
        let n = data.len();
        data[n - 1] ^= 1;
        std::fs::write(&p, &data).unwrap();
        let err = store.manifest_digest("img", 1).unwrap_err();
        assert!(format!("{err:#}").contains("does not match"), "{err:#}");
        assert!(!store.fsck().unwrap().problems.is_empty());
    }

    /// Rewrites `name@v`'s record as a build before the manifest digest wrote it.
    pub(crate) fn downgrade(store: &Store, name: &str, v: u32) {
        let mut meta = store.meta(name, v).unwrap();
        meta.manifest_digest.clear();
        meta.manifest = Digest::of(&store.manifest_bytes(name, v).unwrap()).to_hex();
        let p = store.root().join(format!("images/{name}/{v}/meta.toml"));
        std::fs::write(p, toml::to_string_pretty(&meta).unwrap()).unwrap();
    }
}
