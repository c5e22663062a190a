//! When a snapshot is due, writing it in the background, and what its verification allows.
//!
//! A snapshot is due once enough events or log bytes have gone by since the last one
//! (`--snapshot-every-events`, `--snapshot-every-mb`) and the log since is at least as large as
//! the newest snapshot, or once `--snapshot-every-seconds` have passed, if anything is new. The
//! size rule keeps the cost of rewriting the whole list proportional to what arrived: a
//! 10,000,000-number list is not rewritten after every million events. It is written from a
//! scan of sled filtered to the events numbered below what sled held when it began (history
//! entries never change, so that is a consistent picture while writes go on), on a thread of
//! its own so that commits do not wait for it. Once it has been read back whole: sled is made
//! durable on its own (so that a start does not need the segments about to go), the log's
//! segments it covers are removed (but for those a cluster node has not published yet), and so
//! are older snapshots.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::database::Database;
use super::files::{io_error, sync_dir};
use super::history::Histories;
use super::log::Log;
use super::snapshot::{self, SnapshotFile, Summary};
use super::{StoreConfig, StoreError};
use crate::metrics::Metrics;

/// When snapshots are written.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotPolicy {
    pub every_bytes: u64,
    pub every_events: u64,
    pub every: Duration,
}

/// Writes the snapshot of every event numbered below `below` into `dir` and reads it back
/// whole; `keep_going` can end the write early (an error).
pub(super) fn write_verified(
    database: Arc<Database>,
    dir: &std::path::Path,
    below: u64,
    keep_going: impl Fn() -> bool,
) -> Result<(SnapshotFile, Summary), StoreError> {
    let histories = Histories::new(database, below).events_only();
    let (file, written) = snapshot::write::<StoreError>(dir, below, histories, keep_going)?;
    let read_back = snapshot::Reader::open(&file.path)?.verify()?;
    if read_back != written {
        return Err(StoreError::Unavailable(format!(
            "snapshot {} reads back as {read_back:?}, not as written ({written:?})",
            file.path.display()
        )));
    }
    Ok((file, written))
}

/// How often the log's and the snapshots' sizes are measured for the metrics.
const MEASURE_EVERY: Duration = Duration::from_secs(1);

/// After a failed snapshot, the next attempt waits this long.
const RETRY: Duration = Duration::from_secs(60);

struct Job {
    below: u64,
    abandoned: Arc<AtomicBool>,
    thread: JoinHandle<Result<(SnapshotFile, Summary), StoreError>>,
}

pub(super) struct Snapshotter {
    dir: PathBuf,
    policy: SnapshotPolicy,
    /// Events and log bytes since the newest snapshot, and when it was written.
    events_since: u64,
    bytes_at_last: u64,
    /// Log bytes from before this log was opened that the newest snapshot does not cover, as far
    /// as the segments' sizes tell.
    bytes_before_open: u64,
    newest_bytes: u64,
    last: Instant,
    /// When the log's and the snapshots' sizes were last measured for the metrics; `None`
    /// measures them at the next chance.
    measured: Option<Instant>,
    job: Option<Job>,
    not_before: Option<Instant>,
}

impl Snapshotter {
    pub fn new(config: &StoreConfig, snapshot_seq: u64, log: &Log) -> Snapshotter {
        let dir = config.snapshot_dir();
        let newest_bytes = snapshot::list(&dir)
            .ok()
            .and_then(|files| files.first().cloned())
            .and_then(|file| std::fs::metadata(file.path).ok())
            .map_or(0, |m| m.len());
        let events_since = log.next_seq().saturating_sub(snapshot_seq);
        Snapshotter {
            dir,
            policy: config.snapshots,
            events_since,
            bytes_at_last: 0,
            bytes_before_open: if events_since > 0 {
                log.size_on_disk()
            } else {
                0
            },
            newest_bytes,
            last: Instant::now(),
            measured: None,
            job: None,
            not_before: None,
        }
    }

    pub fn appended(&mut self, events: u64) {
        self.events_since += events;
    }

