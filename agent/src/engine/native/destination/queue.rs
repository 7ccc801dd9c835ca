//! A data stream's frames, from the task that reads them to the stream's
//! decoder thread, with no lock that both take.
//!
//! After a post-copy switch the decoders are background work
//! ([`crate::engine::priority`]): at `SCHED_IDLE` a decoder runs only
//! when nothing else wants its CPU. A lock it shares with a runtime
//! worker is then a trap: preempted while it holds the lock, it holds the
//! worker, and every fault's task on that worker, until the idle thread
//! runs again. A bounded tokio channel is such a lock: taking a frame
//! gives back its slot under the lock of the channel's waiters, which the
//! reading task takes whenever the queue is full. (The source's encoders
//! met the same trap: `source::jobs::Outbox`.)
//!
//! So the frames go on an unbounded `std::sync::mpsc` channel, which the
//! decoder only polls (`try_recv`: no lock; it never registers as a
//! waiting receiver, so a send takes none either) and parks between
//! (`std::thread::park`, a futex word, no lock). The reader unparks it
//! after each frame, and bounds the queue itself, in frames and in
//! bytes, with two counters: a frame counts until it is applied, and the
//! reader waits for room on an [`AtomicWaker`] that the decoder wakes
//! when it gives room back.
//!
//! What is left: waking a task from the decoder thread schedules it on
//! the runtime, which takes the runtime's own locks for a moment (its
//! injection queue, and to wake a parked worker, its idle list and that
//! worker's parker), as each of the source's encoders does for its
//! writer. The decoder does so when the reader waits for room, and for
//! every frame when it reports the frame applied to the engine's task
//! (`Event::Applied`). Installing a page also takes the sim backend's
//! demand-paging mutexes (four, each for a lookup, an insert or a
//! remove), which the fault stream's task takes too, and the kernel's
//! `UFFDIO_COPY` takes the address space's lock for reading. The
//! starvation check of [`crate::engine::priority`] bounds how long an
//! idle decoder can keep any of them.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::task::Poll;
use std::thread::Thread;

use futures_util::task::AtomicWaker;

/// What the two ends share.
struct Shared {
    /// Frames sent and not yet applied.
    frames: AtomicUsize,
    /// Their bytes, as the reader counted them.
    bytes: AtomicUsize,
    /// The reader's task, while it waits for room.
    room: AtomicWaker,
    /// The decoder is gone: nothing sent will be applied.
    closed: AtomicBool,
    max_frames: usize,
    max_bytes: usize,
}

impl Shared {
    /// Whether a frame of `n` bytes may be sent now: within both bounds,
    /// or alone in the queue (a frame larger than the byte bound waits
    /// for the queue to empty), or the decoder is gone (the send fails).
    fn fits(&self, n: usize) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        let frames = self.frames.load(Ordering::Acquire);
        let bytes = self.bytes.load(Ordering::Acquire);
        frames == 0 || (frames < self.max_frames && bytes.saturating_add(n) <= self.max_bytes)
    }
}

/// The decoder thread's end.
pub(super) struct Drain {
    rx: mpsc::Receiver<(Frame, usize)>,
    shared: Arc<Shared>,
}

/// The frame type carried.
type Frame = convoy_protocol::message::Message;

/// The reader's end before it knows its decoder thread.
pub(super) struct Unattached {
    tx: mpsc::Sender<(Frame, usize)>,
    shared: Arc<Shared>,
}

/// The reader's end.
pub(super) struct Feed {
    /// `None` once dropped (the decoder then sees the end).
    tx: Option<mpsc::Sender<(Frame, usize)>>,
    shared: Arc<Shared>,
    decoder: Thread,
}

/// A queue of at most `max_frames` frames and `max_bytes` bytes.
pub(super) fn channel(max_frames: usize, max_bytes: usize) -> (Unattached, Drain) {
    let shared = Arc::new(Shared {
        frames: AtomicUsize::new(0),
        bytes: AtomicUsize::new(0),
        room: AtomicWaker::new(),
        closed: AtomicBool::new(false),
        max_frames: max_frames.max(1),
        max_bytes,
    });
    let (tx, rx) = mpsc::channel();
    (
        Unattached {
            tx,
            shared: shared.clone(),
        },
        Drain { rx, shared },
    )
}

impl Unattached {
    /// The feed of the thread that holds the [`Drain`].
    pub(super) fn to(self, decoder: Thread) -> Feed {
        Feed {
            tx: Some(self.tx),
            shared: self.shared,
            decoder,
        }
    }
}

impl Feed {
    /// Queues `m`, counted as `bytes`, once there is room; `false` when
    /// the decoder is gone.
    pub(super) async fn send(&mut self, m: Frame, bytes: usize) -> bool {
        let shared = &self.shared;
        poll_fn(|cx| {
            if shared.fits(bytes) {
                return Poll::Ready(());
            }
            shared.room.register(cx.waker());
            // Room given back between the check and the registration.
            if shared.fits(bytes) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        if shared.closed.load(Ordering::Acquire) {
            return false;
        }
        shared.frames.fetch_add(1, Ordering::AcqRel);
        shared.bytes.fetch_add(bytes, Ordering::AcqRel);
        let Some(tx) = &self.tx else {
            return false;
        };
        if tx.send((m, bytes)).is_err() {
            return false;
        }
        self.decoder.unpark();
        true
    }
}

impl Drop for Feed {
    /// The decoder sees the end, even if it is parked.
    fn drop(&mut self) {
        self.tx = None;
        self.decoder.unpark();
    }
}

/// A frame taken from the queue: it counts against the bounds until this
/// is dropped (once it is applied).
pub(super) struct Taken {
    bytes: usize,
    shared: Arc<Shared>,
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.shared.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.shared.frames.fetch_sub(1, Ordering::AcqRel);
        // Nothing to wake (no lock taken) unless the reader waits.
        self.shared.room.wake();
    }
}

impl Drain {
    /// The next frame, parking the calling thread while none is queued;
    /// `None` once the feed is gone and every frame taken. Call it from
    /// the thread given to [`Unattached::to`]: only that one is unparked.
    pub(super) fn next(&mut self) -> Option<(Frame, Taken)> {
        loop {
            match self.rx.try_recv() {
                Ok((m, bytes)) => {
                    return Some((
                        m,
                        Taken {
                            bytes,
                            shared: self.shared.clone(),
                        },
                    ))
                }
                // A park returns at once if an unpark came since the last
                // one, and may return early: the loop checks again.
                Err(TryRecvError::Empty) => std::thread::park(),
                Err(TryRecvError::Disconnected) => return None,
            }
        }
    }
}

impl Drop for Drain {
    /// The reader stops waiting for room that will never come.
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.room.wake();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use convoy_protocol::message::Message;

