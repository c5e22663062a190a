//! Export and import of the whole list, and the backup.
//!
//! The backup is a snapshot file (see `Store::backup`) of everything acknowledged before the
//! request, streamed as it is: a data directory holding only it under `snapshots/` starts with
//! that list (the store rebuilds its database from it). Its sequence number, which names the file,
//! travels in the [`SNAPSHOT_HEADER`] header.
//!
//! Export writes one NDJSON line per subject: `{"subject": …, "record": {"suppressed": …,
//! "since": …, "reasons": […]}, "events": [...]}` with every history event in the order the
//! rules take them (each with its idempotency key and whether it changed the record there). A
//! record is a function of the set of its events (see `store::record`), so the events are
//! everything needed for an exact round trip, counters such as the Sendios lost streak
//! included; `record` is there for a reader of the file, and import never trusts it over the
//! events.
//! The export is a consistent snapshot (see `Store::snapshot`) and streams in constant memory.
//!
//! Import takes that format back — events go through the committer as if they had just arrived,
//! so an import into an empty store reproduces the export, and into a live store it merges under
//! the same event-time rules, deduplicated by idempotency key — or a plain list of phone numbers
//! (`text/plain`, one per line, or `text/csv`, the first column, its first line skipped if it is
//! a header; blank lines skipped), which become unsubscribes with source `import`. The report
//! counts subjects: added, already (every event known, or the number already suppressed) and
//! invalid lines, the first 100 with what was wrong.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::HttpError;
use crate::event::{mint_idempotency_key, ms_to_secs, now_ms, Event, Kind, Source, Subject};
use crate::response::{ndjson_response, streamed_response, Response};
use crate::state::AppState;
use crate::store::{Outcome, Reason, StoredEvent};
use crate::web::{media_type, Line, LineFormat, LineReader, Request};

/// Events committed together during an import; each commit is durable before the next.
const IMPORT_BATCH: usize = 2_000;
/// Line numbers of invalid lines reported, at most.
const MAX_REPORTED_LINES: usize = 100;
/// An export line of one subject can be long; an import line beyond this is invalid.
const MAX_IMPORT_LINE: usize = 16 * 1024 * 1024;

/// One export line. `record` is what `events` make, for a reader of the file; import replays the
/// events and never trusts it.
#[derive(serde::Serialize)]
struct Exported<'a> {
    subject: &'a Subject,
    record: RecordView<'a>,
    events: &'a [StoredEvent],
}

#[derive(serde::Serialize)]
struct RecordView<'a> {
    suppressed: bool,
    since: Option<i64>,
    reasons: &'a [Reason],
}

/// What import reads from an export line: members it does not need (the record) are ignored.
#[derive(Deserialize)]
struct Imported {
    subject: Subject,
    events: Vec<StoredEvent>,
}

/// `GET /v1/export`
pub async fn export(state: &Arc<AppState>) -> Result<Response, HttpError> {
    let snapshot = state.store.snapshot().await?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::task::spawn_blocking(move || {
        let mut output = Vec::with_capacity(64 * 1024);
        for entry in snapshot {
            match entry {
                Ok((subject, record, events)) => {
                    let line = Exported {
                        subject: &subject,
                        record: RecordView {
                            suppressed: record.suppressed(),
                            since: record.since_ms().map(ms_to_secs),
                            reasons: &record.reasons,
                        },
                        events: &events,
                    };
                    let _ = serde_json::to_writer(&mut output, &line);
                    output.push(b'\n');
                }
                Err(e) => {
                    // The stream ends early; the client sees a truncated body, never a silent gap.
                    tracing::error!("export stopped: {e}");
                    return;
                }
            }
            if output.len() >= 64 * 1024
                && sender
                    .blocking_send(Bytes::from(std::mem::take(&mut output)))
                    .is_err()
            {
                return;
            }
        }
        if !output.is_empty() {
            let _ = sender.blocking_send(Bytes::from(output));
        }
    });
    Ok(ndjson_response(receiver))
}

/// The header of a backup response that names the sequence its snapshot holds everything below.
pub const SNAPSHOT_HEADER: &str = "suppressd-snapshot-seq";

