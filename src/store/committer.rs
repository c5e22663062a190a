//! Group commit: the single writer of the database, in two pipelined stages.
//!
//! Stage one, the committer thread, takes every request that is waiting and computes each one's
//! writes against the tree plus the writes of the requests before it (so a redelivery is
//! recognised even inside one batch). A request whose writes cannot be computed (an unreadable
//! record) is answered with its error and contributes nothing. The batch's writes go to sled as
//! one atomic `apply_batch`, in memory; the batch then moves to stage two.
//!
//! Stage two, the syncer thread, takes every applied batch that is waiting, appends their events
//! to the write-ahead log as one record with one `fdatasync`, and only then answers their
//! requests (see [`super::wal`]). While one batch syncs, the next is already being computed, and
//! requests that arrive meanwhile share the next sync: throughput grows with concurrency instead
//! of being capped at one fsync per request. As the only writer, the committer needs no
//! transactions.
//!
//! If applying or syncing fails, every request of the affected batches is answered with the
//! error: nothing in them is acknowledged, and providers retry (idempotency keys make the retry
//! harmless). A retry may then find its event already applied in memory and be told
//! "duplicate", so after a failure nothing more is acknowledged until a checkpoint has made all
//! of memory durable.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::index::PhoneIndex;
use super::record::Rules;
use super::wal::Wal;
use super::{
    history_key, phone_of_record_key, record_key, seen_key, subject_key, Outcome, Record,
    StoreError, StoredEvent,
};
use crate::event::Event;
use crate::metrics::Metrics;

/// The most requests applied before one sync; bounds the latency a batch adds.
const MAX_BATCH: usize = 1024;
/// Applied batches waiting for the syncer; when it falls behind, the committer waits.
const SYNC_QUEUE: usize = 4;
/// A checkpoint empties the WAL once it is this large or this old, bounding replay time.
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

pub(super) type Reply = oneshot::Sender<Result<Vec<Outcome>, StoreError>>;

pub(super) enum Job {
    Commit {
        events: Vec<Event>,
        reply: Reply,
    },
    /// Answered with a sequence number once every event with a lower one is applied.
    Barrier(oneshot::Sender<u64>),
    Stop,
}

/// Requests whose writes are applied and now wait for the WAL, with what each will be told.
#[derive(Default)]
struct Applied {
    /// Events of the requests that were applied, in order, for the WAL.
    events: Vec<Event>,
    replies: Vec<(Reply, Result<Vec<Outcome>, StoreError>)>,
}

/// Computes and applies writes; used by the committer and by WAL replay at open.
pub(super) struct Applier {
    pub db: sled::Db,
    pub tree: sled::Tree,
    pub rules: Rules,
    /// Kept in step with every phone record written.
    pub phones: Arc<PhoneIndex>,
    /// Kept in step with every account record written (phones are counted by the index).
    pub suppressed_accounts: Arc<std::sync::atomic::AtomicI64>,
}

/// The sled side of durability: flushing the tree and fsyncing its log file.
pub(super) struct Checkpointer {
    pub db: sled::Db,
    /// sled's log file; its flush only does sync_file_range, so we fsync it ourselves.
    pub log_file: File,
}

impl Checkpointer {
    pub fn make_durable(&self) -> std::io::Result<()> {
        self.db.flush().map_err(std::io::Error::other)?;
        self.log_file.sync_data()
    }
}

pub(super) fn spawn(
    applier: Applier,
    checkpointer: Checkpointer,
    wal: Wal,
    jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let (applied, to_sync) = std::sync::mpsc::sync_channel::<Applied>(SYNC_QUEUE);
    let committer_metrics = metrics.clone();
    let syncer = Syncer {
        checkpointer,
        wal,
        metrics,
        last_checkpoint: Instant::now(),
        must_checkpoint: false,
    };
    let syncer = std::thread::Builder::new()
        .name("store-syncer".into())
        .spawn(move || syncer.run(to_sync))?;
    std::thread::Builder::new()
        .name("store-committer".into())
        .spawn(move || {
            run_committer(&applier, jobs, applied, &committer_metrics);
            // The syncer ends once the committer's sender is dropped and it has answered all.
            if syncer.join().is_err() {
                tracing::error!("store syncer panicked");
            }
        })
}

