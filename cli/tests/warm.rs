//! `kiln run` restores the saved snapshot of an image's ready VM instead
//! of booting: the real binary, real KVM, the real agent. One image, one
//! home; the runs follow each other, each starting from what the last left.

mod common;

use std::process::Output;
use std::time::Duration;

use common::{finish, Home};
use kiln_tests::images::busybox_layout;

/// Generous: VMs boot slowly where KVM emulates the guest kernel.
const LIMIT: Duration = Duration::from_secs(900);

/// What every run prints: 16 random bytes in hex, then the boot id.
const SCRIPT: &str = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                      cat /proc/sys/kernel/random/boot_id; exit 3";

struct Run {
    out: Output,
    stdout: String,
    stderr: String,
    /// `--json`'s statistics: the last line of standard error.
    stats: serde_json::Value,
}

fn run(home: &Home, image: &str, extra: &[&str]) -> Run {
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--oci-layout", image, "--", "sh", "-c", SCRIPT]);
    let out = finish(home.kiln(&args).spawn().unwrap(), LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let stats = stderr
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no statistics in:\n{stderr}"));
    Run {
        out,
        stdout,
        stderr,
        stats,
    }
}

impl Run {
    fn check(&self, start: &str) -> (String, String) {
        assert_eq!(self.out.status.code(), Some(3), "{}", self.stderr);
        assert_eq!(self.stats["start"], start, "{}", self.stderr);
        let lines: Vec<&str> = self.stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{}", self.stdout);
        assert_eq!(lines[0].len(), 32, "{}", self.stdout);
        (lines[0].to_string(), lines[1].to_string())
    }
}

fn snapshots(home: &Home) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(home.path().join("snapshots"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Cold, saved; two warm runs, each with its own random bytes and boot
/// id; `--cold` boots; a damaged snapshot is refused, the run boots
/// instead and saves a good one, which the next run restores.
#[test]
fn runs_restore_the_saved_ready_vm_and_each_is_its_own() {
    let home = Home::new();
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let image = format!("{}:1", layout.display());

    let cold_run = run(&home, &image, &[]);
    let first = cold_run.check("cold");
    let saved = snapshots(&home);
    assert_eq!(saved.len(), 1, "{saved:?}");
    let state = saved[0].join("state");
    let mem = saved[0].join("mem");
    assert!(state.is_file() && mem.is_file());
    let mem_before = std::fs::read(&mem).unwrap();

    let warm_run = run(&home, &image, &[]);
    let second = warm_run.check("warm");
    // A clone counts its own CPU time, not the boot its template made.
    let cpu = |r: &Run| {
        r.stats["cpu_user_seconds"].as_f64().unwrap()
            + r.stats["cpu_system_seconds"].as_f64().unwrap()
    };
    assert!(
        cpu(&warm_run) < cpu(&cold_run),
        "warm {} s, cold {} s",
        cpu(&warm_run),
        cpu(&cold_run)
    );
    let third = run(&home, &image, &[]).check("warm");
    for (a, b) in [(&first, &second), (&first, &third), (&second, &third)] {
        assert_ne!(a.0, b.0, "two runs read the same random bytes");
        assert_ne!(a.1, b.1, "two runs have one boot id");
    }
    // Clones map the memory file copy-on-write: it is as it was saved.
    assert!(std::fs::read(&mem).unwrap() == mem_before);

    let cold = run(&home, &image, &["--cold"]);
    cold.check("cold");
    assert_eq!(snapshots(&home), saved);

    // A flipped byte in the state file fails its checksum.
    let mut bytes = std::fs::read(&state).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&state, &bytes).unwrap();
    let damaged = run(&home, &image, &[]);
    damaged.check("cold");
    assert!(
        damaged
            .stderr
            .contains("the saved snapshot did not restore, booting instead"),
        "{}",
        damaged.stderr
    );
    assert_ne!(std::fs::read(&state).unwrap(), bytes, "not saved again");
    run(&home, &image, &[]).check("warm");
    home.assert_clean();
}
