//! `convoyctl policy`: check Cedar policy files against Convoy's schema, and
//! ask them a question offline, with the deciding policies shown.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use convoy_agent::trust::authz::now_unix;
use convoy_agent::trust::policy::{Action, PolicyFiles, PolicySet, Query, VmFacts};
use convoy_protocol::names::{MigrationId, SpiffeId, VmName};
use convoy_protocol::ticket::approval::{ApprovalRole, Approvals, VerifiedApproval};
use convoy_protocol::ticket::{Ticket, VerifiedTicket};
use convoy_protocol::vm::VmAttributes;

use crate::conn::Global;
use crate::render;

/// Policy commands.
#[derive(Subcommand, Debug)]
pub enum Policy {
    /// Parse and validate policies (a .cedar file or a directory of them)
    /// against the Convoy schema, and the inventory when given.
    Validate {
        /// Policy file or directory.
        file: PathBuf,
        /// Inventory (JSON). Without one, an empty inventory is checked.
        #[arg(long)]
        inventory: Option<PathBuf>,
    },
    /// Decide one request offline and explain which policies decided.
    /// Exits non-zero when the request is denied.
    Check(Box<Check>),
    /// Print the schema policies are validated against.
    Schema,
}

/// `policy check` flags.
#[derive(clap::Args, Debug)]
pub struct Check {
    /// Policy file or directory.
    #[arg(long)]
    policy: PathBuf,
    /// Inventory (JSON).
    #[arg(long)]
    inventory: PathBuf,
    /// MigrateOut, MigrateIn, CreateVm, DeleteVm, PauseVm, Abort, Recover,
    /// ReadAudit, PushSnapshot, PullSnapshot or ManageSnapshots.
    #[arg(long)]
    action: Action,
    /// The operator asking (or whose ticket it is), as a SPIFFE ID.
    #[arg(long, value_name = "OPERATOR_ID")]
    by: SpiffeId,
    /// Source agent (MigrateOut, MigrateIn; PullSnapshot: the pusher), as
    /// a SPIFFE ID.
    #[arg(long)]
    source: Option<SpiffeId>,
    /// Destination agent (MigrateOut, MigrateIn), as a SPIFFE ID.
    #[arg(long)]
    destination: Option<SpiffeId>,
    /// The agent asked (CreateVm, DeleteVm, PauseVm, Abort, Recover,
    /// ReadAudit, and the snapshot actions), as a SPIFFE ID.
    #[arg(long)]
    host: Option<SpiffeId>,
    /// VM name.
    #[arg(long, default_value = "vm")]
    vm: VmName,
    /// The VM's tenant.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// The VM's security level.
    #[arg(long, default_value_t = 0)]
    security_level: u8,
    /// A VM label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Recover: the operator forces a resume here
    /// (`--force-resume-here`).
    #[arg(long)]
    force: bool,
    /// PushSnapshot, PullSnapshot, ManageSnapshots: the snapshot URL.
    #[arg(long, default_value = "file:///snapshots")]
    url: String,
    /// PushSnapshot: a recipient agent, as a SPIFFE ID (repeatable).
    #[arg(long = "recipient")]
    recipients: Vec<SpiffeId>,
    /// ManageSnapshots: enroll, list, verify or delete.
    #[arg(long, default_value = "list")]
    operation: String,
    /// MigrateOut, MigrateIn: an approval of the ticket by this operator,
    /// as OPERATOR_ID or OPERATOR_ID=ROLE (tenant, donor, recipient),
    /// taken as verified, each by its own key (repeatable).
    #[arg(long = "approval", value_name = "OPERATOR_ID[=ROLE]", value_parser = parse_approval)]
    approvals: Vec<(SpiffeId, Option<ApprovalRole>)>,
}

fn parse_approval(s: &str) -> Result<(SpiffeId, Option<ApprovalRole>), String> {
    let (id, role) = match s.split_once('=') {
        Some((id, role)) => (
            id,
            Some(role.parse::<ApprovalRole>().map_err(|e| e.to_string())?),
        ),
        None => (s, None),
    };
    let id: SpiffeId = id
        .parse()
        .map_err(|e: convoy_protocol::names::NameError| e.to_string())?;
    if id.role() != convoy_protocol::names::Role::Operator {
        return Err(format!("{id} is not an operator: only operators approve"));
    }
    Ok((id, role))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    VmAttributes::parse_label(s).map_err(|e| e.to_string())
}

/// Runs a policy command.
pub fn run(g: &Global, c: Policy) -> Result<()> {
    match c {
        Policy::Schema => {
            print!("{}", convoy_agent::trust::policy::SCHEMA);
            Ok(())
        }
        Policy::Validate { file, inventory } => validate(g, file, inventory),
        Policy::Check(c) => check(g, *c),
    }
}

fn validate(g: &Global, file: PathBuf, inventory: Option<PathBuf>) -> Result<()> {
    let empty;
    let inventory = match inventory {
        Some(i) => i,
        None => {
            empty = tempfile::NamedTempFile::new()?;
            std::fs::write(empty.path(), "{}")?;
            empty.path().to_owned()
        }
    };
    let set = PolicySet::load(&PolicyFiles {
        policies: file.clone(),
        inventory,
    })?;
    let names: Vec<&str> = set.names().collect();
    if g.json {
        return render::json(&serde_json::json!({
            "valid": true,
            "policies": names,
            "digest": set.digest(),
            "operators": set.inventory().operators.len(),
            "agents": set.inventory().agents.len(),
        }));
    }
    println!(
        "valid: {} policies ({}), inventory of {} operators and {} agents",
        names.len(),
        names.join(", "),
        set.inventory().operators.len(),
        set.inventory().agents.len()
    );
    Ok(())
}

