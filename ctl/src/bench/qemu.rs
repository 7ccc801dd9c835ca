//! `convoyctl bench --backend qemu`: the same real guest migrated, in one
//! run, (a) by QEMU natively over a local unix socket, with no
//! authentication at all (for reference), (b) by QEMU natively with its
//! own TLS (x509 `tls-creds` on both sides, peers verified, over TCP on
//! loopback) — the baseline — and (c) through Convoy: two agents, mutual
//! TLS over the lab's transport, tickets, policies, receipts and audit.
//! Each path ping-pongs one booted guest between two QEMUs `--runs`
//! times; medians.
//!
//! All totals cover the same work: from the decision to migrate (the
//! destination QEMU not yet started) to the guest running at the
//! destination. QEMU's own figures (its total time, downtime and bytes)
//! are shown for every path.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use convoy_agent::backend::qemu::guest::{self, TestGuest};
use convoy_agent::backend::qemu::process::{QemuProcess, QemuSpec};
use convoy_agent::backend::qemu::qmp::event_unix_us;
use convoy_agent::lab::Lab;
use convoy_protocol::ctl::{Accel, Outcome};
use convoy_protocol::model::{MigrationMode, MigrationPlan, PauseParts};
use serde::Serialize;
use serde_json::{json, Value};

use super::proc_cpu::Usage;
use super::{table, Bench};
use crate::conn::Global;
use crate::render;

#[derive(Serialize, Debug, Clone, Copy, Default)]
struct Sample {
    /// Decision to guest running at the destination, ms.
    total_ms: f64,
    /// The guest's downtime, ms: from its `STOP` at the source to its
    /// `RESUME` at the destination (native), or to `Started` back at the
    /// source (Convoy: a little longer, by that message's trip).
    downtime_ms: f64,
    /// QEMU's total-time, ms.
    qemu_total_ms: f64,
    /// QEMU's downtime, ms.
    qemu_downtime_ms: f64,
    /// QEMU's ram.transferred, bytes.
    transferred: u64,
    /// Through Convoy: where the pause went (native: none measured).
    pause: PauseParts,
    /// CPU seconds both QEMUs used over `total_ms` (the source's vCPU
    /// included).
    qemus_cpu_s: f64,
    /// CPU seconds both agents used over `total_ms` (native: none).
    agents_cpu_s: f64,
}

#[derive(Serialize)]
struct Row {
    path: String,
    runs: usize,
    median: Sample,
    throughput_mb_s: f64,
    /// Total time against native TLS's (issue 20's target: ≤ 1.0).
    vs_native_tls_total: f64,
    /// Downtime minus native TLS's, ms (target: ≤ 20).
    downtime_over_native_tls_ms: f64,
    /// The QEMUs' and agents' CPU seconds per GiB QEMU transferred.
    cpu_s_per_gib: f64,
}

/// How a native migration travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Native {
    /// A unix socket, nothing authenticated or encrypted.
    Unix,
    /// QEMU's TLS (x509 credentials, both peers verified) over TCP on
    /// loopback, as between two hosts.
    Tls,
}

