//! The checkpoint and start-up recovery.
//!
//! **Invariant**: the checkpoint cursor `C` of a source means every event that source delivered
//! with a cursor `≤ C` is in a committed file. Since the lake has a Delta log ([`delta`]), `C`
//! is the `txn` action of the `events` table's log (app id per source), committed in the same
//! commit as the files that justify it; so the log alone says what is durable. Lakes from
//! before the log kept `C` in `_atlake/checkpoint.json`: the first writer converts them
//! ([`recover`]), and readers read them as they are.
//!
//! **Recovery**: committed files may hold events beyond `C` (partitions flush independently).
//! On start we read the tables' logs (not a listing of the lake) and read the dedupe keys of
//! every committed row beyond `C` (minus the Jetstream rewind) from the files themselves. Beside
//! the writer, a [`sweep`] then lists the lake and removes temporary leftovers and data files no
//! commit names (written by a process that died before committing them: their events are beyond
//! `C` and come again), never one this process has written. The stream is resumed from `C`; a replayed
//! event whose key is already durable is skipped. Nothing depends on which partition an event
//! landed in, so the `_other` routing (which depends on what was open) cannot cause
//! duplicates.

pub mod compact;
pub mod delta;
pub mod facts;
pub mod retention;

use crate::model::key::{EventKey, KeyParts, error_key_of, key_of};
use crate::model::rows::TableKind;
use crate::model::{Cursor, SourceKind};
use crate::sink::partition::{LakeFile, STATE_DIR, parse_path};
use crate::sink::store::{Lake, StoreError};
use arrow::array::{Array, AsArray, BinaryArray, Int64Array, StringArray};
use arrow::datatypes::Int64Type;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Lake-relative path of the checkpoint of lakes from before the Delta log.
pub fn checkpoint_path() -> String {
    format!("{STATE_DIR}/checkpoint.json")
}

/// Why the checkpoint or recovery failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The checkpoint file is not valid JSON of the expected shape.
    #[error("corrupt checkpoint {path}: {message}")]
    Corrupt {
        /// where
        path: String,
        /// why
        message: String,
    },
    /// The work was stopped (shutdown), or the task that commits it has ended.
    #[error("stopped before it was committed")]
    Stopped,
    /// The writer lease could not be taken (another writer holds it).
    #[error(transparent)]
    Lease(#[from] crate::sink::lease::LeaseError),
    /// The deletion facts could not be held or read.
    #[error(transparent)]
    Facts(#[from] facts::FactsError),
    /// A data file could not be read back.
    #[error("reading {path}: {message}")]
    File {
        /// which
        path: String,
        /// why
        message: String,
    },
}

impl From<crate::sink::read::ReadError> for CheckpointError {
    fn from(e: crate::sink::read::ReadError) -> CheckpointError {
        CheckpointError::File {
            path: e.path,
            message: e.message,
        }
    }
}

/// The endpoint of a position the log does not record.
pub const UNKNOWN_URL: &str = "";

/// One source's position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    /// Every event with a cursor at or below this is durable.
    pub cursor: i64,
    /// The endpoint it came from (informational; relays have separate seq spaces).
    pub url: String,
    /// Wall-clock time of the update (RFC 3339).
    pub updated_at: String,
}

impl SourcePosition {
    /// The position at `cursor`, from `url`, now.
    pub fn new(cursor: Cursor, url: &str) -> SourcePosition {
        SourcePosition {
            cursor: cursor.value(),
            url: url.to_string(),
            updated_at: crate::syntax::format_datetime_ms(crate::model::cursor::now_us()),
        }
    }
}

/// The checkpoint file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version.
    pub version: u32,
    /// Firehose position (relay seq).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firehose: Option<SourcePosition>,
    /// Jetstream position (`time_us`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jetstream: Option<SourcePosition>,
}

impl Checkpoint {
    /// The position of a source kind.
    pub fn position(&self, kind: SourceKind) -> Option<&SourcePosition> {
        match kind {
            SourceKind::Firehose => self.firehose.as_ref(),
            SourceKind::Jetstream => self.jetstream.as_ref(),
            // a backfill's progress is per repository, in its own records (`crate::sink::backfill`)
            SourceKind::Repo => None,
        }
    }

    /// The cursor of a source kind (`None` when absent; an out-of-range value is refused by
    /// [`Checkpoint::load`], so it cannot be here).
    pub fn cursor(&self, kind: SourceKind) -> Option<Cursor> {
        self.position(kind)
            .and_then(|p| Cursor::try_new(kind, p.cursor).ok())
    }

    /// Sets the position of a live source kind; a backfill has no stream position.
    pub fn set(&mut self, kind: SourceKind, pos: SourcePosition) -> Result<(), CheckpointError> {
        match kind {
            SourceKind::Firehose => self.firehose = Some(pos),
            SourceKind::Jetstream => self.jetstream = Some(pos),
            SourceKind::Repo => {
                return Err(CheckpointError::Corrupt {
                    path: checkpoint_path(),
                    message: "a backfill has no stream position".into(),
                });
            }
        }
        Ok(())
    }

    /// Reads the checkpoint of a lake (`None` for a new lake): the `txn` actions of the
    /// `events` table's log, or, for a lake from before the log, `_atlake/checkpoint.json`. A
    /// cursor out of range is an error, not a position.
    pub async fn load(lake: &Lake) -> Result<Option<Checkpoint>, CheckpointError> {
        let log = delta::load(lake, delta::Table::Events).await?;
        if log.version.is_some() {
            return Checkpoint::from_log(&log).map(Some);
        }
        Checkpoint::load_legacy(lake).await
    }

