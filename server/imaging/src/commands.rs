//! The image management commands (`si-image`, and SystemImager's `si-lsimage`, `si-rmimage`,
//! `si-cpimage`, `si-mvimage`, `si-getimage`).

use crate::getimage::{self, human, GetImage};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use si_store::images::parse_ref;
use si_store::Store;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the store is: `--store`, else `$SI_STORE`, else `images/store` under the current
/// directory (the embedded default).
#[derive(Args, Clone, Debug)]
pub struct StoreArg {
    #[arg(long, env = "SI_STORE", default_value = "images/store", global = true)]
    pub store: PathBuf,
}

impl StoreArg {
    pub fn open(&self) -> Result<Store> {
        Store::open(&self.store)
            .with_context(|| format!("opening the image store {}", self.store.display()))
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "si-image",
    version,
    about = "Manage si images: list, diff, check out, commit, import, export, check, collect garbage"
)]
pub struct ImageCli {
    #[command(flatten)]
    pub store: StoreArg,
    #[command(subcommand)]
    pub cmd: ImageCmd,
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// List images and their newest versions.
    List,
    /// List the versions of an image, with when and from where each was made.
    Versions { image: String },
    /// Show a version's record (NAME or NAME@VERSION), optionally every entry.
    Show {
        image: String,
        #[arg(long)]
        entries: bool,
    },
    /// Print a version's disk layout.
    Layout { image: String },
    /// Paths added, removed and changed between two versions (NAME@A NAME@B).
    Diff { from: String, to: String },
    /// Materialise a version as a plain tree in DIR (must be empty or absent).
    Checkout { image: String, dir: PathBuf },
    /// Record the tree at DIR as a new version of IMAGE, storing only new objects.
    Commit {
        dir: PathBuf,
        image: String,
        #[arg(short, long)]
        message: Option<String>,
        /// Exclude patterns (none by default: the tree is the image).
        #[arg(long)]
        exclude: Vec<String>,
        /// The version's disk layout (docs/layout.md; default: the previous version's).
        #[arg(long)]
        layout: Option<PathBuf>,
    },
    /// Import a tar stream (file or - for stdin; PAX xattrs) as a new version.
    Import { tar: PathBuf, image: String },
    /// Export a version as a tar stream (file or - for stdout).
    Export { image: String, tar: PathBuf },
    /// Remove an image, or one version (NAME@V).
    Rm { image: String },
    /// Copy an image (objects are shared).
    Cp { src: String, dst: String },
    /// Rename an image.
    Mv { src: String, dst: String },
    /// Re-hash every object and check every version's references.
    Fsck,
    /// Remove objects no version references (waits for running captures).
    Gc,
    /// Bytes the store uses on disk.
    Du,
    /// The README's demo: capture DIR (default /usr/share) over loopback with the real
    /// protocol into image `demo`, then list and show it.
    Demo {
        #[arg(default_value = "/usr/share")]
        dir: PathBuf,
    },
}

pub fn run(cli: ImageCli) -> Result<()> {
    let store = cli.store.open()?;
    match cli.cmd {
        ImageCmd::List => list(&store),
        ImageCmd::Versions { image } => {
            for v in store.versions(&image)? {
                let m = store.meta(&image, v)?;
                println!(
                    "{image}@{v}\t{}\t{}\t{} files\t{}{}",
                    m.created,
                    m.source,
                    m.files,
                    human(m.bytes),
                    m.message.map(|s| format!("\t{s}")).unwrap_or_default()
                );
            }
            Ok(())
        }
        ImageCmd::Show { image, entries } => {
            let (n, v) = parse_ref(&image)?;
            let v = store.resolve(&n, v)?;
            print!("{}", toml::to_string_pretty(&store.meta(&n, v)?)?);
            if entries {
                for e in store.manifest(&n, v)?.entries {
                    println!(
                        "{:o}\t{}:{}\t{}\t/{}",
                        e.mode,
                        e.uid,
                        e.gid,
                        e.kind.name(),
                        e.path_lossy()
                    );
                }
            }
            Ok(())
        }
        ImageCmd::Layout { image } => {
            let (n, v) = parse_ref(&image)?;
            let v = store.resolve(&n, v)?;
            match store.layout(&n, v)? {
                Some(l) => print!("{l}"),
                None => bail!("{n}@{v} has no disk layout"),
            }
            Ok(())
        }
        ImageCmd::Diff { from, to } => {
            let (a, av) = parse_ref(&from)?;
            let (b, bv) = parse_ref(&to)?;
            let ma = store.manifest(&a, store.resolve(&a, av)?)?;
            let mb = store.manifest(&b, store.resolve(&b, bv)?)?;
            let d = si_proto::manifest::diff(&ma, &mb);
            for (sign, list) in [("+", &d.added), ("-", &d.removed), ("~", &d.changed)] {
                for p in list {
                    println!("{sign} /{}", String::from_utf8_lossy(p));
                }
            }
            eprintln!(
                "{} added, {} removed, {} changed",
                d.added.len(),
                d.removed.len(),
                d.changed.len()
            );
            Ok(())
        }
        ImageCmd::Checkout { image, dir } => checkout(&store, &image, &dir),
        ImageCmd::Commit {
            dir,
            image,
            message,
            exclude,
            layout,
        } => {
            let layout = match &layout {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading the layout {}", p.display()))?,
                ),
                None => None,
            };
            let s = getimage::commit_with_layout(
                &store,
                &dir,
                &image,
                &exclude,
                message,
                layout.as_deref(),
            )?;
            s.print();
            Ok(())
        }
        ImageCmd::Import { tar, image } => {
            let s = crate::tarball::import(&store, &tar, &image)?;
            s.print();
            Ok(())
        }
        ImageCmd::Export { image, tar } => {
            let (n, v) = parse_ref(&image)?;
            let v = store.resolve(&n, v)?;
            crate::tarball::export(&store, &n, v, &tar)
        }
        ImageCmd::Rm { image } => {
            let (n, v) = parse_ref(&image)?;
            store.remove(&n, v)?;
            eprintln!("removed {image} (its objects are freed by the next gc)");
            Ok(())
        }
        ImageCmd::Cp { src, dst } => store.copy(&src, &dst),
        ImageCmd::Mv { src, dst } => store.rename(&src, &dst),
        ImageCmd::Fsck => {
            let r = store.fsck()?;
            println!(
                "{} packs, {} objects ({}), {} versions checked",
                r.packs,
                r.objects,
                human(r.bytes),
                r.versions
            );
            for p in &r.problems {
                println!("PROBLEM: {p}");
            }
            if !r.problems.is_empty() {
                bail!("{} problems found", r.problems.len());
            }
            Ok(())
        }
        ImageCmd::Gc => {
            let r = store.gc(true)?;
            println!(
                "removed {} objects ({}), repacked {}, deleted {} packs",
                r.removed_objects,
                human(r.freed_bytes),
                r.repacked_objects,
                r.removed_packs
            );
            Ok(())
        }
        ImageCmd::Du => {
            println!("{}", store.disk_usage()?);
            Ok(())
        }
        ImageCmd::Demo { .. } => bail!("the demo runs from the si-image binary (si_server::demo)"),
    }
}

