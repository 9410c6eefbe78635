//! `kiln demo`: the README's first command. Boots a micro-VM from the small
//! busybox image that `scripts/setup.sh` packed as an OCI layout, runs its
//! default command (which shows it is in a VM) and prints the statistics.

use std::path::Path;

use anyhow::{bail, Result};
use clap::Args;
use kiln_image::cache::Cache;

use crate::run::{self, RunArgs};

#[derive(Args)]
pub struct DemoArgs {
    /// Print the statistics as JSON (on standard error).
    #[arg(long)]
    json: bool,
}

/// Where setup.sh puts the demo image, under `$KILN_HOME`.
pub const DEMO_LAYOUT: &str = "demo/oci";
/// Its tag.
pub const DEMO_TAG: &str = "demo";

pub fn demo(cache: &Cache, home: &Path, a: DemoArgs) -> Result<i32> {
    let layout = home.join(DEMO_LAYOUT);
    if !layout.join("index.json").is_file() {
        bail!(
            "the demo image is missing at {}: run scripts/setup.sh",
            layout.display()
        );
    }
    eprintln!(
        "kiln demo: a busybox image in a fresh micro-VM (2 vCPUs, 256 MiB) on kiln-vmm; \
         where KVM emulates the guest kernel (nested PVM) booting takes a minute or two"
    );
    let args = RunArgs {
        image: None,
        docker_archive: None,
        oci_layout: Some(format!("{}:{DEMO_TAG}", layout.display())),
        vcpus: 2,
        mem: 256,
        // A safety net only: process start-up is slow where the guest
        // kernel is emulated, slower still on a busy host.
        timeout: Some(std::time::Duration::from_secs(600)),
        env: Vec::new(),
        workdir: None,
        user: None,
        interactive: false,
        publish: Vec::new(),
        stats: !a.json,
        json: a.json,
        insecure: Vec::new(),
        kernel: None,
        vmm_metrics: None,
        no_jail: false,
        // The demo shows a boot; `kiln run` restores a saved VM instead.
        cold: true,
        rootfs: crate::image::Rootfs::Auto,
        disk: None,
        cmd: Vec::new(),
    };
    run::run(cache, home, args)
}