/// Runs the QEMU benchmark.
pub async fn run(g: &Global, b: Bench) -> Result<()> {
    let memory = b.memory.unwrap_or(256 << 20);
    if memory % (1 << 20) != 0 || memory < (64 << 20) {
        bail!("--memory must be a whole number of MiB, at least 64MiB, for QEMU");
    }
    let o = b.tuning.options();
    if o.mode != MigrationMode::Precopy {
        bail!("the QEMU benchmark compares pre-copy migrations (--mode precopy)");
    }
    let qemu = guest::find_qemu().map_err(|e| anyhow!(e))?;
    let dir = tempfile::tempdir()?;
    let built = guest::build(&dir.path().join("guest"))
        .map_err(|e| anyhow!("cannot build the test guest: {e}"))?;
    let append = format!("console=ttyS0 quiet panic=-1 convoy.fill={}", b.fill_mib);
    let note = |s: &str| {
        if !g.json {
            eprintln!("{s}");
        }
    };
    let setup = Setup {
        qemu: &qemu,
        guest: &built,
        append: &append,
        memory,
        o: &o,
        runs: b.runs,
        dir: dir.path(),
    };
    note("native QEMU migration over a unix socket …");
    let native_unix = native(&setup, Native::Unix).await?;
    note("native QEMU migration with TLS (x509, peers verified) …");
    convoy_agent::lab::qemu_tls::write_qemu_x509(&dir.path().join("x509"))?;
    let native_tls = native(&setup, Native::Tls).await?;
    note("QEMU migration through Convoy …");
    let (convoy, transport) = through_convoy(&setup).await?;
    let t = median(&native_tls);
    let row = |path: &str, runs: &[Sample]| {
        let m = median(runs);
        Row {
            path: path.into(),
            runs: runs.len(),
            median: m,
            throughput_mb_s: if m.qemu_total_ms > 0.0 {
                m.transferred as f64 / (m.qemu_total_ms / 1e3) / 1e6
            } else {
                0.0
            },
            vs_native_tls_total: m.total_ms / t.total_ms,
            downtime_over_native_tls_ms: m.downtime_ms - t.downtime_ms,
            cpu_s_per_gib: if m.transferred > 0 {
                (m.qemus_cpu_s + m.agents_cpu_s) / (m.transferred as f64 / f64::from(1u32 << 30))
            } else {
                0.0
            },
        }
    };
    let rows = vec![
        row("native (unix socket, no TLS)", &native_unix),
        row("native TLS (x509, peers verified, TCP)", &native_tls),
        row(
            &format!("Convoy ({transport}, mutual TLS, receipts)"),
            &convoy,
        ),
    ];
    let digest_gb_s = digest_rate();
    let through = median(&convoy);
    let carried = through.transferred as f64;
    // Both agents digest every byte they carry; native TLS does not.
    let digest_cpu_s = 2.0 * carried / (digest_gb_s * 1e9);
    if g.json {
        return render::json(&json!({
            "memory_bytes": memory,
            "digest_gb_s": digest_gb_s,
            "digest_cpu_s": digest_cpu_s,
            "fill_mib": b.fill_mib,
            "streams": o.streams,
            "rows": rows,
            "native_runs": native_unix,
            "native_tls_runs": native_tls,
            "convoy_runs": convoy,
        }));
    }
    println!(
        "{} guest, {} MiB of random data, {} ({} runs each, medians)",
        convoy_agent::units::format_bytes(memory),
        b.fill_mib,
        if o.streams > 1 {
            format!("multifd {} channels", o.streams)
        } else {
            "one channel".into()
        },
        b.runs
    );
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.path.clone(),
                format!("{:.0}", r.median.total_ms),
                format!("{:.1}", r.median.downtime_ms),
                format!("{:.0}", r.median.qemu_total_ms),
                format!("{:.0}", r.median.qemu_downtime_ms),
                convoy_agent::units::format_bytes(r.median.transferred),
                format!("{:.0}", r.throughput_mb_s),
                format!("{:.2}", r.vs_native_tls_total),
                format!("{:+.1}", r.downtime_over_native_tls_ms),
                format!("{:.2}", r.median.qemus_cpu_s),
                if r.median.agents_cpu_s > 0.0 {
                    format!("{:.2}", r.median.agents_cpu_s)
                } else {
                    "-".into()
                },
                format!("{:.2}", r.cpu_s_per_gib),
            ]
        })
        .collect();
    print!(
        "{}",
        render::table(
            &[
                "path",
                "total ms",
                "downtime ms",
                "QEMU total ms",
                "QEMU downtime ms",
                "transferred",
                "MB/s",
                "total vs native TLS",
                "downtime vs native TLS, ms",
                "QEMUs CPU s",
                "agents CPU s",
                "CPU s/GiB",
            ],
            &table
        )
    );
    println!(
        "BLAKE3 here, now: {digest_gb_s:.2} GB/s on one core: the two agents' digests of what \
         they carried cost {digest_cpu_s:.2} CPU s of each migration through Convoy"
    );
    let pause = through.pause;
    if pause.measured() {
        // The last round here is QEMU's stop-and-copy and the tunnel's drain.
        println!(
            "Convoy's pause (medians of each part): {}",
            render::pause_parts(&pause)
        );
    }
    Ok(())
}

/// BLAKE3's rate on this machine, GB/s: the best of four digests of 64
/// MiB (the digest the tunnels compute, over a buffer already in memory).
fn digest_rate() -> f64 {
    let buf: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let best = (0..4)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(convoy_protocol::digest::device_state_digest(&buf));
            t.elapsed()
        })
        .min()
        .unwrap_or(Duration::MAX);
    buf.len() as f64 / best.as_secs_f64().max(1e-9) / 1e9
}

/// What both paths migrate, and how.
#[derive(Clone, Copy)]
struct Setup<'a> {
    qemu: &'a Path,
    guest: &'a TestGuest,
    append: &'a str,
    memory: u64,
    o: &'a MigrationPlan,
    runs: u32,
    dir: &'a Path,
}

fn median(v: &[Sample]) -> Sample {
    let pick = |f: fn(&Sample) -> f64| table::median(v.iter().map(f));
    Sample {
        total_ms: pick(|s| s.total_ms),
        downtime_ms: pick(|s| s.downtime_ms),
        qemu_total_ms: pick(|s| s.qemu_total_ms),
        qemu_downtime_ms: pick(|s| s.qemu_downtime_ms),
        transferred: pick(|s| s.transferred as f64) as u64,
        pause: table::median_pause(v.iter().map(|s| &s.pause)),
        qemus_cpu_s: pick(|s| s.qemus_cpu_s),
        agents_cpu_s: pick(|s| s.agents_cpu_s),
    }
}

