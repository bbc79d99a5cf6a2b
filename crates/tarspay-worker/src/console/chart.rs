//! The overview's charts, drawn on the server as SVG (no script): payouts finished per
//! minute by status (stacked bars) and the gateway's create latency p50/p95 per minute
//! (lines). Each has a `<title>`, an `aria-label` and a data table beside it.

use crate::ledger::minutes::MinuteStats;
use maud::{Markup, html};

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 24.0;

fn plot_width() -> f64 {
    WIDTH - LEFT - RIGHT
}

fn plot_height() -> f64 {
    HEIGHT - TOP - BOTTOM
}

/// The statuses in the order they stack (bottom first); any other status after them.
const STATUS_ORDER: [&str; 7] = [
    "succeeded",
    "failed",
    "rejected",
    "refunded",
    "conflict",
    "expired",
    "partial",
];

/// `HH:MM` (UTC) of a minute's start.
pub fn clock(ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    let text = humantime::format_rfc3339_seconds(time).to_string();
    text.get(11..16).unwrap_or(&text).to_owned()
}

/// A round axis maximum at or above `max` (1, 2, 5 × 10ⁿ).
pub fn nice_ceiling(max: u64) -> u64 {
    if max == 0 {
        return 1;
    }
    let mut step = 1u64;
    loop {
        for factor in [1, 2, 5] {
            if step * factor >= max {
                return step * factor;
            }
        }
        step *= 10;
    }
}

/// Every status with finals in `minutes`, in stacking order.
pub fn statuses(minutes: &[MinuteStats]) -> Vec<String> {
    let mut seen: Vec<String> = minutes
        .iter()
        .flat_map(|m| {
            m.finals
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(s, _)| s.clone())
        })
        .collect();
    seen.sort_by_key(|s| {
        (
            STATUS_ORDER
                .iter()
                .position(|o| o == s)
                .unwrap_or(STATUS_ORDER.len()),
            s.clone(),
        )
    });
    seen.dedup();
    seen
}

/// The CSS class of a status's colour.
fn status_class(status: &str) -> String {
    if STATUS_ORDER.contains(&status) {
        format!("s-{status}")
    } else {
        "s-other".to_owned()
    }
}

fn y_axis(max: u64, unit: &str) -> Markup {
    // `max` is 1, 2 or 5 × 10ⁿ: this many steps keep every tick a whole number.
    let steps = max.clamp(1, 5);
    html! {
        @for step in 0..=steps {
            @let value = max * step / steps;
            @let y = TOP + plot_height() - plot_height() * step as f64 / steps as f64;
            line.grid x1=(LEFT) x2=(WIDTH - RIGHT) y1=(fmt(y)) y2=(fmt(y)) {}
            text.axis x=(LEFT - 4.0) y=(fmt(y + 4.0)) text-anchor="end" { (value) (unit) }
        }
    }
}

fn x_labels(minutes: &[MinuteStats]) -> Markup {
    let n = minutes.len().max(1);
    let slot = plot_width() / n as f64;
    html! {
        @for (i, minute) in minutes.iter().enumerate() {
            @if i + 1 == minutes.len() {
                text.axis x=(fmt(WIDTH - RIGHT)) y=(fmt(HEIGHT - 6.0)) text-anchor="end" { (clock(minute.minute_ms)) }
            } @else if i % 10 == 0 && i + 5 < minutes.len() {
                text.axis x=(fmt(LEFT + slot * (i as f64 + 0.5))) y=(fmt(HEIGHT - 6.0)) text-anchor="middle" { (clock(minute.minute_ms)) }
            }
        }
    }
}

fn fmt(v: f64) -> String {
    format!("{v:.1}")
}

/// A minute's segments, bottom first: (status, count, the count stacked below it).
fn stack<'a>(minute: &MinuteStats, order: &'a [String]) -> Vec<(&'a str, u64, u64)> {
    let mut below = 0;
    let mut segments = Vec::new();
    for status in order {
        let count = minute.finals.get(status).copied().unwrap_or(0);
        if count > 0 {
            segments.push((status.as_str(), count, below));
            below += count;
        }
    }
    segments
}

