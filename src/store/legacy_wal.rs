//! Reading the write-ahead log of data directories written before the log (see [`super::log`])
//! existed, once, when such a directory is first opened: its intact records are replayed into
//! sled before the directory moves to the log. Nothing writes this format any more.
//!
//! Record layout: `len: u32 LE` ‖ `crc32(epoch ‖ payload): u32 LE` ‖ `epoch: u64 LE` ‖ payload
//! (a JSON array of events). Emptying the old log started a new epoch at offset 0 with an empty
//! record of that epoch, so only the records of the first record's epoch count; a torn last
//! record fails its checksum and is left out (it was never acknowledged).

use std::path::Path;

use crate::event::Event;

const HEADER: usize = 16;
/// A record larger than this is treated as corruption rather than allocated.
const MAX_RECORD: usize = 256 * 1024 * 1024;

/// The intact records of the old write-ahead log at `path`, oldest first.
pub(super) fn read(path: &Path) -> std::io::Result<Vec<Vec<Event>>> {
    let bytes = std::fs::read(path)?;
    let epoch = first_epoch(&bytes).unwrap_or(0);
    let mut batches = Vec::new();
    let mut offset = 0;
    while let Some((events, next)) = read_record(&bytes, offset, epoch) {
        batches.push(events);
        offset = next;
    }
    Ok(batches)
}

fn record_epoch(header: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = header.get(8..16)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

fn first_epoch(bytes: &[u8]) -> Option<u64> {
    let header = bytes.get(..HEADER)?;
    record_epoch(header).filter(|_| header.iter().any(|&b| b != 0))
}

/// The record of `epoch` at `offset` and where the next one starts, or `None` at the end of the
/// epoch or at a torn or corrupt record.
fn read_record(bytes: &[u8], offset: usize, epoch: u64) -> Option<(Vec<Event>, usize)> {
    let header = bytes.get(offset..offset + HEADER)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > MAX_RECORD || record_epoch(header)? != epoch {
        return None;
    }
    let payload = bytes.get(offset + HEADER..offset + HEADER + len)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[8..16]);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return None;
    }
    let events = serde_json::from_slice(payload).ok()?;
    Some((events, offset + HEADER + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, Source, Subject};

    fn event(n: i64) -> Event {
        Event {
            subject: Subject::Phone {
                phone: format!("+49301234{n:03}"),
            },
            source: Source::Lox24,
            kind: Kind::Unsubscribe,
            idempotency_key: format!("test:{n}"),
            event_id: None,
            event_time_ms: n,
            receive_time_ms: n,
            details: serde_json::Map::new(),
        }
    }

    fn record(epoch: u64, events: &[Event]) -> Vec<u8> {
        let payload = serde_json::to_vec(events).expect("json");
        let mut crc = crc32fast::Hasher::new();
        crc.update(&epoch.to_le_bytes());
        crc.update(&payload);
        let mut out = Vec::new();
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        out.extend_from_slice(&epoch.to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    #[test]
    fn reads_the_current_epoch_up_to_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let mut bytes = record(3, &[event(1), event(2)]);
        bytes.extend(record(3, &[event(3)]));
        let mut torn = record(3, &[event(4)]);
        torn.truncate(torn.len() - 2);
        bytes.extend(torn);
        // An older epoch's record further in the file is not read.
        bytes.extend(record(2, &[event(9)]));
        std::fs::write(&path, &bytes).expect("write");
        assert_eq!(
            read(&path).expect("read"),
            vec![vec![event(1), event(2)], vec![event(3)]]
        );
    }
}
