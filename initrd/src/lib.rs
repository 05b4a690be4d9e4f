//! si initrd: the boot package nodes netboot into (`bootpkg`, `si-mkbootpackage`), and the
//! small test initramfs of the PXE tests (`testimage`).
pub mod bootpkg;
pub mod cpio;
pub mod libs;
pub mod modules;
pub mod storekernel;
pub mod testimage;