/// `GET /v1/backup`
pub async fn backup(state: &Arc<AppState>) -> Result<Response, HttpError> {
    let (next_seq, file) = state.store.backup().await?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        loop {
            let mut chunk = vec![0u8; 256 * 1024];
            match std::io::Read::read(&mut file, &mut chunk) {
                Ok(0) => return,
                Ok(n) => {
                    chunk.truncate(n);
                    if sender.blocking_send(Bytes::from(chunk)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // The body ends early; the client's check of the file finds it incomplete.
                    tracing::error!("backup stopped: {e}");
                    return;
                }
            }
        }
    });
    let mut response = streamed_response(receiver, "application/octet-stream");
    response
        .headers_mut()
        .insert(SNAPSHOT_HEADER, hyper::header::HeaderValue::from(next_seq));
    Ok(response)
}

/// The answer to an import. Counts are of subjects (a record each), whatever number of events
/// an export line carries.
#[derive(Default, serde::Serialize)]
struct Report {
    added: u64,
    already: u64,
    invalid: u64,
    /// The first [`MAX_REPORTED_LINES`] invalid lines, each with what was wrong.
    invalid_lines: Vec<InvalidLine>,
}

#[derive(serde::Serialize)]
struct InvalidLine {
    line: u64,
    error: String,
}

impl Report {
    fn invalid(&mut self, line: u64, error: impl Into<String>) {
        self.invalid += 1;
        if self.invalid_lines.len() < MAX_REPORTED_LINES {
            self.invalid_lines.push(InvalidLine {
                line,
                error: error.into(),
            });
        }
    }
}

/// Events on their way to one commit, with how many of them each subject contributed, so that
/// the outcomes can be counted by subject: one that had any new event is added, one whose every
/// event was known already is `already`.
#[derive(Default)]
struct ImportBatch {
    events: Vec<Event>,
    events_per_subject: Vec<usize>,
}

impl ImportBatch {
    fn push(&mut self, events: impl IntoIterator<Item = Event>) {
        let before = self.events.len();
        self.events.extend(events);
        self.events_per_subject.push(self.events.len() - before);
    }

    async fn commit(&mut self, state: &AppState, report: &mut Report) -> Result<(), HttpError> {
        if self.events.is_empty() {
            return Ok(());
        }
        let outcomes = state.commit(std::mem::take(&mut self.events)).await?;
        let mut outcomes = outcomes.as_slice();
        for count in std::mem::take(&mut self.events_per_subject) {
            let (mine, rest) = outcomes.split_at(count.min(outcomes.len()));
            outcomes = rest;
            if mine.iter().all(|outcome| *outcome == Outcome::Duplicate) {
                report.already += 1;
            } else {
                report.added += 1;
            }
        }
        Ok(())
    }
}

/// `POST /v1/import`
pub async fn import(state: &Arc<AppState>, request: Request) -> Result<Response, HttpError> {
    let Some(format) = LineFormat::of(&request) else {
        return Err(HttpError::UnsupportedMediaType(match media_type(&request) {
            Some(given) => format!(
                "import takes application/x-ndjson (an export), text/plain or text/csv (one number per line), not {given}"
            ),
            None => "import takes application/x-ndjson (an export), text/plain or text/csv (one number per line); the request has no Content-Type".to_owned(),
        }));
    };
    let mut lines = LineReader::new(request, MAX_IMPORT_LINE);
    let mut report = Report::default();
    let mut batch = ImportBatch::default();
    let mut listed = ListedNumbers::default();
    let mut number = 0u64;
    while let Some(line) = lines.next_line().await {
        number += 1;
        let line = match line? {
            Line::Text(line) => line,
            Line::TooLong => {
                report.invalid(number, format!("longer than {MAX_IMPORT_LINE} bytes"));
                continue;
            }
        };
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let phone = match format {
            LineFormat::Ndjson => {
                match exported_events(text) {
                    Ok(events) => batch.push(events),
                    Err(error) => report.invalid(number, error),
                }
                None
            }
            LineFormat::Text => Some(text),
            LineFormat::Csv => Some(first_column(text)),
        };
        if let Some(phone) = phone {
            match state.phones.normalize(phone) {
                Ok(phone) => {
                    if !listed.insert(&phone) {
                        continue;
                    }
                    if state.store.phone_status(&phone)?.suppressed {
                        report.already += 1;
                        continue;
                    }
                    batch.push([imported_unsubscribe(phone)]);
                }
                // Only CSV has header rows: in a plain list, a first line that is not a number
                // is as wrong as any other.
                Err(_) if number == 1 && format == LineFormat::Csv => {}
                Err(e) => report.invalid(number, e.to_string()),
            }
        }
        if batch.events.len() >= IMPORT_BATCH {
            batch.commit(state, &mut report).await?;
        }
    }
    batch.commit(state, &mut report).await?;
    tracing::info!(
        added = report.added,
        already = report.already,
        invalid = report.invalid,
        "import finished"
    );
    Ok(crate::response::json_response(
        hyper::StatusCode::OK,
        &json!(report),
    ))
}

