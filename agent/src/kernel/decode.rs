//! Raw ring-buffer records -> typed events with wall-clock times.
//!
//! The only place that knows the byte layout of [`connscope_ebpf::Event`]
//! from the reading side; everything downstream works on [`KernelEvent`].

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use connscope_ebpf::{COMM_LEN, CgroupEvent, Event, PATH_LEN, PathEvent, Record, flags, kind};

pub use super::kind::Kind;

/// A decoded kernel event. Fields that the kernel did not know are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEvent {
    pub kind: Kind,
    /// Kernel CLOCK_MONOTONIC timestamp (for ordering and intervals).
    pub mono_ns: u64,
    /// The same instant as wall-clock time.
    pub time: SystemTime,
    /// When the connect started (monotonic ns), for connect failures.
    pub start_mono_ns: Option<u64>,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: Comm,
    pub cgroup_id: Option<u64>,
    pub netns: Option<u32>,
    /// "inet", "inet6", "unix" or the number.
    pub family: Family,
    pub src: Option<SocketAddr>,
    /// Destination as the application dialed it (before any iptables REDIRECT).
    pub dst: Option<SocketAddr>,
    /// AF_UNIX path of a failed connect, or the filename of an exec.
    pub path: Option<String>,
    pub errno: i32,
    pub nonblocking: bool,
    pub from_syscall: bool,
    pub rst: bool,
    /// False when the connecting task is unknown (pid/comm/uid are zero).
    pub context_known: bool,
}

/// A task's command name, kept inline (no allocation per event). Bytes that
/// are not UTF-8 are replaced when shown.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Comm {
    bytes: [u8; COMM_LEN],
    len: u8,
}

impl Comm {
    /// From the kernel's NUL-padded bytes.
    pub fn new(raw: &[u8; COMM_LEN]) -> Self {
        let len = raw.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        Comm {
            bytes: *raw,
            len: len as u8,
        }
    }

    /// From a string (tests, configuration); truncated like the kernel does.
    pub fn from_name(s: &str) -> Self {
        let mut bytes = [0u8; COMM_LEN];
        let n = s.len().min(COMM_LEN - 1);
        bytes[..n].copy_from_slice(&s.as_bytes()[..n]);
        Comm {
            bytes,
            len: n as u8,
        }
    }

    /// The name; lossy for bytes that are not UTF-8.
    pub(crate) fn as_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.bytes[..self.len as usize])
    }

    /// Whether it equals `name`.
    pub(crate) fn is(&self, name: &str) -> bool {
        &self.bytes[..self.len as usize] == name.as_bytes()
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl PartialEq<&str> for Comm {
    fn eq(&self, o: &&str) -> bool {
        self.is(o)
    }
}

/// Address family of a socket event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Unix,
    Inet,
    Inet6,
    Other(u16),
}

impl Family {
    fn from_raw(f: u16) -> Self {
        match f as i32 {
            libc::AF_UNIX => Family::Unix,
            libc::AF_INET => Family::Inet,
            libc::AF_INET6 => Family::Inet6,
            _ => Family::Other(f),
        }
    }

    /// Name used in JSON output.
    pub(crate) fn name(self) -> String {
        match self {
            Family::Unix => "unix".into(),
            Family::Inet => "inet".into(),
            Family::Inet6 => "inet6".into(),
            Family::Other(n) => n.to_string(),
        }
    }
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The record is not the size of an event (ABI mismatch or corruption).
    Size(usize),
    /// The kind byte is not one we know.
    Kind(u8),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Size(n) => write!(
                f,
                "ring buffer record of {n} bytes, expected {}",
                size_of::<Event>()
            ),
            DecodeError::Kind(k) => write!(f, "unknown event kind {k}"),
        }
    }
}

/// Converts kernel CLOCK_MONOTONIC to wall-clock time.
///
/// The offset is re-measured by [`Clock::refresh`] so NTP steps are followed.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// realtime - monotonic, in ns.
    offset_ns: i128,
}

impl Clock {
    /// Measures the offset now.
    pub fn new() -> Self {
        let mut c = Clock { offset_ns: 0 };
        c.refresh();
        c
    }

    /// A fixed offset, for tests.
    pub fn with_offset_ns(offset_ns: i128) -> Self {
        Clock { offset_ns }
    }

    /// Re-measures realtime - monotonic.
    pub(crate) fn refresh(&mut self) {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        self.offset_ns = real as i128 - mono as i128;
    }

    /// Current CLOCK_MONOTONIC in ns (the kernel's `bpf_ktime_get_ns`).
    pub(crate) fn mono_now() -> u64 {
        clock_ns(libc::CLOCK_MONOTONIC)
    }

