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
use crate::model::Cursor;
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

    /// Files replaced in one commit (compaction, purge): the view changes at once, so no
    /// query sees a row twice or not at all.
    pub fn replace_files(&self, gone: &[String], added: &[LakeFile]) {
        // an added file already shown (a batch the backfill's recovery commits) is shown once
        let gone: std::collections::HashSet<&str> = gone
            .iter()
            .map(String::as_str)
            .chain(added.iter().map(|a| a.path.as_str()))
            .collect();
        let mut g = self.lock();
        g.files.retain(|f| !gone.contains(f.path.as_str()));
        g.files.extend(added.iter().cloned());
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
///
/// It also follows each repo's chain of commits once a snapshot anchors it (Sync 1.1): a live
/// `#commit` whose `since` is not the last rev seen, or whose `prevData` is not the last MST
/// root seen, means events were missed; a `#sync` announces a state reached without commits.
/// Either marks the repo for a fresh fetch ([`Cutover::take_refetch`]), which the daemon's
/// backfill performs.
#[derive(Debug)]
pub struct Cutover {
    inner: Mutex<CutoverInner>,
    hasher: std::collections::hash_map::RandomState,
    cap: usize,
    /// How long a marked repo waits before it is fetched again (see
    /// [`Cutover::with_refetch_delay`]).
    delay: std::time::Duration,
    /// The backfill's progress is loaded (see [`Cutover::set_loaded`]).
    loaded: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct CutoverInner {
    creates: HashMap<u64, u64>,
    snapshots: HashMap<u64, u64>,
    /// Keys a committed snapshot left to their live create (kept when replayed).
    deferred: std::collections::HashSet<u64>,
    overflow: u64,
    /// The last commit seen of each DID (live or snapshot).
    heads: HashMap<u64, Head>,
    heads_overflow: u64,
    /// Repos marked for a fresh fetch, by DID hash, and the queue of those not yet taken,
    /// each with the time from which it may be taken (queued in that order).
    marked: HashMap<u64, Mark>,
    queue: std::collections::VecDeque<(std::time::Instant, String)>,
    refetch_overflow: u64,
    /// Per marked DID, the earliest live position that revealed a gap not yet covered by a
    /// committed fresh fetch: the live checkpoint stays before it (see [`Cutover::hold`]).
    holds: HashMap<u64, Cursor>,
}

/// The last commit seen of a DID.
#[derive(Debug, Clone, Copy)]
struct Head {
    /// (a TID's value: values sort as the TIDs do)
    rev: u64,
    /// A hash of its MST root (0: unknown).
    data: u64,
    /// Whether a snapshot anchors the chain (only then is a gap a reason to fetch again).
    anchored: bool,
    /// Loaded from the progress of an earlier run: the live commits between that snapshot and
    /// this run's start are not known, so the next commit is checked only for going back
    /// before the snapshot.
    loose: bool,
}

/// Where a repo marked for a fresh fetch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    /// Waiting in the queue (else being fetched).
    queued: bool,
    /// Marked once more while being fetched.
    again: bool,
    /// Fresh fetches of it that failed.
    failures: u8,
}

/// Why a repo was marked for a fresh fetch (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// A `#sync` event at a later rev.
    Sync,
    /// A commit whose `since` is not the last rev seen.
    Since,
    /// A commit whose `prevData` is not the last MST root seen.
    PrevData,
}

impl Gap {
    /// `sync`, `since` or `prev_data`.
    pub fn as_str(self) -> &'static str {
        match self {
            Gap::Sync => "sync",
            Gap::Since => "since",
            Gap::PrevData => "prev_data",
        }
    }
}

/// Times a fresh fetch that fails is queued again before the repo is left to the next run.
const REFETCH_ATTEMPTS: u8 = 3;

/// A rev as its TID's value (8 bytes, in the TIDs' order); `None` for anything else.
fn rev_value(rev: &str) -> Option<u64> {
    crate::syntax::tid_value(rev)
}

