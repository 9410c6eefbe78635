//! kiln-agent: PID 1 inside every micro-VM. It prepares the guest (mounts,
//! hostname, loopback, entropy), reports `ready` to the host over vsock,
//! runs the image's workload as the image's user, streams its output,
//! reaps every process, reports usage and the exit status, and powers the
//! VM off when a one-shot workload ends. It serves SSH and the guest TCP
//! ports the host publishes over vsock.
//! It must depend on nothing a bare initramfs does not have: it is a static
//! binary and reads only the kernel's interfaces and its own files.

pub mod identity;
pub mod image_config;
pub mod publish;
pub mod reaper;
pub mod rootfs;
pub mod ssh;
pub mod system;
pub mod usage;
pub mod user;
pub mod vsock;
pub mod workload;
