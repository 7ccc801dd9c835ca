//! Pre-copy: rounds over a dirtying VM until it converges (deltas, auto-converge,
//! hot pages held back), and what the downtime counts.

use std::time::Duration;

use convoy_protocol::ctl::Outcome;
use convoy_protocol::destination::DestinationEvent;
use convoy_protocol::message::{Capabilities, Message};

use crate::harness::{root_of, without_delta, Pair};

#[test]
fn idle_vm_moves_in_one_round_and_verifies() {
    let mut p = Pair::new(512, 0, 100e6, 1 << 30);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed);
    assert!(s.verified && s.converged);
    assert_eq!(s.rounds, 2, "bulk round plus an empty final round");
    // A quarter of the pages are zero and cost nothing in round 1.
    assert_eq!(s.encodings.zero, 128);
    assert_eq!(s.pages_sent, 384);
    assert_eq!(p.staging.as_ref().unwrap(), &p.vm.pages);
    assert_eq!(s.memory_root, Some(root_of(&p.vm.pages)));
    assert!(p.vm.discarded);
    assert!(!p.rolled_back);
}

#[test]
fn dirtying_vm_converges_and_destination_holds_the_paused_image() {
    // 60 writes per simulated ms, 90% into a 10% hot set, 50 MB/s link.
    let mut p = Pair::new(2048, 60, 50e6, 1 << 30);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.rounds > 2, "a dirtying VM needs several rounds: {s:?}");
    assert!(s.converged);
    let paused = p.paused_image.as_ref().unwrap();
    assert_eq!(p.staging.as_ref().unwrap(), paused);
    assert_eq!(s.memory_root, Some(root_of(paused)));
    // The device counter continues: the destination starts at the value the
    // source paused with.
    assert_eq!(p.started, Some(p.vm.counter));
    assert!(p.vm.discarded && !p.rolled_back);
    assert!(s.downtime.unwrap() < s.total);
    // Hot pages change in a few 8-byte words a round: most go as deltas.
    assert!(s.encodings.delta > 0, "{:?}", s.encodings);
}

#[test]
fn deltas_go_only_to_a_destination_that_accepted_them_and_save_bytes() {
    let run = |rate: u64, delta: bool| {
        let mut p = Pair::new(2048, rate, 50e6, 1 << 30);
        if !delta {
            without_delta(&mut p);
        }
        p.run();
        let s = p.summary().clone();
        assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
        assert_eq!(
            p.staging.as_ref().unwrap(),
            p.paused_image.as_ref().unwrap()
        );
        s
    };
    let (with, without) = (run(60, true), run(60, false));
    assert_eq!(without.encodings.delta, 0);
    assert!(with.encodings.delta > 0);
    // Bytes after the bulk round, which an idle VM's migration is.
    let bulk = run(0, true).payload_bytes;
    let (with, without) = (with.payload_bytes - bulk, without.payload_bytes - bulk);
    assert!(
        with * 4 < without,
        "{with} vs {without} bytes after the bulk round"
    );
}

#[test]
fn too_fast_a_dirty_rate_hits_the_round_limit_but_still_completes() {
    // 400 writes per ms on a slow link never converges to 20 ms downtime
    // when pages go whole (with deltas, 8-byte writes are cheap enough to
    // converge).
    let mut p = Pair::new(2048, 400, 5e6, 1 << 30);
    without_delta(&mut p);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed);
    assert!(!s.converged);
    assert_eq!(s.rounds, 11, "10 pre-copy rounds and the final one");
    assert_eq!(
        p.staging.as_ref().unwrap(),
        p.paused_image.as_ref().unwrap()
    );
}

