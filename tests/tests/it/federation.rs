//! Federation: an agent trusts a second trust domain's CA bundle for named
//! peer identities only — the basis for moves between providers that share
//! no CA. A named partner agent receives a migration; an unnamed identity of
//! the partner CA, and a partner-CA certificate claiming our own domain,
//! are refused. A move between the two providers needs the tenant's, the
//! donor's and the recipient's approval (the example policy
//! `providers.cedar`): refused without, refused with an approval by a
//! partner operator not federated, done with all three.

use std::net::SocketAddr;
use std::time::Duration;

use convoy_agent::config::FederationFiles;
use convoy_agent::lab::Lab;
use convoy_agent::transport::{self, Tuning, ALPN_AGENT};
use convoy_agent::trust::authz::{approve_ticket, new_ticket};
use convoy_agent::trust::identity::{Identity, TrustBundle};
use convoy_agent::trust::pki::Pki;
use convoy_agent::trust::policy::HostFacts;
use convoy_agent::{Agent, AgentConfig};
use convoy_protocol::ctl::{MigrateRequest, Outcome, VmState};
use convoy_protocol::model::MigrationPlan;
use convoy_protocol::names::{Role, SpiffeId, TrustDomain, VmName};
use convoy_protocol::ticket::approval::{ApprovalRole, Approver};
use convoy_protocol::ticket::SignedTicket;
use convoy_tests::sim_spec;

const PARTNER: &str = "partner.test";

struct Partner {
    pki: Pki,
    _dir: tempfile::TempDir,
}

impl Partner {
    fn new(names: &[&str]) -> Partner {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), TrustDomain::new(PARTNER).unwrap()).unwrap();
        for n in names {
            pki.issue(Role::Agent, &n.parse().unwrap(), Duration::from_secs(3600))
                .unwrap();
        }
        for n in ["rex", "mal"] {
            pki.issue(
                Role::Operator,
                &n.parse().unwrap(),
                Duration::from_secs(3600),
            )
            .unwrap();
        }
        Partner { pki, _dir: dir }
    }

    fn id(&self, name: &str) -> SpiffeId {
        SpiffeId::agent(self.pki.domain().clone(), name.parse().unwrap())
    }

    fn operator(&self, name: &str) -> Identity {
        self.pki
            .identity(Role::Operator, &name.parse().unwrap())
            .unwrap()
    }

    fn identity(&self, name: &str) -> Identity {
        self.pki
            .identity(Role::Agent, &name.parse().unwrap())
            .unwrap()
    }

    fn federation(&self, peers: Vec<SpiffeId>) -> FederationFiles {
        FederationFiles {
            domain: self.pki.domain().clone(),
            ca: self.pki.ca_cert(),
            crl: Some(self.pki.crl_path()),
            peers,
        }
    }
}

/// Our CA bundle federated with `f`.
fn federated(trust: &TrustBundle, f: &FederationFiles) -> TrustBundle {
    trust
        .clone()
        .federate(
            TrustBundle::load(&f.ca, f.domain.clone()).unwrap(),
            f.peers.clone(),
        )
        .unwrap()
}

