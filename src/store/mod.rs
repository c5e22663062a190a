//! The store: the one module that owns the sled database, every tree in it, and every decision
//! about when data is durable.
//!
//! Everything lives in one sled tree, `suppressions`, split into key spaces by a one-byte tag,
//! because only writes to a single tree can be applied atomically without sled's (slow)
//! multi-tree transactions. Subject keys are prefix-free, so a subject's history is one range
//! scan:
//! - `R` ‖ subject → [`Record`] (fixed status header + JSON), and the subject's first history
//!   entry if it is the one that created the record. A lookup is one point read.
//! - `H` ‖ subject ‖ event time (ms, order-preserving) ‖ sequence → [`StoredEvent`], for every
//!   other history entry.
//! - `I` ‖ idempotency key → where the event's history entry is, for a provider's key. A key
//!   suppressd minted itself (imports, manual changes) can only come back with the same subject,
//!   so it is found in that subject's history instead of costing a key of its own.
//!
//! Most subjects (every imported number, most unsubscribes) never see a second event, so they
//! cost sled one key, not two: sled keeps memory per page of keys whatever the cache size, and
//! that is most of what a large list costs in RAM. Records written before the first entry moved
//! into them keep it under its `H` key; both are read.
//!
//! Reads go straight to sled from any thread. All writes go through the [`committer`], which
//! applies queued requests in batches and makes each batch durable with one append and one
//! `fdatasync` of the write-ahead log ([`wal`]) before answering any request in it (group
//! commit). That is what lets webhooks promise "no 2xx before durable".

mod apply;
mod codec;
mod committer;
mod database;
mod files;
mod history;
mod hot;
mod index;
mod keys;
mod legacy_wal;
mod log;
mod record;
mod recovery;
mod snapshot;
mod snapshotter;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::event::{Event, Subject};
use crate::metrics::Metrics;
pub use files::FileError;
pub use keys::{subject_from_key, subject_key};
pub use record::{Reason, Record, Refusal, Rules, Status};
pub use snapshotter::SnapshotPolicy;

/// Reads a snapshot file back whole (as `suppressd backup` does with what it received) and says
/// what it holds: (subjects, events), or what is wrong with it.
pub fn verify_snapshot(path: &std::path::Path) -> Result<(u64, u64), FileError> {
    let summary = snapshot::Reader::open(path)?.verify()?;
    Ok((summary.subjects, summary.entries))
}

/// Where a backup's snapshot goes in the data directory it restores: `snapshots/<sequence>.snap`.
pub fn snapshot_path(data_dir: &std::path::Path, next_seq: u64) -> PathBuf {
    snapshot::path_for(&data_dir.join("snapshots"), next_seq)
}

use apply::{Planner, Views};
use history::{history_entries, Histories};
use keys::{record_key, tagged, EntryOrder, RECORD};

/// What a committed event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// New, recorded in the history, and the record changed.
    Applied,
    /// New and recorded in the history, but the record was already in that state.
    Recorded,
    /// Seen before under the same idempotency key: nothing changed.
    Duplicate,
}

