//! Backfill: every record that exists in the network's repositories, into the lake.
//!
//! ```text
//!  lister ──(repo jobs)──▶ fetchers (N at once) ──(row chunks)──▶ batch loop ──▶ files, then
//!  listRepos / --dids       resolve DID → PDS                      one buffer     the batch
//!  (done repos skipped)     getRepo → block store (spills)         for all        record
//!                           walk MST (hashes verified)             repos
//! ```
//!
//! - The lister pages `listRepos` (or `listReposByCollection` per collection, when
//!   collections are given and the host serves it) or reads an explicit DID list; inactive
//!   repos are counted by status and skipped, repos the lake has finished are skipped.
//! - Fetchers resolve each DID, stream its CAR into a [`RepoBlocks`] store (memory up to
//!   `backfill.repo_memory`, then a temporary file), walk the MST from the commit, and send
//!   records in chunks. A repo that cannot be read is recorded as failed with its reason
//!   (and, when the repo's bytes are bad, quarantined); the next run fetches it again.
//! - The batch loop buffers rows of every repo in one [`buffer::HistoryBuffer`] and flushes
//!   it when it is full or `backfill.flush_interval` passed: one file per partition, then the
//!   batch record that makes them and the repos they finish durable ([`progress`]).
//!
//! Rows: `kind = 'commit'`, `operation = 'create'`, the repo's `rev`, the record's `cid`, no
//! `seq`, `origin = 'repo'`. A row's time (and partition) is when the record was made, bounded
//! by [`crate::decode::repo::record_time_us`].

pub mod buffer;
pub mod fetch;
pub mod progress;
pub mod table;

use crate::catalog::{BackfillStatus, Catalog};
use crate::config::Config;
use crate::model::{Cursor, ErrorEvent, SourceKind};
use crate::sink::lease::{Lease, LeaseError, LeaseSettings};
use crate::sink::store::Lake;
use crate::source::sync::{SyncClient, SyncError, SyncSettings};
use buffer::HistoryBuffer;
use fetch::{FetchContext, RepoJob};
use progress::{BatchRecord, Progress, RepoDone, RepoFailed, RepoPartial};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Why a backfill stopped.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// The lake's writer lease is held by another writer, or was lost.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// Progress could not be read or written.
    #[error(transparent)]
    Progress(#[from] progress::ProgressError),
    /// A flush failed.
    #[error(transparent)]
    Flush(#[from] buffer::FlushError),
    /// Listing the repos failed.
    #[error("listing repos: {0}")]
    List(SyncError),
    /// The sync client could not be made.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// Committing to the lake's Delta logs failed.
    #[error(transparent)]
    Log(#[from] crate::checkpoint::CheckpointError),
    /// A part of the backfill failed in a way that is a bug, not bad input.
    #[error("{0}")]
    Broken(String),
}

/// Which repos.
#[derive(Debug, Clone)]
pub enum Target {
    /// Every repo the host lists (`listRepos`, or `listReposByCollection` per collection).
    Listed,
    /// These DIDs.
    Dids(Vec<String>),
}

/// Records of one repo in a chunk, their collection, rkey, CID and JSON in one shared buffer:
/// a backfill moves millions of records from the walkers to the batch loop, and a record
/// allocated on one thread and freed on another costs a lock on glibc's arena (a profile showed
/// the batch loop waiting on it).
#[derive(Debug, Clone, Default)]
pub struct Rows {
    /// every row's collection, rkey, CID and record JSON, one after another
    text: String,
    /// per row: where it starts, where its collection, rkey and CID end, and where it ends
    at: Vec<[u32; 5]>,
    time_us: Vec<i64>,
}

/// One row of a [`Rows`].
#[derive(Debug, Clone, Copy)]
pub struct RowRef<'a> {
    /// Its collection.
    pub collection: &'a str,
    /// Its record key.
    pub rkey: &'a str,
    /// Its CID.
    pub cid: &'a str,
    /// The record as JSON.
    pub record: &'a str,
    /// When it was made (bounded).
    pub time_us: i64,
}

/// Why a row cannot be added to a [`Rows`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RowError(String);

impl Rows {
    /// Rows with room for `bytes` of text.
    pub fn with_capacity(bytes: usize) -> Rows {
        Rows {
            text: String::with_capacity(bytes),
            ..Rows::default()
        }
    }

    /// Adds a row from `bytes`: collection, rkey, CID and JSON in that order, the first three
    /// ending at `ends` (offsets in `bytes`). Checked: valid UTF-8, every end on a character
    /// boundary and in order, and the chunk under 4 GiB.
    pub fn push(&mut self, bytes: &[u8], ends: [usize; 3], time_us: i64) -> Result<(), RowError> {
        let text = std::str::from_utf8(bytes).map_err(|e| RowError(e.to_string()))?;
        let [a, b, c] = ends;
        if !(a <= b && b <= c && c <= text.len() && ends.iter().all(|&e| text.is_char_boundary(e)))
        {
            return Err(RowError(format!(
                "row parts end at {ends:?} in {} bytes",
                text.len()
            )));
        }
        let base = self.text.len();
        let off = |x: usize| {
            u32::try_from(base + x).map_err(|_| RowError("a chunk of rows over 4 GiB".into()))
        };
        let at = [off(0)?, off(a)?, off(b)?, off(c)?, off(text.len())?];
        self.text.push_str(text);
        self.at.push(at);
        self.time_us.push(time_us);
        Ok(())
    }

    /// Rows in the chunk.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Whether the chunk has no rows.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// Bytes of text.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    /// The rows, in order. `push` checked every offset, so an error here is a broken
    /// invariant (counted), never a row with an empty field.
    pub fn iter(&self) -> impl Iterator<Item = Result<RowRef<'_>, RowError>> + '_ {
        let part = move |from: u32, to: u32| {
            self.text.get(from as usize..to as usize).ok_or_else(|| {
                metrics::counter!("atlake_broken_invariants_total").increment(1);
                RowError(format!(
                    "a row's part {from}..{to} is out of its {} bytes of text",
                    self.text.len()
                ))
            })
        };
        self.at
            .iter()
            .zip(&self.time_us)
            .map(move |(&[s, a, b, c, e], &time_us)| {
                Ok(RowRef {
                    collection: part(s, a)?,
                    rkey: part(a, b)?,
                    cid: part(b, c)?,
                    record: part(c, e)?,
                    time_us,
                })
            })
    }
}

/// From fetchers to the batch loop.
#[derive(Debug)]
pub enum Msg {
    /// Records of a repo, in key order, up to `last_key`.
    Rows {
        /// the account
        did: String,
        /// the snapshot's rev
        rev: Option<String>,
        /// records
        rows: Rows,
        /// records set aside
        errors: Vec<ErrorEvent>,
        /// the last key these cover
        last_key: String,
        /// a fresh fetch after a gap
        reset: bool,
    },
    /// Every record of the repo was sent.
    Done {
        /// the account
        did: String,
        /// the snapshot's rev
        rev: Option<String>,
        /// the snapshot's MST root
        data: Option<String>,
        /// a fresh fetch after a gap
        reset: bool,
    },
    /// The repo could not be read.
    Failed {
        /// the account
        did: String,
        /// short reason
        reason: String,
        /// the error
        detail: String,
        /// a quarantine row, when the repo's bytes are bad
        quarantine: Option<ErrorEvent>,
        /// a fresh fetch after a gap
        reset: bool,
    },
}

/// Live counters of a run (for the progress bar, `system.backfill` and metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Repos listed (or given).
    pub listed: AtomicU64,
    /// Repos skipped because the lake has them.
    pub already_done: AtomicU64,
    /// Repos finished in this run.
    pub done: AtomicU64,
    /// Repos that failed in this run.
    pub failed: AtomicU64,
    /// Repos being fetched.
    pub in_flight: AtomicU64,
    /// Records read.
    pub records: AtomicU64,
    /// CAR bytes read.
    pub car_bytes: AtomicU64,
    /// Files written.
    pub files: AtomicU64,
    /// Batches committed.
    pub batches: AtomicU64,
    /// Whether listing has finished.
    pub listing_done: AtomicU64,
    /// Jobs sent to the fetchers and not yet started.
    pub queued: AtomicU64,
    /// Repos fetched again after a gap in their live history (daemon).
    pub refetched: AtomicU64,
    /// 1 when every listed repo is committed and the run only follows gaps (daemon).
    pub caught_up: AtomicU64,
    /// Inactive repos by status, failures by reason, and the listing cursor.
    pub detail: Mutex<StatsDetail>,
}

