//! The log: every acknowledged event, in order, in checksummed segment files. With the newest
//! snapshot it is the truth of the list; sled is a view of it that can always be rebuilt.
//!
//! A group commit is one record: the events of every request in the batch, numbered with
//! consecutive sequence numbers, written with one `pwrite` and made durable with one
//! `fdatasync` before any of those requests is answered. Records follow each other without gaps
//! in their numbers, within a segment and from one segment to the next, which is how a reader
//! tells a lost or misplaced record from the end of the log.
//!
//! Segments are preallocated with zeros: an `fdatasync` that changes neither the file's size nor
//! its block map flushes data only, about half the cost of one that must commit a size change
//! to the file system's journal. The next segment is prepared in the background so that moving
//! on to it costs a rename, not 64 MiB of zeros under a waiting commit.
//!
//! What a crash can leave, and what [`Log::open`] does with it:
//! - in the newest segment, a record that is short, fails its checksum or does not follow: the
//!   append that wrote it was under way, so its `fdatasync` had not returned and nobody was told
//!   it was durable. It is the torn tail and is cut off (overwritten with zeros, synced) — but
//!   only if no intact record of a later append follows it. Appends are issued one after the
//!   other, each after the one before was synced, so an intact later record proves the bad one
//!   had been synced: that is damage, not a crash, and the open is refused naming the file and
//!   offset. A torn record's own remains never pass for a later record: a record is one append.
//! - in an older segment, anything but intact, consecutive records up to the first number of the
//!   next segment is damage: older segments were complete and synced before the next began.
//!
//! Layout. Segment `log/<first sequence, 20 digits>.log`: a 32-byte header (`SUPPRESSD LOG`
//! magic, format version, first sequence, CRC-32 of the header), then records. Record: a 24-byte
//! header — magic `SLOG`, payload length, first sequence, event count (u32, u32, u64, u32, all
//! little-endian), CRC-32 of those 20 bytes and the payload — then the payload, the events in the
//! binary form of [`super::codec`].

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::codec;
use super::files::{corrupt, io_error, sync_dir, FileError};
use crate::event::Event;

const SEGMENT_MAGIC: &[u8; 16] = b"SUPPRESSD LOG\0\0\0";
const FORMAT_VERSION: u32 = 1;
const SEGMENT_HEADER: usize = 32;
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"SLOG");
const RECORD_HEADER: usize = 24;
/// A length beyond this is damage rather than a record to allocate for.
const MAX_RECORD: usize = 1 << 30;
const SPARE: &str = "next-segment.tmp";

/// A torn record that [`Log::open`] cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
}

pub struct Log {
    dir: PathBuf,
    /// Oldest first; the last one is being appended to.
    segments: Vec<Segment>,
    file: File,
    /// Where the next record goes in the newest segment.
    end: u64,
    next_seq: u64,
    segment_bytes: u64,
    spare: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    /// Reused between appends.
    buffer: Vec<u8>,
    /// An append failed: what it left in the file is only known once the log is opened again.
    failed: bool,
    /// Record bytes appended since this `Log` was opened.
    appended_bytes: u64,
}

/// One record as a reader finds it.
struct Found {
    offset: usize,
    first_seq: u64,
    count: u64,
    payload: std::ops::Range<usize>,
}

/// Why reading a segment stopped.
enum Stop {
    /// At zeros or at the end of the file.
    Clean,
    /// At something that is not the next record.
    Bad { offset: usize, why: String },
}

