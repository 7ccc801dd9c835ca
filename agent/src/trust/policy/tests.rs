//! The policy decided end to end: the shipped examples, forbids that win or
//! error, files refused whole.

use std::collections::BTreeMap;
use std::path::PathBuf;

use convoy_protocol::names::{MigrationId, SpiffeId, VmName};
use convoy_protocol::ticket::Ticket;
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
    }
}

fn attrs(tenant: &str, level: u8) -> VmAttributes {
    VmAttributes {
        tenant: tenant.into(),
        security_level: level,
        labels: BTreeMap::new(),
    }
}

fn out(p: &PolicySet, op: &str, a: &VmAttributes, to: &str) -> Decision {
    let vm: VmName = "vm".parse().unwrap();
    let t = ticket();
    p.decide(&Query::MigrateOut {
        operator: &id(op),
        vm: VmFacts {
            name: &vm,
            attributes: a,
        },
        source: &id("agent/a"),
        destination: &id(to),
        ticket: &t,
    })
}

fn into(p: &PolicySet, op: &str, a: &VmAttributes, from: &str, to: &str) -> Decision {
    let vm: VmName = "vm".parse().unwrap();
    let t = ticket();
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
