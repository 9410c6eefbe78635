//! Moving bytes between an SSH channel and the session's program, and
//! ending the channel with the program's exit status.
//!
//! Plain threads do the blocking reads and writes on pipes and ptys; they
//! reach the async SSH session through its `Handle` on the runtime.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_protocol::ExitStatus;
use russh::server::Handle;
use russh::{ChannelId, Sig};
use tokio::runtime::Handle as Runtime;

use crate::reaper;
use crate::ssh::process::{Io, Process};

/// How long output may keep draining after the program exited (a
/// background child holding the pipes must not keep the channel open).
const DRAIN: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(10);

/// Client input for the program.
pub enum Input {
    Data(Vec<u8>),
    Eof,
}

/// A running session program as the SSH handler sees it.
pub struct Running {
    pub pid: i32,
    pub input: mpsc::Sender<Input>,
    /// The pty leader, for window-size changes.
    pub pty: Option<Arc<File>>,
}

/// Starts the threads for `p` on `channel`.
pub fn run(p: Process, channel: ChannelId, ssh: Handle, rt: Runtime) -> Running {
    let (input, inbox) = mpsc::channel();
    let pid = p.pid;
    let (pty, readers) = match p.io {
        Io::Pty(leader) => {
            let leader = Arc::new(leader);
            let (r, w) = (leader.clone(), leader.clone());
            // A pty has no half-close: EOF from the client is ignored, as sshd does.
            std::thread::spawn(move || write_input(inbox, &*w, false));
            let reader = pump(r, None, channel, ssh.clone(), rt.clone());
            (Some(leader), vec![reader])
        }
        Io::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            std::thread::spawn(move || write_input(inbox, stdin, true));
            let out = pump(stdout, None, channel, ssh.clone(), rt.clone());
            let err = pump(stderr, Some(1), channel, ssh.clone(), rt.clone());
            (None, vec![out, err])
        }
    };
    std::thread::spawn(move || finish(pid, readers, channel, ssh, rt));
    Running { pid, input, pty }
}

fn write_input<W: Write>(inbox: mpsc::Receiver<Input>, mut to: W, close_on_eof: bool) {
    while let Ok(msg) = inbox.recv() {
        match msg {
            Input::Data(d) => {
                if to.write_all(&d).is_err() {
                    return;
                }
            }
            Input::Eof if close_on_eof => return,
            Input::Eof => {}
        }
    }
}

/// Copies program output to the channel (stderr as extended data 1).
fn pump<R: Read + Send + 'static>(
    mut from: R,
    ext: Option<u32>,
    channel: ChannelId,
    ssh: Handle,
    rt: Runtime,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                // A pty leader reads EIO once the program side is closed.
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let data = buf[..n].to_vec();
            let sent = rt.block_on(async {
                match ext {
                    Some(code) => ssh.extended_data(channel, code, data).await,
                    None => ssh.data(channel, data).await,
                }
            });
            if sent.is_err() {
                return; // the client is gone
            }
        }
    })
}

/// Waits for the program, lets its output drain, then reports its status
/// and closes the channel.
fn finish(pid: i32, readers: Vec<JoinHandle<()>>, channel: ChannelId, ssh: Handle, rt: Runtime) {
    let status = loop {
        if let Some(s) = reaper::try_wait(pid) {
            break s;
        }
        std::thread::sleep(POLL);
    };
    let deadline = Instant::now() + DRAIN;
    for r in &readers {
        while !r.is_finished() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
    }
    rt.block_on(async {
        let _ = match status {
            ExitStatus::Code(c) => ssh.exit_status_request(channel, c as u32).await,
            ExitStatus::Signal(s) => {
                ssh.exit_signal_request(
                    channel,
                    signal_name(s),
                    false,
                    String::new(),
                    String::new(),
                )
                .await
            }
        };
        let _ = ssh.eof(channel).await;
        let _ = ssh.close(channel).await;
    });
}

fn signal_name(signal: i32) -> Sig {
    match signal {
        libc::SIGABRT => Sig::ABRT,
        libc::SIGALRM => Sig::ALRM,
        libc::SIGFPE => Sig::FPE,
        libc::SIGHUP => Sig::HUP,
        libc::SIGILL => Sig::ILL,
        libc::SIGINT => Sig::INT,
        libc::SIGKILL => Sig::KILL,
        libc::SIGPIPE => Sig::PIPE,
        libc::SIGQUIT => Sig::QUIT,
        libc::SIGSEGV => Sig::SEGV,
        libc::SIGTERM => Sig::TERM,
        libc::SIGUSR1 => Sig::USR1,
        other => Sig::Custom(other.to_string()),
    }
}
