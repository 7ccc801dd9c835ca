//! The operator side of `convoy-ctl/1`: what `convoyctl` (and the tests)
//! use to talk to an agent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::transport::Connection;
use convoy_protocol::ctl::{
    AgentStatus, CtlError, CtlMessage, CtlRequest, CtlResponse, MigrateRequest, MigrationReport,
    Progress, SimVmSpec, VmInfo,
};
use convoy_protocol::names::SpiffeId;
use thiserror::Error;

use crate::transport::{
    self, read_ctl, write_ctl, Choice, Dialer, Kind, TransportError, Tuning, WireError, ALPN_CTL,
};
use crate::trust::identity::{Identity, TrustBundle};
use quinn::Endpoint;

/// Client failures.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Could not connect or authenticate.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The stream failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The agent refused or failed the request.
    #[error("{}", .0.message)]
    Agent(CtlError),
    /// The agent answered something else.
    #[error("unexpected answer: {0:?}")]
    Unexpected(Box<CtlResponse>),
    /// The agent sent another kind of message than an answer.
    #[error("unexpected answer: {0}")]
    NotAnAnswer(&'static str),
    /// The stream ended first.
    #[error("unexpected answer: stream ended without an answer")]
    NoAnswer,
    /// Opening a stream failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
}

/// A connection to one agent's operator API.
#[derive(Debug)]
pub struct CtlClient {
    endpoint: Endpoint,
    conn: Connection,
}

impl CtlClient {
    /// Connects to the agent at `addr`, which must prove it is `agent`,
    /// over QUIC raced with TCP.
    pub async fn connect(
        addr: SocketAddr,
        agent: SpiffeId,
        identity: &Identity,
        trust: &TrustBundle,
    ) -> Result<CtlClient, ClientError> {
        CtlClient::connect_with(addr, agent, identity, trust, Choice::Auto).await
    }

    /// [`CtlClient::connect`] over the transport `choice` says.
    pub async fn connect_with(
        addr: SocketAddr,
        agent: SpiffeId,
        identity: &Identity,
        trust: &TrustBundle,
        choice: Choice,
    ) -> Result<CtlClient, ClientError> {
        let bind = SocketAddr::new(
            if addr.is_ipv4() {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            },
            0,
        );
        let tuning = Tuning::default();
        let endpoint = transport::endpoint(bind, None, &tuning)?;
        let dialer = Dialer::new(endpoint.clone(), choice, tuning);
        let conn = dialer
            .connect(addr, agent, ALPN_CTL, identity, trust)
            .await?;
        Ok(CtlClient { endpoint, conn })
    }

    /// The transport that carries the connection.
    pub fn transport(&self) -> Kind {
        self.conn.kind()
    }

