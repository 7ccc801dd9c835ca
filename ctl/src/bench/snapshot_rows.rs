//! The rows of `convoyctl bench --snapshot`: each operation's runs
//! gathered ([`Samples`]) and reduced to medians, ratios and rates
//! ([`Row`]), as the table ([`HEADERS`], [`Row::cells`]), the JSON and the
//! chart show them.

use serde::Serialize;

use super::table::{median, mib};

/// One row of the table: an operation on one content, medians of the
/// runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// What was done, and where.
    pub operation: String,
    /// What the VM's memory held.
    pub content: String,
    /// Bytes of memory the snapshot stands for.
    pub vm_bytes: u64,
    /// Bytes of its distinct stored chunks (what the baseline moves).
    pub stored_bytes: u64,
    /// Runs measured.
    pub runs: usize,
    /// Convoy's time, median.
    pub convoy_ms: f64,
    /// The plain transfer's time, median (none for the CPU-only rows).
    pub plain_ms: Option<f64>,
    /// Convoy's throughput over the plain one's, both by stored bytes.
    pub ratio_stored: Option<f64>,
    /// Convoy's throughput by VM bytes over the plain one's by stored
    /// bytes (what an operator sees: a VM moved, against the store's
    /// rate).
    pub ratio_vm: Option<f64>,
    /// Convoy, MB/s of VM bytes.
    pub vm_mb_s: f64,
    /// Convoy, MB/s of stored bytes.
    pub stored_mb_s: f64,
    /// The plain transfer, MB/s.
    pub plain_mb_s: Option<f64>,
}

impl Row {
    /// A row from the runs' times in seconds (`plain` empty for a row
    /// without a baseline).
    pub fn new(
        operation: &str,
        content: &str,
        (vm_bytes, stored_bytes): (u64, u64),
        convoy: &[f64],
        plain: &[f64],
    ) -> Row {
        let c = median(convoy.iter().copied()).max(1e-9);
        let rate = |bytes: u64, secs: f64| bytes as f64 / secs / 1e6;
        let p = (!plain.is_empty()).then(|| median(plain.iter().copied()).max(1e-9));
        Row {
            operation: operation.to_owned(),
            content: content.to_owned(),
            vm_bytes,
            stored_bytes,
            runs: convoy.len(),
            convoy_ms: c * 1e3,
            plain_ms: p.map(|p| p * 1e3),
            ratio_stored: p.map(|p| p / c),
            ratio_vm: p.map(|p| rate(vm_bytes, c) / rate(stored_bytes, p)),
            vm_mb_s: rate(vm_bytes, c),
            stored_mb_s: rate(stored_bytes, c),
            plain_mb_s: p.map(|p| rate(stored_bytes, p)),
        }
    }

    /// Whether Convoy moved the stored bytes at 0.8× the plain rate or
    /// better (none for a CPU-only row).
    pub fn meets_target(&self) -> Option<bool> {
        self.ratio_stored.map(|r| r >= 0.8)
    }

    /// The row's table cells, in [`HEADERS`] order.
    pub fn cells(&self) -> Vec<String> {
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or_else(|| "-".into(), f);
        vec![
            self.operation.clone(),
            self.content.clone(),
            mib(self.vm_bytes),
            mib(self.stored_bytes),
            format!("{:.0}", self.convoy_ms),
            opt(self.plain_ms, &|v| format!("{v:.0}")),
            opt(self.ratio_stored, &|v| format!("{v:.2}x")),
            opt(self.ratio_vm, &|v| format!("{v:.2}x")),
            format!("{:.0}", self.vm_mb_s),
            format!("{:.0}", self.stored_mb_s),
            opt(self.plain_mb_s, &|v| format!("{v:.0}")),
            match self.meets_target() {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "-".into(),
            },
        ]
    }
}