    /// The checkpoint a log's `txn` actions make. The endpoint of each source is taken from
    /// the newest commit's information (it is informational; the cursor is the `txn`).
    pub fn from_log(log: &delta::LogState) -> Result<Checkpoint, CheckpointError> {
        let mut c = Checkpoint {
            version: 1,
            ..Default::default()
        };
        for kind in [SourceKind::Firehose, SourceKind::Jetstream] {
            let Some((cursor, when)) = log.txn(kind) else {
                continue;
            };
            let at = delta::Table::Events.log_path("");
            Cursor::try_new(kind, cursor).map_err(|e| CheckpointError::Corrupt {
                path: at.clone(),
                message: format!("txn {}: {e}", delta::app_id(kind)),
            })?;
            // the endpoint is informational and only commit information records it: a log
            // written by another tool, or whose recording commit is gone, does not say
            let url = match log
                .positions
                .as_ref()
                .and_then(|i| i.get(kind.as_str()))
                .and_then(|p| p.get("url"))
                .and_then(|u| u.as_str())
            {
                Some(u) => u,
                None => UNKNOWN_URL,
            };
            c.set(
                kind,
                SourcePosition {
                    cursor,
                    url: url.to_string(),
                    updated_at: crate::syntax::format_datetime_ms(when.saturating_mul(1000)),
                },
            )?;
        }
        Ok(c)
    }

