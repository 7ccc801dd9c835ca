//! Output: tables, a live progress bar, and JSON.

use convoy_agent::units::format_bytes;
use convoy_protocol::ctl::{MigrationReport, Outcome, Progress, VmInfo};
use indicatif::{ProgressBar, ProgressStyle};

/// A plain text table with right-aligned numbers.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i == 0 {
                out.push_str(&format!("{c:<w$}"));
            } else {
                out.push_str(&format!("  {c:>w$}"));
            }
        }
        out.push('\n');
    };
    line(headers.iter().map(|h| h.to_string()).collect(), &mut out);
    line(widths.iter().map(|w| "-".repeat(*w)).collect(), &mut out);
    for r in rows {
        line(r.clone(), &mut out);
    }
    out
}

/// The summary of one migration as a two-column table.
pub fn report(r: &MigrationReport) -> String {
    let outcome = match &r.outcome {
        Outcome::Completed => "completed".to_string(),
        Outcome::Aborted(why) => format!("ABORTED: {why} (VM still runs at the source)"),
        Outcome::InDoubt(why) => format!("IN DOUBT: {why} (VM kept paused at the source)"),
        other => format!("{other:?}"),
    };
    let mb_s = if r.total_ms > 0.0 {
        r.memory_bytes as f64 / (r.total_ms / 1e3) / 1e6
    } else {
        0.0
    };
    let mut rows = vec![
        vec!["migration".into(), r.migration.clone()],
        vec!["vm".into(), r.vm.to_string()],
        vec![
            "from → to".into(),
            format!("{} → {}", r.source, r.destination),
        ],
        vec!["outcome".into(), outcome],
        vec![
            "verified".into(),
            if r.verified {
                format!(
                    "yes, {} {}",
                    if r.qemu.is_some() {
                        "stream root"
                    } else {
                        "memory root"
                    },
                    r.memory_root
                        .map(|d| d.to_hex()[..16].to_string())
                        .unwrap_or_default()
                )
            } else {
                "no".into()
            },
        ],
        vec!["total time".into(), format!("{:.1} ms", r.total_ms)],
        vec!["downtime".into(), format!("{:.1} ms", r.downtime_ms)],
        vec![
            "rounds".into(),
            format!(
                "{} ({})",
                r.rounds,
                if r.postcopy.is_some() {
                    "then post-copy"
                } else if r.converged {
                    "converged"
                } else {
                    "round limit"
                }
            ),
        ],
        vec!["guest memory".into(), format_bytes(r.memory_bytes)],
        vec![
            "transport".into(),
            match (r.transport.as_deref(), r.lanes) {
                (None, _) => "none (the destination was not reached)".into(),
                (Some(t), lanes) => {
                    let name = match t {
                        "quic" => "QUIC",
                        "tcp" => "TLS over TCP",
                        other => other,
                    };
                    if lanes > 0 {
                        format!("{name}, {} connections", u32::from(lanes) + 1)
                    } else {
                        name.into()
                    }
                }
            },
        ],
        vec!["bytes on the wire".into(), format_bytes(r.wire_bytes)],
        vec!["guest throughput".into(), format!("{mb_s:.0} MB/s")],
    ];
    if let Some(l) = &r.link {
        rows.push(vec!["link".into(), link(l)]);
    }
    match &r.qemu {
        None => {
            rows.push(vec![
                "pages sent".into(),
                format!(
                    "{} (raw {}, zstd {}, delta {}); zero pages {} (no page bytes)",
                    r.pages_sent,
                    r.encodings.raw,
                    r.encodings.zstd,
                    r.encodings.delta,
                    r.encodings.zero
                ),
            ]);
            for d in &r.disks {
                rows.push(vec![
                    format!("disk {}", d.name),
                    format!(
                        "{}, root {} (verified with the memory)",
                        format_bytes(d.bytes),
                        &d.root.to_hex()[..16]
                    ),
                ]);
            }
            if !r.disks.is_empty() {
                rows.push(vec![
                    "disk blocks sent".into(),
                    format!(
                        "{} of the pages sent (holes and zero blocks skipped)",
                        r.disk_blocks_sent
                    ),
                ]);
            }
            if r.encodings.retained > 0 {
                rows.push(vec![
                    "memory reuse".into(),
                    format!(
                        "{} pages not sent: the destination held them in the image it retained",
                        r.encodings.retained
                    ),
                ]);
            }
            if let Some(pc) = &r.postcopy {
                let f = pc.faults.unwrap_or_default();
                rows.push(vec![
                    "post-copy".into(),
                    format!(
                        "{} pages owed at the switch; {} faults (median {} µs, p99 {} µs); {} pages served on {} fetches",
                        pc.owed, f.faults, f.median_us, f.p99_us, pc.served, pc.fetches
                    ),
                ]);
                if pc.recoveries > 0 {
                    rows.push(vec![
                        "recovered".into(),
                        format!(
                            "the link broke {} time(s) after the switch; resumed on a new connection each time",
                            pc.recoveries
                        ),
                    ]);
                }
            }
            let c = &r.convergence;
            if c.recoveries > 0 {
                rows.push(vec![
                    "recovered".into(),
                    format!(
                        "the link broke {} time(s) in pre-copy; resumed on a new connection each time, \
                         {} pages sent again (those the destination did not hold)",
                        c.recoveries, c.recovery_resent
                    ),
                ]);
            }
            rows.push(vec![
                "convergence".into(),
                format!(
                    "dirty rate {} pages/s; {} pages re-sent, {} hot-page sends held back; throttle {}",
                    c.dirty_rate,
                    c.resent_pages,
                    c.held_back,
                    if c.throttle == 0 {
                        "none".to_string()
                    } else {
                        format!("up to {}%", c.throttle)
                    }
                ),
            ]);
            if c.expected_downtime_ms > 0 || c.round_trip_us > 0 {
                rows.push(vec![
                    "downtime expected".into(),
                    format!(
                        "{} ms at pre-copy's last decision, of which the handover's two round trips {:.1} ms \
                         (shortest control round trip {:.1} ms), durable records {:.1} ms \
                         and the destination's apply lag {:.1} ms",
                        c.expected_downtime_ms,
                        2.0 * c.round_trip_us as f64 / 1000.0,
                        c.round_trip_us as f64 / 1000.0,
                        c.records_us as f64 / 1000.0,
                        c.apply_lag_us as f64 / 1000.0
                    ),
                ]);
            }
            let p = &c.pause;
            if p.measured() {
                rows.push(vec!["pause".into(), pause_parts(p)]);
            }
        }
        Some(q) => {
            let ms = |v: Option<u64>| v.map_or("?".into(), |v| format!("{v} ms"));
            rows.push(vec![
                "QEMU's figures".into(),
                format!(
                    "{} ({}): total {}, downtime {}, {} transferred",
                    q.status,
                    q.mode,
                    ms(q.total_ms),
                    ms(q.downtime_ms),
                    q.transferred_bytes.map_or("?".into(), format_bytes)
                ),
            ]);
            rows.push(vec![
                "channels carried".into(),
                format!(
                    "{} (multifd {}, disks {})",
                    q.channels.len(),
                    q.multifd_channels,
                    q.disks_copied
                ),
            ]);
            for c in &q.channels {
                rows.push(vec![
                    format!("  {}", c.kind),
                    format!(
                        "{} out (BLAKE3 {}), {} back (BLAKE3 {})",
                        format_bytes(c.out_bytes),
                        &c.out.to_hex()[..16],
                        format_bytes(c.back_bytes),
                        &c.back.to_hex()[..16]
                    ),
                ]);
            }
        }
    }
    kv(&rows)
}

