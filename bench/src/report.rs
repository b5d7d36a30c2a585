//! Reads criterion's results (`target/criterion/<group>/<function>/<parameter>/new/`) and puts
//! vcmdq next to its baselines: per parameter, commands per second of `copy_limit`, `naive`
//! and `vcmdq` from their median estimates, and the ratios vcmdq/copy_limit and vcmdq/naive;
//! then the issue's targets, each marked met or missed (among them the guest-RAM backing's
//! `vmm_rings<N>_batch64` against the memfd ring's `rings<N>_batch64`, same run). `make bench` prints it at the end
//! (`cargo run -p vcmdq-bench --bin ratios`). Nothing here asserts a timing: it reports.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// One benchmark's median.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    /// The criterion group.
    pub group: String,
    /// The function (`copy_limit`, `naive`, `vcmdq`, ...).
    pub function: String,
    /// The parameter (`mix_16`, `rings1_batch64`, ...); empty when there is none.
    pub parameter: String,
    /// Median time of one iteration, nanoseconds.
    pub median_ns: f64,
    /// Elements (commands) per iteration, when the benchmark set `Throughput::Elements`.
    pub elements: Option<u64>,
}

impl Estimate {
    /// Nanoseconds per element (per iteration without a throughput).
    pub fn ns_per_element(&self) -> f64 {
        self.median_ns / self.elements.unwrap_or(1) as f64
    }

    /// Elements per second.
    pub fn rate(&self) -> f64 {
        1e9 / self.ns_per_element()
    }
}

/// Every benchmark under `dir` (criterion's output directory) that has a `new/` estimate.
pub fn load(dir: &Path) -> Result<Vec<Estimate>, String> {
    let mut found = Vec::new();
    walk(dir, &mut found)?;
    found.sort_by(|a: &Estimate, b| {
        (&a.group, &a.parameter, &a.function).cmp(&(&b.group, &b.parameter, &b.function))
    });
    Ok(found)
}

fn walk(dir: &Path, found: &mut Vec<Estimate>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            if let Some(e) = read_one(&path)? {
                found.push(e);
            }
        } else if path
            .file_name()
            .is_some_and(|n| n != "report" && n != "base")
        {
            walk(&path, found)?;
        }
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Option<Value>, String> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// One `new/` directory: `benchmark.json` (the ids and throughput) and `estimates.json`.
fn read_one(new: &Path) -> Result<Option<Estimate>, String> {
    let (Some(id), Some(est)) = (
        read_json(&new.join("benchmark.json"))?,
        read_json(&new.join("estimates.json"))?,
    ) else {
        return Ok(None);
    };
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let median_ns = est["median"]["point_estimate"]
        .as_f64()
        .ok_or_else(|| format!("{}: no median estimate", new.display()))?;
    Ok(Some(Estimate {
        group: text(&id["group_id"]),
        function: text(&id["function_id"]),
        parameter: text(&id["value_str"]),
        median_ns,
        elements: id["throughput"]["Elements"].as_u64(),
    }))
}

/// The estimates of one group, by parameter and then function.
type Table<'a> = BTreeMap<&'a str, BTreeMap<&'a str, &'a Estimate>>;

fn table<'a>(all: &'a [Estimate], group: &str) -> Table<'a> {
    let mut t: Table<'a> = BTreeMap::new();
    for e in all.iter().filter(|e| e.group == group) {
        t.entry(e.parameter.as_str())
            .or_default()
            .insert(e.function.as_str(), e);
    }
    t
}

fn mrate(e: Option<&&Estimate>) -> String {
    e.map_or("-".into(), |e| format!("{:.1}", e.rate() / 1e6))
}

fn ratio(a: Option<&&Estimate>, b: Option<&&Estimate>) -> Option<f64> {
    Some(b?.ns_per_element() / a?.ns_per_element())
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.3}"))
}

/// The baseline comparison of `group` (functions copy_limit, naive, vcmdq) as a Markdown table.
pub fn baseline_table(all: &[Estimate], group: &str) -> String {
    let t = table(all, group);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| {group} | copy_limit Mcmd/s | naive Mcmd/s | vcmdq Mcmd/s | vcmdq ns/cmd | vcmdq/copy_limit | vcmdq/naive |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    for (param, f) in &t {
        let (c, n, v) = (f.get("copy_limit"), f.get("naive"), f.get("vcmdq"));
        let _ = writeln!(
            s,
            "| {param} | {} | {} | {} | {} | {} | {} |",
            mrate(c),
            mrate(n),
            mrate(v),
            v.map_or("-".into(), |v| format!("{:.2}", v.ns_per_element())),
            fmt_ratio(ratio(v, c)),
            fmt_ratio(ratio(v, n)),
        );
    }
    s
}