#[test]
fn a_vm_that_cannot_converge_fails_honestly_and_keeps_running() {
    // The busy VM of the previous test, without force_stop or throttling.
    let mut p = Pair::with(2048, 400, 5e6, 1 << 30, |c| {
        c.manifest.plan.force_stop = false
    });
    without_delta(&mut p);
    p.run();
    let s = p.summary().clone();
    let Outcome::Aborted(why) = &s.outcome else {
        panic!("{s:?}")
    };
    assert!(why.contains("cannot converge at this dirty rate"), "{why}");
    assert!(why.contains("against a target of 40 ms"), "{why}");
    assert!(
        why.contains("20 ms for the handover's two round trips"),
        "{why}"
    );
    assert!(s.convergence.dirty_rate > 0);
    assert_eq!(s.rounds, 10);
    assert!(p.rolled_back && !p.vm.paused && !p.vm.discarded);
    assert!(p.staging.is_none(), "the destination discarded its staging");
    assert!(matches!(p.dst_event, Some(DestinationEvent::Failed(_))));
}

#[test]
fn auto_converge_throttles_a_busy_vm_until_it_converges() {
    let run = |auto: bool| {
        let mut p = Pair::with(2048, 400, 20e6, 1 << 30, |c| {
            c.manifest.plan.force_stop = false;
            c.manifest.plan.auto_converge = auto;
            c.manifest.plan.max_downtime_ms = 100;
            c.manifest.plan.max_rounds = 30;
        });
        without_delta(&mut p);
        p.run();
        p
    };
    // Unthrottled, this workload never meets the target...
    let p = run(false);
    let s = p.summary();
    assert!(matches!(s.outcome, Outcome::Aborted(_)), "{s:?}");
    assert_eq!(s.convergence.throttle, 0);
    // ...throttled in steps, it does, and the image is exact.
    let p = run(true);
    let s = p.summary();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.converged && s.verified);
    assert!(s.convergence.throttle >= 20, "{:?}", s.convergence);
    assert_eq!(
        p.staging.as_ref().unwrap(),
        p.paused_image.as_ref().unwrap()
    );
}

#[test]
fn hot_pages_are_held_back_and_fewer_pages_are_sent_twice() {
    let run = |hold: bool| {
        let mut p = Pair::with(4096, 60, 30e6, 1 << 30, |c| {
            c.manifest.plan.hold_hot_pages = hold;
            c.manifest.plan.max_rounds = 30;
        });
        // Whole pages, so that every re-send costs what it would without
        // deltas.
        without_delta(&mut p);
        p.run();
        let s = p.summary().clone();
        assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
        assert!(s.verified);
        assert_eq!(
            p.staging.as_ref().unwrap(),
            p.paused_image.as_ref().unwrap()
        );
        s
    };
    let plain = run(false);
    let held = run(true);
    assert_eq!(plain.convergence.held_back, 0);
    assert!(held.convergence.held_back > 0, "{:?}", held.convergence);
    assert!(
        held.convergence.resent_pages < plain.convergence.resent_pages,
        "held {:?} plain {:?}",
        held.convergence,
        plain.convergence
    );
}

#[test]
fn a_round_end_that_overtakes_its_batches_is_confirmed_once_they_are_applied() {
    // The control stream is faster than the data: each RoundEnd arrives
    // while its round's batches are still on the way.
    let mut p = Pair::new(256, 5, 50e6, 1 << 30);
    p.data_lag = Duration::from_millis(200);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.verified && s.rounds >= 2);
    assert_eq!(
        p.staging.as_ref().unwrap(),
        p.paused_image.as_ref().unwrap()
    );
}

#[test]
fn the_time_a_started_vm_waited_for_its_disks_is_not_downtime_and_cannot_go_below_zero() {
    let run = |synced_ms: Option<u32>| {
        let mut p = Pair::new(128, 0, 50e6, 1 << 30);
        p.tamper_back = Some(Box::new(move |m| {
            if let (Message::Started(s), Some(ms)) = (m, synced_ms) {
                s.synced_ms = ms;
            }
        }));
        p.run();
        let s = p.summary().clone();
        assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
        s.downtime.unwrap()
    };
    let plain = run(None);
    // The harness's link takes 5 ms each way: the pause spans at least
    // Finish → Ready → Handover → Started.
    assert!(plain >= Duration::from_millis(15), "{plain:?}");
    assert_eq!(run(Some(5)), plain - Duration::from_millis(5));
    assert_eq!(run(Some(u32::MAX)), Duration::ZERO);
}

