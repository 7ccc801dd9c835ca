//! The server: binds an agent ([`Agent`]), finds again the VMs its
//! registry holds (`host::reattach`), accepts connections and hands each
//! authenticated one to the operator API (`control`) or to an incoming
//! migration (`engine::incoming`); reloads credentials and policy when
//! their files change; stops serving and leaves its VMs running
//! ([`Agent::run`]); [`run`].

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_protocol::names::SpiffeId;

use crate::config::{AgentConfig, AgentError, CredentialFiles, OnExit, StateError};
use crate::host::limits::{Gate, HandshakeSlot};
use crate::host::{Creds, Host, RefusalWindow, VmEntry};
use crate::transport::{self, close, TransportError, ALPN_AGENT, ALPN_CTL};
use crate::trust::identity;

/// A bound agent, ready to run.
#[derive(Debug, Clone)]
pub struct Agent {
    host: Arc<Host>,
    /// The TCP listener, taken by [`Agent::run`].
    tcp: Arc<Mutex<Option<tokio::net::TcpListener>>>,
    stamps: Stamps,
    /// What the VM registry held at start, re-attached when the agent
    /// runs.
    restore: Arc<Mutex<Option<crate::host::vmdb::Loaded>>>,
}

/// The watched files as they were when the agent loaded them.
#[derive(Debug, Clone)]
struct Stamps {
    creds: Option<Vec<Option<crate::trust::policy::FileStamp>>>,
    policy: Option<Vec<(PathBuf, Option<crate::trust::policy::FileStamp>)>>,
}

