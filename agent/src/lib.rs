//! kiln-agent: PID 1 inside every micro-VM. Not written yet (issue 3); this crate is an empty placeholder.