#[test]
fn probes_time_the_path_and_not_a_destination_slow_to_accept_and_apply() {
    // A destination busy with other migrations: 400 ms to make its
    // staging, each round applied 200 ms after its batches left. Timed by
    // Accept and RoundApplied, the path would seem to take 200 ms a round
    // trip, and the handover twice that: over a 300 ms target before any
    // page is counted, which is what made migrations on a busy host give
    // up. Probes, answered at once, time the path alone (5 ms each way).
    let run = |probe: bool| {
        let mut p = Pair::with(512, 5, 50e6, 1 << 30, |c| {
            if !probe {
                c.capabilities = Capabilities(c.capabilities.0 & !Capabilities::PROBE.0);
            }
        });
        p.accept_delay = Duration::from_millis(400);
        p.data_lag = Duration::from_millis(200);
        p.run();
        p
    };
    let p = run(true);
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.verified);
    assert_eq!(s.convergence.round_trip_us, 10_000, "{:?}", s.convergence);
    assert_eq!(
        p.staging.as_ref().unwrap(),
        p.paused_image.as_ref().unwrap()
    );
    // Without probes (a destination that does not answer them), as before.
    let s = run(false).summary().clone();
    assert!(
        s.convergence.round_trip_us >= 200_000,
        "{:?}",
        s.convergence
    );
}

/// A dirtying VM over a path of `one_way` each way, with a downtime
/// target of `target_ms`.
fn over_a_long_path(one_way: Duration, target_ms: u32, force_stop: bool) -> Pair {
    let mut p = Pair::with(2048, 20, 12.5e6, 1 << 30, |c| {
        c.manifest.plan.max_downtime_ms = target_ms;
        c.manifest.plan.force_stop = force_stop;
        c.manifest.plan.max_rounds = 30;
    });
    p.latency = one_way;
    // Whole pages each round, as the first round's rate assumes.
    without_delta(&mut p);
    p.run();
    p
}

#[test]
fn the_handovers_round_trips_count_in_the_expected_downtime() {
    // 100 Mbit/s, 100 ms RTT, 20 pages dirtied per ms. Counting only the
    // pages, pre-copy would pause with up to 300 ms of them left and the
    // handover's 200 ms after: 500 ms.
    let p = over_a_long_path(Duration::from_millis(50), 300, false);
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.converged && s.verified);
    let c = s.convergence;
    // Propose to Accept is the shortest exchange here: one round trip.
    assert_eq!(c.round_trip_us, 100_000, "{c:?}");
    assert!(
        (200..=300).contains(&c.expected_downtime_ms),
        "the estimate holds both round trips: {c:?}"
    );
    let downtime = s.downtime.unwrap();
    assert!(
        downtime <= Duration::from_millis(300),
        "downtime {downtime:?} over the 300 ms target ({c:?})"
    );
    assert!(downtime >= Duration::from_millis(200), "{downtime:?}");
    assert_eq!(
        p.staging.as_ref().unwrap(),
        p.paused_image.as_ref().unwrap()
    );
}