impl Log {
    /// Opens the log in `dir`, creating it (starting at `first_seq`) if it holds no segment, and
    /// checks every record of every segment. A torn tail is cut; damage is an error.
    pub fn open(
        dir: &Path,
        first_seq: u64,
        segment_bytes: u64,
    ) -> Result<(Log, Option<TornTail>), FileError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let _ = std::fs::remove_file(dir.join(SPARE));
        let mut segments = list_segments(dir)?;
        if segments.is_empty() {
            let path = segment_path(dir, first_seq);
            create_segment(&path, first_seq, segment_bytes, None).map_err(io_error(&path))?;
            sync_dir(dir).map_err(io_error(dir))?;
            segments.push(Segment { first_seq, path });
        }
        let mut torn = None;
        let mut end = 0;
        let mut next_seq = 0;
        for (i, segment) in segments.iter().enumerate() {
            let bytes = read_file(&segment.path)?;
            check_header(&bytes, segment)?;
            let (found, stop) = scan(&bytes, segment.first_seq);
            let last = found
                .last()
                .map_or(segment.first_seq, |r| r.first_seq + r.count);
            match segments.get(i + 1) {
                Some(following) => {
                    if let Stop::Bad { offset, why } = stop {
                        return Err(corrupt(&segment.path, offset, why));
                    }
                    if last != following.first_seq {
                        let offset = found.last().map_or(SEGMENT_HEADER, |r| r.payload.end);
                        return Err(corrupt(
                            &segment.path,
                            offset,
                            format!(
                                "its records end before sequence {last}, but the next segment starts at {}",
                                following.first_seq
                            ),
                        ));
                    }
                }
                None => {
                    end = found.last().map_or(SEGMENT_HEADER, |r| r.payload.end);
                    next_seq = last;
                    if let Stop::Bad { offset, why } = stop {
                        if let Some(later) = intact_record_after(&bytes, offset) {
                            return Err(corrupt(
                                &segment.path,
                                offset,
                                format!(
                                    "{why}, yet an intact record of a later write follows at byte {later}"
                                ),
                            ));
                        }
                        torn = Some(cut_torn_tail(&segment.path, &bytes, offset)?);
                    }
                }
            }
        }
        let newest = segments.last().map(|s| s.path.clone()).unwrap_or_default();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&newest)
            .map_err(io_error(&newest))?;
        let mut log = Log {
            dir: dir.to_path_buf(),
            segments,
            file,
            end: end as u64,
            next_seq,
            segment_bytes,
            spare: None,
            buffer: Vec::new(),
            failed: false,
            appended_bytes: 0,
        };
        let len = log.file.metadata().map_err(io_error(&newest))?.len();
        if len < segment_bytes {
            // A segment restored from a backup holds only its records: give appends zeros to
            // overwrite again.
            preallocate(&log.file, len, segment_bytes).map_err(io_error(&newest))?;
        }
        log.prepare_spare();
        Ok((log, torn))
    }

    /// The sequence number the next event appended gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Record bytes appended since the log was opened.
    pub fn appended_bytes(&self) -> u64 {
        self.appended_bytes
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The oldest sequence number the log still holds (events before it are in a snapshot).
    pub fn first_seq(&self) -> u64 {
        self.segments.first().map_or(self.next_seq, |s| s.first_seq)
    }

    /// Appends `events`, numbered from [`Log::next_seq`], as one record and makes it durable.
    /// After an error nothing more may be appended to this `Log`: what the failed write left
    /// is only known once the log is opened again.
    pub fn append(&mut self, events: &[&Event]) -> std::io::Result<()> {
        if self.failed {
            return Err(std::io::Error::other(
                "an earlier append to the log failed; it is appended to again once reopened",
            ));
        }
        if events.is_empty() {
            return Ok(());
        }
        let mut record = std::mem::take(&mut self.buffer);
        record.clear();
        record.resize(RECORD_HEADER, 0);
        for event in events {
            codec::put_event(&mut record, event);
        }
        let payload_len = u32::try_from(record.len() - RECORD_HEADER)
            .ok()
            .filter(|&len| (len as usize) <= MAX_RECORD)
            .ok_or_else(|| std::io::Error::other("a log record larger than 1 GiB"))?;
        let count = u32::try_from(events.len())
            .map_err(|_| std::io::Error::other("too many events in one log record"))?;
        record[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        record[4..8].copy_from_slice(&payload_len.to_le_bytes());
        record[8..16].copy_from_slice(&self.next_seq.to_le_bytes());
        record[16..20].copy_from_slice(&count.to_le_bytes());
        let crc = record_crc(&record[..20], &record[RECORD_HEADER..]);
        record[20..24].copy_from_slice(&crc.to_le_bytes());

        let written = (|| {
            if self.end > SEGMENT_HEADER as u64
                && self.end + record.len() as u64 > self.segment_bytes
            {
                self.roll()?;
            }
            self.file.write_all_at(&record, self.end)?;
            self.file.sync_data()
        })();
        self.buffer = record;
        if written.is_err() {
            self.failed = true;
        }
        written?;
        self.end += self.buffer.len() as u64;
        self.appended_bytes += self.buffer.len() as u64;
        self.next_seq += u64::from(count);
        Ok(())
    }

    /// Starts a new segment at the next sequence number; the one before is complete and synced.
    fn roll(&mut self) -> std::io::Result<()> {
        let path = segment_path(&self.dir, self.next_seq);
        let spare = match self.spare.take().map(|prepared| prepared.join()) {
            Some(Ok(Ok(()))) => Some(self.dir.join(SPARE)),
            _ => None,
        };
        create_segment(&path, self.next_seq, self.segment_bytes, spare.as_deref())?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new().read(true).write(true).open(&path)?;
        self.segments.push(Segment {
            first_seq: self.next_seq,
            path,
        });
        self.end = SEGMENT_HEADER as u64;
        self.prepare_spare();
        Ok(())
    }

    fn prepare_spare(&mut self) {
        if self.spare.is_some() {
            return;
        }
        let (path, bytes) = (self.dir.join(SPARE), self.segment_bytes);
        self.spare = std::thread::Builder::new()
            .name("log-spare".into())
            .spawn(move || {
                let file = File::create(&path)?;
                preallocate(&file, 0, bytes)
            })
            .ok();
    }

    /// Deletes the segments that hold only events numbered below `seq` (a verified snapshot has
    /// them). The newest segment always stays.
    pub fn remove_before(&mut self, seq: u64) -> std::io::Result<usize> {
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[1].first_seq <= seq {
            let segment = self.segments.remove(0);
            std::fs::remove_file(&segment.path)?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// Bytes the segments occupy on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.segments
            .iter()
            .filter_map(|s| std::fs::metadata(&s.path).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Calls `apply` with every record's events from sequence `from` on (a record that starts
    /// before it gives only its events from `from`), each with its sequence number.
    pub fn replay_from<E: From<FileError>>(
        &self,
        from: u64,
        apply: impl FnMut(Vec<(u64, Event)>) -> Result<(), E>,
    ) -> Result<(), E> {
        replay_segments(&self.segments, from, apply)
    }
}

/// Every event from sequence `from` on in the log in `dir`, each with its sequence number, read
/// without opening the log for writing: for a reader beside the writer, such as the cluster's
/// publisher catching up at start. A record being appended while it reads is either whole or
/// not seen.
pub fn read_from(dir: &Path, from: u64) -> Result<Vec<(u64, Event)>, FileError> {
    let mut read = Vec::new();
    replay_segments(
        &list_segments(dir)?,
        from,
        |events| -> Result<(), FileError> {
            read.extend(events);
            Ok(())
        },
    )?;
    Ok(read)
}

fn replay_segments<E: From<FileError>>(
    segments: &[Segment],
    from: u64,
    mut apply: impl FnMut(Vec<(u64, Event)>) -> Result<(), E>,
) -> Result<(), E> {
    for (i, segment) in segments.iter().enumerate() {
        let next_first = segments.get(i + 1).map(|s| s.first_seq);
        if next_first.is_some_and(|next| next <= from) {
            continue;
        }
        let bytes = read_file(&segment.path)?;
        let (found, _) = scan(&bytes, segment.first_seq);
        for record in found {
            if record.first_seq + record.count <= from {
                continue;
            }
            let payload = &bytes[record.payload.clone()];
            let mut cursor = codec::Cursor::new(payload);
            let mut events = Vec::new();
            for seq in record.first_seq..record.first_seq + record.count {
                let event = cursor.event().map_err(|e| {
                    corrupt(
                        &segment.path,
                        record.payload.start + e.at,
                        format!("an event of the record at byte {}: {e}", record.offset),
                    )
                })?;
                if seq >= from {
                    events.push((seq, event));
                }
            }
            apply(events)?;
        }
    }
    Ok(())
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.log"))
}

fn list_segments(dir: &Path) -> Result<Vec<Segment>, FileError> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(first_seq) = name
            .strip_suffix(".log")
            .filter(|digits| digits.len() == 20)
            .and_then(|digits| digits.parse().ok())
        else {
            continue;
        };
        segments.push(Segment { first_seq, path });
    }
    segments.sort_by_key(|s| s.first_seq);
    Ok(segments)
}

fn read_file(path: &Path) -> Result<Vec<u8>, FileError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(io_error(path))?;
    Ok(bytes)
}

fn segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER] {
    let mut header = [0; SEGMENT_HEADER];
    header[..16].copy_from_slice(SEGMENT_MAGIC);
    header[16..24].copy_from_slice(&first_seq.to_le_bytes());
    header[24..28].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32fast::hash(&header[..28]);
    header[28..].copy_from_slice(&crc.to_le_bytes());
    header
}

