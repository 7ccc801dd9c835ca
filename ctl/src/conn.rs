//! What every command that talks to an agent needs: the PKI directory, the
//! operator identity, and the agent's `NAME@HOST:PORT`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use convoy_agent::client::CtlClient;
use convoy_agent::trust::identity::Identity;
use convoy_agent::trust::pki::Pki;
use convoy_protocol::names::{AgentName, Role, SpiffeId, TrustDomain};

/// Flags shared by all commands.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// PKI directory (from `convoyctl pki init`).
    #[arg(long, global = true, env = "CONVOY_PKI", default_value = "convoy-pki")]
    pub pki: PathBuf,
    /// Operator name: uses operators/NAME.crt and .key from the PKI.
    #[arg(
        long,
        global = true,
        env = "CONVOY_OPERATOR",
        default_value = "operator"
    )]
    pub operator: String,
    /// The agent to talk to, as NAME@HOST:PORT.
    #[arg(long, global = true, env = "CONVOY_AGENT")]
    pub agent: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// How to reach the agent: quic, tcp, or auto (QUIC raced with TLS
    /// over TCP, which starts after a short head start).
    #[arg(long, global = true, env = "CONVOY_TRANSPORT", default_value = "auto")]
    pub transport: convoy_agent::transport::Choice,
}

/// An agent reference: its name and, if given, its address.
#[derive(Debug, Clone)]
pub struct AgentRef {
    /// Name.
    pub name: AgentName,
    /// Address.
    pub addr: Option<SocketAddr>,
}

/// Parses `NAME` or `NAME@HOST:PORT`.
pub fn parse_agent_ref(s: &str) -> Result<AgentRef> {
    let (name, addr) = match s.split_once('@') {
        Some((n, a)) => {
            let addr = a
                .to_socket_addrs()
                .with_context(|| format!("cannot resolve {a:?}"))?
                .next()
                .ok_or_else(|| anyhow!("{a:?} resolves to no address"))?;
            (n, Some(addr))
        }
        None => (s, None),
    };
    Ok(AgentRef {
        name: name.parse()?,
        addr,
    })
}

/// An operator connection to one agent, with what signing tickets needs.
pub struct Session {
    /// The connection.
    pub client: CtlClient,
    /// The operator's identity (signs tickets).
    pub operator: Identity,
    /// The agent's identity.
    pub agent: SpiffeId,
    /// The PKI's trust domain.
    pub domain: TrustDomain,
}

/// The PKI and the operator identity (`--pki`, `--operator`): what signs
/// tickets and approvals, with no agent needed.
pub fn operator(g: &Global) -> Result<(Pki, Identity)> {
    let pki = Pki::open(&g.pki)?;
    let op: AgentName = g.operator.parse()?;
    let identity = pki.identity(Role::Operator, &op).with_context(|| {
        format!("operator {op} (issue it with `convoyctl pki issue operator {op}`)")
    })?;
    Ok((pki, identity))
}

/// Connects to the agent named by `--agent` with the operator identity.
pub async fn client(g: &Global) -> Result<CtlClient> {
    Ok(session(g).await?.client)
}

/// Like [`client`], keeping the operator identity for signing tickets.
pub async fn session(g: &Global) -> Result<Session> {
    let Some(agent) = &g.agent else {
        bail!("which agent? pass --agent NAME@HOST:PORT (or set CONVOY_AGENT)");
    };
    let agent = parse_agent_ref(agent)?;
    let Some(addr) = agent.addr else {
        bail!("--agent needs an address: NAME@HOST:PORT");
    };
    let (pki, identity) = operator(g)?;
    let trust = pki.trust()?;
    let id = SpiffeId::agent(pki.domain().clone(), agent.name.clone());
    let client = CtlClient::connect_with(addr, id.clone(), &identity, &trust, g.transport)
        .await
        .with_context(|| format!("connecting to {id} at {addr}"))?;
    Ok(Session {
        client,
        operator: identity,
        agent: id,
        domain: pki.domain().clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_refs() {
        let r = parse_agent_ref("b@127.0.0.1:7101").unwrap();
        assert_eq!(r.name.as_str(), "b");
        assert_eq!(r.addr, Some("127.0.0.1:7101".parse().unwrap()));
        assert!(parse_agent_ref("b").unwrap().addr.is_none());
        assert!(parse_agent_ref("b@nowhere").is_err());
        assert!(parse_agent_ref("bad name@127.0.0.1:1").is_err());
    }
}