impl Cutover {
    /// A cut-over noting at most `cap` live creates.
    pub fn new(cap: usize) -> Self {
        Cutover {
            inner: Mutex::new(CutoverInner::default()),
            hasher: std::collections::hash_map::RandomState::new(),
            cap,
            delay: std::time::Duration::ZERO,
            loaded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The snapshots of earlier runs are loaded ([`Cutover::load_snapshot`]): live events may
    /// be followed from now on. Until then the live pipeline reads nothing, because the events
    /// a restart replays must meet the heads and snapshots of the progress: a replayed `#sync`
    /// must mark its repo again, a replayed create must find the snapshot that holds it.
    pub fn set_loaded(&self) {
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether [`Cutover::set_loaded`] was called.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A marked repo is fetched again only `delay` after it was queued (its first mark, or a
    /// failed fresh fetch): the events of one change of an account (a migration's
    /// `#identity`, `#account`, `#sync` and first commits) come close together, and one fetch
    /// after them covers all of them; a failed fetch waits as long before its next attempt.
    /// The live checkpoint stays held meanwhile.
    pub fn with_refetch_delay(mut self, delay: std::time::Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The queue entry of `did`, ready `self.delay` from now.
    fn queued(&self, did: &str) -> (std::time::Instant, String) {
        (std::time::Instant::now() + self.delay, did.to_string())
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

    /// Room for the snapshots of `n` repos about to be loaded ([`Cutover::load_snapshot`]), so
    /// that the tables do not grow step by step while a start loads millions.
    pub fn reserve(&self, n: usize) {
        let mut g = self.lock();
        g.snapshots.reserve(n);
        let heads = n.min(self.cap.saturating_sub(g.heads.len()));
        g.heads.reserve(heads);
    }

    /// Snapshot revs already durable (from the backfill's progress), with the keys each left
    /// to its live create (`collection/rkey`): a replayed live create of such a key is kept.
    /// The snapshot anchors the DID's chain loosely: the live commits between it and this
    /// run's start are not known.
    pub fn load_snapshot(&self, did: &str, rev: &str, data: Option<&str>, deferred: &[String]) {
        let d = self.hash(&[did]);
        let mut g = self.lock();
        if let Some(r) = rev_value(rev) {
            // the cut matters only to a fresh fetch's marker; a loaded snapshot writes none
            let head = self.anchor(&g, d, r, data);
            self.set_head(
                &mut g,
                d,
                Head {
                    loose: true,
                    ..head
                },
            );
            g.snapshots.insert(d, r);
        }
        for key in deferred {
            if let Some((c, k)) = key.split_once('/') {
                let h = self.hash(&[did, c, k]);
                g.deferred.insert(h);
            }
        }
    }

    /// The head of DID hash `d` once a snapshot at rev `r` with MST root `data` anchors its
    /// chain (`g` locked): live commits already past the snapshot keep their head, now anchored.
    fn anchor(&self, g: &CutoverInner, d: u64, r: u64, data: Option<&str>) -> Head {
        match g.heads.get(&d).copied() {
            Some(h) if h.rev > r => Head {
                anchored: true,
                ..h
            },
            _ => Head {
                rev: r,
                data: data.map_or(0, |x| self.data_hash(x)),
                anchored: true,
                loose: false,
            },
        }
    }

    /// A live create: `true` to keep it, `false` when the DID's snapshot already reflects it.
    pub fn live_create(&self, did: &str, collection: &str, rkey: &str, rev: &str) -> bool {
        let Some(r) = rev_value(rev) else {
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
        let Some(r) = rev.and_then(rev_value) else {
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

    fn data_hash(&self, data: &str) -> u64 {
        // 0 means unknown
        self.hash(&[data]).max(1)
    }

    /// Marks `did` for a fresh fetch (`g` locked), revealed by the live event at `at`.
    fn mark(&self, g: &mut CutoverInner, d: u64, did: &str, why: Gap, at: Option<Cursor>) {
        let hold = |g: &mut CutoverInner| {
            if let Some(at) = at {
                let h = g.holds.entry(d).or_insert(at);
                *h = (*h).min(at);
            }
        };
        match g.marked.get_mut(&d) {
            Some(m) if m.queued || m.again => {
                hold(g);
                return;
            }
            Some(m) => {
                m.again = true;
                hold(g);
            }
            None => {
                if g.marked.len() >= self.cap {
                    g.refetch_overflow += 1;
                    if g.refetch_overflow.is_power_of_two() {
                        tracing::error!(
                            cap = self.cap,
                            overflow = g.refetch_overflow,
                            "the queue of repos to fetch again is full: a repo with a gap keeps its stale records until a later backfill"
                        );
                    }
                    metrics::counter!("atlake_backfill_refetch_overflow_total").increment(1);
                    return;
                }
                g.marked.insert(
                    d,
                    Mark {
                        queued: true,
                        again: false,
                        failures: 0,
                    },
                );
                hold(g);
                let entry = self.queued(did);
                g.queue.push_back(entry);
            }
        }
        tracing::info!(%did, why = why.as_str(), "a gap in the repo's history: it will be fetched again");
        metrics::counter!("atlake_backfill_refetch_marked_total", "why" => why.as_str())
            .increment(1);
    }

    fn set_head(&self, g: &mut CutoverInner, d: u64, head: Head) {
        if g.heads.len() < self.cap || g.heads.contains_key(&d) {
            g.heads.insert(d, head);
        } else {
            g.heads_overflow += 1;
            if g.heads_overflow.is_power_of_two() {
                tracing::error!(
                    cap = self.cap,
                    overflow = g.heads_overflow,
                    "the cut-over's table of repo heads is full: gaps in these repos' histories go unnoticed"
                );
            }
            metrics::counter!("atlake_backfill_heads_overflow_total").increment(1);
        }
    }

    /// A live commit of `did` at `rev` (every op of it may call this; the first one advances
    /// the head). Returns the gap it reveals, if the DID's chain is anchored by a snapshot and
    /// the commit does not follow the last one seen. A commit without chain fields (Jetstream)
    /// advances the head without a check.
    ///
    /// `at` is the event's position in the live stream: the live checkpoint stays before it
    /// until the fresh fetch it calls for is committed.
    pub fn live_commit(
        &self,
        did: &str,
        rev: &str,
        chain: Option<&crate::model::Chain>,
        at: Option<Cursor>,
    ) -> Option<Gap> {
        let r = rev_value(rev)?;
        let d = self.hash(&[did]);
        let data = chain.map_or(0, |c| self.data_hash(&c.data));
        let mut g = self.lock();
        let head = g.heads.get(&d).copied();
        let gap = match (head, chain) {
            (Some(h), _) if r <= h.rev => return None,
            // the first commit after a restart: the chain is known only up to the snapshot
            (Some(h), Some(c)) if h.anchored && h.loose => {
                match c.since.as_deref().and_then(rev_value) {
                    Some(since) if since >= h.rev => None,
                    _ => Some(Gap::Since),
                }
            }
            (Some(h), Some(c)) if h.anchored => {
                let since_ok = c.since.as_deref().and_then(rev_value) == Some(h.rev);
                let prev_ok = match (&c.prev_data, h.data) {
                    (Some(p), known) if known != 0 => self.data_hash(p) == known,
                    _ => true,
                };
                if !since_ok {
                    Some(Gap::Since)
                } else if !prev_ok {
                    Some(Gap::PrevData)
                } else {
                    None
                }
            }
            _ => None,
        };
        if let Some(why) = gap {
            self.mark(&mut g, d, did, why, at);
        }
        let anchored = head.is_some_and(|h| h.anchored);
        // a Jetstream commit (no chain) says nothing of the chain: a loose head stays loose
        let loose = chain.is_none() && head.is_some_and(|h| h.loose);
        self.set_head(
            &mut g,
            d,
            Head {
                rev: r,
                data,
                anchored,
                loose,
            },
        );
        gap
    }

    /// A live `#sync` of `did` at `rev`: a repo anchored by a snapshot at an earlier rev is
    /// marked for a fresh fetch.
    pub fn live_sync(&self, did: &str, rev: &str, at: Option<Cursor>) -> Option<Gap> {
        let r = rev_value(rev)?;
        let d = self.hash(&[did]);
        let mut g = self.lock();
        let head = g.heads.get(&d).copied();
        if head.is_some_and(|h| r <= h.rev) {
            return None;
        }
        let anchored = head.is_some_and(|h| h.anchored);
        if anchored {
            self.mark(&mut g, d, did, Gap::Sync, at);
        }
        // the chain goes on from the synced state, whose root is not known yet
        self.set_head(
            &mut g,
            d,
            Head {
                rev: r,
                data: 0,
                anchored,
                loose: false,
            },
        );
        anchored.then_some(Gap::Sync)
    }

    /// A snapshot of `did` at `rev` with MST root `data` is complete: it anchors the DID's
    /// chain (unless live commits already went past it: their head stays, now anchored). A
    /// fresh fetch (`refetch`) that completes takes the DID off the queue, or queues it again
    /// when it was marked meanwhile. Returns the cut: the latest rev seen of the repo (live or
    /// this snapshot's).
    pub fn snapshot_done(
        &self,
        did: &str,
        rev: Option<&str>,
        data: Option<&str>,
        refetch: bool,
    ) -> Option<String> {
        let d = self.hash(&[did]);
        let mut g = self.lock();
        let mut cut = None;
        if let Some(r) = rev.and_then(rev_value) {
            let head = self.anchor(&g, d, r, data);
            cut = Some(crate::syntax::tid_text(head.rev));
            self.set_head(&mut g, d, head);
        }
        if refetch {
            self.finish_refetch(&mut g, d, did, false);
        }
        cut
    }

    /// A fresh fetch of `did` ended (`failed` or not): off the queue, or queued again when it
    /// was marked meanwhile or failed fewer than [`REFETCH_ATTEMPTS`] times.
    fn finish_refetch(&self, g: &mut CutoverInner, d: u64, did: &str, failed: bool) -> bool {
        let Some(m) = g.marked.get_mut(&d) else {
            return false;
        };
        if m.queued {
            return true;
        }
        if failed {
            m.failures += 1;
        }
        if m.again || (failed && m.failures < REFETCH_ATTEMPTS) {
            m.queued = true;
            m.again = false;
            let entry = self.queued(did);
            g.queue.push_back(entry);
            true
        } else {
            g.marked.remove(&d);
            false
        }
    }

    /// A fresh fetch of `did` failed: it is queued again, up to a few times; then it is left to
    /// the next backfill run (its failure is in the progress) and `false` is returned.
    pub fn refetch_failed(&self, did: &str) -> bool {
        let d = self.hash(&[did]);
        let mut g = self.lock();
        self.finish_refetch(&mut g, d, did, true)
    }

    /// Up to `n` repos to fetch again whose delay has passed, now in flight.
    pub fn take_refetch(&self, n: usize) -> Vec<String> {
        let mut g = self.lock();
        let mut out = Vec::new();
        let now = std::time::Instant::now();
        while out.len() < n {
            // the queue is in the order of its ready times (one delay for all)
            if g.queue.front().is_none_or(|(ready, _)| *ready > now) {
                break;
            }
            let Some((_, did)) = g.queue.pop_front() else {
                break;
            };
            let d = self.hash(&[did.as_str()]);
            if let Some(m) = g.marked.get_mut(&d) {
                m.queued = false;
            }
            out.push(did);
        }
        out
    }

    /// The earliest live position whose gap is not yet covered by a committed fresh fetch:
    /// the live checkpoint stays before it, so that a crash replays the event and marks the
    /// repo again (marks live in memory).
    pub fn hold(&self) -> Option<Cursor> {
        let g = self.lock();
        metrics::gauge!("atlake_backfill_checkpoint_holds").set(g.holds.len() as f64);
        g.holds.values().min().copied()
    }

    /// A batch holding a fresh fetch of `did` (its rows, or its final failure) is committed:
    /// its hold on the live checkpoint ends, unless the repo is marked again meanwhile (then
    /// the next fetch's commit ends it).
    pub fn refetch_committed(&self, did: &str) {
        let d = self.hash(&[did]);
        let mut g = self.lock();
        if !g.marked.contains_key(&d) {
            g.holds.remove(&d);
        }
    }

    /// Repos marked for a fresh fetch and not finished (queued or in flight).
    pub fn refetch_pending(&self) -> usize {
        self.lock().marked.len()
    }

    /// Repos whose chain of commits is followed (a head is kept for each), and how many
    /// did not fit.
    pub fn followed(&self) -> (usize, u64) {
        let g = self.lock();
        (g.heads.len(), g.heads_overflow)
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

    /// A measurement, not a check: what the cut-over keeps per repo whose snapshot a daemon
    /// loads from the backfill's progress at start (its rev as a snapshot and as a loose chain
    /// head). Run alone:
    /// `cargo test --lib cutover_memory -- --ignored --nocapture --exact catalog::tests::cutover_memory_per_loaded_repo`
    #[test]
    #[ignore]
    fn cutover_memory_per_loaded_repo() {
        const N: usize = 1_000_000;
        let rss = || {
            let s = std::fs::read_to_string("/proc/self/statm").unwrap();
            s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
        };
        let dids: Vec<String> = (0..N).map(|i| format!("did:plc:{i:0>24x}")).collect();
        let c = Cutover::new(usize::MAX);
        let r0 = rss();
        for d in &dids {
            c.load_snapshot(d, "3lzqv5mgtxk2a", None, &[]);
        }
        let r1 = rss();
        eprintln!(
            "cut-over: {:.0} B per loaded repo",
            r1.saturating_sub(r0) as f64 / N as f64
        );
    }

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
            None,
            &["app.bsky.feed.post/3k7".to_string()],
        );
        assert!(!d.live_create(DID, "app.bsky.feed.post", "3k1", "3kaaaaaaaaaa2"));
        assert!(d.live_create(DID, "app.bsky.feed.post", "3k7", "3kaaaaaaaaaa2"));
        assert!(d.live_create(DID, "app.bsky.feed.post", "3k1", "3kdaaaaaaaaa2"));
    }

    fn chain(since: Option<&str>, prev: Option<&str>, data: &str) -> crate::model::Chain {
        crate::model::Chain {
            since: since.map(str::to_string),
            prev_data: prev.map(str::to_string),
            data: data.to_string(),
        }
    }

    /// Once a snapshot anchors a repo, a live commit must follow the last one seen (`since`
    /// and `prevData`); a `#sync` past it, or a commit that does not follow, marks the repo
    /// for a fresh fetch, once, until that fetch completes.
    #[test]
    fn gaps_in_an_anchored_chain_mark_the_repo_for_a_fresh_fetch() {
        let c = Cutover::new(100);
        // not anchored: nothing is checked
        assert_eq!(
            c.live_commit(
                DID,
                "3kaaaaaaaaaa2",
                Some(&chain(Some("3k2222222222"), Some("x"), "d0")),
                None,
            ),
            None
        );
        c.snapshot_done(DID, Some("3kbaaaaaaaaa2"), Some("d1"), false);
        // at or before the snapshot: reflected in it, no check, no change
        assert_eq!(
            c.live_commit(
                DID,
                "3kbaaaaaaaaa2",
                Some(&chain(Some("zz"), Some("zz"), "zz")),
                None,
            ),
            None
        );
        // follows: since is the snapshot's rev, prevData its root
        assert_eq!(
            c.live_commit(
                DID,
                "3kcaaaaaaaaa2",
                Some(&chain(Some("3kbaaaaaaaaa2"), Some("d1"), "d2")),
                None,
            ),
            None
        );
        // another op of the same commit
        assert_eq!(
            c.live_commit(
                DID,
                "3kcaaaaaaaaa2",
                Some(&chain(Some("3kbaaaaaaaaa2"), Some("d1"), "d2")),
                None,
            ),
            None
        );
        // prevData that is not the last root
        assert_eq!(
            c.live_commit(
                DID,
                "3kdaaaaaaaaa2",
                Some(&chain(Some("3kcaaaaaaaaa2"), Some("d9"), "d3")),
                None,
            ),
            Some(Gap::PrevData)
        );
        // marked once: a later gap while queued adds nothing
        assert_eq!(
            c.live_commit(
                DID,
                "3keaaaaaaaaa2",
                Some(&chain(Some("3kcaaaaaaaaa2"), Some("d3"), "d4")),
                None,
            ),
            Some(Gap::Since)
        );
        assert_eq!(c.refetch_pending(), 1);
        assert_eq!(c.take_refetch(10), vec![DID.to_string()]);
        assert!(c.take_refetch(10).is_empty());
        // a #sync while it is fetched: fetched again after
        assert_eq!(c.live_sync(DID, "3kfaaaaaaaaa2", None), Some(Gap::Sync));
        assert!(c.take_refetch(10).is_empty());
        c.snapshot_done(DID, Some("3kfaaaaaaaaa2"), Some("d5"), true);
        assert_eq!(c.take_refetch(10), vec![DID.to_string()]);
        c.snapshot_done(DID, Some("3kgaaaaaaaaa2"), Some("d6"), true);
        assert_eq!(c.refetch_pending(), 0);
        // the fresh snapshot anchors the chain again
        assert_eq!(
            c.live_commit(
                DID,
                "3khaaaaaaaaa2",
                Some(&chain(Some("3kgaaaaaaaaa2"), Some("d6"), "d7")),
                None,
            ),
            None
        );
        // a #sync at or before the head is old news; Jetstream commits (no chain) just advance
        assert_eq!(c.live_sync(DID, "3khaaaaaaaaa2", None), None);
        assert_eq!(c.live_commit(DID, "3kiaaaaaaaaa2", None, None), None);
        assert_eq!(
            c.live_commit(
                DID,
                "3kjaaaaaaaaa2",
                Some(&chain(Some("3kiaaaaaaaaa2"), None, "d8")),
                None,
            ),
            None
        );
        // a #sync of a repo no snapshot anchors is not a reason to fetch
        assert_eq!(
            c.live_sync("did:plc:bbbbbbbbbbbbbbbbbbbbbbbb", "3kzaaaaaaaaa2", None),
            None
        );
        assert_eq!(c.refetch_pending(), 0);
    }

    /// Live commits past a snapshot's rev before the snapshot completes stay the head; a fresh
    /// fetch that fails is tried again a few times, then left to the next run.
    #[test]
    fn a_snapshot_behind_the_live_head_anchors_it_and_failures_are_bounded() {
        let c = Cutover::new(100);
        c.live_commit(
            DID,
            "3kcaaaaaaaaa2",
            Some(&chain(Some("3kbaaaaaaaaa2"), Some("d1"), "d2")),
            None,
        );
        c.snapshot_done(DID, Some("3kbaaaaaaaaa2"), Some("d1"), false);
        assert_eq!(
            c.live_commit(
                DID,
                "3kdaaaaaaaaa2",
                Some(&chain(Some("3kcaaaaaaaaa2"), Some("d2"), "d3")),
                None,
            ),
            None
        );
        assert_eq!(c.live_sync(DID, "3keaaaaaaaaa2", None), Some(Gap::Sync));
        for _ in 0..REFETCH_ATTEMPTS - 1 {
            assert_eq!(c.take_refetch(10).len(), 1);
            assert!(c.refetch_failed(DID));
        }
        assert_eq!(c.take_refetch(10).len(), 1);
        assert!(!c.refetch_failed(DID));
        assert_eq!(c.refetch_pending(), 0);
        assert!(c.take_refetch(10).is_empty());
    }

    /// A marked repo is taken `refetch_delay` after its mark, once however many gaps it shows
    /// meanwhile; a failed fresh fetch waits as long again; repos come out in mark order.
    #[test]
    fn a_marked_repo_waits_its_delay_then_is_fetched_once() {
        let delay = std::time::Duration::from_secs(1);
        let c = Cutover::new(100).with_refetch_delay(delay);
        let other = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb";
        c.snapshot_done(DID, Some("3kbaaaaaaaaa2"), Some("d1"), false);
        c.snapshot_done(other, Some("3kbaaaaaaaaa2"), Some("d1"), false);
        let marked = std::time::Instant::now();
        assert_eq!(c.live_sync(DID, "3kcaaaaaaaaa2", None), Some(Gap::Sync));
        assert_eq!(c.live_sync(other, "3kcaaaaaaaaa2", None), Some(Gap::Sync));
        assert_eq!(c.live_sync(DID, "3kdaaaaaaaaa2", None), Some(Gap::Sync));
        assert!(c.take_refetch(10).is_empty(), "taken before its delay");
        std::thread::sleep(
            delay - marked.elapsed().min(delay) + std::time::Duration::from_millis(20),
        );
        assert_eq!(c.take_refetch(10), vec![DID.to_string(), other.to_string()]);
        assert!(c.take_refetch(10).is_empty());
        // a failure queues it again, after the delay
        let failed = std::time::Instant::now();
        assert!(c.refetch_failed(DID));
        assert!(c.take_refetch(10).is_empty(), "retried before its delay");
        std::thread::sleep(
            delay - failed.elapsed().min(delay) + std::time::Duration::from_millis(20),
        );
        assert_eq!(c.take_refetch(10), vec![DID.to_string()]);
    }

    /// The live checkpoint stays before the earliest event whose gap no committed fresh fetch
    /// covers yet; a repo marked again while it is fetched keeps its hold until the next fetch
    /// is committed.
    #[test]
    fn gaps_hold_the_live_checkpoint_until_their_fetch_is_committed() {
        let c = Cutover::new(100);
        let seq = |v| Cursor::seq(v).ok();
        let other = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb";
        c.snapshot_done(DID, Some("3kbaaaaaaaaa2"), Some("d1"), false);
        c.snapshot_done(other, Some("3kbaaaaaaaaa2"), Some("d1"), false);
        assert_eq!(c.hold(), None);
        assert_eq!(c.live_sync(DID, "3kcaaaaaaaaa2", seq(20)), Some(Gap::Sync));
        assert_eq!(c.hold(), seq(20));
        // a later gap of the same repo keeps the earlier hold; another repo's earlier one wins
        assert_eq!(c.live_sync(DID, "3kdaaaaaaaaa2", seq(30)), Some(Gap::Sync));
        assert_eq!(c.hold(), seq(20));
        assert_eq!(
            c.live_sync(other, "3kcaaaaaaaaa2", seq(10)),
            Some(Gap::Sync)
        );
        assert_eq!(c.hold(), seq(10));
        // the other repo's fetch: taken, done (in the buffer), then committed
        let taken = c.take_refetch(10);
        assert_eq!(taken.len(), 2);
        c.snapshot_done(other, Some("3kcaaaaaaaaa2"), Some("d2"), true);
        assert_eq!(c.hold(), seq(10), "not committed yet");
        c.refetch_committed(other);
        assert_eq!(c.hold(), seq(20));
        // DID is marked again while its fetch is in flight: that commit does not end the hold
        assert_eq!(c.live_sync(DID, "3keaaaaaaaaa2", seq(40)), Some(Gap::Sync));
        c.snapshot_done(DID, Some("3kdaaaaaaaaa2"), Some("d3"), true);
        c.refetch_committed(DID);
        assert_eq!(c.hold(), seq(20));
        assert_eq!(c.take_refetch(10), vec![DID.to_string()]);
        c.snapshot_done(DID, Some("3keaaaaaaaaa2"), Some("d4"), true);
        c.refetch_committed(DID);
        assert_eq!(c.hold(), None);
        // a fetch that fails for good ends its hold when the failure is committed
        assert_eq!(c.live_sync(DID, "3kfaaaaaaaaa2", seq(50)), Some(Gap::Sync));
        for _ in 0..REFETCH_ATTEMPTS - 1 {
            assert_eq!(c.take_refetch(10).len(), 1);
            assert!(c.refetch_failed(DID));
            c.refetch_committed(DID);
            assert_eq!(c.hold(), seq(50));
        }
        assert_eq!(c.take_refetch(10).len(), 1);
        assert!(!c.refetch_failed(DID));
        c.refetch_committed(DID);
        assert_eq!(c.hold(), None);
    }

    /// After a restart the chain is known only up to each repo's last snapshot: the next live
    /// commit may follow commits this run did not see, but not go back before the snapshot;
    /// from then on the chain is strict again.
    #[test]
    fn a_restart_checks_the_next_commit_only_against_the_snapshot() {
        let c = Cutover::new(100);
        c.load_snapshot(DID, "3kbaaaaaaaaa2", Some("d1"), &[]);
        // commits at 3kc… and 3kd… happened before the restart; this one follows 3kd…
        assert_eq!(
            c.live_commit(
                DID,
                "3keaaaaaaaaa2",
                Some(&chain(Some("3kdaaaaaaaaa2"), Some("d4"), "d5")),
                None
            ),
            None
        );
        assert_eq!(c.refetch_pending(), 0);
        // strict again: since must be the last rev seen
        assert_eq!(
            c.live_commit(
                DID,
                "3kgaaaaaaaaa2",
                Some(&chain(Some("3kfaaaaaaaaa2"), Some("d5"), "d7")),
                None
            ),
            Some(Gap::Since)
        );
        // a commit that goes back before the snapshot is a gap even right after a restart
        let other = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb";
        c.load_snapshot(other, "3kbaaaaaaaaa2", Some("d1"), &[]);
        assert_eq!(
            c.live_commit(
                other,
                "3kcaaaaaaaaa2",
                Some(&chain(Some("3kaaaaaaaaaa2"), Some("d0"), "d2")),
                None
            ),
            Some(Gap::Since)
        );
        let third = "did:plc:cccccccccccccccccccccccc";
        c.load_snapshot(third, "3kbaaaaaaaaa2", Some("d1"), &[]);
        assert_eq!(
            c.live_commit(third, "3kcaaaaaaaaa2", Some(&chain(None, None, "d2")), None),
            Some(Gap::Since)
        );
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
