//! The value syntax every subcommand shares, one `value_parser` per kind, so that a count, a
//! duration or a ring size is written the same way wherever a flag takes one (README: "Options
//! every subcommand shares").

use std::time::Duration;

/// Where the modelled hardware runs (`--hardware`, in serve and soak).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Hardware {
    /// Stepped by its worker between passes.
    Inline,
    /// A thread per physical queue.
    Thread,
}

/// The forms a count takes, for error messages.
pub const COUNT_FORMS: &str =
    "a whole number: 1000000, 1_000_000, 1e6, or with k/K, M, G (5M, 2.5k)";
/// The forms a duration takes, for error messages.
pub const DURATION_FORMS: &str =
    "a positive number with a unit ms, s, m (or min), h: 500ms, 10s, 2m, 1h; a bare number is seconds";
/// The longest duration any flag takes, in seconds (about 31 years).
pub const MAX_DURATION_SECS: f64 = 1e9;

/// A count: `1000000`, `1_000_000`, `1e6`, `5M`, `2.5k`, `1G` (k/K = 10^3, M = 10^6, G = 10^9).
pub fn count(s: &str) -> Result<u64, String> {
    let t = s.trim().replace('_', "");
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('G') => (&t[..t.len() - 1], 1e9),
        _ => (&t[..], 1.0),
    };
    let bad = || format!("{:?} is not a count ({COUNT_FORMS})", super::clip(s, 40));
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult as u64).ok_or_else(bad);
    }
    match num.parse::<f64>() {
        Ok(f) if f >= 0.0 && (f * mult).fract() == 0.0 && f * mult < 1.8e19 => {
            Ok((f * mult) as u64)
        }
        _ => Err(bad()),
    }
}

/// The forms a size in bytes takes, for error messages.
pub const BYTES_FORMS: &str =
    "a whole number of bytes (268435456, 256_000, 0x1000_0000) or with a binary unit KiB, MiB, GiB, TiB (256MiB, 1.5GiB)";

/// A size in bytes: `268435456`, `0x1000_0000`, or with a binary unit `256MiB`, `1.5GiB`,
/// `64KiB`, `1TiB` (an optional space before the unit). Decimal units (`MB`, `k`) are refused:
/// whether `MB` means 10^6 or 2^20 is exactly what a limit must not leave open.
pub fn bytes(s: &str) -> Result<u64, String> {
    let t = s.trim().replace('_', "");
    let bad = |why: &str| {
        format!(
            "{:?} is not a size{why} ({BYTES_FORMS})",
            super::clip(s, 40)
        )
    };
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| bad(""));
    }
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), &t[split..]);
    let shift = match unit {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        "k" | "K" | "KB" | "kB" | "M" | "MB" | "G" | "GB" | "T" | "TB" => {
            return Err(bad(
                ": say KiB, MiB, GiB (powers of 2) or write the bytes out",
            ))
        }
        _ => return Err(bad("")),
    };
    if num.is_empty() {
        return Err(bad(""));
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(1u64 << shift)
            .ok_or_else(|| bad(": above 2^64 bytes"));
    }
    let scale = (1u64 << shift) as f64;
    match num.parse::<f64>() {
        Ok(f) if f >= 0.0 && (f * scale).fract() == 0.0 && f * scale < 1.8e19 => {
            Ok((f * scale) as u64)
        }
        Ok(f) if f >= 0.0 && f * scale < 1.8e19 => Err(bad(": not a whole number of bytes")),
        _ => Err(bad("")),
    }
}

