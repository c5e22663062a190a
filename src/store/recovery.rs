//! Opening the store, at start and after a storage failure alike: the log and the newest snapshot
//! say what the list is, and sled is brought to agree with them before anything is served.
//!
//! 1. The log is opened and checked ([`Log::open`]): a torn tail is cut, damage refuses the open.
//! 2. sled is opened. If it opens, carries a [`Stamp`] and the log holds every event after the
//!    stamp, the log's tail is replayed into it (a catch-up), and one scan of its records builds
//!    the in-memory views and counts the records against the stamp.
//! 3. Otherwise — sled fails to open, has no stamp though events exist, stopped before the log's
//!    first event, or lost records — its directory is moved aside (`db.broken-<unix time>`, only
//!    the latest kept) and it is rebuilt from the newest verified snapshot and the log.
//!
//! A sled ahead of the log is refused rather than rebuilt: sled is only written after the log is
//! synced, so the log must have lost acknowledged events, and rebuilding would forget them.
//!
//! Data directories from before the log existed (a `wal` file and no `log/`) are moved to it
//! once: the old write-ahead log is replayed, a snapshot of everything is written, and the log
//! starts after it.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::apply::{self, Plan, Planner, Tally, View, Views};
use super::database::Database;
use super::files::{io_error, sync_dir, FileError};
use super::index::IndexBuilder;
use super::keys::{phone_of_record_key, stamp_key, Stamp, RECORD};
use super::log::Log;
use super::snapshotter::write_verified;
use super::{legacy_wal, record, snapshot, StoreConfig, StoreError};
use crate::metrics::Metrics;

/// Writes planned before a replay or rebuild writes them to sled in one batch.
const REPLAY_BATCH: usize = 20_000;
/// sled releases its file lock once its background threads have wound down.
const LOCK_PATIENCE: Duration = Duration::from_secs(5);

/// The store as opened: the log to append to, sled agreeing with it, and how far both are.
pub(super) struct Opened {
    pub log: Log,
    pub database: Database,
    pub stamp: Stamp,
    /// The sequence the newest snapshot holds everything below (1 when there is none).
    pub snapshot_seq: u64,
}

/// Opens the store in `config.dir` and fills `views` from it.
pub(super) fn open(
    config: &StoreConfig,
    planner: &Planner,
    views: &Views,
    metrics: &Metrics,
) -> Result<Opened, StoreError> {
    std::fs::create_dir_all(&config.dir).map_err(|source| StoreError::Open {
        path: config.dir.clone(),
        source,
    })?;
    if !config.log_dir().exists() {
        migrate_legacy(config, planner)?;
    }
    let snapshots = snapshot::list_and_tidy(&config.snapshot_dir())?;
    let snapshot_seq = snapshots.first().map_or(1, |s| s.next_seq);
    let (log, torn) = Log::open(&config.log_dir(), snapshot_seq, config.segment_bytes)?;
    if let Some(torn) = torn {
        tracing::warn!(
            file = %torn.file.display(),
            offset = torn.offset,
            bytes = torn.bytes,
            "the log ended in a torn record (a crash during a write that was never acknowledged); it was cut off"
        );
    }
    check_log_against_snapshot(&log, snapshot_seq, snapshots.first())?;

    let started = Instant::now();
    let why = match open_sled(config) {
        Ok(database) => match catch_up(&database, &log, planner, views)? {
            CatchUp::Done(stamp) => {
                tracing::info!(
                    applied = stamp.applied,
                    suppressed_phones = views.phones.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "store opened"
                );
                return Ok(Opened {
                    log,
                    database,
                    stamp,
                    snapshot_seq,
                });
            }
            CatchUp::Behind(why) => {
                drop(database);
                why
            }
        },
        Err(StoreError::Locked { path }) => return Err(StoreError::Locked { path }),
        Err(e) => format!("sled does not open ({e})"),
    };
    tracing::warn!("rebuilding the database from the snapshot and the log: {why}");
    move_aside(config)?;
    let database = open_sled(config)?;
    let stamp = rebuild(&database, &log, &snapshots, planner, views)?;
    database.make_durable()?;
    metrics.store_rebuilt();
    tracing::warn!(
        reason = %why,
        applied = stamp.applied,
        records = stamp.records,
        suppressed_phones = views.phones.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "database rebuilt from the snapshot and the log"
    );
    Ok(Opened {
        log,
        database,
        stamp,
        snapshot_seq,
    })
}

