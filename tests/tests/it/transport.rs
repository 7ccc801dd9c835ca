//! Transports: agents and operators over TLS over TCP alone, and a
//! migration that finds UDP dropped by a firewall and goes over TCP.
//!
//! (Every other lab test runs over TCP too when `CONVOY_LAB_TRANSPORT=tcp`;
//! `scripts/test` runs this binary a second time so.)

use std::time::Duration;

use convoy_agent::transport::{Choice, Kind};
use convoy_protocol::ctl::{Outcome, VmState};
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use convoy_tests::{eventually, lab_with, migrate, migrated, sim_spec, uffd_or_skip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_operators_work_over_tls_over_tcp_alone() {
    let (_dir, mut lab) = lab_with(&["a", "b"], |_, cfg| cfg.transport = Choice::Tcp).await;
    lab.transport = Choice::Tcp;
    let a = lab.client("a").await.unwrap();
    let b = lab.client("b").await.unwrap();
    assert_eq!((a.transport(), b.transport()), (Kind::Tcp, Kind::Tcp));
    a.vm_create(sim_spec("web", 32 << 20, 5_000)).await.unwrap();
    a.vm_create(sim_spec("db", 16 << 20, 2_000)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Pre-copy, under a dirtying workload.
    let report = a
        .migrate(migrate(&lab, "web", "a", "b"), |_| {})
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Completed, "{report:?}");
    assert!(report.verified && report.rounds >= 2, "{report:?}");
    assert_eq!(report.transport.as_deref(), Some("tcp"));
    // The wire carried the payload, and TLS and yamux framing on top.
    assert!(report.wire_bytes > report.payload_bytes, "{report:?}");
    for r in &report.receipts {
        r.verify(&lab.trust).unwrap();
    }

    // Post-copy: the destination's faults and the background push share
    // the connection's streams.
    let postcopy = uffd_or_skip();
    if postcopy {
        let plan = MigrationPlan {
            mode: MigrationMode::Postcopy,
            ..MigrationPlan::default()
        };
        let req = lab.migrate_request("db", "a", "b", plan).unwrap();
        let report = a.migrate(req, |_| {}).await.unwrap();
        assert_eq!(report.outcome, Outcome::Completed, "{report:?}");
        assert!(report.verified && report.postcopy.is_some(), "{report:?}");
        assert_eq!(report.transport.as_deref(), Some("tcp"));
    }

    let vms = b.vm_list().await.unwrap();
    assert!(vms.iter().all(|v| v.state == VmState::Running), "{vms:?}");
    let counter = |vms: &[convoy_protocol::ctl::VmInfo]| {
        vms.iter()
            .find(|v| v.name.as_str() == "web")
            .map(|v| v.counter)
    };
    let c0 = counter(&vms);
    assert!(
        eventually(Duration::from_secs(5), || async {
            counter(&b.vm_list().await.unwrap()) > c0
        })
        .await,
        "the VM runs at b"
    );
    // Exactly once: what moved is gone from a.
    let left: Vec<String> = a
        .vm_list()
        .await
        .unwrap()
        .iter()
        .map(|v| v.name.to_string())
        .collect();
    let expected: Vec<String> = if postcopy { vec![] } else { vec!["db".into()] };
    assert_eq!(left, expected);
    a.close().await;
    b.close().await;
    lab.shutdown().await;
}

/// Drops UDP to a port on this host (nftables, output hook) until
/// dropped: a firewall between the agents that lets TCP through.
struct UdpDropped {
    table: String,
}

impl UdpDropped {
    /// `None` (the caller skips) when nftables cannot be used here, except
    /// under `CI=true`, where that fails the test.
    fn to_port(port: u16) -> Option<UdpDropped> {
        let table = format!("convoy_udp_drop_{port}");
        let nft = |args: &[&str]| {
            std::process::Command::new("nft")
                .args(args)
                .output()
                .map_err(|e| e.to_string())
                .and_then(|o| {
                    if o.status.success() {
                        Ok(())
                    } else {
                        Err(String::from_utf8_lossy(&o.stderr).into_owned())
                    }
                })
        };
        let made = nft(&["add", "table", "inet", &table])
            .and_then(|()| {
                nft(&[
                    "add",
                    "chain",
                    "inet",
                    &table,
                    "out",
                    "{ type filter hook output priority 0; }",
                ])
            })
            .and_then(|()| {
                nft(&[
                    "add",
                    "rule",
                    "inet",
                    &table,
                    "out",
                    "udp",
                    "dport",
                    &port.to_string(),
                    "drop",
                ])
            });
        match made {
            Ok(()) => Some(UdpDropped { table }),
            Err(e) => {
                let _ = nft(&["delete", "table", "inet", &table]);
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true but nftables is unusable (needs root and the nftables package): {e}"
                );
                eprintln!("skipping: nftables unusable: {e}");
                None
            }
        }
    }
}

