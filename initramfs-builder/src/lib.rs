//! kiln-image: turns OCI/Docker images into deterministic initramfs
//! archives with kiln's agent as `/init`. It never runs anything from an
//! image. So far: the newc cpio writer every initramfs is made with.

pub mod cpio;
