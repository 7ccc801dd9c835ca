//! An in-process lab: a throw-away PKI and several agents on loopback, with
//! an operator identity to drive them. `convoyctl demo`, `convoyctl bench`
//! and the integration tests all run on it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use convoy_protocol::ctl::{Accel, MigrateRequest, QemuVmSpec};
use convoy_protocol::model::MigrationPlan;
use convoy_protocol::names::{AgentName, Role, SpiffeId, TrustDomain, VmName};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::client::{ClientError, CtlClient};
use crate::config::StateError;
use crate::trust::identity::{Identity, TrustBundle};
use crate::trust::pki::{Pki, PkiError};
use crate::{AgentConfig, AgentError};

mod bulk;
pub mod etcd;
pub mod impair;
mod launch;
pub mod link;
pub mod qemu_tls;
pub mod wan;

pub use bulk::{BenchError, BulkCpu, BulkPath, Sink};

/// Lab failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// `CONVOY_LAB_TRANSPORT` names no transport.
    #[error("CONVOY_LAB_TRANSPORT: {0}")]
    Transport(String),
    /// PKI.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// Agent start-up.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Bad name.
    #[error(transparent)]
    Name(#[from] convoy_protocol::names::NameError),
    /// Socket.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// No such agent in the lab.
    #[error("no agent {0} in the lab")]
    NoAgent(AgentName),
    /// A ticket could not be signed.
    #[error(transparent)]
    Ticket(#[from] convoy_protocol::ticket::TicketError),
    /// An operator connection failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The raw baseline failed.
    #[error("raw baseline: {0}")]
    Bench(#[from] BenchError),
    /// The WAN lab's namespaces could not be made.
    #[error("WAN lab: {0}")]
    Wan(#[from] wan::WanError),
}

/// One running agent of the lab.
#[derive(Debug)]
pub struct LabAgent {
    /// Name.
    pub name: AgentName,
    /// Identity.
    pub id: SpiffeId,
    /// Address.
    pub addr: SocketAddr,
    config: AgentConfig,
    retained: crate::host::retain::RetainedImages,
    subjects: crate::host::VmSubjects,
    journal: std::sync::Weak<crate::host::journal::Journal>,
    /// Its network namespace, in a WAN lab.
    netns: Option<String>,
    /// What its threads' CPU time is charged to, in a metered lab.
    meter: Option<crate::cpu::CpuMeter>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A PKI, agents on loopback, and an operator called `operator`.
#[derive(Debug)]
pub struct Lab {
    /// The PKI.
    pub pki: Pki,
    /// The operator's identity.
    pub operator: Identity,
    /// The CA bundle.
    pub trust: TrustBundle,
    /// How the agents dial each other and the operator dials them: from
    /// `CONVOY_LAB_TRANSPORT` (`quic`, `tcp` or `auto`, the default), so
    /// that every lab test runs over either transport.
    pub transport: crate::transport::Choice,
    agents: Vec<LabAgent>,
    /// The namespaces of a WAN lab (deleted with the lab).
    wan: Option<wan::Wan>,
    /// Whether each agent runs on a runtime of its own, its threads' CPU
    /// time counted ([`Lab::start_metered`]).
    metered: bool,
}

/// The transport `CONVOY_LAB_TRANSPORT` names (`auto` when unset).
pub fn lab_transport() -> Result<crate::transport::Choice, LabError> {
    match std::env::var("CONVOY_LAB_TRANSPORT") {
        Ok(v) => v.parse().map_err(LabError::Transport),
        Err(_) => Ok(crate::transport::Choice::Auto),
    }
}

impl Lab {
    /// Creates a PKI in `dir` and starts one agent per name on
    /// `127.0.0.1:0`, each knowing the others as peers. `tweak` may change
    /// each agent's configuration before it starts.
    pub async fn start(
        dir: &Path,
        names: &[&str],
        tweak: impl Fn(&str, &mut AgentConfig),
    ) -> Result<Lab, LabError> {
        Lab::start_in(dir, names, tweak, None, false)
    }

    /// Like [`Lab::start`], with each agent on a runtime of its own whose
    /// threads, and the engine threads they spawn, are charged to a
    /// [`crate::cpu::CpuMeter`] ([`Lab::cpu`]): `convoyctl bench`'s CPU
    /// time per side.
    pub async fn start_metered(
        dir: &Path,
        names: &[&str],
        tweak: impl Fn(&str, &mut AgentConfig),
    ) -> Result<Lab, LabError> {
        Lab::start_in(dir, names, tweak, None, true)
    }

    /// CPU time agent `name`'s threads used so far, in a metered lab.
    pub fn cpu(&self, name: &str) -> Option<Duration> {
        let a = self.agents.iter().find(|a| a.name.as_str() == name)?;
        a.meter.as_ref().map(crate::cpu::CpuMeter::total)
    }

    /// Like [`Lab::start`] with agents `a` and `b` on the two sites of a
    /// [`wan::Wan`] made with `config` (network namespaces joined through
    /// the impairment relay; needs root). The operator reaches them over
    /// the WAN's management link, which is not impaired.
    pub async fn start_wan(
        dir: &Path,
        config: &wan::WanConfig,
        tweak: impl Fn(&str, &mut AgentConfig),
    ) -> Result<Lab, LabError> {
        let wan = wan::Wan::start(config)?;
        Lab::start_in(dir, &["a", "b"], tweak, Some(wan), false)
    }

    /// The WAN of a lab made by [`Lab::start_wan`].
    pub fn wan(&self) -> Option<&wan::Wan> {
        self.wan.as_ref()
    }

    fn start_in(
        dir: &Path,
        names: &[&str],
        tweak: impl Fn(&str, &mut AgentConfig),
        wan: Option<wan::Wan>,
        metered: bool,
    ) -> Result<Lab, LabError> {
        let pki = Pki::init(
            dir,
            TrustDomain::new(crate::trust::pki::DEFAULT_TRUST_DOMAIN)?,
        )?;
        let year = Duration::from_secs(365 * 86400);
        let op: AgentName = "operator".parse()?;
        pki.issue(Role::Operator, &op, year)?;
        let operator = pki.identity(Role::Operator, &op)?;
        let trust = pki.trust()?;
        let mut lab = Lab {
            pki,
            operator,
            trust,
            transport: lab_transport()?,
            agents: Vec::new(),
            wan,
            metered,
        };
        lab.write_policy(names)?;
        for n in names {
            lab.add_agent(n, &tweak)?;
        }
        Ok(lab)
    }

    /// Like [`Lab::start`], with a QEMU backend on every agent: `qemu` is
    /// the only binary allowed, each agent has its own image directory
    /// holding a copy of `guest`'s kernel and initramfs (so disks copied
    /// by migration never collide) and its own runtime directory.
    pub async fn start_qemu(
        dir: &Path,
        names: &[&str],
        qemu: &Path,
        guest: &crate::backend::qemu::guest::TestGuest,
    ) -> Result<Lab, LabError> {
        Self::start_qemu_with(dir, names, qemu, guest, |_, _| {}).await
    }

    /// Like [`Lab::start_qemu`], with `tweak` applied to each agent's
    /// configuration after the QEMU backend is set.
    pub async fn start_qemu_with(
        dir: &Path,
        names: &[&str],
        qemu: &Path,
        guest: &crate::backend::qemu::guest::TestGuest,
        tweak: impl Fn(&str, &mut AgentConfig),
    ) -> Result<Lab, LabError> {
        for n in names {
            let images = Self::qemu_images_in(dir, n);
            std::fs::create_dir_all(&images)?;
            std::fs::copy(&guest.kernel, images.join("vmlinuz"))?;
            std::fs::copy(&guest.initrd, images.join("initrd.img"))?;
        }
        let root = dir.to_owned();
        let qemu = qemu.to_owned();
        Lab::start(dir, names, move |n, cfg| {
            cfg.qemu = Some(crate::backend::qemu::vm::QemuConfig {
                binaries: vec![qemu.clone()],
                images: Self::qemu_images_in(&root, n),
                runtime: Self::qemu_runtime_in(&root, n),
                multifd: Default::default(),
            });
            tweak(n, cfg);
        })
        .await
    }

    fn qemu_images_in(dir: &Path, agent: &str) -> PathBuf {
        dir.join("qemu").join(format!("images-{agent}"))
    }

    /// A lab QEMU agent's image directory.
    pub fn qemu_images(&self, agent: &str) -> PathBuf {
        Self::qemu_images_in(self.pki.dir(), agent)
    }

    /// A lab QEMU agent's runtime directory (one directory per VM).
    pub fn qemu_runtime(&self, agent: &str) -> PathBuf {
        Self::qemu_runtime_in(self.pki.dir(), agent)
    }

    fn qemu_runtime_in(dir: &Path, agent: &str) -> PathBuf {
        dir.join("qemu").join(format!("runtime-{agent}"))
    }

    /// The directory of sim VM `vm`'s disk files on lab agent `agent`
    /// (the default disk directory, STATE_DIR/disks).
    pub fn sim_disks(&self, agent: &str, vm: &str) -> PathBuf {
        self.pki
            .dir()
            .join("state")
            .join(agent)
            .join("disks")
            .join(vm)
    }

    /// The base image directory of lab agent `agent` (the default,
    /// STATE_DIR/bases; created by this call).
    pub fn base_images(&self, agent: &str) -> std::io::Result<PathBuf> {
        let d = self.pki.dir().join("state").join(agent).join("bases");
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// The serial console log of QEMU VM `vm` on lab agent `agent`.
    pub fn qemu_serial(&self, agent: &str, vm: &str) -> PathBuf {
        self.qemu_runtime(agent).join(vm).join("serial.log")
    }

    /// The socket of QEMU VM `vm`'s second serial port on lab agent
    /// `agent`, where the test guest's service answers.
    pub fn qemu_service(&self, agent: &str, vm: &str) -> PathBuf {
        self.qemu_runtime(agent)
            .join(vm)
            .join(crate::backend::qemu::process::SERVICE_SOCKET)
    }

    /// The signed audit log of lab agent `agent` (the default,
    /// STATE_DIR/audit.log).
    pub fn audit_log(&self, agent: &str) -> PathBuf {
        self.pki.dir().join("state").join(agent).join("audit.log")
    }

    /// A sim VM of mixed content, without disks.
    pub fn sim_test_vm(
        name: VmName,
        memory_bytes: u64,
        dirty_pages_per_sec: u64,
    ) -> convoy_protocol::ctl::SimVmSpec {
        convoy_protocol::ctl::SimVmSpec {
            name,
            memory_bytes,
            dirty_pages_per_sec,
            hot_set_pct: 10,
            content: convoy_protocol::ctl::ContentProfile::Mixed,
            seed: 1,
            attributes: Default::default(),
            disks: Vec::new(),
            service_requests_per_sec: 0,
        }
    }

    /// A QEMU VM of the test guest (kernel `vmlinuz`, initramfs
    /// `initrd.img` in the image directory), TCG, one vCPU.
    pub fn qemu_test_vm(name: VmName, memory_mib: u64, append: String) -> QemuVmSpec {
        QemuVmSpec {
            name,
            binary: "qemu-system-x86_64".into(),
            memory_mib,
            vcpus: 1,
            kernel: Some("vmlinuz".into()),
            initrd: Some("initrd.img".into()),
            append,
            disks: Vec::new(),
            accel: Accel::Tcg,
            attributes: Default::default(),
        }
    }

    /// The lab's policy: the example policies of `agent/policy/examples`,
    /// and an inventory where the lab operator is an admin of tenant
    /// `default` and agents alternate between zones `lab-a` and `lab-b`,
    /// all at security level 2.
    fn write_policy(&self, names: &[&str]) -> Result<(), LabError> {
        let files = self.policy_files();
        std::fs::create_dir_all(&files.policies)?;
        for (name, text) in crate::trust::policy::EXAMPLES {
            std::fs::write(files.policies.join(name), text)?;
        }
        let domain = self.trust.domain().clone();
        let mut inv = crate::trust::policy::Inventory::default();
        inv.operators.insert(
            self.operator.id().clone(),
            crate::trust::policy::OperatorFacts {
                tenants: ["default".to_string()].into(),
                groups: ["admins".to_string()].into(),
            },
        );
        for (i, n) in names.iter().enumerate() {
            inv.agents.insert(
                SpiffeId::agent(domain.clone(), n.parse()?),
                crate::trust::policy::HostFacts {
                    zone: if i % 2 == 0 { "lab-a" } else { "lab-b" }.into(),
                    security_level: 2,
                    groups: Default::default(),
                },
            );
        }
        self.write_inventory(&inv)
    }

    /// Where the lab's policy lives (agents reload it when it changes).
    pub fn policy_files(&self) -> crate::trust::policy::PolicyFiles {
        crate::trust::policy::files_in(&self.pki.dir().join("policy"))
    }

    /// Replaces the lab's inventory (agents reload it).
    pub fn write_inventory(&self, inv: &crate::trust::policy::Inventory) -> Result<(), LabError> {
        let text = serde_json::to_string_pretty(inv)
            .map_err(|e| LabError::Io(std::io::Error::other(e)))?;
        // Atomically, as an operator should: agents never see half a file.
        let path = self.policy_files().inventory;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, path)?;
        Ok(())
    }

    /// The inventory in force.
    pub fn inventory(&self) -> Result<crate::trust::policy::Inventory, LabError> {
        let text = std::fs::read_to_string(self.policy_files().inventory)?;
        crate::trust::policy::Inventory::parse(&text)
            .map_err(|e| LabError::Io(std::io::Error::other(e)))
    }

    /// Issues another operator identity (for tests of tenants).
    pub fn add_operator(&self, name: &str) -> Result<Identity, LabError> {
        let n: AgentName = name.parse()?;
        self.pki
            .issue(Role::Operator, &n, Duration::from_secs(365 * 86400))?;
        Ok(self.pki.identity(Role::Operator, &n)?)
    }

    /// An operator connection to agent `name` as `operator`.
    pub async fn client_as(&self, name: &str, operator: &Identity) -> Result<CtlClient, LabError> {
        let a = self.agent(name)?;
        Ok(
            CtlClient::connect_with(a.addr, a.id.clone(), operator, &self.trust, self.transport)
                .await?,
        )
    }

    fn add_agent(
        &mut self,
        name: &str,
        tweak: &impl Fn(&str, &mut AgentConfig),
    ) -> Result<(), LabError> {
        let n: AgentName = name.parse()?;
        self.pki
            .issue(Role::Agent, &n, Duration::from_secs(365 * 86400))?;
        let identity = self.pki.identity(Role::Agent, &n)?;
        let site = self.wan.as_ref().and_then(|w| match name {
            "a" => Some(w.a.clone()),
            "b" => Some(w.b.clone()),
            _ => None,
        });
        let ip = site
            .as_ref()
            .map_or(std::net::Ipv4Addr::LOCALHOST, |s| s.addr);
        let mut cfg = AgentConfig::new(SocketAddr::from((ip, 0)), identity, self.trust.clone());
        for a in &self.agents {
            cfg.peers.insert(a.name.clone(), a.addr);
        }
        cfg.state_dir = Some(self.pki.dir().join("state").join(name));
        let files = self.pki.paths(Role::Agent, &n);
        cfg.files = Some(crate::config::CredentialFiles {
            cert: files.cert,
            key: files.key,
            ca: self.pki.ca_cert(),
            crl: Some(self.pki.crl_path()),
            federation: Vec::new(),
        });
        cfg.reload_interval = Duration::from_millis(200);
        cfg.policy = Some(self.policy_files());
        // The lab's VMs live no longer than the demo or test that made
        // them (a real agent leaves its VMs running when it stops).
        cfg.on_exit = crate::config::OnExit::DestroyVms;
        cfg.transport = self.transport;
        tweak(name, &mut cfg);
        let netns = site.map(|s| s.netns);
        let meter = self.metered.then(crate::cpu::CpuMeter::new);
        let launched = launch::launch(cfg.clone(), netns.as_deref(), meter.as_ref())?;
        let f = launched.facts;
        cfg.listen = f.addr;
        self.agents.push(LabAgent {
            name: n,
            id: f.id,
            addr: f.addr,
            config: cfg,
            retained: f.retained,
            subjects: f.subjects,
            journal: f.journal,
            netns,
            meter,
            stop: Some(launched.stop),
            task: Some(launched.task),
        });
        Ok(())
    }

    /// Stops agent `name` and starts it again on the same address with the
    /// same configuration and state directory. Its VMs are destroyed as it
    /// stops (the lab's agents run with [`crate::config::OnExit::DestroyVms`]),
    /// as in a crash of the whole host; the restarted agent finds none.
    pub async fn restart(&mut self, name: &str) -> Result<(), LabError> {
        self.stop_agent(name).await?;
        self.start_agent(name).await
    }

    /// Stops agent `name` (its VMs are lost), to start it again with
    /// [`Lab::start_agent`] after a test has done something to its state.
    /// Returns once the agent's last tasks have let go of its state (in one
    /// process they may outlive it a little; a real stop ends the process),
    /// so that nothing writes there any more.
    pub async fn stop_agent(&mut self, name: &str) -> Result<(), LabError> {
        let a = self.agent_mut(name)?;
        if let Some(s) = a.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = a.task.take() {
            let _ = t.await;
        }
        let Some(db) = a.config.state_dir.as_ref().map(|d| d.join("state.redb")) else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(
            crate::trust::authz::ReplayCache::open(&db),
            Err(redb::Error::DatabaseAlreadyOpen)
        ) && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    fn agent_mut(&mut self, name: &str) -> Result<&mut LabAgent, LabError> {
        let name: AgentName = name.parse()?;
        self.agents
            .iter_mut()
            .find(|a| a.name == name)
            .ok_or(LabError::NoAgent(name))
    }

    /// Starts agent `name`, stopped by [`Lab::stop_agent`], on the same
    /// address with the same configuration and state directory.
    pub async fn start_agent(&mut self, name: &str) -> Result<(), LabError> {
        let a = self.agent_mut(name)?;
        // In one process the old agent's last tasks may still hold its
        // state (a real restart ends the process): wait for it to let go
        // of the replay database before the new one opens it.
        let deadline = Instant::now() + Duration::from_secs(20);
        let launched = loop {
            match launch::launch(a.config.clone(), a.netns.as_deref(), a.meter.as_ref()) {
                Err(LabError::Agent(AgentError::State {
                    source:
                        StateError::ReplayCache(redb::Error::DatabaseAlreadyOpen)
                        | StateError::Journal(crate::host::journal::JournalError::Storage(
                            redb::Error::DatabaseAlreadyOpen,
                        ))
                        | StateError::VmRegistry(crate::host::vmdb::VmDbError::Open(
                            redb::Error::DatabaseAlreadyOpen,
                        )),
                    ..
                })) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other?,
            }
        };
        a.retained = launched.facts.retained;
        a.subjects = launched.facts.subjects;
        a.journal = launched.facts.journal;
        a.stop = Some(launched.stop);
        a.task = Some(launched.task);
        Ok(())
    }

    /// The migration journal of agent `name`, every record it keeps
    /// (empty once the agent stopped).
    pub fn journal(
        &self,
        name: &str,
    ) -> Result<Vec<convoy_protocol::journal::JournalRecord>, LabError> {
        match self.agent(name)?.journal.upgrade() {
            Some(j) => j
                .records()
                .map_err(|e| LabError::Io(std::io::Error::other(e))),
            None => Ok(Vec::new()),
        }
    }

    /// Releases the migration agent `name` holds at its
    /// `pause_at` point ([`crate::pause`]).
    pub fn release(&self, name: &str) -> Result<(), LabError> {
        let a = self.agent(name)?;
        let dir = a.config.state_dir.as_ref().ok_or_else(|| {
            LabError::Io(std::io::Error::other("the agent has no state directory"))
        })?;
        std::fs::write(dir.join(crate::pause::RELEASE_FILE), b"")?;
        Ok(())
    }

    /// The images agent `name` retained for VMs that left it (for tests:
    /// they hold ciphertext only).
    pub fn retained_images(
        &self,
        name: &str,
    ) -> Result<Vec<Arc<convoy_protocol::reuse::RetainedImage>>, LabError> {
        Ok(self.agent(name)?.retained.images())
    }

    /// The agent called `name`.
    pub fn agent(&self, name: &str) -> Result<&LabAgent, LabError> {
        let name: AgentName = name.parse()?;
        self.agents
            .iter()
            .find(|a| a.name == name)
            .ok_or(LabError::NoAgent(name))
    }

    /// A migration request from agent `from` to agent `to` for `vm`,
    /// with a ticket signed by the lab's operator.
    pub fn migrate_request(
        &self,
        vm: &str,
        from: &str,
        to: &str,
        options: MigrationPlan,
    ) -> Result<MigrateRequest, LabError> {
        self.migrate_request_by(&self.operator, vm, from, to, options)
    }

    /// A migration request with a ticket signed by `operator`.
    pub fn migrate_request_by(
        &self,
        operator: &Identity,
        vm: &str,
        from: &str,
        to: &str,
        options: MigrationPlan,
    ) -> Result<MigrateRequest, LabError> {
        let (src, dst) = (self.agent(from)?, self.agent(to)?);
        let vm: VmName = vm.parse()?;
        // As convoyctl does: the VM as its agent reports it (a VM it does
        // not hold gets a subject that matches nothing).
        let subject = src
            .subjects
            .subject(&vm)
            .unwrap_or_else(|| Lab::no_subject(0));
        let ticket = crate::trust::authz::issue_ticket(
            operator,
            &vm,
            subject,
            src.id.clone(),
            dst.id.clone(),
            &options,
            crate::trust::authz::DEFAULT_TICKET_LIFETIME,
        )?;
        Ok(MigrateRequest {
            vm,
            to: dst.name.clone(),
            to_addr: Some(dst.addr.to_string()),
            ticket,
        })
    }

    /// The subject of a VM of `memory_bytes`, no disks and default
    /// attributes: what a hand-made proposal describes.
    pub fn no_subject(memory_bytes: u64) -> convoy_protocol::vm::VmSubject {
        convoy_protocol::vm::VmSubject::plain(memory_bytes)
    }

    /// An operator connection to agent `name`.
    pub async fn client(&self, name: &str) -> Result<CtlClient, LabError> {
        self.client_as(name, &self.operator).await
    }

    /// Stops every agent.
    pub async fn shutdown(mut self) {
        for a in &mut self.agents {
            if let Some(s) = a.stop.take() {
                let _ = s.send(());
            }
        }
        for a in &mut self.agents {
            if let Some(t) = a.task.take() {
                let _ = t.await;
            }
        }
    }
}
