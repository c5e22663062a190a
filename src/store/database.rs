//! The sled database as one unit that can be closed and opened again while the service runs.
//!
//! After a failed write (a full disk, an I/O error) sled refuses every later write until it is
//! reopened: its error is sticky. Without reopening, a disk that filled up and was then cleared
//! would leave the service answering 500 to every delivery until someone restarted it. So the
//! handles live in a [`Slot`]: the syncer empties it, waits for every reader to let go, opens the
//! database again and recovers it exactly as a start does (see [`super::recovery`]), and puts
//! the new one in. Nobody holds a [`Database`] for longer than one operation, except an export
//! or a snapshot being written, which a reopen waits for.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::StoreError;

/// An open sled database and its one tree.
pub(super) struct Database {
    pub db: sled::Db,
    pub tree: sled::Tree,
    /// sled's log file; its flush only does `sync_file_range`, so we fsync it ourselves.
    log_file: File,
}

impl Database {
    /// Opens sled in `dir` (the store's `db/` directory).
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Database, StoreError> {
        let db = open_sled(dir, cache_bytes)?;
        let tree = db
            .open_tree("suppressions")
            .map_err(|e| classify_open_error(dir, e))?;
        let log_file = File::open(dir.join("db")).map_err(|source| StoreError::Open {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Database { db, tree, log_file })
    }

    /// Makes everything applied so far durable on sled's own: flush, then fsync its log.
    pub fn make_durable(&self) -> std::io::Result<()> {
        self.db.flush().map_err(std::io::Error::other)?;
        self.log_file.sync_data()
    }
}

enum State {
    Open(Arc<Database>),
    /// Closed on purpose; a new one is being opened.
    Reopening,
    /// The last attempt to open it again failed, for this reason.
    Down(String),
}

/// Where the current [`Database`] lives.
pub(super) struct Slot {
    state: RwLock<State>,
}

impl Slot {
    /// A slot whose database is still being opened.
    pub fn empty() -> Slot {
        Slot {
            state: RwLock::new(State::Reopening),
        }
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set(&self, state: State) -> State {
        let mut guard = self
            .state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::replace(&mut *guard, state)
    }

    /// The open database, for one operation.
    pub fn get(&self) -> Result<Arc<Database>, StoreError> {
        match &*self.state() {
            State::Open(database) => Ok(database.clone()),
            State::Reopening => Err(StoreError::Reopening),
            State::Down(reason) => Err(StoreError::Unavailable(reason.clone())),
        }
    }

    /// Like [`Slot::get`], but waits up to `patience` while a reopen is under way: for the
    /// committer, whose callers would rather be answered late than refused.
    pub fn wait(&self, patience: Duration) -> Result<Arc<Database>, StoreError> {
        let deadline = Instant::now() + patience;
        loop {
            match self.get() {
                Err(StoreError::Reopening) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(StoreError::Reopening) => {
                    return Err(StoreError::Unavailable(format!(
                        "the database was still being reopened after {patience:?}"
                    )))
                }
                other => return other,
            }
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(&*self.state(), State::Open(_))
    }

    pub fn is_reopening(&self) -> bool {
        matches!(&*self.state(), State::Reopening)
    }

    /// Takes the database out for a reopen, once nobody else holds it. Readers meanwhile get
    /// [`StoreError::Reopening`]. If someone still holds it after `patience` (a long export),
    /// it is put back and `Err` says so. `Ok(None)`: there was no open database to take.
    pub fn take(&self, patience: Duration) -> Result<Option<Database>, StoreError> {
        let mut database = match self.set(State::Reopening) {
            State::Open(database) => database,
            State::Reopening | State::Down(_) => return Ok(None),
        };
        let deadline = Instant::now() + patience;
        loop {
            match Arc::try_unwrap(database) {
                Ok(database) => return Ok(Some(database)),
                Err(shared) if Instant::now() >= deadline => {
                    self.set(State::Open(shared));
                    return Err(StoreError::Unavailable(format!(
                        "the database was still in use (an export?) after {patience:?}; the reopen is retried later"
                    )));
                }
                Err(shared) => {
                    database = shared;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    pub fn install(&self, database: Database) {
        self.set(State::Open(Arc::new(database)));
    }

    pub fn fail(&self, reason: String) {
        self.set(State::Down(reason));
    }
}

fn open_sled(path: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let sled_config = sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .flush_every_ms(Some(500));
    // A torn or corrupt log can make sled panic instead of returning an error; either way the
    // operator gets one line saying the database is corrupt, not a backtrace. Only this thread's
    // panic message is kept quiet: a reopen runs while the rest of the service is serving.
    silence_panics_of_opening_threads();
    OPENING_SLED.with(|opening| opening.set(true));
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sled_config.open()));
    OPENING_SLED.with(|opening| opening.set(false));
    match opened {
        Ok(result) => result.map_err(|e| classify_open_error(path, e)),
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "sled panicked while recovering".into());
            Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail,
            })
        }
    }
}

thread_local! {
    static OPENING_SLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs, once, a panic hook that stays silent for a thread inside [`open_sled`] and
/// otherwise does what the hook before it did.
fn silence_panics_of_opening_threads() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !OPENING_SLED.with(|opening| opening.get()) {
                previous(info);
            }
        }));
    });
}

fn classify_open_error(path: &Path, error: sled::Error) -> StoreError {
    let path = path.to_path_buf();
    match error {
        sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
            StoreError::Locked { path }
        }
        sled::Error::Io(source) => StoreError::Open { path, source },
        other => StoreError::Corrupt {
            path,
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reopen_waits_for_readers_and_then_finds_the_files_unlocked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let slot = Slot::empty();
        slot.install(Database::open(dir.path(), 1 << 20).expect("open"));
        let reader = slot.get().expect("open");

        let refused = slot.take(Duration::from_millis(50));
        assert!(matches!(refused, Err(StoreError::Unavailable(_))));
        assert!(
            slot.is_open(),
            "a reopen that cannot proceed puts the database back"
        );

        drop(reader);
        let taken = slot
            .take(Duration::from_millis(50))
            .expect("no readers left");
        assert!(taken.is_some());
        assert!(matches!(slot.get(), Err(StoreError::Reopening)));
        drop(taken);
        // As in the syncer's reopen: sled's threads let go of the lock shortly after.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let reopened = loop {
            match Database::open(dir.path(), 1 << 20) {
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other.expect("sled let go of its lock"),
            }
        };
        slot.install(reopened);
        assert!(slot.is_open());
    }
}
