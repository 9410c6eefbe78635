//! `kiln grant …`: submit, list, show, measure and end grants on kilnd.
//! Each command is one client call plus printing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand, ValueEnum};
use kiln_bridge::backend::PublishedPort;
use kiln_bridge::grant::{GrantRequest, TdxPolicy};
use kiln_bridge::state::GrantState;
use kiln_bridge::view::{ConnectionView, GrantView, UsageView};

use crate::human;
use crate::kilnd::{Kilnd, KilndArgs};
use crate::output::{print_fields, print_json, print_table};
use crate::run::parse_duration;

#[derive(Args)]
pub struct GrantArgs {
    #[command(flatten)]
    kilnd: KilndArgs,
    /// Print kilnd's answer as JSON on standard output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: GrantCommand,
}

#[derive(Subcommand)]
enum GrantCommand {
    /// Ask for a micro-VM running IMAGE, reachable over SSH until a deadline.
    /// Prints the grant's id.
    Submit(Box<SubmitArgs>),
    /// One line per grant, oldest first.
    List(ListArgs),
    /// A grant, its state and, when it runs, how to reach it.
    Show(IdArg),
    /// A grant's latest CPU, memory, network and disk figures.
    Usage(IdArg),
    /// Stop a grant (harmless if it has already ended).
    Terminate(IdArg),
}

#[derive(Args)]
struct IdArg {
    /// The grant's id.
    id: String,
}

#[derive(Args)]
struct ListArgs {
    /// Only grants in this state (pending, provisioning, running,
    /// terminating, exited, terminated, failed).
    #[arg(long)]
    state: Option<GrantState>,
}

#[derive(Args)]
struct SubmitArgs {
    /// Image reference (alpine:3.20, registry:5000/x:1, …@sha256:…).
    #[arg(required_unless_present = "file")]
    image: Option<String>,
    /// Send this JSON request body as is instead of building one from flags.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "image", "region", "vcpus", "cpu_millicores", "ram_mib", "ssh_keys",
        "valid_for", "valid_to", "tdx", "request_id", "env", "command", "publish",
    ])]
    file: Option<PathBuf>,
    /// Region to run in (see `kiln fleet caps`).
    #[arg(long, required_unless_present = "file")]
    region: Option<String>,
    /// Virtual CPUs.
    #[arg(
        long,
        value_name = "N",
        required_unless_present_any = ["cpu_millicores", "file"],
        conflicts_with = "cpu_millicores"
    )]
    vcpus: Option<u32>,
    /// CPU in thousandths of a CPU (500 = half a CPU), instead of --vcpus.
    #[arg(long, value_name = "M")]
    cpu_millicores: Option<u32>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", required_unless_present = "file")]
    ram_mib: Option<u64>,
    /// OpenSSH public keys that may log in, one per line (repeatable)
    /// [default: ~/.ssh/id_ed25519.pub].
    #[arg(long = "ssh-key", value_name = "FILE")]
    ssh_keys: Vec<PathBuf>,
    /// How long the grant may run from now (30m, 2h, …).
    #[arg(
        long,
        value_name = "DUR",
        value_parser = parse_duration,
        required_unless_present_any = ["valid_to", "file"],
        conflicts_with = "valid_to"
    )]
    valid_for: Option<Duration>,
    /// When the grant ends (RFC 3339, e.g. 2030-01-01T12:00:00Z).
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    valid_to: Option<DateTime<Utc>>,
    /// Whether the grant must, may or must not run in a TDX trust domain
    /// [default: no].
    #[arg(long, value_enum)]
    tdx: Option<Tdx>,
    /// Your id for this request: resubmitting it returns the same grant.
    #[arg(long = "id", value_name = "REQUEST_ID")]
    request_id: Option<String>,
    /// Set an environment variable for the workload (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Publish this guest TCP port on the host (repeatable); kilnd picks
    /// the host port and `kiln grant show` says which.
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "GUESTPORT",
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    publish: Vec<u16>,
    /// Wait until the grant runs, then print how to connect (or fail with
    /// the reason it did not start).
    #[arg(long)]
    wait: bool,
    /// The command and its arguments (default: the image's entrypoint and cmd).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Tdx {
    Required,
    Preferred,
    No,
}

