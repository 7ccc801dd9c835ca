//! Mutual authentication: who may talk to an agent, and as what.
//! Every refusal must leave the VMs exactly as they were.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use convoy_agent::client::CtlClient;
use convoy_agent::transport::{self, Tuning, ALPN_AGENT, ALPN_CTL};
use convoy_agent::trust::identity::{self, Identity};
use convoy_agent::trust::pki::Pki;
use convoy_protocol::ctl::{CtlMessage, CtlRequest, Outcome};
use convoy_protocol::names::{AgentName, Role, SpiffeId, TrustDomain};
use convoy_protocol::Message;
use convoy_tests::{assert_nothing_moved, assert_refusals_logged, lab, migrate, sim_spec};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// A verifier that trusts any server: the attacker's side of these tests
/// does not care who the agent is, only whether the agent lets it in.
#[derive(Debug)]
pub(crate) struct TrustAnything;

impl ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        identity::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Tries one control request over a connection with no client certificate.
async fn request_without_client_cert(addr: SocketAddr) -> Result<(), String> {
    let mut tls = rustls::ClientConfig::builder_with_provider(identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnything))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_CTL.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let endpoint = transport::endpoint("127.0.0.1:0".parse().unwrap(), None, &Tuning::default())
        .map_err(|e| e.to_string())?;
    let conn = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), addr, "convoy")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let (mut send, mut recv) = (
        transport::SendStream::Quic(send),
        transport::RecvStream::Quic(recv),
    );
    transport::write_ctl(
        &mut send,
        &CtlMessage::Request(CtlRequest::VmCreate(sim_spec("evil", 4 << 20, 0))),
    )
    .await
    .map_err(|e| e.to_string())?;
    match transport::read_ctl(&mut recv).await {
        Ok(Some(m)) => Err(format!("agent answered an unauthenticated client: {m:?}")),
        Ok(None) => Err("stream ended".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let (_dir, lab) = lab(&["a", "b", "c"]).await;
    let a = lab.agent("a").unwrap().addr;
    let err = request_without_client_cert(a).await.unwrap_err();
    assert!(!err.contains("answered"), "{err}");
    assert_refusals_logged(&lab, "a", &["handshake refused"]).await;
    // A flood of them is recorded, but boundedly: nobody fills the disk
    // through the audit log.
    for _ in 0..2 * convoy_agent::host::REFUSALS_PER_WINDOW {
        assert!(request_without_client_cert(a).await.is_err());
    }
    let logged = convoy_tests::refusals_logged(&lab, "a").len();
    assert!(
        logged <= convoy_agent::host::REFUSALS_PER_WINDOW as usize,
        "{logged} refusals recorded"
    );
    let ok = lab.client("a").await.unwrap();
    assert!(
        ok.vm_list().await.unwrap().is_empty(),
        "nothing was created"
    );
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let (_dir, lab) = lab(&["a", "b", "c"]).await;
    // Same trust domain name, different CA: a lookalike.
    let other = tempfile::tempdir().unwrap();
    let pki = Pki::init(other.path(), TrustDomain::new("convoy.internal").unwrap()).unwrap();
    let op: AgentName = "operator".parse().unwrap();
    pki.issue(Role::Operator, &op, Duration::from_secs(3600))
        .unwrap();
    let foreign = pki.identity(Role::Operator, &op).unwrap();
    let a = lab.agent("a").unwrap();
    let r = async {
        let c = CtlClient::connect(a.addr, a.id.clone(), &foreign, &lab.trust).await?;
        c.vm_create(sim_spec("evil", 4 << 20, 0)).await
    }
    .await;
    assert!(r.is_err(), "{r:?}");
    // And an agent presenting a foreign CA's chain to a client is refused
    // by the client: an operator trusting only its CA cannot be fooled.
    let foreign_agent: AgentName = "a".parse().unwrap();
    pki.issue(Role::Agent, &foreign_agent, Duration::from_secs(3600))
        .unwrap();
    let r = CtlClient::connect(a.addr, a.id.clone(), &lab.operator, &pki.trust().unwrap()).await;
    assert!(
        r.is_err(),
        "client must refuse a server outside its CA bundle"
    );
    let ok = lab.client("a").await.unwrap();
    assert!(ok.vm_list().await.unwrap().is_empty());
    assert_refusals_logged(&lab, "a", &["handshake refused"]).await;
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_certificates_with_the_wrong_identity_are_refused() {
    let (_dir, lab) = lab(&["a", "b", "c"]).await;
    let a = lab.agent("a").unwrap();
    let b = lab.agent("b").unwrap();
    let c = lab.agent("c").unwrap();

    // 1. An agent certificate may not drive another agent as an operator.
    let agent_b: Identity = lab.pki.identity(Role::Agent, &b.name).unwrap();
    let r = async {
        let cl = CtlClient::connect(a.addr, a.id.clone(), &agent_b, &lab.trust).await?;
        cl.vm_create(sim_spec("evil", 4 << 20, 0)).await
    }
    .await;
    assert!(r.is_err(), "{r:?}");

    // 2. An operator may not pose as a source agent.
    let conn = transport::connect(
        &lab_endpoint(),
        a.addr,
        a.id.clone(),
        ALPN_AGENT,
        &lab.operator,
        &lab.trust,
        &Tuning::default(),
    )
    .await;
    if let Ok(conn) = conn {
        let r = async {
            let (mut s, mut rcv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            transport::write_message(
                &mut s,
                &Message::Abort(convoy_protocol::message::Abort {
                    reason: convoy_protocol::message::Reason::Cancelled,
                }),
            )
            .await
            .map_err(|e| e.to_string())?;
            transport::read_message(&mut rcv)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        assert!(!matches!(r, Ok(Some(_))), "{r:?}");
    }

    // 3. The operator expects agent b but reaches a: refused by the client.
    let r = CtlClient::connect(a.addr, b.id.clone(), &lab.operator, &lab.trust).await;
    assert!(r.is_err());

    // 4. A source migrating to "b" at c's address refuses c, and the VM
    //    stays where it is.
    let ca = lab.client("a").await.unwrap();
    ca.vm_create(sim_spec("vm", 8 << 20, 1000)).await.unwrap();
    let mut req = migrate(&lab, "vm", "a", "b");
    req.to_addr = Some(c.addr.to_string());
    let report = ca.migrate(req, |_| {}).await.unwrap();
    assert!(matches!(report.outcome, Outcome::Aborted(_)), "{report:?}");
    assert_eq!(report.pages_sent, 0);
    assert_nothing_moved(&ca, &lab.client("c").await.unwrap()).await;

    // 5. An identity of another trust domain, even from our CA's files, is
    //    not an agent of ours.
    let id: SpiffeId = "spiffe://elsewhere.test/agent/b".parse().unwrap();
    let r = CtlClient::connect(b.addr, id, &lab.operator, &lab.trust).await;
    assert!(r.is_err());
    // Refusals a makes itself are in its log (cases 1, 2; 4 as the aborted
    // migration); cases 3 and 5 are refused by the client, which the
    // agent never hears of.
    assert_refusals_logged(
        &lab,
        "a",
        &[
            "peer refused: spiffe://convoy.internal/agent/b may not use convoy-ctl/1",
            "peer refused: spiffe://convoy.internal/operator/operator may not use convoy/1",
            "aborted",
        ],
    )
    .await;
    lab.shutdown().await;
}

fn lab_endpoint() -> quinn::Endpoint {
    transport::endpoint("127.0.0.1:0".parse().unwrap(), None, &Tuning::default()).unwrap()
}
