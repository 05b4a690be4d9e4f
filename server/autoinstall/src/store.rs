//! The on-disk state of si-autoinstall (layout in the crate documentation).

use crate::distro::Distro;
use crate::{check_name, check_var};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Largest template, snippet or variables file read (bytes).
pub const MAX_TEMPLATE: u64 = 1 << 20;

/// An installation profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub distro: String,
    /// Appended to the installer's kernel command line (before the group's).
    #[serde(default)]
    pub kernel_args: String,
    /// Template variables; the group's and then the node's override them.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Where the template was read from (for `show`).
    #[serde(default)]
    pub template_source: String,
}

/// Where a snippet is kept; looked up per node, then profile, then distro, then global.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Node(String),
    Profile(String),
    Distro(String),
    Global,
}

impl Scope {
    fn rel(&self) -> Result<PathBuf> {
        Ok(match self {
            Scope::Node(n) => {
                check_name("node", n)?;
                PathBuf::from("node").join(n)
            }
            Scope::Profile(p) => {
                check_name("profile", p)?;
                PathBuf::from("profile").join(p)
            }
            Scope::Distro(d) => {
                check_name("distro", d)?;
                PathBuf::from("distro").join(d)
            }
            Scope::Global => PathBuf::from("global"),
        })
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Node(n) => write!(f, "node {n}"),
            Scope::Profile(p) => write!(f, "profile {p}"),
            Scope::Distro(d) => write!(f, "distro {d}"),
            Scope::Global => f.write_str("global"),
        }
    }
}

/// The autoinstall state beneath a server state directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .with_context(|| format!("creating {}", p.display()))
}

/// Reads a text file of at most [`MAX_TEMPLATE`] bytes.
pub fn read_bounded(p: &Path) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut s = String::new();
    f.take(MAX_TEMPLATE + 1)
        .read_to_string(&mut s)
        .with_context(|| format!("reading {} (UTF-8 text)", p.display()))?;
    if s.len() as u64 > MAX_TEMPLATE {
        bail!("{} is larger than {MAX_TEMPLATE} bytes", p.display());
    }
    Ok(s)
}

/// Writes `data` to `path` through a temporary file and a rename; mode 0600.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let name = path.file_name().context("path has no file name")?;
    let mut tmp_name = std::ffi::OsString::from(".tmp-");
    tmp_name.push(name);
    let tmp = path.with_file_name(tmp_name);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

