//! Blocking waits on children, in a process of its own: `reap_until` reaps
//! every child of the process, which would steal other tests' children.

use std::process::Command;
use std::time::{Duration, Instant};

use kiln_agent::reaper::{reap_until, spawn, wait};
use kiln_protocol::ExitStatus;

#[test]
fn waiters_block_until_the_exit_and_get_the_status() {
    // The main thread reaps everything, as PID 1's does, until the child it
    // waits for exits; another thread waits on a tracked child meanwhile.
    let tracked = spawn(Command::new("/bin/sh").args(["-c", "sleep 0.3; exit 4"]))
        .unwrap()
        .id() as i32;
    let watched = Command::new("/bin/sh")
        .args(["-c", "sleep 0.6; exit 6"])
        .spawn()
        .unwrap()
        .id() as i32;
    let waiter = std::thread::spawn(move || (wait(tracked), Instant::now()));
    let started = Instant::now();
    assert_eq!(reap_until(watched), ExitStatus::Code(6));
    let main_done = Instant::now();
    assert!(main_done - started >= Duration::from_millis(500));
    let (status, waiter_done) = waiter.join().unwrap();
    assert_eq!(status, ExitStatus::Code(4));
    // The tracked child's waiter was not held back to the watched one's end.
    assert!(waiter_done < main_done, "the waiter woke only at the end");
    // With nothing left to wait for, it does not hang.
    assert_eq!(reap_until(watched), ExitStatus::Code(255));
}