/// A history entry as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    #[serde(flatten)]
    pub event: Event,
    /// Whether the event changed the record when it arrived.
    pub applied: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database at {path} is locked by another process; stop the other suppressd using this --data-dir or choose another one")]
    Locked { path: PathBuf },
    #[error("{path} is corrupt ({detail}); restore the data directory from a backup")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot open database at {path}: {source}; check that the directory exists and is writable by this user")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("making writes durable failed: {0}")]
    Sync(#[from] std::io::Error),
    #[error(transparent)]
    CorruptRecord(#[from] record::CorruptRecord),
    #[error(transparent)]
    Refused(#[from] record::Refusal),
    #[error("history entry is unreadable: {0}")]
    CorruptHistory(serde_json::Error),
    #[error("the store is shutting down")]
    Closed,
    #[error("the database is being reopened after a storage failure; retry shortly")]
    Reopening,
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("the database was reopened after a storage failure before this request was durable")]
    Reopened,
}

impl From<FileError> for StoreError {
    fn from(error: FileError) -> StoreError {
        match error {
            FileError::Corrupt {
                file,
                offset,
                detail,
            } => StoreError::Corrupt {
                path: file,
                detail: format!("at byte {offset}: {detail}"),
            },
            FileError::Io { path, source } => StoreError::Open { path, source },
        }
    }
}

/// A stored record, read in place: its status and reasons come straight from sled's buffer,
/// so a lookup copies the stored reasons into its response without parsing them.
pub struct RecordRef {
    bytes: sled::IVec,
}

impl RecordRef {
    pub fn status(&self) -> Result<Status, StoreError> {
        Ok(record::decode_status(&self.bytes)?)
    }

    /// The reasons in force, as the JSON array the API shows.
    pub fn reasons_json(&self) -> Result<&serde_json::value::RawValue, StoreError> {
        Ok(record::reasons_json(&self.bytes)?)
    }
}

/// Every subject's history as it stood at one instant, subject by subject in key order, with
/// the record those events make.
pub struct Snapshot {
    histories: Histories,
    rules: Rules,
}

impl Iterator for Snapshot {
    type Item = Result<(Subject, Record, Vec<StoredEvent>), StoreError>;

    /// The record is replayed from the events rather than read: sled's copy may already hold
    /// events that arrived after the snapshot's instant.
    fn next(&mut self) -> Option<Self::Item> {
        let next = self.histories.next()?;
        Some(next.map(|(subject, events)| {
            let events: Vec<StoredEvent> = events.into_iter().map(|(_, event)| event).collect();
            let (record, events) = in_rule_order(events, &self.rules);
            (subject, record, events)
        }))
    }
}

/// A subject's events in the order the rules take them (see [`record::rule_order`]), each
/// marked with whether it changed the record at its place, and the record they make. This is
/// what the API and an export show, the same on every node that has the same events, however
/// they arrived.
fn in_rule_order(mut events: Vec<StoredEvent>, rules: &Rules) -> (Record, Vec<StoredEvent>) {
    events.sort_by(|a, b| record::rule_order(&a.event).cmp(&record::rule_order(&b.event)));
    let ordered: Vec<&Event> = events.iter().map(|stored| &stored.event).collect();
    let (record, applied) = Record::replay(&ordered, rules);
    for (stored, applied) in events.iter_mut().zip(applied) {
        stored.applied = applied;
    }
    (record, events)
}

/// Which kind of subject a listing covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectKind {
    Phone,
    Account,
}

impl SubjectKind {
    fn tag(self) -> u8 {
        match self {
            SubjectKind::Phone => b'p',
            SubjectKind::Account => b'a',
        }
    }
}

/// Which records `Store::list` returns.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ListFilter {
    pub kind: Option<SubjectKind>,
    pub suppressed: Option<bool>,
    /// Only records whose last change was received at or after this time.
    pub changed_since_ms: Option<i64>,
}

/// One page of a listing; `next_cursor` is the subject key the next page starts after.
pub struct Page {
    pub items: Vec<(Subject, Record)>,
    pub next_cursor: Option<Vec<u8>>,
}

/// Tunables that come from the command line.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The data directory: the log in `log/`, snapshots in `snapshots/`, sled in `db/`.
    pub dir: PathBuf,
    pub cache_bytes: u64,
    pub rules: Rules,
    /// The size of one log segment file.
    pub segment_bytes: u64,
    pub snapshots: SnapshotPolicy,
    /// Memory for the answers to phone lookups asked for lately (see [`hot`]).
    pub lookup_cache_bytes: u64,
}

impl StoreConfig {
    pub(crate) fn log_dir(&self) -> PathBuf {
        self.dir.join("log")
    }

    pub(crate) fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    pub(crate) fn sled_dir(&self) -> PathBuf {
        self.dir.join("db")
    }

    /// The defaults for everything but where the data lives.
    pub fn new(dir: PathBuf) -> StoreConfig {
        StoreConfig {
            dir,
            cache_bytes: 256 * 1024 * 1024,
            lookup_cache_bytes: 8 * 1024 * 1024,
            rules: Rules::default(),
            segment_bytes: 64 * 1024 * 1024,
            snapshots: SnapshotPolicy {
                every_bytes: 256 * 1024 * 1024,
                every_events: 1_000_000,
                every: Duration::from_secs(3600),
            },
        }
    }
}

/// The open database. Cheap to share behind an `Arc`.
pub struct Store {
    /// The data directory.
    dir: PathBuf,
    database: Arc<database::Slot>,
    views: Views,
    rules: Rules,
    committer: mpsc::Sender<committer::Job>,
    committer_thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    marks: Arc<committer::Watermarks>,
}

/// How many requests may wait for the committer before senders are slowed down.
const COMMIT_QUEUE: usize = 4096;

