//! Snapshot files: every subject's history as it stood at one sequence number, so that the log
//! before it can be removed and sled rebuilt without it.
//!
//! A snapshot holds events only. A record is a replay of its history (see
//! [`super::apply`]), so a rebuild computes each record, and every key it is stored under,
//! from the events; the file does not depend on sled's layout.
//!
//! A snapshot is written to a temporary file, synced, renamed into place and its directory
//! synced; it counts as verified once it has been read back whole. The reader checks every
//! frame's checksum and the trailer's counts, so damage is an error naming the file and offset.
//!
//! Layout of `snapshots/<sequence, 20 digits>.snap`, holding every event numbered below that
//! sequence: a 48-byte header (`SUPPRESSD SNAP` magic, format version, sequence, creation time
//! in Unix ms, CRC-32 of the header); frames of up to ~1 MiB, each a 12-byte header (payload
//! length, subjects in it, CRC-32 of both and the payload) and its subjects, each a subject,
//! an entry count and the entries (sequence, then the event body, see [`super::codec`]), in
//! key order; an empty frame header; a 24-byte trailer (subjects, entries, CRC-32 and `SEND`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::codec;
use super::files::{corrupt, io_error, sync_dir, FileError};
use crate::event::{Event, Subject};

const MAGIC: &[u8; 16] = b"SUPPRESSD SNAP\0\0";
const FORMAT_VERSION: u32 = 1;
const HEADER: usize = 48;
const FRAME_HEADER: usize = 12;
const TRAILER: usize = 24;
const TRAILER_MAGIC: &[u8; 4] = b"SEND";
const FRAME_TARGET: usize = 1 << 20;
/// A frame claiming more than this is damage.
const MAX_FRAME: usize = 1 << 30;

/// One subject as a snapshot holds it: its events in arrival order, each with its sequence.
pub type SubjectHistory = (Subject, Vec<(u64, Event)>);

/// A snapshot file and the sequence it holds everything below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    pub next_seq: u64,
    pub path: PathBuf,
}

/// What reading a snapshot back found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub subjects: u64,
    pub entries: u64,
    pub bytes: u64,
}

pub fn path_for(dir: &Path, next_seq: u64) -> PathBuf {
    dir.join(format!("{next_seq:020}.snap"))
}

/// The snapshots in `dir`, newest first.
pub fn list(dir: &Path) -> Result<Vec<SnapshotFile>, FileError> {
    list_and_tidy_if(dir, false)
}

/// Like [`list`], and removes the temporary files of writes a crash interrupted: for an open,
/// when no write can be under way.
pub fn list_and_tidy(dir: &Path) -> Result<Vec<SnapshotFile>, FileError> {
    list_and_tidy_if(dir, true)
}

