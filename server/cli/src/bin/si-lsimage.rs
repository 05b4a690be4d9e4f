//! si-lsimage: list the images in the store (SystemImager's name for `si-image list`).
use clap::Parser;
use si_imaging::commands::{ImageCli, ImageCmd, StoreArg};

#[derive(Parser)]
#[command(version, about = "List the images in the store")]
struct Cli {
    #[command(flatten)]
    store: StoreArg,
}

fn main() -> anyhow::Result<()> {
    let c = Cli::parse();
    si_imaging::commands::run(ImageCli {
        store: c.store,
        cmd: ImageCmd::List,
    })
}