    /// Starts a snapshot when one is due, and finishes one that is done. `below` is the
    /// sequence sled holds everything below now.
    /// `keep_from` is the first sequence the log must keep whatever a snapshot covers (events a
    /// cluster has not been sent yet).
    pub fn tend(
        &mut self,
        database: &Arc<Database>,
        log: &mut Log,
        below: u64,
        keep_from: u64,
        metrics: &Metrics,
    ) {
        if self
            .job
            .as_ref()
            .is_some_and(|job| job.thread.is_finished())
        {
            if let Some(job) = self.job.take() {
                self.finish(job, database, log, keep_from, metrics);
            }
        }
        if self.job.is_none() && self.is_due(log) {
            self.start(database.clone(), below, log.appended_bytes());
        }
        // Sizes take a directory listing and a stat per file: not on every group commit, which
        // waits for this thread.
        if self
            .measured
            .is_none_or(|measured| measured.elapsed() >= MEASURE_EVERY)
        {
            metrics.log_and_snapshot_bytes(log.size_on_disk(), self.size_on_disk());
            self.measured = Some(Instant::now());
        }
    }

    fn is_due(&self, log: &Log) -> bool {
        if self.events_since == 0 || self.not_before.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        let bytes_since = self.bytes_before_open + log.appended_bytes() - self.bytes_at_last;
        let grown =
            self.events_since >= self.policy.every_events || bytes_since >= self.policy.every_bytes;
        (grown && bytes_since >= self.newest_bytes) || self.last.elapsed() >= self.policy.every
    }

    fn start(&mut self, database: Arc<Database>, below: u64, log_bytes: u64) {
        let abandoned = Arc::new(AtomicBool::new(false));
        let dir = self.dir.clone();
        let stop = abandoned.clone();
        let thread = std::thread::Builder::new()
            .name("store-snapshot".into())
            .spawn(move || {
                let started = Instant::now();
                let written =
                    write_verified(database, &dir, below, || !stop.load(Ordering::Relaxed))?;
                tracing::info!(
                    subjects = written.1.subjects,
                    events = written.1.entries,
                    bytes = written.1.bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "snapshot written and verified"
                );
                Ok(written)
            });
        match thread {
            Ok(thread) => {
                self.job = Some(Job {
                    below,
                    abandoned,
                    thread,
                });
                // Counted from the snapshot's start: what arrives meanwhile is not in it.
                self.events_since = 0;
                self.bytes_at_last = log_bytes;
                self.bytes_before_open = 0;
                self.last = Instant::now();
            }
            Err(e) => {
                tracing::error!("cannot start a snapshot: {e}");
                self.not_before = Some(Instant::now() + RETRY);
            }
        }
    }

    fn finish(
        &mut self,
        job: Job,
        database: &Database,
        log: &mut Log,
        keep_from: u64,
        metrics: &Metrics,
    ) {
        let result = match job.thread.join() {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(
                "the snapshot thread panicked".into(),
            )),
        };
        let done = result.and_then(|(file, summary)| {
            self.newest_bytes = summary.bytes;
            database.make_durable()?;
            let removed = log.remove_before(job.below.min(keep_from))?;
            self.remove_older_than(&file)?;
            Ok(removed)
        });
        match done {
            Ok(removed) => {
                metrics.snapshot_written();
                // What the snapshot changed on disk shows at once.
                self.measured = None;
                if removed > 0 {
                    tracing::info!(
                        segments = removed,
                        "log segments covered by the snapshot removed"
                    );
                }
            }
            Err(e) => {
                tracing::error!(
                    "snapshot failed; the log is kept whole and it is tried again later: {e}"
                );
                self.not_before = Some(Instant::now() + RETRY);
                self.events_since = self.events_since.max(1);
            }
        }
    }

    fn remove_older_than(&self, newest: &SnapshotFile) -> Result<(), StoreError> {
        let mut removed = false;
        for older in snapshot::list(&self.dir)? {
            if older.next_seq < newest.next_seq {
                std::fs::remove_file(&older.path).map_err(io_error(&older.path))?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.dir).map_err(io_error(&self.dir))?;
        }
        Ok(())
    }

    fn size_on_disk(&self) -> u64 {
        snapshot::list(&self.dir)
            .unwrap_or_default()
            .iter()
            .filter_map(|s| std::fs::metadata(&s.path).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Stops a snapshot under way (for a reopen or the shutdown) and waits for its thread.
    pub fn abandon(&mut self) {
        if let Some(job) = self.job.take() {
            job.abandoned.store(true, Ordering::Relaxed);
            let _ = job.thread.join();
        }
    }
}
