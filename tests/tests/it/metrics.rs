//! Prometheus metrics: two agents serve them, a scrape during a migration
//! sees it in progress on both sides, and one after it sees what it did —
//! and nothing of the VM's or the peers' names.

use std::net::SocketAddr;
use std::time::Duration;

use convoy_agent::client::CtlClient;
use convoy_agent::lab::impair::{Direction, Impairment, Relay, RelayConfig};
use convoy_agent::lab::Lab;
use convoy_agent::metrics::MetricsConfig;
use convoy_agent::transport::Choice;
use convoy_protocol::ctl::Outcome;
use convoy_protocol::model::MigrationPlan;
use convoy_tests::{eventually, sim_spec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A scrape, as Prometheus makes it: the status and the body.
async fn scrape(addr: SocketAddr) -> (u16, String) {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), get)
        .await
        .expect("the scrape answers")
        .expect("the scrape reads");
    let text = String::from_utf8(buf).expect("the exposition format is text");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of `series` (name and labels, as rendered) in `body`.
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|r| r.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Each of `want`'s series has its value in `body`.
fn assert_series(body: &str, want: &[(&str, f64)]) {
    for (series, v) in want {
        assert_eq!(value(body, series), Some(*v), "{series}:\n{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_during_and_after_a_migration_shows_it_on_both_agents() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_addr(), free_addr());
    let lab = Lab::start(dir.path(), &["a", "b"], |n, c| {
        c.metrics = Some(MetricsConfig {
            addr: if n == "a" { pa } else { pb },
            allow: vec!["127.0.0.0/8".into()],
        });
    })
    .await
    .unwrap();
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("zebracanary", 64 << 20, 2_000))
        .await
        .unwrap();
    let (status, body) = scrape(pa).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        value(
            &body,
            "convoy_policy_decisions_total{action=\"CreateVm\",decision=\"permit\"}"
        ),
        Some(1.0),
        "{body}"
    );

    // Slowed to a few seconds, so that it can be seen in progress.
    let plan = MigrationPlan {
        bandwidth: Some(6 << 20),
        ..MigrationPlan::default()
    };
    let req = lab.migrate_request("zebracanary", "a", "b", plan).unwrap();
    let mover = tokio::spawn(async move { a.migrate(req, |_| {}).await });
    for addr in [pa, pb] {
        assert!(
            eventually(Duration::from_secs(20), || async {
                value(&scrape(addr).await.1, "convoy_migrations_active") == Some(1.0)
            })
            .await,
            "{addr}: no migration seen in progress: {}",
            scrape(addr).await.1
        );
    }
    let report = mover.await.unwrap().unwrap();
    assert_eq!(report.outcome, Outcome::Completed, "{report:?}");

    let (_, body) = scrape(pa).await;
    assert_series(
        &body,
        &[
            ("convoy_tickets_accepted_total{role=\"source\"}", 1.0),
            ("convoy_migrations_ended_total{outcome=\"completed\"}", 1.0),
            (
                "convoy_migration_downtime_seconds_count{mode=\"precopy\"}",
                1.0,
            ),
            (
                "convoy_migration_duration_seconds_count{mode=\"precopy\",outcome=\"completed\"}",
                1.0,
            ),
            ("convoy_migration_rounds_count{mode=\"precopy\"}", 1.0),
            (
                "convoy_policy_decisions_total{action=\"MigrateOut\",decision=\"permit\"}",
                1.0,
            ),
        ],
    );
    let downtime = value(
        &body,
        "convoy_migration_downtime_seconds_sum{mode=\"precopy\"}",
    )
    .unwrap();
    assert!(
        (downtime - report.downtime_ms / 1e3).abs() < 1e-6,
        "{downtime} {report:?}"
    );
    assert!(value(&body, "convoy_migration_pages_total{encoding=\"zstd\"}").unwrap() > 0.0);
    let transport = report.transport.clone().unwrap();
    let wire = value(
        &body,
        &format!("convoy_migration_wire_bytes_total{{transport=\"{transport}\"}}"),
    )
    .unwrap();
    assert_eq!(wire, report.wire_bytes as f64, "{body}");
    // The link: its round trip, and the packets QUIC sent and lost.
    let link = report.link.unwrap();
    let rtt = value(
        &body,
        &format!("convoy_link_rtt_seconds_sum{{transport=\"{transport}\"}}"),
    )
    .unwrap();
    assert!(
        (rtt - link.rtt_us as f64 / 1e6).abs() < 1e-9,
        "{rtt} {link:?}"
    );
    if transport == "quic" {
        let sent = value(&body, "convoy_link_packets_sent_total").unwrap();
        assert!(
            sent > 100.0 && sent == link.sent_packets.unwrap() as f64,
            "{body}"
        );
        let lost = value(&body, "convoy_link_packets_lost_total").unwrap();
        assert_eq!(lost, link.lost_packets.unwrap() as f64, "{body}");
    }
    assert!(
        value(&body, "convoy_audit_records").unwrap() > 5.0,
        "{body}"
    );
    let head = value(&body, "convoy_audit_last_tree_head_timestamp_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - head).abs() < 120.0, "{head} vs {now}");

    let (_, body_b) = scrape(pb).await;
    assert_series(
        &body_b,
        &[
            ("convoy_tickets_accepted_total{role=\"destination\"}", 1.0),
            // A destination's success is the VM started there.
            ("convoy_migrations_ended_total{outcome=\"started\"}", 1.0),
            (
                "convoy_policy_decisions_total{action=\"MigrateIn\",decision=\"permit\"}",
                1.0,
            ),
        ],
    );
    // The figures name no VM and no agent or operator.
    for b in [&body, &body_b] {
        assert!(
            !b.contains("zebracanary") && !b.contains("spiffe://"),
            "{b}"
        );
    }

    // A refusal: another tenant's operator may not delete the VM.
    let eve = lab.add_operator("eve").unwrap();
    let as_eve = lab.client_as("b", &eve).await.unwrap();
    assert!(as_eve
        .vm_delete("zebracanary".parse().unwrap())
        .await
        .is_err());
    let (_, body_b) = scrape(pb).await;
    assert_eq!(
        value(
            &body_b,
            "convoy_policy_decisions_total{action=\"DeleteVm\",decision=\"deny\"}"
        ),
        Some(1.0),
        "{body_b}"
    );
    // Back to idle once the gauges are next set (every second).
    assert!(
        eventually(Duration::from_secs(10), || async {
            value(&scrape(pa).await.1, "convoy_migrations_active") == Some(0.0)
        })
        .await
    );
    as_eve.close().await;
    lab.shutdown().await;
}

/// A handshake the peer gives up on, as the loser of a QUIC/TCP dial race
/// does, is counted and not audited as a refusal: the agent refused
/// nothing, and every race that TCP wins would leave one against the
/// refusal rate limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_the_peer_gives_up_on_is_counted_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pa = free_addr();
    let lab = Lab::start(dir.path(), &["a"], |_, c| {
        c.metrics = Some(MetricsConfig {
            addr: pa,
            allow: vec!["127.0.0.0/8".into()],
        });
    })
    .await
    .unwrap();
    let a = lab.agent("a").unwrap();
    // QUIC: the agent's answers take half a second to come back and the
    // dialer gives up after a tenth, its Initial sent: it closes.
    let relay = Relay::start(RelayConfig::new(a.addr)).await.unwrap();
    relay.set(
        Direction::ToClient,
        Impairment {
            delay: Duration::from_millis(500),
            ..Impairment::default()
        },
    );
    let dial = CtlClient::connect_with(
        relay.addr(),
        a.id.clone(),
        &lab.operator,
        &lab.trust,
        Choice::Quic,
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(100), dial)
            .await
            .is_err(),
        "the dial gave up before its handshake ended"
    );
    // TCP: connected, then closed before a byte of TLS.
    drop(tokio::net::TcpStream::connect(a.addr).await.unwrap());
    for t in ["quic", "tcp"] {
        let series = format!("convoy_handshakes_abandoned_total{{transport=\"{t}\"}}");
        assert!(
            eventually(Duration::from_secs(10), || async {
                value(&scrape(pa).await.1, &series) == Some(1.0)
            })
            .await,
            "{series}: {}",
            scrape(pa).await.1
        );
    }
    let refused = convoy_tests::refusals_logged(&lab, "a");
    assert!(refused.is_empty(), "{refused:#?}");
    // (A handshake the agent refuses still is one: peers.rs, no
    // certificate and a foreign CA's.)
    lab.shutdown().await;
}