/// Stacked bars: one per minute, a segment per final status.
pub fn outcomes(minutes: &[MinuteStats]) -> Markup {
    let total: u64 = minutes.iter().map(MinuteStats::finals_total).sum();
    let max = nice_ceiling(
        minutes
            .iter()
            .map(MinuteStats::finals_total)
            .max()
            .unwrap_or(0),
    );
    let n = minutes.len().max(1);
    let slot = plot_width() / n as f64;
    let bar = (slot * 0.8).max(1.0);
    let label = format!(
        "Payouts finished per minute by status, last {} minutes: {total} in all",
        minutes.len()
    );
    let order = statuses(minutes);
    html! {
        svg #chart-outcomes.chart role="img" viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) aria-label=(label) {
            title { (label) }
            (y_axis(max, ""))
            @if total == 0 {
                text.empty x=(fmt(LEFT + plot_width() / 2.0)) y=(fmt(TOP + plot_height() / 2.0)) text-anchor="middle" { "No payouts finished in this period" }
            }
            @for (i, minute) in minutes.iter().enumerate() {
                @let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
                @for (status, count, below) in stack(minute, &order) {
                    @let y0 = TOP + plot_height() - plot_height() * (below + count) as f64 / max as f64;
                    @let h = plot_height() * count as f64 / max as f64;
                    rect class=(status_class(status)) x=(fmt(x)) y=(fmt(y0)) width=(fmt(bar)) height=(fmt(h)) data-status=(status) data-count=(count) {
                        title { (clock(minute.minute_ms)) " " (status) ": " (count) }
                    }
                }
            }
            (x_labels(minutes))
        }
        ul.legend aria-label="Legend" {
            @for status in &order {
                li { svg.swatch viewBox="0 0 10 10" aria-hidden="true" { rect class=(status_class(status)) width="10" height="10" {} } " " (status) }
            }
        }
    }
}

/// Where each minute's quantile is drawn; `None` for minutes without creates.
fn quantile_points(minutes: &[MinuteStats], q: f64, max: u64) -> Vec<Option<(f64, f64)>> {
    let n = minutes.len().max(1);
    let slot = plot_width() / n as f64;
    minutes
        .iter()
        .enumerate()
        .map(|(i, minute)| {
            minute.latency_quantile_ms(q).map(|ms| {
                let x = LEFT + slot * (i as f64 + 0.5);
                let y = TOP + plot_height() - plot_height() * ms.min(max) as f64 / max as f64;
                (x, y)
            })
        })
        .collect()
}

/// One polyline per quantile; minutes without creates leave a gap.
fn quantile_path(points: &[Option<(f64, f64)>]) -> String {
    let mut path = String::new();
    let mut pen_down = false;
    for point in points {
        match point {
            Some((x, y)) => {
                path.push_str(&format!(
                    "{}{:.1} {:.1} ",
                    if pen_down { "L" } else { "M" },
                    x,
                    y
                ));
                pen_down = true;
            }
            None => pen_down = false,
        }
    }
    path.trim_end().to_owned()
}

/// p50 and p95 of the creates' gateway latency per minute (the histogram's bucket bounds).
pub fn latency(minutes: &[MinuteStats]) -> Markup {
    let creates: u64 = minutes.iter().map(|m| m.creates).sum();
    let top = minutes
        .iter()
        .filter_map(|m| m.latency_quantile_ms(0.95).or(m.latency_quantile_ms(0.5)))
        .max()
        .unwrap_or(0);
    let max = nice_ceiling(top);
    let label = format!(
        "Gateway create latency per minute, p50 and p95 in milliseconds, last {} minutes: {creates} creates",
        minutes.len()
    );
    let p50_points = quantile_points(minutes, 0.5, max);
    let p95_points = quantile_points(minutes, 0.95, max);
    let p50 = quantile_path(&p50_points);
    let p95 = quantile_path(&p95_points);
    html! {
        svg #chart-latency.chart role="img" viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) aria-label=(label) {
            title { (label) }
            (y_axis(max, " ms"))
            @if creates == 0 {
                text.empty x=(fmt(LEFT + plot_width() / 2.0)) y=(fmt(TOP + plot_height() / 2.0)) text-anchor="middle" { "No creates sent in this period" }
            }
            @if !p50.is_empty() { path.p50 d=(p50) { title { "p50" } } }
            @if !p95.is_empty() { path.p95 d=(p95) { title { "p95" } } }
            // A dot per minute: a lone minute has no line to show.
            @for (x, y) in p50_points.iter().flatten() { circle.dot-p50 cx=(fmt(*x)) cy=(fmt(*y)) r="3" {} }
            @for (x, y) in p95_points.iter().flatten() { circle.dot-p95 cx=(fmt(*x)) cy=(fmt(*y)) r="3" {} }
            (x_labels(minutes))
        }
        ul.legend aria-label="Legend" {
            li { svg.swatch viewBox="0 0 10 10" aria-hidden="true" { rect.l-p50 width="10" height="10" {} } " p50" }
            li { svg.swatch viewBox="0 0 10 10" aria-hidden="true" { rect.l-p95 width="10" height="10" {} } " p95 (dashed)" }
        }
    }
}

