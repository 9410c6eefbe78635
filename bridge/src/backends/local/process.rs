//! A process named by pid and start time, so that a stored reference never
//! points at an unrelated process that later got the same pid.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    /// Field 22 of /proc/PID/stat (clock ticks after boot).
    pub start_time: u64,
}

/// Fields 3 (state) onwards of /proc/PID/stat, as text.
pub fn stat_fields(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    Some(text[text.rfind(')')? + 1..].to_string())
}

/// (state, start time) from /proc/PID/stat.
fn stat(pid: u32) -> Option<(char, u64)> {
    let rest = stat_fields(pid)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3 (state); start time is field 22.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

impl Process {
    /// The live process `pid`, if there is one.
    pub fn of(pid: u32) -> Option<Process> {
        stat(pid).map(|(_, start_time)| Process { pid, start_time })
    }

    /// Still the same process, and not a zombie.
    pub fn alive(&self) -> bool {
        stat(self.pid).is_some_and(|(state, start)| start == self.start_time && state != 'Z')
    }

    pub fn signal(&self, sig: i32) {
        if self.alive() {
            // SAFETY: kill(2); the start-time check above makes pid reuse
            // between the check and the call all but impossible.
            unsafe { libc::kill(self.pid as i32, sig) };
        }
    }

    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_a_process_and_not_its_successor() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let p = Process::of(child.id()).unwrap();
        assert!(p.alive());
        let me = Process::of(std::process::id()).unwrap();
        assert!(me.alive());
        let stranger = Process {
            start_time: p.start_time + 1,
            ..p
        };
        assert!(!stranger.alive());
        p.kill();
        child.wait().unwrap();
        assert!(!p.alive());
    }
}
