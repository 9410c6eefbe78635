//! Why a guest died before its agent was ready, in a few words, from the
//! end of its console: the kernel's own words for running out of memory
//! or panicking. (kiln-vmm names emulation failures itself, in its log.)

/// Console phrases by which Linux reports memory exhaustion.
const OUT_OF_MEMORY: [&str; 4] = [
    "Out of memory",
    "oom-kill",
    "deadlocked on memory",
    "Initramfs unpacking failed: write error",
];
const PANIC: &str = "Kernel panic - not syncing: ";

/// One line naming the cause, if the console shows one.
pub fn from_console(console: &str) -> Option<String> {
    if OUT_OF_MEMORY.iter().any(|p| console.contains(p)) {
        return Some(
            "the guest ran out of memory: give it more with --mem (or use a block root)".into(),
        );
    }
    let at = console.rfind(PANIC)?;
    let reason = console[at + PANIC.len()..]
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches(" ]---")
        .trim();
    Some(format!("the guest kernel panicked: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_memory_exhaustion_before_the_panic_it_causes() {
        let oom = "[ 1.2] Out of memory and no killable processes...\n\
                   [ 1.2] Kernel panic - not syncing: System is deadlocked on memory\n";
        assert!(from_console(oom).unwrap().contains("ran out of memory"));
        let panic = "[ 0.9] VFS: Unable to mount root fs\n\
                     [ 0.9] ---[ end Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0) ]---\n";
        assert_eq!(
            from_console(panic).unwrap(),
            "the guest kernel panicked: VFS: Unable to mount root fs on unknown-block(0,0)"
        );
        assert_eq!(from_console("booting\nfine\n"), None);
    }
}