impl From<Tdx> for TdxPolicy {
    fn from(t: Tdx) -> Self {
        match t {
            Tdx::Required => TdxPolicy::Required,
            Tdx::Preferred => TdxPolicy::Preferred,
            Tdx::No => TdxPolicy::No,
        }
    }
}

/// How often `--wait` asks kilnd.
const POLL: Duration = Duration::from_secs(1);

pub fn run(a: GrantArgs) -> Result<i32> {
    let kilnd = a.kilnd.client()?;
    match a.command {
        GrantCommand::Submit(s) => submit(&kilnd, *s, a.json),
        GrantCommand::List(l) => list(&kilnd, l, a.json),
        GrantCommand::Show(g) => show(&kilnd, &g.id, a.json),
        GrantCommand::Usage(g) => usage(&kilnd, &g.id, a.json),
        GrantCommand::Terminate(g) => terminate(&kilnd, &g.id, a.json),
    }
    .map(|()| 0)
}

fn submit(kilnd: &Kilnd, a: SubmitArgs, json: bool) -> Result<()> {
    let view = match &a.file {
        Some(file) => {
            let body = std::fs::read_to_string(file)
                .with_context(|| format!("--file {}: cannot read it", file.display()))?;
            kilnd.client.submit_json(&body).map_err(|e| {
                kilnd
                    .error(e)
                    .blaming(|field| Some(format!("field {field} in {}", file.display())))
            })?
        }
        None => {
            let keys = read_ssh_keys(&a.ssh_keys)?;
            let request = request(&a, &keys)?;
            kilnd
                .client
                .submit(&request)
                .map_err(|e| kilnd.error(e).blaming(|field| flag_of(field, &a, &keys)))?
        }
    };
    let id = view.grant.id.clone();
    if !json {
        println!("{id}");
    }
    eprintln!("grant {id} {}", state_line(&view));
    let view = if a.wait {
        wait_running(kilnd, view)?
    } else {
        view
    };
    if json {
        print_json(&view)?;
    }
    if let Some(c) = view.connection.as_ref().filter(|_| a.wait) {
        eprintln!("connect with: {}", ssh_line(c));
        eprintln!("  or: kiln ssh {id}  (checks the host key kilnd reported)");
        for p in &c.published {
            eprintln!("published: {}", published_line(p));
        }
    }
    Ok(())
}

/// Polls until the grant runs; an ended grant is an error with its reason.
fn wait_running(kilnd: &Kilnd, mut view: GrantView) -> Result<GrantView> {
    loop {
        if view.state == GrantState::Running {
            return Ok(view);
        }
        if view.state.is_final() {
            bail!("grant {} {}", view.grant.id, state_line(&view));
        }
        std::thread::sleep(POLL);
        let next = kilnd
            .client
            .show(&view.grant.id)
            .map_err(|e| kilnd.error(e))?;
        if next.state != view.state {
            eprintln!("grant {} {}", next.grant.id, state_line(&next));
        }
        view = next;
    }
}

/// One `--ssh-key` key, and where it came from (for error messages).
struct SshKey {
    key: String,
    file: PathBuf,
    line: usize,
}

/// Every key in the files, one per line; blank lines and `#` comments are
/// skipped. Without files, `~/.ssh/id_ed25519.pub`.
fn read_ssh_keys(files: &[PathBuf]) -> Result<Vec<SshKey>> {
    let default;
    let files = if files.is_empty() {
        let home = std::env::var_os("HOME").context(
            "--ssh-key: no key file given and HOME is not set to find ~/.ssh/id_ed25519.pub",
        )?;
        default = [Path::new(&home).join(".ssh/id_ed25519.pub")];
        &default[..]
    } else {
        files
    };
    let mut keys = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--ssh-key {}: cannot read it", file.display()))?;
        let before = keys.len();
        keys.extend(
            text.lines()
                .enumerate()
                .map(|(i, l)| (i + 1, l.trim()))
                .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
                .map(|(line, key)| SshKey {
                    key: key.to_string(),
                    file: file.clone(),
                    line,
                }),
        );
        if keys.len() == before {
            bail!("--ssh-key {}: no public key in it", file.display());
        }
    }
    Ok(keys)
}

