//! Which storage engine an in-process scenario runs on, so the same workload can compare the
//! segment engine with the sled engine it replaced and with fjall (feature `fjall`).

use std::path::Path;
use std::sync::Arc;

use dormouse_runtime::storage::{
    Durability, ObjectId, SegmentConfig, SegmentStorage, SledConfig, SledStorage, Storage,
};

/// Runs `write` on `writers` threads at once, each with its own share of `logs` logs
/// (`channel/log-N`, round-robin), as each activation owns its log; returns the first
/// error.
pub(crate) fn with_writers(
    writers: u64,
    logs: u64,
    write: impl Fn(u64, Vec<ObjectId>) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|writer| {
                let write = &write;
                scope.spawn(move || {
                    let mine = (0..logs)
                        .filter(|log| log % writers == writer)
                        .map(|log| ObjectId::new("channel", format!("log-{log}")))
                        .collect();
                    write(writer, mine)
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        Ok(())
    })
}

/// The engine flags of the in-process scenarios.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct EngineArgs {
    /// Storage engine.
    #[arg(long, value_enum, default_value_t = Engine::Segments)]
    pub(crate) engine: Engine,
    /// The engine's read cache, MiB: the segment engine's leaf cache (`storage.cache`),
    /// sled's page cache, fjall's block cache [default: the engine's own].
    #[arg(long)]
    pub(crate) cache_mib: Option<u64>,
    /// Memory for changed index leaves before a checkpoint, MiB (segment engine,
    /// `storage.checkpoint_memory`) [default: the engine's own].
    #[arg(long)]
    pub(crate) dirty_mib: Option<u64>,
}

/// Which engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Engine {
    /// The default engine: segment files, a paged index with checkpoints, a cleaner.
    Segments,
    /// The first engine, sled 0.34 (kept for data dirs it wrote).
    Sled,
    /// fjall 3, an LSM tree, measured against the segment engine (feature `fjall`).
    #[cfg(feature = "fjall")]
    Fjall,
}

/// An open engine, with the engine-specific figures a report wants.
#[derive(Debug)]
pub(crate) struct Opened {
    pub(crate) storage: Arc<dyn Storage>,
    segments: Option<Arc<SegmentStorage>>,
    sled: Option<Arc<SledStorage>>,
    #[cfg(feature = "fjall")]
    fjall: Option<Arc<dormouse_runtime::storage::FjallStorage>>,
}

impl Opened {
    /// Opens the engine of `args` on `path` as the server would.
    pub(crate) fn open(
        args: &EngineArgs,
        path: &Path,
        durability: Durability,
    ) -> anyhow::Result<Self> {
        let mib = |m: u64| m * 1024 * 1024;
        Ok(match args.engine {
            Engine::Segments => {
                let mut config = SegmentConfig::new(path);
                config.durability = durability;
                if let Some(cache) = args.cache_mib {
                    config.cache_bytes = mib(cache);
                }
                if let Some(dirty) = args.dirty_mib {
                    config.dirty_bytes = mib(dirty);
                }
                let store = Arc::new(SegmentStorage::open(config)?);
                Self {
                    storage: store.clone(),
                    segments: Some(store),
                    sled: None,
                    #[cfg(feature = "fjall")]
                    fjall: None,
                }
            }
            #[cfg(feature = "fjall")]
            Engine::Fjall => {
                let mut config = dormouse_runtime::storage::FjallConfig::new(path);
                config.durability = durability;
                if let Some(cache) = args.cache_mib {
                    config.cache_bytes = mib(cache);
                }
                let store = Arc::new(dormouse_runtime::storage::FjallStorage::open(config)?);
                Self {
                    storage: store.clone(),
                    segments: None,
                    sled: None,
                    fjall: Some(store),
                }
            }
            Engine::Sled => {
                let mut config = SledConfig::new(path);
                config.durability = durability;
                config.cache_capacity_bytes = mib(args.cache_mib.unwrap_or(64));
                let store = Arc::new(SledStorage::open(config)?);
                Self {
                    storage: store.clone(),
                    segments: None,
                    sled: Some(store),
                    #[cfg(feature = "fjall")]
                    fjall: None,
                }
            }
        })
    }

    /// fsyncs run by group commit.
    pub(crate) fn fsyncs(&self) -> u64 {
        self.segments
            .as_ref()
            .map(|s| s.fsyncs())
            .or_else(|| self.sled.as_ref().map(|s| s.fsyncs()))
            .unwrap_or(0)
    }

    /// Lets the engine finish background work (the cleaner) so a final figure is settled.
    pub(crate) fn settle(&self) -> anyhow::Result<()> {
        if let Some(segments) = &self.segments {
            segments.clean()?;
            segments.checkpoint()?;
        }
        if let Some(sled) = &self.sled {
            sled.flush()?;
        }
        #[cfg(feature = "fjall")]
        if let Some(fjall) = &self.fjall {
            fjall.wait_idle(std::time::Duration::from_secs(120));
        }
        Ok(())
    }

    /// Engine-specific figures for a report (fjall: bytes in memtables).
    pub(crate) fn notes(&self) -> serde_json::Value {
        #[cfg(feature = "fjall")]
        if let Some(fjall) = &self.fjall {
            return serde_json::json!({ "write_buffer_bytes": fjall.write_buffer_bytes() });
        }
        if let Some(segments) = &self.segments {
            let stats = segments.stats();
            return serde_json::json!({
                "keys": stats.keys,
                "leaves": stats.leaves,
                "dirty_leaves": stats.dirty_leaves,
                "index_bytes": stats.index_bytes,
                "cached_leaves": stats.cached_leaves,
                "cache_bytes": stats.cache_bytes,
                "checkpoints": stats.checkpoints,
                "live_bytes": stats.live_bytes,
            });
        }
        serde_json::Value::Null
    }

    /// Keys in the engine's index and the memory it holds, when it keeps one.
    pub(crate) fn index(&self) -> Option<(usize, usize)> {
        self.segments.as_ref().map(|s| {
            let stats = s.stats();
            (stats.keys, stats.index_bytes)
        })
    }

    /// The engine's own count of live bytes (records and their keys), when it keeps one.
    pub(crate) fn engine_live_bytes(&self) -> Option<u64> {
        self.segments.as_ref().map(|s| s.stats().live_bytes)
    }
}
