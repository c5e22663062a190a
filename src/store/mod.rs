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

mod committer;
mod database;
mod index;
pub mod record;
mod wal;

use std::iter::Peekable;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::event::{Event, Subject};
use crate::metrics::Metrics;
pub use record::{Reason, Record, Rules, Status};

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
    #[error("database at {path} is corrupt ({detail}); restore the data directory from a backup, or move it aside to start empty")]
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

impl StoreError {
    /// Damage that sled's own open let through and the replay or the index rebuild then read is
    /// the database's corruption, and the operator is told so, with what to do.
    fn found_at_open(self, path: &Path) -> StoreError {
        match self {
            StoreError::Sled(sled::Error::Corruption { .. })
            | StoreError::CorruptRecord(_)
            | StoreError::CorruptHistory(_) => StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: self.to_string(),
            },
            other => other,
        }
    }
}

/// An iterator over `(subject, events in arrival order)` of a consistent snapshot.
pub struct Snapshot {
    /// Records, for the first history entry each carries.
    records: Peekable<sled::Iter>,
    /// History entries under keys of their own.
    history: Peekable<sled::Iter>,
    /// Held so that a reopen waits for the snapshot instead of finding sled's files locked.
    _database: Arc<database::Database>,
    high_water: u64,
}

impl Iterator for Snapshot {
    type Item = Result<(Subject, Vec<StoredEvent>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_subject() {
                // Everything it has arrived after the snapshot's instant.
                Ok(Some((_, events))) if events.is_empty() => continue,
                other => return other.transpose(),
            }
        }
    }
}

impl Snapshot {
    /// The next subject in key order, from whichever scan is at it, and its entries from both.
    fn next_subject(&mut self) -> Result<Option<(Subject, Vec<StoredEvent>)>, StoreError> {
        let at_record = peek_key(&mut self.records)?.map(|key| key[1..].to_vec());
        let at_history = match peek_key(&mut self.history)? {
            Some(key) => Some(subject_of_history_key(key)?.to_vec()),
            None => None,
        };
        let Some(key) = at_record.iter().chain(&at_history).min().cloned() else {
            return Ok(None);
        };
        let mut entries: Vec<(EntryOrder, StoredEvent)> = Vec::new();
        if at_record.as_ref() == Some(&key) {
            if let Some(Ok((_, value))) = self.records.next() {
                entries.extend(carried_entry(&value)?);
            }
        }
        while peek_key(&mut self.history)?
            .map(subject_of_history_key)
            .transpose()?
            == Some(&key[..])
        {
            if let Some(Ok((stored_key, value))) = self.history.next() {
                entries.push((order_of_history_key(&stored_key)?, parse_entry(&value)?));
            }
        }
        let Some(subject) = subject_from_key(&key) else {
            return Err(StoreError::CorruptRecord(record::CorruptRecord::key(&key)));
        };
        entries.retain(|(order, _)| sequence_of(order) < self.high_water);
        entries.sort_by_key(|(order, _)| sequence_of(order));
        Ok(Some((
            subject,
            entries.into_iter().map(|(_, event)| event).collect(),
        )))
    }
}

/// The key a scan is at, or the error it is at (which is taken from it).
fn peek_key(entries: &mut Peekable<sled::Iter>) -> Result<Option<&[u8]>, StoreError> {
    if let Some(Err(_)) = entries.peek() {
        if let Some(Err(e)) = entries.next() {
            return Err(e.into());
        }
    }
    Ok(match entries.peek() {
        Some(Ok((key, _))) => Some(key),
        _ => None,
    })
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
    /// The data directory: sled lives in `db/`, the write-ahead log in `wal`.
    pub dir: PathBuf,
    pub cache_bytes: u64,
    pub rules: Rules,
}