impl Agent {
    /// Binds the endpoint. Must be called inside a tokio runtime.
    pub fn bind(config: AgentConfig) -> Result<Agent, AgentError> {
        let id = config.identity.id().clone();
        if id.role() != convoy_protocol::names::Role::Agent {
            return Err(AgentError::NotAnAgent(id));
        }
        if id.domain() != config.trust.domain() {
            return Err(AgentError::WrongDomain {
                id,
                domain: config.trust.domain().clone(),
            });
        }
        let (replay, audit, reset_key, journal, (vmdb, loaded), snapshots) = match &config.state_dir
        {
            Some(dir) => {
                let err = |source: StateError| AgentError::State {
                    path: dir.clone(),
                    source,
                };
                crate::private::create_dir_all(dir).map_err(|e| err(StateError::Create(e)))?;
                let reset_key = transport::ResetKey::load_or_create(&dir.join("quic-reset.key"))
                    .map_err(|e| err(e.into()))?;
                let replay = crate::trust::authz::ReplayCache::open(&dir.join("state.redb"))
                    .map_err(|e| err(StateError::ReplayCache(e)))?;
                let audit = crate::trust::audit::AuditLog::open(
                    &dir.join("audit.log"),
                    &config.identity,
                    &config.trust,
                )
                .map_err(|e| err(e.into()))?;
                let journal = crate::host::journal::Journal::open_with(
                    &dir.join("journal.redb"),
                    crate::host::journal::KEEP_SETTLED,
                    config.dangerous_options().fail_journal_at,
                )
                .map_err(|e| err(e.into()))?;
                report_unfinished(&journal, &audit);
                let vmdb = crate::host::vmdb::VmDb::open(&dir.join("vms.redb"))
                    .map_err(|e| err(e.into()))?;
                let sealing = crate::snapshot::SealingKeys::load_or_create(dir)
                    .map_err(|e| err(Box::new(e).into()))?;
                let seen = crate::snapshot::seen::SeenLineages::open(&dir.join("snapshots.redb"))
                    .map_err(|e| err(StateError::SnapshotsSeen(e)))?;
                // Fail closed: an unsettled handover that cannot be read
                // would leave a VM the destination may run resumable here.
                seen.pending_handovers()
                    .map_err(|e| err(StateError::SnapshotsSeen(e)))?;
                let snapshots = crate::host::Snapshots {
                    sealing: Arc::new(sealing),
                    seen: Arc::new(seen),
                    pulls: dir.join("pulls"),
                };
                (
                    replay,
                    Some(audit),
                    reset_key,
                    Arc::new(journal),
                    vmdb,
                    snapshots,
                )
            }
            // Fail closed: without an audit log and a durable replay
            // cache the agent would act unaudited and accept a used
            // ticket again after a restart.
            None => return Err(AgentError::NoStateDir),
        };
        // Stamps taken before loading: a file changed in between is
        // reloaded by the watchers, never missed.
        let stamps = Stamps {
            creds: config.files.as_ref().map(CredentialFiles::stamp),
            policy: config
                .policy
                .as_ref()
                .map(crate::trust::policy::PolicyFiles::stamp),
        };
        let policy = match &config.policy {
            Some(files) => Some(crate::trust::policy::PolicySet::load(files)?),
            None => {
                tracing::warn!(
                    "no policy: every migration, VM creation, abort and audit read is denied"
                );
                None
            }
        };
        let tls =
            identity::server_config(&config.identity, &config.trust, &[ALPN_AGENT, ALPN_CTL])?;
        // The TCP listener's TLS is the QUIC endpoint's configuration.
        let tcp_tls = Arc::new(tls.clone());
        let (endpoint, tcp) = transport::bind_both(config.listen, tls, &config.tuning, &reset_key)?;
        let (tcp_shutdown, _) = tokio::sync::watch::channel(false);
        let dialer =
            transport::Dialer::new(endpoint.clone(), config.transport, config.tuning.clone())
                .with_shutdown(tcp_shutdown.subscribe());
        let budget = crate::host::budget::MigrationBudget::new(
            config.migration_memory,
            u64::from(config.tuning.connection_window),
        );
        let bases = config
            .base_dir()
            .map(|d| Arc::new(crate::backend::base::BaseImages::new(d)));
        // Index the bases in the background: hashing a large one at the
        // first migration that names it would delay its Accept.
        if let Some(b) = bases.clone() {
            let _ = std::thread::Builder::new()
                .name("convoy-bases".into())
                .spawn(move || b.index_all(4096));
        }
        let creds = Creds {
            identity: config.identity.clone(),
            trust: config.trust.clone(),
        };
        let next_incarnation = loaded.next_incarnation;
        let metrics = config
            .metrics
            .as_ref()
            .map(crate::metrics::Metrics::serve)
            .transpose()?;
        let agent = Agent {
            tcp: Arc::new(Mutex::new(Some(tcp))),
            stamps,
            restore: Arc::new(Mutex::new(Some(loaded))),
            host: Arc::new(Host {
                policy: std::sync::RwLock::new(None),
                refusals: Mutex::new(RefusalWindow::new(std::time::Instant::now())),
                connections: crate::host::limits::Connections::new(config.limits.clone()),
                incarnations: std::sync::atomic::AtomicU64::new(next_incarnation),
                bookkeeping: crate::host::bookkeeping::Bookkeeping::new(
                    config.max_bookkeeping_bytes,
                ),
                creds: std::sync::RwLock::new(Arc::new(creds)),
                config,
                id,
                endpoint,
                dialer,
                tcp_tls: std::sync::RwLock::new(tcp_tls),
                tcp_shutdown,
                vms: Mutex::new(HashMap::new()),
                vmdb: Some(vmdb),
                recent: Mutex::new(VecDeque::new()),
                active: AtomicU32::new(0),
                replay,
                audit,
                retained: Arc::new(Mutex::new(Default::default())),
                bases,
                budget,
                recoveries: Mutex::new(HashMap::new()),
                lanes: Mutex::new(HashMap::new()),
                journal,
                resolving: tokio::sync::Mutex::new(()),
                watchers: Mutex::new(tokio::task::JoinSet::new()),
                snapshots,
                metrics,
                registry: std::sync::OnceLock::new(),
            }),
        };
        if let Some(p) = policy {
            agent.host.set_policy(p);
        }
        Ok(agent)
    }

    /// The images this agent retains for VMs that left it (ciphertext
    /// only; see [`crate::host::retain`]), as a handle that does not keep the
    /// agent alive.
    pub fn retained_images(&self) -> crate::host::retain::RetainedImages {
        crate::host::retain::RetainedImages(self.host.retained.clone())
    }