    use super::*;

    fn frame(i: u8) -> Message {
        Message::Probe(convoy_protocol::stream::Probe { seq: u32::from(i) })
    }

    fn nonce(m: &Message) -> u8 {
        match m {
            Message::Probe(p) => u8::try_from(p.seq).unwrap(),
            _ => panic!("not a probe"),
        }
    }

    /// A queue and a decoder thread that takes its frames as the test
    /// allows: each frame counts until the test lets it be applied.
    struct Lab {
        feed: Feed,
        decoder: std::thread::JoinHandle<()>,
        got: std::sync::mpsc::Receiver<u8>,
        release: std::sync::mpsc::Sender<()>,
    }

    impl Lab {
        fn new(max_frames: usize, max_bytes: usize) -> Self {
            let (unattached, mut drain) = channel(max_frames, max_bytes);
            let (got_tx, got) = std::sync::mpsc::channel();
            let (release, release_rx) = std::sync::mpsc::channel::<()>();
            let decoder = std::thread::spawn(move || {
                while let Some((m, taken)) = drain.next() {
                    let _ = got_tx.send(nonce(&m));
                    if release_rx.recv().is_err() {
                        return;
                    }
                    drop(taken);
                }
            });
            let feed = unattached.to(decoder.thread().clone());
            Lab {
                feed,
                decoder,
                got,
                release,
            }
        }

        /// Frame `want` reached the decoder; it is applied (gives its
        /// room back).
        fn applied(&self, want: u8) {
            assert_eq!(self.got.recv_timeout(WAIT).unwrap(), want);
            self.release.send(()).unwrap();
        }

        /// Whether sending a frame of `bytes` waits (for 200 ms).
        async fn waits(&mut self, i: u8, bytes: usize) -> bool {
            tokio::time::timeout(Duration::from_millis(200), self.feed.send(frame(i), bytes))
                .await
                .is_err()
        }

        /// Sends a frame that must go, within 5 s (a lost wake fails
        /// here instead of hanging the test).
        async fn sends(&mut self, i: u8, bytes: usize) {
            let sent = tokio::time::timeout(WAIT, self.feed.send(frame(i), bytes))
                .await
                .expect("a send that has room still waits");
            assert!(sent, "the decoder is gone");
        }

        /// The feed gone: the parked decoder sees the end and returns.
        async fn end(self) {
            drop(self.feed);
            joined(self.decoder).await;
        }
    }

    /// How long a step that must happen may take.
    const WAIT: Duration = Duration::from_secs(5);

    /// The decoder thread ends within [`WAIT`].
    async fn joined(decoder: std::thread::JoinHandle<()>) {
        tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || decoder.join()))
            .await
            .expect("the decoder thread did not end")
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_arrive_in_order_and_the_reader_waits_for_room() {
        let mut lab = Lab::new(2, 100);
        // Two frames fit; a third waits until the first is applied.
        lab.sends(1, 10).await;
        lab.sends(2, 10).await;
        assert!(
            lab.waits(3, 10).await,
            "a third frame went past a bound of two"
        );
        // (The send that timed out queued nothing: it waits before it counts.)
        lab.applied(1);
        lab.sends(3, 10).await;
        lab.applied(2);
        lab.applied(3);
        lab.end().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_are_bounded_and_a_large_frame_goes_alone() {
        let mut lab = Lab::new(32, 100);
        lab.sends(1, 60).await;
        // 60 + 50 > 100: it waits.
        assert!(lab.waits(2, 50).await, "the byte bound was passed");
        lab.applied(1);
        // Larger than the bound: it goes once the queue is empty.
        lab.sends(2, 500).await;
        lab.applied(2);
        lab.end().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_waiting_for_room_stops_when_the_decoder_is_gone() {
        let mut lab = Lab::new(2, 100);
        lab.sends(1, 10).await;
        lab.sends(2, 90).await;
        assert_eq!(lab.got.recv_timeout(WAIT).unwrap(), 1);
        let Lab {
            mut feed,
            decoder,
            release,
            ..
        } = lab;
        // The reader waits for room for 50 bytes; the decoder stops while
        // it holds frame 1. Giving frame 1 back leaves 90 bytes queued, no
        // room for 50: only the decoder's end can let the reader go.
        let waiting = tokio::spawn(async move { feed.send(frame(3), 50).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(release);
        let sent = tokio::time::timeout(WAIT, waiting)
            .await
            .expect("the reader still waits for a decoder that is gone")
            .unwrap();
        assert!(!sent, "a frame was sent to a decoder that is gone");
        joined(decoder).await;
    }
}
