//! connscope: explains `connect()` failures on Kubernetes nodes, and tells the
//! Istio sidecar startup race apart from every other refusal.
//!
//! Data flows one way: kernel event (`probes`) -> `decode` -> export
//! (`events`). `testbed` builds the simulated pods used by the demo and tests.

pub mod attribute;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod decode;
pub mod demo;
pub mod events;
pub mod kube;
pub mod metrics;
pub mod offsets;
pub mod pipeline;
pub mod pods;
pub mod privileges;
pub mod probes;
pub mod race;
pub mod restore;
pub mod runtime;
pub mod server;
pub mod testbed;
