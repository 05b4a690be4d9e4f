//! Disk layout detection (placeholder until the layout branch lands).

use anyhow::{bail, Result};
use si_proto::layout::Layout;
use std::path::Path;

pub fn detect(root: &Path) -> Result<Layout> {
    bail!(
        "disk layout detection for {} is not available in this build; pass --layout FILE",
        root.display()
    )
}
