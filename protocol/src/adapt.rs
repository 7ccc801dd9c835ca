//! Adaptive compression: the zstd level of a data stream, chosen from what
//! compression costs and what the link carries, so that compression never
//! makes a fast link slower.
//!
//! Compression and sending overlap (an encoder thread feeds a writer), so a
//! stream moves guest bytes at about `min(C, B / r)` with zstd at a level
//! that compresses `C` input bytes per second of CPU to a ratio `r`, over
//! a link that carries `B` bytes per second — and at `B` without
//! compression. [`LevelChooser`] keeps a moving average of `C` and `r` for
//! each candidate level (none, 1, and the operator's level when higher)
//! and of `B`, and picks the level with the highest estimate, preferring
//! the lower level on a tie. Incompressible memory has `r ≈ 1`, so it goes
//! uncompressed; a slow WAN link makes even a slow level pay. Levels not
//! measured lately are probed for a few batches now and then, because the
//! content and the link change during a migration.
//!
//! The chooser is pure: the driver times the compression and the link and
//! passes the figures in.

use std::time::Duration;

/// Batches between probes of a level not chosen.
pub const PROBE_EVERY: u32 = 64;

/// Batches a probe lasts.
pub const PROBE_LEN: u32 = 2;

/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.25;

#[derive(Debug, Clone, Copy, Default)]
struct Measure {
    /// Input bytes per second of CPU.
    speed: Option<f64>,
    /// Output bytes over input bytes.
    ratio: Option<f64>,
}

fn blend(old: Option<f64>, new: f64) -> Option<f64> {
    Some(match old {
        Some(o) => o + ALPHA * (new - o),
        None => new,
    })
}

/// Picks the zstd level of one data stream. See the module docs.
#[derive(Debug, Clone)]
pub struct LevelChooser {
    levels: Vec<i32>,
    measures: Vec<Measure>,
    /// Seconds per byte on the link (averaged as time, so that one frame
    /// that went at once into free buffer space does not dominate).
    link: Option<f64>,
    current: usize,
    since_probe: u32,
    probing: Option<(usize, u32, usize)>,
    next_probe: usize,
}

impl LevelChooser {
    /// A chooser that may use no compression, level 1, and `max_level`
    /// (the operator's). With `max_level` 0 it never compresses.
    pub fn new(max_level: i32) -> Self {
        let mut levels = vec![0];
        if max_level >= 1 {
            levels.push(1);
        }
        if max_level > 1 {
            levels.push(max_level.min(19));
        }
        // Until the link is measured: the operator's level.
        let current = levels.len() - 1;
        LevelChooser {
            measures: vec![Measure::default(); levels.len()],
            levels,
            link: None,
            current,
            since_probe: 0,
            probing: None,
            next_probe: 0,
        }
    }

    /// The level to use now.
    pub fn level(&self) -> i32 {
        match self.probing {
            Some((i, _, _)) => self.levels[i],
            None => self.levels[self.current],
        }
    }

    /// The link carried bytes at this rate (bytes per second of sending).
    pub fn observe_link(&mut self, bytes_per_sec: f64) {
        if bytes_per_sec.is_finite() && bytes_per_sec > 0.0 {
            self.link = blend(self.link, 1.0 / bytes_per_sec);
        }
    }

    /// zstd at `level` turned `input` bytes into `output` bytes (or into
    /// nothing better than raw: pass `output == input`) in `cpu`.
    pub fn observe_compression(&mut self, level: i32, input: usize, output: usize, cpu: Duration) {
        let Some(i) = self.levels.iter().position(|&l| l == level) else {
            return;
        };
        if input == 0 || level == 0 {
            return;
        }
        let secs = cpu.as_secs_f64().max(1e-7);
        let m = &mut self.measures[i];
        m.speed = blend(m.speed, input as f64 / secs);
        m.ratio = blend(m.ratio, (output as f64 / input as f64).min(1.0));
    }

    /// Guest bytes per second at level index `i`, if known.
    fn estimate(&self, i: usize, link: f64) -> Option<f64> {
        if self.levels[i] == 0 {
            return Some(link);
        }
        let m = self.measures[i];
        Some(m.speed?.min(link / m.ratio?.max(1e-3)))
    }

