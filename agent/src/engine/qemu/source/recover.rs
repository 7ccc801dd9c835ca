//! Post-copy recovery at the source (see [`crate::engine::qemu::recovery`]):
//! the broken channel collected, QEMU paused, the destination dialled
//! again within the recovery window, the two link cuts exchanged and
//! checked, and QEMU resumed over a new channel.

use std::time::Duration;

use crate::engine::clock;
use crate::transport::{Connection, SendStream};
use convoy_protocol::message::{Message, Resume};
use convoy_protocol::model::MigrationMode;
use convoy_protocol::receipt::ticket_digest;
use convoy_protocol::stream::{self, ChannelDigests, ChannelKind, LinkCut};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::channels::{accept_channels, listen};
use super::{Run, State, PEER};
use crate::engine::qemu::common::{digests, read_control, ChanEvent, Control, Fail};
use crate::engine::qemu::recovery::{
    broken_channel, is_loss, live_channel, their_view, until_status, Broken, MAX_RECOVERIES,
};
use crate::transport::{close, write_message};

/// How long the destination may take to answer a `Resume`: more than it
/// may take to see its channel end, have its QEMU listen (each bounded by
/// `PAUSE_TIMEOUT`, a QMP command by 15 s) and answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The link a recovery brings: its connection, control stream both ways.
struct NewLink {
    conn: Connection,
    send: SendStream,
    ctl: mpsc::Receiver<Control>,
    /// The destination's account of the broken link.
    cut: LinkCut,
}

impl Run {
    /// Whether a broken link may be recovered: after the post-copy switch,
    /// with no disk mirrors (their jobs end with the link), within
    /// [`MAX_RECOVERIES`].
    pub(super) fn recoverable(&self, st: &State) -> bool {
        st.handed_over
            && self.prepared.manifest.mode != MigrationMode::Precopy
            && self.prepared.disks.is_empty()
            && st.recoveries < MAX_RECOVERIES
            && !self.host.config.recovery_window.is_zero()
    }

