//! The policy decided end to end: the shipped examples, forbids that win or
//! error, files refused whole.

use std::collections::BTreeMap;
use std::path::PathBuf;

use convoy_protocol::digest::Digest;
use convoy_protocol::names::{MigrationId, SpiffeId, VmName};
use convoy_protocol::ticket::approval::{ApprovalRole, Approvals, VerifiedApproval};
use convoy_protocol::ticket::{Ticket, VerifiedTicket};
use convoy_protocol::vm::VmAttributes;

use super::*;

const INVENTORY: &str = include_str!("../../../policy/examples/inventory.json");

fn id(s: &str) -> SpiffeId {
    format!("spiffe://convoy.example/{s}").parse().unwrap()
}

fn set(extra: &[&str]) -> PolicySet {
    let mut sources: Vec<(PathBuf, String)> = EXAMPLES
        .iter()
        .map(|(n, t)| (PathBuf::from(n), (*t).to_owned()))
        .collect();
    for (i, e) in extra.iter().enumerate() {
        sources.push((PathBuf::from(format!("extra{i}.cedar")), (*e).to_owned()));
    }
    PolicySet::from_sources(&sources, INVENTORY).unwrap()
}

fn ticket() -> Ticket {
    Ticket {
        id: MigrationId([1; 16]),
        vm: "vm".parse().unwrap(),
        subject: convoy_protocol::vm::VmSubject::plain(1 << 20),
        source: id("agent/a"),
        destination: id("agent/b"),
        plan: Default::default(),
        issued_at: 1000,
        expires_at: 2000,
        nonce: [0; 16],
        approvers: Vec::new(),
        approvals: Vec::new(),
    }
}

fn attrs(tenant: &str, level: u8) -> VmAttributes {
    VmAttributes {
        tenant: tenant.into(),
        security_level: level,
        labels: BTreeMap::new(),
    }
}

/// The ticket signed by `op`, approved by `approvals` (who, role).
fn verified(op: &str, approvals: &[(&str, Option<ApprovalRole>)]) -> VerifiedTicket {
    VerifiedTicket {
        ticket: ticket(),
        signer: id(op),
        approvals: Approvals(
            approvals
                .iter()
                .enumerate()
                .map(|(i, (who, role))| VerifiedApproval {
                    principal: who.parse().unwrap(),
                    role: *role,
                    key: Digest([u8::try_from(i).unwrap(); 32]),
                    approved_at: 1000,
                })
                .collect(),
        ),
    }
}

fn out(p: &PolicySet, op: &str, a: &VmAttributes, to: &str) -> Decision {
    out_approved(p, op, a, to, &[])
}

fn out_approved(
    p: &PolicySet,
    op: &str,
    a: &VmAttributes,
    to: &str,
    approvals: &[(&str, Option<ApprovalRole>)],
) -> Decision {
    let vm: VmName = "vm".parse().unwrap();
    let t = verified(op, approvals);
    p.decide(&Query::MigrateOut {
        operator: &id(op),
        vm: VmFacts {
            name: &vm,
            attributes: a,
        },
        source: &id("agent/a"),
        destination: &to.parse().unwrap_or_else(|_| id(to)),
        ticket: &t,
    })
}

fn into(p: &PolicySet, op: &str, a: &VmAttributes, from: &str, to: &str) -> Decision {
    let vm: VmName = "vm".parse().unwrap();
    let t = verified(op, &[]);
    p.decide(&Query::MigrateIn {
        operator: &id(op),
        vm: VmFacts {
            name: &vm,
            attributes: a,
        },
        source: &id(from),
        destination: &id(to),
        ticket: &t,
    })
}

#[test]
fn tenants_move_only_their_own_vms() {
    let p = set(&[]);
    let d = out(&p, "operator/alice", &attrs("acme", 1), "agent/b");
    assert!(d.permitted, "{}", d.explain());
    assert_eq!(d.policies, ["tenant-owns-vm"]);
    let d = out(&p, "operator/alice", &attrs("globex", 1), "agent/b");
    assert!(!d.permitted);
    assert!(d.explain().contains("default deny"), "{}", d.explain());
    // Admins may move anything (that no forbid stops).
    let d = out(&p, "operator/root", &attrs("globex", 1), "agent/b");
    assert!(d.permitted, "{}", d.explain());
    // An operator the inventory does not know holds no tenant.
    let d = out(&p, "operator/mallory", &attrs("acme", 1), "agent/b");
    assert!(!d.permitted);
}

#[test]
fn moves_between_providers_need_the_tenant_donor_and_recipient() {
    let p = set(&[]);
    let x = "spiffe://partner.example/agent/x";
    let alice = "spiffe://convoy.example/operator/alice";
    let dora = "spiffe://convoy.example/operator/root";
    let rex = "spiffe://partner.example/operator/rex";
    let acme = attrs("acme", 1);
    // Within one provider no approval is needed.
    assert!(out(&p, "operator/alice", &acme, "agent/b").permitted);
    // To another provider: refused, naming the policy, until all three
    // roles approved.
    let d = out(&p, "operator/alice", &acme, x);
    assert!(!d.permitted);
    assert_eq!(d.policies, ["providers-approve-moves-between-them"]);
    let two = [
        (alice, Some(ApprovalRole::Tenant)),
        (dora, Some(ApprovalRole::Donor)),
    ];
    assert!(!out_approved(&p, "operator/alice", &acme, x, &two).permitted);
    let three = [two[0], two[1], (rex, Some(ApprovalRole::Recipient))];
    let d = out_approved(&p, "operator/alice", &acme, x, &three);
    assert!(d.permitted, "{}", d.explain());
    // A tenant approval by an operator the inventory does not list for the
    // VM's tenant is an error, not a role.
    let d = out_approved(&p, "operator/alice", &attrs("globex", 1), x, &three);
    assert!(!d.permitted);
    assert!(
        d.explain()
            .contains("does not list it for tenant \"globex\""),
        "{}",
        d.explain()
    );
    // Policies see who approved and how many keys did.
    let p = set(&[
        r#"forbid (principal, action == Convoy::Action::"MigrateOut", resource)
        unless { context.ticket.approvals >= 2 &&
                 context.ticket.approvers.contains("spiffe://partner.example/operator/rex") };"#,
    ]);
    assert!(!out_approved(&p, "operator/alice", &acme, "agent/b", &two).permitted);
    let d = out_approved(&p, "operator/alice", &acme, "agent/b", &three);
    assert!(d.permitted, "{}", d.explain());
}

