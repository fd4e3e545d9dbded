//! File-system helpers every on-disk engine needs: the data dir's process lock, durable
//! directory entries, and I/O errors that name their file.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::Path;

use crate::{Error, Result};

/// Takes `dormouse.lock` in the data dir for the life of the returned file, so a second
/// process opening the same dir fails with [`Error::Locked`] before touching anything.
pub(crate) fn lock_data_dir(path: &Path) -> Result<File> {
    let lock_path = path.join("dormouse.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| at(&lock_path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(Error::Locked {
            path: path.to_owned(),
        }),
        Err(TryLockError::Error(e)) => Err(at(&lock_path, e)),
    }
}

/// Makes the directory's entries (files created or removed in it) durable.
#[cfg(unix)]
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| at(dir, e))
}

#[cfg(not(unix))]
pub(crate) fn sync_dir(_dir: &Path) -> Result<()> {
    Ok(())
}

/// An I/O error that names the file, keeping the kind (a full disk stays recognisable).
pub(crate) fn at(path: &Path, e: io::Error) -> Error {
    Error::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}
