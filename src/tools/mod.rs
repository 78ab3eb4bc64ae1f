//! The tools built on the sidecar's parts, kept apart so a reader of the proxy never wades
//! through them: the test and probe `client`, `probe`, `bench` (load generator and echo
//! upstream), `demo`, and the `legacy_upstream` that behaves like the orchestrator wskeep fronts.

pub mod bench;
pub mod client;
pub mod demo;
pub mod legacy_upstream;
pub mod probe;