impl Store {
    /// Opens (or creates) the store under `config.dir` (see [`recovery`]: nothing is served
    /// before sled agrees with the log) and starts the committer.
    pub fn open(config: &StoreConfig, metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        let planner = Planner {
            rules: config.rules,
        };
        let views = Views::with_lookup_cache(config.lookup_cache_bytes);
        let opened = recovery::open(config, &planner, &views, &metrics)?;
        let database = Arc::new(database::Slot::empty());
        let (sender, receiver) = mpsc::channel(COMMIT_QUEUE);
        let (thread, marks) = committer::spawn(
            opened,
            planner,
            views.clone(),
            database.clone(),
            config.clone(),
            receiver,
            metrics,
        )
        .map_err(|source| StoreError::Open {
            path: config.dir.clone(),
            source,
        })?;
        Ok(Store {
            dir: config.dir.clone(),
            database,
            views,
            rules: config.rules,
            committer: sender,
            committer_thread: std::sync::Mutex::new(Some(thread)),
            marks,
        })
    }

    /// Applies `events` as one atomic unit and returns once they are durable.
    pub async fn commit(&self, events: Vec<Event>) -> Result<Vec<Outcome>, StoreError> {
        Ok(self.send_commit(events, false).await?.0)
    }

    /// Like [`Store::commit`], also returning the sequence number each new event got in the
    /// log (`None` for a duplicate).
    pub async fn commit_numbered(
        &self,
        events: Vec<Event>,
    ) -> Result<Vec<(Outcome, Option<u64>)>, StoreError> {
        let (outcomes, first_seq) = self.send_commit(events, false).await?;
        let mut next = first_seq;
        Ok(outcomes
            .into_iter()
            .map(|outcome| {
                if outcome == Outcome::Duplicate {
                    return (outcome, None);
                }
                next += 1;
                (outcome, Some(next - 1))
            })
            .collect())
    }

    /// Like [`Store::commit`], for events another node accepted: the intake rules (a lift needs
    /// a note) were that node's to apply.
    pub async fn commit_replicated(&self, events: Vec<Event>) -> Result<Vec<Outcome>, StoreError> {
        Ok(self.send_commit(events, true).await?.0)
    }

