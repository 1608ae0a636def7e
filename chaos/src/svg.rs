//! The timeline plot of a chaos run (`timeline.svg`), drawn from a [`Report`].
//!
//! One self-contained SVG (1200 × 700, no external fonts, scripts or stylesheets), laid out top to bottom:
//! a two-line header (scenario, verdict, duration, totals, detection times), a strip of fault labels, then
//! three panels sharing one time axis — acknowledged orders and errors per second, p99 latency per second
//! (log axis), and one status lane per node — with fault lines, heal bands and the load-end line drawn
//! across all three, then the time ticks and a legend. Written by hand: the document is small and fixed,
//! and a plotting crate would be a large dependency for it.
//!
//! Every coordinate goes through `Num`, which turns a non-finite value into 0, and every scale guards its
//! divisor, so a degenerate report (empty, zero duration, NaN fields) still yields a valid document.

use std::collections::BTreeSet;
use std::fmt::{self, Display, Write};

use crate::report::{FaultRecord, Report, Second};

const WIDTH: f64 = 1200.0;
const HEIGHT: f64 = 700.0;
/// Left edge of the plot area; the margin holds the rotated panel titles, y ticks and node names.
const X0: f64 = 90.0;
const X1: f64 = 1180.0;
/// Top of the first panel, below the header and the fault-label strip.
const PLOT_TOP: f64 = 84.0;
/// Space between panels.
const GAP: f64 = 22.0;
/// From the bottom of the last panel to the first legend row (time tick labels and axis caption between).
const BELOW_PLOT: f64 = 46.0;
const LEGEND_ROW: f64 = 15.0;
/// Baselines of the fault-label rows, the one nearest the plot first (it is tried first).
const LABEL_ROWS: [f64; 2] = [77.0, 63.0];
/// Rough advance of one character at font-size 10 (sans-serif); generous so estimated boxes cover the text.
const CHAR_W: f64 = 6.0;
/// Tallest a node lane gets; with few nodes the lanes stay thin bars rather than big blocks.
const MAX_LANE: f64 = 30.0;
/// Lane height the node panel is sized for; panels 1 and 2 get whatever is left.
const LANE: f64 = 26.0;

const ACK: &str = "#1f77b4";
const ERR: &str = "#d62728";
const P99: &str = "#6a3d9a";
const PASS: &str = "#1a7f37";
const FAIL: &str = "#cf222e";

/// The SVG document for `report`.
pub fn render(report: &Report) -> String {
    let time = TimeAxis::new(report);
    let mut secs: Vec<&Second> = report.timeline.seconds.iter().collect();
    secs.sort_by_key(|s| s.t);
    let mut faults: Vec<(usize, &FaultRecord)> =
        report.faults.iter().enumerate().filter(|(_, f)| f.at_s.is_finite()).collect();
    faults.sort_by(|a, b| a.1.at_s.total_cmp(&b.1.at_s));

    let legend = legend_items(report);
    let layout = Layout::new(report.timeline.nodes.len(), legend_rows(&legend));
    let (p1, p2, p3) = (layout.panels[0], layout.panels[1], layout.panels[2]);
    let span = (p1.0, p3.1);

    let mut s = String::with_capacity(32 * 1024);
    w(
        &mut s,
        format_args!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\">\n",
            Num(WIDTH),
            Num(HEIGHT)
        ),
    );
    w(&mut s, format_args!("<title>chaos run {}</title>\n", esc(&report.scenario)));
    if !report.description.is_empty() {
        w(&mut s, format_args!("<desc>{}</desc>\n", esc(&report.description)));
    }
    s.push_str(
        "<style>text{font-family:sans-serif;font-size:11px;fill:#222}.small{font-size:10px}\
         .muted{fill:#666}.axis{stroke:#999;stroke-width:1}.grid{stroke:#e4e4e4;stroke-width:1}</style>\n",
    );
    w(&mut s, format_args!("<rect width=\"{}\" height=\"{}\" fill=\"#fff\"/>\n", Num(WIDTH), Num(HEIGHT)));

    header(&mut s, report);
    for (top, bottom) in layout.panels {
        w(
            &mut s,
            format_args!(
                "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#fbfbfb\" stroke=\"#ccc\"/>\n",
                Num(X0),
                Num(top),
                Num(X1 - X0),
                Num(bottom - top)
            ),
        );
        for t in time.ticks() {
            let x = time.x(t);
            w(
                &mut s,
                format_args!(
                    "<line class=\"grid\" x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\"/>\n",
                    Num(x),
                    Num(top),
                    Num(bottom)
                ),
            );
        }
    }
    fault_bands(&mut s, &time, span, &faults);
    throughput_panel(&mut s, &time, p1, &secs);
    latency_panel(&mut s, &time, p2, &secs);
    node_panel(&mut s, &time, p3, report);
    markers(&mut s, &time, span, report, &faults);
    time_ticks(&mut s, &time, p3.1);
    draw_legend(&mut s, &legend, layout.legend_y);
    s.push_str("</svg>");
    s
}

