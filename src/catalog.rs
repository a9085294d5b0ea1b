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
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

/// Where a backfill running in the daemon stands (its counters, copied about once a second).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackfillStatus {
    /// `running`, `finished` or `failed`.
    pub state: String,
    /// Why it failed.
    pub error: Option<String>,
    /// Repos by what this run did with them: `listed`, `done`, `already_done`, `failed`,
    /// `in_flight`.
    pub repos: BTreeMap<String, u64>,
    /// Repos by their state in the lake: `done`, `partial`, `failed`.
    pub lake: BTreeMap<String, u64>,
    /// Failures of this run by reason.
    pub failures: BTreeMap<String, u64>,
    /// Inactive repos skipped, by status.
    pub inactive: BTreeMap<String, u64>,
    /// `records`, `car_bytes`, `files`, `batches`.
    pub totals: BTreeMap<String, u64>,
    /// The listing's cursor.
    pub cursor: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    files: Vec<LakeFile>,
    backfill: Option<BackfillStatus>,
    buffered: HashMap<PartitionKey, Vec<RecordBatch>>,
    inflight: HashMap<u64, (PartitionKey, Vec<RecordBatch>)>,
    checkpoint: Checkpoint,
    generation: u64,
}

/// The shared catalog of a running daemon.
#[derive(Debug, Default)]
pub struct Catalog {
    inner: Mutex<Inner>,
    cutover: std::sync::OnceLock<std::sync::Arc<Cutover>>,
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
    /// The backfill running in the daemon, if one is.
    pub backfill: Option<BackfillStatus>,
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
            cutover: std::sync::OnceLock::new(),
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
            backfill: g.backfill.clone(),
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

    /// Files committed by another writer of this process (a backfill).
    pub fn add_files(&self, files: &[LakeFile]) {
        if files.is_empty() {
            return;
        }
        let mut g = self.lock();
        g.files.extend(files.iter().cloned());
        g.generation += 1;
    }

    /// Files removed from the lake (a backfill's uncommitted batches, at its start).
    pub fn remove_paths(&self, paths: &[String]) {
        if paths.is_empty() {
            return;
        }
        let gone: std::collections::HashSet<&str> = paths.iter().map(String::as_str).collect();
        let mut g = self.lock();
        g.files.retain(|f| !gone.contains(f.path.as_str()));
        g.generation += 1;
    }

    /// Turns the cut-over on (a daemon that backfills; before its source starts). A second
    /// call keeps the first.
    pub fn enable_cutover(&self, c: Cutover) -> std::sync::Arc<Cutover> {
        self.cutover.get_or_init(|| std::sync::Arc::new(c)).clone()
    }

    /// The cut-over, when the daemon backfills.
    pub fn cutover(&self) -> Option<&std::sync::Arc<Cutover>> {
        self.cutover.get()
    }