/// Key-value lines, keys padded.
pub fn kv(rows: &[Vec<String>]) -> String {
    let w = rows.iter().map(|r| r[0].chars().count()).max().unwrap_or(0);
    rows.iter()
        .map(|r| format!("{:<w$}  {}\n", r[0], r[1..].join(" ")))
        .collect()
}

/// A table of VMs.
pub fn vms(v: &[VmInfo]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|vm| {
            vec![
                vm.name.to_string(),
                vm.backend.clone(),
                vm.attributes.tenant.clone(),
                vm.attributes.security_level.to_string(),
                format!("{:?}", vm.state),
                format_bytes(vm.memory_bytes),
                vm.counter.to_string(),
                vm.dirty_pages_per_sec.to_string(),
                vm.arrived_from.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "name",
            "backend",
            "tenant",
            "level",
            "state",
            "memory",
            "counter",
            "dirty/s",
            "arrived from",
        ],
        &rows,
    )
}

/// A live progress bar fed by [`Progress`] updates.
pub struct Bar {
    bar: ProgressBar,
    /// With `--json`: progress as JSON lines on stderr instead, at most
    /// one per [`JSON_EVERY`] besides each change of phase (the last line
    /// printed: when, and its phase).
    json: Option<std::sync::Mutex<Option<(std::time::Instant, String)>>>,
}

