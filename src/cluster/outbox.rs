//! The events this node accepted, on their way to the stream.
//!
//! A request's events are queued with their sequence numbers in the log; the publisher sends
//! what is queued, each with `Nats-Msg-Id` set to its idempotency key, and lets each request go
//! as soon as the stream acknowledged all of its events. While the stream cannot be reached the
//! queue only grows.
//!
//! What survives a restart is one number, the *published mark*: every event this node accepted
//! up to that sequence was acknowledged by the stream. Below it nothing is queued, and no
//! request that may still add an event below it is in progress (each holds a [`Ticket`] with
//! the log's end when it began). At start the publisher reads the log from the mark on and
//! publishes it all again (events that came from the stream, or were acknowledged just before
//! a crash, are dropped by the stream as duplicates of their `Nats-Msg-Id`, or by the nodes by
//! their idempotency keys), and the log keeps the segments from the mark on whatever snapshots
//! cover, so nothing waiting can be removed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use tokio::sync::{oneshot, Notify};

use super::{Link, Remembered};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::store::Store;

/// Events published at once, their acknowledgements awaited together.
const PUBLISH_BATCH: usize = 256;
/// How long the publisher waits before trying again after the stream failed it.
const RETRY: Duration = Duration::from_millis(500);
/// How often the published mark is written down, at most.
const MARK_EVERY: Duration = Duration::from_secs(1);

struct Waiting {
    seq: u64,
    event: Event,
    /// Told once the stream acknowledged the event; `None` for events republished at start.
    acked: Option<Arc<Request>>,
}

/// The events of one request that the stream has not acknowledged yet.
struct Request {
    unacked: AtomicU64,
    done: Mutex<Option<oneshot::Sender<()>>>,
}

impl Request {
    fn acked_one(&self) {
        if self.unacked.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(done) = lock(&self.done).take() {
                // The request may have stopped waiting.
                let _ = done.send(());
            }
        }
    }
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    /// Requests in progress: ticket id → the log's last sequence when it began.
    tickets: BTreeMap<u64, u64>,
    next_ticket: u64,
}

pub(super) struct Outbox {
    queue: Mutex<Queue>,
    wake: Notify,
}

/// A request in progress: the published mark stays below where the log was when it began,
/// until its events are queued (or it failed).
pub(super) struct Ticket<'a> {
    outbox: &'a Outbox,
    id: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        lock(&self.outbox.queue).tickets.remove(&self.id);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox {
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        }
    }

    /// Taken before a request commits; `log_end` is the last sequence the log holds now.
    pub fn ticket(&self, log_end: u64) -> Ticket<'_> {
        let mut queue = lock(&self.queue);
        let id = queue.next_ticket;
        queue.next_ticket += 1;
        queue.tickets.insert(id, log_end);
        Ticket { outbox: self, id }
    }

    /// Queues a committed request's new events; resolves once the stream acknowledged them all.
    pub fn enqueue(
        &self,
        events: Vec<(u64, Event)>,
        ticket: Ticket<'_>,
    ) -> impl std::future::Future<Output = ()> {
        let (done, acked) = oneshot::channel();
        if events.is_empty() {
            let _ = done.send(());
        } else {
            let request = Arc::new(Request {
                unacked: AtomicU64::new(events.len() as u64),
                done: Mutex::new(Some(done)),
            });
            let mut queue = lock(&self.queue);
            for (seq, event) in events {
                queue.waiting.push_back(Waiting {
                    seq,
                    event,
                    acked: Some(request.clone()),
                });
            }
        }
        drop(ticket);
        self.wake.notify_one();
        async move {
            let _ = acked.await;
        }
    }

    pub fn len(&self) -> u64 {
        lock(&self.queue).waiting.len() as u64
    }

    fn take(&self, most: usize) -> Vec<Waiting> {
        let mut queue = lock(&self.queue);
        let count = most.min(queue.waiting.len());
        queue.waiting.drain(..count).collect()
    }

    /// Puts events the stream did not take back at the front, in their order.
    fn put_back(&self, events: Vec<Waiting>) {
        let mut queue = lock(&self.queue);
        for event in events.into_iter().rev() {
            queue.waiting.push_front(event);
        }
    }

    /// Queues events read back from the log at start; no request waits for them.
    fn queue_logged(&self, logged: Vec<(u64, Event)>) {
        lock(&self.queue)
            .waiting
            .extend(logged.into_iter().map(|(seq, event)| Waiting {
                seq,
                event,
                acked: None,
            }));
    }

    /// The highest sequence up to which every event this node accepted is acknowledged, given
    /// that the log ends at `log_end` and nothing is being published.
    fn published_mark(&self, log_end: u64) -> u64 {
        let queue = lock(&self.queue);
        let waiting = queue.waiting.iter().map(|w| w.seq.saturating_sub(1));
        let in_progress = queue.tickets.values().copied();
        waiting.chain(in_progress).fold(log_end, u64::min)
    }
}