/// Starts the partner's agent `x`, which trusts our lab's agent `a` and
/// operator.
async fn start_partner_agent(
    partner: &Partner,
    lab: &Lab,
    state: &std::path::Path,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let mut ours = FederationFiles {
        domain: lab.trust.domain().clone(),
        ca: lab.pki.ca_cert(),
        crl: Some(lab.pki.crl_path()),
        peers: vec![
            lab.agent("a").unwrap().id.clone(),
            lab.operator.id().clone(),
            SpiffeId::operator(lab.trust.domain().clone(), "dora".parse().unwrap()),
        ],
    };
    let trust = federated(&partner.pki.trust().unwrap(), &ours);
    let mut cfg = AgentConfig::new("127.0.0.1:0".parse().unwrap(), partner.identity("x"), trust);
    cfg.state_dir = Some(state.to_owned());
    cfg.policy = Some(lab.policy_files());
    let files = partner.pki.paths(Role::Agent, &"x".parse().unwrap());
    ours.crl = None;
    cfg.files = Some(convoy_agent::config::CredentialFiles {
        cert: files.cert,
        key: files.key,
        ca: partner.pki.ca_cert(),
        crl: None,
        federation: vec![ours],
    });
    let agent = Agent::bind(cfg).unwrap();
    let addr = agent.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(agent.run(async move {
        let _ = rx.await;
    }));
    (addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_partner_agent_receives_a_vm_and_nobody_else_of_its_ca_gets_in() {
    let partner = Partner::new(&["x", "y"]);
    // Our agents trust the partner's agent x and its operator rex (who
    // approves as the recipient), not its operator mal.
    let rex = partner.operator("rex");
    let fed = partner.federation(vec![partner.id("x"), rex.id().clone()]);
    let dir = tempfile::tempdir().unwrap();
    // Our domain has an agent called x too: names alone are ambiguous, the
    // ticket's full SPIFFE ID decides.
    let lab = Lab::start(dir.path(), &["a", "x"], |_, cfg| {
        cfg.trust = federated(&cfg.trust, &fed);
        if let Some(f) = cfg.files.as_mut() {
            f.federation.push(fed.clone());
        }
    })
    .await
    .unwrap();
    // The partner host is in our policy inventory, in an allowed zone.
    let mut inv = lab.inventory().unwrap();
    inv.agents.insert(
        partner.id("x"),
        HostFacts {
            zone: "lab-b".into(),
            security_level: 2,
            groups: Default::default(),
        },
    );
    lab.write_inventory(&inv).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let state = tempfile::tempdir().unwrap();
    let (x_addr, stop) = start_partner_agent(&partner, &lab, state.path()).await;

    // The move between the two CAs: refused without the three approvals.
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("vm", 8 << 20, 1000)).await.unwrap();
    let vm: VmName = "vm".parse().unwrap();
    let dora = lab.add_operator("dora").unwrap();
    let request = |ticket| MigrateRequest {
        vm: vm.clone(),
        to: "x".parse().unwrap(),
        to_addr: Some(x_addr.to_string()),
        ticket,
    };
    // A ticket by our operator; with a recipient, one that the tenant, the
    // donor and that recipient approved.
    let ticket = |recipient: Option<&Identity>| {
        let approvers = match recipient {
            Some(_) => ["tenant", "donor", "recipient"]
                .iter()
                .map(|r| r.parse::<Approver>().unwrap())
                .collect(),
            None => Vec::new(),
        };
        let mut t = new_ticket(
            &vm,
            convoy_protocol::vm::VmSubject::plain(8 << 20),
            lab.agent("a").unwrap().id.clone(),
            partner.id("x"),
            &MigrationPlan::default(),
            Duration::from_secs(60),
            approvers,
        );
        if let Some(recipient) = recipient {
            t.approvals = vec![
                approve_ticket(&lab.operator, &t, Some(ApprovalRole::Tenant)).unwrap(),
                approve_ticket(&dora, &t, Some(ApprovalRole::Donor)).unwrap(),
                approve_ticket(recipient, &t, Some(ApprovalRole::Recipient)).unwrap(),
            ];
        }
        SignedTicket::sign(&t, &lab.operator).unwrap()
    };
    let e = a.migrate(request(ticket(None)), |_| {}).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("providers-approve-moves-between-them"),
        "{e}"
    );
    // The recipient's approval by a partner operator we do not federate.
    let e = a
        .migrate(request(ticket(Some(&partner.operator("mal")))), |_| {})
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("approval 2")
            && e.to_string().contains("not among the identities federated"),
        "{e}"
    );
    let r = a
        .migrate(request(ticket(Some(&rex))), |_| {})
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Completed, "{:?}", r.outcome);
    assert!(r.verified);
    assert_eq!(r.destination, partner.id("x").to_string());
    assert!(a.vm_list().await.unwrap().is_empty());
    // Our own x, with a ticket that names it, gets the next VM.
    a.vm_create(sim_spec("vm2", 8 << 20, 1000)).await.unwrap();
    let local = a
        .migrate(
            lab.migrate_request("vm2", "a", "x", MigrationPlan::default())
                .unwrap(),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(local.outcome, Outcome::Completed, "{:?}", local.outcome);
    assert_eq!(local.destination, lab.agent("x").unwrap().id.to_string());
    // The operator, federated at x, sees the VM running there.
    let at_x = convoy_agent::client::CtlClient::connect(
        x_addr,
        partner.id("x"),
        &lab.operator,
        &federated(&lab.trust, &partner.federation(vec![partner.id("x")])),
    )
    .await
    .unwrap();
    let vms = at_x.vm_list().await.unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].state, VmState::Running);

    // y has a certificate from the same partner CA but is not named: a
    // refuses it as a peer.
    let a_info = lab.agent("a").unwrap();
    let y_trust = federated(
        &partner.pki.trust().unwrap(),
        &FederationFiles {
            domain: lab.trust.domain().clone(),
            ca: lab.pki.ca_cert(),
            crl: None,
            peers: vec![a_info.id.clone()],
        },
    );
    refused(
        a_info.addr,
        a_info.id.clone(),
        &partner.identity("y"),
        &y_trust,
        "is not among the identities federated from partner.test",
    )
    .await;

    // A partner-CA certificate that claims to be our own agent b: the
    // partner CA may not vouch for our domain.
    let b = SpiffeId::agent(lab.trust.domain().clone(), "b".parse().unwrap());
    let forged = partner_signed(&partner, &b);
    refused(
        a_info.addr,
        a_info.id.clone(),
        &forged,
        &y_trust,
        "certificate not issued by the CA of convoy",
    )
    .await;

    // And a still serves its own operator.
    assert!(lab.client("a").await.unwrap().vm_list().await.is_ok());
    let _ = stop.send(());
    lab.shutdown().await;
}

