//! kiln-image: turns OCI/Docker images (registry, `docker save` archive,
//! OCI layout) into deterministic, cached newc initramfs archives with
//! kiln's agent as `/init`.
//!
//! It must never run anything from an image, never extract an image onto
//! the host filesystem (tar entries are streamed into the cpio), never need
//! root, and must treat every image as hostile input.

pub mod assemble;
pub mod build;
pub mod cache;
pub mod compress;
pub mod cpio;
pub mod digest;
pub mod erofs;
pub mod fuzz;
pub mod image;
pub mod initramfs;
pub mod layers;
pub mod lock;
pub mod reference;
pub mod registry;
pub mod root;
pub mod source;
