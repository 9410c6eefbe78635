//! kiln: the command line. The logic lives in the libraries; this binary
//! parses, prints, and turns outcomes into exit codes.

mod demo;
mod exit_code;
mod fleet;
mod grant;
mod host;
mod image;
mod kilnd;
mod output;
mod publish;
mod run;
mod scratch;
mod ssh;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln_image::cache::Cache;
use std::path::PathBuf;

const EXIT_CODES_HELP: &str = "\
Exit codes of `kiln run` and `kiln demo`:
  N    the command's own exit code (128+N if a signal N ended it)
  124  --timeout passed; the VM was stopped
  125  kiln failed: a usage error, image, KVM, kernel, memory, or the VM
       stopped early (a guest kernel panic included)
  126  the command could not be started
  127  the command does not exist in the image
  130  stopped by a second Ctrl-C
`kiln ssh` exits with ssh's status.
Other commands exit 0 on success and 1 on error (2 for a usage error,
3 when kilnd cannot be reached or answers something unreadable).";

#[derive(Parser)]
#[command(name = "kiln", version, about = "KVM micro-VMs from OCI images", after_help = EXIT_CODES_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a fresh micro-VM made from an image, like `docker run --rm`.
    Run(Box<run::RunArgs>),
    /// Boot the demo image that scripts/setup.sh prepared and show what it sees.
    Demo(demo::DemoArgs),
    /// Build and manage initramfs images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Ask kilnd for grants: micro-VMs reachable over SSH until a deadline.
    Grant(grant::GrantArgs),
    /// What kilnd's fleet offers.
    Fleet(fleet::FleetArgs),
    /// SSH into a running grant, trusting only the host key kilnd reported.
    Ssh(ssh::SshArgs),
    /// This machine as an owned host of a fleet (JSON in and out; what a
    /// bridge runs over SSH).
    Host(host::HostArgs),
}

fn kiln_home() -> PathBuf {
    std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/kiln"))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person: logs often go to files (shim.log, journals).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = parse();
    let runs_vm = matches!(cli.command, Command::Run(_) | Command::Demo(_));
    if !runs_vm {
        die_quietly_on_closed_stdout();
    }
    match dispatch(cli.command) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line, the whole cause chain: `kiln: what failed: why: …`.
            match hint(&e) {
                Some(h) => eprintln!("kiln: {e:#} ({h})"),
                None => eprintln!("kiln: {e:#}"),
            }
            std::process::exit(if runs_vm {
                exit_code::KILN_ERROR
            } else {
                kilnd::exit_code(&e)
            });
        }
    }
}

/// The command line, or the process ends with clap's message and the
/// exit code [`usage_exit_code`] gives.
fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            std::process::exit(usage_exit_code(&e, std::env::args_os().nth(1)));
        }
    }
}

/// `kiln run` and `kiln demo` pass the workload's exit code through, so
/// their usage errors exit 125 as every other failure of theirs does (as
/// `docker run` does); the other commands keep the usual 2, which no
/// workload's code can be confused with. Help and version exit 0.
fn usage_exit_code(e: &clap::Error, subcommand: Option<std::ffi::OsString>) -> i32 {
    if !e.use_stderr() {
        return 0;
    }
    match subcommand.as_deref().and_then(std::ffi::OsStr::to_str) {
        Some("run" | "demo") => exit_code::KILN_ERROR,
        _ => e.exit_code(),
    }
}

/// A closed standard output (`kiln image ls | head -1`) ends the command
/// quietly, as it ends `ls`: the default SIGPIPE action, which Rust
/// replaces with "ignore" and so turns every later `println!` into a
/// panic. `kiln run` and `kiln demo` keep ignoring it: the workload's
/// output may be cut off, but neither the workload nor its VM.
fn die_quietly_on_closed_stdout() {
    // SAFETY: restores a signal's default action, before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn dispatch(command: Command) -> Result<i32> {
    match command {
        Command::Run(args) => {
            let (cache, home) = local()?;
            run::run(&cache, &home, *args)
        }
        Command::Demo(args) => {
            let (cache, home) = local()?;
            demo::demo(&cache, &home, args)
        }
        Command::Image(cmd) => {
            let (cache, home) = local()?;
            image::run(&cache, &home, cmd).map(|()| 0)
        }
        // Commands for kilnd need no local state.
        Command::Grant(args) => grant::run(args),
        Command::Fleet(args) => fleet::run(args),
        Command::Ssh(args) => ssh::run(args),
        Command::Host(args) => host::run(args),
    }
}

/// The image cache and `KILN_HOME`, for the commands that run VMs here.
fn local() -> Result<(Cache, PathBuf)> {
    let home = kiln_home();
    let cache = Cache::open(&home.join("images"))
        .with_context(|| format!("opening the image cache in {}", home.display()))?;
    Ok((cache, home))
}

/// What to do about the errors users will meet, where the message alone
/// does not say.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    use kiln_image::image::ImageError;
    use kiln_image::registry::client::RegistryError;
    use kiln_image::source::SourceError;
    e.chain().find_map(|cause| {
        // A transparent wrapper hides the registry error from the chain.
        let registry = match cause.downcast_ref::<SourceError>() {
            Some(SourceError::Registry(r)) => Some(r),
            _ => cause.downcast_ref::<RegistryError>(),
        };
        if let Some(r) = registry {
            return match r {
                RegistryError::Transport { .. } => {
                    Some("check the registry address and that this host can reach it")
                }
                RegistryError::Status { status: 404, .. } => {
                    Some("no such image or tag there; check the name")
                }
                RegistryError::Unauthorized { .. } => {
                    Some("log in with `docker login` or check the credentials")
                }
                _ => None,
            };
        }
        match cause.downcast_ref::<ImageError>() {
            Some(ImageError::WrongPlatform { .. } | ImageError::NoPlatform(_)) => {
                Some("kiln runs linux/amd64 images; use an amd64 build of the image")
            }
            _ => None,
        }
    })
}

/// Bytes for humans.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
