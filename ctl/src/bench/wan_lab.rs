//! `convoyctl bench --wan`: migrations across the lab's WAN of network
//! namespaces (a `--link-mbit` link by `tbf`, half of each `--rtt` each
//! way and random `--loss` both ways by the TUN relay), one per RTT, loss
//! and `--transports`; beside each, in the same run through the same
//! WAN, a raw bulk transfer of as many bytes over the transport the
//! migration used, so the ratio is Convoy's and not the lab's. Needs root.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use convoy_agent::lab::impair::Impairment;
use convoy_agent::lab::wan::WanConfig;
use convoy_agent::lab::{BulkPath, Lab, Sink};
use convoy_agent::transport::{Choice, Kind, Tuning};
use convoy_protocol::ctl::{ContentProfile, Outcome};
use convoy_protocol::page::EncodingStats;
use serde::Serialize;

use super::Bench;
use crate::conn::Global;
use crate::render;

#[derive(Serialize)]
struct Row {
    rtt_ms: u64,
    loss_pct: f64,
    transport: String,
    /// The transport the migration used (`auto` races).
    used: Option<String>,
    memory_bytes: u64,
    outcome: String,
    seconds: Option<f64>,
    downtime_ms: Option<f64>,
    wire_bytes: Option<u64>,
    /// Bytes the link carried towards b (its `tbf`'s count) per second,
    /// over the link's rate.
    link_used: Option<f64>,
    /// Packets the link's queue dropped towards b during the migration.
    link_drops: Option<u64>,
    /// Packets the kernel dropped before the relay read them.
    relay_drops: Option<u64>,
    /// The raw transfer's rate over the same transport, Mbit/s.
    raw_mbit_s: Option<f64>,
    /// How the pages went (adaptive compression's choice).
    encodings: Option<EncodingStats>,
}

/// The pages by encoding, in shares of all those sent: what adaptive
/// compression chose for the link.
fn encoding_cell(e: &EncodingStats) -> String {
    let all = (e.zero + e.raw + e.zstd + e.delta + e.retained).max(1) as f64;
    let pct = |n: u64| n as f64 * 100.0 / all;
    format!(
        "zero {:.0}% · zstd {:.0}% · raw {:.0}%{}",
        pct(e.zero),
        pct(e.zstd),
        pct(e.raw),
        if e.delta > 0 {
            format!(" · delta {:.0}%", pct(e.delta))
        } else {
            String::new()
        }
    )
}

/// One direction: half the RTT and the loss (the rate is `tbf`'s).
/// The kernel's TCP congestion controller, which TLS over TCP uses: the
/// lab's namespaces take the host's at their creation.
fn kernel_tcp_congestion() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").map_or_else(
        |_| "unknown".into(),
        |s| format!("the kernel's {}", s.trim()),
    )
}

fn line(rtt_ms: u64, loss_pct: f64, burst: f64) -> Result<Impairment> {
    Ok(Impairment {
        delay: Duration::from_millis(rtt_ms / 2),
        loss: super::wan::loss_model(loss_pct, burst)?,
        ..Impairment::default()
    })
}

