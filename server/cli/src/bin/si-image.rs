use clap::Parser;
use si_imaging::commands::{ImageCli, ImageCmd};

fn main() -> anyhow::Result<()> {
    si_tree::logging::init("warn");
    let cli = ImageCli::parse();
    if let ImageCmd::Demo { dir } = &cli.cmd {
        return si_server::demo::run(&cli.store.open()?, dir);
    }
    si_imaging::commands::run(cli)
}
