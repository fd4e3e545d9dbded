//! Moving a data dir written by the sled engine to the segment engine, in place, when it is
//! opened. Both engines store the same key space ([`crate::key`]), so the move is a copy of
//! every record in key order; sled's files are kept, renamed, until the operator removes
//! them.
//!
//! Crash-safe by ordering: the copy goes to `segments/`, which is written through a normal
//! checkpoint and synced; only then is `sled/` renamed to `sled.migrated/`. A crash before
//! the rename leaves `sled/` in place, and the next open starts the copy over from an
//! empty `segments/`.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use crate::files::{at, sync_dir};
use crate::fs::RealFs;
use crate::{Durability, Error, Result, SegmentConfig, SegmentStorage, key, record};

/// Bytes of records copied per frame.
const CHUNK: usize = 1 << 20;

/// Migrates `config.path` if it holds a sled data dir; does nothing otherwise. The caller
/// holds the data dir's lock.
pub(crate) fn from_sled_if_present(config: &SegmentConfig) -> Result<()> {
    let sled_dir = config.path.join("sled");
    if !sled_dir.is_dir() {
        return Ok(());
    }
    let segments = config.path.join("segments");
    if segments.exists() {
        tracing::warn!(
            path = %segments.display(),
            "an earlier migration from sled did not finish; starting it over"
        );
        fs::remove_dir_all(&segments).map_err(|e| at(&segments, e))?;
    }
    tracing::warn!(path = %config.path.display(), "migrating the data dir from the sled engine");
    let db = sled::Config::new()
        .path(&sled_dir)
        .open()
        .map_err(crate::error::from_sled)?;
    if let Some(value) = db
        .get(key::schema_version_key())
        .map_err(crate::error::from_sled)?
    {
        let found = record::decode_u32("schema version", &value)?;
        if found != key::CURRENT_SCHEMA {
            return Err(Error::SchemaMismatch {
                path: config.path.clone(),
                found,
                expected: key::CURRENT_SCHEMA,
            });
        }
    }
    let mut copy_config = config.clone();
    copy_config.durability = Durability::Never;
    let store = SegmentStorage::open_on(copy_config, Arc::new(RealFs), None)?;
    let mut copied = 0u64;
    let mut chunk: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut bytes = 0;
    for record in db.iter() {
        let (k, v) = record.map_err(crate::error::from_sled)?;
        bytes += k.len() + v.len();
        chunk.push((k.to_vec(), v.to_vec()));
        if bytes >= CHUNK {
            copied += store.copy_records(&chunk)?;
            chunk.clear();
            bytes = 0;
        }
    }
    copied += store.copy_records(&chunk)?;
    let expected = db.len() as u64;
    if copied != expected {
        return Err(Error::Engine(format!(
            "migration from sled copied {copied} records of {expected}; sled's files are kept"
        )));
    }
    // Durable, with a checkpoint, before sled's files are set aside.
    store.checkpoint()?;
    drop(store);
    drop(db);
    let migrated = free_name(&config.path)?;
    fs::rename(&sled_dir, &migrated).map_err(|e| at(&sled_dir, e))?;
    sync_dir(&config.path)?;
    tracing::warn!(
        records = copied,
        kept = %migrated.display(),
        "migrated from sled; its files are kept until you delete them"
    );
    Ok(())
}

/// `sled.migrated`, or with a number when an earlier migration left one.
fn free_name(path: &Path) -> Result<std::path::PathBuf> {
    for n in 0..1000 {
        let name = if n == 0 {
            "sled.migrated".to_owned()
        } else {
            format!("sled.migrated.{n}")
        };
        let candidate = path.join(name);
        if !candidate.exists() {
            return Ok(candidate);
        }
    }
    Err(Error::Engine(format!(
        "{} holds too many sled.migrated directories",
        path.display()
    )))
}

impl SegmentStorage {
    /// Writes raw records (keys already encoded) as one frame; for migrations.
    fn copy_records(&self, records: &[(Vec<u8>, Vec<u8>)]) -> Result<u64> {
        if records.is_empty() {
            return Ok(0);
        }
        let ops: Vec<(&[u8], Option<&[u8]>)> = records
            .iter()
            .map(|(k, v)| (k.as_slice(), Some(v.as_slice())))
            .collect();
        self.put_raw(&ops)?;
        Ok(records.len() as u64)
    }
}
