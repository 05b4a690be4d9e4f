//! The `si-distro` and `si-profile` command lines; the binaries only parse and call
//! [`distro_main`] or [`profile_main`].

use crate::distro::{self, Hints};
use crate::render::{render_answer, ServerUrls};
use crate::store::{read_bounded, write_atomic, Profile, Scope, Store};
use crate::{parse_var, Family};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use si_inventory::Inventory;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

/// Options every command takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// State directory of si-server (inventory.db, autoinstall/).
    #[arg(long, env = "SI_STATE_DIR", default_value = "/var/lib/si")]
    pub state_dir: PathBuf,
}

impl Common {
    fn store(&self) -> Result<Store> {
        Store::open(&self.state_dir)
    }
}

/// What si-server last said about where nodes reach it (`autoinstall/server.toml`), so that
/// `si-profile render` prints the URLs the node gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerFile {
    pub http_base: String,
}

/// Records the server's HTTP base for `si-profile render` (si-server calls this at start).
pub fn record_server(store: &Store, urls: &ServerUrls) -> Result<()> {
    let t = toml::to_string(&ServerFile {
        http_base: urls.http_base.clone(),
    })
    .context("encoding server.toml")?;
    write_atomic(&store.root().join("server.toml"), t.as_bytes())
}

fn server_urls(store: &Store, given: Option<String>) -> Result<ServerUrls> {
    if let Some(b) = given {
        return Ok(ServerUrls {
            http_base: b.trim_end_matches('/').to_string(),
        });
    }
    let p = store.root().join("server.toml");
    if !p.exists() {
        bail!("si-server has not run with HTTP on this state directory yet: give --http-base");
    }
    let f: ServerFile =
        toml::from_str(&read_bounded(&p)?).with_context(|| format!("parsing {}", p.display()))?;
    Ok(ServerUrls {
        http_base: f.http_base,
    })
}

/// Manage distros: installer kernels and initrds, and package trees.
#[derive(Parser, Debug)]
#[command(name = "si-distro", version)]
pub struct DistroCli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub cmd: DistroCmd,
}

#[derive(Subcommand, Debug)]
pub enum DistroCmd {
    /// Register a distro from an installation tree, an ISO image or a tarball (family and
    /// architecture detected from .treeinfo, content/media.1, .disk/info or
    /// debian-installer/<arch>/).
    Import {
        #[arg(long)]
        name: String,
        #[arg(long)]
        path: PathBuf,
        /// Keep the whole tree and serve it over HTTP as the distro's package tree.
        #[arg(long)]
        tree: bool,
        /// Override detection: debian, redhat or suse.
        #[arg(long)]
        family: Option<Family>,
        #[arg(long)]
        arch: Option<String>,
        /// The installer kernel, relative to the tree.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// The installer initrd, relative to the tree.
        #[arg(long)]
        initrd: Option<PathBuf>,
    },
    List,
    Show {
        name: String,
    },
    Rm {
        name: String,
    },
}

pub fn distro_main(cli: DistroCli) -> Result<()> {
    let store = cli.common.store()?;
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        DistroCmd::Import {
            name,
            path,
            tree,
            family,
            arch,
            kernel,
            initrd,
        } => {
            let hints = Hints {
                family,
                arch,
                kernel,
                initrd,
            };
            let d = distro::import(&store, &name, &path, &hints, tree)?;
            writeln!(
                out,
                "imported {} ({}, {}): {}",
                d.name, d.family, d.arch, d.description
            )
            .context("writing to stdout")?;
        }
        DistroCmd::List => {
            writeln!(
                out,
                "{:<20} {:<8} {:<8} {:<5} DESCRIPTION",
                "NAME", "FAMILY", "ARCH", "TREE"
            )
            .context("writing to stdout")?;
            for d in store.distros()? {
                writeln!(
                    out,
                    "{:<20} {:<8} {:<8} {:<5} {}",
                    d.name,
                    d.family,
                    d.arch,
                    if d.tree { "yes" } else { "no" },
                    d.description
                )
                .context("writing to stdout")?;
            }
        }
        DistroCmd::Show { name } => {
            let d = store.distro(&name)?;
            writeln!(
                out,
                "name: {}\nfamily: {}\narch: {}\ndescription: {}\nkernel: {}\ninitrd: {}\ntree: {}\nsource: {}",
                d.name,
                d.family,
                d.arch,
                d.description,
                d.kernel_path(),
                d.initrd_path(),
                if d.tree { format!("{}/{}/tree", crate::DISTRO_PREFIX, d.name) } else { "-".into() },
                d.source
            )
            .context("writing to stdout")?;
        }
        DistroCmd::Rm { name } => store.remove_distro(&name)?,
    }
    Ok(())
}

