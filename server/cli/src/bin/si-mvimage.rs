//! si-mvimage: SystemImager's name for `si-image mv`.
use clap::Parser;
use si_imaging::commands::{ImageCli, ImageCmd, StoreArg};

#[derive(Parser)]
#[command(version, about = "Rename an image")]
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
        cmd: ImageCmd::Mv {
            src: c.src,
            dst: c.dst,
        },
    })
}