/// Appends formatted text; writing into a `String` cannot fail, so the result is not worth a branch.
fn w(s: &mut String, args: fmt::Arguments<'_>) {
    let _ = s.write_fmt(args);
}

/// A coordinate or value as SVG wants it: one decimal at most, and 0 for anything non-finite so that no
/// `NaN`/`inf` ever reaches the document.
struct Num(f64);

impl Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = if self.0.is_finite() { (self.0 * 10.0).round() / 10.0 } else { 0.0 };
        if v == v.trunc() {
            write!(f, "{}", v as i64)
        } else {
            write!(f, "{v:.1}")
        }
    }
}

/// Escapes text for element content and attribute values alike. Control characters other than tab and
/// newline are not allowed in XML 1.0 at all, so they become `?` rather than making the file unreadable.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' => out.push(' '),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// Cuts `text` to `max` characters with an ellipsis, so one long name cannot push everything else off
/// the picture.
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut t: String = text.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// `12345` → `12,345`: totals are read at a glance.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn finite_or(v: f64, fallback: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        fallback
    }
}

fn duration_text(secs: f64) -> String {
    let secs = finite_or(secs, 0.0).max(0.0);
    if secs < 120.0 {
        format!("{secs:.1} s")
    } else {
        let whole = secs.round() as u64;
        format!("{} min {:02} s", whole / 60, whole % 60)
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`: tick spacings people can read.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// The shared time axis: 0 to the end of the run.
struct TimeAxis {
    end: f64,
}

impl TimeAxis {
    /// The end is the run's duration, stretched to cover any data recorded past it, and 1 s when there is
    /// nothing at all (so the scale never divides by zero).
    fn new(report: &Report) -> Self {
        let tl = &report.timeline;
        let candidates = std::iter::once(report.duration_s)
            .chain(std::iter::once(tl.load_end_s))
            .chain(tl.seconds.iter().map(|s| s.t as f64 + 1.0))
            .chain(report.faults.iter().flat_map(|f| std::iter::once(f.at_s).chain(f.healed_s)))
            .chain(tl.nodes.values().flatten().map(|c| c.at_s));
        let end = candidates.filter(|v| v.is_finite()).fold(0.0, f64::max);
        TimeAxis { end: if end > 0.0 { end } else { 1.0 } }
    }

    fn x(&self, t: f64) -> f64 {
        X0 + (finite_or(t, 0.0) / self.end).clamp(0.0, 1.0) * (X1 - X0)
    }

    /// Round-second ticks, at most about a dozen whatever the length (30 s runs get 5 s, 20 min get 2 min).
    fn step(&self) -> f64 {
        const STEPS: [f64; 15] =
            [1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 900.0, 1800.0, 3600.0];
        STEPS.into_iter().find(|s| self.end / s <= 12.0).unwrap_or_else(|| nice_step(self.end / 10.0))
    }

    fn ticks(&self) -> Vec<f64> {
        let step = self.step();
        let n = (self.end / step).floor() as usize;
        (0..=n).map(|i| i as f64 * step).collect()
    }
}

fn header(s: &mut String, report: &Report) {
    let (verdict, colour) = match report.verdict.to_ascii_lowercase().as_str() {
        "pass" => ("PASS".to_string(), PASS),
        "fail" => ("FAIL".to_string(), FAIL),
        "" if report.invariants.is_empty() => ("NO VERDICT".to_string(), "#666"),
        "" if report.passed() => ("PASS".to_string(), PASS),
        "" => ("FAIL".to_string(), FAIL),
        other => (other.to_ascii_uppercase(), "#666"),
    };
    let name = if report.scenario.is_empty() { "(unnamed scenario)" } else { &report.scenario };
    w(
        s,
        format_args!(
            "<text x=\"16\" y=\"24\" style=\"font-size:17px\"><tspan font-weight=\"bold\">{}</tspan>\
             <tspan dx=\"12\" font-weight=\"bold\" style=\"fill:{colour}\">{}</tspan>",
            esc(&clip(name, 40)),
            esc(&clip(&verdict, 12))
        ),
    );
    let mut facts = vec![duration_text(report.duration_s)];
    if !report.cluster.is_empty() {
        facts.push(format!("{} cluster", report.cluster));
    }
    if !report.started_at.is_empty() {
        facts.push(format!("started {}", report.started_at));
    }
    w(
        s,
        format_args!(
            "<tspan dx=\"12\" style=\"font-size:13px;fill:#444\">{}</tspan>",
            esc(&clip(&facts.join(" · "), 70))
        ),
    );
    // The reason for a FAIL belongs next to it: the names of the broken invariants.
    let broken = report.failures();
    if !broken.is_empty() {
        w(
            s,
            format_args!(
                "<tspan dx=\"12\" style=\"font-size:13px;fill:{FAIL}\">broken: {}</tspan>",
                esc(&clip(&broken.join(", "), 60))
            ),
        );
    }
    s.push_str("</text>\n");

    let t = &report.totals;
    let mut line = format!(
        "orders {} · acknowledged {} · errors {}",
        thousands(t.orders),
        thousands(t.acknowledged),
        thousands(t.errors)
    );
    if t.unanswered > 0 {
        line.push_str(&format!(" · unanswered {}", thousands(t.unanswered)));
    }
    if report.detection.is_empty() {
        line.push_str("   |   detection: none measured");
    } else {
        let per_kind: Vec<String> =
            report.detection.iter().map(|(kind, d)| format!("{kind} {}/{}", d.median_ms, d.max_ms)).collect();
        line.push_str(&format!("   |   detection median/max ms: {}", per_kind.join(" · ")));
    }
    w(
        s,
        format_args!("<text x=\"16\" y=\"45\" style=\"font-size:12px;fill:#333\">{}</text>\n", esc(&clip(&line, 175))),
    );
}

/// Colour of a fault kind, shared by its line, its band and the legend.
fn fault_colour(kind: &str) -> &'static str {
    match kind {
        "kill" => "#222222",
        "pause" => "#8c564b",
        "partition" => "#d6339a",
        "restart" => "#138496",
        "panic" => "#b8860b",
        "wipe" => "#5a189a",
        "replace" => "#0b5394",
        _ => "#666666",
    }
}

/// `kill n2`, `pause n1`, `panic payments@n2`.
fn fault_label(f: &FaultRecord) -> String {
    let kind = if f.kind.is_empty() { "fault" } else { f.kind.as_str() };
    let label = match (&f.capability, f.node.is_empty()) {
        (Some(cap), false) => format!("{kind} {cap}@{}", f.node),
        (Some(cap), true) => format!("{kind} {cap}"),
        (None, false) => format!("{kind} {}", f.node),
        (None, true) => kind.to_string(),
    };
    clip(&label, 28)
}

fn fault_bands(s: &mut String, time: &TimeAxis, (top, bottom): (f64, f64), faults: &[(usize, &FaultRecord)]) {
    // Overlapping bands add up; with a hundred faults a fainter tint keeps the data readable underneath.
    let opacity = if faults.len() > 30 { 0.05 } else { 0.12 };
    for (_, f) in faults {
        let Some(healed) = f.healed_s.filter(|h| h.is_finite() && *h > f.at_s) else { continue };
        let (xa, xb) = (time.x(f.at_s), time.x(healed));
        w(
            s,
            format_args!(
                "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\" fill-opacity=\"{opacity}\"/>\n",
                Num(xa),
                Num(top),
                Num((xb - xa).max(0.5)),
                Num(bottom - top),
                fault_colour(&f.kind)
            ),
        );
    }
}

/// A linear count axis from 0: the top is a whole number of nice steps above the largest value.
fn count_axis(max: f64) -> (f64, f64) {
    let step = nice_step(max / 4.0).max(1.0);
    let top = ((max / step).ceil() * step).max(step);
    (step, top)
}

fn y_label(s: &mut String, y: f64, text: &str) {
    w(
        s,
        format_args!(
            "<text class=\"small muted\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
            Num(X0 - 5.0),
            Num(y + 3.5),
            esc(text)
        ),
    );
}

fn panel_title(s: &mut String, (top, bottom): (f64, f64), text: &str) {
    let y = (top + bottom) / 2.0;
    w(
        s,
        format_args!(
            "<text x=\"18\" y=\"{0}\" transform=\"rotate(-90 18 {0})\" text-anchor=\"middle\" font-weight=\"bold\">{1}</text>\n",
            Num(y),
            esc(text)
        ),
    );
}

fn no_data(s: &mut String, (top, bottom): (f64, f64), text: &str) {
    w(
        s,
        format_args!(
            "<text class=\"muted\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            Num((X0 + X1) / 2.0),
            Num((top + bottom) / 2.0),
            esc(text)
        ),
    );
}

fn throughput_panel(s: &mut String, time: &TimeAxis, panel: (f64, f64), secs: &[&Second]) {
    let (top, bottom) = panel;
    panel_title(s, panel, "orders / s");
    let max = secs.iter().map(|x| x.acknowledged.max(x.errors) as f64).fold(0.0, f64::max);
    let (step, ymax) = count_axis(max);
    let y = |v: f64| bottom - (v / ymax).clamp(0.0, 1.0) * (bottom - top);
    let mut v = 0.0;
    while v <= ymax + step / 2.0 {
        if v > 0.0 {
            w(
                s,
                format_args!(
                    "<line class=\"grid\" x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\"/>\n",
                    Num(X0),
                    Num(y(v)),
                    Num(X1)
                ),
            );
        }
        y_label(s, y(v), &format!("{v}"));
        v += step;
    }
    if secs.is_empty() {
        no_data(s, panel, "no load recorded");
        return;
    }
    // Errors first, as bars, so the acknowledged line stays on top of them.
    let bar = ((time.x(1.0) - time.x(0.0)) * 0.8).max(1.0);
    for sec in secs.iter().filter(|x| x.errors > 0) {
        let t = sec.t as f64;
        let (xa, ya) = (time.x(t + 0.5) - bar / 2.0, y(sec.errors as f64));
        w(
            s,
            format_args!(
                "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{ERR}\" fill-opacity=\"0.85\"><title>{} s: {} errors</title></rect>\n",
                Num(xa),
                Num(ya),
                Num(bar),
                Num(bottom - ya),
                sec.t,
                sec.errors
            ),
        );
    }
    let points: Vec<String> =
        secs.iter().map(|x| format!("{},{}", Num(time.x(x.t as f64 + 0.5)), Num(y(x.acknowledged as f64)))).collect();
    let first = time.x(secs[0].t as f64 + 0.5);
    let last = time.x(secs[secs.len() - 1].t as f64 + 0.5);
    w(
        s,
        format_args!(
            "<polygon points=\"{},{} {} {},{}\" fill=\"{ACK}\" fill-opacity=\"0.12\"/>\n",
            Num(first),
            Num(bottom),
            points.join(" "),
            Num(last),
            Num(bottom)
        ),
    );
    w(
        s,
        format_args!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{ACK}\" stroke-width=\"1.6\"/>\n",
            points.join(" ")
        ),
    );
}

/// Log axis over whole decades covering the positive values; `None` when there are none.
fn latency_decades(secs: &[&Second]) -> Option<(i32, i32)> {
    let values = secs.iter().map(|x| x.p99_ms).filter(|v| v.is_finite() && *v > 0.0);
    let (min, max) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if max <= 0.0 {
        return None;
    }
    // Below 0.1 ms is noise for an HTTP client; above 10^7 ms (about 3 h) cannot happen in a run.
    let lo = (min.log10().floor() as i32).clamp(-1, 6);
    let hi = (max.log10().ceil() as i32).clamp(lo + 1, 7);
    Some((lo, hi))
}

fn ms_text(v: f64) -> String {
    if v >= 1.0 {
        format!("{} ms", thousands(v.round() as u64))
    } else {
        format!("{v} ms")
    }
}

fn latency_panel(s: &mut String, time: &TimeAxis, panel: (f64, f64), secs: &[&Second]) {
    let (top, bottom) = panel;
    panel_title(s, panel, "p99 latency");
    let Some((lo, hi)) = latency_decades(secs) else {
        no_data(s, panel, "no latency recorded");
        return;
    };
    let span = f64::from(hi - lo);
    let y = |v: f64| bottom - ((v.log10() - f64::from(lo)) / span).clamp(0.0, 1.0) * (bottom - top);
    for e in lo..=hi {
        let decade = 10f64.powi(e);
        // With only a decade or two the 2 and 5 marks are needed for the axis to say anything.
        let marks: &[f64] = if hi - lo <= 2 && e < hi { &[1.0, 2.0, 5.0] } else { &[1.0] };
        for m in marks {
            let v = decade * m;
            if e > lo || *m > 1.0 {
                w(
                    s,
                    format_args!(
                        "<line class=\"grid\" x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\"/>\n",
                        Num(X0),
                        Num(y(v)),
                        Num(X1)
                    ),
                );
            }
            y_label(s, y(v), &ms_text(v));
        }
    }
    // Seconds with nothing acknowledged have no latency: they break the line instead of dropping it to 0.
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    let mut prev: Option<u64> = None;
    for sec in secs {
        let ok = sec.p99_ms.is_finite() && sec.p99_ms > 0.0;
        let contiguous = prev.is_some_and(|p| sec.t <= p + 1);
        if !ok || !contiguous {
            runs.push(Vec::new());
        }
        if ok {
            if let Some(run) = runs.last_mut() {
                run.push((time.x(sec.t as f64 + 0.5), y(sec.p99_ms)));
            }
            prev = Some(sec.t);
        } else {
            prev = None;
        }
    }
    for run in runs.iter().filter(|r| !r.is_empty()) {
        if run.len() == 1 {
            w(
                s,
                format_args!("<circle cx=\"{}\" cy=\"{}\" r=\"1.8\" fill=\"{P99}\"/>\n", Num(run[0].0), Num(run[0].1)),
            );
        } else {
            let pts: Vec<String> = run.iter().map(|(x, y)| format!("{},{}", Num(*x), Num(*y))).collect();
            w(
                s,
                format_args!(
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{P99}\" stroke-width=\"1.5\"/>\n",
                    pts.join(" ")
                ),
            );
        }
    }
}

fn status_colour(status: &str) -> &'static str {
    match status {
        "up" => "#2ca02c",
        "suspect" => "#f0a500",
        "down" => "#d62728",
        _ => "#a8a8a8",
    }
}

fn node_panel(s: &mut String, time: &TimeAxis, panel: (f64, f64), report: &Report) {
    let (top, bottom) = panel;
    panel_title(s, panel, "nodes");
    let nodes = &report.timeline.nodes;
    if nodes.is_empty() {
        no_data(s, panel, "no node status recorded");
        return;
    }
    let lane = ((bottom - top) / nodes.len() as f64).min(MAX_LANE);
    let bar = lane * 0.7;
    let font = (lane * 0.75).clamp(6.0, 11.0);
    for (i, (name, changes)) in nodes.iter().enumerate() {
        let mid = top + lane * (i as f64 + 0.5);
        let y = mid - bar / 2.0;
        w(
            s,
            format_args!(
                "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#eee\"/>\n",
                Num(X0),
                Num(y),
                Num(X1 - X0),
                Num(bar)
            ),
        );
        w(
            s,
            format_args!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" style=\"font-size:{}px\">{}</text>\n",
                Num(X0 - 6.0),
                Num(mid + font * 0.35),
                Num(font),
                esc(&clip(name, 10))
            ),
        );
        // Each status holds until the next change; the last one until the end of the run.
        for (j, c) in changes.iter().enumerate() {
            let from = finite_or(c.at_s, 0.0).max(0.0);
            let to = changes.get(j + 1).map_or(time.end, |n| finite_or(n.at_s, time.end)).min(time.end);
            if to <= from {
                continue;
            }
            let (xa, xb) = (time.x(from), time.x(to));
            // A short suspect or down spell must stay visible on a 20-minute axis: at least 1 px.
            let width = if c.status == "up" { xb - xa } else { (xb - xa).max(1.0) };
            w(
                s,
                format_args!(
                    "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\"><title>{}: {} {:.1}–{:.1} s</title></rect>\n",
                    Num(xa),
                    Num(y),
                    Num(width),
                    Num(bar),
                    status_colour(&c.status),
                    esc(name),
                    esc(&c.status),
                    from,
                    to
                ),
            );
        }
    }
}

/// A label placed in the strip above the panels, with the line that hangs from it.
#[derive(Debug, Clone, Copy)]
struct Placed {
    row: usize,
    x: f64,
    left: f64,
    right: f64,
    anchor_end: bool,
}

/// Greedy placement of marker labels into the two label rows: a label goes in the first row where it
/// overlaps no other label, where no taller marker line runs through it, and where its own line (which
/// hangs from its row through the rows below) crosses no label. A label that fits nowhere is not drawn.
#[derive(Default)]
struct LabelStrip {
    placed: Vec<Placed>,
}

impl LabelStrip {
    fn place(&mut self, x: f64, width: f64) -> Option<Placed> {
        // To the right of the line, unless that runs past the plot.
        let (left, right, anchor_end) = if x + 3.0 + width <= X1 + 10.0 {
            (x + 3.0, x + 3.0 + width, false)
        } else {
            (x - 3.0 - width, x - 3.0, true)
        };
        if left < 2.0 {
            return None;
        }
        for row in 0..LABEL_ROWS.len() {
            let clash = self.placed.iter().any(|p| {
                let text_overlap = p.row == row && left < p.right + 4.0 && p.left < right + 4.0;
                let their_line_in_me = p.row >= row && p.x > left - 2.0 && p.x < right + 2.0;
                let my_line_in_them = p.row <= row && x > p.left - 2.0 && x < p.right + 2.0;
                text_overlap || their_line_in_me || my_line_in_them
            });
            if !clash {
                let p = Placed { row, x, left, right, anchor_end };
                self.placed.push(p);
                return Some(p);
            }
        }
        None
    }
}

fn label_text(s: &mut String, p: &Placed, text: &str, colour: &str) {
    let (x, anchor) = if p.anchor_end { (p.right, "end") } else { (p.left, "start") };
    w(
        s,
        format_args!(
            "<text class=\"small\" x=\"{}\" y=\"{}\" text-anchor=\"{anchor}\" style=\"fill:{colour}\">{}</text>\n",
            Num(x),
            Num(LABEL_ROWS[p.row]),
            esc(text)
        ),
    );
}

fn markers(
    s: &mut String,
    time: &TimeAxis,
    (top, bottom): (f64, f64),
    report: &Report,
    faults: &[(usize, &FaultRecord)],
) {
    let mut strip = LabelStrip::default();
    let load_end = report.timeline.load_end_s;
    // The load-end line is placed first: there is only one and it says when the check began.
    if load_end.is_finite() && load_end > 0.0 {
        let x = time.x(load_end);
        let text = "load stops / check";
        let line_top = match strip.place(x, text.len() as f64 * CHAR_W) {
            Some(p) => {
                label_text(s, &p, text, "#333");
                LABEL_ROWS[p.row] - 9.0
            }
            None => top,
        };
        w(
            s,
            format_args!(
                "<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"#333\" stroke-width=\"1.3\" stroke-dasharray=\"6 4\"><title>load stops at {3:.1} s; the check runs after it</title></line>\n",
                Num(x),
                Num(line_top),
                Num(bottom),
                load_end
            ),
        );
    }
    let many = faults.len() > 30;
    for (index, f) in faults {
        let x = time.x(f.at_s);
        let colour = fault_colour(&f.kind);
        let label = fault_label(f);
        let number = format!("{}", index + 1);
        // The full label when there is room, else the fault's number, else only the line.
        let placed = match strip.place(x, label.chars().count() as f64 * CHAR_W) {
            Some(p) => Some((p, label.clone())),
            None => strip.place(x, number.len() as f64 * CHAR_W).map(|p| (p, number.clone())),
        };
        let line_top = match &placed {
            Some((p, text)) => {
                label_text(s, p, text, colour);
                LABEL_ROWS[p.row] - 9.0
            }
            None => top,
        };
        let mut tip = format!("#{number} {label} at {:.1} s", f.at_s);
        if let Some(h) = f.healed_s.filter(|h| h.is_finite()) {
            tip.push_str(&format!(", healed at {h:.1} s"));
        }
        for (what, ms) in [("detected", f.detected_ms), ("down", f.down_ms), ("recovered", f.recovered_ms)] {
            if let Some(ms) = ms {
                tip.push_str(&format!(", {what} after {ms} ms"));
            }
        }
        w(
            s,
            format_args!(
                "<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"{colour}\" stroke-width=\"{3}\" stroke-opacity=\"{4}\"><title>{5}</title></line>\n",
                Num(x),
                Num(line_top),
                Num(bottom),
                if many { "0.8" } else { "1.2" },
                if many { "0.55" } else { "0.9" },
                esc(&tip)
            ),
        );
    }
}

fn time_ticks(s: &mut String, time: &TimeAxis, y: f64) {
    w(
        s,
        format_args!("<line class=\"axis\" x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\"/>\n", Num(X0), Num(y), Num(X1)),
    );
    for t in time.ticks() {
        let x = time.x(t);
        w(
            s,
            format_args!(
                "<line class=\"axis\" x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\"/>\n",
                Num(x),
                Num(y),
                Num(y + 4.0)
            ),
        );
        w(
            s,
            format_args!(
                "<text class=\"small\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{} s</text>\n",
                Num(x),
                Num(y + 15.0),
                Num(t)
            ),
        );
    }
    w(
        s,
        format_args!(
            "<text class=\"small muted\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">seconds since start</text>\n",
            Num((X0 + X1) / 2.0),
            Num(y + 29.0)
        ),
    );
}

enum Swatch {
    Line(&'static str, bool),
    Box(&'static str),
}

/// What the legend explains: the series, the statuses, the fault kinds present, the bands, the load end.
fn legend_items(report: &Report) -> Vec<(Swatch, String)> {
    let mut items: Vec<(Swatch, String)> = vec![
        (Swatch::Line(ACK, false), "acknowledged / s".into()),
        (Swatch::Box(ERR), "errors / s".into()),
        (Swatch::Line(P99, false), "p99 latency".into()),
    ];
    for status in ["up", "suspect", "down", "unknown"] {
        items.push((Swatch::Box(status_colour(status)), status.into()));
    }
    let kinds: BTreeSet<&str> = report.faults.iter().map(|f| f.kind.as_str()).collect();
    for kind in kinds {
        let name = if kind.is_empty() { "fault" } else { kind };
        items.push((Swatch::Line(fault_colour(kind), false), clip(name, 12)));
    }
    if report.faults.iter().any(|f| f.healed_s.is_some()) {
        items.push((Swatch::Box("#cccccc"), "fault until healed".into()));
    }
    items.push((Swatch::Line("#333", true), "load stops / check".into()));
    items
}

/// Where each legend item goes, `(x, row)`: left to right, wrapping onto a new row at the plot's edge.
fn legend_positions(items: &[(Swatch, String)]) -> Vec<(f64, usize)> {
    let mut x = X0;
    let mut row = 0;
    items
        .iter()
        .map(|(_, text)| {
            let width = 20.0 + text.chars().count() as f64 * CHAR_W;
            if x > X0 && x + width > X1 {
                x = X0;
                row += 1;
            }
            let at = (x, row);
            x += width + 14.0;
            at
        })
        .collect()
}

fn legend_rows(items: &[(Swatch, String)]) -> usize {
    legend_positions(items).last().map_or(1, |(_, row)| row + 1)
}

fn draw_legend(s: &mut String, items: &[(Swatch, String)], top_row_y: f64) {
    for ((swatch, text), (x, row)) in items.iter().zip(legend_positions(items)) {
        let y = top_row_y + row as f64 * LEGEND_ROW;
        match swatch {
            Swatch::Line(colour, dashed) => w(
                s,
                format_args!(
                    "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{colour}\" stroke-width=\"2\"{3}/>\n",
                    Num(x),
                    Num(y - 3.5),
                    Num(x + 16.0),
                    if *dashed { " stroke-dasharray=\"4 3\"" } else { "" }
                ),
            ),
            Swatch::Box(colour) => w(
                s,
                format_args!(
                    "<rect x=\"{}\" y=\"{}\" width=\"16\" height=\"9\" fill=\"{colour}\"/>\n",
                    Num(x),
                    Num(y - 8.0)
                ),
            ),
        }
        w(s, format_args!("<text class=\"small\" x=\"{}\" y=\"{}\">{}</text>\n", Num(x + 20.0), Num(y), esc(text)));
    }
}

/// Vertical layout: the node panel is as tall as its lanes need (within bounds), the legend takes the rows
/// it wraps onto, and the throughput and latency panels share what is left.
struct Layout {
    panels: [(f64, f64); 3],
    legend_y: f64,
}

impl Layout {
    fn new(nodes: usize, legend_rows: usize) -> Self {
        let legend_y = HEIGHT - 8.0 - LEGEND_ROW * legend_rows.saturating_sub(1).min(3) as f64;
        let bottom = legend_y - BELOW_PLOT;
        let lanes = (nodes as f64 * LANE).clamp(40.0, 200.0);
        let p3 = (bottom - lanes, bottom);
        let shared = p3.0 - GAP - GAP - PLOT_TOP;
        let p1 = (PLOT_TOP, PLOT_TOP + shared * 0.55);
        let p2 = (p1.1 + GAP, p3.0 - GAP);
        Layout { panels: [p1, p2, p3], legend_y }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::report::{Detection, Invariant, StatusChange, Timeline, Totals};

    fn change(at_s: f64, status: &str) -> StatusChange {
        StatusChange { at_s, status: status.into() }
    }

    fn fault(kind: &str, node: &str, at_s: f64, healed_s: Option<f64>) -> FaultRecord {
        FaultRecord {
            kind: kind.into(),
            node: node.into(),
            at_s,
            healed_s,
            detected_ms: Some(700),
            down_ms: Some(2100),
            recovered_ms: healed_s.map(|_| 900),
            first_201_ms: Some(950),
            ..Default::default()
        }
    }

    /// About a minute of load with n2 killed at 20 s (down until its restart at 30 s) and a payments
    /// panic on n3 at 40 s; the check runs from 50 s to 58 s.
    fn sample() -> Report {
        let seconds = (0..50u64)
            .map(|t| {
                let hit = (20..24).contains(&t);
                Second {
                    t,
                    acknowledged: if hit { 40 + t } else { 120 + t % 7 },
                    errors: if hit { 25 } else { u64::from(t == 41) * 3 },
                    p99_ms: if hit { 1800.0 + t as f64 } else { 9.0 + (t % 5) as f64 },
                }
            })
            .collect();
        let mut nodes = BTreeMap::new();
        nodes.insert("n1".to_string(), vec![change(0.0, "up")]);
        nodes.insert(
            "n2".to_string(),
            vec![change(0.0, "up"), change(20.7, "suspect"), change(22.1, "down"), change(31.4, "up")],
        );
        nodes.insert("n3".to_string(), vec![change(0.0, "unknown"), change(0.8, "up")]);
        let mut detection = BTreeMap::new();
        detection.insert("kill".to_string(), Detection { count: 1, min_ms: 700, median_ms: 700, max_ms: 700 });
        let mut panic = fault("panic", "n3", 40.0, None);
        panic.capability = Some("payments".into());
        Report {
            scenario: "kill-one".into(),
            description: "kill a node under load, restart it".into(),
            cluster: "local".into(),
            started_at: "2024-05-01T10:00:00Z".into(),
            duration_s: 58.0,
            verdict: "pass".into(),
            invariants: vec![Invariant {
                name: "no lost orders".into(),
                held: true,
                judged: true,
                ..Default::default()
            }],
            main_checks: vec!["no lost orders".into()],
            faults: vec![fault("kill", "n2", 20.0, Some(30.0)), panic],
            detection,
            phases: Vec::new(),
            totals: Totals { orders: 5800, acknowledged: 5790, errors: 103, ..Default::default() },
            timeline: Timeline { seconds, nodes, load_end_s: 50.0 },
        }
    }

    /// Twenty minutes with 150 faults of every kind, some of them close together.
    fn random_like() -> Report {
        let kinds = ["kill", "pause", "partition", "restart", "panic"];
        let faults = (0..150)
            .map(|i| {
                let at = 5.0 + (i as f64 * 7.9) % 1150.0;
                let mut f = fault(kinds[i % 5], &format!("n{}", i % 3 + 1), at, (i % 2 == 0).then_some(at + 6.0));
                if i % 5 == 4 {
                    f.capability = Some("inventory".into());
                }
                f
            })
            .collect();
        let seconds =
            (0..1180u64).map(|t| Second { t, acknowledged: 90 + t % 13, errors: t % 17 / 8, p99_ms: 12.0 }).collect();
        let mut nodes = BTreeMap::new();
        for n in 1..=3 {
            let changes =
                (0..40).map(|k| change(k as f64 * 30.0 + n as f64, ["up", "suspect", "down"][k % 3])).collect();
            nodes.insert(format!("n{n}"), changes);
        }
        Report {
            scenario: "random".into(),
            verdict: "fail".into(),
            invariants: vec![Invariant { name: "stock conserved".into(), held: false, ..Default::default() }],
            duration_s: 1200.0,
            faults,
            timeline: Timeline { seconds, nodes, load_end_s: 1180.0 },
            ..Default::default()
        }
    }

    /// Tags open and close in order (self-closing ones aside) and no `&` starts anything but an entity.
    fn assert_well_formed(doc: &str) {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = doc;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("unclosed tag") + start;
            let tag = &rest[start + 1..end];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "mismatched </{name}>");
            } else if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().expect("empty tag");
                stack.push(name.to_string());
            }
            assert!(!tag.contains('<'), "stray < in {tag}");
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        for (i, _) in doc.match_indices('&') {
            let entity = &doc[i..doc[i..].find(';').map_or(doc.len(), |e| i + e + 1)];
            assert!(["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&entity), "bad entity at {i}");
        }
    }

    fn assert_valid(doc: &str) {
        assert!(doc.starts_with("<svg"), "{}", &doc[..doc.len().min(80)]);
        assert!(doc.ends_with("</svg>"));
        assert!(!doc.contains("NaN"), "NaN in document");
        assert!(!doc.contains("inf"), "inf in document");
        assert_well_formed(doc);
    }

    #[test]
    fn realistic_report_renders_nodes_faults_and_markers() {
        let doc = render(&sample());
        assert_valid(&doc);
        for text in ["n1", "n2", "n3", "kill n2", "panic payments@n3", "load stops / check", "PASS", "kill-one"] {
            assert!(doc.contains(&format!(">{text}<")), "missing {text}");
        }
        assert!(doc.contains(PASS), "PASS is drawn in green");
        assert!(doc.contains("kill 700/700"), "detection figures in the header");
        assert!(doc.contains(status_colour("down")), "n2's down spell is drawn");
    }

    #[test]
    fn empty_report_renders_valid_svg() {
        let doc = render(&Report::default());
        assert_valid(&doc);
        assert!(doc.contains("no load recorded"));
        assert!(doc.contains("no node status recorded"));
    }

    #[test]
    fn degenerate_numbers_do_not_leak_into_coordinates() {
        let mut r = sample();
        r.duration_s = f64::NAN;
        r.timeline.load_end_s = f64::INFINITY;
        r.timeline.seconds[3].p99_ms = f64::NAN;
        r.timeline.seconds[4].p99_ms = f64::INFINITY;
        r.faults.push(fault("pause", "n1", f64::NAN, Some(f64::NAN)));
        r.faults.push(fault("pause", "n1", 10.0, Some(f64::NEG_INFINITY)));
        r.timeline.nodes.insert("n4".into(), vec![change(f64::NAN, "down"), change(5.0, "up"), change(2.0, "down")]);
        assert_valid(&render(&r));

        let zero = Report {
            timeline: Timeline { nodes: [("n1".to_string(), vec![change(0.0, "up")])].into(), ..Default::default() },
            faults: vec![fault("kill", "n1", 0.0, Some(0.0))],
            ..Default::default()
        };
        assert_valid(&render(&zero));
    }

    #[test]
    fn text_from_the_report_is_escaped() {
        let mut r = sample();
        r.scenario = "a<&>\"b".into();
        r.faults[0].node = "<n&2>".into();
        r.timeline.nodes.insert("x<y".into(), vec![change(0.0, "up\u{1}")]);
        let doc = render(&r);
        assert_valid(&doc);
        assert!(doc.contains("a&lt;&amp;&gt;&quot;b"));
        assert!(doc.contains("kill &lt;n&amp;2&gt;"));
        assert!(doc.contains(">x&lt;y<"));
        assert!(!doc.contains("<&>"));
    }

    #[test]
    fn many_faults_render_with_lines_and_without_overlapping_labels() {
        let r = random_like();
        let doc = render(&r);
        assert_valid(&doc);
        // Every fault keeps its line (each carries a tooltip starting with its number).
        for i in 1..=150 {
            assert!(doc.contains(&format!("<title>#{i} ")), "fault {i} has no line");
        }
        assert!(doc.contains("FAIL") && doc.contains("stock conserved"));

        let time = TimeAxis::new(&r);
        let mut strip = LabelStrip::default();
        let placed: Vec<Placed> =
            r.faults.iter().filter_map(|f| strip.place(time.x(f.at_s), fault_label(f).len() as f64 * CHAR_W)).collect();
        assert!(!placed.is_empty() && placed.len() < 150, "some labels placed, not all: {}", placed.len());
        for (i, a) in placed.iter().enumerate() {
            for b in &placed[i + 1..] {
                assert!(a.row != b.row || a.right < b.left || b.right < a.left, "{a:?} overlaps {b:?}");
            }
        }
    }

    #[test]
    fn time_ticks_suit_short_and_long_runs() {
        let axis = |end: f64| TimeAxis { end };
        assert_eq!(axis(30.0).step(), 5.0);
        assert_eq!(axis(60.0).step(), 5.0);
        assert_eq!(axis(1200.0).step(), 120.0);
        assert_eq!(axis(0.5).ticks(), vec![0.0]);
        assert!(axis(1e9).ticks().len() <= 13);
    }

    /// Writes sample plots to /tmp for looking at: `cargo test -p bulkhead-chaos --lib svg -- --ignored`.
    #[test]
    #[ignore]
    fn write_samples() {
        std::fs::write("/tmp/sample-timeline.svg", render(&sample())).unwrap();
        std::fs::write("/tmp/sample-timeline-random.svg", render(&random_like())).unwrap();
        std::fs::write("/tmp/sample-timeline-empty.svg", render(&Report::default())).unwrap();
    }
}