/// Manage installation profiles, their snippets and the variables of groups and nodes.
#[derive(Parser, Debug)]
#[command(name = "si-profile", version)]
pub struct ProfileCli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub cmd: ProfileCmd,
}

/// Where a snippet goes: at most one of these; none is global.
#[derive(Args, Debug, Clone, Default)]
pub struct ScopeArgs {
    #[arg(long, conflicts_with_all = ["profile", "distro"])]
    pub node: Option<String>,
    #[arg(long, conflicts_with = "distro")]
    pub profile: Option<String>,
    #[arg(long)]
    pub distro: Option<String>,
}

impl ScopeArgs {
    fn scope(&self) -> Scope {
        match (&self.node, &self.profile, &self.distro) {
            (Some(n), _, _) => Scope::Node(n.clone()),
            (_, Some(p), _) => Scope::Profile(p.clone()),
            (_, _, Some(d)) => Scope::Distro(d.clone()),
            _ => Scope::Global,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ProfileCmd {
    /// Add (or with --replace, replace) a profile.
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        distro: String,
        /// The answer-file template (minijinja).
        #[arg(long)]
        template: PathBuf,
        /// Appended to the installer's kernel command line.
        #[arg(long, allow_hyphen_values = true, default_value = "")]
        kernel_args: String,
        /// A template variable, KEY=VALUE (repeat).
        #[arg(long = "var")]
        vars: Vec<String>,
        #[arg(long)]
        replace: bool,
    },
    List,
    Show {
        name: String,
    },
    Rm {
        name: String,
    },
    /// Print exactly the answer file NODE gets now (creates its token if it has none).
    Render {
        node: String,
        /// The URL nodes reach si-server's HTTP at (default: what si-server last recorded).
        #[arg(long)]
        http_base: Option<String>,
    },
    /// Render the answer file of every node that has a profile (or of NODES, a range like
    /// `n[1-100]`) and report the ones that fail; `--repeat` renders each that many times
    /// (a benchmark). Nothing is printed but errors and a summary.
    Check {
        nodes: Option<String>,
        #[arg(long)]
        http_base: Option<String>,
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
    /// Snippets: templates included by name, looked up per node, profile, distro, then global.
    #[command(subcommand)]
    Snippet(SnippetCmd),
    /// Set or unset template variables of a group or a node; prints them.
    Vars {
        #[arg(long, conflicts_with = "node", required_unless_present = "node")]
        group: Option<String>,
        #[arg(long)]
        node: Option<String>,
        /// KEY=VALUE (repeat).
        #[arg(long)]
        set: Vec<String>,
        /// KEY (repeat).
        #[arg(long)]
        unset: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnippetCmd {
    Add {
        name: String,
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    List {
        #[command(flatten)]
        scope: ScopeArgs,
    },
    Show {
        name: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    Rm {
        name: String,
        #[command(flatten)]
        scope: ScopeArgs,
    },
}

pub fn profile_main(cli: ProfileCli) -> Result<()> {
    let store = cli.common.store()?;
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        ProfileCmd::Add {
            name,
            distro,
            template,
            kernel_args,
            vars,
            replace,
        } => {
            crate::check_name("profile", &name)?;
            if !replace && store.profile(&name).is_ok() {
                bail!("profile {name:?} already exists (--replace to change it)");
            }
            let text = read_bounded(&template)?;
            let vars = vars
                .iter()
                .map(|v| parse_var(v))
                .collect::<Result<BTreeMap<_, _>>>()?;
            let p = Profile {
                name,
                distro,
                kernel_args,
                vars,
                template_source: template.display().to_string(),
            };
            store.put_profile(&p, &text)?;
        }
        ProfileCmd::List => {
            writeln!(out, "{:<20} {:<20} KERNEL ARGS", "NAME", "DISTRO")
                .context("writing to stdout")?;
            for p in store.profiles()? {
                writeln!(out, "{:<20} {:<20} {}", p.name, p.distro, p.kernel_args)
                    .context("writing to stdout")?;
            }
        }
        ProfileCmd::Show { name } => {
            let p = store.profile(&name)?;
            writeln!(
                out,
                "name: {}\ndistro: {}\nkernel args: {}\ntemplate: {}",
                p.name, p.distro, p.kernel_args, p.template_source
            )
            .context("writing to stdout")?;
            for (k, v) in &p.vars {
                writeln!(out, "var {k} = {v}").context("writing to stdout")?;
            }
        }
        ProfileCmd::Rm { name } => store.remove_profile(&name)?,
        ProfileCmd::Render { node, http_base } => {
            let urls = server_urls(&store, http_base)?;
            let inv = Inventory::open_state_dir(&cli.common.state_dir)?;
            let r = render_answer(&store, &inv, &node, &urls)?;
            out.write_all(r.text.as_bytes())
                .context("writing to stdout")?;
        }
        ProfileCmd::Check {
            nodes,
            http_base,
            repeat,
        } => {
            let urls = server_urls(&store, http_base)?;
            let inv = Inventory::open_state_dir(&cli.common.state_dir)?;
            let names: Vec<String> = match nodes {
                Some(r) => si_inventory::ranges::expand(&r)?,
                None => {
                    let mut v = Vec::new();
                    for n in inv.nodes()? {
                        if inv.boot_info(&n.name)?.is_some_and(|b| b.profile.is_some()) {
                            v.push(n.name);
                        }
                    }
                    v
                }
            };
            let start = std::time::Instant::now();
            let (mut ok, mut failed, mut bytes) = (0u64, 0u64, 0u64);
            for _ in 0..repeat.max(1) {
                for n in &names {
                    match render_answer(&store, &inv, n, &urls) {
                        Ok(r) => {
                            ok += 1;
                            bytes += r.text.len() as u64;
                        }
                        Err(e) => {
                            failed += 1;
                            if repeat <= 1 {
                                eprintln!("{n}: {e:#}");
                            }
                        }
                    }
                }
            }
            let took = start.elapsed();
            let per = took.as_secs_f64() * 1e6 / (ok + failed).max(1) as f64;
            writeln!(
                out,
                "rendered {ok} answer files ({bytes} bytes) for {} nodes, {failed} failed, in {:.3} s ({per:.0} us per file)",
                names.len(),
                took.as_secs_f64()
            )
            .context("writing to stdout")?;
            if failed > 0 {
                bail!("{failed} answer files failed to render");
            }
        }
        ProfileCmd::Snippet(cmd) => match cmd {
            SnippetCmd::Add { name, file, scope } => {
                let text = read_bounded(&file)?;
                store.put_snippet(&scope.scope(), &name, &text)?;
            }
            SnippetCmd::List { scope } => {
                for s in store.snippets(&scope.scope())? {
                    writeln!(out, "{s}").context("writing to stdout")?;
                }
            }
            SnippetCmd::Show { name, scope } => {
                let s = scope.scope();
                let t = store
                    .snippet(&s, &name)?
                    .with_context(|| format!("no snippet {name:?} ({s})"))?;
                out.write_all(t.as_bytes()).context("writing to stdout")?;
            }
            SnippetCmd::Rm { name, scope } => store.remove_snippet(&scope.scope(), &name)?,
        },
        ProfileCmd::Vars {
            group,
            node,
            set,
            unset,
        } => {
            let (kind, name) = match (&group, &node) {
                (Some(g), _) => ("group", g.as_str()),
                (_, Some(n)) => ("node", n.as_str()),
                _ => bail!("give --group or --node"),
            };
            let mut vars = store.vars(kind, name)?;
            for s in &set {
                let (k, v) = parse_var(s)?;
                vars.insert(k, v);
            }
            for k in &unset {
                vars.remove(k);
            }
            if !set.is_empty() || !unset.is_empty() {
                store.put_vars(kind, name, &vars)?;
            }
            for (k, v) in &vars {
                writeln!(out, "{k}={v}").context("writing to stdout")?;
            }
        }
    }
    Ok(())
}
