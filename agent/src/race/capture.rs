//! The kernel's proof that a refused connect was captured: the pod's own
//! stack refused a SYN NATed to the capture port, with a reset from that
//! port to the connecting socket's address. Such resets are kept briefly
//! (bounded in count and time) and matched to the failure that follows by
//! (network namespace, address, port).

use std::{collections::VecDeque, net::SocketAddr};

use crate::kernel::decode::KernelEvent;

/// One capture reset: when, in which network namespace (None: the kernel
/// could not tell), and to which socket address (the refused socket's own).
#[derive(Debug, Clone, Copy)]
struct Reset {
    ts: u64,
    netns: Option<u32>,
    to: SocketAddr,
}

/// Recent capture resets, in kernel-time order (the tracker applies events
/// in that order).
#[derive(Debug, Default)]
pub(super) struct Resets {
    recent: VecDeque<Reset>,
}

impl Resets {
    /// Keeps a capture reset; forgets those older than `window` and the
    /// oldest beyond `max`.
    pub(super) fn add(&mut self, ev: &KernelEvent, window: u64, max: usize) {
        let Some(to) = ev.dst else {
            return;
        };
        self.expire(ev.mono_ns, window);
        while self.recent.len() >= max.max(1) {
            self.recent.pop_front();
        }
        self.recent.push_back(Reset {
            ts: ev.mono_ns,
            netns: ev.netns,
            to,
        });
    }

    /// Whether a capture reset to this failure's socket (its local address
    /// and port, in its network namespace) came at most `window` before
    /// it. A matching reset is used up: the port may be reused later.
    pub(super) fn take_match(&mut self, ev: &KernelEvent, window: u64) -> bool {
        self.expire(ev.mono_ns, window);
        let Some(src) = ev.src else {
            return false;
        };
        if src.port() == 0 {
            return false;
        }
        let t = ev.mono_ns;
        let hit = self.recent.iter().rposition(|r| {
            r.to == src
                && r.ts <= t
                && match (r.netns, ev.netns) {
                    (Some(a), Some(b)) => a == b,
                    // One side does not know its namespace: the address
                    // and ephemeral port alone.
                    _ => true,
                }
        });
        match hit {
            Some(i) => {
                self.recent.remove(i);
                true
            }
            None => false,
        }
    }

    fn expire(&mut self, now: u64, window: u64) {
        while self
            .recent
            .front()
            .is_some_and(|r| now.saturating_sub(r.ts) > window)
        {
            self.recent.pop_front();
        }
    }

    /// Resets waiting for their failure.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.recent.len()
    }
}
