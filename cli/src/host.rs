//! `kiln host …`: this machine as an owned host of a fleet. A bridge runs
//! these over SSH; each prints one JSON document (`{"ok": …}` or
//! `{"error": {"kind", "message"}}`) and exits 0 or 1.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_bridge::host::call::{answer, Call};

#[derive(Args)]
pub struct HostArgs {
    /// The host's state directory (images, grants, `host.toml`).
    #[arg(long, env = "KILN_HOME", default_value = "/var/lib/kiln")]
    home: PathBuf,
    #[command(subcommand)]
    command: HostCommand,
}

#[derive(Subcommand)]
enum HostCommand {
    /// kiln's version, KVM, TDX, and the capacity grants may use now.
    Info,
    /// Boot a grant's VM (the grant as JSON on standard input) and print
    /// its instance once it runs. A grant already running is returned.
    Provision {
        /// The SSH host key the VM serves (an unencrypted ed25519 OpenSSH
        /// private key, as the bridge made it for the grant); a fresh one
        /// without it.
        #[arg(long, value_name = "FILE")]
        host_key: Option<PathBuf>,
    },
    /// Where a grant is: provisioning, running, or ended (with its usage).
    Status { id: String },
    /// A running grant's usage so far.
    Usage { id: String },
    /// Stop a grant's VM; the workload gets its grace period.
    Terminate { id: String },
    /// Remove what a provision that never returned left behind.
    Abandon { id: String },
    /// Every grant on this host.
    List,
}

pub fn run(a: HostArgs) -> Result<i32> {
    let call = match a.command {
        HostCommand::Info => Call::Info,
        HostCommand::Provision { host_key } => {
            let mut grant = Vec::new();
            std::io::stdin()
                .take(1 << 20)
                .read_to_end(&mut grant)
                .context("reading the grant from standard input")?;
            Call::Provision { grant, host_key }
        }
        HostCommand::Status { id } => Call::Status(id),
        HostCommand::Usage { id } => Call::Usage(id),
        HostCommand::Terminate { id } => Call::Terminate(id),
        HostCommand::Abandon { id } => Call::Abandon(id),
        HostCommand::List => Call::List,
    };
    let (reply, ok) = answer(&a.home, call);
    println!("{reply}");
    Ok(if ok { 0 } else { 1 })
}
