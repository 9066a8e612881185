//! A pod's timeline as a picture for the terminal: a time axis in seconds
//! from t = 0, one row per moment (`*`) or run of failed connects (`x`
//! refused by a race, `o` failed otherwise, `-` between), each with its time
//! and what it is, then the verdict, the mitigation, the fix and what
//! changed. ASCII only, so it survives any terminal, pager or ticket.

use std::fmt::Write as _;

use super::timeline::PodTimeline;

/// Columns between two ticks of the axis.
const TICK_COLS: usize = 10;
/// Width of the left-hand keys (`MITIGATION` is the longest).
const KEY: usize = 10;
/// Text is wrapped to this width.
const WIDTH: usize = 100;

/// One row of the picture: a moment, or a span of failed connects (its
/// end, the failures' kernel times, and their symbol).
struct Row<'a> {
    from: f64,
    span: Option<(f64, &'a [u64], char)>,
    time: String,
    label: &'a str,
}

/// The axis: `ticks` ticks of `step` seconds.
struct Axis {
    step: f64,
    ticks: usize,
}

impl Axis {
    /// The smallest 1-2-5 step that covers `span` seconds in at most 5 ticks.
    fn covering(span: f64) -> Axis {
        let span = span.max(0.001);
        let raw = span / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw * (1.0 - 1e-9))
            .unwrap_or(10.0 * mag);
        let ticks = ((span / step) * (1.0 - 1e-9)).ceil().max(1.0) as usize;
        Axis { step, ticks }
    }

    fn cols(&self) -> usize {
        self.ticks * TICK_COLS + 1
    }

    /// The column of `t` seconds (clamped to the axis).
    fn col(&self, t: f64) -> usize {
        let c = (t / self.step * TICK_COLS as f64).round();
        (c.max(0.0) as usize).min(self.cols() - 1)
    }

    /// The tick labels' line and the axis line.
    fn head(&self) -> (String, String) {
        let decimals = if self.step >= 1.0 {
            0
        } else {
            (-(self.step.log10() + 1e-9).floor()) as usize
        };
        let mut labels = String::new();
        for i in 0..=self.ticks {
            let l = format!("{:.*}s", decimals, i as f64 * self.step);
            let at = i * TICK_COLS;
            let pad = at.saturating_sub(labels.len());
            labels.push_str(&" ".repeat(pad));
            labels.push_str(&l);
            labels.push(' ');
        }
        let line: String = (0..self.cols())
            .map(|c| if c % TICK_COLS == 0 { '|' } else { '-' })
            .collect();
        (labels.trim_end().to_string(), line)
    }
}

/// `KEY value` on one line (a verdict stays greppable).
fn keyed(out: &mut String, key: &str, value: &str) {
    let _ = writeln!(out, "{key:<KEY$} {value}");
}