/// The numbers met so far in one imported list, so that a number listed twice counts once.
/// A list can hold tens of millions, so they are kept as integers in one sorted array (8 bytes
/// each) that a small set of recent ones is merged into now and then, rather than as strings in
/// a hash set (several times as much, which was most of an import's memory).
#[derive(Default)]
struct ListedNumbers {
    sorted: Vec<u64>,
    recent: HashSet<u64>,
    /// E.164 strings too long for an integer (none that the normaliser lets through).
    other: HashSet<String>,
}

impl ListedNumbers {
    /// Recent numbers kept unmerged at least, so that short lists are never merged.
    const MIN_RECENT: usize = 1 << 16;

    /// Notes `phone`, returning whether it was not listed before.
    fn insert(&mut self, phone: &str) -> bool {
        let Some(number) = crate::phone::e164_digits(phone) else {
            return self.other.insert(phone.to_owned());
        };
        if self.sorted.binary_search(&number).is_ok() || !self.recent.insert(number) {
            return false;
        }
        if self.recent.len() >= Self::MIN_RECENT.max(self.sorted.len() / 8) {
            self.merge();
        }
        true
    }

    /// Merges the recent numbers in from the back, so that no second copy of the array is made.
    fn merge(&mut self) {
        let mut recent: Vec<u64> = self.recent.drain().collect();
        recent.sort_unstable();
        let mut kept = self.sorted.len();
        self.sorted.resize(kept + recent.len(), 0);
        for slot in (0..self.sorted.len()).rev() {
            let Some(&newest) = recent.last() else { break };
            if kept > 0 && self.sorted[kept - 1] > newest {
                kept -= 1;
                self.sorted[slot] = self.sorted[kept];
            } else {
                self.sorted[slot] = newest;
                recent.pop();
            }
        }
    }
}

/// The events of one export line, refused whole if any of them is about another subject than
/// the line's.
fn exported_events(text: &str) -> Result<Vec<Event>, String> {
    let line: Imported = serde_json::from_str(text)
        .map_err(|e| format!("not an export line ({{\"subject\": …, \"events\": […]}}): {e}"))?;
    let events: Vec<Event> = line.events.into_iter().map(|stored| stored.event).collect();
    match events
        .iter()
        .position(|event| event.subject != line.subject)
    {
        Some(index) => Err(format!(
            "event {index} is about another subject than the line's"
        )),
        None => Ok(events),
    }
}

/// A CSV line's first field, without the quotes around it.
fn first_column(line: &str) -> &str {
    line.split(',')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('"')
}

fn imported_unsubscribe(phone: String) -> Event {
    let (id, idempotency_key) = mint_idempotency_key(Source::Import);
    let now = now_ms();
    Event {
        subject: Subject::Phone { phone },
        source: Source::Import,
        kind: Kind::Unsubscribe,
        idempotency_key,
        event_id: Some(id),
        event_time_ms: now,
        receive_time_ms: now,
        details: serde_json::Map::<String, Value>::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_numbers_answer_like_a_set_across_merges() {
        let mut listed = ListedNumbers::default();
        let mut expected = HashSet::new();
        // A multiplicative walk repeats numbers and spreads them, so merges interleave.
        let mut state: u64 = 1;
        for _ in 0..400_000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let n = (state >> 33) % 300_000;
            let phone = format!("+4930{n:07}");
            assert_eq!(
                listed.insert(&phone),
                expected.insert(phone.clone()),
                "{phone}"
            );
        }
        assert!(
            listed.sorted.len() > ListedNumbers::MIN_RECENT,
            "merged at least once"
        );
        assert!(listed.sorted.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(listed.sorted.len() + listed.recent.len(), expected.len());
        assert!(listed.insert("+1234567890123456"));
        assert!(!listed.insert("+1234567890123456"));
    }
}
