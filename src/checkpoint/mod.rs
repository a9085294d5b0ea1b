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
//! On start we read both tables' logs, remove temporary leftovers and data files no commit
//! names (written by a process that died before committing them: their events are beyond `C`
//! and come again), and read the dedupe keys of every committed row beyond `C` (minus the
//! Jetstream rewind) from the files themselves. The stream is resumed from `C`; a replayed
//! event whose key is already durable is skipped. Nothing depends on which partition an event
//! landed in, so the `_other` routing (which depends on what was open) cannot cause
//! duplicates.

pub mod compact;
pub mod delta;
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
    /// A data file could not be read back.
    #[error("reading {path}: {message}")]
    File {
        /// which
        path: String,
        /// why
        message: String,
    },
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
    /// Temporary files removed.
    pub temp_removed: usize,
    /// Data files that no commit names, removed.
    pub uncommitted_removed: usize,
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

/// The lake as a writer finds it, made consistent: both logs (an older lake converted), and
/// the committed files; leftovers of interrupted writes and data files no commit names are
/// removed. The caller holds the lake's writer lease.
pub struct Settled {
    /// The tables' logs.
    pub logs: Logs,
    /// Committed files (and backfilled history), with the log's row counts.
    pub files: Vec<LakeFile>,
    /// Temporary files removed.
    pub temp_removed: usize,
    /// Data files no commit named, removed.
    pub uncommitted_removed: usize,
    /// Tables converted from a lake without a log.
    pub converted: usize,
}

/// A log with this many files and no checkpoint gets one at start.
const CHECKPOINT_FILES: usize = 1000;

/// Reads and settles the lake (see [`Settled`]); a committed file missing from storage is an
/// error.
pub async fn settle(lake: &Lake) -> Result<Settled, CheckpointError> {
    let temp_removed = lake.remove_temp_files().await?;
    let mut logs = Logs::load(lake).await?;
    let listed = list_files(lake).await?;
    let mut converted = 0;
    if logs.events.version.is_none() || logs.errors.version.is_none() {
        let legacy = Checkpoint::load_legacy(lake).await?;
        for t in delta::Table::ALL {
            if logs.get_mut(t).version.is_none() {
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
    let mut files = Vec::new();
    let mut uncommitted_removed = 0;
    // the backfill commits its batch record first and its files to the logs after; the files
    // of a batch the history log does not name yet are its recovery's to commit or remove
    let history = logs.history.version.is_some();
    let backfilled = logs.history.backfill_batch();
    for f in listed {
        let Some(t) = delta::Table::of(&f) else {
            continue;
        };
        let log = logs.get(t);
        let pending = f.name.source() == SourceKind::Repo
            && (!history || backfilled.is_none_or(|b| f.name.first().value() > b));
        if log.files.contains_key(&f.path) {
            files.push(f);
        } else if t == delta::Table::History && !history {
            // a history no backfill has given a log yet: its files are what is there
            files.push(f);
        } else if pending || log.removed.contains_key(&f.path) {
            continue;
        } else {
            tracing::info!(path = %f.path, "removing a data file no commit names (its events come again)");
            lake.delete(&f.path).await?;
            uncommitted_removed += 1;
        }
    }
    // committed files whose size the log knows better than a listing (rows, too)
    for f in files.iter_mut() {
        let Some(t) = delta::Table::of(f) else {
            continue;
        };
        if let Some(c) = logs.get(t).files.get(&f.path) {
            f.rows = c.rows;
        }
    }
    let missing: Vec<&String> = [&logs.events, &logs.errors, &logs.history]
        .iter()
        .flat_map(|l| l.files.keys())
        .filter(|p| {
            files
                .binary_search_by(|f| f.path.as_str().cmp(p.as_str()))
                .is_err()
        })
        .collect();
    if let Some(p) = missing.first() {
        return Err(CheckpointError::File {
            path: (*p).clone(),
            message: format!(
                "committed in the log but not in the lake ({} such files)",
                missing.len()
            ),
        });
    }
    Ok(Settled {
        logs,
        files,
        temp_removed,
        uncommitted_removed,
        converted,
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
        temp_removed,
        uncommitted_removed,
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
        temp_removed,
        uncommitted_removed,
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
            message: "listed but missing".into(),
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
        std::fs::write(part.join(".fh-1-2-00000000.parquet.123.tmp"), b"partial").unwrap();
        std::fs::write(part.join("notes.txt"), b"not a data file").unwrap();
        let r = recover(&lake, SourceKind::Firehose, 0).await.unwrap();
        assert_eq!(r.temp_removed, 1);
        assert!(!part.join(".fh-1-2-00000000.parquet.123.tmp").exists());
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
        assert_eq!(r.uncommitted_removed, 0);
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
    /// recovery removes it (its events come again) and reads no keys from it. A file the log
    /// names that is not in the lake is an error, not a smaller table.
    #[tokio::test]
    async fn uncommitted_files_are_removed_and_missing_committed_ones_refused() {
        let evs = events(120);
        let lake = Lake::open("memory://").unwrap();
        recover(&lake, SourceKind::Firehose, 0).await.unwrap();
        write(&lake, SourceKind::Firehose, jobs_of(&evs)).await;
        let written = list_files(&lake).await.unwrap();
        assert!(!written.is_empty());
        let r = recover(&lake, SourceKind::Firehose, 0).await.unwrap();
        assert_eq!(r.uncommitted_removed, written.len());
        assert!(r.files.is_empty());
        assert!(r.durable_keys.is_empty());
        assert!(list_files(&lake).await.unwrap().is_empty());

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
        assert_eq!(r.uncommitted_removed, 0);
        assert_eq!(r.durable_keys.len(), evs.len());
        lake.delete(&files[0].path).await.unwrap();
        let e = recover(&lake, SourceKind::Firehose, 0).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("committed in the log but not in the lake"),
            "{e}"
        );
    }
}
