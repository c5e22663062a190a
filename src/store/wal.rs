//! The write-ahead log that makes acknowledged events durable.
//!
//! sled's own flush ends in `sync_file_range`, which survives a process kill but not a power cut,
//! and costs two device round trips when followed by an fsync. Instead, every group commit
//! appends the batch's events to this file as one checksummed record and `fdatasync`s it once;
//! only then are the batch's requests answered. sled receives the same writes in memory and
//! persists them in its own time; a checkpoint (sled flush + fsync of its log) makes the WAL's
//! contents redundant, and the WAL is emptied.
//!
//! After a crash, every intact record is replayed through the normal apply path. Replay needs no
//! bookkeeping of what sled already has: every event carries an idempotency key, so an event that
//! survived in sled is recognised as a duplicate and changes nothing. A torn last record (the
//! crash hit mid-append, so it was never acknowledged) fails its checksum and is dropped.
//!
//! The file is preallocated with zeros and records are written in place from the start: an
//! `fdatasync` that does not change the file's size or block map flushes data only, about half the
//! cost of one that must also commit a size change to the filesystem journal. Emptying the log
//! starts a new epoch at offset 0 instead of truncating, by writing there an empty record of the
//! new epoch; replay stops at the first record of another epoch (or the empty one), so the older
//! records still further in the file are never read.
//!
//! Record layout: `len: u32 LE` ‖ `crc32(epoch ‖ payload): u32 LE` ‖ `epoch: u64 LE` ‖ payload
//! (a JSON array of events). The empty record that starts an epoch is a header with `len` and
//! `crc` zero and no payload.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::event::Event;

const HEADER: usize = 16;
/// Zeros written ahead so that appends overwrite allocated blocks.
const PREALLOCATE: u64 = 32 * 1024 * 1024;
/// A record larger than this is treated as corruption rather than allocated.
const MAX_RECORD: usize = 256 * 1024 * 1024;

pub(super) struct Wal {
    file: File,
    /// Where the next record goes: the end of the current epoch's records.
    len: u64,
    epoch: u64,
}

/// What opening the WAL found.
pub(super) struct Recovered {
    pub wal: Wal,
    /// Intact records, oldest first, to replay.
    pub batches: Vec<Vec<Event>>,
    /// Bytes of a torn or corrupt tail that were cut off.
    pub discarded: u64,
}

impl Wal {
    pub fn open(path: &Path) -> std::io::Result<Recovered> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let epoch = first_epoch(&bytes).unwrap_or(0);
        let mut batches = Vec::new();
        let mut offset = 0;
        while let Some((events, next)) = read_record(&bytes, offset, epoch) {
            batches.push(events);
            offset = next;
        }
        // A torn record is the one right after the last intact one, unless that spot holds
        // the preallocated zeros, an older epoch's record or the empty record that starts an
        // epoch.
        let discarded = match bytes.get(offset..offset + HEADER) {
            Some(header) if header[..4] != [0; 4] && record_epoch(header) == Some(epoch) => {
                file.write_all_at(&[0; HEADER], offset as u64)?;
                file.sync_data()?;
                HEADER as u64
            }
            _ => 0,
        };
        if (bytes.len() as u64) < PREALLOCATE {
            preallocate(&mut file, bytes.len() as u64)?;
        }
        Ok(Recovered {
            wal: Wal {
                file,
                len: offset as u64,
                epoch,
            },
            batches,
            discarded,
        })
    }

    /// Writes one record and makes it durable.
    pub fn append(&mut self, events: &[&Event]) -> std::io::Result<()> {
        let payload = serde_json::to_vec(events).map_err(std::io::Error::other)?;
        let len = u32::try_from(payload.len())
            .map_err(|_| std::io::Error::other("WAL record too large"))?;
        let epoch = self.epoch.to_le_bytes();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&epoch);
        crc.update(&payload);
        let mut record = Vec::with_capacity(HEADER + payload.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&crc.finalize().to_le_bytes());
        record.extend_from_slice(&epoch);
        record.extend_from_slice(&payload);
        self.file.write_all_at(&record, self.len)?;
        self.file.sync_data()?;
        self.len += record.len() as u64;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Empties the log once a checkpoint made its contents redundant: a new epoch at offset 0.
    ///
    /// The new epoch is written down at once, as an empty record: otherwise the old epoch's
    /// records would still lead the file, and every start after a clean shutdown would replay
    /// them all again (harmless, being duplicates, but slow with a full log).
    pub fn clear(&mut self) -> std::io::Result<()> {
        let epoch = self.epoch + 1;
        let mut marker = [0u8; HEADER];
        marker[8..].copy_from_slice(&epoch.to_le_bytes());
        self.file.write_all_at(&marker, 0)?;
        self.file.sync_data()?;
        self.epoch = epoch;
        self.len = 0;
        Ok(())
    }
}

fn preallocate(file: &mut File, from: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1024 * 1024];
    let mut at = from;
    while at < PREALLOCATE {
        let n = zeros.len().min((PREALLOCATE - at) as usize);
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all()
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

    #[test]
    fn records_survive_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let mut wal = Wal::open(&path).expect("open").wal;
        wal.append(&[&event(1), &event(2)]).expect("append");
        wal.append(&[&event(3)]).expect("append");
        let intact = wal.len();
        drop(wal);
        // A crash in the middle of a third write: a header and part of its payload.
        let file = OpenOptions::new().write(true).open(&path).expect("reopen");
        let mut torn = vec![200, 0, 0, 0, 1, 2, 3, 4];
        torn.extend_from_slice(&0u64.to_le_bytes());
        torn.push(b'[');
        file.write_all_at(&torn, intact).expect("torn write");
        drop(file);

        let recovered = Wal::open(&path).expect("open");
        assert_eq!(
            recovered.batches,
            vec![vec![event(1), event(2)], vec![event(3)]]
        );
        assert_eq!(recovered.discarded, HEADER as u64);
        assert_eq!(recovered.wal.len(), intact);
    }

    #[test]
    fn a_cleared_log_replays_only_its_new_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let mut wal = Wal::open(&path).expect("open").wal;
        wal.append(&[&event(1)]).expect("append");
        wal.append(&[&event(2)]).expect("append");
        wal.clear().expect("clear");
        drop(wal);
        let recovered = Wal::open(&path).expect("open");
        assert!(
            recovered.batches.is_empty(),
            "a cleared log replays nothing"
        );
        assert_eq!(recovered.discarded, 0);

        let mut wal = recovered.wal;
        wal.append(&[&event(7)]).expect("append");
        drop(wal);
        let recovered = Wal::open(&path).expect("open");
        assert_eq!(recovered.batches, vec![vec![event(7)]]);
        assert_eq!(recovered.discarded, 0);
    }
}