/// The log must hold every event the newest snapshot does not, and the snapshot nothing the
/// log has not seen.
fn check_log_against_snapshot(
    log: &Log,
    snapshot_seq: u64,
    newest: Option<&snapshot::SnapshotFile>,
) -> Result<(), StoreError> {
    let gap = log.first_seq() > snapshot_seq;
    let beyond = snapshot_seq > log.next_seq();
    if !gap && !beyond {
        return Ok(());
    }
    let source = newest.map_or_else(
        || "no snapshot".to_string(),
        |s| s.path.display().to_string(),
    );
    Err(StoreError::Corrupt {
        path: log_dir_of(log),
        detail: format!(
            "the log holds events {} to {}, but {source} holds those below {snapshot_seq}: {}",
            log.first_seq(),
            log.next_seq().saturating_sub(1),
            if gap {
                "the events between are in neither"
            } else {
                "the log lost events the snapshot has"
            }
        ),
    })
}

fn log_dir_of(log: &Log) -> PathBuf {
    log.dir().to_path_buf()
}

fn open_sled(config: &StoreConfig) -> Result<Database, StoreError> {
    let dir = config.sled_dir();
    std::fs::create_dir_all(&dir).map_err(|source| StoreError::Open {
        path: dir.clone(),
        source,
    })?;
    let deadline = Instant::now() + LOCK_PATIENCE;
    loop {
        match Database::open(&dir, config.cache_bytes) {
            // A reopen follows a close whose threads may still hold the lock for a moment.
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

enum CatchUp {
    Done(Stamp),
    /// sled cannot be brought up to date from the log, for this reason.
    Behind(String),
}

fn catch_up(
    database: &Database,
    log: &Log,
    planner: &Planner,
    views: &Views,
) -> Result<CatchUp, StoreError> {
    let stored = database.tree.get(stamp_key())?;
    let stamp = match stored.as_deref().map(Stamp::decode) {
        Some(Some(stamp)) => stamp,
        Some(None) => return Ok(CatchUp::Behind("its stamp is unreadable".into())),
        None if log.next_seq() <= 1 && database.tree.first()?.is_none() => Stamp::default(),
        None => {
            return Ok(CatchUp::Behind(format!(
                "it says nothing about how far it got ({} records), while the log and the snapshot hold {} events",
                database.tree.scan_prefix([RECORD]).count(),
                log.next_seq().saturating_sub(1)
            )))
        }
    };
    if stamp.applied + 1 < log.first_seq() {
        return Ok(CatchUp::Behind(format!(
            "it stopped at event {}, before the log's first event {}",
            stamp.applied,
            log.first_seq()
        )));
    }
    if stamp.applied >= log.next_seq() {
        return Err(StoreError::Corrupt {
            path: log.dir().to_path_buf(),
            detail: format!(
                "the log ends at event {} but the database has applied up to {}: acknowledged events are missing from the log",
                log.next_seq().saturating_sub(1),
                stamp.applied
            ),
        });
    }
    let mut stamp = stamp;
    let replayed = replay_log(database, log, stamp.applied + 1, planner, &mut stamp)?;
    if replayed > 0 {
        tracing::info!(
            events = replayed,
            "replayed the log's tail into the database"
        );
    }
    Ok(match build_views(database, views, &stamp)? {
        Ok(()) => CatchUp::Done(stamp),
        Err(why) => CatchUp::Behind(why),
    })
}

/// Replays the log from `from` into the tree; returns how many events it replayed.
fn replay_log(
    database: &Database,
    log: &Log,
    from: u64,
    planner: &Planner,
    stamp: &mut Stamp,
) -> Result<u64, StoreError> {
    let views = Views::new();
    let mut plan = Plan::default();
    let mut last = None;
    let mut replayed = 0;
    log.replay_from(from, |events| -> Result<(), StoreError> {
        for (seq, event) in events {
            let view = View {
                tree: Some(&database.tree),
                in_flight: &[],
            };
            planner.replay(&view, &mut plan, seq, &event)?;
            last = Some(seq);
            replayed += 1;
        }
        if plan.writes_len() >= REPLAY_BATCH {
            if let Some(seq) = last {
                apply::write(&database.tree, &views, &[&plan], stamp, seq)?;
            }
            plan = Plan::default();
        }
        Ok(())
    })?;
    if let Some(seq) = last {
        apply::write(&database.tree, &views, &[&plan], stamp, seq)?;
    }
    Ok(replayed)
}

/// One pass over every record fills the phone index and the account count, and checks that the
/// tree holds as many records as its stamp says: `Err(why)` inside when it does not.
fn build_views(
    database: &Database,
    views: &Views,
    stamp: &Stamp,
) -> Result<Result<(), String>, StoreError> {
    let started = Instant::now();
    let mut phones = IndexBuilder::new();
    let mut accounts = 0;
    let mut records = 0u64;
    for entry in database.tree.scan_prefix([RECORD]) {
        let (key, value) = entry?;
        records += 1;
        match phone_of_record_key(&key) {
            Some(number) => phones.add(number, &value),
            None => accounts += i64::from(record::decode_status(&value)?.suppressed),
        }
    }
    if records != stamp.records {
        return Ok(Err(format!(
            "it holds {records} records where its stamp says {}",
            stamp.records
        )));
    }
    views.phones.replace(phones.build());
    views.hot.clear();
    views.suppressed_accounts.store(accounts, Ordering::Relaxed);
    tracing::debug!(
        records,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "in-memory views built"
    );
    Ok(Ok(()))
}

/// Moves sled's directory to `db.broken-<unix time>`, removing an older one.
fn move_aside(config: &StoreConfig) -> Result<(), StoreError> {
    let dir = config.sled_dir();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Open { path, source }
    };
    for entry in std::fs::read_dir(&config.dir).map_err(io(&config.dir))? {
        let path = entry.map_err(io(&config.dir))?.path();
        let broken = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("db.broken-"));
        if broken {
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        }
    }
    if dir.exists() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = config.dir.join(format!("db.broken-{now}"));
        std::fs::rename(&dir, &aside).map_err(io(&dir))?;
        tracing::warn!(moved_to = %aside.display(), "the old database was kept aside");
    }
    sync_dir(&config.dir).map_err(io(&config.dir))?;
    Ok(())
}

