//! Group commit: the single writer of the store, in two pipelined threads.
//!
//! The committer thread takes every request that is waiting and plans it (see [`super::apply`])
//! against the tree and every batch still on its way, numbering each new event with the next
//! sequence number. A request whose plan fails (an unreadable record) is answered with its error
//! and contributes nothing. The batch then moves to the syncer.
//!
//! The syncer thread takes every planned batch that is waiting, appends their events to the log
//! as one record with one `fdatasync` — from then on they are the truth — then writes their plans
//! to sled as one atomic batch carrying the stamp, and only then answers the requests. While one
//! batch syncs the next is being planned, and requests that arrive meanwhile share the next sync:
//! throughput grows with concurrency instead of being capped at one fsync per request. sled never
//! holds an event the log does not.
//!
//! When the log or sled fails, nothing of the batch is acknowledged and the syncer bumps the
//! epoch: every batch planned before (against writes that may now never happen) is refused, and
//! the committer starts again from what the log durably holds. The syncer then reopens the store
//! as a start does (see [`super::recovery`]) as soon as the data directory takes writes again,
//! tried at most every [`REOPEN_RETRY`] while requests keep coming. Providers retry refused
//! requests; idempotency keys make the retry harmless.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::apply::{self, Plan, Planner, View, Views};
use super::database::Slot;
use super::keys::Stamp;
use super::log::Log;
use super::recovery::{self, Opened};
use super::snapshotter::Snapshotter;
use super::{Outcome, StoreConfig, StoreError};
use crate::event::Event;
use crate::metrics::Metrics;

/// The most requests planned into one batch; bounds the latency a batch adds.
const MAX_BATCH: usize = 1024;
/// Planned batches waiting for the syncer; when it falls behind, the committer waits.
const SYNC_QUEUE: usize = 4;
/// How often the syncer looks at its housekeeping (snapshots, metrics) when idle.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// After a storage failure, how often requests may trigger an attempt to reopen the store.
const REOPEN_RETRY: Duration = Duration::from_secs(2);
/// Free space the data directory needs before a reopen is tried: sled writes as it recovers.
const REOPEN_MIN_FREE: u64 = 8 * 1024 * 1024;
/// How long a reopen waits for readers (an export) to let go of the old database.
const READERS_PATIENCE: Duration = Duration::from_secs(10);
/// How long the committer holds requests while the store is being reopened.
const REOPEN_PATIENCE: Duration = Duration::from_secs(30);

/// A request's outcomes, and the sequence number its first new event got (the others follow
/// in order).
pub(super) type Committed = (Vec<Outcome>, u64);
pub(super) type Reply = oneshot::Sender<Result<Committed, StoreError>>;

pub(super) enum Job {
    Commit {
        events: Vec<Event>,
        /// Events another node accepted (through the cluster's stream): they are not refused by
        /// the intake rules again.
        replicated: bool,
        reply: Reply,
    },
    /// Answered with a sequence number once every event numbered below it is in sled, or with
    /// `None` when the store is down.
    Barrier(oneshot::Sender<Option<u64>>),
    Stop,
}

/// How far the store is, for readers outside it (the cluster's publisher).
pub(super) struct Watermarks {
    /// The last sequence written to sled.
    pub applied: AtomicU64,
    /// The first sequence the log keeps whatever a snapshot covers; `u64::MAX` holds nothing.
    pub keep_log_from: AtomicU64,
}

/// What the two threads share.
pub(super) struct Shared {
    /// Bumped by the syncer when planned batches can no longer be written (a failure) and again
    /// once the store is reopened; a batch planned in another epoch is refused.
    epoch: AtomicU64,
    /// The sequence number the log gives its next event, as of the last reopen.
    durable_next: AtomicU64,
    /// The id of the last batch the syncer is done with (written or refused).
    done: AtomicU64,
}

/// One planned batch on its way to the syncer.
struct Batch {
    id: u64,
    epoch: u64,
    plan: Arc<Plan>,
    /// `false` when there was no database to plan against: every reply is an error already.
    planned: bool,
    replies: Vec<(Reply, Result<Committed, StoreError>)>,
    barriers: Vec<oneshot::Sender<Option<u64>>>,
}

