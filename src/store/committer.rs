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
//!
//! sled's own errors are sticky: once a write failed, the checkpoint fails too, for good. Then
//! the syncer reopens the database (see [`super::database`]) as soon as the data directory takes
//! writes again, tried at most every [`REOPEN_RETRY`] while requests keep coming. Requests applied
//! to the database that was closed are answered with an error: their effects died with it.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::database::{Database, Slot};
use super::index::PhoneIndex;
use super::record::{self, Rules};
use super::wal::Wal;
use super::{
    entry_order, history_entries, history_key, inline_entry, phone_of_record_key, record_key,
    seen_key, subject_key, Outcome, Record, StoreConfig, StoreError, StoredEvent,
};
use crate::event::{is_minted_idempotency_key, Event};
use crate::metrics::Metrics;

/// The most requests applied before one sync; bounds the latency a batch adds.
const MAX_BATCH: usize = 1024;
/// Applied batches waiting for the syncer; when it falls behind, the committer waits.
const SYNC_QUEUE: usize = 4;
/// A checkpoint empties the WAL once it is this large or this old, bounding replay time.
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// After a storage failure, how often requests may trigger an attempt to reopen the database.
const REOPEN_RETRY: Duration = Duration::from_secs(2);
/// Free space the data directory needs before a reopen is tried: sled writes as it recovers.
const REOPEN_MIN_FREE: u64 = 8 * 1024 * 1024;
/// How long a reopen waits for readers (an export) to let go of the old database.
const READERS_PATIENCE: Duration = Duration::from_secs(10);
/// How long the committer holds requests while the database is being reopened.
const REOPEN_PATIENCE: Duration = Duration::from_secs(30);
/// sled releases its file lock once its background threads have wound down.
const LOCK_PATIENCE: Duration = Duration::from_secs(5);

pub(super) type Reply = oneshot::Sender<Result<Vec<Outcome>, StoreError>>;

pub(super) enum Job {
    Commit {
        events: Vec<Event>,
        reply: Reply,
    },
    /// Answered with a sequence number once every event with a lower one is applied, or with
    /// `None` when there is no open database to number it in.
    Barrier(oneshot::Sender<Option<u64>>),
    Stop,
}

/// Requests whose writes are applied and now wait for the WAL, with what each will be told.
#[derive(Default)]
struct Applied {
    /// The database generation the writes went to; `None` when there was none to write to.
    generation: Option<u64>,
    /// sled refused the writes: the syncer must checkpoint (or reopen) before acknowledging.
    write_failed: bool,
    /// Events of the requests that were applied, in order, for the WAL.
    events: Vec<Event>,
    replies: Vec<(Reply, Result<Vec<Outcome>, StoreError>)>,
}

/// Computes and applies writes; used by the committer and by WAL replay at open.
#[derive(Clone)]
pub(super) struct Applier {
    pub rules: Rules,
    /// Kept in step with every phone record written.
    pub phones: Arc<PhoneIndex>,
    /// Kept in step with every account record written (phones are counted by the index).
    pub suppressed_accounts: Arc<std::sync::atomic::AtomicI64>,
}

/// What the two stages share: the rules, the database, the WAL and where they live.
pub(super) struct Pipeline {
    pub applier: Applier,
    pub database: Arc<Slot>,
    pub wal: Wal,
    pub config: StoreConfig,
}

pub(super) fn spawn(
    pipeline: Pipeline,
    jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let (applied, to_sync) = std::sync::mpsc::sync_channel::<Applied>(SYNC_QUEUE);
    let committer_metrics = metrics.clone();
    let Pipeline {
        applier,
        database,
        wal,
        config,
    } = pipeline;
    let syncer = Syncer {
        applier: applier.clone(),
        generation: database.generation().unwrap_or(0),
        database: database.clone(),
        wal,
        config,
        metrics,
        last_checkpoint: Instant::now(),
        must_checkpoint: false,
        last_reopen: None,
        told_waiting: false,
        sync_failures: FailureRun::default(),
    };
    let syncer = std::thread::Builder::new()
        .name("store-syncer".into())
        .spawn(move || syncer.run(to_sync))?;
    std::thread::Builder::new()
        .name("store-committer".into())
        .spawn(move || {
            run_committer(&applier, &database, jobs, applied, &committer_metrics);
            // The syncer ends once the committer's sender is dropped and it has answered all.
            if syncer.join().is_err() {
                tracing::error!("store syncer panicked");
            }
        })
}