#[test]
fn forbid_overrides_permit_and_names_itself() {
    let p = set(&[]);
    // Host c has level 1: a level-2 VM may not go there, even for root.
    let d = out(&p, "operator/root", &attrs("acme", 2), "agent/c");
    assert!(!d.permitted);
    assert_eq!(d.policies, ["no-downgrade"]);
    assert!(
        d.explain().contains("security level is below"),
        "{}",
        d.explain()
    );
    // Pinned VMs stay.
    let mut a = attrs("acme", 1);
    a.labels.insert("pinned".into(), "true".into());
    let d = out(&p, "operator/alice", &a, "agent/b");
    assert_eq!(d.policies, ["pinned-vms-stay"]);
}

#[test]
fn migrate_in_checks_zone_tenant_and_level() {
    let p = set(&[]);
    let d = into(
        &p,
        "operator/alice",
        &attrs("acme", 2),
        "agent/a",
        "agent/b",
    );
    assert!(d.permitted, "{}", d.explain());
    // From the dmz zone: refused.
    let d = into(
        &p,
        "operator/alice",
        &attrs("acme", 1),
        "agent/c",
        "agent/b",
    );
    assert_eq!(d.policies, ["only-from-named-zones"]);
    // Operator of another tenant.
    let d = into(
        &p,
        "operator/alice",
        &attrs("globex", 1),
        "agent/a",
        "agent/b",
    );
    assert!(!d.permitted);
    // A source host the inventory does not know.
    let d = into(
        &p,
        "operator/alice",
        &attrs("acme", 1),
        "agent/x",
        "agent/b",
    );
    assert!(
        d.explain().contains("not in the policy inventory"),
        "{}",
        d.explain()
    );
}

#[test]
fn an_erroring_forbid_denies() {
    // Overflows at evaluation (valid against the schema): Cedar skips
    // it, so its permit-only result would be Allow.
    let p = set(&[r#"@id("overflowing-forbid")
            forbid (principal, action == Convoy::Action::"MigrateOut", resource is Convoy::Vm)
            when { context.ticket.expires_at * 9223372036854775807 > 0 };"#]);
    let d = out(&p, "operator/alice", &attrs("acme", 1), "agent/b");
    assert!(!d.permitted);
    // Cedar alone allowed it: the permit matched.
    assert_eq!(d.policies, ["tenant-owns-vm"]);
    assert!(
        d.explain()
            .contains("[overflowing-forbid] failed to evaluate"),
        "{}",
        d.explain()
    );
}

#[test]
fn bad_policies_and_inventories_are_refused_with_the_file_named() {
    let src = |t: &str| vec![(PathBuf::from("bad.cedar"), t.to_owned())];
    let e = PolicySet::from_sources(&src("permit (principal, action, resource"), INVENTORY)
        .unwrap_err();
    assert!(matches!(e, PolicyError::Parse { .. }), "{e}");
    assert!(e.to_string().contains("bad.cedar"), "{e}");
    // Parses, but an attribute the schema does not have.
    let e = PolicySet::from_sources(
        &src(
            "permit (principal, action, resource is Convoy::Vm) when { resource.owner == \"x\" };",
        ),
        INVENTORY,
    )
    .unwrap_err();
    assert!(matches!(e, PolicyError::Invalid { .. }), "{e}");
    // Unknown action.
    let e = PolicySet::from_sources(
        &src("permit (principal, action == Convoy::Action::\"Teleport\", resource);"),
        INVENTORY,
    )
    .unwrap_err();
    assert!(matches!(e, PolicyError::Invalid { .. }), "{e}");
    let good = src("permit (principal, action, resource);");
    for inv in [
        "{",
        r#"{"operators": {"spiffe://d/agent/a": {}}}"#,
        r#"{"agents": {"spiffe://d/agent/a": {"zone": "z"}}}"#,
        r#"{"agents": {"spiffe://d/agent/a": {"zone": "z", "security_level": 1, "colour": 1}}}"#,
        r#"{"hosts": {}}"#,
    ] {
        let e = PolicySet::from_sources(&good, inv).unwrap_err();
        assert!(matches!(e, PolicyError::Inventory { .. }), "{inv}: {e}");
    }
}

#[test]
fn unchecked_tag_access_is_refused_at_load() {
    let e = PolicySet::from_sources(
        &[(
            PathBuf::from("tags.cedar"),
            "permit (principal, action, resource is Convoy::Vm) when { resource.getTag(\"env\") == \"prod\" };".into(),
        )],
        INVENTORY,
    )
    .unwrap_err();
    assert!(matches!(e, PolicyError::Invalid { .. }), "{e}");
}

#[test]
fn no_policy_denies_everything() {
    let p = PolicySet::from_sources(&[(PathBuf::from("empty.cedar"), String::new())], INVENTORY)
        .unwrap();
    assert!(p.is_empty());
    let d = out(&p, "operator/root", &attrs("acme", 1), "agent/b");
    assert!(!d.permitted);
}
