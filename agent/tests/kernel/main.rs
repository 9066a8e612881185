//! connscope's integration tests, one binary: the real agent against the real
//! kernel (probes, attribution, the startup race and its capture proof, the inbound race, the Kubernetes API path,
//! exports, `connscope explain` against a live agent, faults, hostile input
//! and failing sinks, churn, shutdown, the demo,
//! hardening against outside clients), the shipped deploy files, and
//! short fuzzing of every parser of outside data. Most need root; without it
//! they say why and skip, under `CI=true` they fail.
//!
//! One binary rather than one per file: one link instead of eleven, and one
//! shared fixture ([`fixture::Node`]) instead of a preamble per file. The
//! price is that the tests now share a process and run on libtest's parallel
//! threads, while the probes see the whole machine; [`fixture`] says how they
//! are kept apart (what each test gets of its own, and which tests run alone).
//!
//! Run with `cargo test -p connscope --test kernel` (the `testbed` feature,
//! on by default, is required).

mod ambient;
mod attribution;
mod capture;
mod churn;
mod demo;
mod deploy;
mod explain;
mod exports;
mod faults;
mod fixture;
mod fuzz;
mod hardening;
mod hostile;
mod inbound;
mod kube_api;
mod meshes;
mod probes;
mod race;
mod revision;
mod runtimes;
mod shutdown;
