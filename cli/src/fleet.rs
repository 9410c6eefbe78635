//! `kiln fleet caps`: what kilnd's fleet offers.

use anyhow::Result;
use clap::{Args, Subcommand};
use kiln_bridge::backend::HostState;
use kiln_bridge::capacity::CapacitySnapshot;
use kiln_bridge::fleet::ProviderCard;

use crate::kilnd::KilndArgs;
use crate::output::{print_fields, print_json, print_table};

#[derive(Args)]
pub struct FleetArgs {
    #[command(flatten)]
    kilnd: KilndArgs,
    /// Print kilnd's answer as JSON on standard output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: FleetCommand,
}

#[derive(Subcommand)]
enum FleetCommand {
    /// The provider card: regions, TDX, capacity, and the backends in
    /// routing order.
    Caps,
}

pub fn run(a: FleetArgs) -> Result<i32> {
    let kilnd = a.kilnd.client()?;
    match a.command {
        FleetCommand::Caps => {
            let card: ProviderCard = kilnd.client.capabilities().map_err(|e| kilnd.error(e))?;
            if a.json {
                print_json(&card)?;
            } else {
                print_card(&card);
            }
        }
    }
    Ok(0)
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