/// Fills the empty `database` from the newest snapshot that reads back whole and the log after
/// it, and the in-memory views from what it wrote. The stamp is written only once everything is
/// in, so a crash during a rebuild leaves a tree without one, which the next open rebuilds again.
fn rebuild(
    database: &Database,
    log: &Log,
    snapshots: &[snapshot::SnapshotFile],
    planner: &Planner,
    views: &Views,
) -> Result<Stamp, StoreError> {
    let mut tally = Tally::default();
    let mut from = log.first_seq();
    let mut damaged: Option<FileError> = None;
    for file in snapshots {
        if file.next_seq < log.first_seq() {
            break;
        }
        if let Err(e) = snapshot::Reader::open(&file.path).and_then(snapshot::Reader::verify) {
            tracing::error!(
                "snapshot {} is damaged, trying an older one: {e}",
                file.path.display()
            );
            damaged.get_or_insert(e);
            continue;
        }
        let subjects = replay_snapshot(database, &file.path, planner, &mut tally)?;
        tracing::info!(
            subjects,
            file = %file.path.display(),
            "the snapshot is in the rebuilt database"
        );
        from = file.next_seq;
        damaged = None;
        break;
    }
    if let Some(damage) = damaged {
        // Every snapshot the log depends on is damaged: what it held exists nowhere else.
        return Err(damage.into());
    }
    let events = replay_log_pipelined(database, log, from, planner, &mut tally, REPLAY_BATCH)?;
    let mut stamp = Stamp {
        applied: 0,
        records: tally.records,
    };
    apply::write(
        &database.tree,
        &Views::new(),
        &[],
        &mut stamp,
        from.saturating_sub(1) + events,
    )?;
    views
        .suppressed_accounts
        .store(tally.suppressed_accounts, Ordering::Relaxed);
    views.phones.replace(tally.phone_index());
    views.hot.clear();
    Ok(stamp)
}

/// Replays a verified snapshot into the empty `database` in two threads: one reads and plans
/// (against an empty tree: see [`View::tree`]), the other writes to sled, which is the slower
/// half. Returns how many subjects it held.
fn replay_snapshot(
    database: &Database,
    path: &Path,
    planner: &Planner,
    tally: &mut Tally,
) -> Result<u64, StoreError> {
    let (plans, planned) = std::sync::mpsc::sync_channel::<Plan>(4);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Result<u64, StoreError> {
            let view = View {
                tree: None,
                in_flight: &[],
            };
            let mut plan = Plan::default();
            let mut subjects = 0u64;
            for subject in snapshot::Reader::open(path)? {
                let (_, mut events) = subject?;
                // In the order the rules take them, each is planned on top of the ones before
                // instead of by a replay of all.
                events.sort_by(|a, b| record::rule_order(&a.1).cmp(&record::rule_order(&b.1)));
                for (seq, event) in &events {
                    planner.replay(&view, &mut plan, *seq, event)?;
                }
                subjects += 1;
                if plan.writes_len() >= REPLAY_BATCH
                    && plans.send(std::mem::take(&mut plan)).is_err()
                {
                    // The writer stopped on an error, which it reports.
                    return Ok(subjects);
                }
            }
            // A failed send means the writer stopped on an error, which it reports.
            plans.send(plan).ok();
            Ok(subjects)
        });
        let mut written = Ok(());
        for plan in planned.iter() {
            written = apply::insert_unstamped(&database.tree, &plan, tally);
            if written.is_err() {
                break;
            }
        }
        // Ends the reader if it is still sending.
        drop(planned);
        let subjects = reader
            .join()
            .map_err(|_| StoreError::Unavailable("the rebuild's reader panicked".into()))??;
        written?;
        Ok(subjects)
    })
}