fn run_committer(
    applier: &Applier,
    mut jobs: mpsc::Receiver<Job>,
    syncer: std::sync::mpsc::SyncSender<Applied>,
    metrics: &Metrics,
) {
    let mut batch: Vec<(Vec<Event>, Reply)> = Vec::new();
    let mut barriers = Vec::new();
    let mut stopping = false;
    while !stopping {
        let Some(mut job) = jobs.blocking_recv() else {
            break;
        };
        loop {
            match job {
                Job::Commit { events, reply } => batch.push((events, reply)),
                Job::Barrier(reply) => barriers.push(reply),
                Job::Stop => stopping = true,
            }
            if stopping || batch.len() >= MAX_BATCH {
                break;
            }
            match jobs.try_recv() {
                Ok(next) => job = next,
                Err(_) => break,
            }
        }
        let applied = applier.apply_requests(&mut batch, metrics);
        for barrier in barriers.drain(..) {
            if let Ok(sequence) = applier.db.generate_id() {
                let _ = barrier.send(sequence);
            }
        }
        if syncer.send(applied).is_err() {
            tracing::error!("store syncer is gone; stopping the committer");
            break;
        }
    }
}

impl Applier {
    fn apply_requests(&self, batch: &mut Vec<(Vec<Event>, Reply)>, metrics: &Metrics) -> Applied {
        let mut pending = Pending::default();
        let results: Vec<_> = batch
            .iter()
            .map(|(events, _)| self.plan(events, &mut pending))
            .collect();
        let written = self.write(pending);
        if let Err(e) = &written {
            metrics.store_write_failed();
            tracing::error!(
                requests = batch.len(),
                "store write failed, nothing in this batch is acknowledged: {e}"
            );
        }
        let mut applied = Applied::default();
        for ((events, reply), result) in batch.drain(..).zip(results) {
            let result = match (&written, result) {
                (Err(e), _) => Err(StoreError::Sled(e.clone())),
                (Ok(()), Ok(outcomes)) => {
                    applied.events.extend(events);
                    Ok(outcomes)
                }
                (Ok(()), Err(e)) => Err(e),
            };
            applied.replies.push((reply, result));
        }
        applied
    }

    /// Re-applies events recovered from the WAL; those sled already has are duplicates.
    pub fn replay(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut pending = Pending::default();
        self.plan(events, &mut pending)?;
        Ok(self.write(pending)?)
    }