impl Drop for UdpDropped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

/// The default QUIC controller (`auto`) takes CUBIC's window on
/// loopback: the round trips of a few requests measure a path far under a
/// millisecond. (On the WAN lab's 2 ms and longer, the unit tests of
/// `PathClass` hold it to the bounded BBR.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_quic_controller_takes_cubics_window_on_loopback() {
    use convoy_agent::client::CtlClient;
    use convoy_agent::transport::{congestion, Congestion, Connection, Tuning};
    assert_eq!(Tuning::default().congestion, Congestion::Auto);
    let (_dir, lab) = lab_with(&["a"], |_, _| {}).await;
    let a = lab.agent("a").unwrap();
    let c = CtlClient::connect_with(
        a.addr,
        a.id.clone(),
        &lab.operator,
        &lab.trust,
        Choice::Quic,
    )
    .await
    .unwrap();
    let class = || {
        let Connection::Quic(q) = c.connection() else {
            panic!("dialed over QUIC")
        };
        let state = q.congestion_state().into_any();
        state.downcast::<congestion::ByPath>().unwrap().class()
    };
    // The handshake's few samples may include a busy moment; requests
    // bring more.
    let short = eventually(Duration::from_secs(10), || async {
        c.vm_list().await.unwrap();
        class().short()
    })
    .await;
    assert!(short, "{:?}", class());
    assert!(class().min_rtt().unwrap() < congestion::SHORT_PATH_RTT);
    c.close().await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_udp_dropped_by_a_firewall_the_migration_goes_over_tcp_and_says_so() {
    // Both agents dial by the default race, whatever the run's transport.
    let (_dir, mut lab) = lab_with(&["a", "b"], |_, cfg| cfg.transport = Choice::Auto).await;
    lab.transport = Choice::Auto;
    let b_addr = lab.agent("b").unwrap().addr;
    let Some(_firewall) = UdpDropped::to_port(b_addr.port()) else {
        return;
    };
    // The operator reaches a over QUIC, b over TCP.
    let a = lab.client("a").await.unwrap();
    let b = lab.client("b").await.unwrap();
    assert_eq!((a.transport(), b.transport()), (Kind::Quic, Kind::Tcp));
    a.vm_create(sim_spec("web", 16 << 20, 2_000)).await.unwrap();
    let t = std::time::Instant::now();
    let report = migrated(&a, &lab, "web", "a", "b").await;
    assert_eq!(report.transport.as_deref(), Some("tcp"));
    // QUIC's handshake would have waited out its 10 s timeout.
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert_eq!(b.vm_list().await.unwrap().len(), 1);
    a.close().await;
    b.close().await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_strangers_and_agents_posing_as_operators_are_refused_and_audited() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, lab) = lab_with(&["a", "b"], |_, _| {}).await;
    let b = lab.agent("b").unwrap();
    let (b_addr, b_id) = (b.addr, b.id.clone());

    // No client certificate: the handshake is refused (TLS 1.3 reports it
    // at the client's first read).
    let mut tls =
        rustls::ClientConfig::builder_with_provider(convoy_agent::trust::identity::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(crate::peers::TrustAnything))
            .with_no_client_auth();
    tls.alpn_protocols = vec![convoy_agent::transport::ALPN_CTL.to_vec()];
    let tcp = tokio::net::TcpStream::connect(b_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("convoy").unwrap();
    let refused = match tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
    {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(b"anything").await;
            let mut buf = [0u8; 16];
            !matches!(s.read(&mut buf).await, Ok(n) if n > 0)
        }
    };
    assert!(refused, "an agent served a client without a certificate");

    // Not TLS at all.
    let mut tcp = tokio::net::TcpStream::connect(b_addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    // A TLS alert at most, never an answer.
    assert!(n < 16, "{:?}", &buf[..n]);

    // Agent a's valid certificate on the operators' ALPN: authenticated,
    // then refused with the reason, before any request is read.
    let a_identity = lab
        .pki
        .identity(convoy_protocol::names::Role::Agent, &"a".parse().unwrap())
        .unwrap();
    let posing = convoy_agent::client::CtlClient::connect_with(
        b_addr,
        b_id,
        &a_identity,
        &lab.trust,
        Choice::Tcp,
    )
    .await
    .unwrap();
    let e = posing.vm_list().await.unwrap_err().to_string();
    assert!(e.contains("may not use"), "{e}");
    convoy_tests::assert_refusals_logged(&lab, "b", &["handshake refused", "may not use"]).await;
    lab.shutdown().await;
}