#[test]
fn a_path_whose_round_trips_alone_exceed_the_target_fails_honestly() {
    // 150 ms each way: the handover alone takes 600 ms, over 300 ms
    // whatever is left to send. No pause: the VM runs on here.
    let p = over_a_long_path(Duration::from_millis(150), 300, false);
    let s = p.summary().clone();
    let Outcome::Aborted(why) = &s.outcome else {
        panic!("{s:?}")
    };
    assert!(
        why.contains("600 ms for the handover's two round trips"),
        "{why}"
    );
    assert!(s.downtime.is_none(), "never paused: {s:?}");
    assert!(p.rolled_back && !p.vm.paused && !p.vm.discarded);
    // No throttle could have helped: the guest was never slowed.
    assert_eq!(s.convergence.throttle, 0, "{:?}", s.convergence);
    // Nor more rounds: it gives up once the round trip was measured
    // often enough to trust, not after all 30 rounds.
    assert!(
        s.rounds <= convoy_protocol::source::TRUSTED_ROUND_TRIPS + 1,
        "{} rounds",
        s.rounds
    );
    // With --force-stop it pauses as soon as that is known, as asked, and
    // the report shows what it expected.
    let p = over_a_long_path(Duration::from_millis(150), 300, true);
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(!s.converged);
    assert!(
        s.rounds <= convoy_protocol::source::TRUSTED_ROUND_TRIPS + 1,
        "{} rounds",
        s.rounds
    );
    assert!(s.convergence.expected_downtime_ms >= 600, "{s:?}");
    assert!(s.downtime.unwrap() >= Duration::from_millis(600));
}

#[test]
fn the_downtime_aim_ramps_from_its_start_to_the_target() {
    use convoy_protocol::source::{RAMP_HOLD_ROUNDS, RAMP_START_MS};
    let ms = |d: Duration| d.as_millis();
    let p = Pair::with(64, 0, 100e6, 1 << 30, |c| {
        c.manifest.plan.max_downtime_ms = 300;
        c.manifest.plan.max_rounds = 30;
    });
    let c = &p.src_cfg;
    let aim = |round| ms(c.downtime_aim(round, Duration::ZERO));
    let start = u128::from(RAMP_START_MS);
    for round in 0..=RAMP_HOLD_ROUNDS {
        assert_eq!(aim(round), start, "round {round}");
    }
    // Half as much again each round after, never past the target.
    assert_eq!(aim(RAMP_HOLD_ROUNDS + 1), start * 3 / 2);
    let mut last = aim(RAMP_HOLD_ROUNDS + 1);
    for round in RAMP_HOLD_ROUNDS + 2..28 {
        assert!(aim(round) >= last && aim(round) <= 300, "round {round}");
        last = aim(round);
    }
    assert_eq!(last, 300);
    assert_eq!(aim(u32::MAX), 300);
    // The handover's round trips come on top of the pages' share: on a
    // 100 ms path the first aim is 200 + 30 ms, not 30 ms no round can
    // reach.
    assert_eq!(ms(c.downtime_aim(1, Duration::from_millis(200))), 230);
    assert_eq!(ms(c.downtime_aim(1, Duration::from_millis(290))), 300);
    // A target below the ramp's start is the aim throughout.
    let p = Pair::with(64, 0, 100e6, 1 << 30, |c| {
        c.manifest.plan.max_downtime_ms = 10;
    });
    assert_eq!(ms(p.src_cfg.downtime_aim(0, Duration::ZERO)), 10);
    // With few rounds allowed, the last two aim at the target itself.
    let p = Pair::with(64, 0, 100e6, 1 << 30, |c| {
        c.manifest.plan.max_downtime_ms = 300;
        c.manifest.plan.max_rounds = 3;
    });
    let aims: Vec<u128> = (1..=3)
        .map(|r| ms(p.src_cfg.downtime_aim(r, Duration::ZERO)))
        .collect();
    assert_eq!(aims, [start, 300, 300]);
}

