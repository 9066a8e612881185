//! The integration tests, one binary.

mod attribution;
mod churn;
mod demo;
mod deploy;
mod exports;
mod faults;
mod fixture;
mod fuzz;
mod kube_api;
mod probes;
mod race;
mod shutdown;
