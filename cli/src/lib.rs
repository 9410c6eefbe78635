//! kiln-cli: the `kiln` command. Not written yet (issue 5); this crate is an empty placeholder.