/// A VM whose rounds keep shrinking pauses with far less than the 300 ms
/// target left (the ramp's aim), without a throttle; one whose rounds
/// stop shrinking above the ramp's start still converges under the
/// target, a few rounds later.
#[test]
fn pre_copy_aims_low_first_and_still_converges_at_the_target() {
    let run = |writes_per_ms: u64| {
        let mut p = Pair::with(4096, writes_per_ms, 50e6, 1 << 30, |c| {
            c.manifest.plan.max_downtime_ms = 300;
            c.manifest.plan.max_rounds = 30;
            c.manifest.plan.force_stop = false;
        });
        without_delta(&mut p);
        p.run();
        p.summary().clone()
    };
    let s = run(5);
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.converged && s.verified);
    // The ramp's first aim: its pages' share plus the handover's two
    // round trips (10 ms each here).
    let aim = convoy_protocol::source::RAMP_START_MS + 2 * s.convergence.round_trip_us / 1000;
    assert!(
        s.convergence.expected_downtime_ms <= aim,
        "paused expecting {} ms, over the ramp's {aim} ms",
        s.convergence.expected_downtime_ms
    );
    assert_eq!(s.convergence.throttle, 0, "{s:?}");
    // Busier: the rest never gets under the ramp's start, so the aim
    // grows until it fits — the target is never passed.
    let busy = run(200);
    assert_eq!(busy.outcome, Outcome::Completed, "{busy:?}");
    assert!(busy.converged);
    let expected = busy.convergence.expected_downtime_ms;
    assert!(
        expected > aim && expected <= 300,
        "paused expecting {expected} ms after {} rounds",
        busy.rounds
    );
    assert!(busy.rounds > s.rounds.min(5), "{busy:?}");
    // The pause's parts, as the source saw them, make up its downtime
    // (the harness's link takes 5 ms each way: each exchange costs two).
    let p = busy.convergence.pause;
    let parts = Duration::from_micros(p.last_round_us + p.verify_us + p.commit_us + p.start_us);
    let downtime = busy.downtime.unwrap();
    assert!(
        downtime.abs_diff(parts) < Duration::from_micros(4),
        "{p:?} against {downtime:?}"
    );
    assert!(p.verify_us >= 10_000 && p.start_us >= 10_000, "{p:?}");
}

/// Hybrid: when the switch is due but the rest fits the target itself,
/// pre-copy pauses instead — the ramp's lower aim is not worth post-copy.
#[test]
fn hybrid_pauses_by_pre_copy_when_the_target_fits_at_the_switch() {
    let mut p = Pair::with(4096, 20, 50e6, 1 << 30, |c| {
        c.manifest.plan.mode = convoy_protocol::model::MigrationMode::Hybrid;
        c.manifest.plan.max_downtime_ms = 300;
        c.manifest.plan.max_rounds = 30;
    });
    without_delta(&mut p);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed);
    // Here the first pass leaves ~60 ms: over the ramp's first aim,
    // within the target.
    assert!(s.postcopy.is_none(), "switched: {:?}", s.postcopy);
    assert!(s.converged && s.verified, "{:?}", s.convergence);
    assert!(
        s.downtime.unwrap() <= Duration::from_millis(300),
        "{:?}",
        s.downtime
    );
}

#[test]
fn the_roots_inside_the_pause_cover_only_the_last_round() {
    // Every earlier round's leaves are rehashed before the pause, on both
    // sides: the roots at `Finish` fold in the last round alone. (Unfolded,
    // up to `FOLD_EVERY` leaves cost ~2 ms a side in the pause.)
    for rate in [0, 60] {
        let mut p = Pair::new(2048, rate, 50e6, 1 << 30);
        p.run();
        let s = p.summary().clone();
        assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
        assert!(s.verified);
        assert_eq!(p.unfolded_at_pause, vec![(0, 0)], "dirtying {rate}/ms");
    }
}

#[test]
fn the_expected_pause_counts_the_durable_records() {
    // Each side's record in the pause takes 8 ms; the path 10 ms a round
    // trip. Told what a record costs, the source expects the pause it
    // gets; not told, it pauses expecting 16 ms less than it takes.
    let run = |told: bool| {
        let mut p = Pair::with(2048, 60, 50e6, 1 << 30, |c| {
            c.manifest.plan.max_downtime_ms = 60;
            if told {
                c.durable_records = Duration::from_millis(16);
            }
        });
        p.record = Duration::from_millis(8);
        p.run();
        let s = p.summary().clone();
        assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
        assert!(s.verified && s.converged, "{s:?}");
        let expected = s.convergence.expected_downtime_ms;
        let took = s.downtime.unwrap().as_millis() as u64;
        (expected, took, s.convergence.records_us)
    };
    let (expected, took, records_us) = run(true);
    assert_eq!(records_us, 16_000);
    assert!(expected >= 2 * 10 + 2 * 8, "{expected} ms");
    assert!(took <= 60, "took {took} ms against a 60 ms target");
    assert!(took <= expected + 5, "took {took} ms, expected {expected}");
    let (expected, took, _) = run(false);
    assert!(took >= expected + 15, "took {took} ms, expected {expected}");
}

