//! si-rmimage: remove an image or one version (SystemImager's name for `si-image rm`).
use clap::Parser;
use si_imaging::commands::{ImageCli, ImageCmd, StoreArg};

#[derive(Parser)]
#[command(version, about = "Remove an image (NAME) or one version (NAME@V)")]
struct Cli {
    #[command(flatten)]
    store: StoreArg,
    image: String,
}

fn main() -> anyhow::Result<()> {
    let c = Cli::parse();
    si_imaging::commands::run(ImageCli {
        store: c.store,
        cmd: ImageCmd::Rm { image: c.image },
    })
}
