//! CPU time of this process and of the QEMUs it runs, from
//! `/proc/PID/stat`: what `bench --backend qemu` charges each path with.
//! The agents of the QEMU lab run in this process; the QEMUs are its
//! children (started by the bench itself, or by those agents).

use std::time::Duration;

/// CPU time used so far: by this process's own threads, and by its QEMU
/// children (living ones, and those it has already waited for).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// This process (in the QEMU lab: both agents).
    pub own: Duration,
    /// Its children: QEMU processes, living or reaped.
    pub children: Duration,
}

impl Usage {
    /// Now. A field that cannot be read counts as zero: a reading is a
    /// figure in a table, never a decision.
    pub fn now() -> Usage {
        let tick = clock_tick();
        let me = std::process::id();
        let (own, reaped) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| stat_times(&s))
            .map_or((0, 0), |t| (t.own, t.reaped));
        let mut living = 0;
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    continue;
                };
                if let Some(t) = stat_times(&s).filter(|t| t.parent == me) {
                    living += t.own;
                }
            }
        }
        Usage {
            own: tick * u32::try_from(own).unwrap_or(u32::MAX),
            children: tick * u32::try_from(living + reaped).unwrap_or(u32::MAX),
        }
    }

    /// What was used between `earlier` and `self`.
    pub fn since(self, earlier: Usage) -> Usage {
        Usage {
            own: self.own.saturating_sub(earlier.own),
            children: self.children.saturating_sub(earlier.children),
        }
    }
}

/// One clock tick of `/proc/PID/stat`'s times.
fn clock_tick() -> Duration {
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Duration::from_nanos(1_000_000_000 / hz)
}

/// The fields of one `/proc/PID/stat` line that [`Usage`] needs, in ticks.
#[derive(Debug, PartialEq, Eq)]
struct StatTimes {
    parent: u32,
    /// utime + stime.
    own: u64,
    /// cutime + cstime: children waited for.
    reaped: u64,
}

/// Parses a `/proc/PID/stat` line; the command name (field 2) may hold
/// spaces and parentheses, so the fields are counted after its last `)`.
fn stat_times(line: &str) -> Option<StatTimes> {
    let rest = &line[line.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (3), ppid (4), …, utime (14), stime (15),
    // cutime (16), cstime (17).
    let n = |i: usize| f.get(i - 3)?.parse::<u64>().ok();
    Some(StatTimes {
        parent: u32::try_from(n(4)?).ok()?,
        own: n(14)? + n(15)?,
        reaped: n(16)? + n(17)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_past_a_name_with_spaces_and_parentheses() {
        let line = "4242 (qemu (x) 1) S 77 4242 4242 0 -1 4194560 1 0 0 0 \
                    150 25 7 3 20 0 5 0 100 0 0";
        assert_eq!(
            stat_times(line),
            Some(StatTimes {
                parent: 77,
                own: 175,
                reaped: 10,
            })
        );
        assert_eq!(stat_times("4242 (cut"), None);
        assert_eq!(stat_times("4242 (q) S x 1 1 0"), None);
    }

    #[test]
    fn this_process_s_own_time_grows_as_it_works() {
        // Works until the reading has grown by 50 ms, however loaded the
        // machine: only a reading that never grows fails.
        let before = Usage::now();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while Usage::now().since(before).own < Duration::from_millis(50) {
            assert!(t.elapsed() < Duration::from_secs(60), "no CPU time read");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
    }
}