    /// Publishes where the daemon's backfill stands.
    pub fn set_backfill(&self, status: BackfillStatus) {
        let mut g = self.lock();
        if g.backfill.as_ref() != Some(&status) {
            g.backfill = Some(status);
            g.generation += 1;
        }
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

/// The cut-over between a backfill and the live stream in one daemon, so that a record is in
/// the lake once: as its live create or as its snapshot row, never both.
///
/// - A live create is noted (a hash of `did/collection/rkey` and its rev) unless the DID's
///   snapshot is already at that rev or later: then the snapshot reflects it and the live create
///   is dropped.
/// - A snapshot at rev `R` drops its rows whose key was created live at a rev `≤ R`, and
///   records `R` for the DID.
///
/// Snapshot revs are loaded from the backfill's durable progress at start, so the live side
/// stays exact across restarts. Live creates are known only from this process's start: a
/// record created live before it (in an earlier run) and also in a later snapshot is in the
/// lake twice, as the same key and CID; `current.*` folds them to one row. At most `cap` live
/// creates are noted; past that, the overflow is counted and logged, never silent.
#[derive(Debug)]
pub struct Cutover {
    inner: Mutex<CutoverInner>,
    hasher: std::collections::hash_map::RandomState,
    cap: usize,
}

#[derive(Debug, Default)]
struct CutoverInner {
    creates: HashMap<u64, [u8; 13]>,
    snapshots: HashMap<u64, [u8; 13]>,
    /// Keys a committed snapshot left to their live create (kept when replayed).
    deferred: std::collections::HashSet<u64>,
    overflow: u64,
}

/// A rev as 13 bytes (a TID); `None` for anything else.
fn rev_bytes(rev: &str) -> Option<[u8; 13]> {
    if !crate::syntax::is_tid(rev) {
        return None;
    }
    rev.as_bytes().try_into().ok()
}

impl Cutover {
    /// A cut-over noting at most `cap` live creates.
    pub fn new(cap: usize) -> Self {
        Cutover {
            inner: Mutex::new(CutoverInner::default()),
            hasher: std::collections::hash_map::RandomState::new(),
            cap,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CutoverInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hash(&self, parts: &[&str]) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = self.hasher.build_hasher();
        for p in parts {
            h.write(p.as_bytes());
            h.write_u8(0);
        }
        h.finish()
    }

    /// Snapshot revs already durable (from the backfill's progress), with the keys each left
    /// to its live create (`collection/rkey`): a replayed live create of such a key is kept.
    pub fn load_snapshot(&self, did: &str, rev: &str, deferred: &[String]) {
        let mut g = self.lock();
        if let Some(r) = rev_bytes(rev) {
            let h = self.hash(&[did]);
            g.snapshots.insert(h, r);
        }
        for key in deferred {
            if let Some((c, k)) = key.split_once('/') {
                let h = self.hash(&[did, c, k]);
                g.deferred.insert(h);
            }
        }
    }

    /// A live create: `true` to keep it, `false` when the DID's snapshot already reflects it.
    pub fn live_create(&self, did: &str, collection: &str, rkey: &str, rev: &str) -> bool {
        let Some(r) = rev_bytes(rev) else {
            return true;
        };
        let d = self.hash(&[did]);
        let k = self.hash(&[did, collection, rkey]);
        let mut g = self.lock();
        if g.snapshots.get(&d).is_some_and(|s| r <= *s) && !g.deferred.contains(&k) {
            return false;
        }
        if g.creates.len() < self.cap || g.creates.contains_key(&k) {
            g.creates.insert(k, r);
        } else {
            g.overflow += 1;
            if g.overflow.is_power_of_two() {
                tracing::error!(
                    cap = self.cap,
                    overflow = g.overflow,
                    "the cut-over's table of live creates is full: records created live now and backfilled later may be in the lake twice (current.* still shows them once)"
                );
            }
            metrics::counter!("atlake_backfill_cutover_overflow_total").increment(1);
        }
        true
    }

    /// A snapshot of `did` at `rev` holds `keys` (collection, rkey): which of them to drop
    /// (created live at a rev at or before the snapshot's). The caller records the dropped keys
    /// with the snapshot (they are deferred to their live create) when it commits.
    pub fn snapshot<'a>(
        &self,
        did: &str,
        rev: Option<&str>,
        keys: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Vec<bool> {
        let Some(r) = rev.and_then(rev_bytes) else {
            return keys.map(|_| false).collect();
        };
        let d = self.hash(&[did]);
        let mut g = self.lock();
        let s = g.snapshots.entry(d).or_insert(r);
        if *s < r {
            *s = r;
        }
        keys.map(|(c, k)| {
            let h = self.hash(&[did, c, k]);
            let drop = g.creates.get(&h).is_some_and(|live| *live <= r);
            if drop {
                g.deferred.insert(h);
            }
            drop
        })
        .collect()
    }

    /// Live creates noted, and how many did not fit.
    pub fn noted(&self) -> (usize, u64) {
        let g = self.lock();
        (g.creates.len(), g.overflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DID: &str = "did:plc:abcdefghijklmnopqrstuvwx";

    /// A record created live and also in the snapshot ends up once, whichever came first; live
    /// events after the snapshot are kept.
    #[test]
    fn a_record_is_either_live_or_snapshot() {
        let c = Cutover::new(100);
        // live first: a create at 3kaaaaaaaaaa2, then a snapshot at a later rev drops it
        assert!(c.live_create(DID, "app.bsky.feed.post", "3k1", "3kaaaaaaaaaa2"));
        assert!(c.live_create(DID, "app.bsky.feed.post", "3k9", "3kzzzzzzzzzz2"));
        let drop = c.snapshot(
            DID,
            Some("3kcaaaaaaaaa2"),
            [
                ("app.bsky.feed.post", "3k1"),
                ("app.bsky.feed.post", "3k2"),
                ("app.bsky.feed.post", "3k9"),
            ]
            .into_iter(),
        );
        // 3k9 was created live after the snapshot's rev: the snapshot cannot hold it, but if it
        // does it is kept (the live create is a later event)
        assert_eq!(drop, vec![true, false, false]);
        // snapshot first: a late live create at or before its rev is dropped, a later one kept
        assert!(!c.live_create(DID, "app.bsky.feed.like", "3l1", "3kcaaaaaaaaa2"));
        assert!(!c.live_create(DID, "app.bsky.feed.like", "3l1", "3kbaaaaaaaaa2"));
        assert!(c.live_create(DID, "app.bsky.feed.like", "3l2", "3kdaaaaaaaaa2"));
        // another DID is not affected; a repo without a rev drops nothing
        assert!(c.live_create(
            "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb",
            "app.bsky.feed.like",
            "3l1",
            "3kbaaaaaaaaa2"
        ));
        assert_eq!(
            c.snapshot(DID, None, [("app.bsky.feed.post", "3k1")].into_iter()),
            vec![false]
        );
        // a replayed live create whose snapshot row was dropped for it is kept
        assert!(c.live_create(DID, "app.bsky.feed.post", "3k1", "3kaaaaaaaaaa2"));
        // durable snapshot revs from a previous run, with the keys left to live creates
        let d = Cutover::new(100);
        d.load_snapshot(
            DID,
            "3kcaaaaaaaaa2",
            &["app.bsky.feed.post/3k7".to_string()],
        );
        assert!(!d.live_create(DID, "app.bsky.feed.post", "3k1", "3kaaaaaaaaaa2"));
        assert!(d.live_create(DID, "app.bsky.feed.post", "3k7", "3kaaaaaaaaaa2"));
        assert!(d.live_create(DID, "app.bsky.feed.post", "3k1", "3kdaaaaaaaaa2"));
    }

    /// Past the cap, creates are counted as overflow (and kept), never dropped silently.
    #[test]
    fn overflow_is_counted() {
        let c = Cutover::new(2);
        for k in ["a", "b", "c", "d"] {
            assert!(c.live_create(DID, "app.bsky.feed.post", k, "3kaaaaaaaaaa2"));
        }
        assert_eq!(c.noted(), (2, 2));
    }
}