    /// The VM registry as ticket subjects, as a handle that does not keep
    /// the agent alive.
    pub fn vm_subjects(&self) -> crate::host::VmSubjects {
        crate::host::VmSubjects(Arc::downgrade(&self.host))
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.host.endpoint.local_addr()
    }

    /// Our identity.
    pub fn id(&self) -> &SpiffeId {
        &self.host.id
    }

    /// The migration journal, as a handle that does not keep it open.
    pub fn journal(&self) -> std::sync::Weak<crate::host::journal::Journal> {
        Arc::downgrade(&self.host.journal)
    }

    /// Finds again the VMs its registry holds, serves until `shutdown`
    /// completes, then stops: see [`OnExit`] for what becomes of the VMs
    /// (by default they keep running, `Agent::leave_vms`).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let loaded = self
            .restore
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(loaded) = loaded {
            crate::host::reattach::restore(&self.host, loaded).await;
        }
        // The registry before the migrations left unfinished: resolving
        // them may need it.
        let registry = match self.host.config.registry.clone() {
            Some(c) => crate::host::fleet::attach(&self.host, c).await,
            None => None,
        };
        // With the VMs found again: the migrations left unfinished.
        crate::host::indoubt::at_start(&self.host).await;
        // And the store-and-forward handovers left unsettled.
        crate::control::handback::at_start(&self.host);
        tokio::pin!(shutdown);
        let reloader = self
            .host
            .config
            .files
            .clone()
            .zip(self.stamps.creds.clone())
            .map(|(files, s)| tokio::spawn(reload_loop(self.host.clone(), files, s)));
        let policy_reloader = self
            .host
            .config
            .policy
            .clone()
            .zip(self.stamps.policy.clone())
            .map(|(files, s)| tokio::spawn(policy_reload_loop(self.host.clone(), files, s)));
        let gauges = self
            .host
            .metrics
            .is_some()
            .then(|| tokio::spawn(gauge_loop(Arc::downgrade(&self.host))));
        let tcp = self.tcp.lock().unwrap_or_else(|p| p.into_inner()).take();
        loop {
            let accepted = tokio::select! {
                i = self.host.endpoint.accept() => match i {
                    Some(i) => Accepted::Quic(Box::new(i)),
                    None => break,
                },
                t = accept_tcp(tcp.as_ref()) => match t {
                    Ok((stream, remote)) => Accepted::Tcp(stream, remote),
                    Err(e) => {
                        // Out of descriptors, mostly: the next accept may
                        // succeed.
                        tracing::warn!("TCP accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let incoming = match accepted {
                Accepted::Quic(i) => *i,
                Accepted::Tcp(stream, remote) => {
                    // A TCP peer's address is proven by its handshake.
                    let Gate::Accept(slot) = self.host.connections.gate(true) else {
                        self.host.audit_refusal(
                            remote.to_string(),
                            "too many handshakes in flight".into(),
                        );
                        continue;
                    };
                    let host = self.host.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_tcp(host, stream, remote, slot).await {
                            tracing::info!("connection ended: {e}");
                        }
                    });
                    continue;
                }
            };
            let validated = incoming.remote_address_validated();
            let remote = incoming.remote_address();
            let slot = match self.host.connections.gate(validated) {
                Gate::Accept(slot) => slot,
                Gate::Retry => {
                    // Answered by the client with its address proven.
                    if incoming.retry().is_err() {
                        tracing::debug!(%remote, "no Retry possible; dropped");
                    }
                    continue;
                }
                Gate::Refuse => {
                    self.host
                        .audit_refusal(remote.to_string(), "too many handshakes in flight".into());
                    incoming.refuse();
                    continue;
                }
            };
            let host = self.host.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_connection(host, incoming, slot).await {
                    tracing::info!("connection ended: {e}");
                }
            });
        }
        drop(tcp);
        for r in [reloader, policy_reloader, gauges, registry]
            .into_iter()
            .flatten()
        {
            r.abort();
        }
        // Its liveness record goes with it (a crash leaves it to expire).
        if let Some(r) = self.host.registry.get() {
            r.leave().await;
        }
        // The scrape endpoint ends with the agent, even while tasks still
        // hold its host.
        if let Some(m) = &self.host.metrics {
            m.stop();
        }
        // The inquiries about migrations in doubt end with the agent (the
        // next start asks again).
        let mut watchers =
            std::mem::take(&mut *self.host.watchers.lock().unwrap_or_else(|p| p.into_inner()));
        watchers.abort_all();
        while watchers.join_next().await.is_some() {}
        match self.host.config.on_exit {
            OnExit::DestroyVms => {
                self.host.tcp_shutdown.send_replace(true);
                self.host
                    .endpoint
                    .close(0u32.into(), b"agent shutting down");
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), self.host.endpoint.wait_idle())
                        .await;
                let vms: Vec<VmEntry> = self.host.vms().drain().map(|(_, e)| e).collect();
                for h in vms.into_iter().filter_map(|e| e.handle) {
                    h.destroy().await;
                }
            }
            OnExit::LeaveVmsRunning => self.leave_vms().await,
        }
    }

    /// Stops serving and lets go of the VMs, leaving them running:
    /// outgoing migrations are cancelled (one that has not handed its VM
    /// over rolls back, and the VM runs here again; one past its handover
    /// ends as it would have), incoming ones end as their connections
    /// close (a staging that has not committed is discarded, its QEMU
    /// killed). QEMU guests keep running, recorded in the registry, and
    /// the next start finds them again; a sim VM ends with the process
    /// (its memory is the agent's) and is listed as lost at the next
    /// start. Bounded: a migration that does not end within seconds is
    /// left to the next start to settle.
    async fn leave_vms(&self) {
        let cancels: Vec<_> = self
            .host
            .vms()
            .values()
            .filter_map(|e| e.cancel.clone())
            .collect();
        if !cancels.is_empty() {
            tracing::info!(migrations = cancels.len(), "cancelling outgoing migrations");
        }
        for c in &cancels {
            c.notify_one();
        }
        let host = &self.host;
        until(Duration::from_secs(10), || {
            host.vms().values().all(|e| e.cancel.is_none())
        })
        .await;
        host.tcp_shutdown.send_replace(true);
        host.endpoint.close(0u32.into(), b"agent shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), host.endpoint.wait_idle()).await;
        until(Duration::from_secs(5), || {
            host.active.load(std::sync::atomic::Ordering::Relaxed) == 0
        })
        .await;
        for v in host.vm_infos() {
            if v.backend == "sim" && v.state != convoy_protocol::ctl::VmState::Lost {
                tracing::warn!(
                    vm = %v.name,
                    "a sim VM's memory is the agent's: it ends with the agent (listed as lost at the next start)"
                );
            } else {
                tracing::info!(vm = %v.name, backend = %v.backend, state = ?v.state, "left as it is");
            }
        }
    }
}

