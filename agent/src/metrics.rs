//! Prometheus metrics, opt-in (`convoy-agent --metrics-addr ADDR`).
//!
//! Each agent holds its own recorder (never the process-global one of the
//! `metrics` facade), so agents sharing a process keep their figures
//! apart, and serves it on its own scrape endpoint (the exporter's HTTP
//! listener, plain HTTP, optionally limited to `--metrics-allow` networks).
//! Most figures are derived from the events the agent audits
//! ([`Metrics::audited`], one place: what is counted is what the audit log
//! is given); a source's
//! migration report adds the timings and bytes ([`Metrics::migrated`]).
//! Labels take bounded values only — modes, outcomes, reason classes,
//! policy actions — never a VM's or a peer's name: the endpoint serves no
//! VM data.

use std::net::SocketAddr;

use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::{MigrationReport, Outcome};
use metrics::{Key, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

/// Histogram buckets for durations (seconds).
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];
/// Histogram buckets for rounds.
const ROUNDS: &[f64] = &[1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric: its kind, name, unit and help text.
const DESCRIPTIONS: &[(Kind, &str, Option<Unit>, &str)] = &[
    (Kind::Counter, "convoy_tickets_accepted_total", None, "Operators' tickets this agent accepted, by role (a source accepts one before it checks the VM)."),
    (Kind::Counter, "convoy_migrations_ended_total", None, "Migrations that ended on this agent, by outcome."),
    (Kind::Counter, "convoy_refusals_total", None, "Requests, connections and streams refused, by reason."),
    (Kind::Counter, "convoy_handshakes_abandoned_total", None, "Handshakes the peer gave up on before they finished (the loser of a QUIC/TCP dial race, a port probe), by transport; not refusals."),
    (Kind::Counter, "convoy_policy_decisions_total", None, "Policy decisions, by action and decision."),
    (Kind::Counter, "convoy_snapshot_operations_total", None, "Snapshot operations done, by operation."),
    (Kind::Counter, "convoy_in_doubt_resolutions_total", None, "Unfinished migrations looked at or resolved, by role."),
    (Kind::Counter, "convoy_migration_pages_total", None, "Pages and blocks a source sent, by encoding."),
    (Kind::Counter, "convoy_migration_wire_bytes_total", Some(Unit::Bytes), "Bytes a source's connections carried, by transport."),
    (Kind::Histogram, "convoy_migration_duration_seconds", Some(Unit::Seconds), "A source's migrations, proposal to end, by mode and outcome."),
    (Kind::Histogram, "convoy_migration_downtime_seconds", Some(Unit::Seconds), "Completed migrations: the VM paused at the source until it ran at the destination, by mode."),
    (Kind::Histogram, "convoy_migration_rounds", None, "Copy rounds of a source's completed migrations, by mode."),
    (Kind::Histogram, "convoy_postcopy_fault_latency_seconds", Some(Unit::Seconds), "Median post-copy fault latency of each completed post-copy migration."),
    (Kind::Histogram, "convoy_link_rtt_seconds", Some(Unit::Seconds), "The round-trip time of each source's migration link at its end (QUIC's smoothed estimate; over TCP the shortest control round trip), by transport."),
    (Kind::Counter, "convoy_link_packets_sent_total", None, "QUIC packets a source's migrations sent."),
    (Kind::Counter, "convoy_link_packets_lost_total", None, "Of those, declared lost by QUIC's loss detection."),
    (Kind::Gauge, "convoy_audit_records", None, "Records in this agent's audit log."),
    (Kind::Gauge, "convoy_audit_last_tree_head_timestamp_seconds", Some(Unit::Seconds), "When the audit log's last tree head was signed (Unix time)."),
    (Kind::Gauge, "convoy_migrations_active", None, "Migrations in progress on this agent, either role."),
    (Kind::Gauge, "convoy_budget_migrations", None, "Migration connections (lanes included: a post-copy migration holds two) in the agent's migration budget."),
];

/// Where and to whom an agent serves its metrics.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// The scrape endpoint's address (`127.0.0.1:9464` keeps it on the
    /// host).
    pub addr: SocketAddr,
    /// Networks allowed to scrape (`10.0.0.0/8`, `192.0.2.7`); empty:
    /// anyone who reaches the address.
    pub allow: Vec<String>,
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint {addr}: {why}")]
pub struct MetricsError {
    addr: SocketAddr,
    why: String,
}

/// An agent's metrics and its scrape endpoint (stopped when dropped).
pub struct Metrics {
    recorder: PrometheusRecorder,
    exporter: tokio::task::JoinHandle<()>,
    addr: SocketAddr,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        self.exporter.abort();
    }
}

