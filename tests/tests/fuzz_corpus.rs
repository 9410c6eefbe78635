//! The fuzz corpus (tests/fuzz/corpus/TARGET), replayed on stable through
//! the same plain functions the coverage-guided targets call (see
//! scripts/fuzz.sh): every input a fuzzer once found interesting, and every
//! crash it found (kept there as a regression), must pass.

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no corpus in {}", dir.display());
    for input in inputs {
        let data = std::fs::read(&input).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target}: {} fails", input.display());
    }
}

#[test]
fn agent_protocol_frames() {
    replay("frames", kiln_protocol::fuzz::frames);
}

#[test]
fn cpio_writer_names() {
    replay("cpio_names", kiln_image::fuzz::cpio_names);
}

#[test]
fn layer_tars_and_whiteouts() {
    replay("layers", kiln_image::fuzz::layers);
}

#[test]
fn grant_json_validator() {
    replay("grant_json", kiln_bridge::grant::fuzz::grant_json);
}

#[test]
fn virtio_rng_queue() {
    replay("virtio_rng", kiln_vmm::fuzz::rng);
}

#[test]
fn virtio_blk_queue() {
    replay("virtio_blk", kiln_vmm::fuzz::block);
}

#[test]
fn vsock_queues_and_muxer() {
    replay("vsock", kiln_vmm::fuzz::vsock);
}

#[test]
fn virtio_net_queues() {
    replay("virtio_net", kiln_vmm::fuzz::net);
}