/// A duration above 0 and at most [`MAX_DURATION_SECS`]: `500ms`, `10s`, `2m`, `1h`, or a bare
/// number of seconds (`0.5`).
pub fn duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E') {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let scale = match unit {
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "{:?}: unit {:?} is not one of ms, s, m, h ({DURATION_FORMS})",
                super::clip(s, 40),
                super::clip(unit, 20)
            ))
        }
    };
    match num.trim().parse::<f64>() {
        Ok(f) if f.is_finite() && f > 0.0 && f * scale <= MAX_DURATION_SECS => {
            Ok(Duration::from_secs_f64(f * scale))
        }
        Ok(f) if f.is_finite() && f * scale <= MAX_DURATION_SECS => {
            Err(format!("a duration must be positive ({DURATION_FORMS})"))
        }
        Ok(_) => Err(format!(
            "a duration must be at most {MAX_DURATION_SECS:e} seconds ({DURATION_FORMS})"
        )),
        Err(_) => Err(format!(
            "{:?} is not a duration ({DURATION_FORMS})",
            super::clip(s, 40)
        )),
    }
}

/// A duration as [`duration`] reads it, in seconds, for flags whose code counts in `f64`.
pub fn duration_secs(s: &str) -> Result<f64, String> {
    duration(s).map(|d| d.as_secs_f64())
}

/// A duration as [`duration`] reads it, or `0` for "off" (`--progress 0`).
pub fn duration_or_off(s: &str) -> Result<Duration, String> {
    if s.trim().parse::<f64>() == Ok(0.0) {
        Ok(Duration::ZERO)
    } else {
        duration(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_take_suffixes_exponents_and_underscores() {
        assert_eq!(count("5M"), Ok(5_000_000));
        assert_eq!(count("1e6"), Ok(1_000_000));
        assert_eq!(count("1_000_000"), Ok(1_000_000));
        assert_eq!(count("2.5k"), Ok(2_500));
        assert_eq!(count("3K"), Ok(3_000));
        assert_eq!(count("1G"), Ok(1_000_000_000));
        assert_eq!(count("0"), Ok(0));
        assert_eq!(count("42"), Ok(42));
    }

    #[test]
    fn a_bad_count_names_the_accepted_forms() {
        for bad in [
            "",
            "M",
            "-1",
            "1.5",
            "abc",
            "1T",
            "99999999999999999999",
            "1e30",
        ] {
            let e = count(bad).unwrap_err();
            assert!(e.contains("5M") && e.contains("1e6"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn durations_take_units_and_a_bare_number_is_seconds() {
        assert_eq!(duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(duration("1e1s"), Ok(Duration::from_secs(10)));
        assert_eq!(duration_secs("250ms"), Ok(0.25));
    }

    #[test]
    fn a_bad_duration_names_the_accepted_forms() {
        for bad in [
            "",
            "0",
            "-1",
            "0s",
            "10x",
            "10 fortnights",
            "nan",
            "inf",
            "2e9",
            "s",
        ] {
            let e = duration(bad).unwrap_err();
            assert!(
                e.contains("500ms") && e.contains("bare number"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn zero_means_off_only_where_off_is_allowed() {
        assert_eq!(duration_or_off("0"), Ok(Duration::ZERO));
        assert_eq!(duration_or_off("5"), Ok(Duration::from_secs(5)));
        assert!(duration_or_off("-1").is_err());
    }

    #[test]
    fn sizes_take_bytes_hex_or_binary_units_and_refuse_decimal_ones() {
        assert_eq!(bytes("268435456"), Ok(256 << 20));
        assert_eq!(bytes("256_000"), Ok(256_000));
        assert_eq!(bytes("0x1000_0000"), Ok(256 << 20));
        assert_eq!(bytes("256MiB"), Ok(256 << 20));
        assert_eq!(bytes("256 MiB"), Ok(256 << 20));
        assert_eq!(bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(bytes("64KiB"), Ok(64 << 10));
        assert_eq!(bytes("1TiB"), Ok(1 << 40));
        assert_eq!(bytes("100B"), Ok(100));
        for bad in [
            "256MB",
            "1G",
            "5k",
            "-1",
            "MiB",
            "1.3B",
            "99999999TiB",
            "0xg",
            "",
        ] {
            let e = bytes(bad).unwrap_err();
            assert!(e.contains("is not a size"), "{bad}: {e}");
        }
        assert!(bytes("256MB").unwrap_err().contains("say KiB, MiB, GiB"));
    }
}