impl Store {
    /// Opens (creating) `<state_dir>/autoinstall`.
    pub fn open(state_dir: &Path) -> Result<Store> {
        let root = state_dir.join("autoinstall");
        for sub in ["distros", "profiles", "snippets/global", "vars", "tokens"] {
            mkdir(&root.join(sub))?;
        }
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory served as [`crate::DISTRO_PREFIX`].
    pub fn distros_dir(&self) -> PathBuf {
        self.root.join("distros")
    }

    pub fn distro_dir(&self, name: &str) -> Result<PathBuf> {
        check_name("distro", name)?;
        Ok(self.distros_dir().join(name))
    }

    pub fn distro(&self, name: &str) -> Result<Distro> {
        let p = self.distro_dir(name)?.join("distro.toml");
        if !p.exists() {
            bail!("unknown distro {name:?} (see `si-distro list`)");
        }
        let t = read_bounded(&p)?;
        toml::from_str(&t).with_context(|| format!("parsing {}", p.display()))
    }

    pub fn distros(&self) -> Result<Vec<Distro>> {
        let mut v = Vec::new();
        for name in self.names(&self.distros_dir())? {
            v.push(self.distro(&name)?);
        }
        Ok(v)
    }

    /// Directory entries that are valid names (temporary and hidden ones left out), sorted.
    fn names(&self, dir: &Path) -> Result<Vec<String>> {
        let mut v = Vec::new();
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for e in rd {
            let e = e.with_context(|| format!("listing {}", dir.display()))?;
            if let Some(n) = e.file_name().to_str() {
                let n = n.strip_suffix(".toml").unwrap_or(n);
                if check_name("entry", n).is_ok() {
                    v.push(n.to_string());
                }
            }
        }
        v.sort();
        Ok(v)
    }

    pub fn remove_distro(&self, name: &str) -> Result<()> {
        let d = self.distro_dir(name)?;
        if !d.join("distro.toml").exists() {
            bail!("unknown distro {name:?}");
        }
        let users: Vec<String> = self
            .profiles()?
            .into_iter()
            .filter(|p| p.distro == name)
            .map(|p| p.name)
            .collect();
        if !users.is_empty() {
            bail!(
                "distro {name:?} is used by profiles {}: remove them first",
                users.join(", ")
            );
        }
        std::fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))
    }

    // ----- profiles -----

    fn profile_dir(&self, name: &str) -> Result<PathBuf> {
        check_name("profile", name)?;
        Ok(self.root.join("profiles").join(name))
    }

    /// Adds or replaces a profile and its template. The distro must exist and the template
    /// must parse.
    pub fn put_profile(&self, p: &Profile, template: &str) -> Result<()> {
        self.distro(&p.distro)
            .with_context(|| format!("checking the distro of profile {}", p.name))?;
        for k in p.vars.keys() {
            check_var(k)?;
        }
        if p.kernel_args.contains('\n') {
            bail!("kernel arguments of profile {} contain a newline", p.name);
        }
        crate::render::check_syntax(template)
            .with_context(|| format!("checking the template of profile {}", p.name))?;
        let dir = self.profile_dir(&p.name)?;
        mkdir(&dir)?;
        write_atomic(&dir.join("template"), template.as_bytes())?;
        let t = toml::to_string(p).context("encoding the profile")?;
        write_atomic(&dir.join("profile.toml"), t.as_bytes())
    }

    pub fn profile(&self, name: &str) -> Result<Profile> {
        let p = self.profile_dir(name)?.join("profile.toml");
        if !p.exists() {
            bail!("unknown profile {name:?} (see `si-profile list`)");
        }
        let t = read_bounded(&p)?;
        toml::from_str(&t).with_context(|| format!("parsing {}", p.display()))
    }

    pub fn template(&self, profile: &str) -> Result<String> {
        read_bounded(&self.profile_dir(profile)?.join("template"))
    }

    pub fn profiles(&self) -> Result<Vec<Profile>> {
        let mut v = Vec::new();
        for name in self.names(&self.root.join("profiles"))? {
            v.push(self.profile(&name)?);
        }
        Ok(v)
    }

    pub fn remove_profile(&self, name: &str) -> Result<()> {
        let d = self.profile_dir(name)?;
        if !d.join("profile.toml").exists() {
            bail!("unknown profile {name:?}");
        }
        std::fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))
    }

    // ----- snippets -----

    fn snippet_path(&self, scope: &Scope, name: &str) -> Result<PathBuf> {
        check_name("snippet", name)?;
        Ok(self.root.join("snippets").join(scope.rel()?).join(name))
    }

    pub fn put_snippet(&self, scope: &Scope, name: &str, text: &str) -> Result<()> {
        crate::render::check_syntax(text)
            .with_context(|| format!("checking snippet {name} ({scope})"))?;
        let p = self.snippet_path(scope, name)?;
        mkdir(p.parent().context("snippet path has no parent")?)?;
        write_atomic(&p, text.as_bytes())
    }

    /// The snippet's text in `scope`, if it has one there.
    pub fn snippet(&self, scope: &Scope, name: &str) -> Result<Option<String>> {
        let p = self.snippet_path(scope, name)?;
        if !p.exists() {
            return Ok(None);
        }
        read_bounded(&p).map(Some)
    }

    pub fn snippets(&self, scope: &Scope) -> Result<Vec<String>> {
        self.names(&self.root.join("snippets").join(scope.rel()?))
    }

    pub fn remove_snippet(&self, scope: &Scope, name: &str) -> Result<()> {
        let p = self.snippet_path(scope, name)?;
        std::fs::remove_file(&p).with_context(|| format!("removing snippet {name} ({scope})"))
    }

    // ----- variables of groups and nodes -----

    fn vars_path(&self, kind: &str, name: &str) -> Result<PathBuf> {
        check_name(kind, name)?;
        Ok(self
            .root
            .join("vars")
            .join(kind)
            .join(format!("{name}.toml")))
    }

    /// Variables of a `group` or `node` (empty if none were set).
    pub fn vars(&self, kind: &str, name: &str) -> Result<BTreeMap<String, String>> {
        let p = self.vars_path(kind, name)?;
        if !p.exists() {
            return Ok(BTreeMap::new());
        }
        let t = read_bounded(&p)?;
        toml::from_str(&t).with_context(|| format!("parsing {}", p.display()))
    }

    pub fn put_vars(&self, kind: &str, name: &str, vars: &BTreeMap<String, String>) -> Result<()> {
        for k in vars.keys() {
            check_var(k)?;
        }
        let p = self.vars_path(kind, name)?;
        mkdir(p.parent().context("vars path has no parent")?)?;
        let t = toml::to_string(vars).context("encoding variables")?;
        write_atomic(&p, t.as_bytes())
    }

    // ----- one-time tokens -----

    fn token_path(&self, node: &str) -> Result<PathBuf> {
        check_name("node", node)?;
        Ok(self.root.join("tokens").join(node))
    }

    /// The node's install token, created when it has none. It is in the boot configuration's
    /// answer-file URL and in the answer file's callback; the callback consumes it.
    pub fn token(&self, node: &str) -> Result<String> {
        let p = self.token_path(node)?;
        if let Some(t) = self.existing_token(node)? {
            return Ok(t);
        }
        let t = si_proto::handshake::new_token().context("drawing a random token")?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
        {
            Ok(mut f) => {
                f.write_all(t.as_bytes())
                    .with_context(|| format!("writing {}", p.display()))?;
                f.sync_all()
                    .with_context(|| format!("syncing {}", p.display()))?;
                Ok(t)
            }
            // Another process made it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => self
                .existing_token(node)?
                .context("the token file vanished while being created"),
            Err(e) => Err(e).with_context(|| format!("creating {}", p.display())),
        }
    }

    /// The node's token, if it has one now.
    pub fn existing_token(&self, node: &str) -> Result<Option<String>> {
        let p = self.token_path(node)?;
        match std::fs::read_to_string(&p) {
            // A token file being written is empty for an instant: treat it as absent.
            Ok(t) if t.len() == 32 => Ok(Some(t)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Whether `presented` is the node's token (constant-time).
    pub fn token_matches(&self, node: &str, presented: &str) -> Result<bool> {
        Ok(match self.existing_token(node)? {
            Some(t) => si_proto::handshake::ct_eq(t.as_bytes(), presented.as_bytes()),
            None => false,
        })
    }

    /// Consumes the node's token if `presented` matches; true when it did.
    pub fn consume_token(&self, node: &str, presented: &str) -> Result<bool> {
        if !self.token_matches(node, presented)? {
            return Ok(false);
        }
        let p = self.token_path(node)?;
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(true),
            // A concurrent callback consumed it first: only one wins.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
        }
    }
}
