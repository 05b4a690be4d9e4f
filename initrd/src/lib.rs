//! si initrd
pub mod cpio;
pub mod testimage;
