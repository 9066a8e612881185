//! Every kind of kernel record in one table: its ABI value, its decoded
//! [`Kind`], and the record type it is counted and written as. Adding a kind
//! means a constant in `connscope_ebpf::kind` and a row here.

use connscope_ebpf::kind;
use serde::Serialize;

/// What the kernel saw (a decoded [`connscope_ebpf::Event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    ConnectFailure,
    Listen,
    ListenClose,
    Exec,
    Exit,
    /// A connect redirected to the capture port was refused there.
    CaptureReset,
}

/// The type of a ring-buffer record: the `type` label of
/// `connscope_events_total` and the `type` of a JSON line, and the index of
/// its per-batch count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordType {
    ConnectFailure,
    Listener,
    Process,
    Cgroup,
    CaptureReset,
    Unknown,
}

/// The table: ABI value -> decoded kind -> record type.
const KINDS: [(u8, Kind, RecordType); 6] = [
    (
        kind::CONNECT_FAILURE,
        Kind::ConnectFailure,
        RecordType::ConnectFailure,
    ),
    (kind::LISTEN, Kind::Listen, RecordType::Listener),
    (kind::LISTEN_CLOSE, Kind::ListenClose, RecordType::Listener),
    (kind::EXEC, Kind::Exec, RecordType::Process),
    (kind::EXIT, Kind::Exit, RecordType::Process),
    (
        kind::CAPTURE_RESET,
        Kind::CaptureReset,
        RecordType::CaptureReset,
    ),
];

impl Kind {
    /// The decoded kind of an event record's ABI `kind` (None: not an
    /// event kind, e.g. a cgroup record's or an unknown value).
    pub(crate) fn from_abi(k: u8) -> Option<Kind> {
        KINDS.iter().find(|r| r.0 == k).map(|r| r.1)
    }

    /// How records of this kind are counted and typed.
    pub(crate) fn record_type(self) -> RecordType {
        KINDS
            .iter()
            .find(|r| r.1 == self)
            .map_or(RecordType::Unknown, |r| r.2)
    }
}

impl RecordType {
    /// Every type, in index order.
    pub(crate) const ALL: [RecordType; 6] = [
        RecordType::ConnectFailure,
        RecordType::Listener,
        RecordType::Process,
        RecordType::Cgroup,
        RecordType::CaptureReset,
        RecordType::Unknown,
    ];

    /// The type of an event record's ABI `kind`.
    pub(crate) fn of_abi(k: u8) -> RecordType {
        match k {
            kind::CGROUP_MKDIR | kind::CGROUP_RMDIR => RecordType::Cgroup,
            k => Kind::from_abi(k).map_or(RecordType::Unknown, Kind::record_type),
        }
    }

    /// The label value.
    pub(crate) fn label(self) -> &'static str {
        match self {
            RecordType::ConnectFailure => "connect_failure",
            RecordType::Listener => "listener",
            RecordType::Process => "process",
            RecordType::Cgroup => "cgroup",
            RecordType::CaptureReset => "capture_reset",
            RecordType::Unknown => "unknown",
        }
    }
}

/// Per-type counts of one batch, indexed by [`RecordType`].
pub(crate) type RecordCounts = [u64; RecordType::ALL.len()];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_abi_kind_round_trips_and_types_index_in_order() {
        for (abi, k, t) in KINDS {
            assert_eq!(Kind::from_abi(abi), Some(k));
            assert_eq!(k.record_type(), t);
            assert_eq!(RecordType::of_abi(abi), t);
        }
        assert_eq!(RecordType::of_abi(kind::CGROUP_MKDIR), RecordType::Cgroup);
        assert_eq!(RecordType::of_abi(200), RecordType::Unknown);
        assert_eq!(Kind::from_abi(200), None);
        for (i, t) in RecordType::ALL.into_iter().enumerate() {
            assert_eq!(t as usize, i);
        }
    }
}