/// The table's columns.
pub const HEADERS: [&str; 12] = [
    "operation",
    "content",
    "VM MiB",
    "stored MiB",
    "Convoy ms",
    "plain ms",
    "ratio (stored)",
    "ratio (VM)",
    "Convoy VM MB/s",
    "Convoy stored MB/s",
    "plain MB/s",
    ">= 0.8x",
];

/// One operation on one content: its sizes and its runs' times
/// (seconds).
struct Series {
    operation: String,
    content: String,
    bytes: (u64, u64),
    convoy: Vec<f64>,
    plain: Vec<f64>,
}

/// The series of a bench, in the order first measured.
#[derive(Default)]
pub struct Samples {
    series: Vec<Series>,
}

impl Samples {
    /// Adds one run of `op` on `content`: Convoy's seconds and the
    /// plain transfer's (none for a CPU-only row).
    pub fn add(
        &mut self,
        op: &str,
        content: &str,
        bytes: (u64, u64),
        convoy: f64,
        plain: Option<f64>,
    ) {
        let i = match self
            .series
            .iter()
            .position(|s| s.operation == op && s.content == content)
        {
            Some(i) => i,
            None => {
                self.series.push(Series {
                    operation: op.into(),
                    content: content.into(),
                    bytes,
                    convoy: Vec::new(),
                    plain: Vec::new(),
                });
                self.series.len() - 1
            }
        };
        let s = &mut self.series[i];
        s.convoy.push(convoy);
        s.plain.extend(plain);
    }

    /// The rows, medians of the runs.
    pub fn rows(&self) -> Vec<Row> {
        self.series
            .iter()
            .map(|s| Row::new(&s.operation, &s.content, s.bytes, &s.convoy, &s.plain))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_takes_the_medians_and_compares_rates_by_stored_and_vm_bytes() {
        // 100 MB of VM stored as 50 MB; Convoy 2 s, plain 1 s (medians).
        let r = Row::new(
            "push VM -> file",
            "mixed",
            (100_000_000, 50_000_000),
            &[2.0, 9.0, 1.5],
            &[1.0, 0.5, 3.0],
        );
        assert_eq!(r.runs, 3);
        assert_eq!(r.convoy_ms, 2000.0);
        assert_eq!(r.plain_ms, Some(1000.0));
        assert_eq!(r.ratio_stored, Some(0.5));
        assert_eq!(r.ratio_vm, Some(1.0));
        assert_eq!((r.vm_mb_s, r.stored_mb_s), (50.0, 25.0));
        assert_eq!(r.plain_mb_s, Some(50.0));
        assert_eq!(r.meets_target(), Some(false));
        let cells = r.cells();
        assert_eq!(cells.len(), HEADERS.len());
        assert_eq!(cells[6], "0.50x");
        assert_eq!(cells[7], "1.00x");
        assert_eq!(cells[11], "no");
    }

    #[test]
    fn a_cpu_only_row_has_no_baseline() {
        let r = Row::new("seal only", "random", (1 << 20, 1 << 20), &[0.5], &[]);
        assert_eq!(
            (r.plain_ms, r.ratio_stored, r.meets_target()),
            (None, None, None)
        );
        assert_eq!(r.cells()[5], "-");
    }

    #[test]
    fn samples_gather_runs_by_operation_and_content_in_first_seen_order() {
        let mut s = Samples::default();
        s.add("push", "mixed", (10, 5), 1.0, Some(2.0));
        s.add("pull", "mixed", (10, 5), 3.0, Some(4.0));
        s.add("push", "mixed", (10, 5), 5.0, Some(6.0));
        s.add("push", "random", (10, 10), 7.0, None);
        let rows = s.rows();
        let keys: Vec<_> = rows
            .iter()
            .map(|r| (r.operation.as_str(), r.content.as_str(), r.runs))
            .collect();
        assert_eq!(
            keys,
            [
                ("push", "mixed", 2),
                ("pull", "mixed", 1),
                ("push", "random", 1)
            ]
        );
        assert_eq!(rows[0].convoy_ms, 5000.0);
        assert_eq!(rows[2].plain_ms, None);
    }
}