    /// The connection (its statistics, its QUIC controller's state).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    async fn open(&self, req: CtlRequest) -> Result<crate::transport::RecvStream, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        write_ctl(&mut send, &CtlMessage::Request(req)).await?;
        send.finish().map_err(WireError::from)?;
        Ok(recv)
    }

    async fn next(recv: &mut crate::transport::RecvStream) -> Result<CtlResponse, ClientError> {
        match read_ctl(recv).await? {
            Some(CtlMessage::Response(r)) => match *r {
                CtlResponse::Error(e) => Err(ClientError::Agent(e)),
                other => Ok(other),
            },
            Some(other) => Err(ClientError::NotAnAnswer(other.kind())),
            None => Err(ClientError::NoAnswer),
        }
    }

    /// Sends one request and returns its single answer.
    pub async fn request(&self, req: CtlRequest) -> Result<CtlResponse, ClientError> {
        let mut recv = self.open(req).await?;
        CtlClient::next(&mut recv).await
    }

    /// The agent's status.
    pub async fn status(&self) -> Result<AgentStatus, ClientError> {
        match self.request(CtlRequest::Status).await? {
            CtlResponse::Status(s) => Ok(s),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Creates a simulated VM.
    pub async fn vm_create(&self, spec: SimVmSpec) -> Result<VmInfo, ClientError> {
        match self.request(CtlRequest::VmCreate(spec)).await? {
            CtlResponse::VmCreated(v) => Ok(v),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Launches a QEMU VM.
    pub async fn vm_create_qemu(
        &self,
        spec: convoy_protocol::ctl::QemuVmSpec,
    ) -> Result<VmInfo, ClientError> {
        match self.request(CtlRequest::VmCreateQemu(spec)).await? {
            CtlResponse::VmCreated(v) => Ok(v),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Adopts the QEMU VM `spec` that already runs on the agent's host,
    /// listening for QMP on `qmp_socket` (an absolute path there).
    pub async fn vm_adopt_qemu(
        &self,
        spec: convoy_protocol::ctl::QemuVmSpec,
        qmp_socket: String,
    ) -> Result<VmInfo, ClientError> {
        match self
            .request(CtlRequest::VmAdoptQemu(spec, qmp_socket))
            .await?
        {
            CtlResponse::VmCreated(v) => Ok(v),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Lists VMs.
    pub async fn vm_list(&self) -> Result<Vec<VmInfo>, ClientError> {
        match self.request(CtlRequest::VmList).await? {
            CtlResponse::VmList(v) => Ok(v),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// The fleet registry's VMs and agents the operator may see (`Fleet`).
    pub async fn fleet(
        &self,
        q: convoy_protocol::ctl::fleet::FleetQuery,
    ) -> Result<convoy_protocol::ctl::fleet::FleetView, ClientError> {
        match self.request(CtlRequest::Fleet(q)).await? {
            CtlResponse::Fleet(v) => Ok(*v),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Whether this agent would let the migration `q` describes go or
    /// come (its policy, its room); nothing is consumed or reserved.
    pub async fn admission(
        &self,
        q: convoy_protocol::ctl::admission::AdmissionQuery,
    ) -> Result<convoy_protocol::ctl::admission::Admission, ClientError> {
        match self.request(CtlRequest::Admission(Box::new(q))).await? {
            CtlResponse::Admission(a) => Ok(a),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Deletes a VM.
    pub async fn vm_delete(&self, name: convoy_protocol::names::VmName) -> Result<(), ClientError> {
        match self.request(CtlRequest::VmDelete(name)).await? {
            CtlResponse::VmDeleted(_) => Ok(()),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Pauses (`pause`) or resumes a VM; returns it as it is now.
    pub async fn vm_pause(
        &self,
        name: convoy_protocol::names::VmName,
        pause: bool,
    ) -> Result<VmInfo, ClientError> {
        match self.request(CtlRequest::VmPause(name, pause)).await? {
            CtlResponse::VmPaused(v) => Ok(v),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Cancels the outgoing migration of `name`; returns once the VM runs
    /// on this agent again.
    pub async fn abort(&self, name: convoy_protocol::names::VmName) -> Result<(), ClientError> {
        match self.request(CtlRequest::Abort(name)).await? {
            CtlResponse::Aborted(_) => Ok(()),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Resolves the migrations the agent holds unfinished (of `vm`, or
    /// all): one report per migration (`convoyctl recover`).
    pub async fn recover(
        &self,
        vm: Option<convoy_protocol::names::VmName>,
        force_resume_here: bool,
    ) -> Result<Vec<convoy_protocol::ctl::RecoveryReport>, ClientError> {
        match self
            .request(CtlRequest::Recover {
                vm,
                force_resume_here,
            })
            .await?
        {
            CtlResponse::Recovered(r) => Ok(r),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// A snapshot request ([`convoy_protocol::ctl::snapshot`]).
    pub async fn snapshot(
        &self,
        req: convoy_protocol::ctl::snapshot::SnapshotRequest,
    ) -> Result<convoy_protocol::ctl::snapshot::SnapshotResponse, ClientError> {
        match self.request(CtlRequest::Snapshot(req)).await? {
            CtlResponse::Snapshot(r) => Ok(*r),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// The agent's whole audit log (read in chunks), as it is now.
    pub async fn audit_log(&self) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        loop {
            let offset = out.len() as u64;
            match self.request(CtlRequest::AuditRead { offset }).await? {
                CtlResponse::AuditChunk {
                    offset: at,
                    total,
                    bytes,
                } if at == offset => {
                    if bytes.is_empty() || offset + bytes.len() as u64 >= total {
                        out.extend_from_slice(&bytes);
                        return Ok(out);
                    }
                    out.extend_from_slice(&bytes);
                }
                other => return Err(ClientError::Unexpected(Box::new(other))),
            }
        }
    }

    /// Runs a migration, calling `on_progress` for every update.
    pub async fn migrate(
        &self,
        req: MigrateRequest,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<MigrationReport, ClientError> {
        let mut recv = self.open(CtlRequest::Migrate(req)).await?;
        loop {
            match CtlClient::next(&mut recv).await? {
                CtlResponse::Progress(p) => on_progress(&p),
                CtlResponse::Report(r) => return Ok(*r),
                other => return Err(ClientError::Unexpected(Box::new(other))),
            }
        }
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}