    /// Wall-clock time of a monotonic timestamp.
    pub(crate) fn wall(&self, mono_ns: u64) -> SystemTime {
        let ns = mono_ns as i128 + self.offset_ns;
        if ns <= 0 {
            UNIX_EPOCH
        } else {
            UNIX_EPOCH + Duration::from_nanos(ns.min(u64::MAX as i128) as u64)
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A ring-buffer record: the three record types differ in size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raw {
    /// An [`Event`], with the path of a [`PathEvent`] (AF_UNIX failures,
    /// execs) or without one.
    Event(Event, Option<[u8; PATH_LEN]>),
    Cgroup(CgroupEvent),
}

/// A cgroup v2 directory created or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupChange {
    pub created: bool,
    pub id: u64,
    /// As the kernel record holds it: cut after `CGROUP_PATH_LEN - 1` bytes
    /// (nested runtimes, kind or sysbox, go past that).
    pub path: String,
    /// The path filled the record: it may have been cut, and must not be
    /// taken for the cgroup's path.
    pub truncated: bool,
}

/// Reads a record out of the ring buffer.
pub fn parse_record(bytes: &[u8]) -> Result<Raw, DecodeError> {
    match bytes.len() {
        n if n == size_of::<CgroupEvent>() => read_plain(bytes).map(Raw::Cgroup),
        n if n == size_of::<PathEvent>() => {
            read_plain(bytes).map(|p: PathEvent| Raw::Event(p.event, Some(p.path)))
        }
        _ => read_plain(bytes).map(|e| Raw::Event(e, None)),
    }
}

/// Copies a record out of its bytes, which must be exactly one `T`.
fn read_plain<T: Record>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() != size_of::<T>() {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: the length was checked; T is plain data (see Record);
    // read_unaligned tolerates any alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes a cgroup record.
pub fn decode_cgroup(c: &CgroupEvent) -> Result<CgroupChange, DecodeError> {
    let created = match c.kind {
        kind::CGROUP_MKDIR => true,
        kind::CGROUP_RMDIR => false,
        k => return Err(DecodeError::Kind(k)),
    };
    let path = cstr(&c.path);
    // bpf_probe_read_kernel_str keeps the last byte for the NUL: a path of
    // CGROUP_PATH_LEN - 1 bytes or more may be a prefix of a longer one.
    let truncated = !c.path[..c.path.len() - 1].contains(&0);
    Ok(CgroupChange {
        created,
        truncated,
        id: c.cgroup_id,
        path: if path.starts_with('/') {
            path
        } else {
            format!("/{path}")
        },
    })
}

fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// An address as the kernel stored it, with IPv4-mapped IPv6 addresses
/// (`::ffff:a.b.c.d`, what a dual-stack socket dialing IPv4 holds: Java by
/// default) turned into the IPv4 address they are, so that every test on an
/// address (loopback, the pod's own, capture ranges) and every report sees
/// one form.
fn ip(family: Family, raw: &[u8; 16]) -> Option<IpAddr> {
    match family {
        Family::Inet => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        Family::Inet6 => {
            let v6 = Ipv6Addr::from(*raw);
            Some(match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            })
        }
        _ => None,
    }
}

/// Turns a raw event (and the path it carries, if any) into a [`KernelEvent`].
pub fn decode(
    ev: &Event,
    path: Option<&[u8; PATH_LEN]>,
    clock: &Clock,
) -> Result<KernelEvent, DecodeError> {
    let k = Kind::from_abi(ev.kind).ok_or(DecodeError::Kind(ev.kind))?;
    let family = Family::from_raw(ev.family);
    let is_socket = matches!(
        k,
        Kind::ConnectFailure | Kind::Listen | Kind::ListenClose | Kind::CaptureReset
    );
    let src = if is_socket {
        ip(family, &ev.saddr).map(|a| SocketAddr::new(a, ev.sport))
    } else {
        None
    };
    // A capture reset's destination is the refused socket's local address.
    let dst = if matches!(k, Kind::ConnectFailure | Kind::CaptureReset) {
        ip(family, &ev.daddr).map(|a| SocketAddr::new(a, ev.dport))
    } else {
        None
    };
    // A dual-stack socket's IPv4 peer: reported as the IPv4 flow it is.
    let peer = dst.or(src);
    let family = if family == Family::Inet6 && peer.is_some_and(|a| a.is_ipv4()) {
        Family::Inet
    } else {
        family
    };
    let path = match (k, path) {
        (Kind::ConnectFailure, Some(p)) if family == Family::Unix => Some(unix_path(p)),
        (Kind::Exec, Some(p)) => Some(cstr(p)),
        _ => None,
    };
    let context_known = ev.flags & flags::CONTEXT_KNOWN != 0;
    Ok(KernelEvent {
        kind: k,
        mono_ns: ev.ts_ns,
        time: clock.wall(ev.ts_ns),
        start_mono_ns: (ev.start_ns != 0 && k == Kind::ConnectFailure).then_some(ev.start_ns),
        pid: ev.tgid,
        tid: ev.tid,
        uid: ev.uid,
        gid: ev.gid,
        comm: Comm::new(&ev.comm),
        cgroup_id: (ev.cgroup_id != 0).then_some(ev.cgroup_id),
        netns: (ev.flags & flags::NETNS_KNOWN != 0).then_some(ev.netns),
        family,
        src,
        dst,
        path,
        errno: ev.errno,
        nonblocking: ev.flags & flags::NONBLOCKING != 0,
        from_syscall: ev.flags & flags::FROM_SYSCALL != 0,
        rst: ev.flags & flags::RST != 0,
        context_known,
    })
}

/// AF_UNIX paths: abstract sockets start with NUL and are shown as `@name`.
fn unix_path(raw: &[u8]) -> String {
    match raw.first() {
        Some(0) if raw.len() > 1 && raw[1] != 0 => format!("@{}", cstr(&raw[1..])),
        _ => cstr(raw),
    }
}

/// Symbolic name of an errno (`ECONNREFUSED`), or the number.
pub(crate) fn errno_name(errno: i32) -> String {
    if errno == 0 {
        return "none".into();
    }
    let e = nix::errno::Errno::from_raw(errno);
    if e == nix::errno::Errno::UnknownErrno {
        errno.to_string()
    } else {
        format!("{e:?}")
    }
}

#[cfg(test)]
mod tests;