    /// Reads `_atlake/checkpoint.json`, the checkpoint of lakes from before the Delta log.
    pub async fn load_legacy(lake: &Lake) -> Result<Option<Checkpoint>, CheckpointError> {
        let path = checkpoint_path();
        let Some(b) = lake.get(&path).await? else {
            return Ok(None);
        };
        let c: Checkpoint = serde_json::from_slice(&b).map_err(|e| CheckpointError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        for kind in [SourceKind::Firehose, SourceKind::Jetstream] {
            if let Some(p) = c.position(kind) {
                Cursor::try_new(kind, p.cursor).map_err(|e| CheckpointError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
        }
        Ok(Some(c))
    }

    /// Writes the checkpoint atomically as `_atlake/checkpoint.json`, the format of lakes from
    /// before the Delta log (kept to make such lakes in tests and tools; atlake itself commits
    /// the cursor to the log).
    pub async fn store_legacy(&self, lake: &Lake) -> Result<(), CheckpointError> {
        let mut c = self.clone();
        c.version = 1;
        let body = serde_json::to_vec_pretty(&c).map_err(|e| CheckpointError::Corrupt {
            path: checkpoint_path(),
            message: e.to_string(),
        })?;
        lake.put_atomic(&checkpoint_path(), body.into()).await?;
        Ok(())
    }
}

/// What start-up recovery found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The checkpoint (possibly absent).
    pub checkpoint: Checkpoint,
    /// The cursor to resume from (`None`: live tip).
    pub resume_cursor: Option<Cursor>,
    /// Every committed data file in the lake (and the backfilled history).
    pub files: Vec<LakeFile>,
    /// Keys of durable events beyond the resume point.
    pub durable_keys: HashSet<EventKey>,
    /// Highest cursor among this source's files.
    pub durable_high: Option<Cursor>,
    /// Tables converted from the lake format before the Delta log.
    pub converted: usize,
    /// Files read for keys.
    pub files_scanned: usize,
    /// The `events` and `_errors` logs as read (the writer commits after them).
    pub logs: Logs,
}

/// The tables' logs.
#[derive(Debug, Default, Clone)]
pub struct Logs {
    /// The `events` table.
    pub events: delta::LogState,
    /// The quarantine.
    pub errors: delta::LogState,
    /// The backfilled history (no version until a backfill's recovery gives it its log).
    pub history: delta::LogState,
}

impl Logs {
    /// The log of `t`.
    pub fn get(&self, t: delta::Table) -> &delta::LogState {
        match t {
            delta::Table::Events => &self.events,
            delta::Table::Errors => &self.errors,
            delta::Table::History => &self.history,
        }
    }

    /// The log of `t`, to commit to.
    pub fn get_mut(&mut self, t: delta::Table) -> &mut delta::LogState {
        match t {
            delta::Table::Events => &mut self.events,
            delta::Table::Errors => &mut self.errors,
            delta::Table::History => &mut self.history,
        }
    }

    /// Whether `f` is a backfill file of a batch the history's log does not name yet (beyond its
    /// `txn`, or every one while the history has no log): the backfill's start commits it if
    /// its batch was committed, and removes it if not.
    pub fn awaits_backfill(&self, f: &LakeFile) -> bool {
        f.name.source() == SourceKind::Repo
            && (self.history.version.is_none()
                || self
                    .history
                    .backfill_batch()
                    .is_none_or(|b| f.name.first().value() > b))
    }

    /// Reads every table's log.
    pub async fn load(lake: &Lake) -> Result<Logs, CheckpointError> {
        Ok(Logs {
            events: delta::load(lake, delta::Table::Events).await?,
            errors: delta::load(lake, delta::Table::Errors).await?,
            history: delta::load(lake, delta::Table::History).await?,
        })
    }
}

/// Lists every data file under the lake's data directories (a directory listing, not the
/// log: what is *there*, committed or not).
pub async fn list_files(lake: &Lake) -> Result<Vec<LakeFile>, CheckpointError> {
    let mut files = Vec::new();
    for dir in [
        crate::sink::partition::EVENTS_DIR,
        crate::sink::partition::HISTORY_DIR,
        crate::sink::partition::ERRORS_DIR,
    ] {
        files.extend(list_dir(lake, dir).await?);
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

async fn list_dir(lake: &Lake, dir: &str) -> Result<Vec<LakeFile>, CheckpointError> {
    Ok(lake
        .list(dir)
        .await?
        .into_iter()
        .filter_map(|(path, size)| parse_path(&path, size))
        .collect())
}

/// What a reader sees: the committed files of every table (from their logs; a table without
/// a log, from a lake before the log or a history no backfill has converted yet, is listed),
/// and the checkpoint.
pub async fn lake_state(lake: &Lake) -> Result<(Vec<LakeFile>, Checkpoint), CheckpointError> {
    let logs = Logs::load(lake).await?;
    let mut files = Vec::new();
    for t in delta::Table::EVERY {
        let log = logs.get(t);
        if log.version.is_some() {
            files.extend(log.files.values().cloned());
        } else {
            files.extend(list_dir(lake, t.root()).await?);
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let checkpoint = if logs.events.version.is_some() {
        Checkpoint::from_log(&logs.events)?
    } else {
        // a lake from before the log: its checkpoint file, if it wrote one yet (a lake that
        // crashed before its first checkpoint, or an empty one, has none: no position)
        Checkpoint::load_legacy(lake).await?.unwrap_or_default()
    };
    Ok((files, checkpoint))
}

/// Gives a table without a log its first commit: every data file under its root (a lake from
/// before the log, where a file was committed by being there) and, for `events`, the cursors
/// of `_atlake/checkpoint.json`. One conditional put, so a crash leaves either no log (and the
/// next start converts again) or the whole version 0.
async fn convert(
    lake: &Lake,
    table: delta::Table,
    listed: &[LakeFile],
    legacy: Option<&Checkpoint>,
) -> Result<delta::LogState, CheckpointError> {
    let now = crate::model::cursor::now_us() / 1000;
    let mut actions = delta::create_actions(table, now)?;
    let mine: Vec<&LakeFile> = listed
        .iter()
        .filter(|f| delta::Table::of(f) == Some(table))
        .collect();
    for f in &mine {
        actions.push(delta::add_action(table, f, true, now)?);
    }
    if table == delta::Table::Events
        && let Some(c) = legacy
    {
        for kind in [SourceKind::Firehose, SourceKind::Jetstream] {
            if let Some(p) = c.position(kind) {
                actions.push(delta::txn_action(kind, p.cursor, now));
            }
        }
    }
    let op = if mine.is_empty() && legacy.is_none() {
        "CREATE TABLE"
    } else {
        "CONVERT"
    };
    // the old checkpoint's positions, recorded like every commit that sets a cursor
    let info = match legacy {
        Some(c) => delta::positions_info(serde_json::to_value(c).map_err(|e| {
            CheckpointError::Corrupt {
                path: checkpoint_path(),
                message: e.to_string(),
            }
        })?),
        None => serde_json::json!({}),
    };
    let mut st = delta::LogState::default();
    match delta::commit(lake, table, &mut st, op, info, actions).await? {
        delta::CommitOutcome::Committed(_) => {
            if op == "CONVERT" {
                tracing::info!(
                    table = table.root(),
                    files = mine.len(),
                    "converted the table to a Delta log"
                );
                // version 0 names every file: later starts read a checkpoint of it instead
                delta::checkpoint_now(lake, table, &mut st).await;
            }
            Ok(st)
        }
        // another start converted it first: read what it wrote
        delta::CommitOutcome::Conflict(_) => delta::load(lake, table).await,
    }
}

/// The lake as a writer finds it, from its logs (an older lake converted): the committed
/// files. What interrupted writers left is removed by a [`sweep`] after it.
pub struct Settled {
    /// The tables' logs.
    pub logs: Logs,
    /// Committed files (and backfilled history), with the log's row counts.
    pub files: Vec<LakeFile>,
    /// Tables converted from a lake without a log.
    pub converted: usize,
}

/// A log with this many files and no checkpoint gets one at start.
const CHECKPOINT_FILES: usize = 1000;

/// Reads the tables' logs, giving the live tables a log first where they have none (a lake from
/// before the log: each such table is listed and converted, with the old checkpoint's cursors),
/// then removes the old checkpoint file. Returns the logs and how many tables were converted.
/// The caller holds the writer lease. Every writer runs it before it commits anything: a table
/// whose log some other commit created first would leave the older files out of it.
pub async fn ensure_logs(lake: &Lake) -> Result<(Logs, usize), CheckpointError> {
    let mut logs = Logs::load(lake).await?;
    let mut converted = 0;
    if logs.events.version.is_none() || logs.errors.version.is_none() {
        let legacy = Checkpoint::load_legacy(lake).await?;
        for t in delta::Table::ALL {
            if logs.get_mut(t).version.is_none() {
                // a backfill's files (its quarantine) wait for the backfill's start, which
                // commits those of its committed batches and removes the rest: committed here,
                // a file of a batch that crashed before its record would be named by the log
                // after the backfill removed it
                let listed: Vec<LakeFile> = list_dir(lake, t.root())
                    .await?
                    .into_iter()
                    .filter(|f| !logs.awaits_backfill(f))
                    .collect();
                *logs.get_mut(t) = convert(lake, t, &listed, legacy.as_ref()).await?;
                converted += 1;
            }
        }
    }
    // a conversion that crashed before its checkpoint (or a large log without one yet): read
    // once more now, then from a checkpoint
    for t in delta::Table::ALL {
        let log = logs.get_mut(t);
        if log.checkpoint.is_none() && log.files.len() >= CHECKPOINT_FILES {
            delta::checkpoint_now(lake, t, log).await;
        }
    }
    // both logs exist: the file of the old format says nothing more
    if lake.get(&checkpoint_path()).await?.is_some() {
        lake.delete(&checkpoint_path()).await?;
    }
    Ok((logs, converted))
}

/// Reads and settles the lake (see [`Settled`]) from its logs, without listing it: only a
/// table without a log (a lake from before the log) is listed, to be converted. From here until
/// a [`sweep`] ends, this process's writes are noted, so that the sweep leaves them alone.
pub async fn settle(lake: &Lake) -> Result<Settled, CheckpointError> {
    lake.track_writes();
    let (logs, converted) = ensure_logs(lake).await?;
    let mut files: Vec<LakeFile> = delta::Table::ALL
        .iter()
        .flat_map(|t| logs.get(*t).files.values().cloned())
        .collect();
    if logs.history.version.is_some() {
        files.extend(logs.history.files.values().cloned());
    } else {
        // a history no backfill has given a log yet: its files are what is there
        files.extend(list_dir(lake, crate::sink::partition::HISTORY_DIR).await?);
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Settled {
        logs,
        files,
        converted,
    })
}

/// What a [`sweep`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Temporary files of interrupted writes removed.
    pub temp_removed: usize,
    /// Data files no commit names removed (their events come again from the stream).
    pub uncommitted_removed: usize,
    /// Files a log names that are not in storage (a broken invariant: logged and counted).
    pub missing: usize,
}

/// Removes what writers that died left in the lake: temporary files, and data files that no
/// commit names. It runs after [`settle`], under the same lease, beside the writer (a start
/// does not wait for a listing of the whole lake): what this process writes meanwhile is never
/// removed ([`Lake::delete_unless_written`]), and files of a backfill batch that the history's
/// log does not name yet are the backfill's to commit. A file a log names that is not in
/// storage is logged and counted as a broken invariant. Ends the tracking of writes that
/// [`settle`] began.
/// `logs` are the logs as [`settle`] read them (`None`: read them now); either way they are
/// read before the lake is listed.
pub async fn sweep(lake: &Lake, logs: Option<Logs>) -> Result<Swept, CheckpointError> {
    let r = sweep_lake(lake, logs).await;
    lake.stop_tracking().await;
    r
}

async fn sweep_lake(lake: &Lake, logs: Option<Logs>) -> Result<Swept, CheckpointError> {
    let started = std::time::Instant::now();
    let mut out = Swept {
        temp_removed: lake.remove_temp_files().await?,
        ..Default::default()
    };
    // the logs first, then the listing: a listed file that the logs do not name was left by a
    // dead writer, or written by this process since (noted, and kept); a file the logs name is
    // in storage before it is committed, and only a vacuum (of files removed an hour or more
    // ago) deletes one
    let logs = match logs {
        Some(l) => l,
        None => Logs::load(lake).await?,
    };
    let listed = list_files(lake).await?;
    let history = logs.history.version.is_some();
    for f in &listed {
        let Some(t) = delta::Table::of(f) else {
            continue;
        };
        let log = logs.get(t);
        if log.files.contains_key(&f.path) || log.removed.contains_key(&f.path) {
            continue;
        }
        // a history without a log is what is there; the files of a batch the history's log
        // does not name yet are the backfill's (its record comes first, its commits after)
        if (t == delta::Table::History && !history) || logs.awaits_backfill(f) {
            continue;
        }
        if lake.delete_unless_written(&f.path).await? {
            tracing::info!(path = %f.path, "removed a data file no commit names (its events come again)");
            out.uncommitted_removed += 1;
        }
    }
    let present: HashSet<&str> = listed.iter().map(|f| f.path.as_str()).collect();
    let missing: Vec<&String> = delta::Table::EVERY
        .iter()
        .flat_map(|t| logs.get(*t).files.keys())
        .filter(|p| !present.contains(p.as_str()))
        .collect();
    out.missing = missing.len();
    if let Some(first) = missing.first() {
        metrics::counter!("atlake_broken_invariants_total").increment(missing.len() as u64);
        tracing::error!(
            count = missing.len(),
            first = %first,
            "files committed in the lake's logs are not in storage: queries that read them fail"
        );
    }
    tracing::info!(
        listed = listed.len(),
        temp_removed = out.temp_removed,
        uncommitted_removed = out.uncommitted_removed,
        took = ?started.elapsed(),
        "swept the lake of what interrupted writers left"
    );
    Ok(out)
}

/// Runs [`sweep`] in the background; a failure is logged and counted (the next start sweeps
/// again).
pub fn spawn_sweep(lake: Lake, logs: Logs) -> tokio::task::JoinHandle<Option<Swept>> {
    tokio::spawn(async move {
        match sweep(&lake, Some(logs)).await {
            Ok(s) => Some(s),
            Err(e) => {
                metrics::counter!("atlake_storage_errors_total", "kind" => "sweep").increment(1);
                tracing::warn!(error = %e, "sweeping the lake failed; the next start sweeps again");
                None
            }
        }
    })
}

/// Recovers the state for `source`: checkpoint, files, and the keys of durable events that a
/// resumed stream may deliver again. `rewind` is how far before the checkpoint the stream will
/// resume, in cursor units (µs for Jetstream). The caller holds the lake's writer lease: only
/// then are leftover temporary files and uncommitted data files safe to remove, and a lake
/// from before the Delta log safe to convert.
pub async fn recover(
    lake: &Lake,
    source: SourceKind,
    rewind: u64,
) -> Result<Recovery, CheckpointError> {
    let Settled {
        logs,
        files,
        converted,
    } = settle(lake).await?;
    let checkpoint = Checkpoint::from_log(&logs.events)?;
    let mine: Vec<&LakeFile> = files.iter().filter(|f| f.name.source() == source).collect();
    let durable_high = mine.iter().map(|f| f.name.last()).max();
    let resume_cursor = checkpoint.cursor(source);
    // without a checkpoint (a new lake, or a crash before the first checkpoint) nothing says
    // which events are durable: the caller starts at its configured start, and every file of
    // this source is read for dedupe keys
    let threshold = resume_cursor.map(|c| c.back_by(rewind));
    let mut durable_keys = HashSet::new();
    let mut files_scanned = 0;
    for f in mine
        .iter()
        .filter(|f| threshold.is_none_or(|t| f.name.last() >= t))
    {
        files_scanned += 1;
        read_keys(lake, f, source, threshold, &mut durable_keys).await?;
    }
    Ok(Recovery {
        checkpoint,
        resume_cursor,
        files,
        durable_keys,
        durable_high,
        converted,
        files_scanned,
        logs,
    })
}

/// The columns of a batch that recovery reads, each checked for presence and type: a file
/// that lacks one cannot give correct keys, and guessing (an empty string) would let
/// duplicates through.
struct Columns<'a> {
    batch: &'a RecordBatch,
    path: &'a str,
}

impl<'a> Columns<'a> {
    fn err(&self, message: String) -> CheckpointError {
        CheckpointError::File {
            path: self.path.to_string(),
            message,
        }
    }

    fn utf8(&self, name: &str) -> Result<&'a StringArray, CheckpointError> {
        self.batch
            .column_by_name(name)
            .ok_or_else(|| self.err(format!("column `{name}` is missing")))?
            .as_string_opt::<i32>()
            .ok_or_else(|| self.err(format!("column `{name}` is not Utf8")))
    }

    fn int64(&self, name: &str) -> Result<&'a Int64Array, CheckpointError> {
        self.batch
            .column_by_name(name)
            .ok_or_else(|| self.err(format!("column `{name}` is missing")))?
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| self.err(format!("column `{name}` is not Int64")))
    }

    fn binary(&self, name: &str) -> Result<&'a BinaryArray, CheckpointError> {
        self.batch
            .column_by_name(name)
            .ok_or_else(|| self.err(format!("column `{name}` is missing")))?
            .as_binary_opt::<i32>()
            .ok_or_else(|| self.err(format!("column `{name}` is not Binary")))
    }
}

