//! Compaction and the purge of deleted data.
//!
//! **Compaction** rewrites the files of a closed partition into one sorted file, in one commit
//! of the `events` log (`remove` of every input and `add` of the output, `dataChange = false`):
//! - an hour is closed [`Policy::grace_us`] after it ends; each closed hour of a collection
//!   with more than one file becomes one file;
//! - a long-tail collection (at most [`Policy::small_day_bytes`] in a closed day) has its whole
//!   day merged into one file of a day partition (`hour=__HIVE_DEFAULT_PARTITION__`, a null
//!   `hour` in the log), so it stops making a file per hour;
//! - one rewrite reads at most [`Policy::max_input_bytes`]; a bigger hour becomes several
//!   files of about that size.
//!
//! The inputs are each sorted (by time; `_other` by collection, then time), so the output is
//! their k-way merge, streamed: memory is one small batch per input and one output slice,
//! whatever the partition's size. Compaction also brings older files to the current schema.
//!
//! **Purge** (`privacy.purge_deleted`): the lake keeps the delete events, and removes what they
//! delete. Facts are read from the lake itself: every `delete` of a record (did, collection,
//! rkey, time) and every `#account` event whose status is `deleted` or `takendown` (did,
//! time). A create or update of a deleted record, older than its delete, keeps its row (its
//! time, did, collection, rkey, operation) but loses its content: `cid` and `record` become
//! null. Every row of a deleted or taken-down account older than that event goes, except the
//! `#account` events themselves. Compaction applies the facts to what it rewrites; a purge scan
//! (every [`Policy::purge_every_ms`]) reads the key columns of every committed file and
//! rewrites, one file at a time, those that still hold purged content (`dataChange = true`).
//! The scan's progress is a `txn` action of app id [`PURGE_APP_ID`] whose version is the
//! newest add time whose facts were applied; the next scan reads facts from files added since
//! an hour before it, so that a delete committed before the create it deletes is still applied.
//! Vacuum then deletes the replaced files from storage.

use super::CheckpointError;
use super::delta::{self, CommitOutcome, LogState, Table};
use super::facts::{self, Facts, KEY_COLUMNS, Verdict, load_facts, opt, purge_batch, verdicts};
use crate::config::WriterConfig;
use crate::model::SourceKind;
use crate::model::rows::{TableKind, schema};
use crate::sink::parquet::{FileMeta, properties};
use crate::sink::partition::{FileName, HOUR_US, LakeFile, PartitionKey, PartitionName, Span};
use crate::sink::read::{Batches, Origin};
use crate::sink::store::Lake;
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, new_null_array,
};
use arrow::datatypes::{Int64Type, SchemaRef};
use parquet::arrow::ArrowWriter;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The app id of the purge's progress (`txn` version: the newest add time, ms, whose facts
/// were applied to every file).
pub const PURGE_APP_ID: &str = "atlake.purge";
/// Facts are read from files added since this long before the last scan's mark.
const FACT_OVERLAP_MS: i64 = 3_600_000;
/// Rows gathered per output slice.
const SLICE_ROWS: usize = 16 * 1024;
/// Rows held per input at once, over all inputs.
const MERGE_ROWS: usize = 64 * 1024;

/// What compaction and the purge do.
#[derive(Debug, Clone)]
pub struct Policy {
    /// A partition is closed this long after it ends (µs).
    pub grace_us: i64,
    /// A collection whose closed day holds at most this many bytes is merged into one day file.
    pub small_day_bytes: u64,
    /// One rewrite reads at most this many bytes of input.
    pub max_input_bytes: u64,
    /// Compact partitions that are not closed yet, too (`atlake compact --open`; safe while
    /// the writer lease is held, since no other writer adds to them).
    pub include_open: bool,
    /// Purge the content of deleted records and the rows of deleted accounts.
    pub purge: bool,
    /// A purge scan runs when the last one is at least this old (ms).
    pub purge_every_ms: i64,
    /// How output files are written.
    pub writer: WriterConfig,
    /// Rewrite closed partitions (off: only the purge runs).
    pub compact: bool,
    /// Memory for the deletion facts, and where they spill beyond it.
    pub facts: facts::Budget,
    /// Set to stop a rewrite under way (at shutdown): it fails, and its output is an
    /// uncommitted file the next start removes.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Policy {
    fn cancelled(&self) -> Result<(), CheckpointError> {
        match &self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(CheckpointError::Stopped),
            _ => Ok(()),
        }
    }
}

impl Policy {
    /// The policy the configuration sets; `include_open` as `atlake compact --open`.
    pub fn from_config(cfg: &crate::config::Config, include_open: bool) -> Policy {
        let us = |d: std::time::Duration| d.as_micros().min(i64::MAX as u128) as i64;
        Policy {
            grace_us: us(cfg.compaction.grace.0),
            small_day_bytes: cfg.compaction.small_day.0,
            max_input_bytes: cfg.compaction.max_input.0,
            include_open,
            purge: cfg.privacy.purge_deleted,
            purge_every_ms: cfg.privacy.purge_every.0.as_millis().min(i64::MAX as u128) as i64,
            writer: crate::config::WriterConfig {
                zstd_level: cfg.compaction.zstd_level,
                row_group_rows: cfg.compaction.row_group_rows,
                ..cfg.writer.clone()
            },
            compact: true,
            facts: facts::Budget::from_config(&cfg.privacy),
            cancel: None,
        }
    }
}

/// What `atlake compact` did.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommandSummary {
    /// Files in the `events` table before.
    pub files_before: usize,
    /// Files in the `events` table after.
    pub files_after: usize,
    /// The compaction and purge pass.
    pub pass: Stats,
    /// Retention and vacuum.
    pub maintenance: super::retention::Pass,
}

