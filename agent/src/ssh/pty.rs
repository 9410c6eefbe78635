//! Pseudo-terminals for interactive sessions.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A terminal size as SSH sends it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowSize {
    pub cols: u32,
    pub rows: u32,
    pub px_width: u32,
    pub px_height: u32,
}

impl WindowSize {
    fn winsize(&self) -> libc::winsize {
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        libc::winsize {
            ws_row: clamp(self.rows),
            ws_col: clamp(self.cols),
            ws_xpixel: clamp(self.px_width),
            ws_ypixel: clamp(self.px_height),
        }
    }
}

/// Both ends of a new pty; both close-on-exec (the child gets the
/// follower as its stdio through dup2, which clears the flag).
pub struct Pty {
    pub leader: File,
    pub follower: OwnedFd,
}

fn cloexec(fd: i32) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// Opens a pty of `size`. Call it inside `reaper::exclusive` so no child
/// forked meanwhile inherits the descriptors before they are close-on-exec.
pub fn open(size: WindowSize) -> std::io::Result<Pty> {
    let (mut leader, mut follower) = (-1, -1);
    let ws = size.winsize();
    // SAFETY: out-pointers to two ints; no name buffer; termios left default.
    let rc = unsafe {
        libc::openpty(
            &mut leader,
            &mut follower,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    cloexec(leader);
    cloexec(follower);
    // SAFETY: openpty returned two fresh descriptors we now own.
    Ok(unsafe {
        Pty {
            leader: File::from(OwnedFd::from_raw_fd(leader)),
            follower: OwnedFd::from_raw_fd(follower),
        }
    })
}

/// Applies a window-size change; the kernel signals SIGWINCH to the
/// terminal's foreground group.
pub fn resize(leader: &File, size: WindowSize) -> std::io::Result<()> {
    let ws = size.winsize();
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    if unsafe { libc::ioctl(leader.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_with_a_size_and_resizes() {
        let size = WindowSize {
            cols: 100,
            rows: 30,
            ..Default::default()
        };
        let pty = open(size).unwrap();
        let get = |fd: i32| {
            let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) }, 0);
            (ws.ws_col, ws.ws_row)
        };
        assert_eq!(get(pty.follower.as_raw_fd()), (100, 30));
        resize(
            &pty.leader,
            WindowSize {
                cols: 132,
                rows: 50,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(get(pty.follower.as_raw_fd()), (132, 50));
    }
}
