use clap::Parser;

fn main() -> anyhow::Result<()> {
    si_server::imagecmd::run(si_server::imagecmd::ImageCli::parse())
}
