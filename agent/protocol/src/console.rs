//! What the agent writes on the guest console for the host to find: the
//! VMM and the launchers scan for these exact texts.

/// A line holding this marks the agent ready (boot-time measurements and
/// kiln-vmm's `ready_marker` look for it).
pub const READY_MARKER: &str = "KILN_READY";

/// The agent's fatal-error line starts with this, then says why; the agent
/// powers the VM off right after, and kiln-vmm then exits
/// [`crate::vmm::exit::INIT_FAILED`].
pub const AGENT_FATAL_MARKER: &str = "KILN_AGENT_FATAL";

/// The agent's fatal-error line for `why`.
pub fn agent_fatal_line(why: &str) -> String {
    format!("{AGENT_FATAL_MARKER} {why}")
}

/// The agent's fatal-error line in a console text, trimmed, if it has one.
pub fn find_agent_fatal(console: &str) -> Option<&str> {
    console
        .lines()
        .find(|l| l.contains(AGENT_FATAL_MARKER))
        .map(str::trim)
}

/// How the guest kernel's panic line starts (`panic()` in the kernel).
pub const KERNEL_PANIC_PREFIX: &str = "Kernel panic - not syncing";

/// The last kernel panic line in a console text, trimmed. Only a hint for
/// the reason: guest programs can print it too, so whether the kernel
/// panicked is learnt from kiln-vmm's exit status, never from this.
pub fn find_panic_line(console: &str) -> Option<&str> {
    let start = console.rfind(KERNEL_PANIC_PREFIX)?;
    let line = &console[start..];
    Some(line.lines().next().unwrap_or(line).trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fatal_line_is_found_again() {
        let console = format!("boot\r\n{}\r\nreboot\n", agent_fatal_line("oops"));
        assert_eq!(find_agent_fatal(&console), Some("KILN_AGENT_FATAL oops"));
        assert_eq!(find_agent_fatal("KILN_READY\n"), None);
    }

    #[test]
    fn the_last_panic_line_is_found() {
        let console = "x Kernel panic - not syncing: first\r\n\
                       [    1.2] Kernel panic - not syncing: No working init found.\r\nCPU: 0\n";
        assert_eq!(
            find_panic_line(console),
            Some("Kernel panic - not syncing: No working init found.")
        );
        assert_eq!(find_panic_line("all fine\n"), None);
    }
}