fn list_and_tidy_if(dir: &Path, tidy: bool) -> Result<Vec<SnapshotFile>, FileError> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io_error(dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io_error(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(".tmp") {
            if tidy {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        let Some(next_seq) = name
            .strip_suffix(".snap")
            .filter(|digits| digits.len() == 20)
            .and_then(|digits| digits.parse().ok())
        else {
            continue;
        };
        found.push(SnapshotFile { next_seq, path });
    }
    found.sort_by_key(|s| std::cmp::Reverse(s.next_seq));
    Ok(found)
}

/// Writes the snapshot of `subjects` (every event numbered below `next_seq`, in key order)
/// into `dir` and makes it durable. Returns the file and the bytes written; `keep_going` is
/// asked between frames and ends the write (an `Err`) when it says no.
pub fn write<E: From<FileError>>(
    dir: &Path,
    next_seq: u64,
    subjects: impl Iterator<Item = Result<SubjectHistory, E>>,
    keep_going: impl Fn() -> bool,
) -> Result<(SnapshotFile, Summary), E> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let path = path_for(dir, next_seq);
    let tmp = path.with_extension("tmp");
    let file = File::create(&tmp).map_err(io_error(&tmp))?;
    let mut out = BufWriter::with_capacity(FRAME_TARGET + FRAME_HEADER, file);
    let mut header = [0u8; HEADER];
    header[..16].copy_from_slice(MAGIC);
    header[16..20].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[24..32].copy_from_slice(&next_seq.to_le_bytes());
    header[32..40].copy_from_slice(&crate::event::now_ms().to_le_bytes());
    let crc = crc32fast::hash(&header[..44]);
    header[44..].copy_from_slice(&crc.to_le_bytes());
    out.write_all(&header).map_err(io_error(&tmp))?;

    let mut summary = Summary {
        subjects: 0,
        entries: 0,
        bytes: HEADER as u64,
    };
    let mut frame = Vec::with_capacity(FRAME_TARGET + 4096);
    let mut in_frame = 0u32;
    let written = (|| -> Result<(), E> {
        for subject in subjects {
            let (subject, entries) = subject?;
            codec::put_subject(&mut frame, &subject);
            codec::put_varint(&mut frame, entries.len() as u64);
            for (seq, event) in &entries {
                codec::put_varint(&mut frame, *seq);
                codec::put_body(&mut frame, event);
            }
            in_frame += 1;
            summary.subjects += 1;
            summary.entries += entries.len() as u64;
            if frame.len() >= FRAME_TARGET {
                summary.bytes += put_frame(&mut out, &frame, in_frame).map_err(io_error(&tmp))?;
                frame.clear();
                in_frame = 0;
                if !keep_going() {
                    return Err(E::from(FileError::Io {
                        path: tmp.clone(),
                        source: std::io::Error::other("the snapshot was abandoned"),
                    }));
                }
            }
        }
        if in_frame > 0 {
            summary.bytes += put_frame(&mut out, &frame, in_frame).map_err(io_error(&tmp))?;
        }
        summary.bytes += put_frame(&mut out, &[], 0).map_err(io_error(&tmp))?;
        let mut trailer = [0u8; TRAILER];
        trailer[..8].copy_from_slice(&summary.subjects.to_le_bytes());
        trailer[8..16].copy_from_slice(&summary.entries.to_le_bytes());
        let crc = crc32fast::hash(&trailer[..16]);
        trailer[16..20].copy_from_slice(&crc.to_le_bytes());
        trailer[20..].copy_from_slice(TRAILER_MAGIC);
        out.write_all(&trailer).map_err(io_error(&tmp))?;
        summary.bytes += TRAILER as u64;
        let file = out
            .into_inner()
            .map_err(|e| io_error(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io_error(&tmp))?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &path).map_err(io_error(&path))?;
    sync_dir(dir).map_err(io_error(dir))?;
    Ok((SnapshotFile { next_seq, path }, summary))
}

fn put_frame(out: &mut impl Write, payload: &[u8], subjects: u32) -> std::io::Result<u64> {
    let mut header = [0u8; FRAME_HEADER];
    header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[4..8].copy_from_slice(&subjects.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[..8]);
    crc.update(payload);
    header[8..].copy_from_slice(&crc.finalize().to_le_bytes());
    out.write_all(&header)?;
    out.write_all(payload)?;
    Ok((FRAME_HEADER + payload.len()) as u64)
}

/// Reads a snapshot subject by subject, checking as it goes.
pub struct Reader {
    path: PathBuf,
    input: BufReader<File>,
    pub next_seq: u64,
    /// File offset of the frame in `frame`.
    frame_offset: u64,
    frame: Vec<u8>,
    at: usize,
    left_in_frame: u32,
    /// File offset of the next frame header.
    offset: u64,
    seen: Summary,
    done: bool,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Reader, FileError> {
        let file = File::open(path).map_err(io_error(path))?;
        let mut input = BufReader::with_capacity(1 << 20, file);
        let mut header = [0u8; HEADER];
        input
            .read_exact(&mut header)
            .map_err(|_| corrupt(path, 0, "shorter than a snapshot header"))?;
        if header[..16] != MAGIC[..]
            || crc32fast::hash(&header[..44]).to_le_bytes()[..] != header[44..]
        {
            return Err(corrupt(path, 0, "its header is not a snapshot's"));
        }
        if header[16..20] != FORMAT_VERSION.to_le_bytes() {
            return Err(corrupt(
                path,
                16,
                "written in a snapshot format this version does not read",
            ));
        }
        let mut next_seq = [0u8; 8];
        next_seq.copy_from_slice(&header[24..32]);
        Ok(Reader {
            path: path.to_path_buf(),
            input,
            next_seq: u64::from_le_bytes(next_seq),
            frame_offset: 0,
            frame: Vec::new(),
            at: 0,
            left_in_frame: 0,
            offset: HEADER as u64,
            seen: Summary {
                subjects: 0,
                entries: 0,
                bytes: HEADER as u64,
            },
            done: false,
        })
    }

    fn damage(&self, offset: u64, detail: impl Into<String>) -> FileError {
        FileError::Corrupt {
            file: self.path.clone(),
            offset,
            detail: detail.into(),
        }
    }

    /// Reads the next frame; `false` at the end frame, once the trailer checked out.
    fn next_frame(&mut self) -> Result<bool, FileError> {
        let mut header = [0u8; FRAME_HEADER];
        self.input
            .read_exact(&mut header)
            .map_err(|_| self.damage(self.offset, "the file ends where a frame was due"))?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let subjects = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_FRAME {
            return Err(self.damage(self.offset, format!("a frame claims {len} bytes")));
        }
        self.frame.resize(len, 0);
        self.input
            .read_exact(&mut self.frame)
            .map_err(|_| self.damage(self.offset, "a frame cut short by the end of the file"))?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header[..8]);
        crc.update(&self.frame);
        if crc.finalize().to_le_bytes()[..] != header[8..] {
            return Err(self.damage(self.offset, "a frame whose checksum does not match"));
        }
        self.frame_offset = self.offset + FRAME_HEADER as u64;
        self.offset = self.frame_offset + len as u64;
        self.seen.bytes = self.offset;
        self.at = 0;
        self.left_in_frame = subjects;
        if len > 0 || subjects > 0 {
            return Ok(true);
        }
        let mut trailer = [0u8; TRAILER];
        self.input
            .read_exact(&mut trailer)
            .map_err(|_| self.damage(self.offset, "the trailer is missing"))?;
        let crc = crc32fast::hash(&trailer[..16]);
        if trailer[20..] != TRAILER_MAGIC[..] || crc.to_le_bytes()[..] != trailer[16..20] {
            return Err(self.damage(self.offset, "the trailer is damaged"));
        }
        let mut counts = [0u8; 8];
        counts.copy_from_slice(&trailer[..8]);
        let subjects = u64::from_le_bytes(counts);
        counts.copy_from_slice(&trailer[8..16]);
        let entries = u64::from_le_bytes(counts);
        if (subjects, entries) != (self.seen.subjects, self.seen.entries) {
            return Err(self.damage(
                self.offset,
                format!(
                    "the trailer counts {subjects} subjects and {entries} entries, the frames {} and {}",
                    self.seen.subjects, self.seen.entries
                ),
            ));
        }
        self.seen.bytes = self.offset + TRAILER as u64;
        Ok(false)
    }

    fn next_subject(&mut self) -> Result<Option<SubjectHistory>, FileError> {
        while self.left_in_frame == 0 {
            if self.at != self.frame.len() {
                return Err(self.damage(
                    self.frame_offset + self.at as u64,
                    "bytes left over after a frame's last subject",
                ));
            }
            if !self.next_frame()? {
                return Ok(None);
            }
        }
        let frame_offset = self.frame_offset;
        let mut cursor = codec::Cursor::new(self.frame.get(self.at..).unwrap_or_default());
        let decoded = (|| {
            let subject = cursor.subject()?;
            let count = cursor.varint("entry count")?;
            let mut entries = Vec::new();
            for _ in 0..count {
                let seq = cursor.varint("sequence")?;
                entries.push((seq, cursor.body(subject.clone())?));
            }
            Ok::<_, codec::DecodeError>((subject, entries))
        })();
        let (subject, entries) = decoded.map_err(|e| {
            self.damage(
                frame_offset + (self.at + e.at) as u64,
                format!("an entry is unreadable: {}", e.what),
            )
        })?;
        if let Some(&(seq, _)) = entries.iter().find(|(seq, _)| *seq >= self.next_seq) {
            return Err(self.damage(
                frame_offset + self.at as u64,
                format!(
                    "an entry numbered {seq}, not below the snapshot's {}",
                    self.next_seq
                ),
            ));
        }
        self.at += cursor.position();
        self.left_in_frame -= 1;
        self.seen.subjects += 1;
        self.seen.entries += entries.len() as u64;
        Ok(Some((subject, entries)))
    }

    /// Reads everything that is left, checking it: what verifying a new snapshot means.
    pub fn verify(mut self) -> Result<Summary, FileError> {
        while self.next_subject()?.is_some() {}
        Ok(self.seen)
    }
}

impl Iterator for Reader {
    type Item = Result<SubjectHistory, FileError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.next_subject().transpose();
        if !matches!(next, Some(Ok(_))) {
            self.done = true;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, Source};

    fn history(n: u64) -> SubjectHistory {
        let subject = Subject::Phone {
            phone: format!("+4930{n:08}"),
        };
        let events = (0..n % 3 + 1)
            .map(|i| {
                let seq = n * 10 + i;
                let event = Event {
                    subject: subject.clone(),
                    source: Source::Lox24,
                    kind: Kind::Unsubscribe,
                    idempotency_key: format!("lox24:{seq}"),
                    event_id: Some(seq.to_string()),
                    event_time_ms: seq as i64,
                    receive_time_ms: seq as i64 + 1,
                    details: serde_json::Map::new(),
                };
                (seq, event)
            })
            .collect();
        (subject, events)
    }

    fn write_many(dir: &Path, subjects: u64) -> (SnapshotFile, Summary) {
        write::<FileError>(
            dir,
            subjects * 10 + 10,
            (0..subjects).map(|n| Ok(history(n))),
            || true,
        )
        .expect("write")
    }

    #[test]
    fn a_snapshot_reads_back_what_was_written_across_frames() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, written) = write_many(dir.path(), 30_000);
        assert_eq!(list(dir.path()).expect("list"), std::slice::from_ref(&file));
        let reader = Reader::open(&file.path).expect("open");
        assert_eq!(reader.next_seq, 300_010);
        let read: Vec<SubjectHistory> = reader.map(|s| s.expect("intact")).collect();
        assert_eq!(read.len(), 30_000);
        assert!(read
            .iter()
            .enumerate()
            .all(|(n, s)| *s == history(n as u64)));
        let verified = Reader::open(&file.path)
            .expect("open")
            .verify()
            .expect("verify");
        assert_eq!(verified, written);
        assert_eq!(
            verified.bytes,
            std::fs::metadata(&file.path).expect("meta").len()
        );
    }

    #[test]
    fn damage_anywhere_is_found_with_its_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, _) = write_many(dir.path(), 30_000);
        let intact = std::fs::read(&file.path).expect("read");
        for at in [
            3,
            50,
            60,
            intact.len() / 2,
            intact.len() - 30,
            intact.len() - 2,
        ] {
            let mut damaged = intact.clone();
            damaged[at] ^= 0x40;
            std::fs::write(&file.path, &damaged).expect("write");
            let verified = Reader::open(&file.path).and_then(Reader::verify);
            match verified {
                Err(FileError::Corrupt { offset, .. }) => {
                    assert!(offset <= at as u64, "damage at {at} reported at {offset}")
                }
                other => panic!("damage at {at}: {other:?}"),
            }
        }
        std::fs::write(&file.path, &intact[..intact.len() - 10]).expect("write");
        assert!(Reader::open(&file.path).and_then(Reader::verify).is_err());
    }

    #[test]
    fn an_abandoned_write_leaves_no_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let abandoned = write::<FileError>(
            dir.path(),
            1_000_000,
            (0..30_000).map(|n| Ok(history(n))),
            || false,
        );
        assert!(abandoned.is_err());
        assert_eq!(list(dir.path()).expect("list"), []);
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }
}