fn request(a: &SubmitArgs, keys: &[SshKey]) -> Result<GrantRequest> {
    let valid_to = match (a.valid_to, a.valid_for) {
        (Some(t), _) => t,
        (None, Some(d)) => chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| Utc::now().checked_add_signed(d))
            .context("--valid-for: too long")?,
        (None, None) => bail!("give --valid-for or --valid-to"),
    };
    Ok(GrantRequest {
        request_id: a.request_id.clone(),
        image: a.image.clone().unwrap_or_default(),
        vcpus: a.vcpus,
        cpu_millicores: a.cpu_millicores,
        ram_mib: a.ram_mib.unwrap_or_default(),
        region: a.region.clone().unwrap_or_default(),
        tdx: a.tdx.map(TdxPolicy::from).unwrap_or_default(),
        ssh_keys: keys.iter().map(|k| k.key.clone()).collect(),
        valid_to,
        command: (!a.command.is_empty()).then(|| a.command.clone()),
        env: a.env.iter().cloned().collect::<BTreeMap<_, _>>(),
        publish: a.publish.clone(),
    })
}

/// The flag behind a request field kilnd blamed (`vcpus`, `ssh_keys[1]`,
/// `env.X`, `command[0]`).
fn flag_of(field: &str, a: &SubmitArgs, keys: &[SshKey]) -> Option<String> {
    let base = field.split(['[', '.']).next().unwrap_or(field);
    let index = field
        .strip_prefix(base)
        .and_then(|r| r.strip_prefix('['))
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|i| i.parse::<usize>().ok());
    let flag = match base {
        "request_id" => "--id",
        "image" => "IMAGE",
        "vcpus" => "--vcpus",
        "cpu_millicores" => "--cpu-millicores",
        "ram_mib" => "--ram-mib",
        "region" => "--region",
        "tdx" => "--tdx",
        "valid_to" if a.valid_to.is_some() => "--valid-to",
        "valid_to" => "--valid-for",
        "env" => "--env",
        "publish" => "--publish",
        "command" => "the command after --",
        "ssh_keys" => {
            return Some(match index.and_then(|i| keys.get(i)) {
                Some(k) => format!("--ssh-key {}, line {}", k.file.display(), k.line),
                None => "--ssh-key".to_string(),
            })
        }
        _ => return None,
    };
    Some(flag.to_string())
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time like 2030-01-01T12:00:00Z: {e}"))
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if kiln_protocol::valid_env_name(k) => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE with a non-empty KEY")),
    }
}

fn list(kilnd: &Kilnd, a: ListArgs, json: bool) -> Result<()> {
    let mut grants = kilnd.client.list().map_err(|e| kilnd.error(e))?;
    grants.retain(|g| a.state.is_none_or(|s| g.state == s));
    grants.sort_by_key(|g| g.grant.submitted_at);
    if json {
        return print_json(&grants);
    }
    let mut rows = vec![[
        "ID", "STATE", "IMAGE", "VCPUS", "RAM_MIB", "REGION", "VALID_TO", "REASON",
    ]
    .map(String::from)];
    rows.extend(grants.iter().map(|g| {
        [
            g.grant.id.clone(),
            g.state.to_string(),
            g.grant.image.clone(),
            g.grant.vcpus.to_string(),
            g.grant.ram_mib.to_string(),
            g.grant.region.clone(),
            time(&g.grant.valid_to),
            g.reason.clone().unwrap_or_default(),
        ]
    }));
    print_table(&rows);
    Ok(())
}

