//! Which images exist. The integrator backs [`ImageCatalog`] with the image store; until then
//! the CLI checks `<store>/images/<name>` directories or an explicit list.

use anyhow::{Context, Result};
use std::path::PathBuf;

pub trait ImageCatalog: Send + Sync {
    /// `Ok(None)` when this catalog cannot tell (the check is skipped).
    fn has_image(&self, name: &str) -> Result<Option<bool>>;
}

/// Knows nothing: every image check is skipped.
pub struct NoCatalog;

impl ImageCatalog for NoCatalog {
    fn has_image(&self, _name: &str) -> Result<Option<bool>> {
        Ok(None)
    }
}

/// A fixed list of image names (`--images a,b`).
pub struct ListCatalog(pub Vec<String>);

impl ImageCatalog for ListCatalog {
    fn has_image(&self, name: &str) -> Result<Option<bool>> {
        Ok(Some(self.0.iter().any(|n| n == name)))
    }
}

/// Directories `<store>/images/<name>`.
pub struct StoreCatalog(pub PathBuf);

impl ImageCatalog for StoreCatalog {
    fn has_image(&self, name: &str) -> Result<Option<bool>> {
        si_proto::path::image_name(name)?;
        let p = self.0.join("images").join(name);
        match std::fs::metadata(&p) {
            Ok(m) => Ok(Some(m.is_dir())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(false)),
            Err(e) => Err(e).with_context(|| format!("checking {}", p.display())),
        }
    }
}