fn need<'a>(v: &'a Option<SpiffeId>, flag: &str, action: Action) -> Result<&'a SpiffeId> {
    v.as_ref()
        .ok_or_else(|| anyhow!("--{flag} is required for {}", action.name()))
}

fn check(g: &Global, c: Check) -> Result<()> {
    let set = PolicySet::load(&PolicyFiles {
        policies: c.policy.clone(),
        inventory: c.inventory.clone(),
    })?;
    let attributes = VmAttributes {
        tenant: c.tenant.clone(),
        security_level: c.security_level,
        labels: c.labels.iter().cloned().collect(),
    };
    attributes.validate()?;
    let vm = VmFacts {
        name: &c.vm,
        attributes: &attributes,
    };
    let now = now_unix();
    let ticket = |source: &SpiffeId, destination: &SpiffeId| Ticket {
        id: MigrationId([0; 16]),
        vm: c.vm.clone(),
        // A policy sees the VM's attributes, not the ticket's subject.
        subject: convoy_protocol::vm::VmSubject {
            memory_bytes: 0,
            disks: Vec::new(),
            attributes: attributes.digest(),
        },
        source: source.clone(),
        destination: destination.clone(),
        plan: convoy_protocol::model::MigrationPlan::default(),
        issued_at: now,
        expires_at: now + 300,
        nonce: [0; 16],
        approvers: Vec::new(),
        approvals: Vec::new(),
    };
    for (i, (who, _)) in c.approvals.iter().enumerate() {
        if c.approvals[..i].iter().any(|(w, _)| w == who) {
            bail!("--approval {who} given twice: each operator approves once");
        }
    }
    let a = c.action;
    let decision = match a {
        Action::MigrateOut | Action::MigrateIn => {
            let (s, d) = (
                need(&c.source, "source", a)?,
                need(&c.destination, "destination", a)?,
            );
            let t = VerifiedTicket {
                ticket: ticket(s, d),
                signer: c.by.clone(),
                approvals: Approvals(
                    c.approvals
                        .iter()
                        .zip(0u8..)
                        .map(|((principal, role), i)| VerifiedApproval {
                            principal: principal.clone(),
                            role: *role,
                            key: convoy_protocol::digest::Digest([i; 32]),
                            approved_at: now,
                        })
                        .collect(),
                ),
            };
            let q = if a == Action::MigrateOut {
                Query::MigrateOut {
                    operator: &c.by,
                    vm,
                    source: s,
                    destination: d,
                    ticket: &t,
                }
            } else {
                Query::MigrateIn {
                    operator: &c.by,
                    vm,
                    source: s,
                    destination: d,
                    ticket: &t,
                }
            };
            set.decide(&q)
        }
        Action::CreateVm | Action::DeleteVm | Action::PauseVm | Action::ViewVm | Action::Abort => {
            let host = need(&c.host, "host", a)?;
            let operator = &c.by;
            set.decide(&match a {
                Action::CreateVm => Query::CreateVm { operator, vm, host },
                Action::DeleteVm => Query::DeleteVm { operator, vm, host },
                Action::PauseVm => Query::PauseVm { operator, vm, host },
                Action::ViewVm => Query::ViewVm { operator, vm, host },
                _ => Query::Abort { operator, vm, host },
            })
        }
        Action::Recover => set.decide(&Query::Recover {
            operator: &c.by,
            vm,
            host: need(&c.host, "host", a)?,
            force: c.force,
        }),
        Action::ReadAudit => set.decide(&Query::ReadAudit {
            operator: &c.by,
            host: need(&c.host, "host", a)?,
        }),
        Action::PushSnapshot => set.decide(&Query::PushSnapshot {
            operator: &c.by,
            vm,
            host: need(&c.host, "host", a)?,
            url: &c.url,
            recipients: &c.recipients,
        }),
        Action::PullSnapshot => set.decide(&Query::PullSnapshot {
            operator: &c.by,
            vm,
            host: need(&c.host, "host", a)?,
            url: &c.url,
            source: need(&c.source, "source", a)?,
        }),
        Action::ManageSnapshots => set.decide(&Query::ManageSnapshots {
            operator: &c.by,
            host: need(&c.host, "host", a)?,
            url: &c.url,
            operation: &c.operation,
        }),
    };
    if g.json {
        render::json(&serde_json::json!({
            "permitted": decision.permitted,
            "policies": decision.policies,
            "reasons": decision.reasons,
            "errors": decision.errors,
            "explanation": decision.explain(),
        }))?;
    } else {
        println!("{}", decision.explain());
        for name in &decision.policies {
            if let Some(text) = set.text(name) {
                println!("\n{name}:\n{}", text.trim_end());
            }
        }
    }
    if !decision.permitted {
        bail!("{} denied", a.name());
    }
    Ok(())
}
