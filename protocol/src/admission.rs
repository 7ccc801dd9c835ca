//! The destination's admission of a proposal against the operator's ticket:
//! one rule for every backend.
//!
//! A source agent proposes a migration with the operator's signed ticket and
//! a manifest of what it will send. The agent verifies the ticket's
//! signature chain, expiry and replay (crypto lives in the agent); this
//! module then checks, before anything is reserved, that the proposal is
//! exactly what the ticket grants:
//!
//! - the VM and migration id are the ticket's;
//! - the plan the source announces ([`Manifest::plan`]) equals the ticket's
//!   [`MigrationPlan`] in every field (mode, streams, limits, storage,
//!   start-paused, force-stop, tuning), and the plan itself is valid;
//! - what the manifest says about the stream follows from that plan: the
//!   number of data streams, whether a post-copy switch may come, whether
//!   the VM starts paused, whether disks travel — for a page-batch (sim) VM
//!   and a QEMU stream alike.
//!
//! The destination state machine holds the source to the admitted plan
//! afterwards (a [`crate::message::PostcopySwitch`] whose storage flag differs
//! from [`MigrationPlan::storage_postcopy`] is refused there).

use thiserror::Error;

use crate::message::Manifest;
use crate::model::{MigrationMode, MigrationPlan, PlanError};
use crate::names::{MigrationId, VmName};
use crate::ticket::Ticket;
use crate::vm::{DiskSubject, VmAttributes, VmSubject};

/// Why a proposal is not what its ticket grants. Each variant names the
/// field that differs.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AdmissionError {
    /// The proposal moves another VM than the ticket's.
    #[error("the proposal moves VM {proposed}, the ticket VM {ticket}")]
    Vm {
        /// The ticket's VM.
        ticket: VmName,
        /// The proposal's VM.
        proposed: VmName,
    },
    /// The proposal's migration id is not the ticket's.
    #[error("the proposal's migration id differs from the ticket's")]
    MigrationId,
    /// The plan the source announces differs from the ticket's.
    #[error("the source's plan differs from the ticket's in {field}: ticket {ticket}, proposal {proposed}")]
    Plan {
        /// The plan field.
        field: &'static str,
        /// The ticket's value.
        ticket: String,
        /// The proposal's value.
        proposed: String,
    },
    /// The ticket's plan is not a valid plan.
    #[error("the ticket's plan is invalid: {0}")]
    InvalidPlan(PlanError),
    /// The manifest opens another number of data streams than the plan's.
    #[error("the manifest opens {manifest} data streams, the ticket grants {plan}")]
    Streams {
        /// Streams the plan grants.
        plan: u16,
        /// Streams the manifest announces.
        manifest: u16,
    },
    /// The manifest announces (or omits) a post-copy switch against the
    /// plan's mode.
    #[error("the manifest {} a post-copy switch, the ticket grants {mode}", if *announced { "announces" } else { "does not announce" })]
    Postcopy {
        /// The plan's mode.
        mode: MigrationMode,
        /// Whether the manifest announces post-copy.
        announced: bool,
    },
    /// The QEMU manifest's mode is not the plan's.
    #[error("the QEMU manifest runs {manifest}, the ticket grants {plan}")]
    QemuMode {
        /// The plan's mode.
        plan: MigrationMode,
        /// The QEMU manifest's mode.
        manifest: MigrationMode,
    },
    /// The QEMU manifest's multifd channels do not follow from the plan's
    /// streams (neither as many nor none).
    #[error("the QEMU manifest opens {manifest} multifd channels, the ticket's {streams} streams allow {expected} or none")]
    QemuChannels {
        /// The plan's streams.
        streams: u16,
        /// Multifd channels those streams allow (besides none).
        expected: u16,
        /// The manifest's multifd channels.
        manifest: u16,
    },
    /// The manifest's start-paused flag differs from the plan's.
    #[error("the manifest {} the VM paused, the ticket {}", if *manifest { "starts" } else { "does not start" }, if *plan { "asks for it" } else { "does not" })]
    StartPaused {
        /// The plan's flag.
        plan: bool,
        /// The manifest's flag.
        manifest: bool,
    },
    /// Disks travel but the ticket does not allow copying storage.
    #[error("the VM's disks travel but the ticket does not allow copying storage")]
    DisksNotGranted,
    /// Something the plan grants that a QEMU stream cannot do.
    #[error("a QEMU migration cannot {0}")]
    NotForQemu(&'static str),
    /// The VM the manifest describes (memory size, disks) is not the one
    /// the ticket was issued for.
    #[error("the proposal describes {proposed}; the ticket was issued for {ticket}")]
    Subject {
        /// What the ticket binds.
        ticket: Box<VmSubject>,
        /// What the proposal describes.
        proposed: Box<VmSubject>,
    },
    /// The attributes the source claims are not those the ticket binds
    /// (a tenant or security level relabelled on the way).
    #[error("the VM's attributes differ from those the ticket binds (digest {proposed}, ticket {ticket})")]
    Attributes {
        /// The ticket's attribute digest (hex).
        ticket: String,
        /// The proposal's attribute digest (hex).
        proposed: String,
    },
}

