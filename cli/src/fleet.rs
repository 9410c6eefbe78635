//! `kiln fleet caps`: what kilnd's fleet offers. `kiln fleet add-host`:
//! installs or upgrades kiln on an owned host over SSH (no kilnd needed).
//! `kiln fleet bundle`: the same files as one tarball, for cloud
//! instances to fetch at boot.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_bridge::backend::HostState;
use kiln_bridge::backends::ssh::install::{
    self, AddHost, Installed, DEFAULT_KILN_HOME, DEFAULT_PREFIX,
};
use kiln_bridge::bundle::{self, Bundle, Sources};
use kiln_bridge::capacity::CapacitySnapshot;
use kiln_bridge::fleet::ProviderCard;

use crate::kilnd::KilndArgs;
use crate::output::{print_fields, print_json, print_table};

#[derive(Args)]
pub struct FleetArgs {
    /// Print the answer as JSON on standard output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: FleetCommand,
}

#[derive(Subcommand)]
enum FleetCommand {
    /// The provider card: regions, TDX, capacity, and the backends in
    /// routing order.
    Caps(CapsArgs),
    /// Install or upgrade kiln on an owned host over SSH (this machine's
    /// binaries, guest agent and guest kernel, checksummed on arrival), and
    /// print the `[[backend.host]]` table for kilnd's configuration.
    AddHost(AddHostArgs),
    /// Write `kiln-bundle-<version>.tar.gz`: this machine's binaries, guest
    /// agent and guest kernel (what add-host installs), for cloud
    /// instances to fetch at boot; prints its SHA-256 and size.
    Bundle(BundleArgs),
}

#[derive(Args)]
struct BundleArgs {
    /// The directory to write the bundle into.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Args)]
struct CapsArgs {
    // Only here: add-host asks no kilnd, so needs neither its address nor
    // its token.
    #[command(flatten)]
    kilnd: KilndArgs,
}

#[derive(Args)]
struct AddHostArgs {
    /// The host: `host`, `host:port` or `[v6]:port` (port 22 by default).
    address: String,
    /// The private key to log in with: unencrypted ed25519, OpenSSH
    /// format (kilnd uses it unattended).
    #[arg(long, value_name = "FILE")]
    identity: PathBuf,
    /// Who to log in as: `kiln host` needs /dev/kvm and the state
    /// directory, and the install writes under --prefix.
    #[arg(long, default_value = "root")]
    user: String,
    /// The host's key (`ssh-ed25519 AAAA…`): any other is refused. Without
    /// it, the key offered is trusted and printed, to check and pin.
    #[arg(long, value_name = "KEY")]
    host_key: Option<String>,
    /// Where `kiln`, `kiln-vmm` and `kiln-shim` go on the host, side by
    /// side.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// The host's state directory (agent, kernel, images, grants).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_KILN_HOME)]
    kiln_home: String,
}

pub fn run(a: FleetArgs) -> Result<i32> {
    match a.command {
        FleetCommand::Caps(caps) => {
            let kilnd = caps.kilnd.client()?;
            let card: ProviderCard = kilnd.client.capabilities().map_err(|e| kilnd.error(e))?;
            if a.json {
                print_json(&card)?;
            } else {
                print_card(&card);
            }
        }
        FleetCommand::AddHost(args) => {
            let installed = add_host(args)?;
            if a.json {
                print_json(&installed)?;
            } else {
                print_section(&installed);
            }
        }
        FleetCommand::Bundle(args) => {
            let bundle = write_bundle(&args)?;
            if a.json {
                print_json(&bundle)?;
            } else {
                print_fields(&[
                    ("bundle", bundle.path.display().to_string()),
                    ("sha256", bundle.sha256.clone()),
                    (
                        "size",
                        format!(
                            "{} bytes ({:.1} MiB)",
                            bundle.bytes,
                            bundle.bytes as f64 / f64::from(1 << 20)
                        ),
                    ),
                ]);
            }
        }
    }
    Ok(0)
}

fn write_bundle(a: &BundleArgs) -> Result<Bundle> {
    let sources =
        Sources::of_this_kiln(&crate::kiln_home()).context("finding this kiln's own executable")?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("creating --out {}", a.out.display()))?;
    Ok(bundle::write(&sources, &a.out)?)
}

fn add_host(a: AddHostArgs) -> Result<Installed> {
    // The configuration names the key file in full: kilnd's working
    // directory is not this shell's.
    let identity_file = std::path::absolute(&a.identity)
        .with_context(|| format!("host {}: --identity {}", a.address, a.identity.display()))?;
    let plan = AddHost {
        address: a.address,
        user: a.user,
        identity_file,
        host_key: a.host_key,
        prefix: a.prefix,
        kiln_home: a.kiln_home,
    };
    let sources = Sources::of_this_kiln(&crate::kiln_home())
        .with_context(|| format!("host {}: finding this kiln's own executable", plan.address))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let address = plan.address.clone();
    let mut progress = |p: install::Progress<'_>| eprintln!("{address}: {p}");
    Ok(runtime.block_on(install::add_host(&plan, &sources, &mut progress))?)
}

