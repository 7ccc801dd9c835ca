//! `convoyctl pki`: a CA and certificates for a quick start.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use convoy_agent::trust::pki::{Pki as Dir, DEFAULT_TRUST_DOMAIN};
use convoy_protocol::names::{AgentName, Role, TrustDomain};

use crate::conn::Global;

/// PKI commands.
#[derive(Subcommand, Debug)]
pub enum Pki {
    /// Create a new CA in the PKI directory (--pki).
    Init {
        /// SPIFFE trust domain of the CA.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Issue a certificate and key.
    #[command(subcommand)]
    Issue(Issue),
    /// Revoke an identity: rewrites the CA's CRL (ca.crl), which running
    /// agents reload within seconds.
    Revoke {
        /// `agent` or `operator`.
        #[arg(value_parser = ["agent", "operator"])]
        kind: String,
        /// Its name.
        name: AgentName,
    },
}

/// What to issue.
#[derive(Subcommand, Debug)]
pub enum Issue {
    /// An agent identity: spiffe://DOMAIN/agent/NAME.
    Agent {
        /// Agent name.
        name: AgentName,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// An operator identity: spiffe://DOMAIN/operator/NAME.
    Operator {
        /// Operator name.
        name: AgentName,
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: u64,
    },
}

/// Runs a PKI command.
pub fn run(g: &Global, c: Pki) -> Result<()> {
    match c {
        Pki::Init { trust_domain } => {
            let pki = Dir::init(&g.pki, TrustDomain::new(&trust_domain)?)?;
            if g.json {
                crate::render::json(&serde_json::json!({
                    "dir": pki.dir(), "trust_domain": pki.domain().to_string(),
                    "ca_cert": pki.ca_cert(),
                }))?;
            } else {
                println!(
                    "created CA for trust domain {} in {} (keep ca.key off agent hosts)",
                    pki.domain(),
                    pki.dir().display()
                );
            }
        }
        Pki::Revoke { kind, name } => {
            let pki = Dir::open(&g.pki)?;
            let role = if kind == "agent" {
                Role::Agent
            } else {
                Role::Operator
            };
            let crl = pki.revoke(role, &name)?;
            let id = pki.paths(role, &name).id;
            if g.json {
                crate::render::json(&serde_json::json!({ "revoked": id.to_string(), "crl": crl }))?;
            } else {
                println!("revoked {id}; CRL written to {}", crl.display());
            }
        }
        Pki::Issue(i) => {
            let pki = Dir::open(&g.pki)?;
            let (role, name, days) = match i {
                Issue::Agent { name, days } => (Role::Agent, name, days),
                Issue::Operator { name, days } => (Role::Operator, name, days),
            };
            let issued = pki.issue(role, &name, Duration::from_secs(days * 86_400))?;
            if g.json {
                crate::render::json(&serde_json::json!({
                    "id": issued.id.to_string(), "cert": issued.cert, "key": issued.key,
                }))?;
            } else {
                println!(
                    "issued {}\n  cert {}\n  key  {} (mode 0600)",
                    issued.id,
                    issued.cert.display(),
                    issued.key.display()
                );
            }
        }
    }
    Ok(())
}
