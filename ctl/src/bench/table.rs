//! Cells and figures the benchmark tables share.

use convoy_protocol::model::PauseParts;

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

/// Each part's median over `pauses` (so the parts of the result need not
/// add up to any one pause).
pub fn median_pause<'a>(pauses: impl Iterator<Item = &'a PauseParts> + Clone) -> PauseParts {
    let pick = |f: fn(&PauseParts) -> u64| median(pauses.clone().map(|p| f(p) as f64)) as u64;
    PauseParts {
        last_round_us: pick(|p| p.last_round_us),
        verify_us: pick(|p| p.verify_us),
        commit_us: pick(|p| p.commit_us),
        start_us: pick(|p| p.start_us),
        device_state_us: pick(|p| p.device_state_us),
        drain_us: pick(|p| p.drain_us),
        root_check_us: pick(|p| p.root_check_us),
        record_us: pick(|p| p.record_us),
        vm_start_us: pick(|p| p.vm_start_us),
    }
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
