//! What the grant benchmarks share: one grant timed from `POST /v1/grants`
//! to the first command run over SSH with the stock client, through a real
//! kilnd, beside what the VM's shim measured of the same VM; and the
//! nearest-rank percentiles they report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use kiln_bridge::backends::local::shim::read_state;
use kiln_bridge::host::INSTANCE_FILE;
use kiln_bridge::state::GrantState;

use crate::kilnd::{request, ssh_to_host, Kilnd, Requester, BOOT};

/// One grant's timings, in milliseconds from its submit unless named
/// otherwise.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub to_running: f64,
    pub to_ssh: f64,
    /// The shim's own figure: VMM start to the agent's `ready`.
    pub raw_boot: f64,
    /// The shim's own figure: VMM start to the agent's `started`.
    pub started: f64,
    /// Until the VM's grant directory was made, once its image was found
    /// and before its shim starts: the API, reaching the machine that
    /// runs it, the image lookup. None where the filesystem keeps no
    /// birth times.
    pub to_dir: Option<f64>,
    /// Until an owned host had recorded the grant's instance, as its
    /// provision ended there (None on the local backend, which keeps no
    /// such file).
    pub to_recorded: Option<f64>,
}

impl Sample {
    /// Submit until `running`, less the raw boot.
    pub fn bridge_to_running(&self) -> f64 {
        self.to_running - self.raw_boot
    }

    /// The agent's `ready` to its `started` (SSH served, command running).
    pub fn agent_ready_to_started(&self) -> f64 {
        self.started - self.raw_boot
    }

    /// Submit until `running`, less the VM's own time to `started`: what
    /// kilnd, the shim (and for an owned host, the SSH hop and `kiln
    /// host`) add.
    pub fn bridge_own(&self) -> f64 {
        self.to_running - self.started
    }

    /// `running` until `ssh … true` has returned.
    pub fn first_ssh(&self) -> f64 {
        self.to_ssh - self.to_running
    }

    /// From the grant directory until `running`, less the VM's own time
    /// to `started`: the shim and VMM starting, noticing `started`, and
    /// the answer's way back to the requester.
    pub fn dir_to_running_less_vm(&self) -> Option<f64> {
        self.to_dir.map(|d| self.to_running - d - self.started)
    }

    /// From an owned host's record of the instance until the requester
    /// saw `running`: the reply's way back over SSH, kilnd storing it,
    /// the requester's next poll.
    pub fn recorded_to_running(&self) -> Option<f64> {
        self.to_recorded.map(|r| self.to_running - r)
    }
}

/// Times grants on one kilnd for one requester.
pub struct GrantTimer<'a> {
    pub kilnd: &'a Kilnd,
    pub requester: &'a Requester,
    /// For the requester's known_hosts files.
    pub scratch: &'a Path,
    /// Where the VMs' grant directories are: `$KILN_HOME/grants` of the
    /// machine that runs them.
    pub grants: PathBuf,
}

impl GrantTimer<'_> {
    /// Submits grant `id`, waits for SSH to work, terminates it (without
    /// waiting for the end).
    pub fn one(&self, id: &str) -> Result<Sample, String> {
        let client = self.kilnd.client();
        let req = request(
            id,
            &self.requester.image,
            &self.requester.public_key,
            Duration::from_secs(3600),
            "sleep 100000",
        );
        let wall0 = SystemTime::now();
        let t0 = Instant::now();
        client
            .submit(&req)
            .map_err(|e| format!("submit {id}: {e}"))?;
        let running = loop {
            let g = client.show(id).map_err(|e| format!("show {id}: {e}"))?;
            if g.state == GrantState::Running {
                break g;
            }
            if g.state.is_final() || t0.elapsed() > BOOT {
                return Err(format!("grant {id}: {:?} {:?}", g.state, g.reason));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let to_running = t0.elapsed();
        let ssh = ssh_to_host(&running, &self.requester.key, self.scratch);
        loop {
            if ssh.ssh(&[], "true", b"").status.success() {
                break;
            }
            if t0.elapsed() > BOOT {
                return Err(format!("grant {id}: ssh never worked"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let to_ssh = t0.elapsed();
        let dir = self.grants.join(id);
        let state = read_state(&dir)
            .map_err(|e| format!("state of {id}: {e}"))?
            .ok_or_else(|| format!("grant {id}: no state"))?;
        let raw_boot = state
            .boot_ms
            .ok_or_else(|| format!("grant {id}: no boot_ms"))? as f64;
        let started = state
            .started_ms
            .ok_or_else(|| format!("grant {id}: no started_ms"))? as f64;
        let to_dir = made(&dir).and_then(|t| ms_between(wall0, t));
        let to_recorded = std::fs::metadata(dir.join(INSTANCE_FILE))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| ms_between(wall0, t));
        client
            .terminate(id)
            .map_err(|e| format!("terminate {id}: {e}"))?;
        Ok(Sample {
            to_running: to_running.as_secs_f64() * 1000.0,
            to_ssh: to_ssh.as_secs_f64() * 1000.0,
            raw_boot,
            started,
            to_dir,
            to_recorded,
        })
    }
}

/// When `path` was made (its birth time, where the filesystem keeps one).
fn made(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).ok()?.created().ok()
}

/// Milliseconds from `t0` to `t`, on this machine's clock (which the owned
/// hosts of a benchmark share).
fn ms_between(t0: SystemTime, t: SystemTime) -> Option<f64> {
    Some(t.duration_since(t0).ok()?.as_secs_f64() * 1000.0)
}

/// Nearest-rank percentile of `v` (0 < p <= 100).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank - 1).copied().unwrap_or(f64::NAN)
}

/// Milliseconds of `f`'s calls, `n` times one after another.
pub fn timed(n: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}
