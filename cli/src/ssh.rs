//! `kiln ssh GRANT`: the system `ssh` into a running grant, trusting only
//! the host key kilnd reported for it.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_bridge::machine::stop_signals;
use kiln_bridge::state::GrantState;
use kiln_bridge::view::ConnectionView;

use crate::kilnd::KilndArgs;

#[derive(Args)]
pub struct SshArgs {
    #[command(flatten)]
    kilnd: KilndArgs,
    /// The grant's id.
    grant: String,
    /// Private key to log in with (ssh's -i; only this key is offered).
    #[arg(short = 'i', value_name = "IDENTITY")]
    identity: Option<PathBuf>,
    /// Run this on the grant instead of a login shell.
    #[arg(last = true, value_name = "REMOTE COMMAND")]
    command: Vec<String>,
}

/// Runs ssh; returns its exit status for kiln's.
pub fn run(a: SshArgs) -> Result<i32> {
    let kilnd = a.kilnd.client()?;
    let view = kilnd.client.show(&a.grant).map_err(|e| kilnd.error(e))?;
    let conn = match (&view.connection, view.state) {
        (Some(c), GrantState::Running) => c,
        (_, state) => {
            let why = view.reason.map(|r| format!(": {r}")).unwrap_or_default();
            bail!("grant {} is {state}{why}, not running", view.grant.id);
        }
    };
    let mut known_hosts = tempfile::Builder::new()
        .prefix("kiln-known-hosts-")
        .tempfile()
        .context("cannot create a temporary known_hosts file")?;
    let pinned = !conn.host_key.trim().is_empty();
    if pinned {
        let line = known_hosts_line(&conn.host, conn.ssh_port, &conn.host_key)
            .map_err(|e| anyhow::anyhow!("kilnd reported an unusable host key: {e}"))?;
        writeln!(known_hosts, "{line}")
            .and_then(|()| known_hosts.flush())
            .context("cannot write the temporary known_hosts file")?;
    } else {
        eprintln!(
            "kiln: warning: kilnd has no host key for grant {}; accepting the one offered, \
             which should have the fingerprint {}",
            view.grant.id, conn.host_key_fingerprint
        );
    }
    let args = ssh_args(
        conn,
        known_hosts.path(),
        pinned,
        a.identity.as_deref(),
        &a.command,
    );
    // Ctrl-C belongs to ssh; kiln stays to remove the temporary file.
    stop_signals::catch_stop_signals();
    let mut ssh = Command::new("ssh")
        .args(&args)
        .spawn()
        .context("cannot run ssh")?;
    let status = wait_passing_stops(&mut ssh).context("waiting for ssh")?;
    drop(known_hosts);
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// Waits for ssh, passing on as SIGTERM any stop signal kiln gets (a
/// terminal's Ctrl-C reaches ssh anyway; a `kill` of kiln would not).
fn wait_passing_stops(ssh: &mut Child) -> std::io::Result<ExitStatus> {
    let pid = i32::try_from(ssh.id()).map_err(std::io::Error::other)?;
    let mut passed = 0;
    loop {
        if let Some(status) = ssh.try_wait()? {
            return Ok(status);
        }
        let stops = stop_signals::count();
        if stops > passed {
            passed = stops;
            // SAFETY: kill(2) on our child, not yet reaped, so the pid is
            // still its own.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A known_hosts line for the host key: `HOST KEY` on port 22,
/// `[HOST]:PORT KEY` otherwise.
pub fn known_hosts_line(host: &str, port: u16, host_key: &str) -> Result<String, String> {
    let key = host_key.trim();
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == ',' || c == '#') {
        return Err(format!("bad host {host:?}"));
    }
    if key.split_whitespace().count() < 2 || key.contains(['\n', '\r']) {
        return Err(format!("not a public key line: {key:?}"));
    }
    Ok(if port == 22 {
        format!("{host} {key}")
    } else {
        format!("[{host}]:{port} {key}")
    })
}

/// ssh's arguments: options, then `--`, the destination and the command.
fn ssh_args(
    c: &ConnectionView,
    known_hosts: &Path,
    pinned: bool,
    identity: Option<&Path>,
    command: &[String],
) -> Vec<String> {
    let mut args = vec!["-p".to_string(), c.ssh_port.to_string()];
    let mut option = |o: String| args.extend(["-o".to_string(), o]);
    option(format!(
        "StrictHostKeyChecking={}",
        if pinned { "yes" } else { "accept-new" }
    ));
    option(format!("UserKnownHostsFile={}", known_hosts.display()));
    option("GlobalKnownHostsFile=/dev/null".to_string());
    if let Some(i) = identity {
        option("IdentitiesOnly=yes".to_string());
        args.extend(["-i".to_string(), i.display().to_string()]);
    }
    args.push("--".to_string());
    args.push(format!("{}@{}", c.user, c.host));
    args.extend(command.iter().cloned());
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICYZWTaQeBZlanOWStbbTRqPk9TgC0LC/UyC2dMm+FFc";

    #[test]
    fn known_hosts_lines() {
        assert_eq!(
            known_hosts_line("10.0.0.5", 2222, KEY).unwrap(),
            format!("[10.0.0.5]:2222 {KEY}")
        );
        assert_eq!(
            known_hosts_line("vm.example", 22, &format!(" {KEY}\n")).unwrap(),
            format!("vm.example {KEY}")
        );
        assert_eq!(
            known_hosts_line("::1", 2200, KEY).unwrap(),
            format!("[::1]:2200 {KEY}")
        );
        assert!(known_hosts_line("a b", 22, KEY).is_err());
        assert!(known_hosts_line("", 22, KEY).is_err());
        assert!(known_hosts_line("h", 22, "ssh-ed25519").is_err());
        assert!(known_hosts_line("h", 22, &format!("{KEY}\n* {KEY}")).is_err());
    }

    fn conn() -> ConnectionView {
        ConnectionView {
            backend: "local".into(),
            instance_id: "i-1".into(),
            host: "127.0.0.1".into(),
            ssh_port: 2201,
            user: "root".into(),
            host_key_fingerprint: "SHA256:x".into(),
            host_key: KEY.into(),
            started_at: chrono::Utc::now(),
            published: Vec::new(),
            location: None,
        }
    }

    #[test]
    fn ssh_pins_the_key_and_passes_the_command() {
        let cmd = ["uname".to_string(), "-a".to_string()];
        let args = ssh_args(
            &conn(),
            Path::new("/tmp/kh"),
            true,
            Some(Path::new("id")),
            &cmd,
        );
        assert_eq!(
            args.join(" "),
            "-p 2201 -o StrictHostKeyChecking=yes -o UserKnownHostsFile=/tmp/kh \
             -o GlobalKnownHostsFile=/dev/null -o IdentitiesOnly=yes -i id -- root@127.0.0.1 uname -a"
        );
        let args = ssh_args(&conn(), Path::new("/tmp/kh"), false, None, &[]);
        assert_eq!(
            args.join(" "),
            "-p 2201 -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile=/tmp/kh \
             -o GlobalKnownHostsFile=/dev/null -- root@127.0.0.1"
        );
    }
}
