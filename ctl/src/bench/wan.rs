//! `convoyctl bench --wan`: raw QUIC bulk transfers through the lab's
//! impairment relay (a link of `--link-mbit` with `--rtt` and random
//! `--loss`), one per congestion controller: how much of the link each
//! uses. The baseline is the link's rate; a cell that does not finish in
//! `--cell-timeout` seconds says so.

use std::num::NonZeroU64;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use convoy_agent::lab::impair::{GilbertElliott, Impairment, Loss, Probability, RateLimit};
use convoy_agent::lab::{Lab, Sink};
use convoy_agent::transport::Tuning;
use serde::Serialize;

use super::Bench;
use crate::conn::Global;
use crate::render;

#[derive(Serialize)]
struct Row {
    rtt_ms: u64,
    loss_pct: f64,
    congestion: String,
    bytes: u64,
    /// `None`: not done within the cell's time limit.
    seconds: Option<f64>,
    mbit_s: Option<f64>,
    link_used: Option<f64>,
}

/// `--loss` as random loss (none at 0): each packet alone, or, with a
/// `--loss-burst` of more than 1, in bursts of that many packets on
/// average with the same long-run loss (a Gilbert model: every packet is
/// lost in the bad state, none in the good; the bad state lasts `burst`
/// packets on average and holds `loss` of the time).
pub(super) fn loss_model(loss_pct: f64, burst: f64) -> Result<Loss> {
    if !(burst >= 1.0 && burst.is_finite()) {
        bail!("--loss-burst {burst}: a mean burst length of at least 1 packet");
    }
    if loss_pct <= 0.0 {
        return Ok(Loss::None);
    }
    let Some(p) = Probability::new(loss_pct / 100.0).filter(|p| p.value() < 1.0) else {
        bail!("--loss {loss_pct}: a percentage from 0 to under 100");
    };
    if burst <= 1.0 {
        return Ok(Loss::Bernoulli(p));
    }
    let bad_to_good = 1.0 / burst;
    let good_to_bad = p.value() * bad_to_good / (1.0 - p.value());
    let prob = |v: f64| Probability::new(v).context("a Gilbert model's probability");
    Ok(Loss::GilbertElliott(GilbertElliott {
        good_to_bad: prob(good_to_bad)?,
        bad_to_good: prob(bad_to_good)?,
        loss_good: Probability::ZERO,
        loss_bad: Probability::ONE,
    }))
}

/// How `--loss` is spread, for a table's title.
pub(super) fn loss_words(burst: f64) -> String {
    if burst > 1.0 {
        format!("random loss in bursts of {burst} packets on average")
    } else {
        "random loss".into()
    }
}

/// One direction of the link: half the RTT, the loss, the rate (a queue of
/// one bandwidth-delay product, at least 64 KiB).
fn line(rtt_ms: u64, loss_pct: f64, burst: f64, bytes_per_sec: NonZeroU64) -> Result<Impairment> {
    let loss = loss_model(loss_pct, burst)?;
    let bdp = bytes_per_sec.get().saturating_mul(rtt_ms) / 1000;
    Ok(Impairment {
        delay: Duration::from_millis(rtt_ms / 2),
        loss,
        rate: Some(RateLimit {
            bytes_per_sec,
            burst_bytes: 64 << 10,
            queue_bytes: bdp.max(64 << 10),
        }),
        ..Impairment::default()
    })
}

/// Runs the grid of `--rtt` × `--loss` × `--congestion`.
pub async fn run(g: &Global, b: Bench) -> Result<()> {
    let bytes = b.memory.unwrap_or(64 << 20);
    let Some(rate) = NonZeroU64::new(b.link_mbit.saturating_mul(1_000_000) / 8) else {
        bail!("--link-mbit must be more than 0");
    };
    let dir = tempfile::tempdir()?;
    let lab = Lab::start(dir.path(), &["a", "b"], |_, _| {}).await?;
    let mut rows = Vec::new();
    for &rtt_ms in &b.rtt {
        for &loss_pct in &b.loss {
            // The return path carries acknowledgements: delayed, lossy, not
            // rate-limited.
            let forward = line(rtt_ms, loss_pct, b.loss_burst, rate)?;
            let back = Impairment {
                rate: None,
                ..forward
            };
            for &congestion in &b.congestion {
                if !g.json {
                    eprintln!("{rtt_ms} ms, {loss_pct}% loss, {congestion} …");
                }
                let tuning = Tuning {
                    congestion,
                    ..Tuning::default()
                };
                let limit = Duration::from_secs(b.cell_timeout);
                let run = lab.raw_quic_bulk_with(
                    bytes,
                    b.tuning.streams,
                    Sink::Discard,
                    &tuning,
                    Some((forward, back)),
                );
                let took = match tokio::time::timeout(limit, run).await {
                    Ok(r) => Some(r?),
                    Err(_) => None,
                };
                let secs = took.map(|d| d.as_secs_f64());
                let mbit = secs.map(|s| bytes as f64 * 8.0 / s / 1e6);
                rows.push(Row {
                    rtt_ms,
                    loss_pct,
                    congestion: congestion.to_string(),
                    bytes,
                    seconds: secs,
                    mbit_s: mbit,
                    link_used: mbit.map(|m| m / b.link_mbit as f64),
                });
            }
        }
    }
    lab.shutdown().await;
    if g.json {
        return render::json(&rows);
    }
    println!(
        "raw QUIC bulk, {} MiB on {} streams, through the lab's relay: a {} Mbit/s link \
         (token bucket, one BDP of queue), half the RTT each way, {} both ways",
        super::table::mib(bytes),
        b.tuning.streams,
        b.link_mbit,
        loss_words(b.loss_burst)
    );
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.rtt_ms.to_string(),
                format!("{}", r.loss_pct),
                r.congestion.clone(),
                r.seconds
                    .map_or(format!("> {} s", b.cell_timeout), |s| format!("{s:.1} s")),
                r.mbit_s.map_or("-".into(), |m| format!("{m:.1}")),
                r.link_used
                    .map_or("-".into(), |u| format!("{:.0}%", u * 100.0)),
            ]
        })
        .collect();
    print!(
        "{}",
        render::table(
            &[
                "RTT ms",
                "loss %",
                "controller",
                "time",
                "Mbit/s",
                "link used"
            ],
            &table
        )
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_length_keeps_the_long_run_loss() {
        assert!(matches!(loss_model(0.0, 8.0), Ok(Loss::None)));
        assert!(
            matches!(loss_model(1.0, 1.0), Ok(Loss::Bernoulli(p)) if (p.value() - 0.01).abs() < 1e-12)
        );
        let Ok(Loss::GilbertElliott(ge)) = loss_model(1.0, 8.0) else {
            panic!("a burst length of 8 is a Gilbert model");
        };
        assert!((ge.mean_loss() - 0.01).abs() < 1e-9, "{ge:?}");
        assert!((ge.bad_to_good.value() - 0.125).abs() < 1e-12);
        // Bad flags are refused, not taken for something else.
        assert!(loss_model(1.0, 0.5).is_err());
        assert!(loss_model(1.0, f64::NAN).is_err());
        assert!(loss_model(100.0, 4.0).is_err());
        assert!(loss_model(120.0, 1.0).is_err());
    }
}