fn run_committer(
    applier: &Applier,
    slot: &Slot,
    mut jobs: mpsc::Receiver<Job>,
    syncer: std::sync::mpsc::SyncSender<Applied>,
    metrics: &Metrics,
) {
    let mut batch: Vec<(Vec<Event>, Reply)> = Vec::new();
    let mut barriers = Vec::new();
    let mut write_failures = FailureRun::default();
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
        // The database is let go of before waiting on the syncer, which may be reopening it.
        let applied = match slot.wait(REOPEN_PATIENCE) {
            Ok(database) => {
                let applied =
                    applier.apply_requests(&database, &mut batch, metrics, &mut write_failures);
                for barrier in barriers.drain(..) {
                    let _ = barrier.send(database.db.generate_id().ok());
                }
                applied
            }
            Err(e) => {
                metrics.store_write_failed();
                write_failures.failed("store write", batch.len(), &e);
                for barrier in barriers.drain(..) {
                    let _ = barrier.send(None);
                }
                Applied {
                    generation: None,
                    write_failed: true,
                    events: Vec::new(),
                    replies: batch
                        .drain(..)
                        .map(|(_, reply)| (reply, Err(StoreError::Unavailable(e.to_string()))))
                        .collect(),
                }
            }
        };
        if syncer.send(applied).is_err() {
            tracing::error!("store syncer is gone; stopping the committer");
            break;
        }
    }
}