/// Every function of `group` by parameter: ns per element and million elements per second.
pub fn plain_table(all: &[Estimate], group: &str) -> String {
    let t = table(all, group);
    let mut s = String::new();
    let _ = writeln!(s, "| {group} | function | ns/element | M elements/s |");
    let _ = writeln!(s, "|---|---|---:|---:|");
    for (param, f) in &t {
        for (func, e) in f {
            let _ = writeln!(
                s,
                "| {param} | {func} | {:.2} | {:.1} |",
                e.ns_per_element(),
                e.rate() / 1e6
            );
        }
    }
    s
}

/// One target of the issue, checked against the medians.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// What is asked.
    pub what: String,
    /// What was measured, in words.
    pub measured: String,
    /// Met, missed, or not measured (`None`).
    pub met: Option<bool>,
}

fn get<'a>(all: &'a [Estimate], group: &str, function: &str, param: &str) -> Option<&'a Estimate> {
    all.iter()
        .find(|e| e.group == group && e.function == function && e.parameter == param)
}

/// `max / min` of the ns per element of `function` over `params` (all present), with the values.
fn spread(all: &[Estimate], group: &str, function: &str, params: &[&str]) -> Option<(f64, String)> {
    let v: Vec<(&str, f64)> = params
        .iter()
        .map(|p| Some((*p, get(all, group, function, p)?.ns_per_element())))
        .collect::<Option<_>>()?;
    let max = v.iter().map(|x| x.1).fold(f64::MIN, f64::max);
    let min = v.iter().map(|x| x.1).fold(f64::MAX, f64::min);
    let list = v
        .iter()
        .map(|(p, ns)| format!("{p} {ns:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    Some((
        max / min,
        format!("{list} ns/cmd: max/min {:.2}", max / min),
    ))
}

/// The issue's throughput targets against the estimates.
pub fn targets(all: &[Estimate]) -> Vec<Target> {
    let mut out = Vec::new();
    let tr = |f: &str, p: &str| get(all, "translate", f, p);
    for p in ["mix_16", "mix_1000000_hot"] {
        let (c, n, v) = (tr("copy_limit", p), tr("naive", p), tr("vcmdq", p));
        let r = c
            .zip(v)
            .map(|(c, v)| c.ns_per_element() / v.ns_per_element());
        out.push(Target {
            what: format!("translate {p}: vcmdq >= 0.2 x copy_limit"),
            measured: fmt_ratio(r),
            met: r.map(|r| r >= 0.2),
        });
        let r = n
            .zip(v)
            .map(|(n, v)| n.ns_per_element() / v.ns_per_element());
        out.push(Target {
            what: format!("translate {p}: vcmdq >= 10 x naive"),
            measured: fmt_ratio(r),
            met: r.map(|r| r >= 10.0),
        });
    }
    for rings in [1, 16, 256] {
        let p = format!("rings{rings}_batch64");
        let v = get(all, "end_to_end", "vcmdq", &p);
        out.push(Target {
            what: format!("end_to_end {p}: vcmdq >= 100 Mcmd/s"),
            measured: v.map_or("-".into(), |v| format!("{:.1} Mcmd/s", v.rate() / 1e6)),
            met: v.map(|v| v.rate() >= 100e6),
        });
    }
    let e2e = get(all, "end_to_end", "vcmdq", "rings1_batch64");
    let only = tr("vcmdq", "mix_16");
    let r = e2e
        .zip(only)
        .map(|(e, t)| e.ns_per_element() / t.ns_per_element());
    out.push(Target {
        what: "end_to_end rings1_batch64 within 2x of translate mix_16 (ns/cmd)".into(),
        measured: r.map_or("-".into(), |r| format!("{r:.2}x")),
        met: r.map(|r| r <= 2.0),
    });
    for rings in [1, 16] {
        let p = format!("rings{rings}_batch64");
        let memfd = get(all, "end_to_end", "vcmdq", &p);
        let vmm = get(all, "end_to_end", "vcmdq", &format!("vmm_{p}"));
        let r = ratio(memfd.as_ref(), vmm.as_ref());
        out.push(Target {
            what: format!(
                "end_to_end vmm_{p} (guest RAM + register page) costs at most 1.10 x {p} (memfd ring), ns/cmd"
            ),
            measured: match (r, vmm, memfd) {
                (Some(r), Some(v), Some(m)) => format!(
                    "{r:.3}x ({:.2} vs {:.2} ns/cmd)",
                    v.ns_per_element(),
                    m.ns_per_element()
                ),
                _ => "-".into(),
            },
            met: r.map(|r| r <= 1.10),
        });
    }
    out.extend(one_pass_targets(all));
    let rings = ["rings1_batch64", "rings16_batch64", "rings256_batch64"];
    let s = spread(all, "end_to_end", "vcmdq", &rings);
    out.push(Target {
        what: "end_to_end vcmdq cost per command flat (within 20%) from 1 to 256 rings".into(),
        measured: s.as_ref().map_or("-".into(), |s| s.1.clone()),
        met: s.map(|s| s.0 <= 1.2),
    });
    for (kind, params) in [
        ("hot", ["mix_16", "mix_4096_hot", "mix_1000000_hot"]),
        (
            "uniform",
            ["mix_16", "mix_4096_uniform", "mix_1000000_uniform"],
        ),
    ] {
        let s = spread(all, "translate", "vcmdq", &params);
        out.push(Target {
            what: format!(
                "translate vcmdq cost per command flat (within 20%) from 16 to 1,000,000 vSIDs, {kind} stream"
            ),
            measured: s.as_ref().map_or("-".into(), |s| s.1.clone()),
            met: s.map(|s| s.0 <= 1.2),
        });
    }
    out
}