pub(super) fn spawn(
    opened: Opened,
    planner: Planner,
    views: Views,
    slot: Arc<Slot>,
    config: StoreConfig,
    jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
) -> std::io::Result<(std::thread::JoinHandle<()>, Arc<Watermarks>)> {
    let marks = Arc::new(Watermarks {
        applied: AtomicU64::new(0),
        keep_log_from: AtomicU64::new(u64::MAX),
    });
    let (to_syncer, batches) = std::sync::mpsc::sync_channel::<Batch>(SYNC_QUEUE);
    let shared = Arc::new(Shared {
        epoch: AtomicU64::new(0),
        durable_next: AtomicU64::new(opened.log.next_seq()),
        done: AtomicU64::new(0),
    });
    let Opened {
        log,
        database,
        stamp,
        snapshot_seq,
    } = opened;
    slot.install(database);
    marks.applied.store(stamp.applied, Ordering::Release);
    let syncer = Syncer {
        marks: marks.clone(),
        snapshots: Snapshotter::new(&config, snapshot_seq, &log),
        planner: Planner {
            rules: planner.rules,
        },
        views,
        slot: slot.clone(),
        log: Some(log),
        stamp,
        config,
        metrics,
        shared: shared.clone(),
        healthy: true,
        last_reopen: None,
        told_waiting: false,
        failures: FailureRun::default(),
    };
    let syncer = std::thread::Builder::new()
        .name("store-syncer".into())
        .spawn(move || syncer.run(batches))?;
    let committer = std::thread::Builder::new()
        .name("store-committer".into())
        .spawn(move || {
            run_committer(&planner, &slot, &shared, jobs, to_syncer);
            // The syncer ends once the committer's sender is dropped and it has answered all.
            if syncer.join().is_err() {
                tracing::error!("store syncer panicked");
            }
        })?;
    Ok((committer, marks))
}

fn run_committer(
    planner: &Planner,
    slot: &Slot,
    shared: &Shared,
    mut jobs: mpsc::Receiver<Job>,
    syncer: std::sync::mpsc::SyncSender<Batch>,
) {
    let mut epoch = shared.epoch.load(Ordering::Acquire);
    let mut next_seq = shared.durable_next.load(Ordering::Acquire);
    // Batches sent but not yet written to sled, oldest first, with their ids.
    let mut in_flight: Vec<Arc<Plan>> = Vec::new();
    let mut in_flight_ids: Vec<u64> = Vec::new();
    let mut next_id = 1;
    let mut stopping = false;
    while !stopping {
        let Some(mut job) = jobs.blocking_recv() else {
            break;
        };
        let mut requests: Vec<(Vec<Event>, bool, Reply)> = Vec::new();
        let mut barriers = Vec::new();
        loop {
            match job {
                Job::Commit {
                    events,
                    replicated,
                    reply,
                } => requests.push((events, replicated, reply)),
                Job::Barrier(reply) => barriers.push(reply),
                Job::Stop => stopping = true,
            }
            if stopping || requests.len() >= MAX_BATCH {
                break;
            }
            match jobs.try_recv() {
                Ok(next) => job = next,
                Err(_) => break,
            }
        }
        let id = next_id;
        next_id += 1;
        let database = slot.wait(REOPEN_PATIENCE);
        // Read after waiting: a reopen publishes the log's end and the new epoch before it
        // installs the database.
        let now = shared.epoch.load(Ordering::Acquire);
        if now != epoch {
            epoch = now;
            next_seq = shared.durable_next.load(Ordering::Acquire);
            in_flight.clear();
            in_flight_ids.clear();
        }
        let done = shared.done.load(Ordering::Acquire);
        let written = in_flight_ids.iter().take_while(|&&i| i <= done).count();
        in_flight.drain(..written);
        in_flight_ids.drain(..written);
        let batch = match database {
            Ok(database) => {
                let view = View {
                    tree: Some(&database.tree),
                    in_flight: &in_flight,
                };
                let mut plan = Plan::starting_at(next_seq);
                let replies = requests
                    .into_iter()
                    .map(|(events, replicated, reply)| {
                        let first_seq = plan.next_seq();
                        let planned = if replicated {
                            planner.plan_replicated(&view, &mut plan, &events)
                        } else {
                            planner.plan(&view, &mut plan, &events)
                        };
                        (reply, planned.map(|outcomes| (outcomes, first_seq)))
                    })
                    .collect();
                next_seq = plan.next_seq();
                let plan = Arc::new(plan);
                if !plan.is_empty() {
                    in_flight.push(plan.clone());
                    in_flight_ids.push(id);
                }
                Batch {
                    id,
                    epoch,
                    plan,
                    planned: true,
                    replies,
                    barriers,
                }
            }
            Err(e) => Batch {
                id,
                epoch,
                plan: Arc::new(Plan::starting_at(next_seq)),
                planned: false,
                replies: requests
                    .into_iter()
                    .map(|(_, _, reply)| (reply, Err(StoreError::Unavailable(e.to_string()))))
                    .collect(),
                barriers,
            },
        };
        if syncer.send(batch).is_err() {
            tracing::error!("store syncer is gone; stopping the committer");
            break;
        }
    }
}

