//! si initrd