    /// Applies one batch's writes atomically.
    fn write(&self, pending: Pending) -> Result<(), sled::Error> {
        if pending.writes.is_empty() {
            return Ok(());
        }
        let account_delta = pending.suppressed_accounts;
        let mut batch = sled::Batch::default();
        let mut phones = Vec::new();
        for (key, value) in pending.writes {
            if let Some(number) = phone_of_record_key(&key) {
                phones.push((number, value.clone()));
            }
            batch.insert(key, value);
        }
        self.tree.apply_batch(batch)?;
        for (number, value) in phones {
            self.phones.update(number, &value);
        }
        self.suppressed_accounts
            .fetch_add(account_delta, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Computes one request's writes into `pending`; on error, `pending` is left as it was.
    fn plan(&self, events: &[Event], pending: &mut Pending) -> Result<Vec<Outcome>, StoreError> {
        let mut mine = Pending::default();
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            let seen = seen_key(&event.idempotency_key);
            if mine.get(&seen, pending, &self.tree)?.is_some() {
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            let subject = subject_key(&event.subject);
            let record_key = record_key(&subject);
            let mut record = match mine.get(&record_key, pending, &self.tree)? {
                Some(bytes) => Record::decode(&bytes)?,
                None => Record::default(),
            };
            let was_suppressed = record.suppressed();
            let applied = record.apply(event, &self.rules);
            if applied {
                if matches!(event.subject, crate::event::Subject::Account { .. }) {
                    mine.suppressed_accounts +=
                        i64::from(record.suppressed()) - i64::from(was_suppressed);
                }
                mine.put(record_key, record.encode());
            }
            let history_key = history_key(&subject, event.event_time_ms, self.db.generate_id()?);
            let stored = StoredEvent {
                event: event.clone(),
                applied,
            };
            let stored = serde_json::to_vec(&stored).map_err(StoreError::CorruptHistory)?;
            mine.put(history_key.clone(), stored);
            mine.put(seen, history_key);
            outcomes.push(if applied {
                Outcome::Applied
            } else {
                Outcome::Recorded
            });
        }
        pending.absorb(mine);
        Ok(outcomes)
    }
}

struct Syncer {
    checkpointer: Checkpointer,
    wal: Wal,
    metrics: Arc<Metrics>,
    last_checkpoint: Instant,
    /// Set after a failure: memory may hold unacknowledged writes that a "duplicate" answer
    /// would vouch for, so only a full checkpoint may acknowledge again.
    must_checkpoint: bool,
}

impl Syncer {
    fn run(mut self, applied: std::sync::mpsc::Receiver<Applied>) {
        while let Ok(mut waiting) = applied.recv() {
            while let Ok(more) = applied.try_recv() {
                waiting.events.extend(more.events);
                waiting.replies.extend(more.replies);
            }
            let started = Instant::now();
            let durable = self.make_durable(&waiting.events);
            self.metrics
                .store_flushed(started.elapsed(), waiting.replies.len(), durable.is_ok());
            if let Err(e) = &durable {
                self.must_checkpoint = true;
                tracing::error!(
                    requests = waiting.replies.len(),
                    "store sync failed, nothing in this batch is acknowledged: {e}"
                );
            }
            for (reply, result) in waiting.replies {
                let answer = match &durable {
                    Ok(()) => result,
                    Err(e) => Err(StoreError::Sync(std::io::Error::new(
                        e.kind(),
                        e.to_string(),
                    ))),
                };
                // The requester may have gone away (client disconnected); its events are
                // durable all the same.
                let _ = reply.send(answer);
            }
            let due = self.wal.len() >= CHECKPOINT_BYTES
                || (self.wal.len() > 0 && self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL);
            if due && !self.must_checkpoint {
                if let Err(e) = self.checkpoint() {
                    tracing::error!("checkpoint failed, the WAL is kept: {e}");
                }
            }
        }
        if let Err(e) = self.checkpoint() {
            tracing::error!("checkpoint at shutdown failed, the WAL is kept for replay: {e}");
        }
    }

    fn make_durable(&mut self, events: &[Event]) -> std::io::Result<()> {
        if self.must_checkpoint {
            self.checkpoint()?;
            self.must_checkpoint = false;
            return Ok(());
        }
        if events.is_empty() {
            return Ok(());
        }
        let events: Vec<&Event> = events.iter().collect();
        self.wal.append(&events)
    }

    /// Makes sled's state durable on its own, then empties the WAL.
    fn checkpoint(&mut self) -> std::io::Result<()> {
        let started = Instant::now();
        let wal_bytes = self.wal.len();
        self.checkpointer.make_durable()?;
        self.wal.clear()?;
        self.last_checkpoint = Instant::now();
        tracing::debug!(
            wal_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "checkpoint"
        );
        Ok(())
    }
}

/// Writes computed but not yet applied: later requests of a batch read through them.
#[derive(Default)]
struct Pending {
    writes: HashMap<Vec<u8>, Vec<u8>>,
    /// Change in the number of suppressed accounts once these writes apply.
    suppressed_accounts: i64,
}

impl Pending {
    /// The value of `key` as it will be after everything planned so far.
    fn get(
        &self,
        key: &[u8],
        batch: &Pending,
        tree: &sled::Tree,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(value) = self.writes.get(key).or_else(|| batch.writes.get(key)) {
            return Ok(Some(value.clone()));
        }
        Ok(tree.get(key)?.map(|v| v.to_vec()))
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, value);
    }

    fn absorb(&mut self, other: Pending) {
        self.writes.extend(other.writes);
        self.suppressed_accounts += other.suppressed_accounts;
    }
}