/// Waits until `done()` holds, or `limit` has passed.
async fn until(limit: Duration, done: impl Fn() -> bool) {
    let end = tokio::time::Instant::now() + limit;
    while !done() && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Logs and audits the migrations the journal holds unfinished: they were
/// in progress when the agent stopped, or are in doubt. They stay in the
/// journal until someone resolves them.
fn report_unfinished(
    journal: &crate::host::journal::Journal,
    audit: &crate::trust::audit::AuditLog,
) {
    let unfinished = match journal.unfinished() {
        Ok(u) => u,
        Err(e) => {
            tracing::error!("journal: cannot list the unfinished migrations: {e}");
            return;
        }
    };
    if unfinished.is_empty() {
        return;
    }
    tracing::warn!(count = unfinished.len(), "unfinished migrations found");
    for r in unfinished {
        tracing::warn!(
            migration = %r.migration,
            vm = %r.vm,
            role = %r.role,
            peer = %r.peer,
            phase = %r.phase,
            epoch = %r.epoch,
            held_here = r.held_here(),
            "unfinished migration found"
        );
        let event = convoy_protocol::audit::AuditEvent::Unfinished {
            migration: r.migration,
            vm: r.vm.clone(),
            role: r.role.name().into(),
            phase: r.phase.name().into(),
            epoch: r.epoch.0,
        };
        if let Err(e) = audit.record(event) {
            tracing::error!("audit: {e}");
        }
    }
}

/// Binds and runs an agent until `shutdown` completes.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    Agent::bind(config)?.run(shutdown).await;
    Ok(())
}

