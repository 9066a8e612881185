//! The Kubernetes API: this node's pods (watched with kube-rs), their
//! workloads (walking owner references), Istio annotations and container
//! statuses; and Kubernetes Events written on pods. An outage degrades to
//! runtime metadata: it is logged once, counted, and the watcher recovers by
//! itself.

mod events;
pub mod pod;
mod watch;

pub use events::EventQueue;
pub(crate) use events::{PodEvent, start_events};
pub use pod::{PodInfo, PodStore, Update, owner_to_walk, pod_info, workload};
pub(crate) use watch::{Access, client, start_watch};
