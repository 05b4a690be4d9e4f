use clap::Parser;

fn main() -> anyhow::Result<()> {
    si_tree::logging::init("warn");
    si_imaging::commands::getimage(si_imaging::commands::GetImageCli::parse())
}