struct Syncer {
    marks: Arc<Watermarks>,
    planner: Planner,
    views: Views,
    slot: Arc<Slot>,
    /// `None` while being reopened.
    log: Option<Log>,
    /// How far sled is, as last written.
    stamp: Stamp,
    config: StoreConfig,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    /// `false` after a failure, until the store is reopened.
    healthy: bool,
    last_reopen: Option<Instant>,
    /// Whether "waiting for the data directory to take writes" was already logged.
    told_waiting: bool,
    failures: FailureRun,
    snapshots: Snapshotter,
}

impl Syncer {
    fn run(mut self, batches: std::sync::mpsc::Receiver<Batch>) {
        loop {
            let first = match batches.recv_timeout(HOUSEKEEPING) {
                Ok(first) => first,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    self.housekeeping();
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let waiting: Vec<Batch> = std::iter::once(first).chain(batches.try_iter()).collect();
            self.handle(waiting);
            self.housekeeping();
        }
        self.shut_down();
    }

    fn handle(&mut self, batches: Vec<Batch>) {
        let last_id = batches.last().map_or(0, |b| b.id);
        if !self.healthy {
            self.reopen_if_due();
        }
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let mut good = Vec::new();
        for batch in batches {
            if !batch.planned {
                answer(batch, None);
            } else if !self.healthy || batch.epoch != epoch {
                refuse(batch, || StoreError::Reopened);
            } else {
                good.push(batch);
            }
        }
        if !good.is_empty() {
            self.write(good);
        }
        self.shared.done.store(last_id, Ordering::Release);
    }

    /// Appends the batches' events to the log, writes their plans to sled, and answers them.
    fn write(&mut self, batches: Vec<Batch>) {
        let started = Instant::now();
        let plans: Vec<&Plan> = batches.iter().map(|b| &*b.plan).collect();
        let events: Vec<&Event> = plans.iter().flat_map(|p| p.events.iter()).collect();
        let requests: usize = batches.iter().map(|b| b.replies.len()).sum();
        let at_stake = batches
            .iter()
            .any(|b| b.replies.iter().any(|(_, r)| r.is_ok()));
        let (first_seq, next_seq) = match (plans.first(), plans.last()) {
            (Some(first), Some(last)) => (first.first_seq, last.next_seq()),
            _ => return,
        };
        let appended = match self.log.as_mut() {
            Some(log) if log.next_seq() != first_seq => Err(std::io::Error::other(format!(
                "planned events start at {first_seq} but the log is at {}",
                log.next_seq()
            ))),
            Some(log) => log.append(&events),
            None => Err(std::io::Error::other("the log is being reopened")),
        };
        if let Err(e) = appended {
            self.failed("log append", requests, at_stake, &e);
            for batch in batches {
                let error = std::io::Error::new(e.kind(), e.to_string());
                refuse(batch, || {
                    StoreError::Sync(std::io::Error::new(error.kind(), error.to_string()))
                });
            }
            return;
        }
        let written = self.slot.get().and_then(|database| {
            if plans.iter().all(|p| p.is_empty()) {
                return Ok(());
            }
            apply::write(
                &database.tree,
                &self.views,
                &plans,
                &mut self.stamp,
                next_seq - 1,
            )
            .map_err(StoreError::from)
        });
        if let Err(e) = written {
            // The events are in the log, so a retry finds them once the reopen replays it.
            self.failed("database write", requests, at_stake, &e);
            for batch in batches {
                refuse(batch, || StoreError::Unavailable(e.to_string()));
            }
            return;
        }
        self.marks
            .applied
            .store(self.stamp.applied, Ordering::Release);
        self.failures.ended("store writes");
        self.metrics
            .store_flushed(started.elapsed(), requests, true);
        self.snapshots.appended(events.len() as u64);
        for batch in batches {
            answer(batch, Some(next_seq));
        }
    }

    fn failed(
        &mut self,
        what: &str,
        requests: usize,
        at_stake: bool,
        error: &dyn std::fmt::Display,
    ) {
        self.healthy = false;
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        self.metrics.store_write_failed();
        if at_stake {
            self.failures.failed(what, requests, error);
        }
    }

    fn housekeeping(&mut self) {
        if !self.healthy {
            return;
        }
        let (Some(log), Ok(database)) = (self.log.as_mut(), self.slot.get()) else {
            return;
        };
        let keep_from = self.marks.keep_log_from.load(Ordering::Acquire);
        self.snapshots.tend(
            &database,
            log,
            self.stamp.applied + 1,
            keep_from,
            &self.metrics,
        );
    }

    /// Closes the store and opens it again as a start would, once the data directory takes
    /// writes.
    fn reopen_if_due(&mut self) {
        if self
            .last_reopen
            .is_some_and(|last| last.elapsed() < REOPEN_RETRY)
        {
            return;
        }
        self.last_reopen = Some(Instant::now());
        if let Err(e) = probe_writable(&self.config.dir) {
            if !self.told_waiting {
                tracing::warn!(
                    "the data directory does not take writes yet ({e}); the store is reopened once it does"
                );
                self.told_waiting = true;
            }
            return;
        }
        self.told_waiting = false;
        tracing::warn!("reopening the database to recover from the storage failure");
        let started = Instant::now();
        self.snapshots.abandon();
        match self.slot.take(READERS_PATIENCE) {
            Ok(database) => drop(database),
            Err(e) => {
                tracing::warn!("reopening the store is put off: {e}");
                return;
            }
        }
        self.log = None;
        match recovery::open(&self.config, &self.planner, &self.views, &self.metrics) {
            Ok(opened) => {
                let next_seq = opened.log.next_seq();
                self.snapshots = Snapshotter::new(&self.config, opened.snapshot_seq, &opened.log);
                self.log = Some(opened.log);
                self.stamp = opened.stamp;
                self.marks
                    .applied
                    .store(self.stamp.applied, Ordering::Release);
                // Published before the database is back, so that the committer, which waits
                // for the database, plans from the log's real end.
                self.shared.durable_next.store(next_seq, Ordering::Release);
                self.shared.epoch.fetch_add(1, Ordering::AcqRel);
                self.slot.install(opened.database);
                self.healthy = true;
                self.metrics.store_reopened();
                tracing::warn!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "database reopened; writes are accepted again"
                );
            }
            Err(e) => {
                tracing::error!("reopening the database failed: {e}");
                self.slot.fail(e.to_string());
            }
        }
    }

    /// Makes sled durable on its own so that the next start replays nothing.
    fn shut_down(&mut self) {
        self.snapshots.abandon();
        if !self.healthy {
            return;
        }
        if let Ok(database) = self.slot.get() {
            if let Err(e) = database.make_durable() {
                tracing::error!(
                    "flushing the database at shutdown failed; the next start replays the log: {e}"
                );
            }
        }
    }
}

/// Sends each request of a written (or unplanned) batch its answer, and each barrier the
/// sequence below which everything is in sled.
fn answer(batch: Batch, applied_below: Option<u64>) {
    for (reply, result) in batch.replies {
        // The requester may have gone away (client disconnected); its events are durable all
        // the same.
        let _ = reply.send(result);
    }
    for barrier in batch.barriers {
        let _ = barrier.send(applied_below);
    }
}

/// Answers every request of a batch that was not written with `error` (errors of its own stay).
fn refuse(batch: Batch, error: impl Fn() -> StoreError) {
    for (reply, result) in batch.replies {
        let _ = reply.send(result.and_then(|_| Err(error())));
    }
    for barrier in batch.barriers {
        let _ = barrier.send(None);
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