/// `atlake compact`: takes the writer lease, settles the lake, runs one compaction and purge
/// pass (the purge scan whenever `force_purge` or when due), then retention and vacuum.
pub async fn run_command(
    lake: &Lake,
    cfg: &crate::config::Config,
    include_open: bool,
    force_purge: bool,
) -> Result<CommandSummary, CheckpointError> {
    use crate::sink::lease::{Lease, LeaseSettings};
    let lease = Lease::acquire(
        lake,
        &LeaseSettings {
            command: "compact".into(),
            ttl: cfg.lake.lease_ttl.0,
            wait: cfg.lake.lease_wait,
        },
    )
    .await?;
    let fenced = lake.fenced(lease.fence());
    let r = async {
        let mut settled = super::settle(&fenced).await?;
        // leftovers of interrupted writers (compactions too) go before this pass writes
        super::sweep(&fenced, Some(settled.logs.clone())).await?;
        let mut policy = Policy::from_config(cfg, include_open);
        if force_purge {
            policy.purge_every_ms = 0;
        }
        let now = crate::model::cursor::now_us();
        let mut out = CommandSummary {
            files_before: settled.logs.events.files.len(),
            ..Default::default()
        };
        let snapshot = settled.logs.clone();
        out.pass = pass(
            &fenced,
            &snapshot,
            &policy,
            now,
            &mut Direct {
                lake: &fenced,
                logs: &mut settled.logs,
            },
        )
        .await?;
        out.maintenance = super::retention::pass(
            &fenced,
            &mut settled.logs,
            super::retention::Keep::of(&cfg.lake),
            crate::model::cursor::now_us(),
        )
        .await?;
        out.files_after = settled.logs.events.files.len();
        Ok(out)
    }
    .await;
    lease.release().await;
    r
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Files replaced.
    pub inputs: usize,
    /// Files written.
    pub outputs: usize,
    /// Rows whose content (`cid`, `record`) was purged.
    pub blanked: u64,
    /// Rows of deleted accounts removed.
    pub dropped: u64,
    /// Rewrites whose inputs had left the table before their commit (their output deleted).
    pub stale: usize,
    /// Whether a purge scan ran.
    pub purge_scan: bool,
    /// Quarantine files the purge rewrote (or removed, when no row was left).
    pub quarantine_files: usize,
    /// Quarantined rows the purge removed.
    pub quarantine_dropped: u64,
}

/// The smallest merge key of the file, from its footer's statistics: (smallest
/// `collection` when `by_collection`, else "", smallest `time_us`). Without statistics it is
/// the smallest possible key, so the file is opened first.
fn min_key(o: &Origin, path: &str, by_collection: bool) -> Result<(String, i64), CheckpointError> {
    use parquet::file::statistics::Statistics;
    let meta = o.metadata(path)?;
    let md = meta.metadata();
    let schema = md.file_metadata().schema_descr();
    let col = |n: &str| (0..schema.num_columns()).find(|&i| schema.column(i).name() == n);
    let (mut coll, mut time): (Option<String>, Option<i64>) = (None, None);
    let (tc, cc) = (col("time_us"), col("collection"));
    for rg in md.row_groups() {
        let t = tc.and_then(|i| match rg.column(i).statistics() {
            Some(Statistics::Int64(s)) => s.min_opt().copied(),
            _ => None,
        });
        let Some(t) = t else {
            return Ok((String::new(), i64::MIN));
        };
        time = Some(time.map_or(t, |x| x.min(t)));
        if by_collection {
            let c = cc.and_then(|i| match rg.column(i).statistics() {
                Some(Statistics::ByteArray(s)) => s
                    .min_opt()
                    .and_then(|v| std::str::from_utf8(v.data()).ok())
                    .map(str::to_string),
                _ => None,
            });
            let Some(c) = c else {
                return Ok((String::new(), i64::MIN));
            };
            coll = Some(coll.map_or(c.clone(), |x| x.min(c)));
        }
    }
    // with a collection first, a file's smallest time goes with its smallest collection
    // only as a bound: the time part is dropped to stay below every row
    Ok(match (by_collection, coll, time) {
        (true, Some(c), _) => (c, i64::MIN),
        (false, _, Some(t)) => (String::new(), t),
        _ => (String::new(), i64::MIN),
    })
}

/// One rewrite: `inputs` (one source, one partition or the hours of one day) into `key`.
#[derive(Debug, Clone)]
pub struct Job {
    /// The output's partition.
    pub key: PartitionKey,
    /// The source of every input.
    pub source: SourceKind,
    /// The files replaced, in cursor order.
    pub inputs: Vec<LakeFile>,
}

/// The compaction jobs `state` calls for at `now_us`.
pub fn plan(state: &LogState, policy: &Policy, now_us: i64) -> Result<Vec<Job>, CheckpointError> {
    if !policy.compact {
        return Ok(Vec::new());
    }
    let closed =
        |end_us: i64| policy.include_open || end_us.saturating_add(policy.grace_us) <= now_us;
    // (partition name, day, source) → files
    let mut days: BTreeMap<(PartitionName, i64, SourceKind), Vec<&LakeFile>> = BTreeMap::new();
    for f in state.files.values() {
        if Table::of(f) != Some(Table::Events) || f.key.span() == Span::Month {
            continue;
        }
        let day = f.key.hour().div_euclid(24);
        days.entry((f.key.name.clone(), day, f.name.source()))
            .or_default()
            .push(f);
    }
    let mut jobs = Vec::new();
    for ((name, day, source), mut files) in days {
        files.sort_by_key(|f| (f.name.first(), f.name.last(), f.path.clone()));
        let bytes: u64 = files.iter().map(|f| f.size).sum();
        let day_end = (day + 1) * 24 * HOUR_US;
        if bytes <= policy.small_day_bytes && closed(day_end) {
            if files.len() > 1 {
                // every file's hour is in range and `events` has no quarantine partition
                let key = PartitionKey::day_of(name.clone(), day * 24).map_err(|e| {
                    CheckpointError::Corrupt {
                        path: files[0].path.clone(),
                        message: e.to_string(),
                    }
                })?;
                jobs.extend(split(key, source, &files, policy.max_input_bytes));
            }
            continue;
        }
        let mut hours: BTreeMap<PartitionKey, Vec<&LakeFile>> = BTreeMap::new();
        for f in files.iter().filter(|f| f.key.span() == Span::Hour) {
            hours.entry(f.key.clone()).or_default().push(f);
        }
        for (key, hf) in hours {
            if hf.len() > 1 && closed(key.end_us()) {
                jobs.extend(split(key, source, &hf, policy.max_input_bytes));
            }
        }
    }
    Ok(jobs)
}

/// Consecutive groups of `files` of at most `max_bytes` each (a single bigger file is its own
/// group); groups of one file are left alone.
fn split(key: PartitionKey, source: SourceKind, files: &[&LakeFile], max_bytes: u64) -> Vec<Job> {
    let mut groups: Vec<Vec<LakeFile>> = vec![Vec::new()];
    let mut acc = 0u64;
    for f in files {
        let cur = groups.last_mut();
        match cur {
            Some(g) if g.is_empty() || acc + f.size <= max_bytes => {
                acc += f.size;
                g.push((*f).clone());
            }
            _ => {
                acc = f.size;
                groups.push(vec![(*f).clone()]);
            }
        }
    }
    groups
        .into_iter()
        .filter(|g| g.len() > 1 || g.iter().any(|f| f.key != key))
        .map(|inputs| Job {
            key: key.clone(),
            source,
            inputs,
        })
        .collect()
}

