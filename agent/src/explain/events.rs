//! What `/events` answers, as `explain` reads it: one JSON object per line
//! (the schema in README.md), every field optional. Explain is a client of
//! that public contract, so it reads the lines rather than sharing the
//! agent's own types: an older or newer agent's lines still parse, and a
//! field explain does not know is ignored.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::race::Mitigation;

/// One `/events` line: a kernel event (`connect_failure`, `listener`,
/// `process`) or a summary (`sidecar_ready`, `startup_race`,
/// `shutdown_race`, `inbound_race`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Line {
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339: the kernel's time for kernel events, the writing time for
    /// summaries.
    pub time: Option<String>,
    /// Kernel CLOCK_MONOTONIC ns (kernel events only).
    pub mono_ns: Option<u64>,
    pub node: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    pub container: Option<String>,
    pub workload: Option<String>,
    pub workload_kind: Option<String>,
    pub phase: Option<String>,
    /// `listen`/`closed`, `exec`/`exit`.
    pub state: Option<String>,
    pub uid: Option<u32>,
    pub port: Option<u16>,
    pub dst: Option<String>,
    pub refused: Option<u64>,
    pub first_refusal_mono_ns: Option<u64>,
    pub last_refusal_mono_ns: Option<u64>,
    /// 0: the sidecar was listening before the agent started.
    pub ready_mono_ns: Option<u64>,
    pub capture_closed_mono_ns: Option<u64>,
    pub window_seconds: Option<f64>,
    pub pod_start_to_ready_seconds: Option<f64>,
    pub destinations: Vec<String>,
    pub mitigation: Option<Mitigation>,
    pub recommendation: Option<String>,
    /// The pod's mesh profile (`istio`, `linkerd`...), on the lines of
    /// agents that know profiles.
    pub mesh: Option<String>,
    pub pod_start_mono_ns: Option<u64>,
    pub sidecar_start_mono_ns: Option<u64>,
    pub container_start_mono_ns: BTreeMap<String, u64>,
    pub sidecar_listen_mono_ns: BTreeMap<u16, u64>,
    /// What the pod runs (images, proxy, Istio revision, pod-template hash),
    /// on summaries of agents that know it.
    pub revision: Option<Revision>,
    /// `inbound_race`: `startup`, `shutdown` or `bind`.
    pub when: Option<String>,
    /// `inbound_race`: the app ports refused.
    pub ports: Vec<u16>,
    /// `inbound_race` at start-up: the app's first LISTEN on those ports.
    pub app_listen_mono_ns: Option<u64>,
    /// `inbound_race` at shutdown: when the app's listener closed.
    pub listener_close_mono_ns: Option<u64>,
    /// `inbound_race` for a bind: where the app listened instead.
    pub bound_addresses: Vec<String>,
}

/// A pod's revision as summaries carry it; each field absent when unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct Revision {
    /// Image of each application container, by container name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub app_images: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_version: Option<String>,
    /// `istio.io/rev`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub istio_revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_template_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `api` or `runtime`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl Line {
    /// The line's wall-clock time, if it has a readable one.
    pub(crate) fn wall(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(self.time.as_deref()?).ok()
    }

    /// Whether this is one of the per-pod summaries.
    pub(crate) fn is_summary(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "sidecar_ready" | "startup_race" | "shutdown_race"
        )
    }
}

/// The lines of an NDJSON answer, and how many lines could not be read
/// (not JSON, or a field of the wrong type): those are skipped, not fatal.
pub(crate) fn parse(ndjson: &str) -> (Vec<Line>, usize) {
    let mut lines = Vec::new();
    let mut unreadable = 0;
    for l in ndjson.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Line>(l) {
            Ok(line) => lines.push(line),
            Err(_) => unreadable += 1,
        }
    }
    (lines, unreadable)
}

/// Keeps the lines written within `since` before `now`; a line without a
/// readable time is kept (nothing says it is old).
pub(crate) fn within(lines: Vec<Line>, since: Duration, now: SystemTime) -> Vec<Line> {
    let from = now.checked_sub(since).unwrap_or(SystemTime::UNIX_EPOCH);
    lines
        .into_iter()
        .filter(|l| l.wall().is_none_or(|t| t >= from))
        .collect()
}

/// The wall-clock time of kernel time 0 on the agent's node, from any
/// kernel line (it carries both clocks), in ns since the epoch.
pub(crate) fn boot_offset_ns(lines: &[Line]) -> Option<i128> {
    lines.iter().find_map(|l| {
        let mono = l.mono_ns?;
        let wall = l.wall()?.duration_since(SystemTime::UNIX_EPOCH).ok()?;
        Some(wall.as_nanos() as i128 - i128::from(mono))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_summaries_and_kernel_lines_and_skips_bad_ones() {
        let text = concat!(
            r#"{"type":"startup_race","time":"2026-11-29T20:00:01Z","namespace":"shop","pod":"p","refused":3,"#,
            r#""first_refusal_mono_ns":5,"destinations":["10.0.0.1:80"],"mitigation":{"hold":false},"#,
            r#""sidecar_listen_mono_ns":{"15021":7},"revision":{"proxy_version":"1.22.3","future":1},"future":true}"#,
            "\n",
            "not json\n",
            r#"{"type":"listener","port":"x"}"#,
            "\n\n",
            r#"{"type":"listener","time":"2026-11-29T20:00:00.5Z","mono_ns":500000000,"port":15001}"#,
            "\n"
        );
        let (lines, bad) = parse(text);
        assert_eq!((lines.len(), bad), (2, 2));
        let s = &lines[0];
        assert!(s.is_summary());
        assert_eq!(s.refused, Some(3));
        assert_eq!(s.sidecar_listen_mono_ns[&15021], 7);
        assert_eq!(s.mitigation.as_ref().unwrap().hold, Some(false));
        assert_eq!(
            s.revision.as_ref().unwrap().proxy_version.as_deref(),
            Some("1.22.3")
        );
        assert_eq!(lines[1].port, Some(15001));
        // 20:00:00.5 at kernel time 0.5 s: kernel time 0 is 20:00:00.
        let zero = humantime::parse_rfc3339("2026-11-29T20:00:00Z").unwrap();
        assert_eq!(
            boot_offset_ns(&lines),
            Some(
                zero.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as i128
            )
        );
    }

    #[test]
    fn since_keeps_recent_and_undated_lines() {
        let (lines, _) = parse(concat!(
            r#"{"type":"a","time":"2026-11-29T18:00:00Z"}"#,
            "\n",
            r#"{"type":"b","time":"2026-11-29T19:30:00Z"}"#,
            "\n",
            r#"{"type":"c"}"#,
            "\n"
        ));
        let now = humantime::parse_rfc3339("2026-11-29T20:00:00Z").unwrap();
        let kept: Vec<String> = within(lines, Duration::from_secs(3600), now)
            .into_iter()
            .map(|l| l.kind)
            .collect();
        assert_eq!(kept, ["b", "c"]);
    }
}
