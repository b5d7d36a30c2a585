//! A latency percentile plot as SVG, written by hand: the x axis is the percentile on the
//! HdrHistogram scale (log of 1/(1 - p): 0%, 90%, 99%, 99.9%, ...), the y axis latency on a log
//! scale. One curve per series.

use hdrhistogram::Histogram;
use std::fmt::Write as _;

/// One curve: a label, a colour, dashed or solid, and its distribution (nanoseconds).
pub struct Series<'a> {
    /// Shown in the legend.
    pub label: String,
    /// An SVG colour.
    pub color: &'static str,
    /// Dashed line.
    pub dashed: bool,
    /// The distribution.
    pub hist: &'a Histogram<u64>,
}

const W: f64 = 960.0;
const H: f64 = 600.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// The x position of percentile `q` (0..1) on the 1/(1-q) log scale, `decades` wide.
fn x_of(q: f64, decades: f64) -> f64 {
    let q = q.min(1.0 - 10f64.powf(-decades));
    let d = (1.0 / (1.0 - q)).log10();
    LEFT + d / decades * (W - LEFT - RIGHT)
}

/// The y position of `ns` on a log scale from 10^`lo` to 10^`hi` nanoseconds.
fn y_of(ns: f64, lo: f64, hi: f64) -> f64 {
    let v = ns.max(1.0).log10().clamp(lo, hi);
    H - BOTTOM - (v - lo) / (hi - lo) * (H - TOP - BOTTOM)
}

fn label_ns(exp: i32) -> String {
    match exp {
        0 => "1 ns".into(),
        1 => "10 ns".into(),
        2 => "100 ns".into(),
        3 => "1 µs".into(),
        4 => "10 µs".into(),
        5 => "100 µs".into(),
        6 => "1 ms".into(),
        7 => "10 ms".into(),
        8 => "100 ms".into(),
        9 => "1 s".into(),
        10 => "10 s".into(),
        e => format!("1e{e} ns"),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document: `title` above, `series` as percentile curves.
pub fn percentile_svg(title: &str, series: &[Series<'_>]) -> String {
    let samples = series
        .iter()
        .map(|s| s.hist.len())
        .max()
        .unwrap_or(1)
        .max(10);
    // Enough decades to show the largest series' maximum, at least 99.99%.
    let decades = ((samples as f64).log10().ceil()).clamp(4.0, 7.0);
    let lo_ns = series
        .iter()
        .filter(|s| !s.hist.is_empty())
        .map(|s| s.hist.min() as f64)
        .fold(f64::MAX, f64::min);
    let hi_ns = series
        .iter()
        .filter(|s| !s.hist.is_empty())
        .map(|s| s.hist.max() as f64)
        .fold(1.0, f64::max);
    let lo = if lo_ns == f64::MAX {
        1.0
    } else {
        lo_ns.max(1.0).log10().floor()
    };
    let hi = hi_ns.log10().ceil().max(lo + 1.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        escape(title)
    );
    // Grid and axis labels.
    for d in 0..=decades as i32 {
        let q = 1.0 - 10f64.powi(-d);
        let x = x_of(q, decades);
        let label = match d {
            0 => "0%".to_string(),
            1 => "90%".to_string(),
            2 => "99%".to_string(),
            d => format!("99.{}%", "9".repeat(d as usize - 2)),
        };
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 20.0
        );
    }
    for e in lo as i32..=hi as i32 {
        let y = y_of(10f64.powi(e), lo, hi);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            label_ns(e)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 14.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20 {}) rotate(-90)" text-anchor="middle">latency</text>"#,
        (TOP + H - BOTTOM) / 2.0
    );
    // Curves: the value at each percentile the histogram iterates to, then the maximum.
    for (i, ser) in series.iter().enumerate() {
        if ser.hist.is_empty() {
            continue;
        }
        let mut pts = Vec::new();
        for v in ser.hist.iter_quantiles(5) {
            let q = v.quantile_iterated_to();
            pts.push((
                x_of(q, decades),
                y_of(
                    ser.hist.highest_equivalent(v.value_iterated_to()) as f64,
                    lo,
                    hi,
                ),
            ));
        }
        pts.push((x_of(1.0, decades), y_of(ser.hist.max() as f64, lo, hi)));
        let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let dash = if ser.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
            ser.color,
            path.join(" ")
        );
        let ly = TOP + 10.0 + 22.0 * i as f64;
        let lx = W - RIGHT + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 30.0,
            ser.color,
            lx + 36.0,
            ly + 4.0,
            escape(&ser.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_rise_left_to_right_and_the_legend_names_each() {
        let mut a = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).unwrap();
        for v in 1..=10_000u64 {
            a.record(v * 10).unwrap();
        }
        let empty = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).unwrap();
        let svg = percentile_svg(
            "a <test>",
            &[
                Series {
                    label: "load & go".into(),
                    color: "red",
                    dashed: false,
                    hist: &a,
                },
                Series {
                    label: "none".into(),
                    color: "blue",
                    dashed: true,
                    hist: &empty,
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt;test&gt;") && svg.contains("load &amp; go"));
        assert!(!svg.contains(">none<"), "an empty series draws nothing");
        assert!(svg.contains(">99.99%<"));
        let line = svg
            .lines()
            .find(|l| l.starts_with("<polyline"))
            .expect("one curve");
        let pts: Vec<(f64, f64)> = line
            .split("points=\"")
            .nth(1)
            .unwrap()
            .trim_end_matches("\"/>")
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect();
        assert!(pts.len() > 10);
        // x grows and y falls (latency rises, SVG y points down) along the curve.
        assert!(pts.windows(2).all(|w| w[1].0 >= w[0].0 && w[1].1 <= w[0].1));
        assert!(pts[0].0 >= LEFT && pts.last().unwrap().0 <= W - RIGHT);
    }
}