/// What a rewrite made.
#[derive(Debug, Clone)]
pub struct Rewritten {
    /// The job.
    pub job: Job,
    /// The file written (`None`: every row was purged).
    pub output: Option<LakeFile>,
    /// Rows whose content was purged.
    pub blanked: u64,
    /// Rows removed.
    pub dropped: u64,
}

impl Rewritten {
    /// The commit that replaces the inputs with the output.
    pub fn replace(&self) -> Replace {
        Replace {
            // month partitions are the backfilled history's
            table: if self.job.key.span() == Span::Month {
                Table::History
            } else {
                Table::Events
            },
            removes: self.job.inputs.clone(),
            add: self.output.clone(),
            data_change: self.blanked + self.dropped > 0,
            ..Default::default()
        }
    }
}

/// One commit of compaction or purge, or of a backfill's batch (files appended, and the
/// batch number).
#[derive(Debug, Clone, Default)]
pub struct Replace {
    /// The table (`events`, the quarantine for a purge of its rows, or the history).
    pub table: Table,
    /// Files leaving the table.
    pub removes: Vec<LakeFile>,
    /// The file replacing them.
    pub add: Option<LakeFile>,
    /// Whether rows changed (a purge) rather than only moved (a compaction).
    pub data_change: bool,
    /// The purge's new progress (the newest add time whose facts were applied), if this
    /// commit records one.
    pub purge_mark: Option<i64>,
    /// Files a backfill batch appends (new rows: `dataChange = true`).
    pub appends: Vec<LakeFile>,
    /// The backfill batch this commit completes (the history table's `txn`).
    pub batch: Option<i64>,
}

impl Replace {
    /// Every file the commit adds.
    pub fn added(&self) -> impl Iterator<Item = &LakeFile> {
        self.add.iter().chain(self.appends.iter())
    }

    /// Whether `log` shows the commit landed: every file it adds is committed there, or, when it
    /// adds none, every file it removes is gone.
    pub fn landed(&self, log: &LogState) -> bool {
        match self.added().next() {
            Some(_) => self.added().all(|a| log.files.contains_key(&a.path)),
            None => {
                !self.removes.is_empty()
                    && self
                        .removes
                        .iter()
                        .all(|f| !log.files.contains_key(&f.path))
            }
        }
    }
}

/// Commits `r` to its table's log (`state`): `Ok(false)` (nothing committed) when one of its
/// inputs is no longer in the table (retention removed it meanwhile); the caller deletes the
/// output.
pub async fn commit_replace(
    lake: &Lake,
    state: &mut LogState,
    r: &Replace,
) -> Result<bool, CheckpointError> {
    if r.removes.iter().any(|f| !state.files.contains_key(&f.path)) {
        return Ok(false);
    }
    let now = crate::model::cursor::now_us() / 1000;
    let mut actions = Vec::new();
    if state.version.is_none() {
        // the history table's first commit creates it (the live tables are created at start)
        actions.extend(delta::create_actions(r.table, now)?);
    } else if let Some(m) = state.schema_update(r.table)? {
        actions.push(m);
    }
    for f in &r.removes {
        actions.push(delta::remove_action(r.table, f, r.data_change, now)?);
    }
    if let Some(f) = &r.add {
        actions.push(delta::add_action(r.table, f, r.data_change, now)?);
    }
    for f in &r.appends {
        actions.push(delta::add_action(r.table, f, true, now)?);
    }
    if let Some(m) = r.purge_mark {
        actions.push(delta::txn(PURGE_APP_ID, m, now));
    }
    if let Some(b) = r.batch {
        actions.push(delta::txn(delta::BACKFILL_APP_ID, b, now));
    }
    if actions.is_empty() {
        return Ok(true);
    }
    let append = r.removes.is_empty() && r.add.is_none();
    let op = match (append, r.data_change) {
        (true, _) => "WRITE",
        (false, true) => "DELETE",
        (false, false) => "OPTIMIZE",
    };
    let mut info = if append {
        serde_json::json!({"backfill": {"batch": r.batch, "files": r.appends.len()}})
    } else {
        serde_json::json!({"compaction": {
            "inputs": r.removes.len(),
            "purge": r.data_change,
        }})
    };
    // the endpoints travel on, so a checkpoint after a long run of rewrites still finds them
    if let Some(p) = &state.positions {
        let what = info.clone();
        info = delta::positions_info(p.clone());
        if let (Some(o), Some(w)) = (info.as_object_mut(), what.as_object()) {
            o.extend(w.clone());
        }
    }
    match delta::commit(lake, r.table, state, op, info, actions).await? {
        CommitOutcome::Committed(_) => Ok(true),
        CommitOutcome::Conflict(v) => {
            metrics::counter!("atlake_broken_invariants_total").increment(1);
            Err(CheckpointError::Corrupt {
                path: r.table.log_path(&delta::commit_name(v)),
                message: "another writer committed this version".into(),
            })
        }
    }
}

/// Where a pass's commits go: straight to the log (`atlake compact`), or to the daemon's
/// committer, which owns the log while ingest runs.
pub trait Submit {
    /// Commits `r`; `Ok(false)` if its inputs had left the table.
    fn submit(&mut self, r: Replace) -> impl Future<Output = Result<bool, CheckpointError>> + Send;
}

/// A commit for the daemon's committer and where its answer goes.
pub type RewriteRequest = (
    Replace,
    tokio::sync::oneshot::Sender<Result<bool, CheckpointError>>,
);

/// Hands commits (the compactor's, the backfill's) to the daemon's committer, which owns the
/// logs while ingest runs.
#[derive(Debug, Clone)]
pub struct ToCommitter(pub tokio::sync::mpsc::Sender<RewriteRequest>);

impl Submit for ToCommitter {
    fn submit(&mut self, r: Replace) -> impl Future<Output = Result<bool, CheckpointError>> + Send {
        let tx = self.0.clone();
        async move {
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.send((r, reply))
                .await
                .map_err(|_| CheckpointError::Stopped)?;
            answer.await.map_err(|_| CheckpointError::Stopped)?
        }
    }
}

/// Commits straight to the logs (the caller holds the writer lease and no one else commits).
pub struct Direct<'a> {
    /// The lake.
    pub lake: &'a Lake,
    /// Both logs.
    pub logs: &'a mut super::Logs,
}

impl Submit for Direct<'_> {
    fn submit(&mut self, r: Replace) -> impl Future<Output = Result<bool, CheckpointError>> + Send {
        let (lake, state) = (self.lake, self.logs.get_mut(r.table));
        async move { commit_replace(lake, state, &r).await }
    }
}