/// Replays the log from `from` into a tree being rebuilt, planning in this thread while another
/// writes the previous plan: the planner reads the tree through the plans not yet written
/// ([`View::in_flight`]), and the writer drops a plan from them only once it is all in the tree.
/// Hands plans of about `batch` writes over. Returns how many events it replayed.
fn replay_log_pipelined(
    database: &Database,
    log: &Log,
    from: u64,
    planner: &Planner,
    tally: &mut Tally,
    batch: usize,
) -> Result<u64, StoreError> {
    let in_flight: Mutex<Vec<Arc<Plan>>> = Mutex::new(Vec::new());
    let pending = || {
        in_flight
            .lock()
            .map_or_else(|p| p.into_inner().clone(), |g| g.clone())
    };
    let (plans, planned) = std::sync::mpsc::sync_channel::<Arc<Plan>>(2);
    std::thread::scope(|scope| {
        let (tree, written_plans) = (&database.tree, &in_flight);
        let writer = scope.spawn(move || -> Result<(), StoreError> {
            for plan in planned.iter() {
                apply::insert_unstamped(tree, &plan, tally)?;
                let mut in_flight = written_plans.lock().unwrap_or_else(|p| p.into_inner());
                if !in_flight.is_empty() {
                    in_flight.remove(0);
                }
            }
            Ok(())
        });
        let mut plan = Plan::default();
        let mut replayed = 0;
        let writer_gone = std::cell::Cell::new(false);
        let hand_over = |plan: Plan| {
            let plan = Arc::new(plan);
            in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(plan.clone());
            // A failed send means the writer stopped on an error, which it reports.
            if plans.send(plan).is_err() {
                writer_gone.set(true);
            }
        };
        let planned_all = log.replay_from(from, |events| -> Result<(), StoreError> {
            let mut seen = pending();
            for (seq, event) in events {
                if writer_gone.get() {
                    break;
                }
                let view = View {
                    tree: Some(&database.tree),
                    in_flight: &seen,
                };
                planner.replay(&view, &mut plan, seq, &event)?;
                replayed += 1;
                if plan.writes_len() >= batch {
                    hand_over(std::mem::take(&mut plan));
                    seen = pending();
                }
            }
            Ok(())
        });
        if planned_all.is_ok() && !writer_gone.get() {
            hand_over(plan);
        }
        drop(plans);
        let written = writer
            .join()
            .map_err(|_| StoreError::Unavailable("the rebuild's writer panicked".into()))?;
        planned_all?;
        written?;
        Ok(replayed)
    })
}