async fn serve_connection(
    host: Arc<Host>,
    incoming: quinn::Incoming,
    handshake: HandshakeSlot,
) -> Result<(), TransportError> {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) if transport::quic_handshake_abandoned(&e) => {
            host.handshake_abandoned(remote, transport::Kind::Quic, &e);
            return Ok(());
        }
        Err(e) => {
            // Logged (to stderr) and audited at the refusal rate limit:
            // anyone can cause this.
            host.audit_refusal(remote.to_string(), format!("handshake refused: {e}"));
            return Err(e.into());
        }
    };
    drop(handshake);
    let conn = transport::Connection::Quic(conn);
    let peer = match transport::authorize_peer(&conn, &host.creds().trust) {
        Ok(p) => p,
        Err(e) => {
            host.audit_refusal(remote.to_string(), e.to_string());
            conn.close(close::UNAUTHORIZED.into(), e.to_string().as_bytes());
            return Err(e);
        }
    };
    serve_authorized(host, conn, peer).await;
    Ok(())
}

/// A connection accepted over TCP: its TLS handshake, then as over QUIC.
/// The peer is authorized before its session starts, so an unauthorized
/// one never gets a stream's credit.
async fn serve_tcp(
    host: Arc<Host>,
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    handshake: HandshakeSlot,
) -> Result<(), TransportError> {
    let tuning = &host.config.tuning;
    transport::tcp::tune_socket(&stream, tuning.idle_timeout);
    let tls = host
        .tcp_tls
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let hs = match transport::tcp::Handshaken::accept(stream, remote, tls, tuning.connect_timeout)
        .await
    {
        Ok(hs) => hs,
        Err(e) if transport::tcp_handshake_abandoned(&e) => {
            host.handshake_abandoned(remote, transport::Kind::Tcp, &e);
            return Ok(());
        }
        Err(e) => {
            host.audit_refusal(remote.to_string(), format!("handshake refused: {e}"));
            return Err(TransportError::Tcp(e));
        }
    };
    drop(handshake);
    match transport::authorize(hs.alpn(), hs.peer_chain(), &host.creds().trust) {
        Ok(peer) => {
            let credit = transport::dial::credit(&peer.alpn, tuning);
            let session = hs.session(credit, tuning.into(), Some(host.tcp_shutdown.subscribe()));
            serve_authorized(host, transport::Connection::Tcp(session), peer).await;
            Ok(())
        }
        Err(e) => {
            host.audit_refusal(remote.to_string(), e.to_string());
            // A session of a few streams, to say why: the peer's first
            // requests and the one carrying the reason (a peer that spends
            // them all first gets the close without it).
            let conn = transport::Connection::Tcp(hs.session(
                transport::tcp::Credit {
                    streams: 4,
                    window: 0,
                },
                tuning.into(),
                None,
            ));
            conn.close(close::UNAUTHORIZED.into(), e.to_string().as_bytes());
            let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
            Err(e)
        }
    }
}

/// Serves an authorized connection: admitted under the connection limits,
/// then to the operator API or the migration engine by its ALPN.
async fn serve_authorized(host: Arc<Host>, conn: transport::Connection, peer: transport::Peer) {
    let remote = conn.remote_address();
    let _slot = match host.connections.admit(&peer.id) {
        Ok(slot) => slot,
        Err(busy) => {
            host.audit_refusal(peer.id.to_string(), format!("connection refused: {busy}"));
            conn.close(close::BUSY.into(), busy.to_string().as_bytes());
            return;
        }
    };
    tracing::debug!(%remote, peer = %peer.id, transport = %conn.kind(), "authenticated");
    if peer.alpn == ALPN_CTL {
        // Operator requests are small: an operator connection keeps the
        // handshake's credit (a few streams, a small receive window).
        crate::control::serve(host, conn, peer).await;
    } else {
        transport::grant_migration_credit(&conn, &host.config.tuning);
        crate::engine::incoming::serve(host, conn, peer).await;
    }
}

