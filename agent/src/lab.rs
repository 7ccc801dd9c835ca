//! An in-process lab: a throw-away PKI and several agents on loopback, with
//! an operator identity to drive them. `convoyctl demo`, `convoyctl bench`
//! and the integration tests all run on it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use convoy_protocol::names::{AgentName, Role, SpiffeId, TrustDomain};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::client::{ClientError, CtlClient};
use crate::identity::{Identity, TrustBundle};
use crate::pki::{Pki, PkiError};
use crate::{Agent, AgentConfig, AgentError};

/// Lab failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
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
    NoAgent(String),
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
    agents: Vec<LabAgent>,
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
        let pki = Pki::init(dir, TrustDomain::new(crate::pki::DEFAULT_TRUST_DOMAIN)?)?;
        let year = Duration::from_secs(365 * 86400);
        let op: AgentName = "operator".parse()?;
        pki.issue(Role::Operator, &op, year)?;
        let operator = pki.identity(Role::Operator, &op)?;
        let trust = pki.trust()?;
        let mut lab = Lab {
            pki,
            operator,
            trust,
            agents: Vec::new(),
        };
        for n in names {
            lab.add_agent(n, &tweak)?;
        }
        Ok(lab)
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
        let mut cfg = AgentConfig::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            identity,
            self.trust.clone(),
        );
        for a in &self.agents {
            cfg.peers.insert(a.name.clone(), a.addr);
        }
        tweak(name, &mut cfg);
        let agent = Agent::bind(cfg)?;
        let addr = agent.local_addr()?;
        let id = agent.id().clone();
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(agent.run(async move {
            let _ = rx.await;
        }));
        self.agents.push(LabAgent {
            name: n,
            id,
            addr,
            stop: Some(stop),
            task: Some(task),
        });
        Ok(())
    }

    /// The agent called `name`.
    pub fn agent(&self, name: &str) -> Result<&LabAgent, LabError> {
        self.agents
            .iter()
            .find(|a| a.name.as_str() == name)
            .ok_or_else(|| LabError::NoAgent(name.into()))
    }

    /// An operator connection to agent `name`.
    pub async fn client(&self, name: &str) -> Result<CtlClient, ClientError> {
        let a = self
            .agent(name)
            .map_err(|e| ClientError::Unexpected(e.to_string()))?;
        CtlClient::connect(a.addr, a.id.clone(), &self.operator, &self.trust).await
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