/// The parts of [`Stats`] that are not counters.
#[derive(Debug, Default, Clone)]
pub struct StatsDetail {
    /// Inactive repos skipped, by status.
    pub inactive: BTreeMap<String, u64>,
    /// Failures in this run, by reason.
    pub failures: BTreeMap<String, u64>,
    /// The listing's cursor (`None` before the first page or after the last).
    pub cursor: Option<String>,
    /// Repos per state in the lake (done, partial, failed), as of the last commit.
    pub lake_states: (u64, u64, u64),
}

impl Stats {
    fn detail(&self) -> std::sync::MutexGuard<'_, StatsDetail> {
        self.detail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the detail.
    pub fn snapshot(&self) -> StatsDetail {
        self.detail().clone()
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Repos listed or given.
    pub listed: u64,
    /// Repos finished by this run.
    pub done: u64,
    /// Repos skipped because the lake had them.
    pub already_done: u64,
    /// Repos that failed, by reason.
    pub failures: BTreeMap<String, u64>,
    /// Inactive repos skipped, by status.
    pub inactive: BTreeMap<String, u64>,
    /// Records written.
    pub records: u64,
    /// CAR bytes read.
    pub car_bytes: u64,
    /// Files written.
    pub files: u64,
    /// Batches committed.
    pub batches: u64,
    /// Files of uncommitted batches removed at start.
    pub orphans_removed: usize,
}

/// How a run is set up.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Which repos.
    pub target: Target,
    /// The configuration (`[backfill]`, `[writer]`, `[lake]`).
    pub cfg: Config,
    /// After the listing, keep fetching again the repos the live stream finds gaps in (the
    /// daemon's cut-over marks them), until stopped.
    pub follow: bool,
}

/// Runs a backfill to completion under the lake's writer lease (taken here).
pub async fn run(plan: Plan, lake: &Lake, stats: Arc<Stats>) -> Result<Summary, BackfillError> {
    let lease = Lease::acquire(
        lake,
        &LeaseSettings {
            command: "backfill".into(),
            ttl: plan.cfg.lake.lease_ttl.0,
            wait: plan.cfg.lake.lease_wait,
        },
    )
    .await?;
    let fenced = lake.fenced(lease.fence());
    let (_stop_tx, stop) = watch::channel(false);
    let r = run_fenced(plan, &fenced, stats, None, None, stop).await;
    lease.release().await;
    r
}