/// Runs the grid of `--rtt` × `--loss` × `--transports`.
pub async fn run(g: &Global, b: Bench) -> Result<()> {
    let bytes = b.memory.unwrap_or(128 << 20);
    if b.link_mbit == 0 {
        bail!("--link-mbit must be more than 0");
    }
    let link_bits = b.link_mbit.saturating_mul(1_000_000);
    let limit = Duration::from_secs(b.cell_timeout);
    let congestion = b.quic_congestion;
    let (content, content_name) = match b.wan_content.as_str() {
        "mixed" => (ContentProfile::Mixed, "mixed"),
        _ => (ContentProfile::Random, "random"),
    };
    let mut rows = Vec::new();
    for &choice in &b.transports {
        let dir = tempfile::tempdir()?;
        let config = WanConfig {
            rate_bits: Some(link_bits),
            ..WanConfig::default()
        };
        let mut lab = Lab::start_wan(dir.path(), &config, |_, cfg| {
            cfg.transport = choice;
            cfg.tuning.congestion = congestion;
        })
        .await
        .context("the WAN lab (network namespaces; needs root and iproute2)")?;
        lab.transport = choice;
        let a = lab.client("a").await?;
        let bclient = lab.client("b").await?;
        for &rtt_ms in &b.rtt {
            for &loss_pct in &b.loss {
                let l = line(rtt_ms, loss_pct, b.loss_burst)?;
                let wan = lab.wan().context("a WAN lab")?;
                wan.set(l, l);
                if !g.json {
                    eprintln!("{rtt_ms} ms, {loss_pct}% loss, {choice} …");
                }
                let name = format!("wan-{rtt_ms}-{}", rows.len());
                let mut spec = Lab::sim_test_vm(name.parse()?, bytes, 0);
                spec.content = content;
                a.vm_create(spec).await?;
                let req = lab.migrate_request(&name, "a", "b", b.tuning.options())?;
                let before = wan.link_counters(true)?;
                let relay_before = wan.relay_drops()?;
                let report = tokio::time::timeout(limit, a.migrate(req, |_| {})).await;
                let mut row = Row {
                    rtt_ms,
                    loss_pct,
                    transport: choice.to_string(),
                    used: None,
                    memory_bytes: bytes,
                    outcome: format!("> {} s", b.cell_timeout),
                    seconds: None,
                    downtime_ms: None,
                    wire_bytes: None,
                    link_used: None,
                    link_drops: None,
                    relay_drops: None,
                    raw_mbit_s: None,
                    encodings: None,
                };
                let mut kind = match choice {
                    Choice::Tcp => Kind::Tcp,
                    Choice::Quic | Choice::Auto => Kind::Quic,
                };
                match report {
                    Ok(Ok(r)) => {
                        let secs = r.total_ms / 1000.0;
                        row.outcome = match r.outcome {
                            Outcome::Completed if r.verified => "verified".into(),
                            other => format!("{other:?}"),
                        };
                        row.seconds = Some(secs);
                        row.downtime_ms = Some(r.downtime_ms);
                        row.wire_bytes = Some(r.wire_bytes);
                        row.encodings = Some(r.encodings);
                        let after = wan.link_counters(true)?;
                        let carried = after.bytes.saturating_sub(before.bytes);
                        row.link_used =
                            Some(carried as f64 * 8.0 / secs.max(1e-9) / link_bits as f64);
                        row.link_drops = Some(after.dropped.saturating_sub(before.dropped));
                        row.relay_drops = Some(wan.relay_drops()?.saturating_sub(relay_before));
                        if r.transport.as_deref() == Some("tcp") {
                            kind = Kind::Tcp;
                        }
                        row.used = r.transport;
                        let _ = bclient.vm_delete(name.parse()?).await;
                    }
                    Ok(Err(e)) => row.outcome = format!("failed: {e}"),
                    // Timed out: the migration is aborted when the
                    // operator's connection goes, below.
                    Err(_) => {}
                }
                let tuning = Tuning {
                    congestion,
                    ..Tuning::default()
                };
                let raw = lab.raw_bulk_over(
                    bytes,
                    b.tuning.streams,
                    b.tuning.connections,
                    Sink::Discard,
                    &tuning,
                    kind,
                    BulkPath::Wan,
                );
                if let Ok(Ok(d)) = tokio::time::timeout(limit, raw).await {
                    row.raw_mbit_s = Some(bytes as f64 * 8.0 / d.as_secs_f64() / 1e6);
                }
                let _ = a.vm_delete(name.parse()?).await;
                rows.push(row);
            }
        }
        a.close().await;
        bclient.close().await;
        lab.shutdown().await;
    }
    if g.json {
        return render::json(&rows);
    }
    println!(
        "migrations of an idle {} MiB VM of {content_name} memory across the WAN lab (network \
         namespaces; tbf {} Mbit/s each way, half the RTT each way and {} both ways \
         by the TUN relay; QUIC controller {congestion}; TCP controller {}; downtime target {} \
         ms; {} streams over \
         {} connection(s)); raw: {} MiB of bulk over the same transport, streams and \
         connections through the same WAN. link used: what the link's tbf put on the wire towards \
         b per second over its rate; queue drops: packets tbf dropped; relay drops: packets the \
         kernel dropped before the relay read them (the lab's loss, not the link's); of raw: memory moved per \
         second over the raw rate (above 100% when compression pays); pages: how the pages \
         went, as adaptive compression chose",
        super::table::mib(bytes),
        b.link_mbit,
        super::wan::loss_words(b.loss_burst),
        kernel_tcp_congestion(),
        b.tuning.max_downtime,
        b.tuning.streams,
        b.tuning.connections,
        super::table::mib(bytes),
    );
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let used = r.used.as_deref().unwrap_or("-");
            let util = r
                .link_used
                .map_or("-".into(), |u| format!("{:.0}%", u * 100.0));
            // Memory moved per second against the raw transfer's rate.
            let migration_mbit = r
                .seconds
                .map(|s| r.memory_bytes as f64 * 8.0 / s.max(1e-9) / 1e6);
            let ratio = migration_mbit
                .zip(r.raw_mbit_s)
                .map_or("-".into(), |(m, raw)| format!("{:.0}%", m / raw * 100.0));
            vec![
                r.rtt_ms.to_string(),
                format!("{}", r.loss_pct),
                format!("{} ({used})", r.transport),
                r.outcome.clone(),
                r.seconds.map_or("-".into(), |s| format!("{s:.1} s")),
                r.downtime_ms.map_or("-".into(), |d| format!("{d:.0} ms")),
                r.wire_bytes.map_or("-".into(), |w| {
                    format!("{:.1}", w as f64 / f64::from(1 << 20))
                }),
                util,
                r.link_drops.map_or("-".into(), |d| d.to_string()),
                r.relay_drops.map_or("-".into(), |d| d.to_string()),
                r.raw_mbit_s.map_or("-".into(), |m| format!("{m:.1}")),
                ratio,
                r.encodings.as_ref().map_or("-".into(), encoding_cell),
            ]
        })
        .collect();
    print!(
        "{}",
        render::table(
            &[
                "RTT ms",
                "loss %",
                "transport (used)",
                "outcome",
                "total",
                "downtime",
                "wire MiB",
                "link used",
                "queue drops",
                "relay drops",
                "raw Mbit/s",
                "of raw",
                "pages",
            ],
            &table
        )
    );
    Ok(())
}
