//! Durations as the whole units reports and messages carry: saturating,
//! so a duration too long for a `u64` of its unit reads as the largest
//! (a leaf module).

use std::time::Duration;

/// `d` in whole microseconds, `u64::MAX` past it.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// `d` in whole microseconds, `u32::MAX` past it (what messages carry:
/// about 71 minutes).
pub fn micros32(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// `d` in whole milliseconds, `u64::MAX` past it.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_units_that_saturate() {
        assert_eq!(micros(Duration::from_nanos(1_999)), 1);
        assert_eq!(millis(Duration::from_micros(2_500)), 2);
        assert_eq!(micros(Duration::MAX), u64::MAX);
        assert_eq!(micros32(Duration::from_micros(7)), 7);
        assert_eq!(micros32(Duration::from_secs(4_295)), u32::MAX);
        assert_eq!(millis(Duration::from_millis(u64::MAX)), u64::MAX);
        assert_eq!(millis(Duration::MAX), u64::MAX);
        assert_eq!(
            micros(Duration::from_secs(u64::MAX / 1_000_000 + 1)),
            u64::MAX
        );
    }
}
