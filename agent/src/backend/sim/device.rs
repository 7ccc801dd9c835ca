//! A simulated VM's device state, as it travels from source to
//! destination: the device counter and the workload's parameters (and
//! each disk's write rate), so that the counter and the workload continue
//! where they stopped after migration, and its service's stream and
//! counters (`service`). The throttle is the source host's, not the
//! guest's: it does not travel.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::service::ServiceState;
use super::Shared;
use crate::backend::{BackendError, DeviceStateError};

/// Device state of a simulated VM, as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct DeviceState {
    pub(super) version: u8,
    pub(super) counter: u64,
    pub(super) dirty_pages_per_sec: u64,
    pub(super) hot_set_pct: u8,
    pub(super) seed: u64,
    /// Each disk's block writes per second, in manifest order.
    pub(super) disk_writes_per_sec: Vec<u64>,
    /// The service (rate 0: none).
    pub(super) service: ServiceState,
}

/// The device-state version this build writes and reads (3: the
/// service).
const DEVICE_STATE_VERSION: u8 = 3;

/// The device state builds before the service wrote (version 2): still
/// read, so that their snapshots restore and their migrations arrive; such
/// a VM has no service.
#[derive(Deserialize)]
struct DeviceStateV2 {
    version: u8,
    counter: u64,
    dirty_pages_per_sec: u64,
    hot_set_pct: u8,
    seed: u64,
    disk_writes_per_sec: Vec<u64>,
}

impl From<DeviceStateV2> for DeviceState {
    fn from(old: DeviceStateV2) -> DeviceState {
        DeviceState {
            // Read as what it is now; the version byte said 2.
            version: if old.version == 2 {
                DEVICE_STATE_VERSION
            } else {
                old.version
            },
            counter: old.counter,
            dirty_pages_per_sec: old.dirty_pages_per_sec,
            hot_set_pct: old.hot_set_pct,
            seed: old.seed,
            disk_writes_per_sec: old.disk_writes_per_sec,
            service: ServiceState {
                histogram: vec![0; convoy_protocol::ctl::service::BUCKETS],
                ..ServiceState::default()
            },
        }
    }
}

impl DeviceState {
    /// The state of the VM that `shared` is, as it is now (meaningful
    /// while paused).
    pub(super) fn of(shared: &Shared) -> DeviceState {
        let ctl = &shared.ctl;
        DeviceState {
            version: DEVICE_STATE_VERSION,
            counter: ctl.counter().load(Ordering::Relaxed),
            dirty_pages_per_sec: ctl.rate().load(Ordering::Relaxed),
            // Stored only from a `u8` (`set_workload`).
            hot_set_pct: u8::try_from(ctl.hot_set_pct().load(Ordering::Relaxed)).unwrap_or(u8::MAX),
            seed: ctl.seed().load(Ordering::Relaxed),
            disk_writes_per_sec: (0..shared.disks.len()).map(|i| ctl.disk_rate(i)).collect(),
            service: ServiceState::of(ctl),
        }
    }

    /// The bytes that travel.
    pub(super) fn encode(&self) -> Result<Vec<u8>, BackendError> {
        Ok(postcard::to_stdvec(self).map_err(DeviceStateError::Encode)?)
    }

    /// Parses the device state of a VM with `disks` disks. Refuses bytes
    /// that do not parse, an unknown version, a hot set outside 1..=100%,
    /// a disk count other than `disks`, rates past the limits, a service
    /// histogram of another length, and trailing bytes.
    pub(super) fn decode(bytes: &[u8], disks: usize) -> Result<DeviceState, BackendError> {
        let (s, rest): (DeviceState, &[u8]) = if bytes.first() == Some(&2) {
            let (old, rest): (DeviceStateV2, &[u8]) =
                postcard::take_from_bytes(bytes).map_err(DeviceStateError::Decode)?;
            (old.into(), rest)
        } else {
            postcard::take_from_bytes(bytes).map_err(DeviceStateError::Decode)?
        };
        if !rest.is_empty()
            || s.version != DEVICE_STATE_VERSION
            || !(1..=100).contains(&s.hot_set_pct)
            || s.disk_writes_per_sec.len() != disks
            || s.service.histogram.len() != convoy_protocol::ctl::service::BUCKETS
        {
            return Err(DeviceStateError::Mismatch.into());
        }
        // A peer's rate must not spin the workload thread.
        if s.dirty_pages_per_sec > convoy_protocol::ctl::MAX_DIRTY_PAGES_PER_SEC
            || s.disk_writes_per_sec
                .iter()
                .any(|&r| r > convoy_protocol::ctl::MAX_DISK_WRITES_PER_SEC)
            || !s.service.is_sane()
        {
            return Err(DeviceStateError::RateTooHigh.into());
        }
        Ok(s)
    }
}