    async fn send_commit(
        &self,
        events: Vec<Event>,
        replicated: bool,
    ) -> Result<committer::Committed, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.committer
            .send(committer::Job::Commit {
                events,
                replicated,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// The sequence number of the last event written to the database: every event numbered up
    /// to it is durable.
    pub fn applied_through(&self) -> u64 {
        self.marks.applied.load(Ordering::Acquire)
    }

    /// Keeps every log segment holding events from `seq` on, whatever snapshots cover: a cluster
    /// node keeps the events it has not sent to the stream yet.
    pub fn keep_log_from(&self, seq: u64) {
        self.marks.keep_log_from.store(seq, Ordering::Release);
    }

    /// Every logged event from sequence `from` on, with its number, read from the log's files
    /// beside the writer (see [`log::read_from`]).
    pub async fn logged_since(&self, from: u64) -> Result<Vec<(u64, Event)>, StoreError> {
        let dir = self.dir.join("log");
        tokio::task::spawn_blocking(move || log::read_from(&dir, from))
            .await
            .map_err(|e| StoreError::Unavailable(format!("reading the log failed: {e}")))?
            .map_err(StoreError::from)
    }

    /// Resolves once the committer has worked through everything queued before it: proof that
    /// requests are still being answered, for the service manager's watchdog. A committer that
    /// answers "the database is down" counts as working: it keeps trying to reopen it, and a
    /// restart would not bring the disk back but would stop the lookups while it opens.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.committer
            .send(committer::Job::Barrier(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?;
        Ok(())
    }

    /// The database is being opened again after a storage failure, which takes as long as a
    /// start's open; the committer holds requests meanwhile.
    pub fn is_reopening(&self) -> bool {
        self.database.is_reopening()
    }

    /// Every subject's history as it stood at one instant, subject by subject in key order.
    /// Writes go on meanwhile: the committer names a sequence number below which everything is
    /// in sled, and events with later numbers are left out.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let below = self.barrier().await?;
        Ok(Snapshot {
            histories: Histories::new(self.database.get()?, below),
            rules: self.rules,
        })
    }

    /// A snapshot of every event acknowledged before this call, written and read back in a
    /// directory of its own under the data directory, for a backup: returns the sequence it
    /// holds everything below and the file, opened and already unlinked, so that nothing is
    /// left behind whatever happens to the transfer.
    pub async fn backup(&self) -> Result<(u64, std::fs::File), StoreError> {
        let below = self.barrier().await?;
        let database = self.database.get()?;
        let dir = self
            .dir
            .join(format!("backup-{}.tmp", uuid::Uuid::new_v4().simple()));
        tokio::task::spawn_blocking(move || {
            let written = snapshotter::write_verified(database, &dir, below, || true)
                .and_then(|(file, _)| Ok(std::fs::File::open(&file.path)?));
            let _ = std::fs::remove_dir_all(&dir);
            written.map(|file| (below, file))
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("the backup failed: {e}")))?
    }

    /// The sequence number below which every event is in sled, once it is.
    async fn barrier(&self) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.committer
            .send(committer::Job::Barrier(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer
            .await
            .map_err(|_| StoreError::Closed)?
            .ok_or_else(|| {
                StoreError::Unavailable("the store is down after a storage failure".into())
            })
    }

    /// What `render` makes of a subject's stored record (`None` if never seen, or for a phone
    /// the index knows is not suppressed: such a record has no reasons to show). A phone's
    /// rendering is kept in the lookup cache until its record is written again, so that a number
    /// looked up again costs neither an index or sled read nor a rendering: `render` must
    /// depend on nothing but the subject and its record, and there is one (the API's lookup
    /// answer).
    pub fn rendered_record(
        &self,
        subject: &Subject,
        render: impl FnOnce(Option<&RecordRef>) -> Result<Bytes, StoreError>,
    ) -> Result<Bytes, StoreError> {
        let number = match subject {
            Subject::Phone { phone } => crate::phone::e164_digits(phone),
            Subject::Account { .. } => None,
        };
        let Some(number) = number else {
            return render(self.record(subject)?.as_ref());
        };
        if let Some(answer) = self.views.hot.get(number) {
            return Ok(answer);
        }
        // Taken before the index is read: a write in between makes the answer not kept.
        let generation = self.views.hot.generation(number);
        let answer = if self.views.phones.status(number).suppressed {
            render(self.record(subject)?.as_ref())?
        } else {
            render(None)?
        };
        self.views.hot.insert(number, generation, answer.clone());
        Ok(answer)
    }

    fn record(&self, subject: &Subject) -> Result<Option<RecordRef>, StoreError> {
        let bytes = self
            .database
            .get()?
            .tree
            .get(record_key(&subject_key(subject)))?;
        Ok(bytes.map(|bytes| RecordRef { bytes }))
    }

    /// Whether a subject is suppressed, reading only the record's fixed header.
    pub fn status(&self, subject: &Subject) -> Result<Status, StoreError> {
        match self
            .database
            .get()?
            .tree
            .get(record_key(&subject_key(subject)))?
        {
            Some(bytes) => Ok(record::decode_status(&bytes)?),
            None => Ok(Status::default()),
        }
    }

    /// Whether a phone (already E.164) is suppressed; the bulk-check hot path, answered from
    /// the in-memory index.
    pub fn phone_status(&self, phone: &str) -> Result<Status, StoreError> {
        match crate::phone::e164_digits(phone) {
            Some(number) => Ok(self.views.phones.status(number)),
            None => self.status(&Subject::Phone {
                phone: phone.to_owned(),
            }),
        }
    }

    /// Every event received for a subject, oldest event time first.
    pub fn history(&self, subject: &Subject) -> Result<Vec<StoredEvent>, StoreError> {
        let tree = &self.database.get()?.tree;
        let subject = subject_key(subject);
        let record = tree.get(record_key(&subject))?;
        let entries = history_entries(tree, &subject, record.as_deref())?
            .collect::<Result<Vec<(EntryOrder, StoredEvent)>, _>>()?;
        let events = entries.into_iter().map(|(_, event)| event).collect();
        Ok(in_rule_order(events, &self.rules).1)
    }

    /// Records in key order after `cursor` that pass `filter`, at most `limit`, and the cursor
    /// of the next page if there is one. Keys are stable, so pages are too.
    pub fn list(
        &self,
        filter: &ListFilter,
        cursor: Option<&[u8]>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let prefix: Vec<u8> = match filter.kind {
            Some(kind) => vec![RECORD, kind.tag()],
            None => vec![RECORD],
        };
        let start = match cursor {
            Some(after) => std::ops::Bound::Excluded(tagged(RECORD, after, 0)),
            None => std::ops::Bound::Included(prefix.clone()),
        };
        let mut items = Vec::new();
        let database = self.database.get()?;
        for entry in database.tree.range((start, std::ops::Bound::Unbounded)) {
            let (key, value) = entry?;
            if !key.starts_with(&prefix) {
                break;
            }
            let record = Record::decode(&value)?;
            let wanted = filter.suppressed.is_none_or(|s| s == record.suppressed())
                && filter
                    .changed_since_ms
                    .is_none_or(|t| record.changed_at_ms >= t);
            if !wanted {
                continue;
            }
            if items.len() == limit {
                let next = items
                    .last()
                    .map(|(key, _, _): &(Vec<u8>, Subject, Record)| key.clone());
                return Ok(Page {
                    items: items
                        .into_iter()
                        .map(|(_, subject, record)| (subject, record))
                        .collect(),
                    next_cursor: next,
                });
            }
            let Some(subject) = subject_from_key(&key[1..]) else {
                return Err(StoreError::CorruptRecord(record::CorruptRecord::key(&key)));
            };
            items.push((key[1..].to_vec(), subject, record));
        }
        Ok(Page {
            items: items
                .into_iter()
                .map(|(_, subject, record)| (subject, record))
                .collect(),
            next_cursor: None,
        })
    }

    /// How many phones and accounts are suppressed now.
    pub fn suppressed_counts(&self) -> (u64, u64) {
        let accounts = self
            .views
            .suppressed_accounts
            .load(Ordering::Relaxed)
            .max(0);
        (self.views.phones.len() as u64, accounts.unsigned_abs())
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.database.get()?.db.size_on_disk()?)
    }

    /// Whether the database is open (not being reopened after a storage failure).
    pub fn is_open(&self) -> bool {
        self.database.is_open()
    }

    /// Stops the committer once it has answered every request queued before this call; it
    /// flushes on the way out.
    pub async fn close(&self, timeout: Duration) {
        let thread = match self.committer_thread.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(thread) = thread else { return };
        // Other holders of the sender would keep the channel open, so stopping is explicit.
        if self.committer.send(committer::Job::Stop).await.is_err() {
            tracing::error!("store committer had already stopped");
        }
        let joined = tokio::task::spawn_blocking(move || thread.join());
        match tokio::time::timeout(timeout, joined).await {
            Ok(Ok(Ok(()))) => {}
            Ok(_) => tracing::error!("store committer panicked"),
            Err(_) => tracing::error!("store committer did not stop within {timeout:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::keys::{entry_order, history_key, HISTORY, SEEN};
    use super::*;

    fn small_config(dir: &std::path::Path) -> StoreConfig {
        StoreConfig {
            cache_bytes: 1 << 20,
            segment_bytes: 1 << 20,
            ..StoreConfig::new(dir.to_path_buf())
        }
    }

    fn unsubscribe(
        subject: &Subject,
        source: crate::event::Source,
        idempotency_key: &str,
        time_ms: i64,
    ) -> Event {
        Event {
            subject: subject.clone(),
            source,
            kind: crate::event::Kind::Unsubscribe,
            idempotency_key: idempotency_key.into(),
            event_id: None,
            event_time_ms: time_ms,
            receive_time_ms: time_ms,
            details: Default::default(),
        }
    }

    #[tokio::test]
    async fn minted_keys_are_found_in_the_history_and_get_no_key_of_their_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_config(dir.path());
        let subject = Subject::Phone {
            phone: "+4930123456".into(),
        };
        let event = |idempotency_key: &str, time_ms: i64| {
            unsubscribe(
                &subject,
                crate::event::Source::Import,
                idempotency_key,
                time_ms,
            )
        };
        let (_, minted) = crate::event::mint_idempotency_key(crate::event::Source::Import);
        let open = || Store::open(&config, Arc::new(Metrics::default())).expect("open");

        let store = open();
        let outcomes = store
            .commit(vec![event(&minted, 1_000), event(&minted, 1_000)])
            .await
            .expect("commit");
        assert_eq!(outcomes, [Outcome::Applied, Outcome::Duplicate]);
        let again = store.commit(vec![event(&minted, 1_000)]).await;
        assert_eq!(again.expect("commit"), [Outcome::Duplicate]);
        // A provider's key can come back with another event time (the receive time stands in
        // for a missing one), so it keeps a key of its own.
        let first = store.commit(vec![event("lox24:1", 2_000)]).await;
        assert_ne!(first.expect("commit"), [Outcome::Duplicate]);
        let retry = store.commit(vec![event("lox24:1", 3_000)]).await;
        assert_eq!(retry.expect("commit"), [Outcome::Duplicate]);
        let database = store.database.get().expect("open");
        let own_keys: Vec<_> = database.tree.scan_prefix([SEEN]).collect();
        assert_eq!(own_keys.len(), 1, "only the provider's key is stored");
        drop(database);
        store.close(Duration::from_secs(10)).await;
        drop(store);

        let store = open();
        let after_reopen = store.commit(vec![event(&minted, 1_000)]).await;
        assert_eq!(after_reopen.expect("commit"), [Outcome::Duplicate]);
        assert_eq!(store.history(&subject).expect("history").len(), 2);
        store.close(Duration::from_secs(10)).await;
    }

    #[tokio::test]
    async fn a_record_carries_its_first_event_and_records_without_one_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_config(dir.path());
        let phone = |phone: &str| Subject::Phone {
            phone: phone.into(),
        };
        let event = |subject: &Subject, idempotency_key: &str, time_ms: i64| {
            unsubscribe(
                subject,
                crate::event::Source::Lox24,
                idempotency_key,
                time_ms,
            )
        };
        let keys = |store: &Store, subject: &Subject, tag: u8| {
            let database = store.database.get().expect("open");
            database
                .tree
                .scan_prefix(tagged(tag, &subject_key(subject), 0))
                .count()
        };
        let times = |store: &Store, subject: &Subject| -> Vec<i64> {
            let history = store.history(subject).expect("history");
            history.iter().map(|e| e.event.event_time_ms).collect()
        };
        let store = Store::open(&config, Arc::new(Metrics::default())).expect("open");

        let new = phone("+4930100001");
        let outcomes = store.commit(vec![event(&new, "lox24:a", 5_000)]).await;
        assert_eq!(outcomes.expect("commit"), [Outcome::Applied]);
        assert_eq!(keys(&store, &new, HISTORY), 0, "the record carries it");
        let later_but_older = store.commit(vec![event(&new, "lox24:b", 1_000)]).await;
        assert_eq!(later_but_older.expect("commit"), [Outcome::Applied]);
        assert_eq!(keys(&store, &new, HISTORY), 1);
        assert_eq!(times(&store, &new), [1_000, 5_000], "event time orders");
        let retry = store.commit(vec![event(&new, "lox24:a", 5_000)]).await;
        assert_eq!(retry.expect("commit"), [Outcome::Duplicate]);

        // A record written before records carried an entry: its history is all under keys.
        let old = phone("+4930100002");
        let mut record = Record::default();
        let first = event(&old, "import:00000000-0000-0000-0000-000000000001", 2_000);
        record.apply(&first, &Rules::default());
        let stored = StoredEvent {
            event: first.clone(),
            applied: true,
        };
        let order = entry_order(2_000, 1);
        {
            let database = store.database.get().expect("open");
            let tree = &database.tree;
            tree.insert(record_key(&subject_key(&old)), record.encode(None))
                .expect("insert");
            let stored = serde_json::to_vec(&stored).expect("json");
            tree.insert(history_key(&subject_key(&old), &order), stored)
                .expect("insert");
        }
        let again = store.commit(vec![first.clone()]).await;
        assert_eq!(again.expect("commit"), [Outcome::Duplicate]);
        let next = store.commit(vec![event(&old, "lox24:c", 3_000)]).await;
        assert_eq!(next.expect("commit"), [Outcome::Applied]);
        assert_eq!(times(&store, &old), [2_000, 3_000]);
        assert_eq!(store.status(&old).expect("status").since_ms, Some(2_000));

        let exported: Vec<(Subject, Vec<i64>)> = store
            .snapshot()
            .await
            .expect("snapshot")
            .map(|entry| {
                let (subject, _, events) = entry.expect("entry");
                let times = events.iter().map(|e| e.event.event_time_ms).collect();
                (subject, times)
            })
            .collect();
        assert_eq!(
            exported,
            [(new.clone(), vec![1_000, 5_000]), (old, vec![2_000, 3_000])],
            "the rules' order, from the record and from keys alike"
        );
        store.close(Duration::from_secs(10)).await;
    }
}
