//! Least privilege: once the probes are loaded and attached and running
//! pods were restored from /proc, the agent keeps only what reading its maps
//! needs (CAP_BPF; CAP_SYS_ADMIN on kernels without it) and drops the rest.

use anyhow::{Context as _, Result};
use caps::{CapSet, Capability, CapsHashSet};

/// Drops every capability but the one BPF map access needs, in all sets of
/// the calling thread (call it before other threads are started). Returns
/// the names of the capabilities kept.
pub(crate) fn drop_after_load() -> Result<Vec<String>> {
    let supported = caps::runtime::thread_all_supported();
    let keep_cap = if supported.contains(&Capability::CAP_BPF) {
        Capability::CAP_BPF
    } else {
        Capability::CAP_SYS_ADMIN
    };
    let current = caps::read(None, CapSet::Permitted).context("reading capabilities")?;
    let keep: CapsHashSet = current.iter().copied().filter(|c| *c == keep_cap).collect();
    caps::set(None, CapSet::Effective, &keep).context("dropping effective capabilities")?;
    caps::set(None, CapSet::Permitted, &keep).context("dropping permitted capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing inheritable capabilities")?;
    let _ = caps::clear(None, CapSet::Ambient);
    let mut names: Vec<String> = keep.iter().map(|c| c.to_string()).collect();
    names.sort();
    Ok(names)
}