/// A hash of the inputs' paths: the output's name differs from every input's.
fn name_hash(inputs: &[LakeFile]) -> u32 {
    let mut h =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    for f in inputs {
        h.write(f.path.as_bytes());
        h.write_u8(0);
    }
    h.write(b"compacted");
    (h.finish() >> 32) as u32
}

/// Rewrites `job`'s inputs into one file of `job.key`, purging with `facts`; the output is
/// durable but not committed.
pub async fn rewrite(
    lake: &Lake,
    policy: &Policy,
    job: Job,
    facts: Arc<Facts>,
) -> Result<Rewritten, CheckpointError> {
    let mut origins = Vec::with_capacity(job.inputs.len());
    for f in &job.inputs {
        origins.push((Origin::of(lake, f), f.path.clone()));
    }
    let first = job.inputs.iter().map(|f| f.name.first()).min();
    let last = job.inputs.iter().map(|f| f.name.last()).max();
    let (Some(first), Some(last)) = (first, last) else {
        return Err(CheckpointError::Corrupt {
            path: job.key.dir(),
            message: "a compaction job without inputs".into(),
        });
    };
    let name = FileName::try_new(first, last, name_hash(&job.inputs)).map_err(|e| {
        CheckpointError::Corrupt {
            path: job.key.dir(),
            message: e.to_string(),
        }
    })?;
    let rel = format!("{}/{}", job.key.dir(), name.render());
    // first pass: rows kept and distinct DIDs (the bloom filter is sized by them)
    let (o2, name2, f2, p2) = (
        origins.clone(),
        job.key.name.clone(),
        facts.clone(),
        policy.clone(),
    );
    let (rows, blanked, dropped, ndv) =
        tokio::task::spawn_blocking(move || count_pass(&o2, &name2, &f2, &p2))
            .await
            .map_err(|e| CheckpointError::File {
                path: rel.clone(),
                message: e.to_string(),
            })??;
    if rows == 0 {
        return Ok(Rewritten {
            job,
            output: None,
            blanked,
            dropped,
        });
    }
    let kind = TableKind::Events(None);
    let meta = FileMeta {
        source: job.source,
        first: first.value(),
        last: last.value(),
        partition: job.key.dir(),
    };
    let props = properties(&policy.writer, kind, &meta, rows as usize, ndv, &[]).map_err(|e| {
        CheckpointError::File {
            path: rel.clone(),
            message: e.to_string(),
        }
    })?;
    let by_collection = job.key.name == PartitionName::Other;
    let target = schema(kind);
    let m = Merge {
        origins,
        name: job.key.name.clone(),
        facts,
        target,
        by_collection,
        policy: policy.clone(),
    };
    let size = lake
        .put_with(&rel, move |out| {
            merge(&m, props, out).map_err(std::io::Error::other)
        })
        .await?;
    let mut output =
        crate::sink::partition::parse_path(&rel, size).ok_or_else(|| CheckpointError::Corrupt {
            path: rel.clone(),
            message: "a compaction output is not a data file path".into(),
        })?;
    output.rows = Some(rows);
    Ok(Rewritten {
        job,
        output: Some(output),
        blanked,
        dropped,
    })
}

/// Rows kept, blanked and dropped, and distinct DIDs kept, over `origins`.
fn count_pass(
    origins: &[(Origin, String)],
    name: &PartitionName,
    facts: &Facts,
    policy: &Policy,
) -> Result<(u64, u64, u64, usize), CheckpointError> {
    let (mut rows, mut blanked, mut dropped) = (0u64, 0u64, 0u64);
    let mut dids = HashSet::new();
    let hasher =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
    for (o, path) in origins {
        for b in o.open(path, Some(KEY_COLUMNS), 8192)? {
            let b = b.map_err(|e| CheckpointError::File {
                path: path.clone(),
                message: e.to_string(),
            })?;
            policy.cancelled()?;
            let v = verdicts(facts, name, &b, path)?;
            let did = b
                .column_by_name("did")
                .and_then(|a| a.as_string_opt::<i32>())
                .ok_or_else(|| CheckpointError::File {
                    path: path.clone(),
                    message: "column `did` is missing or not Utf8".into(),
                })?;
            for (i, v) in v.iter().enumerate() {
                match v {
                    Verdict::Drop => dropped += 1,
                    v => {
                        rows += 1;
                        blanked += u64::from(*v == Verdict::Blank);
                        dids.insert(hasher.hash_one(did.value(i)));
                    }
                }
            }
        }
    }
    Ok((rows, blanked, dropped, dids.len()))
}

/// A batch with exactly `target`'s columns: missing nullable columns (files of an older
/// schema) become null; anything else that does not match is an error.
pub fn adapt(
    b: RecordBatch,
    target: &SchemaRef,
    path: &str,
) -> Result<RecordBatch, CheckpointError> {
    let err = |m: String| CheckpointError::File {
        path: path.to_string(),
        message: m,
    };
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(target.fields().len());
    for f in target.fields() {
        match b.column_by_name(f.name()) {
            Some(a) if a.data_type() == f.data_type() => cols.push(a.clone()),
            Some(a) => {
                return Err(err(format!(
                    "column `{}` is {} where {} is expected",
                    f.name(),
                    a.data_type(),
                    f.data_type()
                )));
            }
            None if f.is_nullable() => cols.push(new_null_array(f.data_type(), b.num_rows())),
            None => return Err(err(format!("column `{}` is missing", f.name()))),
        }
    }
    RecordBatch::try_new(target.clone(), cols).map_err(|e| err(e.to_string()))
}

/// One input of the merge: its reader and current batch.
struct Input<'a> {
    /// Open from when the merge reaches its smallest key until it is exhausted.
    reader: Option<Batches>,
    /// Its smallest merge key, from the footer's statistics: (collection or "", time).
    min: (String, i64),
    path: &'a str,
    /// Index of the current batch in the live batches.
    slot: usize,
    row: usize,
    rows: usize,
    times: Option<arrow::array::Int64Array>,
    colls: Option<StringArray>,
}

/// The merge key of row `row` of input `i`.
type MergeKey = Reverse<(String, i64, usize, usize)>;

/// What one merge reads and how.
struct Merge {
    /// The inputs, each sorted by time (`_other`: by collection, then time).
    origins: Vec<(Origin, String)>,
    /// Their partition.
    name: PartitionName,
    /// What the purge removes.
    facts: Arc<Facts>,
    /// The output's schema.
    target: SchemaRef,
    /// `_other`: sorted by collection first.
    by_collection: bool,
    /// Cancellation.
    policy: Policy,
}

