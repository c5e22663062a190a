//! What the log and the snapshots share about their files: the error that names a damaged
//! file and the offset of the damage, and syncing a directory after a rename or removal.

use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{} is corrupt at byte {offset}: {detail}", file.display())]
    Corrupt {
        file: PathBuf,
        offset: u64,
        detail: String,
    },
    #[error("cannot read or write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn corrupt(path: &Path, offset: usize, detail: impl Into<String>) -> FileError {
    FileError::Corrupt {
        file: path.to_path_buf(),
        offset: offset as u64,
        detail: detail.into(),
    }
}

/// Makes a rename, creation or removal in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