/// The least time between two JSON progress lines of one phase.
const JSON_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

impl Bar {
    /// A bar on stderr; with `json`, JSON lines on stderr instead
    /// (`{"progress": {...}}`), stdout being the report's.
    pub fn new(json: bool) -> Bar {
        let bar = if json {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(1)
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} pages  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Bar {
            bar,
            json: json.then(Default::default),
        }
    }

    /// Shows one update.
    pub fn update(&self, p: &Progress) {
        if let Some(last) = &self.json {
            let mut last = last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = last
                .as_ref()
                .is_none_or(|(at, phase)| *phase != p.phase || at.elapsed() >= JSON_EVERY);
            if due {
                if let Ok(line) = serde_json::to_string(&serde_json::json!({ "progress": p })) {
                    eprintln!("{line}");
                }
                *last = Some((std::time::Instant::now(), p.phase.clone()));
            }
            return;
        }
        self.bar.set_length(p.total_pages.max(1));
        self.bar.set_position(p.pages_sent.min(p.total_pages));
        self.bar.set_message(format!(
            "{} round {} · {} dirty · {:.0} MB/s",
            p.phase,
            p.round,
            p.remaining_pages,
            p.rate_bytes_per_sec as f64 / 1e6
        ));
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Bytes as MiB, one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// Prints a value as pretty JSON.
pub fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `RTT 0.3 ms; 12 of 80 310 packets lost (0.015%)`, or over TCP `RTT
/// 0.3 ms (control round trip)`.
fn link(l: &convoy_protocol::ctl::LinkReport) -> String {
    // CAST: microseconds and packet counts, shown rounded.
    #[allow(clippy::cast_precision_loss)]
    let rtt = l.rtt_us as f64 / 1e3;
    match (l.sent_packets, l.lost_packets) {
        (Some(sent), Some(lost)) => {
            #[allow(clippy::cast_precision_loss)]
            let pct = if sent > 0 {
                lost as f64 * 100.0 / sent as f64
            } else {
                0.0
            };
            format!("RTT {rtt:.1} ms; {lost} of {sent} packets lost ({pct:.3}%)")
        }
        _ => format!("RTT {rtt:.1} ms (control round trip)"),
    }
}

/// A pre-copy pause in its parts: `last round 12.1 ms (pause and device
/// state 0.1), verify 3.0 ms (last pages 0.2, root check 0.4), commit 1.2
/// ms, start 2.5 ms (record 0.5, VM start 0.6); round trips, messages and
/// receipts 3.1 ms` (a finer part not measured: left out).
pub fn pause_parts(p: &convoy_protocol::model::PauseParts) -> String {
    // CAST: microseconds of one pause, exact in f64.
    #[allow(clippy::cast_precision_loss)]
    let ms = |us: u64| us as f64 / 1000.0;
    let within = |parts: &[(&str, u64)]| {
        let shown: Vec<String> = parts
            .iter()
            .filter(|(_, us)| *us > 0)
            .map(|(name, us)| format!("{name} {:.1}", ms(*us)))
            .collect();
        if shown.is_empty() {
            String::new()
        } else {
            format!(" ({})", shown.join(", "))
        }
    };
    let reported = p.drain_us + p.root_check_us + p.record_us + p.vm_start_us > 0;
    format!(
        "last round {:.1} ms{}, verify {:.1} ms{}, commit {:.1} ms, start {:.1} ms{}{}",
        ms(p.last_round_us),
        within(&[("pause and device state", p.device_state_us)]),
        ms(p.verify_us),
        within(&[("last pages", p.drain_us), ("root check", p.root_check_us)]),
        ms(p.commit_us),
        ms(p.start_us),
        within(&[("record", p.record_us), ("VM start", p.vm_start_us)]),
        if reported {
            format!(
                "; round trips, messages and receipts {:.1} ms",
                ms(p.exchanges_us())
            )
        } else {
            String::new()
        }
    )
}
