//! Export and import of the whole list, and the backup.
//!
//! The backup is a snapshot file (see `Store::backup`) of everything acknowledged before the
//! request, streamed as it is: a data directory holding only it under `snapshots/` starts with
//! that list (the store rebuilds its database from it). Its sequence number, which names the file,
//! travels in the [`SNAPSHOT_HEADER`] header.
//!
//! Export writes one NDJSON line per subject: `{"subject": …, "events": [...]}` with every
//! history event in arrival order (each with its idempotency key and whether it applied). A
//! record is a deterministic function of its events replayed in arrival order, so the events are
//! everything needed for an exact round trip, counters such as the Sendios lost streak included.
//! The export is a consistent snapshot (see `Store::snapshot`) and streams in constant memory.
//!
//! Import takes that format back — events go through the committer as if they had just arrived,
//! so an import into an empty store reproduces the export, and into a live store it merges under
//! the same event-time rules, deduplicated by idempotency key — or a plain list of phone numbers
//! (text or CSV, first column, header row and blank lines skipped), which become unsubscribes
//! with source `import`.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::HttpError;
use crate::event::{mint_idempotency_key, now_ms, Event, Kind, Source, Subject};
use crate::server::AppState;
use crate::store::{Outcome, StoredEvent};
use crate::web::{
    media_type, ndjson_response, streamed_response, Line, LineFormat, LineReader, Request, Response,
};

/// Events committed together during an import; each commit is durable before the next.
const IMPORT_BATCH: usize = 2_000;
/// Line numbers of invalid lines reported, at most.
const MAX_REPORTED_LINES: usize = 100;
/// An export line of one subject can be long; an import line beyond this is invalid.
const MAX_IMPORT_LINE: usize = 16 * 1024 * 1024;

#[derive(serde::Serialize, Deserialize)]
struct Exported {
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
                Ok((subject, events)) => {
                    let _ = serde_json::to_writer(&mut output, &Exported { subject, events });
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

#[derive(Default, serde::Serialize)]
struct Report {
    added: u64,
    already: u64,
    invalid: u64,
    invalid_lines: Vec<u64>,
}

impl Report {
    fn invalid(&mut self, line: u64) {
        self.invalid += 1;
        if self.invalid_lines.len() < MAX_REPORTED_LINES {
            self.invalid_lines.push(line);
        }
    }

    fn count(&mut self, outcomes: &[Outcome]) {
        for outcome in outcomes {
            match outcome {
                Outcome::Duplicate => self.already += 1,
                Outcome::Applied | Outcome::Recorded => self.added += 1,
            }
        }
    }
}

/// `POST /v1/import`
pub async fn import(state: &Arc<AppState>, request: Request) -> Result<Response, HttpError> {
    let Some(format) = LineFormat::of(&request) else {
        return Err(HttpError::UnsupportedMediaType(format!(
            "import takes application/x-ndjson (an export) or text/plain / text/csv (one number per line), not {:?}",
            media_type(&request)
        )));
    };
    let mut lines = LineReader::new(request, MAX_IMPORT_LINE);
    let mut report = Report::default();
    let mut batch: Vec<Event> = Vec::new();
    let mut listed = ListedNumbers::default();
    let mut number = 0u64;
    while let Some(line) = lines.next_line().await {
        number += 1;
        let line = match line? {
            Line::Text(line) => line,
            Line::TooLong => {
                report.invalid(number);
                continue;
            }
        };
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        if format == LineFormat::Ndjson {
            match serde_json::from_str::<Exported>(text) {
                Ok(exported) => {
                    batch.extend(exported.events.into_iter().map(|stored| stored.event))
                }
                Err(_) => report.invalid(number),
            }
        } else {
            let first = text
                .split(',')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"');
            match state.phones.normalize(first) {
                Ok(phone) => {
                    if !listed.insert(&phone) {
                        continue;
                    }
                    if state.store.phone_status(&phone)?.suppressed {
                        report.already += 1;
                        continue;
                    }
                    batch.push(imported_unsubscribe(phone));
                }
                // A first line that is not a number is a header row.
                Err(_) if number == 1 => {}
                Err(_) => report.invalid(number),
            }
        }
        if batch.len() >= IMPORT_BATCH {
            report.count(&state.store.commit(std::mem::take(&mut batch)).await?);
        }
    }
    if !batch.is_empty() {
        report.count(&state.store.commit(batch).await?);
    }
    tracing::info!(
        added = report.added,
        already = report.already,
        invalid = report.invalid,
        "import finished"
    );
    Ok(crate::web::json_response(
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