impl Applier {
    fn apply_requests(
        &self,
        database: &Database,
        batch: &mut Vec<(Vec<Event>, Reply)>,
        metrics: &Metrics,
        failures: &mut FailureRun,
    ) -> Applied {
        let mut pending = Pending::default();
        let results: Vec<_> = batch
            .iter()
            .map(|(events, _)| self.plan(database, events, &mut pending))
            .collect();
        // Only a write that reached sled shows that writes work again: a batch of duplicates
        // or of watchdog barriers alone writes nothing.
        let writes_anything = !pending.writes.is_empty();
        let written = self.write(database, pending);
        match &written {
            Ok(()) if writes_anything => failures.ended("store writes"),
            Ok(()) => {}
            Err(e) => {
                metrics.store_write_failed();
                failures.failed("store write", batch.len(), e);
            }
        }
        let mut applied = Applied {
            generation: Some(database.generation),
            write_failed: written.is_err(),
            ..Applied::default()
        };
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
    pub fn replay(&self, database: &Database, events: &[Event]) -> Result<(), StoreError> {
        let mut pending = Pending::default();
        self.plan(database, events, &mut pending)?;
        Ok(self.write(database, pending)?)
    }

    /// Applies one batch's writes atomically.
    fn write(&self, database: &Database, pending: Pending) -> Result<(), sled::Error> {
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
        database.tree.apply_batch(batch)?;
        for (number, value) in phones {
            self.phones.update(number, &value);
        }
        self.suppressed_accounts
            .fetch_add(account_delta, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Computes one request's writes into `pending`; on error, `pending` is left as it was.
    fn plan(
        &self,
        database: &Database,
        events: &[Event],
        pending: &mut Pending,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut mine = Pending::default();
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            let subject = subject_key(&event.subject);
            let record_key = record_key(&subject);
            let stored_record = mine.get(&record_key, pending, &database.tree)?;
            if mine.has_seen(
                event,
                &subject,
                stored_record.as_deref(),
                pending,
                &database.tree,
            )? {
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            let mut record = match &stored_record {
                Some(bytes) => Record::decode(bytes)?,
                None => Record::default(),
            };
            let was_suppressed = record.suppressed();
            let applied = record.apply(event, &self.rules);
            let order = entry_order(event.event_time_ms, database.db.generate_id()?);
            let stored = StoredEvent {
                event: event.clone(),
                applied,
            };
            let stored = serde_json::to_vec(&stored).map_err(StoreError::CorruptHistory)?;
            // The event that creates a record travels in it: most subjects (every imported
            // number) never have another, and a key of their own would double the keys sled
            // keeps pages and memory for.
            let creates_record = applied && stored_record.is_none();
            let entry_key = if creates_record {
                record_key.clone()
            } else {
                history_key(&subject, &order)
            };
            mine.remember(event, subject, &entry_key);
            if applied {
                if matches!(event.subject, crate::event::Subject::Account { .. }) {
                    mine.suppressed_accounts +=
                        i64::from(record.suppressed()) - i64::from(was_suppressed);
                }
                let first_event = match &stored_record {
                    None => Some(inline_entry(&order, &stored)),
                    Some(bytes) => record::first_event(bytes)?.map(<[u8]>::to_vec),
                };
                mine.put(record_key, record.encode(first_event.as_deref()));
            }
            if !creates_record {
                mine.put(entry_key, stored);
            }
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
    applier: Applier,
    database: Arc<Slot>,
    /// The database generation this stage has recovered into; applies to older ones are void.
    generation: u64,
    wal: Wal,
    config: StoreConfig,
    metrics: Arc<Metrics>,
    last_checkpoint: Instant,
    /// Set after a failure: memory may hold unacknowledged writes that a "duplicate" answer
    /// would vouch for, so only a full checkpoint (or a reopen) may acknowledge again.
    must_checkpoint: bool,
    last_reopen: Option<Instant>,
    /// Whether "waiting for the data directory to take writes" was already logged.
    told_waiting: bool,
    sync_failures: FailureRun,
}

/// How the requests of a batch stand once the syncer is done with it.
enum Durability {
    /// Their writes are durable: answer as computed.
    Durable,
    /// The database was reopened: their writes went to the one that was closed.
    Reopened,
}

impl Syncer {
    fn run(mut self, applied: std::sync::mpsc::Receiver<Applied>) {
        while let Ok(first) = applied.recv() {
            let mut waiting = Applied::default();
            for batch in std::iter::once(first).chain(applied.try_iter()) {
                self.must_checkpoint |= batch.write_failed;
                if batch.generation.is_some_and(|g| g != self.generation) {
                    answer(batch.replies, Durability::Reopened);
                    continue;
                }
                waiting.events.extend(batch.events);
                waiting.replies.extend(batch.replies);
            }
            // When every request already failed to apply, a failed sync costs nobody anything
            // and was counted and logged as a write failure.
            let at_stake = waiting.replies.iter().any(|(_, result)| result.is_ok());
            let started = Instant::now();
            let durable = self.make_durable(&waiting.events);
            if at_stake || durable.is_ok() {
                self.metrics.store_flushed(
                    started.elapsed(),
                    waiting.replies.len(),
                    durable.is_ok(),
                );
            }
            match durable {
                Ok(durability) => {
                    self.sync_failures.ended("store syncs");
                    answer(waiting.replies, durability);
                }
                Err(e) => {
                    self.must_checkpoint = true;
                    if at_stake {
                        self.sync_failures
                            .failed("store sync", waiting.replies.len(), &e);
                    }
                    for (reply, _) in waiting.replies {
                        let error = std::io::Error::new(e.kind(), e.to_string());
                        let _ = reply.send(Err(StoreError::Sync(error)));
                    }
                }
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

    fn make_durable(&mut self, events: &[Event]) -> std::io::Result<Durability> {
        if self.must_checkpoint {
            let checkpointed = self.checkpoint();
            if checkpointed.is_ok() {
                self.must_checkpoint = false;
                return Ok(Durability::Durable);
            }
            let due = self
                .last_reopen
                .is_none_or(|last| last.elapsed() >= REOPEN_RETRY);
            if !due {
                return checkpointed.map(|()| Durability::Durable);
            }
            self.reopen().map_err(std::io::Error::other)?;
            self.must_checkpoint = false;
            return Ok(Durability::Reopened);
        }
        if events.is_empty() {
            return Ok(Durability::Durable);
        }
        let events: Vec<&Event> = events.iter().collect();
        self.wal.append(&events)?;
        Ok(Durability::Durable)
    }

    /// Makes sled's state durable on its own, then empties the WAL.
    fn checkpoint(&mut self) -> std::io::Result<()> {
        let started = Instant::now();
        let wal_bytes = self.wal.len();
        self.database
            .get()
            .map_err(std::io::Error::other)?
            .make_durable()?;
        self.wal.clear()?;
        self.last_checkpoint = Instant::now();
        tracing::debug!(
            wal_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "checkpoint"
        );
        Ok(())
    }

    /// Closes the failed database and opens it again, recovering it as a start would, once the
    /// data directory takes writes.
    fn reopen(&mut self) -> Result<(), StoreError> {
        self.last_reopen = Some(Instant::now());
        if let Err(e) = probe_writable(&self.config.dir) {
            if !self.told_waiting {
                tracing::warn!(
                    "the data directory does not take writes yet ({e}); the database is reopened once it does"
                );
                self.told_waiting = true;
            }
            return Err(StoreError::Sync(e));
        }
        self.told_waiting = false;
        tracing::warn!("reopening the database to recover from the storage failure");
        let started = Instant::now();
        drop(self.database.take(READERS_PATIENCE).inspect_err(|e| {
            tracing::warn!("reopening the database is put off: {e}");
        })?);
        let generation = self.generation + 1;
        let deadline = Instant::now() + LOCK_PATIENCE;
        let recovered = loop {
            match super::recover(&self.config, generation, &self.applier) {
                Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => break other,
            }
        };
        match recovered {
            Ok((database, wal)) => {
                self.wal = wal;
                self.generation = generation;
                self.last_checkpoint = Instant::now();
                self.database.install(database);
                self.metrics.store_reopened();
                tracing::warn!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "database reopened; writes are accepted again"
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!("reopening the database failed: {e}");
                self.database.fail(e.to_string());
                Err(e)
            }
        }
    }
}

/// A run of failed batches is logged when it starts and when it ends, not once per batch: a
/// full disk under a steady stream of retries would otherwise fill the journal too.
#[derive(Default)]
struct FailureRun {
    failures: u64,
}

impl FailureRun {
    fn failed(&mut self, what: &str, requests: usize, error: &dyn std::fmt::Display) {
        if self.failures == 0 {
            tracing::error!(
                requests,
                "{what} failed, nothing in this batch is acknowledged: {error}; until one succeeds, further failures are only counted (suppressd_store_write_failures_total)"
            );
        } else {
            tracing::debug!(requests, "{what} failed again: {error}");
        }
        self.failures += 1;
    }

    fn ended(&mut self, what: &str) {
        if self.failures > 0 {
            tracing::warn!(failed_batches = self.failures, "{what} succeed again");
            self.failures = 0;
        }
    }
}

/// Sends each request its answer; after a reopen, what would have succeeded is refused.
fn answer(replies: Vec<(Reply, Result<Vec<Outcome>, StoreError>)>, durability: Durability) {
    for (reply, result) in replies {
        let result = match durability {
            Durability::Durable => result,
            Durability::Reopened => result.and(Err(StoreError::Reopened)),
        };
        // The requester may have gone away (client disconnected); its events are durable all
        // the same.
        let _ = reply.send(result);
    }
}

/// Whether the data directory has room and takes a synced write again.
fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let free = fs2::available_space(dir)?;
    if free < REOPEN_MIN_FREE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!("{free} bytes free, {REOPEN_MIN_FREE} needed"),
        ));
    }
    let probe = dir.join(".write-probe");
    let written = std::fs::File::create(&probe).and_then(|mut file| {
        file.write_all(&[0; 4096])?;
        file.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    written
}

/// The one field of a stored history entry that deduplication reads.
#[derive(serde::Deserialize)]
struct KeyOfStoredEvent {
    idempotency_key: String,
}

/// Writes computed but not yet applied: later requests of a batch read through them.
#[derive(Default)]
struct Pending {
    writes: HashMap<Vec<u8>, Vec<u8>>,
    /// (subject key, idempotency key) of the events with minted keys among `writes`, whose
    /// history entries a scan of the tree would not find yet.
    minted: HashSet<(Vec<u8>, String)>,
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

    /// Whether `event`'s idempotency key was recorded before, by an earlier batch or earlier in
    /// this one. A key suppressd minted is looked for in the subject's history (see
    /// [`is_minted_idempotency_key`]); any other has a key of its own.
    fn has_seen(
        &self,
        event: &Event,
        subject: &[u8],
        record: Option<&[u8]>,
        batch: &Pending,
        tree: &sled::Tree,
    ) -> Result<bool, StoreError> {
        let key = &event.idempotency_key;
        if !is_minted_idempotency_key(key) {
            return Ok(self.get(&seen_key(key), batch, tree)?.is_some());
        }
        let planned = (subject.to_vec(), key.clone());
        if self.minted.contains(&planned) || batch.minted.contains(&planned) {
            return Ok(true);
        }
        for stored in history_entries::<KeyOfStoredEvent>(tree, subject, record)? {
            if stored?.1.idempotency_key == *key {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Plans what makes [`Pending::has_seen`] find `event` from now on; `entry_key` is where its
    /// history entry is stored.
    fn remember(&mut self, event: &Event, subject: Vec<u8>, entry_key: &[u8]) {
        let key = &event.idempotency_key;
        if is_minted_idempotency_key(key) {
            self.minted.insert((subject, key.clone()));
        } else {
            self.put(seen_key(key), entry_key.to_vec());
        }
    }

    fn absorb(&mut self, other: Pending) {
        self.writes.extend(other.writes);
        self.minted.extend(other.minted);
        self.suppressed_accounts += other.suppressed_accounts;
    }
}
