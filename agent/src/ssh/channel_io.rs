//! Moving bytes between an SSH channel and the session's program, and
//! ending the channel with the program's exit status.
//!
//! Plain threads do the blocking reads and writes on pipes and ptys; they
//! reach the async SSH session through its `Handle` on the runtime.

use std::fs::File;
use std::io::{Read, Write};
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_protocol::ExitStatus;
use russh::server::{Handle, Msg};
use russh::{ChannelId, ChannelStream, Sig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
            spawn(move || write_input(inbox, &*w, false));
            let reader = pump(r, None, channel, ssh.clone(), rt.clone());
            (Some(leader), vec![reader])
        }
        Io::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            spawn(move || write_input(inbox, stdin, true));
            let out = pump(stdout, None, channel, ssh.clone(), rt.clone());
            let err = pump(stderr, Some(1), channel, ssh.clone(), rt.clone());
            (None, vec![out, err])
        }
    };
    spawn(move || {
        finish(
            pid,
            readers.into_iter().flatten().collect(),
            channel,
            ssh,
            rt,
        )
    });
    Running { pid, input, pty }
}

/// A session thread, named so the agent's panic hook knows it belongs to
/// SSH (a panic there must not end the VM). `None` if no thread could start.
fn spawn(f: impl FnOnce() + Send + 'static) -> Option<JoinHandle<()>> {
    match std::thread::Builder::new().name("ssh-io".into()).spawn(f) {
        Ok(h) => Some(h),
        Err(e) => {
            crate::system::console(&format!("ssh: cannot start a session thread: {e}"));
            None
        }
    }
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
) -> Option<JoinHandle<()>> {
    spawn(move || {
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
    let status = reaper::wait(pid);
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

/// The stream a subsystem (sftp) runs on. When the subsystem ends and drops
/// it, the channel reports exit status 0 before it closes, as sshd does for
/// its sftp-server; OpenSSH's `scp` treats a missing status as failure.
pub struct SubsystemStream {
    inner: Option<Pin<Box<ChannelStream<Msg>>>>,
    channel: ChannelId,
    ssh: Handle,
}

impl SubsystemStream {
    pub fn new(stream: ChannelStream<Msg>, channel: ChannelId, ssh: Handle) -> Self {
        SubsystemStream {
            inner: Some(Box::pin(stream)),
            channel,
            ssh,
        }
    }

    fn inner(&mut self) -> std::io::Result<Pin<&mut ChannelStream<Msg>>> {
        self.inner
            .as_mut()
            .map(|s| s.as_mut())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }
}

impl AsyncRead for SubsystemStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.inner() {
            Ok(s) => s.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for SubsystemStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.inner() {
            Ok(s) => s.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.inner() {
            Ok(s) => s.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.inner() {
            Ok(s) => s.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl Drop for SubsystemStream {
    fn drop(&mut self) {
        let (Some(inner), Ok(rt)) = (self.inner.take(), Runtime::try_current()) else {
            return;
        };
        let (ssh, channel) = (self.ssh.clone(), self.channel);
        // Status and EOF go first on the session's queue; dropping the
        // stream afterwards queues the close.
        rt.spawn(async move {
            let _ = ssh.exit_status_request(channel, 0).await;
            let _ = ssh.eof(channel).await;
            drop(inner);
        });
    }
}
