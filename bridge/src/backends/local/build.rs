//! A grant's image build, in a child process (`kiln-shim --build-image
//! HOME IMAGE ROOTFS [INSECURE_REGISTRY...]`): the builder's memory goes back to the system when the
//! child ends instead of staying in kilnd, and stopping a provision stops
//! its build by killing the child. The child answers with one JSON line:
//! what to boot (see [`BootFiles`]). It builds into `HOME/images`, the
//! cache `kiln run` and `kiln image build` use, so their builds serve
//! grants and the other way round.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use serde::{Deserialize, Serialize};

use super::process::Process;
use crate::error_chain;
use crate::machine::BootFiles;

/// The first argument that makes `kiln-shim` build instead of shim.
pub const BUILD_FLAG: &str = "--build-image";

/// The local backend's `rootfs` setting, as `kiln run --rootfs` takes it.
pub use kiln_image::root::Rootfs;

/// The child's one line on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum BuildReply {
    Built(BootFiles),
    Failed { error: String },
}

#[derive(Debug, thiserror::Error)]
pub enum BuildChildError {
    #[error("cannot start {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("cannot wait for the image build")]
    Wait(#[source] std::io::Error),
    #[error("the image build task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("the image build ended without an answer ({0})")]
    NoAnswer(std::process::ExitStatus),
    /// The build ran and failed; the text is the builder's error chain.
    #[error("{0}")]
    Failed(String),
}

/// In the child: builds `image` with a `rootfs` root into `home`'s image
/// cache and prints the reply line. Exits 0 when a reply was printed,
/// whatever it says.
pub fn serve(home: &Path, image: &str, rootfs: Rootfs, insecure: Vec<String>) -> ExitCode {
    let reply = match build_here(home, image, rootfs, insecure) {
        Ok(boot) => BuildReply::Built(boot),
        Err(e) => BuildReply::Failed { error: e },
    };
    let line = serde_json::to_string(&reply).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

fn build_here(
    home: &Path,
    image: &str,
    rootfs: Rootfs,
    insecure: Vec<String>,
) -> Result<BootFiles, String> {
    let cache = kiln_image::cache::Cache::open(&home.join("images"))
        .map_err(|e| format!("cannot open the image cache: {}", error_chain(&e)))?;
    let opts = kiln_image::build::Options {
        input: kiln_image::build::Input::Registry(image.to_string()),
        agent: home.join("bin/kiln-agent"),
        compression: kiln_image::compress::Compression::None,
        max_expanded: kiln_image::assemble::DEFAULT_MAX_EXPANDED,
        insecure,
        docker_config: None,
        refresh: false,
        output: None,
        root: rootfs.kind(),
    };
    kiln_image::build::build(&cache, &opts, &mut |_| {})
        .map(|b| BootFiles::of(&b))
        .map_err(|e| error_chain(&e))
}

/// In kilnd: runs the build in a child of `shim` and returns what to boot.
/// Dropping the future kills the child.
pub async fn build(
    shim: &Path,
    home: &Path,
    image: &str,
    rootfs: Rootfs,
    insecure: &[String],
) -> Result<BootFiles, BuildChildError> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(shim);
    cmd.arg(BUILD_FLAG)
        .arg(home)
        .arg(image)
        .arg(rootfs.as_str())
        .args(insecure)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // The builder's log lines join kilnd's.
        .stderr(Stdio::inherit());
    // SAFETY: prctl is async-signal-safe and touches no parent state. A
    // build must not outlive the kilnd that wants it.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| BuildChildError::Spawn(shim.to_path_buf(), e))?;
    let _guard = Process::of(child.id()).map(KillOnDrop);
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .map_err(BuildChildError::Task)?
        .map_err(BuildChildError::Wait)?;
    let reply = String::from_utf8_lossy(&output.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<BuildReply>(l).ok());
    match reply {
        Some(BuildReply::Built(boot)) => Ok(boot),
        Some(BuildReply::Failed { error }) => Err(BuildChildError::Failed(error)),
        None => Err(BuildChildError::NoAnswer(output.status)),
    }
}

/// Kills the build child when the provision waiting for it is dropped.
/// (After the child has ended, `Process` no longer matches it: no stray
/// signal reaches a process that reused its pid.)
struct KillOnDrop(Process);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill();
    }
}