/// The body of the `sim_device_state` fuzz target: a peer's device state
/// (after one byte, the number of disks modulo 4) through the decoder a
/// staging sim VM starts from. It must not panic nor allocate past the
/// input; a state it accepts is within every bound the workload relies on
/// (version, hot set, disks, dirty and disk write rates), and encodes to
/// bytes that decode to the same state.
pub fn fuzz_device_state(data: &[u8]) {
    let [disks, bytes @ ..] = data else {
        return;
    };
    let disks = usize::from(disks % 4);
    let Ok(s) = DeviceState::decode(bytes, disks) else {
        return;
    };
    assert_eq!(s.version, DEVICE_STATE_VERSION);
    assert!((1..=100).contains(&s.hot_set_pct));
    assert_eq!(s.disk_writes_per_sec.len(), disks);
    assert!(s.dirty_pages_per_sec <= convoy_protocol::ctl::MAX_DIRTY_PAGES_PER_SEC);
    assert!(s
        .disk_writes_per_sec
        .iter()
        .all(|&r| r <= convoy_protocol::ctl::MAX_DISK_WRITES_PER_SEC));
    assert!(s.service.is_sane());
    match s.encode().map(|e| DeviceState::decode(&e, disks)) {
        Ok(Ok(again)) => assert_eq!(again, s, "round trip changed the state"),
        Ok(Err(e)) => panic!("a re-encoded state does not decode: {e}"),
        Err(e) => panic!("a decoded state does not encode: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> DeviceState {
        DeviceState {
            version: DEVICE_STATE_VERSION,
            counter: 41,
            dirty_pages_per_sec: 5000,
            hot_set_pct: 10,
            seed: 7,
            disk_writes_per_sec: vec![100, 0],
            service: ServiceState {
                rate: 1000,
                epoch_us: 1,
                next: 5,
                served: 5,
                sum_us: 500,
                dropped: 0,
                histogram: vec![1; convoy_protocol::ctl::service::BUCKETS],
            },
        }
    }

    fn refused(bytes: &[u8], disks: usize) -> bool {
        matches!(
            DeviceState::decode(bytes, disks),
            Err(BackendError::DeviceState(_))
        )
    }

    #[test]
    fn a_device_state_round_trips() {
        let bytes = state().encode().unwrap();
        assert_eq!(DeviceState::decode(&bytes, 2).unwrap(), state());
    }

    #[test]
    fn a_bad_device_state_is_refused() {
        let good = state().encode().unwrap();
        assert!(refused(b"", 2));
        assert!(refused(&good[..good.len() - 1], 2), "truncated");
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(refused(&trailing, 2), "trailing bytes");
        assert!(refused(&good, 1), "one disk fewer");
        assert!(refused(&good, 3), "one disk more");
        for (version, hot_set_pct) in [
            (DEVICE_STATE_VERSION + 1, 10),
            (DEVICE_STATE_VERSION - 1, 10),
            (DEVICE_STATE_VERSION, 0),
            (DEVICE_STATE_VERSION, 101),
        ] {
            let s = DeviceState {
                version,
                hot_set_pct,
                ..state()
            };
            assert!(refused(&s.encode().unwrap(), 2), "{s:?}");
        }
        // Rates a workload thread would spin on.
        let s = DeviceState {
            dirty_pages_per_sec: u64::MAX,
            ..state()
        };
        assert!(refused(&s.encode().unwrap(), 2), "dirty rate");
        let s = DeviceState {
            disk_writes_per_sec: vec![0, u64::MAX],
            ..state()
        };
        assert!(refused(&s.encode().unwrap(), 2), "disk write rate");
        let mut s = state();
        s.service.rate = u64::MAX;
        assert!(refused(&s.encode().unwrap(), 2), "service rate");
        let mut s = state();
        s.service.histogram.pop();
        assert!(refused(&s.encode().unwrap(), 2), "a short histogram");
        // What builds before the service wrote (version 2) is still read,
        // as a VM without a service.
        let mut old = vec![2u8];
        for v in [41u64, 5000] {
            old.extend(postcard::to_stdvec(&v).unwrap());
        }
        old.push(10);
        old.extend(postcard::to_stdvec(&7u64).unwrap());
        old.extend(postcard::to_stdvec(&vec![100u64, 0]).unwrap());
        let s = DeviceState::decode(&old, 2).unwrap();
        assert_eq!((s.counter, s.dirty_pages_per_sec, s.seed), (41, 5000, 7));
        assert_eq!(s.service.rate, 0);
        assert!(refused(&old[..old.len() - 1], 2), "a truncated version 2");
        let s = DeviceState {
            dirty_pages_per_sec: convoy_protocol::ctl::MAX_DIRTY_PAGES_PER_SEC,
            ..state()
        };
        assert!(!refused(&s.encode().unwrap(), 2), "the limit itself");
    }

    /// Seeds of the `sim_device_state` fuzz target (replayed by
    /// `tests/fuzz_corpus.rs`): valid states for 0 to 3 disks, and near
    /// misses. Written with `CONVOY_WRITE_SEEDS=1`.
    #[test]
    fn write_seed_corpus_when_asked() {
        if std::env::var_os("CONVOY_WRITE_SEEDS").is_none() {
            return;
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus/sim_device_state");
        std::fs::create_dir_all(&dir).unwrap();
        let seed = |disks: u8, s: &DeviceState| {
            let mut v = vec![disks];
            v.extend(s.encode().unwrap());
            v
        };
        let with = |rates: Vec<u64>| DeviceState {
            disk_writes_per_sec: rates,
            ..state()
        };
        let at_limits = DeviceState {
            dirty_pages_per_sec: convoy_protocol::ctl::MAX_DIRTY_PAGES_PER_SEC,
            hot_set_pct: 100,
            counter: u64::MAX,
            seed: u64::MAX,
            disk_writes_per_sec: vec![convoy_protocol::ctl::MAX_DISK_WRITES_PER_SEC; 3],
            ..state()
        };
        let good = seed(2, &state());
        let mut trailing = good.clone();
        trailing.push(0);
        let mut huge_vec = vec![2, DEVICE_STATE_VERSION, 41, 0, 10, 7];
        huge_vec.extend([0xff, 0xff, 0xff, 0xff, 0x0f]);
        let seeds: Vec<(&str, Vec<u8>)> = vec![
            ("seed-two-disks", good.clone()),
            ("seed-no-disk", seed(0, &with(Vec::new()))),
            ("seed-one-disk", seed(1, &with(vec![0]))),
            ("seed-at-limits", seed(3, &at_limits)),
            (
                "seed-idle",
                seed(
                    0,
                    &DeviceState {
                        dirty_pages_per_sec: 0,
                        hot_set_pct: 1,
                        ..with(Vec::new())
                    },
                ),
            ),
            ("hostile-truncated", good[..good.len() - 1].to_vec()),
            ("hostile-trailing", trailing),
            ("hostile-disks-differ", seed(3, &state())),
            (
                "hostile-dirty-rate",
                seed(
                    2,
                    &DeviceState {
                        dirty_pages_per_sec: u64::MAX,
                        ..state()
                    },
                ),
            ),
            ("hostile-disk-rate", seed(1, &with(vec![u64::MAX]))),
            (
                "hostile-hot-set",
                seed(
                    2,
                    &DeviceState {
                        hot_set_pct: 0,
                        ..state()
                    },
                ),
            ),
            ("hostile-huge-vec", huge_vec),
            ("hostile-empty", vec![0]),
        ];
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