/// The open database. Cheap to share behind an `Arc`.
pub struct Store {
    database: Arc<database::Slot>,
    phones: Arc<index::PhoneIndex>,
    suppressed_accounts: Arc<AtomicI64>,
    committer: mpsc::Sender<committer::Job>,
    committer_thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Key-space tags within the tree.
const RECORD: u8 = b'R';
const HISTORY: u8 = b'H';
const SEEN: u8 = b'I';

/// How many requests may wait for the committer before senders are slowed down.
const COMMIT_QUEUE: usize = 4096;

impl Store {
    /// Opens (or creates) the database under `config.dir`, replays the write-ahead log, and
    /// starts the committer.
    pub fn open(config: &StoreConfig, metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        let applier = committer::Applier {
            rules: config.rules,
            phones: Arc::new(index::PhoneIndex::new()),
            suppressed_accounts: Arc::new(AtomicI64::new(0)),
        };
        let (database, wal) = recover(config, 0, &applier)?;
        let database = Arc::new(database::Slot::new(database));
        let (phones, suppressed_accounts) =
            (applier.phones.clone(), applier.suppressed_accounts.clone());
        let (sender, receiver) = mpsc::channel(COMMIT_QUEUE);
        let thread = committer::spawn(
            committer::Pipeline {
                applier,
                database: database.clone(),
                wal,
                config: config.clone(),
            },
            receiver,
            metrics,
        )
        .map_err(|source| StoreError::Open {
            path: config.dir.clone(),
            source,
        })?;
        Ok(Store {
            database,
            phones,
            suppressed_accounts,
            committer: sender,
            committer_thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Applies `events` as one atomic unit and returns once they are durable.
    pub async fn commit(&self, events: Vec<Event>) -> Result<Vec<Outcome>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.committer
            .send(committer::Job::Commit { events, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
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
    /// applied, and events with later numbers are left out.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.committer
            .send(committer::Job::Barrier(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        let high_water = answer.await.map_err(|_| StoreError::Closed)?;
        let database = self.database.get()?;
        let high_water = high_water.ok_or_else(|| {
            StoreError::Unavailable("the database could not number the snapshot".into())
        })?;
        Ok(Snapshot {
            records: database.tree.scan_prefix([RECORD]).peekable(),
            history: database.tree.scan_prefix([HISTORY]).peekable(),
            _database: database,
            high_water,
        })
    }

    /// A subject's stored record bytes (see [`record::reasons_json`]), `None` if never seen.
    pub fn record_bytes(&self, subject: &Subject) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self
            .database
            .get()?
            .tree
            .get(record_key(&subject_key(subject)))?)
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
            Some(number) => Ok(self.phones.status(number)),
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
        let mut entries = history_entries(tree, &subject, record.as_deref())?
            .collect::<Result<Vec<(EntryOrder, StoredEvent)>, _>>()?;
        // Only the entry the record carries can be out of place.
        entries.sort_by_key(|(order, _)| *order);
        Ok(entries.into_iter().map(|(_, event)| event).collect())
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
        let accounts = self.suppressed_accounts.load(Ordering::Relaxed).max(0);
        (self.phones.len() as u64, accounts.unsigned_abs())
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

/// Opens the database and brings it up to date, as at start and after a storage failure: sled
/// recovers its own log, the WAL's records are replayed (idempotently) and checkpointed, and the
/// in-memory views are rebuilt from the records. Returns the database and the emptied WAL.
/// Damage found on the way is reported as the database's corruption, at a start and at a reopen
/// alike.
fn recover(
    config: &StoreConfig,
    generation: u64,
    applier: &committer::Applier,
) -> Result<(database::Database, wal::Wal), StoreError> {
    open_and_catch_up(config, generation, applier)
        .map_err(|e| e.found_at_open(&config.dir.join("db")))
}

fn open_and_catch_up(
    config: &StoreConfig,
    generation: u64,
    applier: &committer::Applier,
) -> Result<(database::Database, wal::Wal), StoreError> {
    let open_error = |source| StoreError::Open {
        path: config.dir.clone(),
        source,
    };
    let sled_dir = config.dir.join("db");
    let wal_path = config.dir.join("wal");
    // sled starts a new, empty database wherever its log file is missing. The WAL is created
    // right after the database, so a data directory that has one has had a database: starting
    // it empty would silently forget every suppression.
    if wal_path.exists() && !sled_dir.join("db").exists() {
        return Err(StoreError::Corrupt {
            path: sled_dir.clone(),
            detail: format!(
                "its log file {} is missing, but {} shows this data directory held a database",
                sled_dir.join("db").display(),
                wal_path.display()
            ),
        });
    }
    std::fs::create_dir_all(&sled_dir).map_err(open_error)?;
    let database = database::Database::open(&sled_dir, config.cache_bytes, generation)?;
    let recovered = wal::Wal::open(&wal_path).map_err(open_error)?;
    let mut wal = recovered.wal;
    if recovered.discarded > 0 {
        tracing::warn!(
            bytes = recovered.discarded,
            "the write-ahead log ended in a torn record (a crash during a write that was never acknowledged); it was cut off"
        );
    }
    if !recovered.batches.is_empty() {
        for events in &recovered.batches {
            applier.replay(&database, events)?;
        }
        database.make_durable()?;
        wal.clear()?;
        tracing::info!(
            records = recovered.batches.len(),
            "replayed the write-ahead log"
        );
    }
    let started = std::time::Instant::now();
    // One pass over every record rebuilds both in-memory views.
    let mut phones = index::IndexBuilder::new();
    let mut accounts = 0;
    for entry in database.tree.scan_prefix([RECORD]) {
        let (key, value) = entry?;
        match phone_of_record_key(&key) {
            Some(number) => phones.add(number, &value),
            None => accounts += i64::from(record::decode_status(&value)?.suppressed),
        }
    }
    applier.phones.replace(phones.build());
    applier
        .suppressed_accounts
        .store(accounts, Ordering::Relaxed);
    tracing::info!(
        suppressed_phones = applier.phones.len(),
        suppressed_accounts = accounts,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "in-memory views built"
    );
    Ok((database, wal))
}

/// The key of a subject in every tree. Each part carries its length so that no subject's key is
/// a prefix of another's, which keeps history prefix scans exact.
pub fn subject_key(subject: &Subject) -> Vec<u8> {
    match subject {
        Subject::Phone { phone } => {
            let mut key = Vec::with_capacity(phone.len() + 2);
            key.push(b'p');
            key.push(u8::try_from(phone.len()).unwrap_or(u8::MAX));
            key.extend_from_slice(phone.as_bytes());
            key
        }
        Subject::Account { scope, account } => {
            let mut key = Vec::with_capacity(scope.len() + account.len() + 5);
            key.push(b'a');
            for part in [scope, account] {
                // Parsers cap ids at MAX_ID_BYTES, far below u16::MAX.
                let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
                key.extend_from_slice(&len.to_be_bytes());
                key.extend_from_slice(&part.as_bytes()[..usize::from(len)]);
            }
            key
        }
    }
}

fn tagged(tag: u8, rest: &[u8], capacity: usize) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + rest.len() + capacity);
    key.push(tag);
    key.extend_from_slice(rest);
    key
}

/// The number of a phone record's key (`R` ‖ `p` ‖ len ‖ E.164).
fn phone_of_record_key(key: &[u8]) -> Option<u64> {
    let phone = key.strip_prefix(&[RECORD, b'p'])?.get(1..)?;
    crate::phone::e164_digits(std::str::from_utf8(phone).ok()?)
}

fn record_key(subject_key: &[u8]) -> Vec<u8> {
    tagged(RECORD, subject_key, 0)
}

fn seen_key(idempotency_key: &str) -> Vec<u8> {
    tagged(SEEN, idempotency_key.as_bytes(), 0)
}

fn history_prefix(subject_key: &[u8]) -> Vec<u8> {
    tagged(HISTORY, subject_key, 0)
}

/// The subject a subject key encodes; the inverse of [`subject_key`].
pub fn subject_from_key(key: &[u8]) -> Option<Subject> {
    match key.split_first()? {
        (b'p', rest) => {
            let (&len, phone) = rest.split_first()?;
            (phone.len() == usize::from(len)).then_some(())?;
            Some(Subject::Phone {
                phone: String::from_utf8(phone.to_vec()).ok()?,
            })
        }
        (b'a', rest) => {
            let (scope, rest) = length_prefixed(rest)?;
            let (account, rest) = length_prefixed(rest)?;
            rest.is_empty()
                .then_some(Subject::Account { scope, account })
        }
        _ => None,
    }
}

fn length_prefixed(bytes: &[u8]) -> Option<(String, &[u8])> {
    let len = usize::from(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]));
    let part = bytes.get(2..2 + len)?;
    Some((String::from_utf8(part.to_vec()).ok()?, &bytes[2 + len..]))
}

/// Where a history entry sorts within its subject: event time (order-preserving) ‖ sequence.
/// The sequence keeps events of the same millisecond in arrival order.
type EntryOrder = [u8; 16];

fn entry_order(event_time_ms: i64, sequence: u64) -> EntryOrder {
    let mut order = [0; 16];
    // Flipping the sign bit makes the big-endian bytes of an i64 sort like the number.
    order[..8].copy_from_slice(&((event_time_ms as u64) ^ (1 << 63)).to_be_bytes());
    order[8..].copy_from_slice(&sequence.to_be_bytes());
    order
}

fn sequence_of(order: &EntryOrder) -> u64 {
    let mut sequence = [0; 8];
    sequence.copy_from_slice(&order[8..]);
    u64::from_be_bytes(sequence)
}

fn history_key(subject_key: &[u8], order: &EntryOrder) -> Vec<u8> {
    let mut key = tagged(HISTORY, subject_key, order.len());
    key.extend_from_slice(order);
    key
}

fn subject_of_history_key(key: &[u8]) -> Result<&[u8], StoreError> {
    key.len()
        .checked_sub(std::mem::size_of::<EntryOrder>())
        .and_then(|end| key.get(1..end))
        .ok_or_else(|| StoreError::CorruptRecord(record::CorruptRecord::key(key)))
}

fn order_of_history_key(key: &[u8]) -> Result<EntryOrder, StoreError> {
    key.last_chunk::<16>()
        .copied()
        .ok_or_else(|| StoreError::CorruptRecord(record::CorruptRecord::key(key)))
}

/// A subject's first history entry as its record carries it: its order, then its JSON.
fn inline_entry(order: &EntryOrder, json: &[u8]) -> Vec<u8> {
    let mut entry = Vec::with_capacity(order.len() + json.len());
    entry.extend_from_slice(order);
    entry.extend_from_slice(json);
    entry
}

fn split_inline_entry(entry: &[u8]) -> Result<(EntryOrder, &[u8]), StoreError> {
    let (order, json) = entry
        .split_first_chunk::<16>()
        .ok_or_else(|| StoreError::CorruptRecord(record::CorruptRecord::key(entry)))?;
    Ok((*order, json))
}

fn parse_entry<T: serde::de::DeserializeOwned>(json: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(json).map_err(StoreError::CorruptHistory)
}

/// A subject's history entries, each read as `T` (the whole [`StoredEvent`], or only the fields
/// a caller needs) with the order it sorts in: first the entry its stored `record` carries, then
/// those under keys of their own, in order.
fn history_entries<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    subject_key: &[u8],
    record: Option<&[u8]>,
) -> Result<impl Iterator<Item = Result<(EntryOrder, T), StoreError>>, StoreError> {
    let carried = record.map(carried_entry).transpose()?.flatten();
    let keyed = tree.scan_prefix(history_prefix(subject_key)).map(|entry| {
        let (key, value) = entry?;
        Ok((order_of_history_key(&key)?, parse_entry(&value)?))
    });
    Ok(carried.map(Ok).into_iter().chain(keyed))
}

/// The history entry a stored record carries, if any, read as `T` with its order.
fn carried_entry<T: serde::de::DeserializeOwned>(
    record: &[u8],
) -> Result<Option<(EntryOrder, T)>, StoreError> {
    let Some(entry) = record::first_event(record)? else {
        return Ok(None);
    };
    let (order, json) = split_inline_entry(entry)?;
    Ok(Some((order, parse_entry(json)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_keys_are_prefix_free() {
        let short = subject_key(&Subject::Phone {
            phone: "+491234567".into(),
        });
        let long = subject_key(&Subject::Phone {
            phone: "+4912345678".into(),
        });
        assert!(!long.starts_with(&short));
    }

    #[test]
    fn subject_keys_decode_back() {
        for subject in [
            Subject::Phone {
                phone: "+4930123456".into(),
            },
            Subject::Account {
                scope: "tencent:@TOA#x".into(),
                account: "jared".into(),
            },
        ] {
            assert_eq!(subject_from_key(&subject_key(&subject)), Some(subject));
        }
        assert_eq!(subject_from_key(b"p\x05+49"), None);
    }

    #[test]
    fn account_keys_are_prefix_free() {
        let account = |scope: &str, account: &str| {
            subject_key(&Subject::Account {
                scope: scope.into(),
                account: account.into(),
            })
        };
        assert!(!account("tencent:a", "bc").starts_with(&account("tencent:a", "b")));
        assert_ne!(account("tencent:ab", "c"), account("tencent:a", "bc"));
    }

    fn small_config(dir: &Path) -> StoreConfig {
        StoreConfig {
            dir: dir.to_path_buf(),
            cache_bytes: 1 << 20,
            rules: Rules::default(),
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
                let (subject, events) = entry.expect("entry");
                let times = events.iter().map(|e| e.event.event_time_ms).collect();
                (subject, times)
            })
            .collect();
        assert_eq!(
            exported,
            [(new.clone(), vec![5_000, 1_000]), (old, vec![2_000, 3_000])],
            "arrival order, from the record and from keys alike"
        );
        store.close(Duration::from_secs(10)).await;
    }

    #[test]
    fn history_keys_sort_by_event_time() {
        let subject = subject_key(&Subject::Phone {
            phone: "+491234567".into(),
        });
        let early = history_key(&subject, &entry_order(-5, 9));
        let later = history_key(&subject, &entry_order(3, 1));
        let latest = history_key(&subject, &entry_order(3, 2));
        assert!(early < later && later < latest);
    }
}
