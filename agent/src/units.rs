//! Human sizes for command lines: `512MiB`, `1G`, `4096`.

/// Why a size does not parse; each carries the text as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// No number where one should be.
    #[error("{0:?} is not a size (examples: 512MiB, 1G, 4096)")]
    NotASize(String),
    /// A unit that is none of B, K, M, G, T (with or without `iB`).
    #[error("unknown size unit {unit:?} in {text:?}")]
    UnknownUnit {
        /// The unit, lower-cased.
        unit: String,
        /// The whole text.
        text: String,
    },
    /// Negative, not finite, or more than 2^64 bytes.
    #[error("{0:?} is out of range")]
    OutOfRange(String),
}

/// Parses a size: a number with an optional unit (`K`, `KiB`, `M`, `MiB`,
/// `G`, `GiB`, `T`, `TiB`; powers of 1024, case-insensitive; `B` allowed).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| SizeError::NotASize(s.to_owned()))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(SizeError::UnknownUnit {
                unit: other.to_owned(),
                text: s.to_owned(),
            })
        }
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(SizeError::OutOfRange(s.to_owned()));
    }
    // CAST: finite, not negative and at most 2^64 (checked just above);
    // `as` saturates 2^64 itself to u64::MAX.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let bytes = v as u64;
    Ok(bytes)
}

/// Formats bytes with a binary unit, e.g. `512.0 MiB`.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(
            parse_size("12 parsecs").map_err(|e| e.to_string()),
            Err("unknown size unit \"parsecs\" in \"12 parsecs\"".to_string())
        );
        assert_eq!(parse_size(""), Err(SizeError::NotASize(String::new())));
        assert_eq!(format_bytes(512 << 20), "512.0 MiB");
    }
}