    /// Recovers the migration after its link broke (`first`: the broken
    /// channel, when that is how the loss showed); on success `send` and
    /// `ctl` are the new link's and QEMU migrates again.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn recover(
        &self,
        send: &mut SendStream,
        ctl: &mut mpsc::Receiver<Control>,
        chans: &mut mpsc::UnboundedReceiver<ChanEvent>,
        chan_tx: &mpsc::UnboundedSender<ChanEvent>,
        acceptors: &mut JoinSet<()>,
        st: &mut State,
        opened: &mut usize,
        first: Option<Broken>,
    ) -> Result<(), Fail> {
        let channel = live_channel(st.recoveries);
        self.phase(
            st,
            "link lost after the post-copy switch: dialling the destination again",
        );
        tracing::warn!(migration = %self.migration, "link lost after the post-copy switch, recovering");
        if let Some(old) = &st.link {
            old.close(close::LINK_LOST.into(), b"link lost");
        }
        let broken = match first {
            Some(b) => b,
            None => broken_channel(chans, channel, &mut st.channels, opened).await?,
        };
        until_status(&self.vm, "postcopy-paused").await?;
        st.recoveries += 1;
        let link = st.recoveries;
        let ours: ChannelDigests = digests(channel, &broken.carried);
        let deadline = clock::now() + self.host.config.recovery_window;
        // A new link that fails before our LinkCut is out is given up,
        // and another dialled, as the destination awaits another Resume.
        let (conn, new_send, new_ctl, theirs) = loop {
            let NewLink {
                conn,
                mut send,
                ctl,
                cut,
            } = self.reach(link, channel, deadline, &st.credits).await?;
            let theirs = their_view(&cut, self.migration, link, channel)
                .map_err(|e| Fail::violation(PEER, e))?;
            broken
                .check_prefix(theirs.out_bytes, theirs.out.0)
                .map_err(|e| Fail::violation(PEER, e))?;
            let mine = Message::LinkCut(LinkCut {
                migration: self.migration,
                link,
                channels: vec![ours],
            });
            match write_message(&mut send, &mine).await {
                Ok(n) => {
                    st.control_bytes += n as u64;
                    break (conn, send, ctl, theirs);
                }
                Err(e) => {
                    tracing::info!(migration = %self.migration, "the new link failed: {e}");
                    conn.close(close::LINK_LOST.into(), b"link lost");
                }
            }
        };
        let agreed = stream::agreed(&ours, &theirs)
            .ok_or_else(|| Fail::local("the link cuts name different channels"))?;
        st.channels.push(agreed);
        // QEMU connects to a new socket; its connection goes on a new
        // stream, the recovery's channel.
        let sock = self.vm.dir().join(format!("migrate-recover-{link}.sock"));
        let listener = listen(&sock)?;
        acceptors.spawn(accept_channels(
            listener,
            self.vm.pid().await,
            conn.clone(),
            self.migration,
            vec![ChannelKind::Resumed(link)],
            chan_tx.clone(),
            (self.prepared.manifest.mode, st.credits.clone()),
        ));
        st.window.start(&conn);
        if let Some(old) = st.link.replace(conn) {
            st.earlier_wire += old.stats().wire_bytes();
        }
        *send = new_send;
        *ctl = new_ctl;
        self.qmp(
            "migrate",
            json!({ "uri": format!("unix:{}", sock.display()), "resume": true }),
        )
        .await?;
        self.phase(
            st,
            &format!("link back: QEMU resumes post-copy on a new connection (recovery {link})"),
        );
        Ok(())
    }

    /// Dials the destination until `deadline` (the recovery window from
    /// the break), asks it to
    /// resume, and returns the new link with the destination's account of
    /// the broken one.
    async fn reach(
        &self,
        link: u16,
        channel: ChannelKind,
        deadline: std::time::Instant,
        credits: &std::sync::Arc<crate::engine::qemu::pacing::Credits>,
    ) -> Result<NewLink, Fail> {
        let td = ticket_digest(&self.req.ticket);
        loop {
            let left = deadline.saturating_duration_since(clock::now());
            if left.is_zero() {
                return Err(Fail::link(format!(
                    "no new link to the destination within the recovery window ({} s)",
                    self.host.config.recovery_window.as_secs()
                )));
            }
            let attempt = async {
                let conn = self
                    .host
                    .dial_agent(self.addr, &self.dest)
                    .await
                    .map_err(|e| e.to_string())?;
                let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                let resume = Message::Resume(Resume {
                    migration: self.migration,
                    ticket: td,
                });
                write_message(&mut send, &resume)
                    .await
                    .map_err(|e| e.to_string())?;
                let (tx, mut ctl) = mpsc::channel(8);
                crate::engine::spawn(read_control(recv, tx, Some(credits.clone())));
                Ok::<_, String>((conn, send, ctl.recv().await, ctl))
            };
            match tokio::time::timeout(left.min(ANSWER_TIMEOUT), attempt).await {
                Ok(Ok((conn, send, first, ctl))) => match first {
                    Some(Ok(Some(Message::LinkCut(cut)))) => {
                        return Ok(NewLink {
                            conn,
                            send,
                            ctl,
                            cut,
                        })
                    }
                    c if is_loss(&c) => {
                        tracing::info!(migration = %self.migration, "reconnecting: the new link broke");
                    }
                    c => {
                        // The destination refused (or broke the protocol):
                        // the guest's state stays split, in doubt.
                        let m = Fail::from_control(c, PEER)?;
                        return Err(Fail::violation(
                            PEER,
                            format!(
                                "{} instead of LinkCut for the {channel} (recovery {link})",
                                m.kind()
                            ),
                        ));
                    }
                },
                Ok(Err(e)) => tracing::info!(migration = %self.migration, "reconnecting: {e}"),
                Err(_) => {
                    tracing::info!(migration = %self.migration, "reconnecting: no answer in time")
                }
            }
            let pause =
                Duration::from_millis(500).min(deadline.saturating_duration_since(clock::now()));
            tokio::time::sleep(pause).await;
        }
    }
}
