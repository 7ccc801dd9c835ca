//! The driver's link: its data streams opened (with the plan's lanes),
//! and a broken link replaced within the recovery window.

use std::time::Duration;

use convoy_protocol::message::Capabilities;
use convoy_protocol::model::MigrationMode;
use tokio::sync::mpsc;

use super::super::jobs::EngineEvent;
use super::super::streams::{open_streams, OpenError, OpenedStreams, StreamSetup};
use super::Driver;
use crate::engine::clock;
use crate::host::budget::Side;
use crate::transport::Connection;

impl Driver<'_> {
    /// Opens the data streams (and, for `postcopy`, the fault stream) on
    /// `conns` (a link's first connection, then its lanes), sending
    /// deltas when `delta`.
    async fn open_streams(
        &self,
        conns: &[Connection],
        delta: bool,
        postcopy: bool,
    ) -> Result<OpenedStreams, OpenError> {
        let setup = StreamSetup {
            migration: self.run.migration,
            streams: self.plan.streams,
            level: self.plan.compression_level,
            tamper: self.run.host.config.dangerous_tamper(),
            pacer: self.pacer.clone(),
            delta,
            postcopy,
            adaptive: self.plan.adaptive_compression,
        };
        open_streams(
            conns,
            setup,
            &self.run.vm,
            &self.wire.events_tx,
            &self.run.host.budget,
        )
        .await
    }

    /// Accepted: the dirty log starts and the data streams open.
    pub(super) async fn start_dirty_log(&mut self) {
        self.run.vm.start_dirty_log();
        let delta = self
            .sm
            .accepted_capabilities()
            .is_some_and(|c| c.has(Capabilities::DELTA));
        let postcopy = self.plan.mode != MigrationMode::Precopy;
        self.open_link(true, delta, postcopy).await;
    }

    /// Opens the link's data streams (deltas when `delta`, the fault
    /// stream when `postcopy`) on its first connection and, when
    /// `with_lanes`, on the plan's lanes dialled now; false (the link
    /// lost) when they cannot open.
    async fn open_link(&mut self, with_lanes: bool, delta: bool, postcopy: bool) -> bool {
        let Some(conn) = self.wire.conn.clone() else {
            self.sm.handle_link_lost(clock::now(), "no connection");
            return false;
        };
        let mut conns = vec![conn.clone()];
        if with_lanes && self.plan.lanes() > 0 {
            let lanes = self
                .run
                .join_lanes(
                    &self.dest,
                    &conn,
                    (self.plan.lanes(), postcopy),
                    &self.wire.events_tx,
                )
                .await;
            conns.extend(lanes.iter().map(|(l, _)| l.clone()));
            self.wire.lanes = lanes;
        }
        match self.open_streams(&conns, delta, postcopy).await {
            Ok(opened) => {
                self.wire.jobs = opened.data;
                self.wire.faults.set_server(opened.faults).await;
                self.wire.cache_grant = opened.cache;
                true
            }
            Err(e) => {
                self.sm.handle_link_lost(clock::now(), &e.to_string());
                false
            }
        }
    }

    /// A resumed link's streams, held back until now ([`super::lanes`]):
    /// opened with the plan's lanes, unless the VM is paused here or runs
    /// there (a handshake would lengthen the pause or hold a fault).
    pub(super) async fn open_held_back(&mut self) -> bool {
        let Some((delta, postcopy)) = self.wire.held_back.take() else {
            return true;
        };
        let switched = self.sm.is_switched();
        let with_lanes = self.run.counter_at_pause.is_none() && !switched;
        // Switched meanwhile: whole pages only, no delta caches.
        self.open_link(with_lanes, delta && !switched, postcopy)
            .await
    }

    /// Recovery (post-copy, or a pre-copy round): the broken link's
    /// streams go (what they had sent is reported first: its leaves
    /// stand), then the destination is dialled again within the recovery
    /// window.
    pub(super) async fn reconnect(&mut self) {
        let switched = self.sm.is_switched();
        let when = if switched {
            "after the post-copy switch"
        } else {
            "in a pre-copy round, the VM running here"
        };
        self.run
            .phase(&format!("link lost {when}: dialling the destination again"));
        tracing::warn!(migration = %self.run.migration, switched, "link lost, reconnecting");
        self.wire.jobs.clear();
        self.wire.rounds_pending = None;
        // The old link's reader stops serving, and its queue closes (the
        // reader may be waiting on it: it ends, and the old events end
        // with it). The new link gets a fault slot of its own. Whether it
        // holds what the old link's faults carried, the destination says
        // in Resumed: the new link's push starts a set of its own.
        self.wire.faults.arm(None);
        self.wire.ctrl_rx = mpsc::channel(1).1;
        if let Some(c) = &self.wire.conn {
            c.close(crate::transport::close::LINK_LOST.into(), b"link lost");
        }
        // Lanes joined to the old link close with it, their bytes counted
        // once (the new link dials its own: super::super::lanes).
        for (lane, _) in self.wire.lanes.drain(..) {
            lane.close(crate::transport::close::LINK_LOST.into(), b"link lost");
            self.wire.earlier.add(&lane);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.wire.events_tx, tx));
        let mut old = std::mem::replace(&mut self.wire.events, rx);
        // (A Sent report lost to this bound makes the destination's Resumed
        // look wrong: in doubt, safely.)
        let drained = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some(ev)) = tokio::time::timeout_at(drained, old.recv()).await {
            self.count_served_fetches();
            if let EngineEvent::Sent(b) = ev {
                if let Err(e) = self.sm.handle_batch_sent(clock::now(), &b) {
                    tracing::error!("engine bug: {e}");
                }
            }
        }
        // The broken link's caches go first: the new ones take their share.
        self.wire.cache_grant = None;
        self.wire.held_back = None;
        let mut resumed = false;
        // After the switch pages are installed only where missing there:
        // whole pages, no deltas. Before it, deltas are against what the
        // new streams sent (their caches start empty).
        let delta = !switched
            && self
                .sm
                .accepted_capabilities()
                .is_some_and(|c| c.has(Capabilities::DELTA));
        let postcopy = self.plan.mode != MigrationMode::Precopy;
        let mut cancelled = false;
        loop {
            let deadline = self.sm.poll_timeout();
            // Before the switch the operator may cancel meanwhile (after
            // it a cancel is refused anyway).
            let next = if switched {
                self.run.redial(&self.dest, deadline).await
            } else {
                tokio::select! {
                    l = self.run.redial(&self.dest, deadline) => l,
                    () = self.run.cancel.notified() => {
                        cancelled = true;
                        None
                    }
                }
            };
            let Some(link) = next else { break };
            // Lanes join only a link the destination has resumed: with
            // them to dial, the streams wait for the next pages.
            let hold_back = !switched && self.plan.lanes() > 0;
            let opened = if hold_back {
                Ok(None)
            } else {
                self.open_streams(std::slice::from_ref(&link.conn), delta, postcopy)
                    .await
                    .map(Some)
            };
            match opened {
                Ok(opened) => {
                    // The broken link's bytes, counted once.
                    if let Some(c) = &self.wire.conn {
                        self.wire.earlier.add(c);
                    }
                    self.wire._share = Some(self.run.host.budget.join(&link.conn, Side::Send));
                    self.wire.conn = Some(link.conn);
                    self.wire.listen(link.send, link.recv);
                    match opened {
                        Some(o) => {
                            self.wire.jobs = o.data;
                            self.wire.faults.set_server(o.faults).await;
                            self.wire.cache_grant = o.cache;
                        }
                        None => self.wire.held_back = Some((delta, postcopy)),
                    }
                    resumed = true;
                    break;
                }
                // Broken again at once: dial again.
                Err(e) => {
                    tracing::info!(migration = %self.run.migration, "new link failed: {e}");
                    link.conn
                        .close(crate::transport::close::LINK_LOST.into(), b"link lost");
                }
            }
        }
        if cancelled {
            tracing::info!(migration = %self.run.migration, "cancelled while dialling again");
            self.sm.cancel(clock::now());
        } else if resumed {
            self.run
                .phase("reconnected: asking the destination to resume");
            self.sm.handle_reconnected(clock::now());
        } else {
            // Past the window: in doubt.
            self.sm.handle_timeout(clock::now());
        }
    }
}