/// The targets of the performance issue that made the hot path one pass (same names, ratios
/// from one run).
fn one_pass_targets(all: &[Estimate]) -> Vec<Target> {
    let mut out = Vec::new();
    let tr = |f: &str, p: &str| get(all, "translate", f, p);
    let e2e = |f: &str, p: &str| get(all, "end_to_end", f, p);
    // vcmdq's rate over the baseline's: ns per element of the baseline over vcmdq's.
    let over = |base: Option<&Estimate>, v: Option<&Estimate>| {
        base.zip(v)
            .map(|(b, v)| b.ns_per_element() / v.ns_per_element())
    };
    for (p, min) in [("mix_16", 0.25), ("atc_16", 0.15)] {
        let r = over(tr("copy_limit", p), tr("vcmdq", p));
        out.push(Target {
            what: format!("translate {p}: vcmdq >= {min} x copy_limit (one pass)"),
            measured: fmt_ratio(r),
            met: r.map(|r| r >= min),
        });
    }
    let r = over(tr("naive", "mix_16"), tr("vcmdq", "mix_16"));
    out.push(Target {
        what: "translate mix_16: vcmdq >= 10 x naive (one pass)".into(),
        measured: fmt_ratio(r),
        met: r.map(|r| r >= 10.0),
    });
    let v16 = e2e("vcmdq", "rings16_batch64");
    out.push(Target {
        what: "end_to_end rings16_batch64: vcmdq >= 250 Mcmd/s".into(),
        measured: v16.map_or("-".into(), |v| format!("{:.1} Mcmd/s", v.rate() / 1e6)),
        met: v16.map(|v| v.rate() >= 250e6),
    });
    let r = over(
        e2e("copy_limit", "rings1_batch64"),
        e2e("vcmdq", "rings1_batch64"),
    );
    out.push(Target {
        what: "end_to_end rings1_batch64: vcmdq >= 0.7 x the two-thread copy_limit".into(),
        measured: fmt_ratio(r),
        met: r.map(|r| r >= 0.7),
    });
    let r = v16
        .zip(e2e("vcmdq", "rings256_batch64"))
        .map(|(a, b)| b.ns_per_element() / a.ns_per_element());
    out.push(Target {
        what: "end_to_end rings256_batch64 within 20% of rings16_batch64 (ns/cmd)".into(),
        measured: r.map_or("-".into(), |r| format!("{r:.2}x")),
        met: r.map(|r| r <= 1.2),
    });
    let r = v16
        .zip(tr("vcmdq", "mix_16"))
        .map(|(e, t)| e.ns_per_element() / t.ns_per_element());
    out.push(Target {
        what: "end_to_end rings16_batch64 per command <= 2 x translate mix_16".into(),
        measured: r.map_or("-".into(), |r| format!("{r:.2}x")),
        met: r.map(|r| r <= 2.0),
    });
    out
}