/// Writes the k-way merge of the inputs, purged and adapted to the target schema, as one
/// Parquet file into `out`.
fn merge(
    m: &Merge,
    props: parquet::file::properties::WriterProperties,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), CheckpointError> {
    let (origins, name, facts, target, by_collection, policy) = (
        &m.origins,
        &m.name,
        &*m.facts,
        &m.target,
        m.by_collection,
        &m.policy,
    );
    let batch_rows = (MERGE_ROWS / origins.len().max(1)).clamp(256, 8192);
    let perr = |e: parquet::errors::ParquetError| CheckpointError::File {
        path: "(compaction output)".into(),
        message: e.to_string(),
    };
    let mut w = ArrowWriter::try_new(out, target.clone(), Some(props)).map_err(perr)?;
    let mut live: Vec<RecordBatch> = Vec::new();
    let mut inputs: Vec<Input<'_>> = Vec::with_capacity(origins.len());
    for (o, path) in origins {
        inputs.push(Input {
            reader: None,
            min: min_key(o, path, by_collection)?,
            path,
            slot: 0,
            row: 0,
            rows: 0,
            times: None,
            colls: None,
        });
    }
    let mut heap: BinaryHeap<MergeKey> = BinaryHeap::new();
    let mut pending: Vec<(usize, usize)> = Vec::new();
    // loads input i's next non-empty batch; false when it is exhausted
    let advance =
        |inp: &mut Input<'_>, live: &mut Vec<RecordBatch>| -> Result<bool, CheckpointError> {
            loop {
                let Some(b) = inp.reader.as_mut().and_then(|r| r.next()) else {
                    // exhausted: its reader (and its decoded pages) go now
                    inp.times = None;
                    inp.reader = None;
                    return Ok(false);
                };
                let b = b.map_err(|e| CheckpointError::File {
                    path: inp.path.to_string(),
                    message: e.to_string(),
                })?;
                let b = purge_batch(adapt(b, target, inp.path)?, facts, name, inp.path)?;
                if b.num_rows() == 0 {
                    continue;
                }
                inp.times = Some(
                    b.column_by_name("time_us")
                        .and_then(|a| a.as_primitive_opt::<Int64Type>())
                        .cloned()
                        .ok_or_else(|| CheckpointError::File {
                            path: inp.path.to_string(),
                            message: "column `time_us` is not Int64".into(),
                        })?,
                );
                inp.colls = if by_collection {
                    // `_other` files are sorted by collection first: every row has one
                    let c = b
                        .column_by_name("collection")
                        .and_then(|a| a.as_string_opt::<i32>())
                        .filter(|c| c.null_count() == 0)
                        .cloned()
                        .ok_or_else(|| CheckpointError::File {
                            path: inp.path.to_string(),
                            message: "an `_other` row without a collection".into(),
                        })?;
                    Some(c)
                } else {
                    None
                };
                inp.rows = b.num_rows();
                inp.row = 0;
                inp.slot = live.len();
                live.push(b);
                return Ok(true);
            }
        };
    let key = |inp: &Input<'_>, i: usize| -> MergeKey {
        // no collection part outside `_other`; a key is only made for a loaded batch
        let coll = match &inp.colls {
            Some(c) => c.value(inp.row).to_string(),
            None => String::new(),
        };
        let t = inp.times.as_ref().map_or(i64::MIN, |t| t.value(inp.row));
        Reverse((coll, t, i, inp.row))
    };
    // inputs are opened in the order of their smallest key, only when the merge reaches it:
    // the files of a partition cover mostly consecutive stretches of time, so few are open at
    // once, and memory is their decoded pages, not every input's
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by(|a, b| inputs[*a].min.cmp(&inputs[*b].min));
    let mut next_open = 0;
    let flush = |pending: &mut Vec<(usize, usize)>,
                 live: &mut Vec<RecordBatch>,
                 inputs: &mut [Input<'_>],
                 w: &mut ArrowWriter<&mut (dyn std::io::Write + Send)>|
     -> Result<(), CheckpointError> {
        policy.cancelled()?;
        if !pending.is_empty() {
            let mut cols = Vec::with_capacity(target.fields().len());
            for c in 0..target.fields().len() {
                let arrays: Vec<&dyn Array> = live.iter().map(|b| b.column(c).as_ref()).collect();
                cols.push(arrow::compute::interleave(&arrays, pending).map_err(|e| {
                    CheckpointError::File {
                        path: "(compaction output)".into(),
                        message: e.to_string(),
                    }
                })?);
            }
            let batch =
                RecordBatch::try_new(target.clone(), cols).map_err(|e| CheckpointError::File {
                    path: "(compaction output)".into(),
                    message: e.to_string(),
                })?;
            w.write(&batch).map_err(perr)?;
            pending.clear();
        }
        // keep only the batches inputs still read from
        let mut kept = Vec::new();
        for inp in inputs.iter_mut().filter(|i| i.times.is_some()) {
            kept.push(live[inp.slot].clone());
            inp.slot = kept.len() - 1;
        }
        *live = kept;
        Ok(())
    };
    loop {
        while let Some(&i) = order.get(next_open) {
            if let Some(Reverse((c, t, _, _))) = heap.peek()
                && inputs[i].min > (c.clone(), *t)
            {
                break;
            }
            let inp = &mut inputs[i];
            inp.reader = Some(origins[i].0.open(inp.path, None, batch_rows)?);
            if advance(inp, &mut live)? {
                heap.push(key(inp, i));
            }
            next_open += 1;
        }
        let Some(Reverse((_, _, i, row))) = heap.pop() else {
            break;
        };
        pending.push((inputs[i].slot, row));
        let inp = &mut inputs[i];
        inp.row += 1;
        if inp.row < inp.rows {
            heap.push(key(inp, i));
        } else {
            // the batch is done: write what refers to it before it may be dropped
            if live.len() > 2 * inputs.len() || pending.len() >= SLICE_ROWS {
                flush(&mut pending, &mut live, &mut inputs, &mut w)?;
            }
            let inp = &mut inputs[i];
            if advance(inp, &mut live)? {
                heap.push(key(inp, i));
            }
        }
        if pending.len() >= SLICE_ROWS {
            flush(&mut pending, &mut live, &mut inputs, &mut w)?;
        }
    }
    flush(&mut pending, &mut live, &mut inputs, &mut w)?;
    w.close().map_err(perr)?;
    Ok(())
}