fn meta() -> Metadata<'static> {
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()))
}

/// Labels of static values only: never a name or text from elsewhere.
fn labels(pairs: &[(&'static str, &'static str)]) -> Vec<Label> {
    pairs.iter().map(|(k, v)| Label::new(*k, *v)).collect()
}

impl Metrics {
    /// Starts the scrape endpoint of `cfg` (within a Tokio runtime).
    pub fn serve(cfg: &MetricsConfig) -> Result<Self, MetricsError> {
        let err = |why: String| MetricsError {
            addr: cfg.addr,
            why,
        };
        let mut b = PrometheusBuilder::new()
            .with_http_listener(cfg.addr)
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full("convoy_migration_rounds".into()), ROUNDS)
            })
            .map_err(|e| err(e.to_string()))?;
        for a in &cfg.allow {
            // A bare address is that one host.
            let net = match a.parse::<std::net::IpAddr>() {
                Ok(ip) if ip.is_ipv4() => format!("{ip}/32"),
                Ok(ip) => format!("{ip}/128"),
                Err(_) => a.clone(),
            };
            b = b
                .add_allowed_address(&net)
                .map_err(|e| err(format!("--metrics-allow {a}: {e}")))?;
        }
        let (recorder, exporter) = b.build().map_err(|e| err(e.to_string()))?;
        let addr = cfg.addr;
        let exporter = tokio::spawn(async move {
            if let Err(e) = exporter.await {
                tracing::error!(%addr, "metrics endpoint stopped: {e:?}");
            }
        });
        let m = Self {
            recorder,
            exporter,
            addr,
        };
        m.describe();
        tracing::info!(addr = %cfg.addr, "serving Prometheus metrics");
        Ok(m)
    }

    /// Stops serving (the agent stopped).
    pub fn stop(&self) {
        self.exporter.abort();
    }

    /// The scrape endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn describe(&self) {
        for &(kind, name, unit, help) in DESCRIPTIONS {
            let (name, help) = (name.into(), SharedString::const_str(help));
            match kind {
                Kind::Counter => self.recorder.describe_counter(name, unit, help),
                Kind::Gauge => self.recorder.describe_gauge(name, unit, help),
                Kind::Histogram => self.recorder.describe_histogram(name, unit, help),
            }
        }
    }

    fn count(&self, name: &'static str, pairs: &[(&'static str, &'static str)]) {
        self.recorder
            .register_counter(&Key::from_parts(name, labels(pairs)), &meta())
            .increment(1);
    }

    fn add(&self, name: &'static str, pairs: &[(&'static str, &'static str)], n: u64) {
        self.recorder
            .register_counter(&Key::from_parts(name, labels(pairs)), &meta())
            .increment(n);
    }

    fn observe(&self, name: &'static str, pairs: &[(&'static str, &'static str)], v: f64) {
        self.recorder
            .register_histogram(&Key::from_parts(name, labels(pairs)), &meta())
            .record(v);
    }

    /// Counts what `event` says.
    pub fn audited(&self, event: &AuditEvent) {
        let (name, labels): (&'static str, Vec<(&'static str, &'static str)>) = match event {
            AuditEvent::TicketAccepted { role, .. } => (
                "convoy_tickets_accepted_total",
                vec![("role", role_label(role))],
            ),
            AuditEvent::Outcome { outcome, .. } => (
                "convoy_migrations_ended_total",
                vec![("outcome", outcome_class(outcome))],
            ),
            AuditEvent::Refused { reason, .. } => (
                "convoy_refusals_total",
                vec![("reason", refusal_class(reason))],
            ),
            AuditEvent::Decision {
                action, permitted, ..
            } => (
                "convoy_policy_decisions_total",
                vec![
                    ("action", action_label(action)),
                    ("decision", if *permitted { "permit" } else { "deny" }),
                ],
            ),
            AuditEvent::Snapshot { operation, .. } => (
                "convoy_snapshot_operations_total",
                vec![("operation", operation_label(operation))],
            ),
            AuditEvent::Resolution { role, .. } => (
                "convoy_in_doubt_resolutions_total",
                vec![("role", role_label(role))],
            ),
            _ => return,
        };
        self.count(name, &labels);
    }

    /// A handshake over `kind` that the peer gave up on.
    pub fn handshake_abandoned(&self, kind: crate::transport::Kind) {
        self.count(
            "convoy_handshakes_abandoned_total",
            &[("transport", kind.as_str())],
        );
    }

    /// The audit log holds `records` records, the last signed at `at_unix`.
    pub fn audit_log(&self, records: u64, at_unix: u64) {
        #[allow(clippy::cast_precision_loss)]
        let (records, at) = (records as f64, at_unix as f64);
        self.recorder
            .register_gauge(&Key::from_name("convoy_audit_records"), &meta())
            .set(records);
        self.recorder
            .register_gauge(
                &Key::from_name("convoy_audit_last_tree_head_timestamp_seconds"),
                &meta(),
            )
            .set(at);
    }

    /// Migrations in progress, and those holding budget shares.
    pub fn load(&self, active: u32, budget_shares: usize) {
        #[allow(clippy::cast_precision_loss)]
        let shares = budget_shares as f64;
        self.recorder
            .register_gauge(&Key::from_name("convoy_migrations_active"), &meta())
            .set(f64::from(active));
        self.recorder
            .register_gauge(&Key::from_name("convoy_budget_migrations"), &meta())
            .set(shares);
    }

    /// A source's migration of `mode` ended as `r` says.
    pub fn migrated(&self, mode: convoy_protocol::model::MigrationMode, r: &MigrationReport) {
        let mode = mode_label(mode);
        let outcome = outcome_class(&r.outcome.to_string());
        self.observe(
            "convoy_migration_duration_seconds",
            &[("mode", mode), ("outcome", outcome)],
            r.total_ms / 1e3,
        );
        if matches!(r.outcome, Outcome::Completed) {
            self.observe(
                "convoy_migration_downtime_seconds",
                &[("mode", mode)],
                r.downtime_ms / 1e3,
            );
            self.observe(
                "convoy_migration_rounds",
                &[("mode", mode)],
                f64::from(r.rounds),
            );
            if let Some(f) = r.postcopy.as_ref().and_then(|p| p.faults.as_ref()) {
                #[allow(clippy::cast_precision_loss)]
                let median = f.median_us as f64 / 1e6;
                self.observe("convoy_postcopy_fault_latency_seconds", &[], median);
            }
        }
        let e = &r.encodings;
        for (encoding, n) in [
            ("zero", e.zero),
            ("raw", e.raw),
            ("zstd", e.zstd),
            ("delta", e.delta),
            ("retained", e.retained),
        ] {
            if n > 0 {
                self.add("convoy_migration_pages_total", &[("encoding", encoding)], n);
            }
        }
        if let Some(t) = &r.transport {
            let t = if t == "quic" { "quic" } else { "tcp" };
            self.add(
                "convoy_migration_wire_bytes_total",
                &[("transport", t)],
                r.wire_bytes,
            );
            if let Some(l) = &r.link {
                // CAST: microseconds of one round trip.
                #[allow(clippy::cast_precision_loss)]
                let rtt = l.rtt_us as f64 / 1e6;
                self.observe("convoy_link_rtt_seconds", &[("transport", t)], rtt);
                if let (Some(sent), Some(lost)) = (l.sent_packets, l.lost_packets) {
                    self.add("convoy_link_packets_sent_total", &[], sent);
                    self.add("convoy_link_packets_lost_total", &[], lost);
                }
            }
        }
    }
}