#[test]
fn the_expected_pause_counts_the_destinations_apply_lag() {
    // Every batch lands 20 ms behind the control stream (a destination
    // slow to apply what arrives): each round's RoundApplied comes that
    // much after the path's round trip, and so will the last round's
    // pages, inside the pause. Counted, the pause is the one expected.
    let mut p = Pair::with(2048, 60, 50e6, 1 << 30, |c| {
        c.manifest.plan.max_downtime_ms = 80;
    });
    p.data_lag = Duration::from_millis(20);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.verified && s.converged, "{s:?}");
    let c = &s.convergence;
    assert_eq!(c.round_trip_us, 10_000, "probes time the path alone: {c:?}");
    assert!(
        (15_000..25_000).contains(&c.apply_lag_us),
        "the lag beyond the round trip: {c:?}"
    );
    let expected = c.expected_downtime_ms;
    let took = s.downtime.unwrap().as_millis() as u64;
    assert!(expected >= 20 + 2 * 10, "{c:?}");
    assert!(took <= 80, "took {took} ms against an 80 ms target");
    assert!(took <= expected + 5, "took {took} ms, expected {expected}");
}

#[test]
fn the_pause_parts_name_the_destinations_share() {
    // Reading the paused VM takes 2 ms, the destination's root check and
    // `Ready` receipt 3 ms, each side's durable record 8 ms, and the link
    // 5 ms each way: the report names each, and what is left of verify
    // and start is the two round trips.
    let mut p = Pair::with(2048, 20, 50e6, 1 << 30, |c| {
        c.manifest.plan.max_downtime_ms = 100;
    });
    p.pause_read = Duration::from_millis(2);
    p.check = Duration::from_millis(3);
    p.record = Duration::from_millis(8);
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.verified && s.converged, "{s:?}");
    let parts = s.convergence.pause;
    assert_eq!(parts.device_state_us, 2_000, "{parts:?}");
    assert_eq!(parts.root_check_us, 3_000, "{parts:?}");
    assert_eq!(parts.record_us, 8_000, "{parts:?}");
    assert_eq!(parts.commit_us, 8_000, "the source's record: {parts:?}");
    assert_eq!(parts.vm_start_us, 0, "{parts:?}");
    assert_eq!(parts.exchanges_us(), 20_000, "two round trips: {parts:?}");
    assert!(parts.drain_us <= parts.verify_us, "{parts:?}");
    // The downtime counts the read of the paused VM, and is the parts.
    let sum = Duration::from_micros(parts.parts_us().iter().sum());
    assert!(
        sum.abs_diff(s.downtime.unwrap()) < Duration::from_micros(4),
        "{parts:?}"
    );
}

#[test]
fn a_destination_that_overstates_its_share_is_bounded() {
    // The destination's share is its own word: claiming a record far
    // longer than the whole start moves nothing out of the other parts.
    let mut p = Pair::with(2048, 0, 50e6, 1 << 30, |_| {});
    p.tamper_back = Some(Box::new(|m| {
        if let Message::Started(s) = m {
            s.pause.record_us = u32::MAX;
            s.pause.start_us = u32::MAX;
            s.pause.drain_us = u32::MAX;
        }
    }));
    p.run();
    let s = p.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    let parts = s.convergence.pause;
    assert_eq!(parts.record_us, parts.start_us, "{parts:?}");
    assert_eq!(parts.vm_start_us, 0, "{parts:?}");
    assert_eq!(parts.drain_us, parts.verify_us, "{parts:?}");
    assert_eq!(parts.root_check_us, 0, "{parts:?}");
    assert_eq!(parts.exchanges_us(), 0, "{parts:?}");
}