/// Whether `f` holds rows the purge would change.
async fn needs_purge(
    lake: &Lake,
    f: &LakeFile,
    facts: Arc<Facts>,
) -> Result<bool, CheckpointError> {
    if f.key.name == PartitionName::Account {
        return Ok(false);
    }
    let origin = Origin::of(lake, f);
    let (path, name) = (f.path.clone(), f.key.name.clone());
    tokio::task::spawn_blocking(move || {
        for b in origin.open(&path, Some(KEY_COLUMNS), 8192)? {
            let b = b.map_err(|e| CheckpointError::File {
                path: path.clone(),
                message: e.to_string(),
            })?;
            if verdicts(&facts, &name, &b, &path)?
                .iter()
                .any(|v| *v != Verdict::Keep)
            {
                return Ok(true);
            }
        }
        Ok(false)
    })
    .await
    .map_err(|e| CheckpointError::File {
        path: f.path.clone(),
        message: e.to_string(),
    })?
}

/// Which rows of a quarantine batch the purge removes: those of an account deleted or taken
/// down after them, and those whose op path (`collection/rkey`) names a record deleted after
/// them. Quarantined bytes cannot be blanked like a record's content (they are the row), so
/// such rows go whole. Rows without a DID stay: nothing ties them to an account.
fn quarantine_drops(
    facts: &Facts,
    b: &RecordBatch,
    path: &str,
) -> Result<Vec<bool>, CheckpointError> {
    let col = |n: &str| {
        b.column_by_name(n).ok_or_else(|| CheckpointError::File {
            path: path.to_string(),
            message: format!("quarantine column `{n}` is missing"),
        })
    };
    let bad = |n: &str| CheckpointError::File {
        path: path.to_string(),
        message: format!("quarantine column `{n}` has the wrong type"),
    };
    let did = col("did")?
        .as_string_opt::<i32>()
        .ok_or_else(|| bad("did"))?;
    let op = col("path")?
        .as_string_opt::<i32>()
        .ok_or_else(|| bad("path"))?;
    let time = col("time_us")?
        .as_primitive_opt::<Int64Type>()
        .ok_or_else(|| bad("time_us"))?;
    (0..b.num_rows())
        .map(|i| -> Result<bool, CheckpointError> {
            let Some(d) = opt(did, i) else {
                return Ok(false);
            };
            let t = time.value(i);
            if facts.account_deleted(d)?.is_some_and(|at| t < at) {
                return Ok(true);
            }
            let Some((c, r)) = opt(op, i).and_then(|p| p.split_once('/')) else {
                return Ok(false);
            };
            Ok(facts.record_deleted(d, c, r)?.is_some_and(|at| t < at))
        })
        .collect()
}

/// Rewrites a quarantine file without the rows the purge removes: `None` when it holds none,
/// else the durable (not committed) file that replaces it (`None` inside when no row is
/// left) and how many rows went.
async fn purge_quarantine(
    lake: &Lake,
    policy: &Policy,
    f: &LakeFile,
    facts: Arc<Facts>,
) -> Result<Option<(Option<LakeFile>, u64)>, CheckpointError> {
    let origin = Origin::of(lake, f);
    let (path, cfg) = (f.path.clone(), policy.writer.clone());
    let name = FileName::try_new(
        f.name.first(),
        f.name.last(),
        name_hash(std::slice::from_ref(f)),
    )
    .map_err(|e| CheckpointError::Corrupt {
        path: f.path.clone(),
        message: e.to_string(),
    })?;
    let rel = format!("{}/{}", f.key.dir(), name.render());
    let meta = FileMeta {
        source: f.name.source(),
        first: f.name.first().value(),
        last: f.name.last().value(),
        partition: f.key.dir(),
    };
    let kept = tokio::task::spawn_blocking(move || {
        let err = |e: &dyn std::fmt::Display| CheckpointError::File {
            path: path.clone(),
            message: e.to_string(),
        };
        let mut kept = Vec::new();
        let mut dropped = 0u64;
        for b in origin.open(&path, None, 8192)? {
            let b = b.map_err(|e| err(&e))?;
            let drops = quarantine_drops(&facts, &b, &path)?;
            let n = drops.iter().filter(|d| **d).count();
            if n == 0 {
                kept.push(b);
                continue;
            }
            dropped += n as u64;
            let keep = BooleanArray::from(drops.iter().map(|d| !*d).collect::<Vec<_>>());
            let b = arrow::compute::filter_record_batch(&b, &keep).map_err(|e| err(&e))?;
            if b.num_rows() > 0 {
                kept.push(b);
            }
        }
        Ok::<_, CheckpointError>((kept, dropped))
    })
    .await
    .map_err(|e| CheckpointError::File {
        path: f.path.clone(),
        message: e.to_string(),
    })??;
    let (kept, dropped) = kept;
    if dropped == 0 {
        return Ok(None);
    }
    let rows: usize = kept.iter().map(|b| b.num_rows()).sum();
    if rows == 0 {
        return Ok(Some((None, dropped)));
    }
    let target = schema(TableKind::Errors);
    let props = properties(&cfg, TableKind::Errors, &meta, rows, 1, &[]).map_err(|e| {
        CheckpointError::File {
            path: rel.clone(),
            message: e.to_string(),
        }
    })?;
    let out_path = rel.clone();
    let size = lake
        .put_with(&rel, move |out| {
            let mut w = ArrowWriter::try_new(out, target.clone(), Some(props))
                .map_err(std::io::Error::other)?;
            for b in &kept {
                let b = adapt(b.clone(), &target, &out_path).map_err(std::io::Error::other)?;
                w.write(&b).map_err(std::io::Error::other)?;
            }
            w.close().map_err(std::io::Error::other)?;
            Ok(())
        })
        .await?;
    let mut output =
        crate::sink::partition::parse_path(&rel, size).ok_or_else(|| CheckpointError::Corrupt {
            path: rel.clone(),
            message: "a purged quarantine file is not a data file path".into(),
        })?;
    output.rows = Some(rows as u64);
    Ok(Some((Some(output), dropped)))
}