fn mode_label(m: convoy_protocol::model::MigrationMode) -> &'static str {
    use convoy_protocol::model::MigrationMode as M;
    match m {
        M::Precopy => "precopy",
        M::Postcopy => "postcopy",
        M::Hybrid => "hybrid",
    }
}

fn role_label(role: &str) -> &'static str {
    match role {
        "source" => "source",
        "destination" => "destination",
        _ => "other",
    }
}

/// An outcome's class: the words before its reason.
fn outcome_class(outcome: &str) -> &'static str {
    let head = outcome.split(':').next().unwrap_or_default().trim();
    match head {
        "completed" => "completed",
        "aborted" => "aborted",
        "in doubt" => "in_doubt",
        "started" => "started",
        "failed" => "failed",
        "rolled back" => "rolled_back",
        _ => "other",
    }
}

/// A refusal's class, from the words the agent recorded it with.
pub fn refusal_class(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| r.contains(w));
    if has(&["revoked", "revocation"]) {
        "revocation"
    } else if has(&["handshake", "tls", "certificate"]) {
        "handshake"
    } else if has(&[
        "identity",
        "spiffe",
        "not the agent",
        "not a peer",
        "unknown peer",
    ]) {
        "identity"
    } else if has(&["ticket"]) {
        "ticket"
    } else if has(&["policy", "forbid", "not permitted", "denied"]) {
        "policy"
    } else if has(&["limit", "too many", "budget", "deadline", "capacity"]) {
        "limit"
    } else if has(&[
        "decode",
        "frame",
        "malformed",
        "hostile",
        "unexpected",
        "protocol",
    ]) {
        "hostile_stream"
    } else {
        "other"
    }
}