fn show(kilnd: &Kilnd, id: &str, json: bool) -> Result<()> {
    let v = kilnd.client.show(id).map_err(|e| kilnd.error(e))?;
    if json {
        return print_json(&v);
    }
    let g = &v.grant;
    let mut rows = vec![("id", g.id.clone()), ("state", v.state.to_string())];
    if let Some(r) = &v.reason {
        rows.push(("reason", r.clone()));
    }
    rows.push(("image", g.image.clone()));
    if let Some(d) = &v.image_digest {
        // What runs, whatever the tag names by now.
        rows.push(("digest", d.clone()));
    }
    rows.push((
        "vcpus",
        match g.cpu_millicores {
            Some(m) => format!("{} ({m} millicores asked)", g.vcpus),
            None => g.vcpus.to_string(),
        },
    ));
    rows.push(("ram", format!("{} MiB", g.ram_mib)));
    rows.push(("region", g.region.clone()));
    rows.push((
        "tdx",
        serde_json::to_value(g.tdx)?
            .as_str()
            .unwrap_or("?")
            .to_string(),
    ));
    rows.push(("valid_to", time(&g.valid_to)));
    if let Some(c) = &g.command {
        rows.push(("command", serde_json::to_string(c)?));
    }
    for (k, val) in &g.env {
        rows.push(("env", format!("{k}={val}")));
    }
    if !g.publish.is_empty() {
        let ports: Vec<String> = g.publish.iter().map(u16::to_string).collect();
        rows.push(("publish", ports.join(", ")));
    }
    rows.push(("ssh_keys", g.ssh_keys.len().to_string()));
    rows.push(("submitted_at", time(&g.submitted_at)));
    rows.push(("updated_at", time(&v.updated_at)));
    if let Some(c) = &v.connection {
        rows.push(("host", c.host.clone()));
        rows.push(("ssh_port", c.ssh_port.to_string()));
        rows.push(("user", c.user.clone()));
        rows.push(("host_key", c.host_key_fingerprint.clone()));
        rows.push(("backend", format!("{} ({})", c.backend, c.instance_id)));
        if let Some(location) = &c.location {
            rows.push(("location", location.clone()));
        }
        rows.push(("started_at", time(&c.started_at)));
        for p in &c.published {
            rows.push(("published", published_line(p)));
        }
        if v.state == GrantState::Running {
            rows.push(("ssh", ssh_line(c)));
            rows.push(("", format!("or: kiln ssh {}", g.id)));
        }
    }
    print_fields(&rows);
    Ok(())
}

fn usage(kilnd: &Kilnd, id: &str, json: bool) -> Result<()> {
    let v: UsageView = kilnd.client.usage(id).map_err(|e| kilnd.error(e))?;
    if json {
        return print_json(&v);
    }
    let mut rows = vec![
        ("grant", v.grant_id.clone()),
        ("state", v.state.to_string()),
        (
            "final",
            if v.r#final {
                "yes"
            } else {
                "no, still running"
            }
            .to_string(),
        ),
    ];
    match &v.usage {
        None if v.r#final => rows.push(("usage", "none recorded".to_string())),
        None => rows.push(("usage", "no sample yet".to_string())),
        Some(m) => {
            let u = &m.guest;
            if let Some(t) = &v.taken_at {
                rows.push(("taken_at", time(t)));
            }
            rows.push(("uptime", seconds(u.uptime_ms)));
            rows.push((
                "cpu",
                format!(
                    "user {}, system {}",
                    seconds(u.cpu_user_ms),
                    seconds(u.cpu_system_ms)
                ),
            ));
            rows.push((
                "memory",
                format!(
                    "used {}, peak {}",
                    human(u.mem_used_kib * 1024),
                    human(u.mem_peak_kib * 1024)
                ),
            ));
            rows.push((
                "network",
                format!(
                    "received {}, sent {}",
                    human(u.net_rx_bytes),
                    human(u.net_tx_bytes)
                ),
            ));
            rows.push((
                "disk",
                format!(
                    "read {}, written {}",
                    human(u.disk_read_bytes),
                    human(u.disk_write_bytes)
                ),
            ));
            rows.push(("processes", u.processes.to_string()));
            rows.push(("workload", u.workload.clone()));
            rows.push(("host vcpu cpu", seconds(m.host.vcpu_cpu_ms)));
            rows.push(("host vmm rss", human(m.host.vmm_rss_kib * 1024)));
            if v.r#final {
                rows.push((
                    "exit",
                    match m.exit_status {
                        Some(kiln_protocol::ExitStatus::Code(c)) => format!("code {c}"),
                        Some(kiln_protocol::ExitStatus::Signal(s)) => format!("signal {s}"),
                        None => "unknown (stopped or lost)".to_string(),
                    },
                ));
                rows.push(("ended_at", time(&m.ended_at)));
            }
        }
    }
    print_fields(&rows);
    Ok(())
}