fn sync_settings(cfg: &Config) -> SyncSettings {
    let b = &cfg.backfill;
    SyncSettings {
        plc: b.plc.clone(),
        per_host: b.per_host,
        min_interval: b.min_interval.0,
        attempts: b.attempts,
        timeout: b.timeout.0,
        idle_timeout: b.timeout.0,
        ..SyncSettings::default()
    }
}

/// The counters as the catalog shows them.
pub fn status(stats: &Stats, state: &str, error: Option<String>) -> BackfillStatus {
    let d = stats.snapshot();
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let map = |v: &[(&str, u64)]| v.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    BackfillStatus {
        state: state.to_string(),
        error,
        repos: map(&[
            ("listed", n(&stats.listed)),
            ("done", n(&stats.done)),
            ("already_done", n(&stats.already_done)),
            ("failed", n(&stats.failed)),
            ("in_flight", n(&stats.in_flight)),
            ("refetched", n(&stats.refetched)),
        ]),
        lake: map(&[
            ("done", d.lake_states.0),
            ("partial", d.lake_states.1),
            ("failed", d.lake_states.2),
        ]),
        failures: d.failures,
        inactive: d.inactive,
        totals: map(&[
            ("records", n(&stats.records)),
            ("car_bytes", n(&stats.car_bytes)),
            ("files", n(&stats.files)),
            ("batches", n(&stats.batches)),
        ]),
        cursor: d.cursor,
    }
}