fn action_label(action: &str) -> &'static str {
    const ACTIONS: &[&str] = &[
        "MigrateOut",
        "MigrateIn",
        "CreateVm",
        "DeleteVm",
        "PauseVm",
        "ViewVm",
        "ReadAudit",
        "Abort",
        "Recover",
        "PushSnapshot",
        "PullSnapshot",
        "ManageSnapshots",
    ];
    ACTIONS
        .iter()
        .find(|a| **a == action)
        .copied()
        .unwrap_or("other")
}

fn operation_label(op: &str) -> &'static str {
    const OPS: &[&str] = &["push", "pull", "delete", "enroll", "copy"];
    OPS.iter().find(|o| **o == op).copied().unwrap_or("other")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn labels_take_bounded_values_only() {
        assert_eq!(outcome_class("completed"), "completed");
        assert_eq!(
            outcome_class("in doubt: the link broke after handover"),
            "in_doubt"
        );
        assert_eq!(outcome_class("aborted: vm-7 is busy"), "aborted");
        assert_eq!(outcome_class("anything else a peer made up"), "other");
        assert_eq!(refusal_class("policy denied MigrateIn"), "policy");
        assert_eq!(refusal_class("certificate revoked"), "revocation");
        assert_eq!(refusal_class("ticket already used"), "ticket");
        assert_eq!(refusal_class("frame too long"), "hostile_stream");
        assert_eq!(action_label("MigrateOut"), "MigrateOut");
        assert_eq!(action_label("vm-\"}\n"), "other");
        assert_eq!(operation_label("pull"), "pull");
        assert_eq!(role_label("spiffe://x/agent/a"), "other");
    }

    async fn get(addr: SocketAddr) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    #[tokio::test]
    async fn only_allowed_networks_scrape_and_the_endpoint_ends_with_its_metrics() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = Metrics::serve(&MetricsConfig {
            addr,
            allow: vec!["198.18.0.0/33".into()],
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--metrics-allow 198.18.0.0/33"), "{e}");

        let m = Metrics::serve(&MetricsConfig {
            addr,
            allow: vec!["198.18.0.0/15".into()],
        })
        .unwrap();
        let r = get(addr).await.unwrap();
        assert!(r.starts_with("HTTP/1.0 403"), "{r}");
        drop(m);
        let other = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let m = Metrics::serve(&MetricsConfig {
            addr: other,
            allow: vec!["127.0.0.1".into()],
        })
        .unwrap();
        m.load(3, 2);
        let r = get(m_addr(&m)).await.unwrap();
        assert!(r.starts_with("HTTP/1.0 200"), "{r}");
        assert!(r.contains("\nconvoy_migrations_active 3\n"), "{r}");
        assert!(r.contains("# HELP convoy_migrations_active "), "{r}");

        // Dropped, it serves no more.
        let at = m_addr(&m);
        drop(m);
        let mut closed = false;
        for _ in 0..200 {
            if get(at).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(closed, "the endpoint outlived its metrics");
    }

    fn m_addr(m: &Metrics) -> SocketAddr {
        m.addr()
    }
}
