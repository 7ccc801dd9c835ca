//! Cells and figures the benchmark tables share.

/// Bytes as whole MiB, for a table cell.
pub fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / 1048576.0)
}

/// A signed byte count (an overhead that can come out negative) as whole
/// MiB.
pub fn mib_signed(b: i64) -> String {
    format!("{:.0}", b as f64 / 1048576.0)
}

/// The middle of `values` (the upper middle of an even count); 0 when
/// there are none.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut x: Vec<f64> = values.into_iter().collect();
    x.sort_by(f64::total_cmp);
    x.get(x.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_or_the_upper_middle() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median([]), 0.0);
        assert_eq!(mib(3 << 20), "3");
        assert_eq!(mib_signed(-(2 << 20)), "-2");
    }
}