/// Accepts on the TCP listener; never completes without one.
async fn accept_tcp(
    tcp: Option<&tokio::net::TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match tcp {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// An accepted connection, before its handshake.
enum Accepted {
    Quic(Box<quinn::Incoming>),
    Tcp(tokio::net::TcpStream, SocketAddr),
}

/// Returns once `now()` differs from `stamp` (checked every `interval`),
/// with `stamp` updated.
async fn changed<S: PartialEq>(interval: Duration, stamp: &mut S, now: impl Fn() -> S) {
    loop {
        tokio::time::sleep(interval).await;
        let s = now();
        if s != *stamp {
            *stamp = s;
            return;
        }
    }
}

/// Reloads certificates, key, CA bundle and CRL when their files change.
/// A bad file keeps the credentials in force and is reported; the agent
/// never runs with none.
async fn reload_loop(
    host: Arc<Host>,
    files: CredentialFiles,
    mut stamp: Vec<Option<crate::trust::policy::FileStamp>>,
) {
    // CRL files loaded once must stay: a CRL that disappears would
    // otherwise un-revoke everyone it listed.
    let mut crls_seen = files.crls_present();
    loop {
        changed(host.config.reload_interval, &mut stamp, || files.stamp()).await;
        let gone: Vec<_> = crls_seen.iter().filter(|p| !p.exists()).collect();
        if !gone.is_empty() {
            let reason = format!(
                "CRL file {} disappeared; the last good CRL and credentials stay in force",
                gone.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            tracing::error!("credential reload refused: {reason}");
            host.audit(convoy_protocol::audit::AuditEvent::Refused {
                migration: None,
                peer: "credential reload".into(),
                reason,
            });
            continue;
        }
        let domain = host.creds().trust.domain().clone();
        let creds = match files.load(&domain) {
            Ok((identity, trust)) if identity.id() == &host.id => Creds { identity, trust },
            Ok((identity, _)) => {
                tracing::error!(
                    new = %identity.id(),
                    "reloaded certificate names another identity; keeping the old one"
                );
                continue;
            }
            Err(e) => {
                tracing::error!("credential reload failed, keeping the old ones: {e}");
                continue;
            }
        };
        let server =
            identity::server_config(&creds.identity, &creds.trust, &[ALPN_AGENT, ALPN_CTL])
                .map_err(TransportError::from)
                .and_then(|tls| {
                    Ok((
                        transport::quic_server_config(tls.clone(), &host.config.tuning)?,
                        tls,
                    ))
                });
        match server {
            Ok((sc, tls)) => {
                host.endpoint.set_server_config(Some(sc));
                *host.tcp_tls.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tls);
                *host.creds.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(creds);
                crls_seen = files.crls_present();
                tracing::info!("credentials reloaded");
            }
            Err(e) => tracing::error!("reloaded credentials unusable, keeping the old ones: {e}"),
        }
    }
}

/// Reloads the policy and inventory when their files change. A file that
/// does not parse or validate keeps the policy in force; the refusal is
/// logged and audited.
async fn policy_reload_loop(
    host: Arc<Host>,
    files: crate::trust::policy::PolicyFiles,
    mut stamp: Vec<(PathBuf, Option<crate::trust::policy::FileStamp>)>,
) {
    loop {
        changed(host.config.reload_interval, &mut stamp, || files.stamp()).await;
        let loaded = {
            let files = files.clone();
            tokio::task::spawn_blocking(move || crate::trust::policy::PolicySet::load(&files)).await
        };
        match loaded {
            Ok(Ok(p)) => host.set_policy(p),
            Ok(Err(e)) => {
                tracing::error!("policy reload refused, keeping the policy in force: {e}");
                host.audit(convoy_protocol::audit::AuditEvent::PolicyRejected {
                    reason: e.to_string(),
                });
            }
            Err(e) => tracing::error!("policy reload task failed: {e}"),
        }
    }
}

/// Sets the metrics' gauges of the agent's load every second, while it
/// runs.
async fn gauge_loop(host: std::sync::Weak<Host>) {
    loop {
        let Some(h) = host.upgrade() else { return };
        if let Some(m) = &h.metrics {
            m.load(
                h.active.load(std::sync::atomic::Ordering::Relaxed),
                h.budget.active(),
            );
        }
        drop(h);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