/// Moves a data directory written before the log existed onto the log: replays its old
/// write-ahead log into sled, stamps sled, writes a snapshot of everything and starts the log
/// after it. Each step can be redone if a crash interrupts the next.
fn migrate_legacy(config: &StoreConfig, planner: &Planner) -> Result<(), StoreError> {
    let wal = config.dir.join("wal");
    let sled_log = config.sled_dir().join("db");
    if !wal.exists() && !sled_log.exists() {
        return Ok(());
    }
    if !sled_log.exists() {
        return Err(StoreError::Corrupt {
            path: config.sled_dir(),
            detail: format!(
                "its log file {} is missing, but {} shows this data directory held a database, and there is no log to rebuild it from",
                sled_log.display(),
                wal.display()
            ),
        });
    }
    tracing::warn!("this data directory predates the log; moving it onto the log");
    let database = open_sled(config)?;
    let batches = match legacy_wal::read(&wal) {
        Ok(batches) => batches,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(StoreError::Open { path: wal, source }),
    };
    let mut plan = Plan::starting_at(database.db.generate_id()? + 1);
    for events in &batches {
        let view = View {
            tree: Some(&database.tree),
            in_flight: &[],
        };
        planner.plan(&view, &mut plan, events)?;
    }
    let next_seq = plan.next_seq();
    let records = database.tree.scan_prefix([RECORD]).count() as u64;
    let mut stamp = Stamp {
        applied: 0,
        records,
    };
    apply::write(
        &database.tree,
        &Views::new(),
        &[&plan],
        &mut stamp,
        next_seq - 1,
    )?;
    database.make_durable()?;
    let (_, summary) = write_verified(
        std::sync::Arc::new(database),
        &config.snapshot_dir(),
        next_seq,
        || true,
    )?;
    Log::open(&config.log_dir(), next_seq, config.segment_bytes)?;
    if wal.exists() {
        std::fs::remove_file(&wal).map_err(io_error(&wal))?;
        sync_dir(&config.dir).map_err(io_error(&config.dir))?;
    }
    tracing::warn!(
        subjects = summary.subjects,
        events = summary.entries,
        "the data directory is on the log now"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Kind, Source, Subject};
    use crate::store::apply::dump;
    use crate::store::record::Rules;

    fn event(phone: &str, source: Source, kind: Kind, key: &str, time_ms: i64) -> Event {
        let mut event = Event {
            subject: Subject::Phone {
                phone: phone.into(),
            },
            source,
            kind,
            idempotency_key: key.into(),
            event_id: None,
            event_time_ms: time_ms,
            receive_time_ms: time_ms,
            details: Default::default(),
        };
        if kind == Kind::Lift {
            event
                .details
                .insert("note".into(), "consent form 17".into());
        }
        event
    }

    /// A rebuild plans each batch while the one before is still being written, so every event
    /// that depends on an earlier one (a redelivery, a lift, a lost streak) reads it from a plan
    /// in flight or from the tree. With one event per plan, every such read crosses a batch: the
    /// tree and the index must come out as a replay one batch at a time makes them.
    #[test]
    fn a_pipelined_replay_writes_what_a_sequential_one_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = Log::open(&dir.path().join("log"), 1, 1 << 20).expect("log");
        let phones = ["+4930100011", "+4930100012", "+4930100013"];
        let mut events = Vec::new();
        for round in 0..4i64 {
            for (i, phone) in phones.iter().enumerate() {
                let t = round * 10 + i as i64;
                let (source, kind) = match (round, i) {
                    (1, 0) => (Source::Manual, Kind::Lift),
                    (_, 1) => (Source::Sendios, Kind::SmsLost),
                    (3, 2) => (Source::Manual, Kind::Lift),
                    _ => (Source::Lox24, Kind::Unsubscribe),
                };
                events.push(event(phone, source, kind, &format!("k:{round}:{i}"), t));
            }
        }
        for event in &events {
            log.append(&[event]).expect("append");
        }
        let planner = Planner {
            rules: Rules { lost_threshold: 3 },
        };

        let sequential = Database::open(&dir.path().join("a"), 1 << 20).expect("sled");
        let mut stamp = Stamp::default();
        replay_log(&sequential, &log, 1, &planner, &mut stamp).expect("sequential replay");

        let pipelined = Database::open(&dir.path().join("b"), 1 << 20).expect("sled");
        let mut tally = Tally::default();
        let replayed = replay_log_pipelined(&pipelined, &log, 1, &planner, &mut tally, 1)
            .expect("pipelined replay");
        assert_eq!(replayed, events.len() as u64);
        assert_eq!(tally.records, stamp.records);

        let without_stamp = |tree: &sled::Tree| {
            let mut entries = dump(tree);
            entries.retain(|(key, _)| key.as_slice() != stamp_key());
            entries
        };
        assert_eq!(
            without_stamp(&sequential.tree),
            without_stamp(&pipelined.tree)
        );
        let index = tally.phone_index();
        let views = Views::new();
        build_views(&sequential, &views, &stamp)
            .expect("scan")
            .expect("counts agree");
        for phone in phones {
            let digits = crate::phone::e164_digits(phone).expect("digits");
            assert_eq!(
                index.status(digits),
                views.phones.status(digits),
                "{phone} in the index"
            );
        }
        // The first number was lifted, then unsubscribed again; the third ends lifted.
        let suppressed = |phone| {
            let digits = crate::phone::e164_digits(phone).expect("digits");
            index.status(digits).suppressed
        };
        assert!(suppressed(phones[0]));
        assert!(!suppressed(phones[2]));
    }
}
