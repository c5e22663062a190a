//! Group commit: the single writer of the database.
//!
//! Requests queue on a channel. The committer takes every request that is waiting, applies each
//! as one sled transaction (so a request is all-or-nothing, and a redelivery is recognised even
//! when it arrives in the same batch), then makes the whole batch durable with one sled flush
//! followed by one `fdatasync` of the log file, and only then answers each waiting request. While
//! it flushes, new requests pile up and share the next flush, so throughput grows with
//! concurrency instead of being capped at one fsync per request.
//!
//! If the flush fails, every request of the batch is answered with the error: nothing in it is
//! acknowledged, and providers retry (idempotency keys make the retry harmless).

use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tokio::sync::{mpsc, oneshot};

use super::{history_key, subject_key, Outcome, Record, StoreError, StoredEvent, Trees};
use crate::event::Event;
use crate::metrics::Metrics;

/// The most requests applied before one flush; bounds the latency a batch adds.
const MAX_BATCH: usize = 1024;

pub(super) type Reply = oneshot::Sender<Result<Vec<Outcome>, StoreError>>;

pub(super) enum Job {
    Commit { events: Vec<Event>, reply: Reply },
    Stop,
}

pub(super) fn spawn(
    db: sled::Db,
    trees: Trees,
    log_file: File,
    jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("store-committer".into())
        .spawn(move || {
            Committer {
                db,
                trees,
                log_file,
                metrics,
            }
            .run(jobs)
        })
}

struct Committer {
    db: sled::Db,
    trees: Trees,
    log_file: File,
    metrics: Arc<Metrics>,
}

impl Committer {
    fn run(self, mut jobs: mpsc::Receiver<Job>) {
        let mut batch: Vec<(Vec<Event>, Reply)> = Vec::new();
        let mut stopping = false;
        while !stopping {
            let Some(mut job) = jobs.blocking_recv() else {
                break;
            };
            loop {
                match job {
                    Job::Commit { events, reply } => batch.push((events, reply)),
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
            self.commit_batch(&mut batch);
        }
        if let Err(e) = self.make_durable() {
            tracing::error!("flush at shutdown failed: {e}");
        }
    }

    fn commit_batch(&self, batch: &mut Vec<(Vec<Event>, Reply)>) {
        if batch.is_empty() {
            return;
        }
        let results: Vec<_> = batch.iter().map(|(events, _)| self.apply(events)).collect();
        let started = Instant::now();
        let durable = self.make_durable();
        self.metrics
            .store_flushed(started.elapsed(), batch.len(), durable.is_ok());
        if let Err(e) = &durable {
            tracing::error!(
                requests = batch.len(),
                "store flush failed, nothing in this batch is acknowledged: {e}"
            );
        }
        for ((_, reply), result) in batch.drain(..).zip(results) {
            let answer = match &durable {
                Ok(()) => result,
                Err(e) => Err(StoreError::Sync(std::io::Error::new(
                    e.kind(),
                    e.to_string(),
                ))),
            };
            // The requester may have gone away (client disconnected); its events are durable
            // all the same.
            let _ = reply.send(answer);
        }
    }

    fn make_durable(&self) -> std::io::Result<()> {
        self.db.flush().map_err(std::io::Error::other)?;
        self.log_file.sync_data()
    }

    /// Applies one request's events atomically.
    fn apply(&self, events: &[Event]) -> Result<Vec<Outcome>, StoreError> {
        let trees = &self.trees;
        // sled deadlocks if generate_id runs inside a transaction, so sequences are drawn first.
        let sequences = events
            .iter()
            .map(|_| self.db.generate_id())
            .collect::<Result<Vec<u64>, _>>()?;
        let result = (&trees.records, &trees.history, &trees.idempotency).transaction(
            |(records, history, idempotency)| {
                let mut outcomes = Vec::with_capacity(events.len());
                for (event, &sequence) in events.iter().zip(&sequences) {
                    if idempotency.get(event.idempotency_key.as_bytes())?.is_some() {
                        outcomes.push(Outcome::Duplicate);
                        continue;
                    }
                    let key = subject_key(&event.subject);
                    let mut record = match records.get(&key)? {
                        Some(bytes) => Record::decode(&bytes).map_err(|e| {
                            ConflictableTransactionError::Abort(StoreError::CorruptRecord(e))
                        })?,
                        None => Record::default(),
                    };
                    let applied = record.apply(event);
                    if applied {
                        records.insert(key.as_slice(), record.encode())?;
                    }
                    let history_key = history_key(&key, event.event_time_ms, sequence);
                    let stored = StoredEvent {
                        event: event.clone(),
                        applied,
                    };
                    let stored = serde_json::to_vec(&stored).map_err(|e| {
                        ConflictableTransactionError::Abort(StoreError::CorruptHistory(e))
                    })?;
                    history.insert(history_key.as_slice(), stored)?;
                    idempotency.insert(event.idempotency_key.as_bytes(), history_key)?;
                    outcomes.push(if applied {
                        Outcome::Applied
                    } else {
                        Outcome::Recorded
                    });
                }
                Ok(outcomes)
            },
        );
        result.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        })
    }
}