fn check_header(bytes: &[u8], segment: &Segment) -> Result<(), FileError> {
    let expected = segment_header(segment.first_seq);
    match bytes.get(..SEGMENT_HEADER) {
        Some(header) if header == expected => Ok(()),
        Some(header) if header[..16] == SEGMENT_MAGIC[..] && header[24..28] != expected[24..28] => {
            Err(corrupt(
                &segment.path,
                24,
                "written in a log format this version does not read",
            ))
        }
        _ => Err(corrupt(
            &segment.path,
            0,
            format!(
                "its header is not that of a log segment starting at sequence {}",
                segment.first_seq
            ),
        )),
    }
}

/// Creates a segment at `path`: from `spare` (a file of zeros prepared ahead) if given, else
/// from scratch, then writes its header and syncs it.
fn create_segment(
    path: &Path,
    first_seq: u64,
    bytes: u64,
    spare: Option<&Path>,
) -> std::io::Result<()> {
    let tmp = path.with_extension("new");
    match spare {
        Some(spare) => std::fs::rename(spare, &tmp)?,
        None => preallocate(&File::create(&tmp)?, 0, bytes)?,
    }
    let file = OpenOptions::new().write(true).open(&tmp)?;
    file.write_all_at(&segment_header(first_seq), 0)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn preallocate(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1024 * 1024];
    let mut at = from;
    while at < to {
        let n = zeros.len().min((to - at) as usize);
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all()
}

fn record_crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(header);
    crc.update(payload);
    crc.finalize()
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// The record at `offset` if it is intact, whatever its sequence number.
fn record_at(bytes: &[u8], offset: usize) -> Result<Found, String> {
    let header = bytes
        .get(offset..offset + RECORD_HEADER)
        .ok_or("a record header cut short")?;
    if le_u32(header, 0) != RECORD_MAGIC {
        return Err("no record starts here".into());
    }
    let len = le_u32(header, 4) as usize;
    if len > MAX_RECORD {
        return Err(format!("a record claims {len} bytes"));
    }
    let payload = offset + RECORD_HEADER..offset + RECORD_HEADER + len;
    let body = bytes
        .get(payload.clone())
        .ok_or("a record cut short by the end of the file")?;
    if record_crc(&header[..20], body) != le_u32(header, 20) {
        return Err("a record whose checksum does not match".into());
    }
    Ok(Found {
        offset,
        first_seq: le_u64(header, 8),
        count: u64::from(le_u32(header, 16)),
        payload,
    })
}

/// The intact, consecutive records of a segment from its header on, and why they stop.
fn scan(bytes: &[u8], first_seq: u64) -> (Vec<Found>, Stop) {
    let mut found = Vec::new();
    let mut offset = SEGMENT_HEADER;
    let mut expected = first_seq;
    loop {
        match bytes.get(offset..offset + RECORD_HEADER) {
            None if bytes.len() <= offset => return (found, Stop::Clean),
            Some(header) if header.iter().all(|&b| b == 0) => return (found, Stop::Clean),
            _ => {}
        }
        match record_at(bytes, offset) {
            Ok(record) if record.first_seq == expected && record.count > 0 => {
                expected += record.count;
                offset = record.payload.end;
                found.push(record);
            }
            Ok(record) => {
                let why = format!(
                    "a record of sequence {} where {expected} was due",
                    record.first_seq
                );
                return (found, Stop::Bad { offset, why });
            }
            Err(why) => return (found, Stop::Bad { offset, why }),
        }
    }
}

/// The offset of an intact record that starts after `offset`, if there is one.
fn intact_record_after(bytes: &[u8], offset: usize) -> Option<usize> {
    let magic = RECORD_MAGIC.to_le_bytes();
    (offset + 1..bytes.len().saturating_sub(RECORD_HEADER))
        .filter(|&at| bytes[at..at + 4] == magic)
        .find(|&at| record_at(bytes, at).is_ok())
}

/// Overwrites a torn tail with zeros, up to its last non-zero byte, and syncs it.
fn cut_torn_tail(path: &Path, bytes: &[u8], offset: usize) -> Result<TornTail, FileError> {
    let last = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(offset, |i| i + 1);
    let len = last.saturating_sub(offset);
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error(path))?;
    file.write_all_at(&vec![0; len], offset as u64)
        .and_then(|()| file.sync_data())
        .map_err(io_error(path))?;
    Ok(TornTail {
        file: path.to_path_buf(),
        offset: offset as u64,
        bytes: len as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, Source, Subject};

    const SMALL: u64 = 4 * 1024;

    fn event(n: u64) -> Event {
        Event {
            subject: Subject::Phone {
                phone: format!("+49301234{n:04}"),
            },
            source: Source::Lox24,
            kind: Kind::Unsubscribe,
            idempotency_key: format!("lox24:{n}"),
            event_id: Some(n.to_string()),
            event_time_ms: n as i64,
            receive_time_ms: n as i64,
            details: serde_json::Map::new(),
        }
    }

    fn append(log: &mut Log, range: std::ops::Range<u64>) {
        let events: Vec<Event> = range.map(event).collect();
        log.append(&events.iter().collect::<Vec<_>>())
            .expect("append");
    }

    fn replayed(log: &Log, from: u64) -> Vec<u64> {
        let mut seqs = Vec::new();
        log.replay_from::<FileError>(from, |events| {
            for (seq, event) in events {
                assert_eq!(event, super::tests::event(seq), "event {seq}");
                seqs.push(seq);
            }
            Ok(())
        })
        .expect("replay");
        seqs
    }

    fn newest(dir: &Path) -> PathBuf {
        let segments = list_segments(dir).expect("list");
        segments.last().expect("a segment").path.clone()
    }

    #[test]
    fn records_are_numbered_across_segments_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, torn) = Log::open(dir.path(), 1, SMALL).expect("open");
        assert_eq!(torn, None);
        for batch in 0..40 {
            append(&mut log, 1 + batch * 20..1 + (batch + 1) * 20);
        }
        assert_eq!(log.next_seq(), 801);
        assert!(log.segments.len() > 2, "{} segments", log.segments.len());
        drop(log);
        let (log, torn) = Log::open(dir.path(), 1, SMALL).expect("reopen");
        assert_eq!(torn, None);
        assert_eq!(log.next_seq(), 801);
        assert_eq!(replayed(&log, 1), (1..801).collect::<Vec<_>>());
        assert_eq!(replayed(&log, 795), (795..801).collect::<Vec<_>>());
    }

    #[test]
    fn removing_covered_segments_keeps_what_is_not_covered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = Log::open(dir.path(), 1, SMALL).expect("open");
        for batch in 0..40 {
            append(&mut log, 1 + batch * 20..1 + (batch + 1) * 20);
        }
        let segments = log.segments.len();
        let removed = log.remove_before(400).expect("remove");
        assert!(removed > 0 && removed < segments);
        assert!(log.first_seq() <= 400);
        drop(log);
        let (log, _) = Log::open(dir.path(), 1, SMALL).expect("reopen");
        let first = log.first_seq();
        assert_eq!(replayed(&log, first), (first..801).collect::<Vec<_>>());
        assert_eq!(replayed(&log, 400)[0], 400);
    }

    #[test]
    fn a_torn_last_record_is_cut_and_appends_go_on_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = Log::open(dir.path(), 1, SMALL).expect("open");
        append(&mut log, 1..4);
        append(&mut log, 4..6);
        let intact = log.end;
        append(&mut log, 6..9);
        let torn_end = log.end;
        drop(log);
        // The last append reached the disk only in part.
        let file = OpenOptions::new()
            .write(true)
            .open(newest(dir.path()))
            .expect("segment");
        file.write_all_at(&[0; 8], torn_end - 8).expect("tear");
        drop(file);

        let (mut log, torn) = Log::open(dir.path(), 1, SMALL).expect("a torn tail is no error");
        let torn = torn.expect("the torn tail is reported");
        assert_eq!(torn.offset, intact);
        assert_eq!(log.next_seq(), 6);
        append(&mut log, 6..10);
        drop(log);
        let (log, torn) = Log::open(dir.path(), 1, SMALL).expect("reopen");
        assert_eq!(torn, None);
        assert_eq!(replayed(&log, 1), (1..10).collect::<Vec<_>>());
    }

    #[test]
    fn a_damaged_record_before_the_tail_refuses_the_open_naming_file_and_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = Log::open(dir.path(), 1, SMALL).expect("open");
        append(&mut log, 1..4);
        let second = log.end;
        append(&mut log, 4..6);
        append(&mut log, 6..9);
        drop(log);
        let path = newest(dir.path());
        let file = OpenOptions::new().write(true).open(&path).expect("segment");
        file.write_all_at(&[0x55], second + RECORD_HEADER as u64 + 2)
            .expect("flip");
        drop(file);

        match Log::open(dir.path(), 1, SMALL) {
            Err(FileError::Corrupt { file, offset, .. }) => {
                assert_eq!(file, path);
                assert_eq!(offset, second);
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a damaged record in the middle was accepted"),
        }
    }

    #[test]
    fn damage_in_an_older_segment_or_a_missing_segment_refuses_the_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = Log::open(dir.path(), 1, SMALL).expect("open");
        for batch in 0..40 {
            append(&mut log, 1 + batch * 20..1 + (batch + 1) * 20);
        }
        let segments: Vec<PathBuf> = log.segments.iter().map(|s| s.path.clone()).collect();
        drop(log);

        // The last record of an older segment torn: it was synced, so this is damage.
        let bytes = std::fs::read(&segments[0]).expect("read");
        let (found, _) = scan(&bytes, 1);
        let last = found.last().expect("records");
        let file = OpenOptions::new()
            .write(true)
            .open(&segments[0])
            .expect("segment");
        file.write_all_at(&[0; 4], last.payload.end as u64 - 4)
            .expect("tear");
        drop(file);
        let refused = Log::open(dir.path(), 1, SMALL).err().expect("refused");
        assert!(
            matches!(&refused, FileError::Corrupt { file, .. } if *file == segments[0]),
            "{refused}"
        );
        std::fs::write(&segments[0], &bytes).expect("restore");
        Log::open(dir.path(), 1, SMALL).expect("intact again");

        std::fs::remove_file(&segments[1]).expect("remove");
        let refused = Log::open(dir.path(), 1, SMALL).err().expect("refused");
        assert!(
            refused.to_string().contains("next segment starts"),
            "{refused}"
        );
    }

    #[test]
    fn a_segment_restored_without_its_zeros_takes_appends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = Log::open(dir.path(), 7, SMALL).expect("open");
        append(&mut log, 7..10);
        let end = log.end;
        drop(log);
        let path = newest(dir.path());
        let file = OpenOptions::new().write(true).open(&path).expect("segment");
        file.set_len(end).expect("truncate");
        drop(file);
        let (mut log, torn) = Log::open(dir.path(), 1, SMALL).expect("open");
        assert_eq!(torn, None);
        assert_eq!(log.next_seq(), 10);
        append(&mut log, 10..12);
        assert_eq!(replayed(&log, 7), (7..12).collect::<Vec<_>>());
    }
}