/// One pass over the tables as `logs` shows them: compaction of closed partitions of
/// `events`, then (when due) the purge scan of `events` and of the quarantine, each rewrite
/// committed through `submit` on its own. A rewrite whose inputs left the table meanwhile has
/// its output deleted.
pub async fn pass<S: Submit>(
    lake: &Lake,
    logs: &super::Logs,
    policy: &Policy,
    now_us: i64,
    submit: &mut S,
) -> Result<Stats, CheckpointError> {
    let state = &logs.events;
    let mut stats = Stats::default();
    if state.version.is_none() {
        return Ok(stats);
    }
    let now_ms = now_us / 1000;
    let mark = state.txns.get(PURGE_APP_ID).copied();
    let newest_add = state.added.values().copied().max();
    let purge_due = policy.purge
        && mark.is_none_or(|(_, at)| now_ms.saturating_sub(at) >= policy.purge_every_ms);
    let facts = if policy.purge {
        let from = mark.map_or(i64::MIN, |(m, _)| m.saturating_sub(FACT_OVERLAP_MS));
        // a history batch committed since: its records may have been deleted long before it
        // was committed (a repo fetched, then deleted from live before the batch landed), so
        // the scan takes every delete of the lake, not only the recent ones
        let every = purge_due && logs.history.added.values().any(|t| *t > from);
        let files: Vec<LakeFile> = state
            .files
            .values()
            .filter(|f| every || state.added.get(&f.path).is_none_or(|t| *t > from))
            .cloned()
            .collect();
        load_facts(lake, &files, &policy.facts).await?
    } else {
        Facts::default()
    };
    let facts = Arc::new(facts);
    let jobs = plan(state, policy, now_us)?;
    let mut in_jobs: HashSet<String> = HashSet::new();
    for j in &jobs {
        in_jobs.extend(j.inputs.iter().map(|f| f.path.clone()));
    }
    let mut all = jobs;
    if purge_due && !facts.is_empty() {
        stats.purge_scan = true;
        for f in state.files.values() {
            if Table::of(f) == Some(Table::Events)
                && f.key.span() != Span::Month
                && !in_jobs.contains(&f.path)
                && needs_purge(lake, f, facts.clone()).await?
            {
                all.push(Job {
                    key: f.key.clone(),
                    source: f.name.source(),
                    inputs: vec![f.clone()],
                });
            }
        }
        // the backfilled history: a record deleted, or an account deleted or taken down, since
        // its repo was fetched
        for f in logs.history.files.values() {
            policy.cancelled()?;
            if needs_purge(lake, f, facts.clone()).await? {
                all.push(Job {
                    key: f.key.clone(),
                    source: f.name.source(),
                    inputs: vec![f.clone()],
                });
            }
        }
    } else if purge_due {
        stats.purge_scan = true;
    }
    if purge_due && !facts.is_empty() {
        // the quarantine: rows that name a deleted account, or a record deleted after them
        for f in logs.errors.files.values() {
            policy.cancelled()?;
            if Table::of(f) != Some(Table::Errors) {
                continue;
            }
            let Some((output, dropped)) = purge_quarantine(lake, policy, f, facts.clone()).await?
            else {
                continue;
            };
            let r = Replace {
                table: Table::Errors,
                removes: vec![f.clone()],
                add: output.clone(),
                data_change: true,
                ..Default::default()
            };
            if submit.submit(r).await? {
                stats.quarantine_files += 1;
                stats.quarantine_dropped += dropped;
            } else if let Some(o) = &output {
                stats.stale += 1;
                lake.delete(&o.path).await?;
            }
        }
    }
    for job in all {
        policy.cancelled()?;
        let r = rewrite(lake, policy, job, facts.clone()).await?;
        // on an error the output stays: the commit may have landed, and if it did not, the
        // next start removes the file as uncommitted
        if submit.submit(r.replace()).await? {
            stats.inputs += r.job.inputs.len();
            stats.outputs += usize::from(r.output.is_some());
            stats.blanked += r.blanked;
            stats.dropped += r.dropped;
        } else {
            stats.stale += 1;
            if let Some(o) = &r.output {
                lake.delete(&o.path).await?;
            }
        }
    }
    if purge_due && let Some(m) = newest_add {
        submit
            .submit(Replace {
                purge_mark: Some(m),
                ..Default::default()
            })
            .await?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Cursor;

    fn file(name: &str, hour: i64, first: i64, size: u64) -> LakeFile {
        let key = PartitionKey::at_hour(PartitionName::parse(name).unwrap(), hour).unwrap();
        let n = FileName::try_new(
            Cursor::seq(first).unwrap(),
            Cursor::seq(first + 1).unwrap(),
            1,
        )
        .unwrap();
        crate::sink::partition::parse_path(&format!("{}/{}", key.dir(), n.render()), size).unwrap()
    }

    fn policy() -> Policy {
        Policy {
            grace_us: HOUR_US,
            small_day_bytes: 1000,
            max_input_bytes: 10_000,
            include_open: false,
            purge: true,
            purge_every_ms: 3_600_000,
            writer: WriterConfig::default(),
            compact: true,
            facts: facts::Budget::default(),
            cancel: None,
        }
    }

    fn state(files: &[LakeFile]) -> LogState {
        let mut s = LogState::default();
        s.version = Some(1);
        for f in files {
            s.files.insert(f.path.clone(), f.clone());
            s.added.insert(f.path.clone(), 0);
        }
        s
    }

    /// Closed hours of a big collection become one file each; a long-tail collection's closed
    /// day becomes one day file; open hours, single files and the quarantine are left alone;
    /// an hour over the input cap is split.
    #[test]
    fn plans_closed_hours_days_and_splits() {
        let day0 = 493_000 * 24;
        let big = "app.bsky.feed.like";
        let files = vec![
            file(big, day0 + 1, 1, 600),
            file(big, day0 + 1, 3, 600),
            file(big, day0 + 2, 5, 600),
            file(big, day0 + 3, 7, 6000),
            file(big, day0 + 3, 9, 6000),
            file("xyz.tail.thing", day0 + 1, 11, 10),
            file("xyz.tail.thing", day0 + 5, 13, 10),
            file(big, day0 + 30, 15, 10),
            file(big, day0 + 30, 17, 10),
        ];
        let st = state(&files);
        let now = (day0 + 31) * HOUR_US + HOUR_US / 2;
        let jobs = plan(&st, &policy(), now).unwrap();
        let summary: Vec<(String, Span, usize)> = jobs
            .iter()
            .map(|j| (j.key.dir(), j.key.span(), j.inputs.len()))
            .collect();
        // hour 1 of the big collection: one job of two; hour 2 has one file; hour 3 is over the
        // cap (two files of 6000 > 10000): each file alone, so no job; the tail's day: one
        // day job; day 1's hour 30 is still open (grace)
        assert_eq!(summary.len(), 2, "{summary:?}");
        assert_eq!(summary[0].1, Span::Hour);
        assert_eq!(summary[0].2, 2);
        assert_eq!(summary[1].1, Span::Day);
        assert!(summary[1].0.contains("xyz.tail.thing"));
        assert_eq!(summary[1].2, 2);
        // with --open, the open hour goes too
        let mut p = policy();
        p.include_open = true;
        assert_eq!(plan(&st, &p, now).unwrap().len(), 3);
        // a cap that fits both files of hour 3 joins them
        p.max_input_bytes = 20_000;
        p.include_open = false;
        assert_eq!(plan(&st, &p, now).unwrap().len(), 3);
    }

    /// Rewrites carry the endpoints on: after more commits of compaction than a checkpoint
    /// interval, the log still knows them.
    #[tokio::test]
    async fn a_long_run_of_rewrites_keeps_the_endpoints() {
        let lake = Lake::open("memory://").unwrap();
        let mut st = LogState::default();
        let mut actions = delta::create_actions(Table::Events, 1).unwrap();
        actions.push(delta::txn_action(SourceKind::Jetstream, 42, 1));
        let positions = serde_json::json!({"jetstream": {"cursor": 42, "url": "wss://js"}});
        delta::commit(
            &lake,
            Table::Events,
            &mut st,
            "CREATE TABLE",
            delta::positions_info(positions.clone()),
            actions,
        )
        .await
        .unwrap();
        for i in 0..(2 * delta::CHECKPOINT_INTERVAL + 20) as i64 {
            let r = Replace {
                purge_mark: Some(i),
                ..Default::default()
            };
            assert!(commit_replace(&lake, &mut st, &r).await.unwrap());
        }
        let back = delta::load(&lake, Table::Events).await.unwrap();
        assert_eq!(back.positions, Some(positions));
        assert_eq!(back.txns.get(PURGE_APP_ID).map(|t| t.0), Some(219));
        assert_eq!(back.txn(SourceKind::Jetstream).map(|t| t.0), Some(42));
    }

    /// A row of [`write_posts`]: did, rkey, operation, time (µs), cid.
    type Post<'a> = (&'a str, &'a str, &'a str, i64, Option<&'a str>);

    /// Writes `rows` of `app.bsky.feed.post` as an `events`-schema file at `path`.
    async fn write_posts(lake: &Lake, path: &str, rows: &[Post<'_>]) -> LakeFile {
        use arrow::array::Int64Array;
        let target = schema(TableKind::Events(None));
        let n = rows.len();
        let strs = |f: &dyn Fn(&Post<'_>) -> Option<String>| -> ArrayRef {
            Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
        };
        let times: ArrayRef = Arc::new(Int64Array::from(
            rows.iter().map(|r| r.3).collect::<Vec<_>>(),
        ));
        let cols: Vec<ArrayRef> = target
            .fields()
            .iter()
            .map(|fl| match fl.name().as_str() {
                "did" => strs(&|r| Some(r.0.to_string())),
                "rkey" => strs(&|r| Some(r.1.to_string())),
                "operation" => strs(&|r| Some(r.2.to_string())),
                "cid" => strs(&|r| r.4.map(str::to_string)),
                "record" => strs(&|r| r.4.map(|c| format!("{{\"text\":\"{c}\"}}"))),
                "collection" => strs(&|_| Some("app.bsky.feed.post".into())),
                "kind" => strs(&|_| Some("commit".into())),
                "time_us" => times.clone(),
                "time" => arrow::compute::cast(&times, fl.data_type()).unwrap(),
                _ => new_null_array(fl.data_type(), n),
            })
            .collect();
        let b = RecordBatch::try_new(target.clone(), cols).unwrap();
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, target, None).unwrap();
        w.write(&b).unwrap();
        w.close().unwrap();
        let size = buf.len() as u64;
        lake.put_atomic(path, bytes::Bytes::from(buf))
            .await
            .unwrap();
        crate::sink::partition::parse_path(path, size).unwrap()
    }

    /// A history batch committed long after a record of it was deleted live (the delete's file
    /// added more than the overlap before the purge's mark) is still purged of it: a scan that
    /// finds a history file added since its mark takes every delete of the lake.
    #[tokio::test]
    async fn a_history_batch_committed_after_the_mark_meets_older_deletes() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = Lake::open(tmp.path().to_str().unwrap()).unwrap();
        let alice = "did:plc:aliceaaaaaaaaaaaaaaaaaaa";
        let hour = 473_357; // 2024-01-01T05
        let t = hour * HOUR_US;
        let hms = 3_600_000;
        // the live delete of alice's post r1, added at 1 s; the purge's mark at 10 h
        let del = file("app.bsky.feed.post", hour, 1, 0).path;
        let del = write_posts(&lake, &del, &[(alice, "r1", "delete", t + 10, None)]).await;
        // a table created with one file added at `at` (ms), and `more` actions
        let create = |table: Table, f: LakeFile, at: i64, more: Vec<serde_json::Value>| {
            let lake = lake.clone();
            async move {
                let mut actions = delta::create_actions(table, at).unwrap();
                actions.push(delta::add_action(table, &f, true, at).unwrap());
                actions.extend(more);
                let mut st = LogState::default();
                delta::commit(
                    &lake,
                    table,
                    &mut st,
                    "WRITE",
                    serde_json::json!({}),
                    actions,
                )
                .await
                .unwrap();
            }
        };
        let mark = delta::txn(PURGE_APP_ID, 10 * hms, 10 * hms);
        create(Table::Events, del, 1000, vec![mark]).await;
        // the repo's snapshot, fetched before the delete, committed at 11 h
        let hist = "history/collection=app.bsky.feed.post/month=2024-01/rp-1-1-00000001.parquet";
        let hist = write_posts(
            &lake,
            hist,
            &[
                (alice, "r1", "create", t - 5, Some("bafyreigone")),
                (alice, "r2", "create", t - 4, Some("bafyreikept")),
            ],
        )
        .await;
        create(Table::History, hist.clone(), 11 * hms, vec![]).await;
        let mut logs = super::super::Logs::load(&lake).await.unwrap();
        let mut p = policy();
        p.compact = false;
        let now_us = 20 * hms * 1000;
        let seen = logs.clone();
        let stats = pass(
            &lake,
            &seen,
            &p,
            now_us,
            &mut Direct {
                lake: &lake,
                logs: &mut logs,
            },
        )
        .await
        .unwrap();
        assert!(stats.purge_scan);
        assert_eq!(
            (stats.blanked, stats.inputs, stats.outputs),
            (1, 1, 1),
            "{stats:?}"
        );
        let logs = super::super::Logs::load(&lake).await.unwrap();
        assert!(!logs.history.files.contains_key(&hist.path));
        let out = logs.history.files.values().next().unwrap();
        let origin = Origin::of(&lake, out);
        let mut cids = Vec::new();
        for b in origin
            .open(&out.path, Some(&["rkey", "cid"]), 8192)
            .unwrap()
        {
            let b = b.unwrap();
            let (r, c) = (
                b.column(0).as_string::<i32>(),
                b.column(1).as_string::<i32>(),
            );
            cids.extend(
                (0..b.num_rows()).map(|i| (r.value(i).to_string(), opt(c, i).map(str::to_string))),
            );
        }
        assert_eq!(
            cids,
            vec![
                ("r1".to_string(), None),
                ("r2".to_string(), Some("bafyreikept".to_string()))
            ]
        );
    }
}
