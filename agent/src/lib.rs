//! connscope: explains `connect()` failures on Kubernetes nodes, and tells
//! service-mesh lifecycle failures (the Istio sidecar startup and shutdown
//! races) apart from every other refusal.
//!
//! Data flows one way, one folder per stage (see ARCHITECTURE.md):
//! `kernel` (probes, ring records, decode) -> `attribute` (pod, container,
//! workload) -> `race` (per-pod timelines, a phase per failure, summaries)
//! -> `export` (JSON lines, metrics, HTTP, Kubernetes Events). `pipeline`
//! joins the stages; `agent` starts, serves and stops them. `k8s` is the
//! API side (pod watcher, Events writer). `explain` is the on-call client
//! of a running agent's `/events`.

pub mod agent;
pub mod attribute;
pub mod cli;
#[cfg(feature = "testbed")]
pub mod demo;
pub mod explain;
pub mod export;
pub mod k8s;
pub mod kernel;
pub mod pipeline;
pub mod race;
/// Test bed: stand-in sidecar and apps, connect storms, network namespaces.
/// Behind the `testbed` feature so the production image carries none of it;
/// unit tests use its record helpers.
#[cfg(any(test, feature = "testbed"))]
pub mod testbed;
