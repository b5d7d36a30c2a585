//! Latency distributions (HdrHistograms of nanoseconds) as the tools report them: the
//! percentiles every report shows (p50, p90, p99, p99.9, max) as JSON and as text, and
//! HdrHistogram's percentile-distribution text (`vcmdq replay --hgrm`). Curves are in
//! [`crate::plot`].

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::io::{self, Write};

/// The longest latency a distribution holds, in nanoseconds (an hour); a longer sample is
/// recorded as this (`saturating_record`).
pub const MAX_LATENCY_NS: u64 = 3_600_000_000_000;

/// An empty latency distribution: 1 ns to [`MAX_LATENCY_NS`], three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds")
}

/// The percentiles of a distribution, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

impl Percentiles {
    /// The percentiles of `h`; `None` when it has no sample.
    pub fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        (!h.is_empty()).then(|| Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        })
    }
}

/// `{"count", "p50_ns", "p90_ns", "p99_ns", "p999_ns", "max_ns"}`, or null for no sample.
pub fn json(h: &Histogram<u64>) -> Value {
    match Percentiles::of(h) {
        None => Value::Null,
        Some(p) => json!({
            "count": p.count,
            "p50_ns": p.p50,
            "p90_ns": p.p90,
            "p99_ns": p.p99,
            "p999_ns": p.p999,
            "max_ns": p.max,
        }),
    }
}

/// Width of the label column of [`table_header`] and [`table_row`].
const TABLE_LABEL: usize = 26;

/// The header of a table of distributions in microseconds, one per [`table_row`]: `title` in
/// the label column, then p50, p90, p99, p99.9 and max.
pub fn table_header(title: &str) -> String {
    format!(
        "{title:<TABLE_LABEL$} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "p50", "p90", "p99", "p99.9", "max"
    )
}

/// One row of a [`table_header`] table: `label`, then the percentiles of `h` in microseconds
/// to two decimals, or `(no samples)`.
pub fn table_row(label: &str, h: &Histogram<u64>) -> String {
    let Some(p) = Percentiles::of(h) else {
        return format!("{label:<TABLE_LABEL$} (no samples)");
    };
    let us = |ns: u64| format!("{:.2}", ns as f64 / 1e3);
    format!(
        "{label:<TABLE_LABEL$} {:>9} {:>9} {:>9} {:>9} {:>10}",
        us(p.p50),
        us(p.p90),
        us(p.p99),
        us(p.p999),
        us(p.max)
    )
}

/// `label`, then p50, p99, p99.9 and max of `h` each in the unit that suits it (ns, us, ms),
/// and the sample count; `(none)` without samples.
pub fn summary_line(label: &str, h: &Histogram<u64>) -> String {
    let Some(p) = Percentiles::of(h) else {
        return format!("{label:<28} (none)");
    };
    format!(
        "{label:<28} p50 {:>9}  p99 {:>9}  p99.9 {:>9}  max {:>9}  ({} samples)",
        human_ns(p.p50),
        human_ns(p.p99),
        human_ns(p.p999),
        human_ns(p.max),
        p.count
    )
}

fn human_ns(ns: u64) -> String {
    match ns {
        0..=9_999 => format!("{ns} ns"),
        10_000..=9_999_999 => format!("{:.1} us", ns as f64 / 1e3),
        _ => format!("{:.1} ms", ns as f64 / 1e6),
    }
}

/// The HdrHistogram percentile-distribution text (as Java's `outputPercentileDistribution`),
/// values in microseconds.
pub fn write_hgrm(w: &mut impl Write, h: &Histogram<u64>) -> io::Result<()> {
    writeln!(
        w,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    // TotalCount is cumulative: the samples at or below the row's value (HdrHistogram's
    // plotters read it so), not the samples since the previous row.
    let mut total = 0u64;
    for v in h.iter_quantiles(1) {
        let q = v.quantile_iterated_to();
        total += v.count_since_last_iteration();
        let value = v.value_iterated_to() as f64 / 1000.0;
        if q < 1.0 {
            writeln!(
                w,
                "{value:>12.3} {q:>14.12} {total:>10} {:>14.2}",
                1.0 / (1.0 - q)
            )?;
        } else {
            // As HdrHistogram writes the 100th percentile: no 1/(1-Percentile), it is infinite.
            writeln!(w, "{value:>12.3} {q:>14.12} {total:>10}")?;
        }
    }
    writeln!(
        w,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(samples: &[u64]) -> Histogram<u64> {
        let mut h = histogram();
        for &s in samples {
            h.record(s).unwrap();
        }
        h
    }

    #[test]
    fn an_empty_distribution_prints_as_no_samples_everywhere() {
        let h = hist(&[]);
        assert_eq!(Percentiles::of(&h), None);
        assert_eq!(json(&h), Value::Null);
        assert!(table_row("x", &h).ends_with("(no samples)"));
        assert!(summary_line("x", &h).ends_with("(none)"));
    }

    #[test]
    fn json_table_and_line_show_the_same_percentiles() {
        let h = hist(&[1_000, 2_000, 50_000, 20_000_000]);
        let p = Percentiles::of(&h).unwrap();
        assert_eq!(p.count, 4);
        let j = json(&h);
        assert_eq!(j["p50_ns"], p.p50);
        assert_eq!(j["max_ns"], p.max);
        let row = table_row("to physical publish", &h);
        assert!(
            row.starts_with("to physical publish        ")
                && row.contains(&format!("{:.2}", p.p50 as f64 / 1e3)),
            "{row}"
        );
        assert_eq!(row.len(), table_header("t").len(), "{row}");
        let line = summary_line("doorbell -> physical publish", &h);
        assert!(
            line.contains(&format!("p50 {:>9}", human_ns(p.p50))),
            "{line}"
        );
        assert!(
            line.ends_with("(4 samples)") && line.contains(" ms"),
            "{line}"
        );
    }

    #[test]
    fn hgrm_counts_are_cumulative_and_end_at_the_total() {
        let h = hist(&[1_000, 1_000, 3_000]);
        let mut out = Vec::new();
        write_hgrm(&mut out, &h).unwrap();
        let text = String::from_utf8(out).unwrap();
        let rows: Vec<&str> = text
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .collect();
        let last: Vec<&str> = rows.last().unwrap().split_whitespace().collect();
        assert_eq!(last[2], "3", "{text}");
        assert!(text.contains("Total count    =            3"), "{text}");
    }
}