pub fn list(store: &Store) -> Result<()> {
    let images = store.images()?;
    if images.is_empty() {
        println!("no images in {}", store.root().display());
    }
    for name in images {
        let vs = store.versions(&name)?;
        let Some(&last) = vs.last() else { continue };
        let m = store.meta(&name, last)?;
        println!(
            "{name}\t{} versions\tlatest {last}\t{}\t{}\t{} files\t{}",
            vs.len(),
            m.created,
            m.source,
            m.files,
            human(m.bytes)
        );
    }
    Ok(())
}

pub fn checkout(store: &Store, image: &str, dir: &Path) -> Result<()> {
    let (n, v) = parse_ref(image)?;
    let v = store.resolve(&n, v)?;
    let m = store.manifest(&n, v)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let st = si_tree::apply::apply_fresh(&m, dir, store, threads)?;
    eprintln!(
        "checked out {n}@{v} into {}: {} entries, {} files, {}",
        dir.display(),
        st.entries,
        st.files,
        human(st.bytes)
    );
    Ok(())
}

pub fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// `si-getimage`.
#[derive(Parser, Debug)]
#[command(
    name = "si-getimage",
    version,
    about = "Pull a golden client's tree into the image store"
)]
pub struct GetImageCli {
    #[command(flatten)]
    pub store: StoreArg,
    /// The golden client running si-prepareclient (HOST or HOST:PORT; port 7810 by default).
    #[arg(long)]
    pub golden_client: String,
    /// The token si-prepareclient printed.
    #[arg(long, env = "SI_TOKEN")]
    pub token: String,
    /// Image name (a new version is added if it exists).
    #[arg(long)]
    pub image: String,
    /// Extra exclude patterns.
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Files of exclude patterns.
    #[arg(long)]
    pub exclude_file: Vec<PathBuf>,
    /// Do not apply the default excludes.
    #[arg(long)]
    pub no_default_excludes: bool,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    /// Plain TCP with the token in the clear (lab use only; si-prepareclient --insecure too).
    #[arg(long)]
    pub insecure: bool,
    /// The master's CA (default /var/lib/si/ca when it exists): its certificate is presented
    /// to a golden client that pins the CA (si-prepareclient --ca-fingerprint).
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
}

/// The master's certificate from the CA in `dir` (or in /var/lib/si/ca when that exists).
fn master_cert(dir: Option<&Path>) -> Result<Option<si_trust::capture::Chain>> {
    let default = Path::new("/var/lib/si/ca");
    let dir = match dir {
        Some(d) => d,
        None if default.join("ca.key").exists() => default,
        None => return Ok(None),
    };
    let ca = si_trust::ca::Authority::open(dir)?;
    Ok(Some(ca.master_chain()))
}

pub fn getimage(cli: GetImageCli) -> Result<()> {
    let store = cli.store.open()?;
    let golden = if cli.golden_client.contains(':') {
        cli.golden_client.clone()
    } else {
        format!("{}:7810", cli.golden_client)
    };
    let excludes =
        getimage::capture_excludes(!cli.no_default_excludes, &cli.exclude, &cli.exclude_file)?;
    let s = getimage::get_image(
        &store,
        &GetImage {
            golden,
            token: cli.token,
            image: cli.image,
            excludes,
            progress: console_is_tty(),
            connect_timeout: Duration::from_secs(10),
            insecure: cli.insecure,
            master_cert: master_cert(cli.ca_dir.as_deref())?,
        },
    )?;
    s.print();
    if let Some(p) = cli.summary_json {
        std::fs::write(&p, serde_json::to_vec_pretty(&s)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clis_are_consistent() {
        ImageCli::command().debug_assert();
        GetImageCli::command().debug_assert();
    }
}