/// The charts' numbers as a table (minutes with any activity).
pub fn table(minutes: &[MinuteStats]) -> Markup {
    let order = statuses(minutes);
    let active: Vec<&MinuteStats> = minutes
        .iter()
        .filter(|m| m.finals_total() > 0 || m.creates > 0)
        .collect();
    let ms = |v: Option<u64>| v.map_or_else(|| "—".to_owned(), |v| v.to_string());
    html! {
        details.chart-data {
            summary { "Chart data as a table" }
            @if active.is_empty() {
                p { "No activity in this period." }
            } @else {
                div.table-wrap {
                    table #chart-table {
                        caption { "Per minute (UTC): finals by status, creates, create latency" }
                        thead { tr {
                            th scope="col" { "Minute" }
                            @for status in &order { th scope="col" { (status) } }
                            th scope="col" { "Creates" }
                            th scope="col" { "Create errors" }
                            th scope="col" { "p50 ms" }
                            th scope="col" { "p95 ms" }
                        } }
                        tbody {
                            @for m in &active {
                                tr {
                                    th scope="row" { (clock(m.minute_ms)) }
                                    @for status in &order { td { (m.finals.get(status).copied().unwrap_or(0)) } }
                                    td { (m.creates) }
                                    td { (m.create_errors) }
                                    td { (ms(m.latency_quantile_ms(0.5))) }
                                    td { (ms(m.latency_quantile_ms(0.95))) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minute(at: u64, finals: &[(&str, u64)]) -> MinuteStats {
        MinuteStats {
            minute_ms: at * 60_000,
            finals: finals.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect(),
            ..Default::default()
        }
    }

    fn heights(svg: &str) -> Vec<f64> {
        svg.split("<rect ")
            .skip(1)
            .filter(|r| r.contains("data-status"))
            .filter_map(|r| r.split("height=\"").nth(1))
            .filter_map(|h| h.split('"').next())
            .filter_map(|h| h.parse().ok())
            .collect()
    }

    #[test]
    fn bars_scale_to_the_busiest_minute() {
        let minutes = vec![
            minute(1, &[("succeeded", 10)]),
            minute(2, &[("succeeded", 5)]),
            minute(3, &[]),
        ];
        let svg = outcomes(&minutes).into_string();
        let h = heights(&svg);
        assert_eq!(h.len(), 2, "{svg}");
        assert!((h[0] - plot_height()).abs() < 0.2, "{h:?}");
        assert!((h[1] - plot_height() / 2.0).abs() < 0.2, "{h:?}");
        assert!(svg.contains("id=\"chart-outcomes\""));
        assert!(svg.contains("<title>"));
    }

    #[test]
    fn stacked_segments_add_up_and_keep_their_order() {
        let minutes = vec![minute(1, &[("failed", 1), ("succeeded", 3)])];
        let svg = outcomes(&minutes).into_string();
        let first = svg.find("data-status=\"succeeded\"").unwrap();
        let second = svg.find("data-status=\"failed\"").unwrap();
        assert!(first < second, "succeeded stacks at the bottom");
        let total: f64 = heights(&svg).iter().sum();
        // max 4 → axis 5.
        assert!((total - plot_height() * 4.0 / 5.0).abs() < 0.3, "{total}");
    }

    #[test]
    fn empty_data_draws_no_bars_and_says_so() {
        let minutes = vec![minute(1, &[]), minute(2, &[])];
        let svg = outcomes(&minutes).into_string();
        assert!(heights(&svg).is_empty());
        assert!(svg.contains("No payouts finished"));
        let svg = latency(&minutes).into_string();
        assert!(svg.contains("No creates sent"));
        assert!(!svg.contains("<path"));
        assert!(table(&[]).into_string().contains("No activity"));
        assert!(outcomes(&[]).into_string().contains("No payouts finished"));
    }

    #[test]
    fn latency_lines_break_where_no_creates_were_sent() {
        let mut a = minute(1, &[]);
        a.creates = 2;
        a.latency_buckets[3] = 2; // 100 ms
        let b = minute(2, &[]);
        let mut c = a.clone();
        c.minute_ms += 120_000;
        let path = quantile_path(&quantile_points(&[a.clone(), b, c], 0.5, 100));
        assert_eq!(path.matches('M').count(), 2, "{path}");
        assert!(!path.contains('L'), "{path}");
        // A lone minute still shows: a dot per quantile.
        let svg = latency(&[a]).into_string();
        assert_eq!(svg.matches("<circle").count(), 2, "{svg}");
    }

    #[test]
    fn axis_ceilings_are_round() {
        assert_eq!(nice_ceiling(0), 1);
        assert_eq!(nice_ceiling(3), 5);
        assert_eq!(nice_ceiling(7), 10);
        assert_eq!(nice_ceiling(120), 200);
        assert_eq!(clock(0), "00:00");
        for max in [1, 2, 5, 10, 20, 50, 100, 200] {
            let svg = y_axis(max, "").into_string();
            assert!(svg.contains(&format!(">{max}<")), "{max}: {svg}");
        }
    }
}
