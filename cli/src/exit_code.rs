//! kiln's own exit codes, kept apart from the workload's (which `kiln run`
//! passes through). They follow `docker run` and `timeout(1)`.

/// `--timeout` passed and the VM was stopped.
pub const TIMEOUT: i32 = 124;
/// kiln itself failed: image, KVM, kernel, memory, VM crash.
pub const KILN_ERROR: i32 = 125;
/// The command exists but could not be started (the agent's code).
pub const NOT_EXECUTABLE: i32 = kiln_protocol::EXIT_NOT_EXECUTABLE;
/// The command does not exist in the image (the agent's code).
pub const NOT_FOUND: i32 = kiln_protocol::EXIT_NOT_FOUND;
/// Stopped by a second Ctrl-C (128 + SIGINT).
pub const INTERRUPTED: i32 = 130;
