//! kiln-bridge: grants, the Backend trait and the Fleet router. Not written yet (issue 6); this crate is an empty placeholder.
