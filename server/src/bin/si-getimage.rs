use clap::Parser;

fn main() -> anyhow::Result<()> {
    si_server::imagecmd::getimage(si_server::imagecmd::GetImageCli::parse())
}
