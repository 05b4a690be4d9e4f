//! si-cpimage: SystemImager's name for `si-image cp`.
use clap::Parser;
use si_imaging::commands::{ImageCli, ImageCmd, StoreArg};

#[derive(Parser)]
#[command(version, about = "Copy an image (objects are shared)")]
struct Cli {
    #[command(flatten)]
    store: StoreArg,
    src: String,
    dst: String,
}

fn main() -> anyhow::Result<()> {
    let c = Cli::parse();
    si_imaging::commands::run(ImageCli {
        store: c.store,
        cmd: ImageCmd::Cp {
            src: c.src,
            dst: c.dst,
        },
    })
}