/// The table to paste, after comments saying what was found; all of it
/// valid TOML, so it can be appended to kilnd.toml as it is.
fn print_section(i: &Installed) {
    println!(
        "# kiln {} on {} (KVM: {}), its VMs reachable at {}.",
        i.version, i.address, i.kvm, i.vm_address
    );
    if i.host_key_learned {
        println!(
            "# Host key {} trusted on first use: compare it with the host's own\n\
             # (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` there).",
            i.host_key_fingerprint
        );
    }
    println!("# Under a `[[backend]]` table with `kind = \"ssh\"` in kilnd.toml:");
    print!("{}", i.section);
}

fn print_card(card: &ProviderCard) {
    let (vcpus, ram) = used_of(&card.capacity);
    print_fields(&[
        ("regions", join(card.regions.iter())),
        ("tdx", yes_no(card.tdx).to_string()),
        ("vcpus", vcpus),
        ("memory", ram),
    ]);
    println!();
    let mut rows = vec![["BACKEND", "REGIONS", "TDX", "VCPUS", "MEMORY"].map(String::from)];
    rows.extend(card.backends.iter().map(|b| {
        let c = &b.capabilities;
        let (vcpus, ram) = used_of(&c.capacity);
        [
            b.name.clone(),
            join(c.regions.iter()),
            yes_no(c.tdx).to_string(),
            vcpus,
            ram,
        ]
    }));
    print_table(&rows);
    print_clouds(card);
    let hosts: Vec<_> = card
        .backends
        .iter()
        .flat_map(|b| b.capabilities.hosts.iter().map(move |h| (b, h)))
        .collect();
    if hosts.is_empty() {
        return;
    }
    println!();
    let mut rows = vec![["BACKEND", "HOST", "STATE", "VCPUS", "MEMORY", "NOTE"].map(String::from)];
    rows.extend(hosts.into_iter().map(|(b, h)| {
        let (vcpus, ram) = used_of(&h.capacity);
        let since = h
            .since
            .filter(|_| h.state != HostState::Ready)
            .map(|t| format!(" since {}", t.format("%Y-%m-%d %H:%M:%SZ")))
            .unwrap_or_default();
        [
            b.name.clone(),
            h.address.clone(),
            format!("{}{since}", state_word(h.state)),
            vcpus,
            ram,
            h.message.clone().unwrap_or_else(|| "-".into()),
        ]
    }));
    print_table(&rows);
}

/// One row per cloud backend: its state, instances, types and flags.
fn print_clouds(card: &ProviderCard) {
    let clouds: Vec<_> = card
        .backends
        .iter()
        .filter_map(|b| Some((b, b.capabilities.cloud.as_ref()?)))
        .collect();
    if clouds.is_empty() {
        return;
    }
    println!();
    let mut rows =
        vec![["BACKEND", "CLOUD", "STATE", "INSTANCES", "TYPES", "NOTE"].map(String::from)];
    rows.extend(clouds.into_iter().map(|(b, c)| {
        let since = c
            .since
            .map(|t| format!(" since {}", t.format("%Y-%m-%d %H:%M:%SZ")))
            .unwrap_or_default();
        let types = c
            .machine_types
            .iter()
            .map(|t| format!("{} ({} vCPUs, {} MiB)", t.name, t.vcpus, t.ram_mib))
            .collect::<Vec<_>>();
        let mut note: Vec<String> = c.message.iter().cloned().collect();
        if !c.cooling_regions.is_empty() {
            note.push(format!(
                "quota: {} set aside",
                join(c.cooling_regions.iter())
            ));
        }
        [
            b.name.clone(),
            c.cloud.clone(),
            format!("{}{since}", state_word(c.state)),
            format!("{} of {}", c.instances, c.max_instances),
            join(types.iter()),
            if note.is_empty() {
                "-".into()
            } else {
                note.join("; ")
            },
        ]
    }));
    print_table(&rows);
}

fn state_word(s: HostState) -> &'static str {
    match s {
        HostState::Unknown => "unknown",
        HostState::Ready => "ready",
        HostState::Unreachable => "unreachable",
        HostState::Refused => "refused",
    }
}

/// `N of M used` for CPUs and memory.
fn used_of(c: &CapacitySnapshot) -> (String, String) {
    (
        format!("{} of {} used", c.used.vcpus, c.usable.vcpus),
        format!("{} of {} MiB used", c.used.ram_mib, c.usable.ram_mib),
    )
}

fn join<'a>(items: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = items.map(String::as_str).collect();
    if v.is_empty() {
        "-".to_string()
    } else {
        v.join(",")
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