fn spec(qemu: &Path, g: &TestGuest, append: &str, memory: u64) -> QemuSpec {
    QemuSpec {
        binary: qemu.to_owned(),
        memory_mib: memory >> 20,
        vcpus: 1,
        kernel: Some(g.kernel.clone()),
        initrd: Some(g.initrd.clone()),
        append: append.to_owned(),
        disks: Vec::new(),
        accel: Accel::Tcg,
        extra_args: Vec::new(),
    }
}

async fn booted(log: &Path) -> Result<()> {
    let t = Instant::now();
    while guest::counters(log).len() < 10 {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the guest did not boot in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Native: ping-pong between fresh QEMUs over a unix socket, or with
/// QEMU's TLS over TCP (the credentials in `DIR/x509`).
async fn native(b: &Setup<'_>, how: Native) -> Result<Vec<Sample>> {
    let Setup { o, runs, dir, .. } = *b;
    let spec = spec(b.qemu, b.guest, b.append, b.memory);
    let mut cur = QemuProcess::launch(&spec, &dir.join("native-0"), false).await?;
    booted(&cur.serial_log()).await?;
    let caps = json!({ "capabilities": [{ "capability": "multifd", "state": o.streams > 1 }] });
    let mut samples = Vec::new();
    for i in 1..=runs {
        // The CPU reading first: its scan of /proc stays out of the total.
        let cpu0 = Usage::now();
        let t0 = Instant::now();
        let mut next = QemuProcess::launch(&spec, &dir.join(format!("native-{i}")), true).await?;
        let uri = match how {
            Native::Unix => format!("unix:{}", dir.join(format!("native-{i}.sock")).display()),
            // Port 0: the destination QEMU binds a free one itself, and
            // says which below (a port found free here first could be
            // taken before QEMU binds it).
            Native::Tls => "tcp:127.0.0.1:0".to_owned(),
        };
        let mut uri = json!({ "uri": uri });
        let mut params = json!({
            "downtime-limit": o.max_downtime_ms,
            "max-bandwidth": o.bandwidth.unwrap_or(1 << 40),
        });
        if how == Native::Tls {
            // Each QEMU is a destination once (a server), then a source
            // (a client): one credentials object for each role.
            let x509 = dir.join("x509");
            for (q, id, endpoint) in [
                (&mut next, "tls-in", "server"),
                (&mut cur, "tls-out", "client"),
            ] {
                q.qmp
                    .execute(
                        "object-add",
                        Some(json!({
                            "qom-type": "tls-creds-x509",
                            "id": id,
                            "dir": x509,
                            "endpoint": endpoint,
                            "verify-peer": true,
                        })),
                    )
                    .await?;
            }
            next.qmp
                .execute(
                    "migrate-set-parameters",
                    Some(json!({ "tls-creds": "tls-in" })),
                )
                .await?;
            params["tls-creds"] = json!("tls-out");
            params["tls-hostname"] = json!("localhost");
        }
        if o.streams > 1 {
            params["multifd-channels"] = json!(o.streams);
            next.qmp
                .execute("migrate-set-capabilities", Some(caps.clone()))
                .await?;
            next.qmp
                .execute(
                    "migrate-set-parameters",
                    Some(json!({ "multifd-channels": o.streams })),
                )
                .await?;
        }
        next.qmp
            .execute("migrate-incoming", Some(uri.clone()))
            .await?;
        if how == Native::Tls {
            let listening = next.qmp.execute("query-migrate", None).await?;
            uri = json!({ "uri": format!("tcp:127.0.0.1:{}", listening_port(&listening)?) });
        }
        cur.qmp
            .execute("migrate-set-capabilities", Some(caps.clone()))
            .await?;
        cur.qmp
            .execute("migrate-set-parameters", Some(params))
            .await?;
        cur.qmp.execute("migrate", Some(uri)).await?;
        let info = loop {
            let q = cur.qmp.execute("query-migrate", None).await?;
            match q["status"].as_str() {
                Some("completed") => break q,
                Some("failed" | "cancelled") => bail!("native migration failed: {q}"),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        loop {
            let s = next.qmp.execute("query-status", None).await?;
            if s["status"] == "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        let cpu = Usage::now().since(cpu0);
        // The guest's downtime: from its stop at the source to its resume
        // at the destination (QEMU's own figure ends when the source has
        // sent the last bytes, before the destination loaded them).
        let stop = cur
            .qmp
            .take_events()
            .iter()
            .find(|e| e["event"] == "STOP")
            .and_then(event_unix_us)
            .context("the source QEMU sent no STOP event")?;
        let resume = next
            .qmp
            .wait_event("RESUME", Duration::from_secs(5))
            .await
            .ok()
            .as_ref()
            .and_then(event_unix_us)
            .context("the destination QEMU sent no RESUME event")?;
        let guest_ms = resume.saturating_sub(stop) as f64 / 1e3;
        samples.push(Sample {
            qemus_cpu_s: cpu.children.as_secs_f64(),
            ..native_sample(total_ms, guest_ms, &info)
        });
        cur.quit().await;
        cur = next;
    }
    cur.quit().await;
    Ok(samples)
}

/// The TCP port an incoming QEMU listens on, from its `query-migrate`
/// (`socket-address`, QEMU 4.0 and later).
fn listening_port(q: &Value) -> Result<u16> {
    q["socket-address"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "inet")
        .and_then(|a| a["port"].as_str())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("the destination QEMU names no TCP port it listens on: {q}"))
}

/// A native sample: its total, the guest's downtime (`guest_ms`: stopped
/// at the source to resumed at the destination), and QEMU's final
/// `query-migrate`.
fn native_sample(total_ms: f64, guest_ms: f64, q: &Value) -> Sample {
    Sample {
        total_ms,
        downtime_ms: guest_ms,
        qemu_total_ms: q["total-time"].as_f64().unwrap_or(0.0),
        qemu_downtime_ms: q["downtime"].as_f64().unwrap_or(0.0),
        transferred: q["ram"]["transferred"].as_u64().unwrap_or(0),
        pause: PauseParts::default(),
        qemus_cpu_s: 0.0,
        agents_cpu_s: 0.0,
    }
}

/// Through Convoy: ping-pong between two agents; the samples and the
/// transport that carried them (the lab's, `CONVOY_LAB_TRANSPORT`).
async fn through_convoy(b: &Setup<'_>) -> Result<(Vec<Sample>, String)> {
    let Setup {
        o,
        runs,
        dir,
        memory,
        append,
        ..
    } = *b;
    let lab = Lab::start_qemu(&dir.join("lab"), &["a", "b"], b.qemu, b.guest).await?;
    let a = lab.client("a").await?;
    a.vm_create_qemu(Lab::qemu_test_vm(
        "bench".parse()?,
        memory >> 20,
        append.to_owned(),
    ))
    .await?;
    a.close().await;
    booted(&lab.qemu_serial("a", "bench")).await?;
    let mut samples = Vec::new();
    let mut transport = String::new();
    let mut at = ("a", "b");
    for _ in 0..runs {
        let c = lab.client(at.0).await?;
        let request = lab.migrate_request("bench", at.0, at.1, o.clone())?;
        let cpu0 = Usage::now();
        let r = c.migrate(request, |_| {}).await?;
        let cpu = Usage::now().since(cpu0);
        c.close().await;
        if r.outcome != Outcome::Completed {
            bail!("migration through Convoy: {:?}", r.outcome);
        }
        let q = r
            .qemu
            .as_deref()
            .ok_or_else(|| anyhow!("no QEMU figures"))?;
        if let Some(t) = &r.transport {
            // The source agent may leave multifd out (`--qemu-multifd`).
            transport = match q.multifd_channels {
                0 => format!("{t}, one channel"),
                n => format!("{t}, multifd {n}"),
            };
        }
        samples.push(Sample {
            total_ms: r.total_ms,
            downtime_ms: r.downtime_ms,
            qemu_total_ms: q.total_ms.unwrap_or(0) as f64,
            qemu_downtime_ms: q.downtime_ms.unwrap_or(0) as f64,
            transferred: q.transferred_bytes.unwrap_or(0),
            pause: r.convergence.pause,
            qemus_cpu_s: cpu.children.as_secs_f64(),
            agents_cpu_s: cpu.own.as_secs_f64(),
        });
        at = (at.1, at.0);
    }
    lab.shutdown().await;
    Ok((samples, transport))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_an_incoming_qemu_listens_on_is_read_from_its_answer() {
        // As QEMU 7.2 answers after `migrate-incoming tcp:127.0.0.1:0`.
        let q = json!({ "socket-address": [
            { "port": "39105", "ipv4": true, "host": "127.0.0.1", "type": "inet" }
        ] });
        assert_eq!(listening_port(&q).unwrap(), 39105);
        for bad in [
            json!({}),
            json!({ "socket-address": [{ "type": "unix", "path": "/x" }] }),
            json!({ "socket-address": [{ "type": "inet", "port": "http" }] }),
        ] {
            let e = listening_port(&bad).unwrap_err().to_string();
            assert!(e.contains("names no TCP port"), "{e}");
        }
    }
}