/// `KEY value`, the value wrapped under itself (long recommendations).
fn wrapped(out: &mut String, key: &str, value: &str) {
    let indent = " ".repeat(KEY + 1);
    let mut line = format!("{key:<KEY$} ");
    let mut empty = true;
    for word in value.split_whitespace() {
        if !empty && line.len() + 1 + word.len() > WIDTH {
            out.push_str(line.trim_end());
            out.push('\n');
            line = indent.clone();
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

/// The picture of one pod.
pub(crate) fn pod(t: &PodTimeline) -> String {
    let mut out = String::new();
    let mut who = Vec::new();
    match (&t.workload_kind, &t.workload) {
        (Some(k), Some(w)) => who.push(format!("{k} {w}")),
        (None, Some(w)) => who.push(format!("workload {w}")),
        _ => {}
    }
    if let Some(n) = &t.node {
        who.push(format!("node {n}"));
    }
    let who = if who.is_empty() {
        String::new()
    } else {
        format!(" ({})", who.join(", "))
    };
    keyed(&mut out, "POD", &format!("{}{who}", t.name()));
    let zero = match t.origin {
        "pod_start" => "the pod's first process",
        _ => "the first event seen of this pod (its start was not seen)",
    };
    let at = t
        .origin_time
        .as_deref()
        .map(|w| format!(", {w}"))
        .unwrap_or_default();
    keyed(
        &mut out,
        "T=0",
        &format!("{zero}{at}; times in seconds (the node's kernel clock)"),
    );
    out.push('\n');

    let mut rows: Vec<Row<'_>> = Vec::new();
    for m in &t.marks {
        rows.push(Row {
            from: m.at_s,
            span: None,
            time: format!("{:.3}", m.at_s),
            label: &m.label,
        });
    }
    for s in &t.spans {
        let sym = if s.is_race() { 'x' } else { 'o' };
        let time = if s.to_mono_ns > s.from_mono_ns {
            format!("{:.3}-{:.3}", s.from_s, s.to_s)
        } else {
            format!("{:.3}", s.from_s)
        };
        rows.push(Row {
            from: s.from_s,
            span: Some((s.to_s, s.seen_ns.as_slice(), sym)),
            time,
            label: &s.label,
        });
    }
    // Stable: marks of one moment keep their order, and come before spans.
    rows.sort_by(|a, b| a.from.total_cmp(&b.from));
    let end = rows
        .iter()
        .map(|r| r.span.map_or(r.from, |s| s.0))
        .fold(0.0, f64::max);
    let axis = Axis::covering(end);
    let gutter = " ".repeat(KEY + 1);
    let (labels, line) = axis.head();
    let time_w = rows.iter().map(|r| r.time.len()).max().unwrap_or(0);
    let _ = writeln!(out, "{gutter}{labels}");
    let _ = writeln!(out, "{gutter}{line}");
    let origin = t.origin_mono_ns as i128;
    let mut used = (false, false);
    for row in &rows {
        let mut bar = vec![' '; axis.cols()];
        match row.span {
            None => bar[axis.col(row.from)] = '*',
            Some((to, seen, sym)) => {
                // Ordered: outside data may give an end before its start.
                let (a, b) = (axis.col(row.from), axis.col(to));
                let (a, b) = (a.min(b), a.max(b));
                bar[a..=b].fill('-');
                for &ns in seen {
                    bar[axis.col((ns as i128 - origin) as f64 / 1e9)] = sym;
                }
                if sym == 'x' {
                    used.0 = true;
                } else {
                    used.1 = true;
                }
            }
        }
        let bar: String = bar.into_iter().collect();
        let (time, label) = (&row.time, row.label);
        let _ = writeln!(out, "{gutter}{bar}  {time:>time_w$}  {label}");
    }
    let mut legend = vec!["* moment"];
    if used.0 {
        legend.push("x refused connect (race)");
    }
    if used.1 {
        legend.push("o failed connect (not the race)");
    }
    let _ = writeln!(out, "{gutter}{}", legend.join("   "));
    out.push('\n');

    for v in &t.verdicts {
        keyed(&mut out, "VERDICT", &v.text);
    }
    if let Some(m) = &t.mitigation_label {
        keyed(&mut out, "MITIGATION", m);
    }
    for r in &t.recommendations {
        wrapped(&mut out, "FIX", r);
    }
    if let Some(c) = &t.changed {
        keyed(&mut out, "CHANGED", &c.text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::{change, events, timeline};

    #[test]
    fn axis_steps() {
        for (span, step, ticks) in [
            (1.2, 0.5, 3),
            (2.0, 0.5, 4),
            (0.004, 0.001, 4),
            (9.0, 2.0, 5),
            (10.0, 2.0, 5),
            (0.0, 0.0002, 5),
            (3600.0, 1000.0, 4),
        ] {
            let a = Axis::covering(span);
            assert!(
                (a.step - step).abs() < step * 1e-9 && a.ticks == ticks,
                "{span}: {} x {}",
                a.step,
                a.ticks
            );
        }
        let a = Axis::covering(1.2);
        assert_eq!(
            a.head(),
            (
                "0.0s      0.5s      1.0s      1.5s".to_string(),
                "|---------|---------|---------|".to_string()
            )
        );
        assert_eq!(
            (a.col(0.0), a.col(1.2), a.col(9.0), a.col(-1.0)),
            (0, 24, 30, 0)
        );
    }

    const MS: u64 = 1_000_000;
    const T0: u64 = 1_000_000 * MS;

    /// The startup race of the demo's pod as the agent reports it: a
    /// listener line (which gives the node's clock), the refusals, the
    /// sidecar-ready and startup-race summaries.
    fn race_lines() -> String {
        let who = r#""node":"node-a","namespace":"shop","pod":"checkout-7d9f8c6b5-x2k4p","pod_uid":"u1","workload":"checkout","workload_kind":"Deployment""#;
        let mut s = String::new();
        s.push_str(&format!(
            r#"{{"type":"listener","state":"listen","time":"2026-11-29T20:00:00.010Z","mono_ns":{},{who},"container":"istio-proxy","uid":1337,"port":15021}}"#,
            T0 + 10 * MS
        ));
        s.push('\n');
        for i in 0..4 {
            s.push_str(&format!(
                r#"{{"type":"connect_failure","phase":"startup_race","time":"2026-11-29T20:00:00Z","mono_ns":{},{who},"container":"app","dst":"10.0.0.1:8080","error":"ECONNREFUSED"}}"#,
                T0 + (200 + 300 * i) * MS
            ));
            s.push('\n');
        }
        s.push_str(&format!(
            r#"{{"type":"connect_failure","phase":"not_captured","time":"2026-11-29T20:00:00Z","mono_ns":{},{who},"container":"app","dst":"10.0.0.9:5432"}}"#,
            T0 + 500 * MS
        ));
        s.push('\n');
        let starts = format!(
            r#""pod_start_mono_ns":{},"sidecar_start_mono_ns":{},"container_start_mono_ns":{{"app":{},"istio-proxy":{}}},"sidecar_listen_mono_ns":{{"15001":{},"15021":{}}}"#,
            T0,
            T0 + 2 * MS,
            T0 + 150 * MS,
            T0 + MS,
            T0 + 1200 * MS,
            T0 + 10 * MS
        );
        s.push_str(&format!(
            r#"{{"type":"sidecar_ready","time":"2026-11-29T20:00:01.2Z",{who},{starts},"ready_mono_ns":{},"pod_start_to_ready_seconds":1.2,"mitigation":{{"hold":false,"native_sidecar":false}}}}"#,
            T0 + 1200 * MS
        ));
        s.push('\n');
        s.push_str(&format!(
            r#"{{"type":"startup_race","time":"2026-11-29T20:00:02.2Z",{who},{starts},"refused":4,"first_refusal_mono_ns":{},"ready_mono_ns":{},"window_seconds":1.0,"destinations":["10.0.0.1:8080"],"containers":["app"],"mitigation":{{"hold":false,"native_sidecar":false}},"recommendation":"enable holdApplicationUntilProxyStarts for this workload","revision":{{"app_images":{{"app":"reg/shop/checkout:1.4.2"}},"proxy_version":"1.22.3","pod_template_hash":"7d9f8c6b5"}}}}"#,
            T0 + 200 * MS,
            T0 + 1200 * MS
        ));
        s.push('\n');
        s
    }

    fn timeline_of(text: &str) -> Vec<timeline::PodTimeline> {
        let (lines, bad) = events::parse(text);
        assert_eq!(bad, 0);
        timeline::build(&lines, events::boot_offset_ns(&lines))
    }

    #[test]
    fn a_startup_race_drawn_exactly() {
        let mut pods = timeline_of(&race_lines());
        assert_eq!(pods.len(), 1);
        let all = pods.clone();
        pods[0].changed = Some(change::what_changed(&pods[0], &all));
        let want = "\
POD        shop/checkout-7d9f8c6b5-x2k4p (Deployment checkout, node node-a)
T=0        the pod's first process, 2026-11-29T20:00:00.000Z; times in seconds (the node's kernel clock)

           0.0s      0.5s      1.0s      1.5s
           |---------|---------|---------|
           *                                      0.000  pod start (first process)
           *                                      0.001  container istio-proxy starts
           *                                      0.002  sidecar starts (pilot-agent/envoy)
           *                                      0.010  istio-proxy listens on 15021 (health: what holdApplicationUntilProxyStarts and probes wait for)
              *                                   0.150  container app starts
               x-----x-----x-----x--        0.200-1.200  4 refused (startup_race: before the sidecar listened) -> 10.0.0.1:8080
                     o                            0.500  1 failed (not_captured: not captured: the destination itself refused) -> 10.0.0.9:5432
                                   *              1.200  istio-proxy listens on 15001 (outbound capture: the sidecar is ready)
           * moment   x refused connect (race)   o failed connect (not the race)

VERDICT    startup race: 4 outbound connect()s refused over 1.000 s before istio-proxy listened on 15001
MITIGATION none
FIX        enable holdApplicationUntilProxyStarts for this workload
CHANGED    no earlier revision of checkout in this agent's events
";
        assert_eq!(pod(&pods[0]), want, "got:\n{}", pod(&pods[0]));
    }

    #[test]
    fn no_race_and_shutdown_race() {
        let who = r#""namespace":"shop","pod":"api-1","pod_uid":"u2","workload":"api""#;
        let text = format!(
            "{}\n",
            format_args!(
                r#"{{"type":"sidecar_ready","time":"2026-11-29T20:00:01Z",{who},"pod_start_mono_ns":{},"ready_mono_ns":{},"sidecar_listen_mono_ns":{{"15001":{}}},"pod_start_to_ready_seconds":0.3,"mitigation":{{}}}}"#,
                T0,
                T0 + 300 * MS,
                T0 + 300 * MS
            )
        );
        let p = &timeline_of(&text)[0];
        assert!(!p.raced());
        let out = pod(p);
        assert!(
            out.contains("VERDICT    no race: istio-proxy listened on 15001 0.300 s after the pod started, and no outbound connect() was refused before\n"),
            "{out}"
        );
        assert!(out.contains("MITIGATION unknown"), "{out}");
        assert!(
            out.contains("T=0        the pod's first process; times"),
            "{out}"
        );

        let down = format!(
            "{}\n",
            format_args!(
                r#"{{"type":"shutdown_race","time":"2026-11-29T20:00:09Z",{who},"pod_start_mono_ns":{},"refused":3,"capture_closed_mono_ns":{},"first_refusal_mono_ns":{},"last_refusal_mono_ns":{},"destinations":["10.0.0.1:8080"],"recommendation":"drain"}}"#,
                T0,
                T0 + 1500 * MS,
                T0 + 1600 * MS,
                T0 + 1800 * MS
            )
        );
        let p = &timeline_of(&down)[0];
        assert!(p.raced());
        let out = pod(p);
        for want in [
            "           |---------|---------|---------|---------|\n",
            "                                         *                  1.500  istio-proxy stops listening on 15001 (outbound capture ends)\n",
            "                                           x---x      1.600-1.800  3 refused (shutdown_race: after the sidecar stopped listening) -> 10.0.0.1:8080\n",
            "VERDICT    shutdown race: 3 outbound connect()s refused after istio-proxy stopped listening on 15001 while the app still ran\n",
            "FIX        drain\n",
        ] {
            assert!(out.contains(want), "missing {want:?} in:\n{out}");
        }
    }
}
