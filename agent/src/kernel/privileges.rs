//! Least privilege: once the probes are loaded and attached and running
//! pods were restored from /proc, the agent keeps only what reading its maps
//! needs (CAP_BPF; CAP_SYS_ADMIN on kernels without it) and drops the rest,
//! and makes sure nothing it could ever execute gets a capability back: the
//! bounding set is emptied, the securebits that give root its capabilities
//! at exec (`NOROOT`) and keep them across uid changes (`NO_SETUID_FIXUP`)
//! are set and locked, and `no_new_privs` is set (in Kubernetes
//! `allowPrivilegeEscalation: false` sets it too; outside, only this does).
//!
//! All of these are per thread and inherited by threads started later: call
//! [`drop_after_load`] before any other thread is started.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result};
use caps::{CapSet, Capability, CapsHashSet};
use serde::Serialize;

/// The securebits set and locked after start-up.
pub const LOCKED_SECUREBITS: u32 = (libc::SECBIT_NOROOT
    | libc::SECBIT_NOROOT_LOCKED
    | libc::SECBIT_NO_SETUID_FIXUP
    | libc::SECBIT_NO_SETUID_FIXUP_LOCKED
    | libc::SECBIT_KEEP_CAPS_LOCKED
    | libc::SECBIT_NO_CAP_AMBIENT_RAISE
    | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED) as u32;

/// What the agent holds after [`drop_after_load`], read back from the kernel.
#[derive(Debug, Clone, Serialize)]
pub struct Dropped {
    /// Capabilities kept (effective and permitted).
    pub kept: Vec<String>,
    /// Capabilities left in the bounding set (empty unless CAP_SETPCAP was
    /// missing).
    pub bounding: Vec<String>,
    /// The thread's securebits (`PR_GET_SECUREBITS`).
    pub securebits: u32,
    pub no_new_privs: bool,
    /// What could not be done (without CAP_SETPCAP: the bounding set and
    /// the securebits); empty when everything was.
    pub missing: Vec<String>,
}

/// `--keep-privileges`: threads started before the drop keep theirs too.
static KEEP: AtomicBool = AtomicBool::new(false);

/// Says, before any thread is started, whether privileges are kept.
pub(crate) fn keep(yes: bool) {
    KEEP.store(yes, Ordering::Relaxed);
}

/// For a thread the agent starts before its own drop (the metadata reader,
/// the event writer): capabilities, the bounding set, the securebits and
/// `no_new_privs` belong to each thread, so the main thread's later drop
/// would never reach it. It drops to the same final set at once; it needs
/// none of the rest (it reads root-owned files and writes an open file).
pub(crate) fn drop_in_thread(thread: &str) {
    if KEEP.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = drop_after_load() {
        tracing::warn!(thread, error = %format!("{e:#}"), "could not drop this thread's capabilities");
    }
}

/// Drops every capability but the one BPF map access needs, in all sets of
/// the calling thread, empties the bounding set, sets and locks the
/// securebits and sets `no_new_privs` (call it before other threads are
/// started). Returns what the kernel says the thread holds afterwards.
pub(crate) fn drop_after_load() -> Result<Dropped> {
    let supported = caps::runtime::thread_all_supported();
    let keep_cap = if supported.contains(&Capability::CAP_BPF) {
        Capability::CAP_BPF
    } else {
        Capability::CAP_SYS_ADMIN
    };
    let mut missing = Vec::new();
    // CAP_SETPCAP (dropped below with the rest) is what changing the
    // securebits and the bounding set needs.
    let setpcap = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false);
    if setpcap {
        if let Err(e) = set_securebits(LOCKED_SECUREBITS) {
            missing.push(format!("securebits: {e}"));
        }
        for cap in &supported {
            if let Err(e) = caps::drop(None, CapSet::Bounding, *cap) {
                missing.push(format!("bounding set {cap}: {e}"));
                break;
            }
        }
    } else {
        missing.push("CAP_SETPCAP: bounding set and securebits left as they are".into());
    }
    nix::sys::prctl::set_no_new_privs().context("setting no_new_privs")?;
    let current = caps::read(None, CapSet::Permitted).context("reading capabilities")?;
    let keep: CapsHashSet = current.iter().copied().filter(|c| *c == keep_cap).collect();
    caps::set(None, CapSet::Effective, &keep).context("dropping effective capabilities")?;
    caps::set(None, CapSet::Permitted, &keep).context("dropping permitted capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing inheritable capabilities")?;
    let _ = caps::clear(None, CapSet::Ambient);
    Ok(Dropped {
        kept: names(&caps::read(None, CapSet::Effective).unwrap_or_default()),
        bounding: names(&caps::read(None, CapSet::Bounding).unwrap_or_default()),
        securebits: securebits().unwrap_or(0),
        no_new_privs: nix::sys::prctl::get_no_new_privs().unwrap_or(false),
        missing,
    })
}

fn names(set: &CapsHashSet) -> Vec<String> {
    let mut v: Vec<String> = set.iter().map(|c| c.to_string()).collect();
    v.sort();
    v
}

/// `PR_SET_SECUREBITS` (nix and caps wrap only the keep-caps bit).
fn set_securebits(bits: u32) -> nix::Result<()> {
    // SAFETY: PR_SET_SECUREBITS takes one integer argument and touches no
    // memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_SECUREBITS, libc::c_ulong::from(bits)) };
    nix::errno::Errno::result(r).map(drop)
}

/// The calling thread's securebits (`PR_GET_SECUREBITS`).
pub fn securebits() -> nix::Result<u32> {
    // SAFETY: PR_GET_SECUREBITS takes no argument and returns the bits.
    let r = unsafe { libc::prctl(libc::PR_GET_SECUREBITS) };
    nix::errno::Errno::result(r).map(|b| b as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_bits_are_noroot_and_no_setuid_fixup_with_their_locks() {
        // The kernel's values (include/uapi/linux/securebits.h).
        for bit in [0x01, 0x02, 0x04, 0x08, 0x20, 0x40, 0x80] {
            assert_ne!(LOCKED_SECUREBITS & bit, 0, "{bit:#x}");
        }
        assert_eq!(LOCKED_SECUREBITS & 0x10, 0, "KEEP_CAPS itself stays off");
    }

    #[test]
    fn securebits_of_this_thread_can_be_read() {
        // No privilege needed to read them.
        assert!(securebits().is_ok());
    }
}
