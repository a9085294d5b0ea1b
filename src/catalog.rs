//! The lake's catalog: what files exist, which rows are buffered or on their way to a file, what
//! the checkpoint says, and whether storage is healthy. Ingest writes it; the SQL side reads
//! consistent [`Snapshot`]s of it. It sits between the two, so neither reads the other's
//! internals.
//!
//! Three sets make up the lake as the daemon sees it: committed files, chunks of rows still
//! buffered, and chunks on their way to a file. Moving rows between the sets happens under one
//! lock, so a snapshot never sees a row twice (in flight *and* in its file) or not at all (taken
//! from the buffer but not yet in flight).

use crate::checkpoint::Checkpoint;
use crate::sink::partition::{LakeFile, PartitionKey};
use arrow::record_batch::RecordBatch;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

#[derive(Debug, Default)]
struct Inner {
    files: Vec<LakeFile>,
    buffered: HashMap<PartitionKey, Vec<RecordBatch>>,
    inflight: HashMap<u64, (PartitionKey, Vec<RecordBatch>)>,
    checkpoint: Checkpoint,
    generation: u64,
}

/// The shared catalog of a running daemon.
#[derive(Debug, Default)]
pub struct Catalog {
    inner: Mutex<Inner>,
}

/// A consistent view of the lake: committed files plus in-memory rows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Committed files.
    pub files: Vec<LakeFile>,
    /// Buffered and in-flight rows, by partition.
    pub batches: Vec<(PartitionKey, RecordBatch)>,
    /// The checkpoint as last written.
    pub checkpoint: Checkpoint,
    /// Increases with every change.
    pub generation: u64,
}

impl Catalog {
    /// State over the files found at start-up.
    pub fn new(files: Vec<LakeFile>, checkpoint: Checkpoint) -> Self {
        Catalog {
            inner: Mutex::new(Inner {
                files,
                checkpoint,
                ..Default::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // a panic while holding the lock cannot leave the sets half-moved (each change is a
        // few pushes/removes), so a poisoned lock is still usable
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A consistent snapshot.
    pub fn snapshot(&self) -> Snapshot {
        let g = self.lock();
        let mut batches = Vec::new();
        for (k, v) in g.buffered.iter() {
            batches.extend(v.iter().map(|b| (k.clone(), b.clone())));
        }
        for (k, v) in g.inflight.values() {
            batches.extend(v.iter().map(|b| (k.clone(), b.clone())));
        }
        Snapshot {
            files: g.files.clone(),
            batches,
            checkpoint: g.checkpoint.clone(),
            generation: g.generation,
        }
    }

    /// Publishes newly sealed chunks.
    pub fn append(&self, chunks: Vec<(PartitionKey, RecordBatch)>) {
        if chunks.is_empty() {
            return;
        }
        let mut g = self.lock();
        for (k, b) in chunks {
            g.buffered.entry(k).or_default().push(b);
        }
        g.generation += 1;
    }

    /// A partition's rows leave the buffer for a flush: they become in-flight (still visible).
    pub fn start_flush(&self, job_id: u64, key: &PartitionKey, chunks: Vec<RecordBatch>) {
        let mut g = self.lock();
        g.buffered.remove(key);
        g.inflight.insert(job_id, (key.clone(), chunks));
        g.generation += 1;
    }

    /// A flush is durable: its rows are now read from `file`.
    pub fn commit(&self, job_id: u64, file: LakeFile) {
        let mut g = self.lock();
        g.inflight.remove(&job_id);
        g.files.push(file);
        g.generation += 1;
    }

    /// Records the checkpoint just written.
    pub fn set_checkpoint(&self, c: Checkpoint) {
        self.lock().checkpoint = c;
    }
}

/// Storage health, for `/health` and logs: set by the writer, read by the SQL endpoint.
#[derive(Debug, Default)]
pub struct StorageHealth {
    /// The last store failed and is being retried.
    pub failing: AtomicBool,
    /// The last failure was a full disk.
    pub no_space: AtomicBool,
}