/// A certificate for `id` (any domain) signed by the partner's CA.
fn partner_signed(partner: &Partner, id: &SpiffeId) -> Identity {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType, PKCS_ED25519,
    };
    let ca_key = std::fs::read_to_string(partner.pki.dir().join("ca.key")).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, format!("Convoy CA {PARTNER}"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = Issuer::new(ca, KeyPair::from_pem(&ca_key).unwrap());
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, &issuer).unwrap();
    let path = std::path::Path::new("forged");
    Identity::from_pem(
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        path,
        path,
    )
    .unwrap()
}

/// `me` connects to the agent at `addr` as a migration peer and is turned
/// away: the connection is closed as unauthorized before any message.
async fn refused(addr: SocketAddr, agent: SpiffeId, me: &Identity, trust: &TrustBundle, why: &str) {
    let ep = transport::endpoint("127.0.0.1:0".parse().unwrap(), None, &Tuning::default()).unwrap();
    let r = async {
        let conn = transport::connect(&ep, addr, agent, ALPN_AGENT, me, trust, &Tuning::default())
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        transport::write_message(
            &mut send,
            &convoy_protocol::Message::Abort(convoy_protocol::message::Abort {
                reason: convoy_protocol::message::Reason::Cancelled,
            }),
        )
        .await
        .map_err(|e| e.to_string())?;
        if let Ok(m) = transport::read_message(&mut recv).await {
            return Err(format!("answered: {m:?}"));
        }
        Ok(conn.closed().await)
    }
    .await;
    match r {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(0x10), "{c:?}");
            let reason = String::from_utf8_lossy(&c.reason).to_string();
            assert!(reason.contains(why), "{reason:?} lacks {why:?}");
        }
        // Refused before the stream even opened: same close, seen earlier.
        Err(e) if e.contains("(code 16)") => {
            assert!(e.contains(why), "{e:?} lacks {why:?}")
        }
        other => panic!("{} was not refused as unauthorized: {other:?}", me.id()),
    }
}