/// What a manifest says the VM is, as a [`VmSubject`] with the claimed
/// `attributes`: a sim VM's memory geometry and disks, or a QEMU VM's
/// memory and copied disks.
pub fn proposed_subject(manifest: &Manifest, attributes: &VmAttributes) -> VmSubject {
    let (memory_bytes, disks) = match &manifest.qemu {
        None => (
            manifest.memory.bytes(),
            manifest
                .disks
                .iter()
                .map(|d| DiskSubject {
                    name: d.name.to_string(),
                    bytes: d.bytes,
                })
                .collect(),
        ),
        Some(q) => (
            q.spec.memory_mib.saturating_mul(1 << 20),
            q.spec
                .disks
                .iter()
                .zip(&q.disks)
                .map(|(name, d)| DiskSubject {
                    name: name.clone(),
                    bytes: d.size,
                })
                .collect(),
        ),
    };
    VmSubject {
        memory_bytes,
        disks,
        attributes: attributes.digest(),
    }
}

/// Checks a proposal — its VM, migration id, manifest and the attributes
/// the source claims — against the ticket that authorizes it. The ticket
/// must already be verified.
pub fn admit(
    ticket: &Ticket,
    vm: &VmName,
    migration: MigrationId,
    manifest: &Manifest,
    attributes: &VmAttributes,
) -> Result<(), AdmissionError> {
    if &ticket.vm != vm {
        return Err(AdmissionError::Vm {
            ticket: ticket.vm.clone(),
            proposed: vm.clone(),
        });
    }
    if ticket.id != migration {
        return Err(AdmissionError::MigrationId);
    }
    let plan = &ticket.plan;
    same_plan(plan, &manifest.plan)?;
    plan.validate().map_err(AdmissionError::InvalidPlan)?;
    match &manifest.qemu {
        None => {
            if manifest.data_streams != plan.streams {
                return Err(AdmissionError::Streams {
                    plan: plan.streams,
                    manifest: manifest.data_streams,
                });
            }
            let switches = plan.mode != MigrationMode::Precopy;
            if manifest.postcopy != switches {
                return Err(AdmissionError::Postcopy {
                    mode: plan.mode,
                    announced: manifest.postcopy,
                });
            }
            if !manifest.disks.is_empty() && !plan.copy_storage {
                return Err(AdmissionError::DisksNotGranted);
            }
        }
        Some(q) => {
            if q.mode != plan.mode {
                return Err(AdmissionError::QemuMode {
                    plan: plan.mode,
                    manifest: q.mode,
                });
            }
            // More than one stream is multifd, for pre-copy only. A
            // source may keep to QEMU's one stream instead (its agent
            // leaves multifd out for a QEMU whose multifd sender spins):
            // fewer channels than the ticket grants, never more or others.
            let expected = if plan.mode == MigrationMode::Precopy && plan.streams > 1 {
                plan.streams
            } else {
                0
            };
            if q.multifd_channels != expected && q.multifd_channels != 0 {
                return Err(AdmissionError::QemuChannels {
                    streams: plan.streams,
                    expected,
                    manifest: q.multifd_channels,
                });
            }
            if !q.disks.is_empty() && !plan.copy_storage {
                return Err(AdmissionError::DisksNotGranted);
            }
            if plan.start_paused {
                return Err(AdmissionError::NotForQemu("start the VM paused"));
            }
            if plan.storage_postcopy {
                return Err(AdmissionError::NotForQemu("fetch disk blocks on demand"));
            }
            if manifest.postcopy {
                return Err(AdmissionError::Postcopy {
                    mode: plan.mode,
                    announced: true,
                });
            }
        }
    }
    if manifest.start_paused != plan.start_paused {
        return Err(AdmissionError::StartPaused {
            plan: plan.start_paused,
            manifest: manifest.start_paused,
        });
    }
    // Last: the plan is what was granted; now, is this the VM it was
    // granted for?
    let proposed = proposed_subject(manifest, attributes);
    if proposed.attributes != ticket.subject.attributes {
        return Err(AdmissionError::Attributes {
            ticket: ticket.subject.attributes.to_hex(),
            proposed: proposed.attributes.to_hex(),
        });
    }
    if proposed != ticket.subject {
        return Err(AdmissionError::Subject {
            ticket: Box::new(ticket.subject.clone()),
            proposed: Box::new(proposed),
        });
    }
    Ok(())
}