/// Runs a backfill on a lake whose writer lease the caller holds (`lake` is fenced by it).
/// With a `catalog` (the daemon's), committed files become visible to queries at once and
/// [`BackfillStatus`] is published there. With `committer` (the daemon's), commits to the
/// lake's logs go through it; without, straight to the logs. `stop` ends it early: what is
/// buffered is flushed and committed first (repos cut short resume after their last key).
pub async fn run_fenced(
    plan: Plan,
    lake: &Lake,
    stats: Arc<Stats>,
    catalog: Option<Arc<Catalog>>,
    committer: Option<crate::checkpoint::compact::ToCommitter>,
    stop: watch::Receiver<bool>,
) -> Result<Summary, BackfillError> {
    let publisher = catalog.clone().map(|c| {
        let stats = stats.clone();
        tokio::spawn(async move {
            loop {
                let state = if stats.caught_up.load(Ordering::Relaxed) == 1 {
                    "following"
                } else {
                    "running"
                };
                c.set_backfill(status(&stats, state, None));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    });
    let r = run_inner(plan, lake, stats.clone(), catalog.clone(), committer, stop).await;
    if let Some(cut) = catalog.as_ref().and_then(|c| c.cutover())
        && !cut.is_loaded()
    {
        // the live pipeline waits for the progress; it goes on without it, and says so
        tracing::error!(
            error = ?r.as_ref().err(),
            "the backfill ended before its progress was loaded: live events are followed without the snapshots of earlier runs (replayed creates may be kept twice, replayed gaps may not mark their repos)"
        );
        metrics::counter!("atlake_broken_invariants_total").increment(1);
        cut.set_loaded();
    }
    if let Some(p) = publisher {
        p.abort();
    }
    if let Some(c) = &catalog {
        match &r {
            Ok(_) => c.set_backfill(status(&stats, "finished", None)),
            Err(e) => c.set_backfill(status(&stats, "failed", Some(e.to_string()))),
        }
    }
    r
}

async fn run_inner(
    plan: Plan,
    lake: &Lake,
    stats: Arc<Stats>,
    catalog: Option<Arc<Catalog>>,
    committer: Option<crate::checkpoint::compact::ToCommitter>,
    stop: watch::Receiver<bool>,
) -> Result<Summary, BackfillError> {
    let started = Instant::now();
    let (progress, next_batch, removed, kept) = Progress::recover_with_files(lake).await?;
    if let Some(c) = &catalog {
        c.remove_paths(&removed);
    }
    // the files of committed batches that no log names yet (a crash between a batch's record
    // and its commits, or a history from before its log)
    // alone on the lake (`atlake backfill`), the live tables get their logs first, as a start
    // of `ingest` gives them: a quarantine log created by a batch's commit alone would leave
    // out the quarantine files of a lake from before the log. In the daemon, its start did it.
    let logs = match committer {
        Some(_) => crate::checkpoint::Logs::load(lake).await?,
        None => crate::checkpoint::ensure_logs(lake).await?.0,
    };
    let mut commits = match committer {
        Some(c) => table::Commits::Committer(c),
        None => table::Commits::Direct(Box::new(logs.clone())),
    };
    let caught = table::catch_up(
        &mut commits,
        lake,
        &logs,
        &kept,
        progress.last_batch,
        catalog.as_ref(),
    )
    .await?;
    drop(logs);
    let orphans = removed.len();
    if let Some(cut) = catalog.as_ref().and_then(|c| c.cutover()) {
        load_snapshots(&progress, cut);
        cut.set_loaded();
    }
    tracing::info!(
        lake = lake.url(),
        repos_known = progress.len(),
        next_batch,
        orphans_removed = orphans,
        history_files_committed = caught.history,
        quarantine_files_committed = caught.errors,
        took = ?started.elapsed(),
        "recovered backfill progress"
    );
    stats.detail().lake_states = progress.counts();
    let client = SyncClient::new(sync_settings(&plan.cfg))?;
    let b = &plan.cfg.backfill;
    let ctx_spill_dir = if b.spill_dir.is_empty() {
        std::env::temp_dir()
    } else {
        PathBuf::from(&b.spill_dir)
    };
    let stale = buffer::Stage::remove_stale(&ctx_spill_dir);
    if stale > 0 {
        tracing::info!(removed = stale, dir = %ctx_spill_dir.display(), "removed the backfill stages of processes that are gone");
    }
    let ctx = FetchContext {
        client: client.clone(),
        repo_memory: usize::try_from(b.repo_memory.0).unwrap_or(usize::MAX),
        max_repo_size: b.max_repo_size.0,
        spill_dir: ctx_spill_dir.clone(),
        collections: Arc::new(b.collections.clone()),
        stats: stats.clone(),
    };
    // one map of every repo's state for the whole run: the batch loop updates it, the
    // listing looks each listed repo up in it
    let progress = Arc::new(tokio::sync::Mutex::new(progress));
    let (job_tx, job_rx) = mpsc::channel::<RepoJob>(b.concurrency * 2);
    let (msg_tx, msg_rx) = mpsc::channel::<Msg>(64);
    let follow = catalog
        .as_ref()
        .and_then(|c| c.cutover().cloned())
        .filter(|_| plan.follow);
    let follow_mode = follow.is_some();
    let lister = tokio::spawn(list(
        client.clone(),
        plan.target.clone(),
        b.relay.clone(),
        b.collections.clone(),
        progress.clone(),
        stats.clone(),
        job_tx,
        stop.clone(),
        follow,
    ));
    let concurrency = b.concurrency;
    let fetchers =
        tokio::spawn(async move {
            use futures::StreamExt;
            let jobs = futures::stream::unfold(job_rx, |mut rx| async move {
                rx.recv().await.map(|j| (j, rx))
            });
            jobs.map(|j| fetch::fetch_one(ctx.clone(), j, msg_tx.clone()))
                .buffer_unordered(concurrency)
                .for_each(|_| futures::future::ready(()))
                .await;
        });
    let mut batches = BatchLoop {
        lake: lake.clone(),
        cfg: plan.cfg.clone(),
        buffer: HistoryBuffer::default(),
        batch: next_batch,
        in_batch: HashMap::new(),
        records: HashMap::new(),
        deferred: HashMap::new(),
        done: Vec::new(),
        failed: Vec::new(),
        stats: stats.clone(),
        catalog,
        summary: Summary {
            orphans_removed: orphans,
            ..Summary::default()
        },
        opened: Instant::now(),
        progress,
        commits: Arc::new(tokio::sync::Mutex::new(commits)),
        pending: None,
        follow: follow_mode,
        last_msg: Instant::now(),
        stage: None,
        spill_dir: ctx_spill_dir,
    };
    let result = batches.run(msg_rx, stop).await;
    // the batch loop ended (all fetchers done, a stop, or a failure): stop the rest
    lister.abort();
    fetchers.abort();
    let listed = match lister.await {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(BackfillError::Broken(format!("the lister failed: {e}"))),
    };
    result?;
    listed?;
    let mut s = batches.summary;
    let d = stats.snapshot();
    s.listed = stats.listed.load(Ordering::Relaxed);
    s.already_done = stats.already_done.load(Ordering::Relaxed);
    s.car_bytes = stats.car_bytes.load(Ordering::Relaxed);
    s.inactive = d.inactive;
    s.failures = d.failures;
    Ok(s)
}

/// Sends a job for every repo to fetch; inactive and finished repos are counted and skipped.
#[allow(clippy::too_many_arguments)]
async fn list(
    client: SyncClient,
    target: Target,
    host: String,
    collections: Vec<String>,
    progress: Arc<tokio::sync::Mutex<Progress>>,
    stats: Arc<Stats>,
    tx: mpsc::Sender<RepoJob>,
    stop: watch::Receiver<bool>,
    follow: Option<Arc<crate::catalog::Cutover>>,
) -> Result<(), BackfillError> {
    let mut seen = Seen::default();
    // a repo is offered once per run, resumed where the lake's progress leaves it
    let offer = |did: String, seen: &mut Seen| {
        let (progress, stats) = (progress.clone(), stats.clone());
        let fresh = seen.insert(&did);
        async move {
            if !fresh {
                return None;
            }
            stats.listed.fetch_add(1, Ordering::Relaxed);
            let (after, reset) = {
                let p = progress.lock().await;
                if p.is_done(&did) {
                    stats.already_done.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                p.get(&did).map_or((None, false), |s| {
                    (s.after().map(str::to_string), s.reset())
                })
            };
            Some(RepoJob { did, after, reset })
        }
    };
    let listing = async {
        match target {
            Target::Dids(dids) => {
                for d in dids {
                    if *stop.borrow() {
                        break;
                    }
                    if let Some(j) = offer(d, &mut seen).await {
                        stats.queued.fetch_add(1, Ordering::Relaxed);
                        if tx.send(j).await.is_err() {
                            break;
                        }
                    }
                }
            }
            Target::Listed => {
                let by_collection: Vec<Option<String>> = if collections.is_empty() {
                    vec![None]
                } else {
                    collections.iter().cloned().map(Some).collect()
                };
                let mut plain = false;
                'outer: for coll in by_collection {
                    let mut cursor: Option<String> = None;
                    loop {
                        if *stop.borrow() {
                            break 'outer;
                        }
                        let asked = if plain { None } else { coll.as_deref() };
                        let page = client
                            .list_repos(&host, asked, cursor.as_deref(), 1000)
                            .await;
                        let (repos, next) = match page {
                            Ok(p) => p,
                            // a host without listReposByCollection: every repo, filtered by record
                            Err(SyncError::Xrpc { status, name, .. })
                                if asked.is_some()
                                    && (status == 404
                                        || status == 501
                                        || name == "MethodNotImplemented") =>
                            {
                                tracing::warn!(%host, status, %name, "the host does not serve listReposByCollection; listing every repo (records are still filtered by collection)");
                                plain = true;
                                cursor = None;
                                continue;
                            }
                            Err(e) => return Err(BackfillError::List(e)),
                        };
                        for r in repos {
                            if !r.active {
                                let status = r.status.unwrap_or_else(|| "inactive".into());
                                metrics::counter!("atlake_backfill_inactive_total", "status" => status.clone()).increment(1);
                                *stats.detail().inactive.entry(status).or_insert(0) += 1;
                                stats.listed.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            if let Some(j) = offer(r.did, &mut seen).await {
                                stats.queued.fetch_add(1, Ordering::Relaxed);
                                if tx.send(j).await.is_err() {
                                    break 'outer;
                                }
                            }
                        }
                        stats.detail().cursor = next.clone();
                        match next {
                            Some(c) => cursor = Some(c),
                            None => break,
                        }
                    }
                    if plain {
                        break;
                    }
                }
            }
        }
        stats.listing_done.store(1, Ordering::Relaxed);
        Ok::<(), BackfillError>(())
    };
    let Some(cut) = follow else {
        return listing.await;
    };
    // in the daemon, repos the live stream marks are fetched again from the start, while the
    // listing goes on (a marked repo is done already: the listing skips it)
    let gaps = follow_gaps(&cut, &stats, &tx, stop.clone());
    tokio::pin!(gaps);
    tokio::select! {
        listed = listing => {
            listed?;
            gaps.await;
        }
        _ = &mut gaps => {}
    }
    Ok(())
}

/// The repos a listing offered already: two independently keyed 64-bit hashes of each DID
/// (16 bytes a repo, not the DID), so a listing that names a repo twice (a hostile or
/// shifting host) still fetches it once. Two DIDs that collide in both hashes (odds about
/// n²/2¹²⁹: 10⁻²³ for 40M repos, and the keys are secret and new every run) would lose
/// the second to the next run.
#[derive(Default)]
struct Seen {
    keys: (std::hash::RandomState, std::hash::RandomState),
    set: crate::model::KeyedSet<u128>,
}

impl Seen {
    /// Whether `did` is new (and now seen).
    fn insert(&mut self, did: &str) -> bool {
        use std::hash::BuildHasher;
        let h =
            (u128::from(self.keys.0.hash_one(did)) << 64) | u128::from(self.keys.1.hash_one(did));
        self.set.insert(h)
    }
}

/// Gives the daemon's cut-over the snapshot of every repo the progress holds (done or partial
/// at a rev). The live pipeline reads nothing until this is over.
pub(crate) fn load_snapshots(progress: &Progress, cut: &crate::catalog::Cutover) {
    cut.reserve(progress.len());
    for (did, state) in progress.states() {
        match state {
            progress::RepoState::Done {
                rev: Some(rev),
                live,
                data,
            } => cut.load_snapshot(&did, &rev, data.as_deref(), &live),
            progress::RepoState::Partial {
                rev: Some(rev),
                live,
                ..
            } => cut.load_snapshot(&did, &rev, None, &live),
            _ => {}
        }
    }
}

/// In the daemon, beside the listing and after it: fetches again every repo the live stream
/// marks (a `#sync`, or a commit that does not follow the last one seen), until stopped.
async fn follow_gaps(
    cut: &crate::catalog::Cutover,
    stats: &Stats,
    tx: &mpsc::Sender<RepoJob>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        for did in cut.take_refetch(64) {
            stats.refetched.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("atlake_backfill_refetch_total").increment(1);
            let job = RepoJob {
                did,
                after: None,
                reset: true,
            };
            stats.queued.fetch_add(1, Ordering::Relaxed);
            if tx.send(job).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Per repo with rows in the current buffer: its rev and the last key buffered.
#[derive(Debug)]
struct Buffered {
    rev: Option<String>,
    last_key: String,
    reset: bool,
}

/// The one loop that owns the buffer and commits batches.
struct BatchLoop {
    lake: Lake,
    cfg: Config,
    buffer: HistoryBuffer,
    batch: i64,
    in_batch: HashMap<String, Buffered>,
    records: HashMap<String, u64>,
    deferred: HashMap<String, Vec<String>>,
    done: Vec<RepoDone>,
    failed: Vec<RepoFailed>,
    stats: Arc<Stats>,
    catalog: Option<Arc<Catalog>>,
    summary: Summary,
    opened: Instant,
    progress: Arc<tokio::sync::Mutex<Progress>>,
    /// Where the batches' commits to the lake's logs go.
    commits: Arc<tokio::sync::Mutex<table::Commits>>,
    /// The previous batch's files and record being written while this one fills.
    pending: Option<tokio::task::JoinHandle<Result<Committed, BackfillError>>>,
    /// Following gaps after the listing (daemon): flush as soon as the fetchers are idle.
    follow: bool,
    /// When the last message came.
    last_msg: Instant,
    /// Rows of earlier flushes of this batch on local disk (`None`: staging is off).
    stage: Option<buffer::Stage>,
    /// Where stages go.
    spill_dir: PathBuf,
}

/// The rows a commit writes.
enum Work {
    /// In memory, by partition.
    Parts(
        Vec<(
            crate::sink::partition::PartitionKey,
            arrow::array::RecordBatch,
        )>,
    ),
    /// Staged on local disk.
    Staged(buffer::Stage),
}

/// What a commit task reports back.
struct Committed {
    files: u64,
    done: u64,
}

impl BatchLoop {
    fn cursor(&self) -> Result<Cursor, BackfillError> {
        Cursor::try_new(SourceKind::Repo, self.batch)
            .map_err(|e| BackfillError::Broken(e.to_string()))
    }

    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Msg>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), BackfillError> {
        let interval = self
            .cfg
            .backfill
            .flush_interval
            .0
            .max(Duration::from_millis(100));
        let cap = usize::try_from(self.cfg.backfill.buffer.0).unwrap_or(usize::MAX);
        loop {
            let idle = self.follow && self.fetchers_idle() && rx.is_empty();
            if idle && !self.has_content() {
                // everything listed (or marked) is committed once the last commit settles:
                // only gaps are followed now
                self.settle().await?;
                self.stats.caught_up.store(1, Ordering::Relaxed);
            } else {
                self.stats.caught_up.store(0, Ordering::Relaxed);
            }
            let deadline = if idle && self.has_content() {
                // nothing more is coming soon: commit what is here (a fresh fetch lands now)
                tokio::time::Instant::from_std(self.last_msg + Duration::from_millis(200))
            } else {
                tokio::time::Instant::from_std(self.opened + interval)
            };
            let msg = tokio::select! {
                m = rx.recv() => m,
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
                    tracing::info!("backfill stopping: committing what is buffered");
                    break;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.flush().await?;
                    continue;
                }
            };
            let Some(msg) = msg else { break };
            self.last_msg = Instant::now();
            self.take(msg)?;
            if self.buffer.bytes() >= cap {
                self.spill_or_flush().await?;
            }
        }
        self.flush().await?;
        self.settle().await
    }

    /// Whether the listing is over and no repo is queued or being fetched.
    fn fetchers_idle(&self) -> bool {
        let s = &self.stats;
        s.listing_done.load(Ordering::Relaxed) == 1
            && s.queued.load(Ordering::Relaxed) == 0
            && s.in_flight.load(Ordering::Relaxed) == 0
    }

    /// Whether anything waits for a flush.
    fn has_content(&self) -> bool {
        !self.buffer.is_empty()
            || !self.done.is_empty()
            || !self.failed.is_empty()
            || self.stage.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// A full buffer: staged on local disk while the stage is under `backfill.stage`, else
    /// (or with staging off) committed.
    async fn spill_or_flush(&mut self) -> Result<(), BackfillError> {
        let cap = self.cfg.backfill.stage.0;
        if cap == 0 {
            return self.flush().await;
        }
        self.spill().await?;
        if self.stage.as_ref().is_some_and(|s| s.bytes() >= cap) {
            self.flush().await?;
        }
        Ok(())
    }

    /// Moves the buffer's rows into the stage (created when needed).
    async fn spill(&mut self) -> Result<(), BackfillError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let parts = self.buffer.take()?;
        let stage = match self.stage.take() {
            Some(s) => s,
            None => buffer::Stage::new(&self.spill_dir).map_err(|e| {
                BackfillError::Broken(format!(
                    "cannot stage rows in {}: {e}",
                    self.spill_dir.display()
                ))
            })?,
        };
        let stage = tokio::task::spawn_blocking(move || {
            let mut stage = stage;
            stage.spill(parts).map(|_| stage)
        })
        .await
        .map_err(|e| BackfillError::Broken(format!("staging rows failed: {e}")))??;
        self.stage = Some(stage);
        Ok(())
    }

    /// Waits for the previous batch's commit.
    async fn settle(&mut self) -> Result<(), BackfillError> {
        if let Some(t) = self.pending.take() {
            let c = t.await.map_err(|e| {
                BackfillError::Broken(format!("a batch's commit task failed: {e}"))
            })??;
            self.summary.files += c.files;
            self.summary.batches += 1;
            self.summary.done += c.done;
        }
        Ok(())
    }

    fn take(&mut self, msg: Msg) -> Result<(), BackfillError> {
        let now = crate::model::cursor::now_us();
        let batch = self.cursor()?;
        let range = |e: crate::sink::partition::PartitionRangeError| {
            BackfillError::Broken(format!("a bounded time has no partition: {e}"))
        };
        match msg {
            Msg::Rows {
                did,
                rev,
                rows,
                errors,
                last_key,
                reset,
            } => {
                // rows created live at or before this snapshot's rev stay live ones; a fresh
                // fetch after a gap keeps every row (it replaces the repo: `current.*` reads
                // only its rows and later ones)
                let rows = rows
                    .iter()
                    .collect::<Result<Vec<RowRef<'_>>, RowError>>()
                    .map_err(|e| BackfillError::Broken(format!("rows of {did}: {e}")))?;
                let cut = self.catalog.as_ref().and_then(|c| c.cutover().cloned());
                let drop = match &cut {
                    Some(c) if !reset => c.snapshot(
                        &did,
                        rev.as_deref(),
                        rows.iter().map(|r| (r.collection, r.rkey)),
                    ),
                    Some(c) => {
                        c.snapshot(&did, rev.as_deref(), std::iter::empty());
                        Vec::new()
                    }
                    None => Vec::new(),
                };
                let mut kept = 0u64;
                for (i, r) in rows.iter().enumerate() {
                    if drop.get(i).copied().unwrap_or(false) {
                        metrics::counter!("atlake_backfill_cutover_dropped_total", "side" => "snapshot").increment(1);
                        self.deferred
                            .entry(did.clone())
                            .or_default()
                            .push(format!("{}/{}", r.collection, r.rkey));
                        continue;
                    }
                    kept += 1;
                    self.buffer
                        .push_record(&crate::model::rows::RepoRecord {
                            did: &did,
                            time_us: r.time_us,
                            collection: r.collection,
                            rkey: r.rkey,
                            rev: rev.as_deref(),
                            cid: r.cid,
                            record: r.record,
                        })
                        .map_err(range)?;
                }
                for mut e in errors {
                    e.time_us = Some(now);
                    self.buffer.push_error(&e, batch, now).map_err(range)?;
                }
                self.summary.records += kept;
                metrics::counter!("atlake_backfill_records_total").increment(kept);
                *self.records.entry(did.clone()).or_insert(0) += kept;
                self.in_batch.insert(
                    did,
                    Buffered {
                        rev,
                        last_key,
                        reset,
                    },
                );
            }
            Msg::Done {
                did,
                rev,
                data,
                reset,
            } => {
                self.in_batch.remove(&did);
                let records = self.records.remove(&did).unwrap_or(0);
                let cut = self
                    .catalog
                    .as_ref()
                    .and_then(|c| c.cutover())
                    .and_then(|c| c.snapshot_done(&did, rev.as_deref(), data.as_deref(), reset));
                if reset {
                    // the marker that the repo was replaced (`current.*` reads it)
                    let Some(r) = rev.as_deref() else {
                        return Err(BackfillError::Broken(format!(
                            "a fresh fetch of {did} has no rev"
                        )));
                    };
                    // with no live stream (no cut-over) nothing was seen past the snapshot
                    let cut = match (cut, self.catalog.as_ref().and_then(|c| c.cutover())) {
                        (Some(c), _) => c,
                        (None, None) => r.to_string(),
                        (None, Some(_)) => {
                            return Err(BackfillError::Broken(format!(
                                "the cut-over has no head for {did} after its snapshot"
                            )));
                        }
                    };
                    self.buffer.push_reset(&did, r, &cut).map_err(|e| {
                        BackfillError::Broken(format!("a bounded time has no partition: {e}"))
                    })?;
                }
                self.stats.done.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("atlake_backfill_repos_total", "state" => "done").increment(1);
                let live = self.deferred.remove(&did).unwrap_or_default();
                self.done.push(RepoDone {
                    did,
                    rev,
                    records,
                    live,
                    data,
                    reset,
                });
            }
            Msg::Failed {
                did,
                reason,
                detail,
                quarantine,
                reset,
            } => {
                if reset
                    && let Some(c) = self.catalog.as_ref().and_then(|c| c.cutover())
                    && c.refetch_failed(&did)
                {
                    tracing::warn!(%did, %reason, "a fresh fetch failed; it is tried again");
                }
                tracing::warn!(%did, %reason, %detail, "repo failed; the next run fetches it again");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("atlake_backfill_repos_total", "state" => "failed").increment(1);
                metrics::counter!("atlake_backfill_failures_total", "reason" => reason.clone())
                    .increment(1);
                *self
                    .stats
                    .detail()
                    .failures
                    .entry(reason.clone())
                    .or_insert(0) += 1;
                if let Some(mut q) = quarantine {
                    q.time_us = Some(now);
                    self.buffer.push_error(&q, batch, now).map_err(range)?;
                }
                self.records.remove(&did);
                self.failed.push(RepoFailed {
                    did,
                    reason,
                    detail,
                    reset,
                });
            }
        }
        Ok(())
    }

    /// Cuts the buffer into a batch and commits it in the background (its files, then its
    /// record), after the previous batch's commit: records are written in batch order, and the
    /// next batch fills while this one is written.
    async fn flush(&mut self) -> Result<(), BackfillError> {
        self.opened = Instant::now();
        if !self.has_content() {
            return Ok(());
        }
        let batch = self.cursor()?;
        let (rows, work) = if self.cfg.backfill.stage.0 > 0 {
            self.spill().await?;
            match self.stage.take() {
                Some(st) => (st.rows(), Work::Staged(st)),
                None => (0, Work::Parts(Vec::new())),
            }
        } else {
            (self.buffer.len() as u64, Work::Parts(self.buffer.take()?))
        };
        let mut partial: Vec<RepoPartial> = self
            .in_batch
            .drain()
            .map(|(did, b)| RepoPartial {
                live: self.deferred.remove(&did).unwrap_or_default(),
                did,
                rev: b.rev,
                after: b.last_key,
                reset: b.reset,
            })
            .collect();
        partial.sort_by(|a, b| a.did.cmp(&b.did));
        let mut record = BatchRecord {
            version: 1,
            batch: self.batch,
            written_at: String::new(),
            files: Vec::new(),
            rows,
            done: std::mem::take(&mut self.done),
            partial,
            failed: std::mem::take(&mut self.failed),
        };
        self.batch += 1;
        self.settle().await?;
        let (lake, writer, attempts) = (
            self.lake.clone(),
            self.cfg.writer.clone(),
            self.cfg.backfill.attempts.max(3),
        );
        let (catalog, stats, progress, commits) = (
            self.catalog.clone(),
            self.stats.clone(),
            self.progress.clone(),
            self.commits.clone(),
        );
        self.pending = Some(tokio::spawn(async move {
            let started = Instant::now();
            let files = match work {
                Work::Parts(parts) => {
                    buffer::write_files(&lake, &writer, batch, parts, attempts).await?
                }
                Work::Staged(stage) => {
                    buffer::write_staged(&lake, &writer, batch, stage, attempts).await?
                }
            };
            record.files = files.iter().map(|f| f.path.clone()).collect();
            record.written_at = crate::syntax::format_datetime_ms(crate::model::cursor::now_us());
            let mut p = progress.lock().await;
            p.commit(&lake, &record).await?;
            // the record says the batch is done; the logs name its files after it (a crash
            // in between is caught up at the next start)
            let mut commits = commits.lock().await;
            table::commit_batch(&mut commits, &lake, record.batch, &files).await?;
            if let Some(c) = &catalog {
                if !commits.shows_files() {
                    c.add_files(&files);
                }
                // the fresh fetches in this batch are durable: the live checkpoint may pass
                // the events that called for them
                if let Some(cut) = c.cutover() {
                    let done = record.done.iter().filter(|r| r.reset).map(|r| &r.did);
                    let failed = record.failed.iter().filter(|r| r.reset).map(|r| &r.did);
                    for did in done.chain(failed) {
                        cut.refetch_committed(did);
                    }
                }
            }
            let bytes: u64 = files.iter().map(|f| f.size).sum();
            stats.files.fetch_add(files.len() as u64, Ordering::Relaxed);
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats.detail().lake_states = p.counts();
            metrics::counter!("atlake_files_written_total", "table" => "backfill")
                .increment(files.len() as u64);
            metrics::counter!("atlake_bytes_written_total").increment(bytes);
            tracing::info!(
                batch = record.batch,
                files = files.len(),
                rows,
                bytes,
                done = record.done.len(),
                partial = record.partial.len(),
                failed = record.failed.len(),
                took = ?started.elapsed(),
                "backfill batch committed"
            );
            Ok(Committed {
                files: files.len() as u64,
                done: record.done.len() as u64,
            })
        }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(collection: &str, rkey: &str, cid: &str, record: &str) -> (Vec<u8>, [usize; 3]) {
        let text = format!("{collection}{rkey}{cid}{record}");
        let a = collection.len();
        (
            text.into_bytes(),
            [a, a + rkey.len(), a + rkey.len() + cid.len()],
        )
    }

    #[test]
    fn rows_share_one_buffer_and_read_back_their_parts() {
        let mut rows = Rows::with_capacity(16);
        let input = [
            (
                "app.bsky.feed.post",
                "3l2abcdefgh22",
                "bafyreia",
                r#"{"text":"é"}"#,
            ),
            ("app.bsky.actor.profile", "self", "bafyreib", "{}"),
            ("com.example.x", "k", "bafyreic", r#"{"a":[1,2]}"#),
        ];
        for (i, (c, k, cid, rec)) in input.iter().enumerate() {
            let (bytes, ends) = row(c, k, cid, rec);
            rows.push(&bytes, ends, i as i64).unwrap();
        }
        assert_eq!(rows.len(), 3);
        let got: Vec<_> = rows
            .iter()
            .map(|r| {
                let r = r.unwrap();
                (r.collection, r.rkey, r.cid, r.record, r.time_us)
            })
            .collect();
        let want: Vec<_> = input
            .iter()
            .enumerate()
            .map(|(i, &(c, k, cid, rec))| (c, k, cid, rec, i as i64))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_row_that_is_not_utf8_or_whose_parts_do_not_fit_is_refused() {
        let mut rows = Rows::default();
        let (mut bytes, ends) = row("app.bsky.feed.post", "k", "bafy", "{}");
        // ends out of order, past the end, inside a character
        assert!(rows.push(&bytes, [5, 3, 8], 0).is_err());
        assert!(rows.push(&bytes, [5, 6, bytes.len() + 1], 0).is_err());
        let (e, e_ends) = row("app.bsky.feed.post", "é", "bafy", "{}");
        let mid = e_ends[0] + 1;
        assert!(rows.push(&e, [e_ends[0], mid, e_ends[2]], 0).is_err());
        bytes.push(0xff);
        assert!(rows.push(&bytes, ends, 0).is_err());
        assert!(rows.is_empty(), "a refused row leaves nothing behind");
        assert_eq!(rows.text_len(), 0);
        // an offset that no longer fits its text is an error when read, not an empty field
        let (bytes, ends) = row("app.bsky.feed.post", "k", "bafy", "{}");
        rows.push(&bytes, ends, 0).unwrap();
        rows.at[0][4] += 100;
        assert!(rows.iter().next().unwrap().is_err());
    }
}