impl Columns<'_> {
    /// A value that its row's kind requires.
    fn need<'b>(
        &self,
        c: &'b StringArray,
        i: usize,
        name: &str,
    ) -> Result<&'b str, CheckpointError> {
        opt(c, i).ok_or_else(|| self.err(format!("row {i}: `{name}` is null")))
    }
}

fn opt(c: &StringArray, i: usize) -> Option<&str> {
    c.is_valid(i).then(|| c.value(i))
}

fn opt_i64(c: &Int64Array, i: usize) -> Option<i64> {
    c.is_valid(i).then(|| c.value(i))
}

/// The columns recovery reads from an events file and from a quarantine file.
const EVENT_KEY_COLUMNS: &[&str] = &[
    "did",
    "kind",
    "collection",
    "rkey",
    "rev",
    "operation",
    "seq",
    "time_us",
    "event_seq",
];
const ERROR_KEY_COLUMNS: &[&str] = &["reason", "raw", "path", "cursor"];

/// Whether a row's cursor is below the threshold (rows without one are always read).
fn below(c: Option<i64>, threshold: Option<Cursor>) -> bool {
    match (c, threshold) {
        (Some(c), Some(t)) => c < t.value(),
        _ => false,
    }
}

/// Adds the dedupe keys of the rows of `f` whose cursor is at or above `threshold`.
async fn read_keys(
    lake: &Lake,
    f: &LakeFile,
    source: SourceKind,
    threshold: Option<Cursor>,
    keys: &mut HashSet<EventKey>,
) -> Result<(), CheckpointError> {
    let bytes = lake
        .get(&f.path)
        .await?
        .ok_or_else(|| CheckpointError::File {
            path: f.path.clone(),
            message: "committed in the log but not in the lake".into(),
        })?;
    let ferr = |e: &dyn std::fmt::Display| CheckpointError::File {
        path: f.path.clone(),
        message: e.to_string(),
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| ferr(&e))?;
    let is_errors = f.key.name == crate::sink::partition::PartitionName::Errors;
    let wanted = if is_errors {
        ERROR_KEY_COLUMNS
    } else {
        EVENT_KEY_COLUMNS
    };
    let schema = builder.parquet_schema();
    let idx: Vec<usize> = (0..schema.num_columns())
        .filter(|&i| wanted.contains(&schema.column(i).name()))
        .collect();
    let mask = ProjectionMask::leaves(schema, idx);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(8192)
        .build()
        .map_err(|e| ferr(&e))?;
    for batch in reader {
        let b = batch.map_err(|e| ferr(&e))?;
        let cols = Columns {
            batch: &b,
            path: &f.path,
        };
        if is_errors {
            error_keys(&cols, threshold, keys)?;
        } else {
            event_keys(&cols, f, source, threshold, keys)?;
        }
    }
    Ok(())
}