/// The whole report: the baseline tables, the other groups, the targets.
pub fn render(all: &[Estimate]) -> String {
    let mut s = String::new();
    for group in ["translate", "end_to_end"] {
        if all.iter().any(|e| e.group == group) {
            s += &baseline_table(all, group);
            s += "\n";
        }
    }
    let mut others: Vec<&str> = all
        .iter()
        .map(|e| e.group.as_str())
        .filter(|g| *g != "translate" && *g != "end_to_end")
        .collect();
    others.dedup();
    for g in others {
        s += &plain_table(all, g);
        s += "\n";
    }
    let _ = writeln!(s, "| target | measured (medians) | |");
    let _ = writeln!(s, "|---|---|---|");
    for t in targets(all) {
        let mark = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        let _ = writeln!(s, "| {} | {} | {mark} |", t.what, t.measured);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(group: &str, function: &str, parameter: &str, median_ns: f64) -> Estimate {
        Estimate {
            group: group.into(),
            function: function.into(),
            parameter: parameter.into(),
            median_ns,
            elements: Some(1000),
        }
    }

    #[test]
    fn reads_criterion_output() {
        let dir = std::env::temp_dir().join(format!("vcmdq-report-{}", std::process::id()));
        let new = dir.join("translate/vcmdq/mix_16/new");
        std::fs::create_dir_all(&new).unwrap();
        std::fs::create_dir_all(dir.join("translate/vcmdq/mix_16/base")).unwrap();
        std::fs::write(
            new.join("benchmark.json"),
            r#"{"group_id":"translate","function_id":"vcmdq","value_str":"mix_16",
                "throughput":{"Elements":4096},"full_id":"translate/vcmdq/mix_16",
                "directory_name":"translate/vcmdq/mix_16","title":"translate/vcmdq/mix_16"}"#,
        )
        .unwrap();
        std::fs::write(
            new.join("estimates.json"),
            r#"{"mean":{"point_estimate":9000.0},"median":{"point_estimate":8192.0}}"#,
        )
        .unwrap();
        let all = load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            all,
            [Estimate {
                group: "translate".into(),
                function: "vcmdq".into(),
                parameter: "mix_16".into(),
                median_ns: 8192.0,
                elements: Some(4096),
            }]
        );
        assert_eq!(all[0].ns_per_element(), 2.0);
        assert_eq!(all[0].rate(), 5e8);
    }

    #[test]
    fn ratios_and_targets() {
        let all = vec![
            est("translate", "copy_limit", "mix_16", 500.0),
            est("translate", "naive", "mix_16", 30_000.0),
            est("translate", "vcmdq", "mix_16", 2_000.0),
            est("end_to_end", "vcmdq", "rings1_batch64", 5_000.0),
            est("end_to_end", "vcmdq", "rings16_batch64", 5_500.0),
            est("end_to_end", "vcmdq", "rings256_batch64", 12_000.0),
            est("end_to_end", "vcmdq", "vmm_rings1_batch64", 5_400.0),
            est("end_to_end", "vcmdq", "vmm_rings16_batch64", 6_600.0),
        ];
        let table = baseline_table(&all, "translate");
        assert!(
            table.contains("| mix_16 | 2000.0 | 33.3 | 500.0 | 2.00 | 0.250 | 15.000 |"),
            "{table}"
        );
        let t = targets(&all);
        let find = |w: &str| t.iter().find(|t| t.what.starts_with(w)).unwrap().clone();
        assert_eq!(find("translate mix_16: vcmdq >= 0.2").met, Some(true));
        assert_eq!(find("translate mix_16: vcmdq >= 10").met, Some(true));
        assert_eq!(find("translate mix_1000000_hot: vcmdq >= 0.2").met, None);
        assert_eq!(find("end_to_end rings1_batch64: vcmdq >=").met, Some(true));
        assert_eq!(
            find("end_to_end rings256_batch64: vcmdq >=").met,
            Some(false)
        );
        let within = find("end_to_end rings1_batch64 within 2x");
        assert_eq!(
            (within.measured.as_str(), within.met),
            ("2.50x", Some(false))
        );
        let vmm1 = find("end_to_end vmm_rings1_batch64");
        assert_eq!(
            (vmm1.measured.as_str(), vmm1.met),
            ("1.080x (5.40 vs 5.00 ns/cmd)", Some(true))
        );
        let vmm16 = find("end_to_end vmm_rings16_batch64");
        assert_eq!(vmm16.met, Some(false), "{}", vmm16.measured);
        assert_eq!(find("translate mix_16: vcmdq >= 0.25").met, Some(true));
        assert_eq!(find("translate atc_16: vcmdq >= 0.15").met, None);
        let rate = find("end_to_end rings16_batch64: vcmdq >= 250");
        assert_eq!(
            (rate.measured.as_str(), rate.met),
            ("181.8 Mcmd/s", Some(false))
        );
        assert_eq!(find("end_to_end rings1_batch64: vcmdq >= 0.7").met, None);
        let flat256 = find("end_to_end rings256_batch64 within 20%");
        assert_eq!(
            (flat256.measured.as_str(), flat256.met),
            ("2.18x", Some(false))
        );
        let two = find("end_to_end rings16_batch64 per command <= 2");
        assert_eq!((two.measured.as_str(), two.met), ("2.75x", Some(false)));
        let flat = find("end_to_end vcmdq cost per command flat");
        assert_eq!(flat.met, Some(false), "{}", flat.measured);
        assert!(render(&all).contains("MISSED"));
    }
}