    /// Called before each batch: returns the level for it.
    pub fn next_batch(&mut self) -> i32 {
        if let Some((i, left, back)) = self.probing {
            if left > 1 {
                self.probing = Some((i, left - 1, back));
                return self.levels[i];
            }
            self.probing = None;
            self.current = back;
        }
        let Some(link) = self.link.map(|spb| 1.0 / spb.max(1e-12)) else {
            return self.level();
        };
        // The best known estimate; unknown levels are probed below.
        let mut best = self.current;
        let mut best_rate = self.estimate(best, link).unwrap_or(0.0);
        for i in 0..self.levels.len() {
            if let Some(r) = self.estimate(i, link) {
                // Strictly better, or as good and cheaper.
                if r > best_rate * 1.05 || (r >= best_rate && i < best) {
                    best = i;
                    best_rate = r;
                }
            }
        }
        self.current = best;
        self.since_probe += 1;
        if self.since_probe >= PROBE_EVERY && self.levels.len() > 1 {
            self.since_probe = 0;
            // The next level other than the current, in turn.
            self.next_probe = (self.next_probe + 1) % self.levels.len();
            if self.next_probe == self.current {
                self.next_probe = (self.next_probe + 1) % self.levels.len();
            }
            self.probing = Some((self.next_probe, PROBE_LEN, self.current));
        }
        self.level()
    }
}

#[cfg(test)]
mod tests {
    // Test code: test figures: small positive ratios of small inputs.
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    use super::*;

    /// Runs `n` batches against a synthetic link and compressor.
    fn run(max: i32, link: f64, speed: f64, ratio: f64, n: u32) -> Vec<i32> {
        let mut c = LevelChooser::new(max);
        let mut used = Vec::new();
        for _ in 0..n {
            let level = c.next_batch();
            used.push(level);
            c.observe_link(link);
            if level > 0 {
                let input = 1 << 20;
                let cpu = Duration::from_secs_f64(input as f64 / speed);
                c.observe_compression(level, input, (input as f64 * ratio) as usize, cpu);
            }
        }
        used
    }

    fn share(used: &[i32], level: i32) -> f64 {
        used.iter().filter(|&&l| l == level).count() as f64 / used.len() as f64
    }

    #[test]
    fn a_fast_link_goes_uncompressed() {
        // 2 GB/s loopback, zstd at 400 MB/s halving the data: sending raw
        // moves 2 GB/s, compressing at most 400 MB/s.
        let used = run(1, 2e9, 400e6, 0.5, 600);
        assert!(share(&used[10..], 0) > 0.9, "{:?}", &used[..20]);
    }

    #[test]
    fn a_slow_link_compresses() {
        // 50 MB/s WAN: compressing to half moves 100 MB/s.
        let used = run(1, 50e6, 400e6, 0.5, 600);
        assert!(share(&used[10..], 1) > 0.9, "{:?}", &used[..20]);
    }

    #[test]
    fn incompressible_memory_goes_raw_even_on_a_slow_link() {
        let used = run(3, 50e6, 300e6, 1.0, 600);
        assert!(share(&used[10..], 0) > 0.9, "{:?}", &used[..20]);
    }

    #[test]
    fn a_higher_level_wins_when_the_link_is_very_slow() {
        // At 5 MB/s, level 3 (slower, tighter) beats level 1. Both levels
        // are modelled at one speed and ratio here except through probing,
        // so give level 3 its own figures.
        let mut c = LevelChooser::new(3);
        let mut used = Vec::new();
        for _ in 0..600 {
            let level = c.next_batch();
            used.push(level);
            c.observe_link(5e6);
            let (speed, ratio) = match level {
                1 => (400e6, 0.5),
                3 => (150e6, 0.35),
                _ => continue,
            };
            let input = 1 << 20;
            let cpu = Duration::from_secs_f64(input as f64 / speed);
            c.observe_compression(level, input, (input as f64 * ratio) as usize, cpu);
        }
        assert!(share(&used[10..], 3) > 0.85, "{:?}", &used[..20]);
    }

    #[test]
    fn one_burst_into_free_buffer_space_does_not_switch_compression_off() {
        let mut c = LevelChooser::new(1);
        for i in 0..200 {
            let level = c.next_batch();
            // A slow link, but every tenth frame went at once.
            c.observe_link(if i % 10 == 0 { 1e10 } else { 20e6 });
            if level > 0 {
                let cpu = Duration::from_secs_f64((1 << 20) as f64 / 300e6);
                c.observe_compression(level, 1 << 20, 1 << 19, cpu);
            }
        }
        assert_eq!(c.next_batch(), 1);
    }

    #[test]
    fn without_compression_allowed_it_never_compresses() {
        assert!(run(0, 1e6, 400e6, 0.1, 200).iter().all(|&l| l == 0));
    }

    #[test]
    fn the_choice_follows_a_link_that_slows_down() {
        let mut c = LevelChooser::new(1);
        let mut last = Vec::new();
        for round in 0..2 {
            let link = if round == 0 { 2e9 } else { 40e6 };
            last.clear();
            for _ in 0..400 {
                let level = c.next_batch();
                last.push(level);
                c.observe_link(link);
                if level > 0 {
                    let cpu = Duration::from_secs_f64((1 << 20) as f64 / 400e6);
                    c.observe_compression(level, 1 << 20, 1 << 19, cpu);
                }
            }
            let want = if round == 0 { 0 } else { 1 };
            assert!(share(&last[100..], want) > 0.9, "round {round}");
        }
    }
}