/// The first field in which the proposal's plan differs from the ticket's.
fn same_plan(ticket: &MigrationPlan, proposed: &MigrationPlan) -> Result<(), AdmissionError> {
    fn field<T: PartialEq + std::fmt::Debug>(
        name: &'static str,
        ticket: &T,
        proposed: &T,
    ) -> Result<(), AdmissionError> {
        if ticket == proposed {
            Ok(())
        } else {
            Err(AdmissionError::Plan {
                field: name,
                ticket: format!("{ticket:?}"),
                proposed: format!("{proposed:?}"),
            })
        }
    }
    // Destructured, so a field added to the plan breaks the build here
    // until it is compared.
    let MigrationPlan {
        streams,
        max_downtime_ms,
        max_rounds,
        compression_level,
        mode,
        copy_storage,
        bandwidth,
        postcopy_after_ms,
        auto_converge,
        hold_hot_pages,
        force_stop,
        adaptive_compression,
        start_paused,
        storage_postcopy,
        deadline_ms,
        connections,
    } = ticket;
    field("mode", mode, &proposed.mode)?;
    field("streams", streams, &proposed.streams)?;
    field("copy_storage", copy_storage, &proposed.copy_storage)?;
    field(
        "storage_postcopy",
        storage_postcopy,
        &proposed.storage_postcopy,
    )?;
    field("start_paused", start_paused, &proposed.start_paused)?;
    field("force_stop", force_stop, &proposed.force_stop)?;
    field(
        "max_downtime_ms",
        max_downtime_ms,
        &proposed.max_downtime_ms,
    )?;
    field("max_rounds", max_rounds, &proposed.max_rounds)?;
    field("bandwidth", bandwidth, &proposed.bandwidth)?;
    field(
        "postcopy_after_ms",
        postcopy_after_ms,
        &proposed.postcopy_after_ms,
    )?;
    field(
        "compression_level",
        compression_level,
        &proposed.compression_level,
    )?;
    field(
        "adaptive_compression",
        adaptive_compression,
        &proposed.adaptive_compression,
    )?;
    field("auto_converge", auto_converge, &proposed.auto_converge)?;
    field("hold_hot_pages", hold_hot_pages, &proposed.hold_hot_pages)?;
    field("deadline_ms", deadline_ms, &proposed.deadline_ms)?;
    field("connections", connections, &proposed.connections)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::{MemoryGeometry, PageSize};

    /// A change to one field of a plan.
    type Change = fn(&mut MigrationPlan);

    fn ticket(plan: MigrationPlan) -> Ticket {
        Ticket {
            id: MigrationId([1; 16]),
            vm: "vm".parse().unwrap(),
            source: "spiffe://t/agent/a".parse().unwrap(),
            destination: "spiffe://t/agent/b".parse().unwrap(),
            subject: VmSubject {
                memory_bytes: 16 * 4096,
                disks: Vec::new(),
                attributes: VmAttributes::default().digest(),
            },
            plan,
            issued_at: 1,
            expires_at: 2,
            nonce: [2; 16],
            approvers: Vec::new(),
            approvals: Vec::new(),
        }
    }

    fn manifest(plan: &MigrationPlan) -> Manifest {
        Manifest {
            memory: MemoryGeometry::new(PageSize::SIZE_4K, 16).unwrap(),
            data_streams: plan.streams,
            qemu: None,
            postcopy: plan.mode != MigrationMode::Precopy,
            reuse: None,
            disks: Vec::new(),
            start_paused: plan.start_paused,
            plan: plan.clone(),
        }
    }

    /// Admits `m` under `t` issued for the VM `m` describes: the plan
    /// rules alone (the subject has its own test).
    fn check(t: &Ticket, m: &Manifest) -> Result<(), AdmissionError> {
        let attributes = VmAttributes::default();
        let mut t = t.clone();
        t.subject = proposed_subject(m, &attributes);
        admit(&t, &t.vm, t.id, m, &attributes)
    }

    #[test]
    fn another_vm_under_the_same_name_or_relabelled_attributes_are_refused() {
        let plan = MigrationPlan {
            copy_storage: true,
            ..MigrationPlan::default()
        };
        let t = ticket(plan.clone());
        let attrs = VmAttributes::default();
        let m = manifest(&plan);
        assert_eq!(admit(&t, &t.vm, t.id, &m, &attrs), Ok(()));
        // Bigger memory than the ticket's VM.
        let mut bigger = manifest(&plan);
        bigger.memory = MemoryGeometry::new(PageSize::SIZE_4K, 32).unwrap();
        assert!(matches!(
            admit(&t, &t.vm, t.id, &bigger, &attrs),
            Err(AdmissionError::Subject { .. })
        ));
        // A disk the ticket's VM did not have.
        let mut disk = manifest(&plan);
        disk.disks = vec![crate::disk::DiskGeometry {
            name: "d".parse().unwrap(),
            bytes: 1 << 20,
            base: None,
        }];
        let e = admit(&t, &t.vm, t.id, &disk, &attrs).unwrap_err();
        assert!(e.to_string().contains("d (1048576 bytes)"), "{e}");
        // Another tenant, or a higher security level, claimed on the way.
        for relabel in [
            VmAttributes {
                tenant: "other".into(),
                ..VmAttributes::default()
            },
            VmAttributes {
                security_level: 3,
                ..VmAttributes::default()
            },
        ] {
            assert!(matches!(
                admit(&t, &t.vm, t.id, &m, &relabel),
                Err(AdmissionError::Attributes { .. })
            ));
        }
    }

    #[test]
    fn a_proposal_that_is_the_ticket_is_admitted() {
        for mode in [
            MigrationMode::Precopy,
            MigrationMode::Postcopy,
            MigrationMode::Hybrid,
        ] {
            let plan = MigrationPlan {
                mode,
                ..MigrationPlan::default()
            };
            let t = ticket(plan.clone());
            assert_eq!(check(&t, &manifest(&plan)), Ok(()), "{mode}");
        }
    }

    #[test]
    fn every_plan_field_that_differs_is_named() {
        let granted = MigrationPlan::default();
        let t = ticket(granted.clone());
        let cases: Vec<(&str, Change)> = vec![
            ("mode", |p| p.mode = MigrationMode::Postcopy),
            ("streams", |p| p.streams = 3),
            ("copy_storage", |p| p.copy_storage = true),
            ("storage_postcopy", |p| p.storage_postcopy = true),
            ("start_paused", |p| p.start_paused = true),
            ("force_stop", |p| p.force_stop = true),
            ("max_downtime_ms", |p| p.max_downtime_ms = 5000),
            ("max_rounds", |p| p.max_rounds = 1000),
            ("bandwidth", |p| p.bandwidth = Some(1)),
            ("postcopy_after_ms", |p| p.postcopy_after_ms = Some(1)),
            ("compression_level", |p| p.compression_level = 19),
            ("adaptive_compression", |p| p.adaptive_compression = false),
            ("auto_converge", |p| p.auto_converge = false),
            ("hold_hot_pages", |p| p.hold_hot_pages = false),
            ("deadline_ms", |p| p.deadline_ms = Some(60_000)),
            ("connections", |p| p.connections = 2),
        ];
        for (name, change) in cases {
            let mut m = manifest(&granted);
            change(&mut m.plan);
            match check(&t, &m) {
                Err(AdmissionError::Plan { field, .. }) => assert_eq!(field, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_post_copy_switch_under_a_pre_copy_ticket_is_refused() {
        let plan = MigrationPlan::default();
        let t = ticket(plan.clone());
        let mut m = manifest(&plan);
        m.postcopy = true;
        assert!(matches!(
            check(&t, &m),
            Err(AdmissionError::Postcopy {
                announced: true,
                ..
            })
        ));
        // And a hybrid ticket whose manifest hides the switch.
        let plan = MigrationPlan {
            mode: MigrationMode::Hybrid,
            ..MigrationPlan::default()
        };
        let t = ticket(plan.clone());
        let mut m = manifest(&plan);
        m.postcopy = false;
        assert!(matches!(
            check(&t, &m),
            Err(AdmissionError::Postcopy {
                announced: false,
                ..
            })
        ));
    }

    #[test]
    fn stream_count_start_paused_and_disks_must_follow_the_plan() {
        let plan = MigrationPlan::default();
        let t = ticket(plan.clone());
        let mut m = manifest(&plan);
        m.data_streams = 4;
        assert!(matches!(
            check(&t, &m),
            Err(AdmissionError::Streams {
                plan: 2,
                manifest: 4
            })
        ));
        let mut m = manifest(&plan);
        m.start_paused = true;
        assert!(matches!(
            check(&t, &m),
            Err(AdmissionError::StartPaused { .. })
        ));
        let mut m = manifest(&plan);
        m.disks = vec![crate::disk::DiskGeometry {
            name: "d".parse().unwrap(),
            bytes: 1 << 20,
            base: None,
        }];
        assert_eq!(check(&t, &m), Err(AdmissionError::DisksNotGranted));
    }

    #[test]
    fn another_vm_or_migration_id_is_refused() {
        let plan = MigrationPlan::default();
        let t = ticket(plan.clone());
        let m = manifest(&plan);
        assert!(matches!(
            admit(&t, &"other".parse().unwrap(), t.id, &m, &Default::default()),
            Err(AdmissionError::Vm { .. })
        ));
        assert_eq!(
            admit(&t, &t.vm, MigrationId([7; 16]), &m, &Default::default()),
            Err(AdmissionError::MigrationId)
        );
    }

    #[test]
    fn an_invalid_plan_is_refused_even_when_both_agree() {
        let plan = MigrationPlan {
            mode: MigrationMode::Postcopy,
            start_paused: true,
            ..MigrationPlan::default()
        };
        let t = ticket(plan.clone());
        assert!(matches!(
            check(&t, &manifest(&plan)),
            Err(AdmissionError::InvalidPlan(_))
        ));
    }

    fn qemu(plan: &MigrationPlan, multifd_channels: u16, disks: usize) -> Manifest {
        let spec = crate::fuzz::qemu_spec(disks);
        let mut m = manifest(plan);
        m.postcopy = false;
        m.qemu = Some(Box::new(crate::stream::QemuManifest {
            spec,
            mode: plan.mode,
            multifd_channels,
            disks: (0..disks)
                .map(|_| crate::stream::DiskManifest {
                    size: 1 << 20,
                    format: "raw".into(),
                })
                .collect(),
        }));
        m
    }

    #[test]
    fn a_qemu_stream_must_run_the_ticket_s_mode_channels_and_storage() {
        // Pre-copy with two streams is multifd with two channels.
        let plan = MigrationPlan::default();
        let t = ticket(plan.clone());
        assert_eq!(check(&t, &qemu(&plan, 2, 0)), Ok(()));
        // Post-copy under a pre-copy ticket, even with the plan restated.
        let mut m = qemu(&plan, 2, 0);
        if let Some(q) = m.qemu.as_mut() {
            q.mode = MigrationMode::Postcopy;
        }
        assert!(matches!(
            check(&t, &m),
            Err(AdmissionError::QemuMode { .. })
        ));
        // QEMU's one stream instead of multifd: fewer channels than granted.
        assert_eq!(check(&t, &qemu(&plan, 0, 0)), Ok(()));
        // Another number of multifd channels.
        assert!(matches!(
            check(&t, &qemu(&plan, 4, 0)),
            Err(AdmissionError::QemuChannels {
                expected: 2,
                manifest: 4,
                ..
            })
        ));
        // Disks mirrored without copy-storage.
        assert_eq!(
            check(&t, &qemu(&plan, 2, 1)),
            Err(AdmissionError::DisksNotGranted)
        );
        // Post-copy is one channel, and a QEMU VM never starts paused.
        let plan = MigrationPlan {
            mode: MigrationMode::Postcopy,
            ..MigrationPlan::default()
        };
        let t = ticket(plan.clone());
        assert_eq!(check(&t, &qemu(&plan, 0, 0)), Ok(()));
        let plan = MigrationPlan {
            start_paused: true,
            ..MigrationPlan::default()
        };
        let t = ticket(plan.clone());
        let mut m = qemu(&plan, 2, 0);
        m.start_paused = true;
        assert_eq!(
            check(&t, &m),
            Err(AdmissionError::NotForQemu("start the VM paused"))
        );
    }
}
