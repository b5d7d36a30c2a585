//! Figures as people read them: rates with a unit that fits (k, M), counts with their plural.

/// `n` and `word`, with an `s` unless `n` is 1 ("1 ring", "12 rings").
pub fn count(n: impl Into<u64>, word: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// A rate in `what` per second, scaled to M or k when it is that large, with three or four
/// significant figures: "2.51 M commands/s", "241.6 k/s", "37.5 commands/s".
pub fn rate(per_sec: f64, what: &str) -> String {
    let sep = if what.is_empty() { "" } else { " " };
    if !per_sec.is_finite() || per_sec <= 0.0 {
        format!("0{sep}{what}/s")
    } else if per_sec >= 1e6 {
        format!("{:.2} M{sep}{what}/s", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.1} k{sep}{what}/s", per_sec / 1e3)
    } else if per_sec >= 10.0 {
        format!("{per_sec:.1}{sep}{what}/s")
    } else {
        format!("{per_sec:.2}{sep}{what}/s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_take_a_plural_unless_one() {
        assert_eq!(count(1u32, "ring"), "1 ring");
        assert_eq!(count(0u32, "ring"), "0 rings");
        assert_eq!(count(12u64, "vIOMMU"), "12 vIOMMUs");
    }

    #[test]
    fn rates_take_a_unit_that_fits_and_few_decimals() {
        assert_eq!(rate(241_565.204_2, ""), "241.6 k/s");
        assert_eq!(rate(2_512_345.0, "commands"), "2.51 M commands/s");
        assert_eq!(rate(37.46, "commands"), "37.5 commands/s");
        assert_eq!(rate(0.5, "commands"), "0.50 commands/s");
        assert_eq!(rate(0.0, "commands"), "0 commands/s");
    }
}