/// The publisher: republishes what the log holds after the published mark, then publishes
/// whatever is queued, for as long as the service runs.
pub(super) async fn publish(
    link: Arc<Link>,
    outbox: Arc<Outbox>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
) {
    let mut mark = Remembered::read(&link.config.dir, "published");
    store.keep_log_from(mark.value + 1);
    republish_logged(&outbox, &store, mark.value + 1).await;
    let subject = link.subject();
    let mut marked_at = Instant::now();
    let mut failing = false;
    loop {
        if outbox.len() == 0 {
            let _ = tokio::time::timeout(MARK_EVERY, outbox.wake.notified()).await;
        }
        if marked_at.elapsed() >= MARK_EVERY {
            let published = outbox.published_mark(store.applied_through());
            mark.set(published);
            store.keep_log_from(published + 1);
            marked_at = Instant::now();
        }
        if !link.connected() {
            tokio::time::sleep(RETRY).await;
            continue;
        }
        let batch = outbox.take(PUBLISH_BATCH);
        if batch.is_empty() {
            continue;
        }
        let (acked, unacked) = publish_batch(&link, &subject, batch).await;
        metrics.cluster_published(acked.len() as u64);
        for waiting in &acked {
            if let Some(request) = &waiting.acked {
                request.acked_one();
            }
        }
        if unacked.is_empty() {
            if failing {
                tracing::info!("the stream takes events again");
                failing = false;
            }
        } else {
            if !failing {
                tracing::warn!(
                    queued = outbox.len() + unacked.len() as u64,
                    "the stream did not acknowledge events; they stay queued and are published again"
                );
                failing = true;
            }
            outbox.put_back(unacked);
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// Publishes a batch, all of it before awaiting any acknowledgement; returns the events the
/// stream acknowledged and those it did not, in order.
async fn publish_batch(
    link: &Link,
    subject: &str,
    batch: Vec<Waiting>,
) -> (Vec<Waiting>, Vec<Waiting>) {
    let mut pending = Vec::with_capacity(batch.len());
    for waiting in batch {
        let payload = match serde_json::to_vec(&waiting.event) {
            Ok(payload) => Bytes::from(payload),
            Err(e) => {
                tracing::error!("an event cannot be encoded for the stream: {e}");
                continue;
            }
        };
        let message = PublishMessage::build()
            .message_id(&waiting.event.idempotency_key)
            .payload(payload);
        let sent = link.context.send_publish(subject.to_owned(), message).await;
        pending.push((waiting, sent));
    }
    let (mut acked, mut unacked) = (Vec::new(), Vec::new());
    for (waiting, sent) in pending {
        let ack = match sent {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match ack {
            Ok(()) => acked.push(waiting),
            Err(e) => {
                tracing::debug!(seq = waiting.seq, "not acknowledged: {e}");
                unacked.push(waiting);
            }
        }
    }
    (acked, unacked)
}

/// Queues again everything the log holds from `from` on, until it can be read.
async fn republish_logged(outbox: &Outbox, store: &Store, from: u64) {
    loop {
        match store.logged_since(from).await {
            Ok(logged) => {
                if !logged.is_empty() {
                    tracing::info!(
                        events = logged.len(),
                        from,
                        "publishing again what the log holds after the last event the stream acknowledged"
                    );
                }
                outbox.queue_logged(logged);
                return;
            }
            Err(e) => {
                tracing::error!("cannot read the log to publish what the stream may lack: {e}");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}
