//! QEMU has finished at the source: what went out on each channel is
//! announced in `StreamsDone` as soon as the source's own side of every
//! channel has ended, and the destination's `Ready` is checked against
//! both roots once the way back has ended too.
//!
//! The way back ends when the destination's QEMU, having loaded the
//! stream, closes its channels; waiting for that before `StreamsDone`
//! would put a round trip more into a pre-copy pause (the close comes
//! back half a round trip after the last bytes arrive, and `StreamsDone`
//! then goes out). The destination compares what it received with what
//! the source sent; the source compares what it received back with the
//! destination's back root in `Ready` (the receipt binds both).

use convoy_protocol::digest::Digest;
use convoy_protocol::message::{Message, Reason};
use convoy_protocol::receipt::ReceiptKind;
use convoy_protocol::stream::{self, ChannelSent, StreamsDone};
use tokio::sync::mpsc;

use super::{Run, State, DRAIN_TIMEOUT, PEER, READY_TIMEOUT};
use crate::engine::qemu::common::{digests, ChanEvent, Control, Fail};
use crate::transport::{write_message, SendStream};

impl Run {
    /// Sends `StreamsDone` once every one of the `opened` channels has
    /// ended its way out, then waits for `Ready` and for every channel to
    /// end both ways, and checks `Ready`'s roots and receipt against what
    /// was carried here.
    pub(super) async fn streams_done(
        &self,
        send: &mut SendStream,
        ctl: &mut mpsc::Receiver<Control>,
        chans: &mut mpsc::UnboundedReceiver<ChanEvent>,
        st: &mut State,
        (mut opened, td): (usize, Digest),
    ) -> Result<(), Fail> {
        let drained = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        let sent = loop {
            if let Some(sent) = all_sent(st, opened) {
                break sent;
            }
            match tokio::time::timeout_at(drained, chans.recv()).await {
                Ok(ev) => channel_event(ev, st, &mut opened)?,
                Err(_) => return Err(Fail::local("QEMU's channels did not end")),
            }
        };
        let done = Message::StreamsDone(StreamsDone { channels: sent });
        st.control_bytes += write_message(send, &done).await.map_err(Fail::link)? as u64;
        st.pause_marks[0] = Some(super::sequence::unix_us());
        // Ready, and the way back's end, in whichever order they come.
        let ready_by = tokio::time::Instant::now() + READY_TIMEOUT;
        let mut ready = None;
        while ready.is_none() || st.channels.len() < opened {
            let left = ready_by.saturating_duration_since(tokio::time::Instant::now());
            tokio::select! {
                ev = chans.recv(), if st.channels.len() < opened => channel_event(ev, st, &mut opened)?,
                m = self.next(ctl, left, "Ready"), if ready.is_none() => match m? {
                    Message::Ready(r) => {
                        st.pause_marks[1] = Some(super::sequence::unix_us());
                        ready = Some(r);
                    }
                    other => {
                        return Err(Fail::violation(
                            PEER,
                            format!("{} instead of Ready", other.kind()),
                        ))
                    }
                },
                () = tokio::time::sleep_until(drained), if st.channels.len() < opened => {
                    return Err(Fail::local("QEMU's channels did not close"));
                }
            }
        }
        st.channels = stream::canonical(std::mem::take(&mut st.channels));
        let r = ready.ok_or_else(|| Fail::local("no Ready"))?;
        let (out_root, back_root) =
            stream::check_ready(&st.channels, r.memory_root, r.device_digest)
                .map_err(|e| Fail::new(Reason::RootMismatch, e.0))?;
        self.notary()
            .check(
                &r.receipt,
                &self.dest,
                ReceiptKind::Ready,
                self.migration,
                td,
                Some((out_root, back_root)),
            )
            .map_err(|e| Fail::violation(PEER, format!("Ready receipt: {e}")))?;
        st.receipts.push(r.receipt);
        st.verified = true;
        Ok(())
    }
}

/// What went out on each of the `opened` channels, once every one has
/// ended its way out (a channel that ended both ways counts too).
fn all_sent(st: &State, opened: usize) -> Option<Vec<ChannelSent>> {
    let mut sent: Vec<ChannelSent> = st.channels.iter().map(|c| c.sent()).collect();
    for s in &st.sent {
        if !sent.iter().any(|c| c.kind == s.kind) {
            sent.push(*s);
        }
    }
    (sent.len() >= opened).then_some(sent)
}

/// One channel event after QEMU finished: counted, recorded, or the
/// failure it reports.
fn channel_event(ev: Option<ChanEvent>, st: &mut State, opened: &mut usize) -> Result<(), Fail> {
    match ev {
        Some(ChanEvent::Opened) => *opened += 1,
        Some(ChanEvent::Sent(kind, c)) => st.sent.push(crate::engine::qemu::common::sent(kind, c)),
        Some(ChanEvent::Done(kind, Ok(sp))) => st.channels.push(digests(kind, &sp)),
        Some(ChanEvent::Done(kind, Err(e))) => return Err(Fail::link(format!("{kind}: {e}"))),
        Some(ChanEvent::Bad(e)) => return Err(Fail::link(e)),
        None => return Err(Fail::local("the channels' tasks ended")),
    }
    Ok(())
}