/// The keys of a quarantine batch's rows.
fn error_keys(
    cols: &Columns<'_>,
    threshold: Option<Cursor>,
    keys: &mut HashSet<EventKey>,
) -> Result<(), CheckpointError> {
    let (reason, path, raw, cursor) = (
        cols.utf8("reason")?,
        cols.utf8("path")?,
        cols.binary("raw")?,
        cols.int64("cursor")?,
    );
    for i in 0..cols.batch.num_rows() {
        let c = opt_i64(cursor, i);
        if below(c, threshold) {
            continue;
        }
        let reason = cols.need(reason, i, "reason")?;
        let raw = raw
            .is_valid(i)
            .then(|| raw.value(i))
            .ok_or_else(|| cols.err(format!("row {i}: `raw` is null")))?;
        keys.insert(error_key_of(reason, raw, opt(path, i), c));
    }
    Ok(())
}

/// The keys of an events batch's rows, each from the fields its kind requires.
fn event_keys(
    cols: &Columns<'_>,
    f: &LakeFile,
    source: SourceKind,
    threshold: Option<Cursor>,
    keys: &mut HashSet<EventKey>,
) -> Result<(), CheckpointError> {
    let cursor = cols.int64(match source {
        SourceKind::Firehose => "seq",
        SourceKind::Jetstream => "time_us",
        SourceKind::Repo => {
            return Err(CheckpointError::File {
                path: f.path.clone(),
                message: "backfill files have no stream keys to recover".into(),
            });
        }
    })?;
    let (did, kind, coll, rkey, rev, op) = (
        cols.utf8("did")?,
        cols.utf8("kind")?,
        cols.utf8("collection")?,
        cols.utf8("rkey")?,
        cols.utf8("rev")?,
        cols.utf8("operation")?,
    );
    let event_seq = match f.key.name.table_kind() {
        TableKind::Identity | TableKind::Account => Some(cols.int64("event_seq")?),
        _ => None,
    };
    for i in 0..cols.batch.num_rows() {
        if below(opt_i64(cursor, i), threshold) {
            continue;
        }
        let kind_s = cols.need(kind, i, "kind")?;
        let mut parts = KeyParts {
            kind: kind_s,
            did: cols.need(did, i, "did")?,
            collection: "",
            rkey: "",
            rev: "",
            operation: "",
            event_seq: 0,
        };
        match kind_s {
            "commit" => {
                parts.collection = cols.need(coll, i, "collection")?;
                parts.rkey = cols.need(rkey, i, "rkey")?;
                parts.rev = cols.need(rev, i, "rev")?;
                parts.operation = cols.need(op, i, "operation")?;
            }
            "sync" => parts.rev = cols.need(rev, i, "rev")?,
            "identity" | "account" => {
                parts.event_seq = event_seq
                    .and_then(|s| opt_i64(s, i))
                    .ok_or_else(|| cols.err(format!("row {i}: `event_seq` is missing")))?;
            }
            other => return Err(cols.err(format!("row {i}: unknown kind {other:?}"))),
        }
        keys.insert(key_of(parts));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WriterConfig;
    use crate::model::key::{error_key, event_key};
    use crate::model::{Envelope, ErrorEvent, ErrorReason};
    use crate::simulate::traffic::{Traffic, TrafficConfig};
    use crate::sink::batcher::{Batcher, FlushJob, FlushPolicy};
    use crate::sink::parquet::{FileMeta, encode_to};
    use crate::sink::partition::FileName;
    use std::time::Instant;

    /// The events of `n` simulated messages, with their firehose cursors.
    fn events(n: usize) -> Vec<Envelope> {
        let mut t = Traffic::new(TrafficConfig {
            seed: 9,
            ..Default::default()
        });
        (0..n).flat_map(|_| t.next_message().events).collect()
    }

    /// Writes each job as a file named by its cursor range, as the writer would.
    async fn write(lake: &Lake, source: SourceKind, jobs: Vec<FlushJob>) {
        for job in jobs {
            let name = FileName::try_new(
                job.first_cursor.unwrap(),
                job.last_cursor.unwrap(),
                job.key_hash as u32,
            )
            .unwrap();
            let meta = FileMeta {
                source,
                first: name.first().value(),
                last: name.last().value(),
                partition: job.key.dir(),
            };
            let mut buf = Vec::new();
            let by = job.key.name == crate::sink::partition::PartitionName::Other;
            encode_to(
                &WriterConfig::default(),
                job.kind,
                &meta,
                &job.chunks,
                by,
                &mut buf,
            )
            .unwrap();
            lake.put_atomic(&format!("{}/{}", job.key.dir(), name.render()), buf.into())
                .await
                .unwrap();
        }
    }

    /// The flush jobs of `evs` under the default policy, drained at once.
    fn jobs_of(evs: &[Envelope]) -> Vec<FlushJob> {
        let mut b = Batcher::new(
            FlushPolicy::from_config(&Default::default()),
            SourceKind::Firehose,
        );
        for e in evs {
            b.push_event(e, e.cursor(), event_key(e), Instant::now())
                .unwrap();
        }
        b.drain().unwrap()
    }

    /// A lake of `evs` in files of at most `rows` rows, plus one quarantined input at cursor 5.
    async fn lake_of(evs: &[Envelope], rows: usize) -> (Lake, ErrorEvent) {
        let lake = Lake::open("memory://").unwrap();
        let mut policy = FlushPolicy::from_config(&Default::default());
        policy.max_rows = rows;
        let mut b = Batcher::new(policy, SourceKind::Firehose);
        let now = Instant::now();
        let mut jobs = Vec::new();
        for e in evs {
            b.push_event(e, e.cursor(), event_key(e), now).unwrap();
            jobs.extend(b.size_due().unwrap());
        }
        let mut bad = ErrorEvent::new(ErrorReason::Car, "cut", b"\x01\x02");
        bad.path = Some("app.bsky.feed.like/3k".into());
        b.push_error(
            &bad,
            Cursor::seq(evs[4].seq.unwrap()).ok(),
            evs[4].time_us,
            now,
        )
        .unwrap();
        jobs.extend(b.drain().unwrap());
        write(&lake, SourceKind::Firehose, jobs).await;
        (lake, bad)
    }

    #[tokio::test]
    async fn without_a_checkpoint_every_file_gives_its_keys() {
        let evs = events(300);
        let (lake, bad) = lake_of(&evs, 50).await;
        let r = recover(&lake, SourceKind::Firehose, 0).await.unwrap();
        assert_eq!(r.resume_cursor, None);
        assert_eq!(r.files_scanned, r.files.len());
        let mut want: HashSet<EventKey> = evs.iter().map(event_key).collect();
        want.insert(error_key(&bad, Cursor::seq(evs[4].seq.unwrap()).ok()));
        assert_eq!(r.durable_keys, want);
        let high = evs.iter().filter_map(|e| e.seq).max();
        assert_eq!(r.durable_high.map(|c| c.value()), high);
        // the other source has none of these files
        let j = recover(&lake, SourceKind::Jetstream, 0).await.unwrap();
        assert_eq!((j.files_scanned, j.durable_keys.len()), (0, 0));
        assert_eq!(j.durable_high, None);
    }

    #[tokio::test]
    async fn a_checkpoint_limits_the_keys_to_rows_beyond_it_less_the_rewind() {
        let evs = events(300);
        let (lake, _) = lake_of(&evs, 50).await;
        let seqs: Vec<i64> = evs.iter().filter_map(|e| e.seq).collect();
        let c = seqs[seqs.len() / 2];
        let mut cp = Checkpoint::default();
        cp.set(
            SourceKind::Firehose,
            SourcePosition::new(Cursor::seq(c).unwrap(), "wss://relay"),
        )
        .unwrap();
        cp.store_legacy(&lake).await.unwrap();
        for rewind in [0u64, 20] {
            let r = recover(&lake, SourceKind::Firehose, rewind).await.unwrap();
            assert_eq!(r.resume_cursor, Cursor::seq(c).ok());
            let want: HashSet<EventKey> = evs
                .iter()
                .filter(|e| e.seq.unwrap() >= c - rewind as i64)
                .map(event_key)
                .collect();
            assert_eq!(r.durable_keys, want, "rewind {rewind}");
            assert!(r.files_scanned < r.files.len());
            assert!(
                r.files
                    .iter()
                    .filter(|f| f.name.last().value() >= c - rewind as i64)
                    .count()
                    <= r.files_scanned
            );
        }
    }

    #[tokio::test]
    async fn a_checkpoint_out_of_range_or_corrupt_is_an_error() {
        let lake = Lake::open("memory://").unwrap();
        assert_eq!(Checkpoint::load(&lake).await.unwrap(), None);
        lake.put_atomic(
            &checkpoint_path(),
            br#"{"version":1,"firehose":{"cursor":9223372036854775807,"url":"x","updated_at":"y"}}"#
                .to_vec()
                .into(),
        )
        .await
        .unwrap();
        assert!(matches!(
            Checkpoint::load(&lake).await,
            Err(CheckpointError::Corrupt { .. })
        ));
        lake.put_atomic(&checkpoint_path(), b"{not json".to_vec().into())
            .await
            .unwrap();
        assert!(matches!(
            recover(&lake, SourceKind::Firehose, 0).await,
            Err(CheckpointError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn leftover_temporary_files_are_removed_and_foreign_files_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let evs = events(40);
        write(&lake, SourceKind::Firehose, jobs_of(&evs)).await;
        let part = dir
            .path()
            .join("events/collection_partition=app.bsky.feed.like/date=2026-07-04/hour=14");
        std::fs::create_dir_all(&part).unwrap();
        // a dead writer's temporary file, and one of this process's writes under way
        let dead = format!(".fh-1-2-00000000.parquet.{}.tmp", std::process::id() + 1);
        let own = format!(".fh-3-4-00000000.parquet.{}.tmp", std::process::id());
        std::fs::write(part.join(&dead), b"partial").unwrap();
        std::fs::write(part.join(&own), b"partial").unwrap();
        std::fs::write(part.join("notes.txt"), b"not a data file").unwrap();
        let r = recover(&lake, SourceKind::Firehose, 0).await.unwrap();
        assert!(part.join(&dead).exists(), "recovery does not list the lake");
        let s = sweep(&lake, None).await.unwrap();
        assert_eq!(s.temp_removed, 1);
        assert!(!part.join(&dead).exists());
        assert!(part.join(&own).exists());
        assert!(part.join("notes.txt").exists());
        assert!(r.files.iter().all(|f| f.path.ends_with(".parquet")));
        assert_eq!(
            r.durable_keys,
            evs.iter().map(event_key).collect::<HashSet<_>>()
        );
    }

    /// A lake from before the Delta log is converted by its first writer: every file it had is
    /// committed in version 0 with the old checkpoint's cursor, the old file goes, and a
    /// second start reads the same state from the log alone.
    #[tokio::test]
    async fn a_lake_from_before_the_log_is_converted_once_with_its_cursor() {
        let evs = events(200);
        let (lake, _) = lake_of(&evs, 40).await;
        let listed = list_files(&lake).await.unwrap();
        let c = evs[100].seq.unwrap();
        let mut cp = Checkpoint::default();
        cp.set(
            SourceKind::Firehose,
            SourcePosition::new(Cursor::seq(c).unwrap(), "wss://relay"),
        )
        .unwrap();
        cp.store_legacy(&lake).await.unwrap();
        // a reader does not convert: it reads the old format as it is
        let (files, read) = lake_state(&lake).await.unwrap();
        assert_eq!(files.len(), listed.len());
        assert_eq!(read.cursor(SourceKind::Firehose), Cursor::seq(c).ok());
        assert!(lake.get(&checkpoint_path()).await.unwrap().is_some());

        let r = recover(&lake, SourceKind::Firehose, 0).await.unwrap();
        assert_eq!(r.converted, 2);
        assert_eq!(sweep(&lake, None).await.unwrap().uncommitted_removed, 0);
        assert_eq!(r.files.len(), listed.len());
        assert_eq!(r.resume_cursor, Cursor::seq(c).ok());
        assert!(lake.get(&checkpoint_path()).await.unwrap().is_none());
        let log = delta::load(&lake, delta::Table::Events).await.unwrap();
        assert_eq!(log.version, Some(0));
        // version 0 names every file: it is read from a checkpoint of it from now on
        assert_eq!(log.checkpoint, Some(0), "the conversion is checkpointed");
        assert_eq!(log.txn(SourceKind::Firehose).map(|t| t.0), Some(c));
        let errors = delta::load(&lake, delta::Table::Errors).await.unwrap();
        assert_eq!(errors.files.len(), 1, "the quarantine file");
        assert_eq!(log.files.len() + errors.files.len(), listed.len());

        let again = recover(&lake, SourceKind::Firehose, 0).await.unwrap();
        assert_eq!(again.converted, 0);
        assert_eq!(again.resume_cursor, Cursor::seq(c).ok());
        assert_eq!(again.durable_keys, r.durable_keys);
        let (files, read) = lake_state(&lake).await.unwrap();
        assert_eq!(files.len(), listed.len());
        assert_eq!(
            read.position(SourceKind::Firehose).unwrap().url,
            "wss://relay"
        );
    }

    /// A log that names many files and has no checkpoint (a conversion that crashed before
    /// its checkpoint) gets one at the next start, so later starts do not read it whole.
    #[tokio::test]
    async fn a_large_log_without_a_checkpoint_gets_one_at_start() {
        use crate::sink::partition::{PartitionKey, PartitionName};
        let lake = Lake::open("memory://").unwrap();
        let mut logs = settle(&lake).await.unwrap().logs;
        assert_eq!(logs.events.checkpoint, None);
        let mut adds = Vec::new();
        for i in 0..CHECKPOINT_FILES as i64 {
            let key = PartitionKey::at_hour(
                PartitionName::Collection("app.bsky.feed.like".into()),
                490_000 + i,
            )
            .unwrap();
            let name =
                FileName::try_new(Cursor::seq(i + 1).unwrap(), Cursor::seq(i + 1).unwrap(), 1)
                    .unwrap();
            let f = parse_path(&format!("{}/{}", key.dir(), name.render()), 1).unwrap();
            adds.push(f);
        }
        let (one_short, last) = adds.split_at(adds.len() - 1);
        for files in [one_short, last] {
            let mut acts = Vec::new();
            for f in files {
                lake.put_atomic(&f.path, bytes::Bytes::from_static(b"x"))
                    .await
                    .unwrap();
                acts.push(delta::add_action(delta::Table::Events, f, true, 1).unwrap());
            }
            delta::commit(
                &lake,
                delta::Table::Events,
                &mut logs.events,
                "WRITE",
                serde_json::json!({}),
                acts,
            )
            .await
            .unwrap();
            let settled = settle(&lake).await.unwrap();
            let read = delta::load(&lake, delta::Table::Events).await.unwrap();
            if settled.logs.events.files.len() < CHECKPOINT_FILES {
                assert_eq!(read.checkpoint, None, "a small log is read as it is");
            } else {
                assert_eq!(read.checkpoint, read.version, "checkpointed at start");
                assert_eq!(read.files.len(), CHECKPOINT_FILES);
            }
        }
    }

    /// A data file no commit names was written by a process that died before committing it:
    /// recovery reads no keys from it, and the sweep beside the writer removes it (its events
    /// come again), unless this process has written that path since (a file's name is its
    /// content's: the same events written again have the same name). A file the log names that
    /// is not in the lake is counted, not taken for a smaller table.
    #[tokio::test]
    async fn uncommitted_files_are_swept_unless_written_again_and_missing_ones_counted() {
        let evs = events(120);
        let lake = Lake::open("memory://").unwrap();
        recover(&lake, SourceKind::Firehose, 0).await.unwrap();
        sweep(&lake, None).await.unwrap();
        write(&lake, SourceKind::Firehose, jobs_of(&evs)).await;
        let written = list_files(&lake).await.unwrap();
        assert!(written.len() >= 2);
        let r = recover(&lake, SourceKind::Firehose, 0).await.unwrap();
        assert!(r.files.is_empty());
        assert!(r.durable_keys.is_empty());
        assert_eq!(list_files(&lake).await.unwrap().len(), written.len());
        // this process writes one of the paths again before the sweep reaches it
        lake.put_atomic(&written[0].path, bytes::Bytes::from_static(b"again"))
            .await
            .unwrap();
        let s = sweep(&lake, None).await.unwrap();
        assert_eq!(s.uncommitted_removed, written.len() - 1);
        let left = list_files(&lake).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].path, written[0].path);
        lake.delete(&written[0].path).await.unwrap();
        // after the sweep nothing is tracked: a later sweep removes what is uncommitted
        lake.put_atomic(&written[0].path, bytes::Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!(sweep(&lake, None).await.unwrap().uncommitted_removed, 1);

        // committed, then lost from storage
        write(&lake, SourceKind::Firehose, jobs_of(&evs)).await;
        let files = list_files(&lake).await.unwrap();
        let mut log = delta::load(&lake, delta::Table::Events).await.unwrap();
        let adds = files
            .iter()
            .map(|f| delta::add_action(delta::Table::Events, f, true, 1).unwrap())
            .collect();
        delta::commit(
            &lake,
            delta::Table::Events,
            &mut log,
            "WRITE",
            serde_json::Value::Null,
            adds,
        )
        .await
        .unwrap();
        let r = recover(&lake, SourceKind::Firehose, 0).await.unwrap();
        assert_eq!(r.files.len(), files.len());
        assert_eq!(r.durable_keys.len(), evs.len());
        assert_eq!(sweep(&lake, None).await.unwrap(), Swept::default());
        lake.delete(&files[1].path).await.unwrap();
        // recovery needs its keys (no cursor: every file is read): an error
        let e = recover(&lake, SourceKind::Firehose, 0).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("committed in the log but not in the lake"),
            "{e}"
        );
        let s = sweep(&lake, None).await.unwrap();
        assert_eq!(s.missing, 1);
        assert_eq!(s.uncommitted_removed, 0);
    }
}