fn terminate(kilnd: &Kilnd, id: &str, json: bool) -> Result<()> {
    let v = kilnd.client.terminate(id).map_err(|e| kilnd.error(e))?;
    if json {
        print_json(&v)?;
    } else {
        println!("grant {} {}", v.grant.id, state_line(&v));
    }
    if v.state == GrantState::Terminating {
        eprintln!(
            "kiln: the instance is still stopping; `kiln grant show {}` will say when it has",
            v.grant.id
        );
    }
    Ok(())
}

/// `ssh -p PORT USER@HOST`, to paste.
pub fn ssh_line(c: &ConnectionView) -> String {
    format!("ssh -p {} {}@{}", c.ssh_port, c.user, c.host)
}

/// `127.0.0.1:40123 -> guest port 8000`.
fn published_line(p: &PublishedPort) -> String {
    let host = match p.host.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, p.port).to_string(),
        Err(_) => format!("{}:{}", p.host, p.port),
    };
    format!("{host} -> guest port {}", p.guest_port)
}

/// `running`, or `failed: reason`.
fn state_line(v: &GrantView) -> String {
    match &v.reason {
        Some(r) => format!("{}: {r}", v.state),
        None => v.state.to_string(),
    }
}

fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn seconds(ms: u64) -> String {
    format!("{:.2} s", ms as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        submit: SubmitArgs,
    }

    fn parse(args: &[&str]) -> Result<SubmitArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("submit").chain(args.iter().copied())).map(|c| c.submit)
    }

    const BASE: &[&str] = &["alpine", "--region", "home", "--ram-mib", "512"];

    #[test]
    fn flags_make_a_request() {
        let a = parse(
            &[
                BASE,
                &[
                    "--vcpus",
                    "2",
                    "--valid-for",
                    "2h",
                    "--tdx",
                    "preferred",
                    "--id",
                    "r1",
                    "--env",
                    "A=1",
                    "--env",
                    "B=x=y",
                    "-p",
                    "8000",
                    "--publish",
                    "22",
                    "--",
                    "sh",
                    "-c",
                    "echo hi",
                ],
            ]
            .concat(),
        )
        .unwrap();
        let keys = [SshKey {
            key: "ssh-ed25519 AAAA k".into(),
            file: "k.pub".into(),
            line: 1,
        }];
        let before = Utc::now();
        let r = request(&a, &keys).unwrap();
        assert_eq!(r.image, "alpine");
        assert_eq!(r.vcpus, Some(2));
        assert_eq!(r.cpu_millicores, None);
        assert_eq!(r.ram_mib, 512);
        assert_eq!(r.tdx, TdxPolicy::Preferred);
        assert_eq!(r.request_id.as_deref(), Some("r1"));
        assert_eq!(r.env["B"], "x=y");
        assert_eq!(r.command.unwrap(), ["sh", "-c", "echo hi"]);
        let left = r.valid_to - before;
        assert!(left >= chrono::Duration::hours(2) && left < chrono::Duration::minutes(121));
        assert_eq!(r.ssh_keys, ["ssh-ed25519 AAAA k"]);
        assert_eq!(r.publish, [8000, 22]);
    }

    #[test]
    fn usage_errors_are_clap_errors() {
        let with = |extra: &[&str]| parse(&[BASE, extra].concat());
        // CPU and validity: exactly one of each.
        assert!(with(&["--valid-for", "1h"]).is_err());
        assert!(with(&["--vcpus", "1"]).is_err());
        assert!(with(&[
            "--vcpus",
            "1",
            "--cpu-millicores",
            "500",
            "--valid-for",
            "1h"
        ])
        .is_err());
        assert!(with(&[
            "--vcpus",
            "1",
            "--valid-for",
            "1h",
            "--valid-to",
            "2030-01-01T00:00:00Z"
        ])
        .is_err());
        assert!(with(&["--vcpus", "1", "--valid-for", "soon"]).is_err());
        assert!(with(&["--vcpus", "1", "--valid-to", "tomorrow"]).is_err());
        assert!(with(&["--vcpus", "1", "--valid-for", "1h", "--env", "NOEQUALS"]).is_err());
        assert!(with(&["--vcpus", "1", "--valid-for", "1h", "--tdx", "maybe"]).is_err());
        for port in ["0", "65536", "8000:80", "http"] {
            assert!(with(&["--vcpus", "1", "--valid-for", "1h", "-p", port]).is_err());
        }
        assert!(with(&[
            "--cpu-millicores",
            "500",
            "--valid-to",
            "2030-01-01T00:00:00+02:00"
        ])
        .is_ok());
        // --file stands alone.
        assert!(parse(&["--file", "g.json"]).is_ok());
        assert!(parse(&["--file", "g.json", "--vcpus", "1"]).is_err());
        assert!(parse(&["--file", "g.json", "-p", "80"]).is_err());
    }

    #[test]
    fn fields_name_their_flags() {
        let a = parse(&[BASE, &["--vcpus", "1", "--valid-for", "1h"]].concat()).unwrap();
        let keys = [
            SshKey {
                key: "a".into(),
                file: "one.pub".into(),
                line: 1,
            },
            SshKey {
                key: "b".into(),
                file: "two.pub".into(),
                line: 3,
            },
        ];
        let flag = |f: &str| flag_of(f, &a, &keys);
        assert_eq!(flag("vcpus").unwrap(), "--vcpus");
        assert_eq!(flag("cpu_millicores").unwrap(), "--cpu-millicores");
        assert_eq!(flag("region").unwrap(), "--region");
        assert_eq!(flag("request_id").unwrap(), "--id");
        assert_eq!(flag("valid_to").unwrap(), "--valid-for");
        assert_eq!(flag("env.A=B").unwrap(), "--env");
        assert_eq!(flag("publish[1]").unwrap(), "--publish");
        assert_eq!(flag("command[0]").unwrap(), "the command after --");
        assert_eq!(flag("ssh_keys[1]").unwrap(), "--ssh-key two.pub, line 3");
        assert_eq!(flag("ssh_keys").unwrap(), "--ssh-key");
        assert_eq!(flag("colour"), None);
    }

    #[test]
    fn published_ports_read_as_addresses() {
        let p = |host: &str| PublishedPort {
            guest_port: 8000,
            host: host.into(),
            port: 40123,
        };
        assert_eq!(
            published_line(&p("127.0.0.1")),
            "127.0.0.1:40123 -> guest port 8000"
        );
        assert_eq!(published_line(&p("::1")), "[::1]:40123 -> guest port 8000");
        assert_eq!(
            published_line(&p("vm.example")),
            "vm.example:40123 -> guest port 8000"
        );
    }

    #[test]
    fn key_files_one_key_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("keys");
        std::fs::write(&f, "# mine\nssh-ed25519 AAAA a\n\n  ssh-ed25519 BBBB b  \n").unwrap();
        let keys = read_ssh_keys(std::slice::from_ref(&f)).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(
            (keys[1].key.as_str(), keys[1].line),
            ("ssh-ed25519 BBBB b", 4)
        );
        std::fs::write(&f, "# none\n").unwrap();
        let e = read_ssh_keys(std::slice::from_ref(&f))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("--ssh-key") && e.contains("no public key"),
            "{e}"
        );
        let e = read_ssh_keys(&[dir.path().join("missing")]).err().unwrap();
        assert!(format!("{e:#}").contains("missing"), "{e:#}");
    }
}
