//! Reading history entries out of the tree: one subject's (for the API and for deduplication),
//! or every subject's as it stood at one sequence number (for export and for snapshots).
//!
//! A subject's first entry may travel inside its record (see [`super::keys::inline_entry`]);
//! every other entry has a key of its own. Entries are never changed once written, which is
//! what makes a scan filtered by sequence number a consistent picture while writes go on.

use std::iter::Peekable;
use std::sync::Arc;

use super::database::Database;
use super::keys::{
    history_prefix, order_of_history_key, sequence_of, split_inline_entry, subject_from_key,
    subject_of_history_key, EntryOrder, HISTORY, RECORD,
};
use super::record::{self, CorruptRecord};
use super::snapshot::SubjectHistory;
use super::{StoreError, StoredEvent};
use crate::event::Subject;

/// The one field of a stored history entry that deduplication reads.
#[derive(serde::Deserialize)]
pub(super) struct KeyOfStoredEvent {
    pub idempotency_key: String,
}

pub(super) fn parse_entry<T: serde::de::DeserializeOwned>(json: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(json).map_err(StoreError::CorruptHistory)
}

/// A subject's history entries, each read as `T` (the whole [`StoredEvent`], or only the fields
/// a caller needs) with the order it sorts in: first the entry its stored `record` carries, then
/// those under keys of their own, in order.
pub(super) fn history_entries<T: serde::de::DeserializeOwned>(
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
pub(super) fn carried_entry<T: serde::de::DeserializeOwned>(
    record: &[u8],
) -> Result<Option<(EntryOrder, T)>, StoreError> {
    let Some(entry) = record::first_event(record)? else {
        return Ok(None);
    };
    let (order, json) = split_inline_entry(entry)?;
    Ok(Some((order, parse_entry(json)?)))
}

/// A subject and its history entries, each with its sequence number, in arrival order.
pub type NumberedHistory = (Subject, Vec<(u64, StoredEvent)>);

/// `(subject, its entries numbered below a sequence, each with its number, in arrival order)`
/// for every subject in key order.
pub struct Histories {
    /// Records, for the first history entry each carries.
    records: Peekable<sled::Iter>,
    /// History entries under keys of their own.
    history: Peekable<sled::Iter>,
    /// Held so that a reopen waits for the scan instead of finding sled's files locked.
    _database: Arc<Database>,
    below: u64,
}

impl Histories {
    /// Every entry numbered below `below`: with everything below it applied, a consistent view.
    pub(super) fn new(database: Arc<Database>, below: u64) -> Histories {
        Histories {
            records: database.tree.scan_prefix([RECORD]).peekable(),
            history: database.tree.scan_prefix([HISTORY]).peekable(),
            _database: database,
            below,
        }
    }

    /// The next subject in key order, from whichever scan is at it, and its entries from both.
    fn next_subject(&mut self) -> Result<Option<NumberedHistory>, StoreError> {
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
            return Err(StoreError::CorruptRecord(CorruptRecord::key(&key)));
        };
        let mut numbered: Vec<(u64, StoredEvent)> = entries
            .into_iter()
            .map(|(order, event)| (sequence_of(&order), event))
            .filter(|(seq, _)| *seq < self.below)
            .collect();
        numbered.sort_by_key(|(seq, _)| *seq);
        Ok(Some((subject, numbered)))
    }
}

impl Histories {
    /// The entries as a snapshot file holds them: events with their numbers, without what sled
    /// derived from them.
    pub(super) fn events_only(self) -> impl Iterator<Item = Result<SubjectHistory, StoreError>> {
        self.map(|subject| {
            subject.map(|(subject, entries)| {
                let events = entries.into_iter().map(|(seq, e)| (seq, e.event)).collect();
                (subject, events)
            })
        })
    }
}

impl Iterator for Histories {
    type Item = Result<NumberedHistory, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_subject() {
                // Everything it has arrived after the picture's instant.
                Ok(Some((_, events))) if events.is_empty() => continue,
                other => return other.transpose(),
            }
        }
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
