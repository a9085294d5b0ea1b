//! The lake's commit record: a Delta Lake transaction log for each of its tables, `events`
//! (root `<lake>/events`), the quarantine (root `<lake>/_errors`) and the backfilled history
//! (root `<lake>/history`).
//!
//! A data file is committed when its `add` action is in its table's log. Each commit of the
//! `events` table carries the source's cursor as a `txn` action (app id `atlake.firehose` or
//! `atlake.jetstream`, version = cursor) beside the files that justify it, so the log alone says
//! what is durable. Quarantine files go into the `_errors` log first, in a commit of their own,
//! then the `events` commit moves the cursor: a crash between the two leaves quarantined rows
//! committed beyond the cursor, which recovery reads back as dedupe keys like any other.
//!
//! Commits are `_delta_log/<version:020>.json`, created only if absent (a hard link locally,
//! `If-None-Match: *` on S3), fsynced. Every [`CHECKPOINT_INTERVAL`] versions the state is
//! written as a Parquet checkpoint (`<version:020>.checkpoint.parquet` and
//! `_last_checkpoint`), so reading the log costs a checkpoint and at most that many JSON files.
//!
//! Protocol: reader version 1, writer version 2, no table features. Partition columns are
//! `collection_partition` (the `collection=` directory: a collection, `_other`, `_identity`,
//! `_account`, `_sync`), `date` (a date) and `hour` (an integer, null for a compacted
//! long-tail day); the quarantine has `date` and `hour`. The file's own `collection` column
//! keeps each row's real collection. The history table has no partition columns: its files
//! sit in `collection=<nsid>/month=YYYY-MM/` directories for plain readers, and a Delta reader
//! takes each row's collection and time from the file. Each history commit carries the
//! backfill's batch number as a `txn` action (app id [`BACKFILL_APP_ID`]).

use super::CheckpointError;
use crate::model::SourceKind;
use crate::model::rows::{TableKind, schema};
use crate::sink::partition::{
    ERRORS_DIR, EVENTS_DIR, HISTORY_DIR, LakeFile, Span, date_hour, parse_path,
};
use crate::sink::store::Lake;
use arrow::datatypes::{DataType, Field, Fields, Schema, TimeUnit};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The log directory under a table's root.
pub const LOG_DIR: &str = "_delta_log";
/// A checkpoint is written every this many versions.
pub const CHECKPOINT_INTERVAL: u64 = 100;
/// The partition column holding the `collection=` directory's value.
pub const COLLECTION_PARTITION: &str = "collection_partition";
/// The app id of the history table's `txn` action: its version is the newest backfill batch
/// whose files are in the table.
pub const BACKFILL_APP_ID: &str = "atlake.backfill";

/// One of the lake's Delta tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Table {
    /// `<lake>/events`: every event partition.
    #[default]
    Events,
    /// `<lake>/_errors`: the quarantine.
    Errors,
    /// `<lake>/history`: records backfilled from the repositories, in month partitions.
    History,
}

impl Table {
    /// The two tables the live streams write, in commit order (the quarantine first). A
    /// start converts them when they have no log; the backfill owns the history table's.
    pub const ALL: [Table; 2] = [Table::Errors, Table::Events];
    /// Every table of the lake (vacuum and log cleanup go over all of them).
    pub const EVERY: [Table; 3] = [Table::Errors, Table::Events, Table::History];

    /// The table's root, relative to the lake.
    pub fn root(self) -> &'static str {
        match self {
            Table::Events => EVENTS_DIR,
            Table::Errors => ERRORS_DIR,
            Table::History => HISTORY_DIR,
        }
    }

    /// The table a data file belongs to.
    pub fn of(f: &LakeFile) -> Option<Table> {
        let top = f.path.split('/').next()?;
        match top {
            EVENTS_DIR => Some(Table::Events),
            ERRORS_DIR => Some(Table::Errors),
            HISTORY_DIR => Some(Table::History),
            _ => None,
        }
    }

    /// The table's name in its `metaData`.
    fn name(self) -> &'static str {
        match self {
            Table::Events => "events",
            Table::Errors => "errors",
            Table::History => "history",
        }
    }

    /// A path of the log, relative to the lake.
    pub fn log_path(self, name: &str) -> String {
        format!("{}/{LOG_DIR}/{name}", self.root())
    }

    fn partition_columns(self) -> &'static [&'static str] {
        match self {
            Table::Events => &[COLLECTION_PARTITION, "date", "hour"],
            Table::Errors => &["date", "hour"],
            Table::History => &[],
        }
    }

    /// The table's schema as Delta declares it: the stored columns, then the partition columns.
    pub fn schema_string(self) -> Result<String, CheckpointError> {
        let stored = schema(match self {
            Table::Events | Table::History => TableKind::Events(None),
            Table::Errors => TableKind::Errors,
        });
        let mut fields = Vec::new();
        for f in stored.fields() {
            fields.push(json!({
                "name": f.name(),
                "type": delta_type(f.data_type()).ok_or_else(|| corrupt(
                    &self.log_path(""),
                    format!("column {} has no Delta type", f.name()),
                ))?,
                "nullable": f.is_nullable(),
                "metadata": {},
            }));
        }
        for p in self.partition_columns() {
            let t = match *p {
                "date" => "date",
                "hour" => "integer",
                _ => "string",
            };
            // `hour` is null in a day partition (a compacted long-tail day)
            let nullable = *p == "hour";
            fields.push(json!({"name": p, "type": t, "nullable": nullable, "metadata": {}}));
        }
        Ok(json!({"type": "struct", "fields": fields}).to_string())
    }

    /// The partition values of a data file, as the log records them.
    fn partition_values(self, f: &LakeFile) -> Map<String, Value> {
        if self == Table::History {
            return Map::new();
        }
        let (date, hour) = date_hour(f.key.hour());
        let hour = hour.trim_start_matches('0');
        let mut m = Map::new();
        if self == Table::Events {
            m.insert(COLLECTION_PARTITION.into(), f.key.name.value().into());
        }
        m.insert("date".into(), date.into());
        let hour = match f.key.span() {
            Span::Day => Value::Null,
            _ if hour.is_empty() => "0".into(),
            _ => hour.into(),
        };
        m.insert("hour".into(), hour);
        m
    }
}

/// The Delta type of a stored Arrow type (only the types atlake stores).
fn delta_type(t: &DataType) -> Option<&'static str> {
    Some(match t {
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => "string",
        DataType::Int64 => "long",
        DataType::Int32 => "integer",
        DataType::Boolean => "boolean",
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "binary",
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => "timestamp",
        DataType::Date32 => "date",
        _ => return None,
    })
}

fn corrupt(path: &str, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Corrupt {
        path: path.to_string(),
        message: message.into(),
    }
}

/// The app id of a source's `txn` action.
pub fn app_id(source: SourceKind) -> String {
    format!("atlake.{}", source.as_str())
}

/// The file name of a version's commit.
pub fn commit_name(version: u64) -> String {
    format!("{version:020}.json")
}

fn checkpoint_name(version: u64) -> String {
    format!("{version:020}.checkpoint.parquet")
}

/// What a table's log says at one version.
#[derive(Debug, Clone, Default)]
pub struct LogState {
    /// The newest version (`None`: the table has no log yet).
    pub version: Option<u64>,
    /// Committed data files, by lake-relative path.
    pub files: BTreeMap<String, LakeFile>,
    /// When each committed file was added (its `modificationTime`, ms).
    pub added: BTreeMap<String, i64>,
    /// Files removed from the table and not yet vacuumed: lake-relative path → when (ms).
    pub removed: BTreeMap<String, i64>,
    /// `txn` versions by app id, with when each was set (ms).
    pub txns: BTreeMap<String, (i64, i64)>,
    /// The checkpoint as the newest commit that recorded one saw it (`commitInfo.atlake.checkpoint`,
    /// written with every cursor, and carried on by retention and compaction commits; commits
    /// of files alone carry none).
    /// Informational: each source's endpoint; the cursors are the `txn` actions.
    pub positions: Option<Value>,
    /// The version of the checkpoint the state was read from or last written (`None`: no
    /// checkpoint yet).
    pub checkpoint: Option<u64>,
    /// The table's `protocol` and `metaData` actions as read.
    protocol: Option<Value>,
    metadata: Option<Value>,
}

impl LogState {
    /// The cursor committed for `source`, if any.
    pub fn txn(&self, source: SourceKind) -> Option<(i64, i64)> {
        self.txns.get(&app_id(source)).copied()
    }

    /// The newest backfill batch whose files the history table holds, if any.
    pub fn backfill_batch(&self) -> Option<i64> {
        self.txns.get(BACKFILL_APP_ID).map(|(v, _)| *v)
    }

    /// A `metaData` action that declares the schema this version of atlake writes, when the
    /// log declares another (a table created before `hour` became nullable); `None` when they
    /// agree. Commits that add files of the new shape carry it.
    pub fn schema_update(&self, table: Table) -> Result<Option<Value>, CheckpointError> {
        let Some(m) = &self.metadata else {
            return Ok(None);
        };
        let want = table.schema_string()?;
        if m.get("schemaString").and_then(Value::as_str) == Some(want.as_str()) {
            return Ok(None);
        }
        let mut m = m.clone();
        m["schemaString"] = want.into();
        Ok(Some(json!({ "metaData": m })))
    }

    /// Applies one action (a line of a commit, or a row of a checkpoint).
    fn apply(&mut self, table: Table, action: &Value, at: &str) -> Result<(), CheckpointError> {
        let Some(obj) = action.as_object() else {
            return Err(corrupt(at, "an action is not a JSON object"));
        };
        for (kind, body) in obj {
            if body.is_null() {
                continue;
            }
            match kind.as_str() {
                "add" => {
                    let f = file_of(table, body, at)?;
                    let when = body
                        .get("modificationTime")
                        .and_then(Value::as_i64)
                        .ok_or_else(|| corrupt(at, "an add without modificationTime"))?;
                    self.removed.remove(&f.path);
                    self.added.insert(f.path.clone(), when);
                    self.files.insert(f.path.clone(), f);
                }
                "remove" => {
                    let path = lake_path(table, body, at)?;
                    // a tombstone names a file a vacuum will delete: only the lake's own
                    if parse_path(&path, 0).is_none_or(|f| Table::of(&f) != Some(table)) {
                        return Err(corrupt(
                            at,
                            format!("remove {path}: not a data file of this table"),
                        ));
                    }
                    self.files.remove(&path);
                    self.added.remove(&path);
                    let when = body
                        .get("deletionTimestamp")
                        .and_then(Value::as_i64)
                        .ok_or_else(|| corrupt(at, "a remove without deletionTimestamp"))?;
                    self.removed.insert(path, when);
                }
                "txn" => {
                    let (Some(app), Some(v)) = (
                        body.get("appId").and_then(Value::as_str),
                        body.get("version").and_then(Value::as_i64),
                    ) else {
                        return Err(corrupt(at, "a txn without appId and version"));
                    };
                    let when = body.get("lastUpdated").and_then(Value::as_i64);
                    let when = when.ok_or_else(|| corrupt(at, "a txn without lastUpdated"))?;
                    self.txns.insert(app.to_string(), (v, when));
                }
                "protocol" => {
                    let r = body.get("minReaderVersion").and_then(Value::as_i64);
                    let w = body.get("minWriterVersion").and_then(Value::as_i64);
                    if r.is_none_or(|r| r > 1) || w.is_none_or(|w| w > 2) {
                        return Err(corrupt(
                            at,
                            format!("protocol {body} needs features atlake does not have"),
                        ));
                    }
                    self.protocol = Some(body.clone());
                }
                "metaData" => self.metadata = Some(body.clone()),
                "commitInfo" => {
                    if let Some(p) = positions_of(body) {
                        self.positions = Some(p.clone());
                    }
                }
                // other actions (cdc, domainMetadata, sidecars) are not written by atlake
                // and change nothing it reads
                _ => {}
            }
        }
        Ok(())
    }
}

/// The checkpoint a commit's `commitInfo` recorded, if it recorded one.
fn positions_of(commit_info: &Value) -> Option<&Value> {
    commit_info
        .get("atlake")
        .and_then(|a| a.get("checkpoint"))
        .filter(|p| p.is_object())
}

/// The `commitInfo.atlake` of a commit that records `checkpoint` (serialised).
pub fn positions_info(checkpoint: Value) -> Value {
    json!({ "checkpoint": checkpoint })
}

/// The lake-relative path of an `add` or `remove` action (the caller checks that it names a
/// data file of the table, so that no path atlake did not make is ever read or deleted).
fn lake_path(table: Table, body: &Value, at: &str) -> Result<String, CheckpointError> {
    let rel = body
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| corrupt(at, "a file action without a path"))?;
    Ok(format!("{}/{rel}", table.root()))
}

fn file_of(table: Table, body: &Value, at: &str) -> Result<LakeFile, CheckpointError> {
    let path = lake_path(table, body, at)?;
    let size = body
        .get("size")
        .and_then(Value::as_u64)
        .ok_or_else(|| corrupt(at, format!("add {path}: no size")))?;
    let mut f = parse_path(&path, size)
        .ok_or_else(|| corrupt(at, format!("add {path}: not a data file of the lake")))?;
    if Table::of(&f) != Some(table) {
        return Err(corrupt(at, format!("add {path}: not a file of this table")));
    }
    // stats are optional in Delta; when present they must parse (a count that is silently
    // lost would make a query read every footer, and one that is wrong would be worse)
    // (and a count that is not a row count, negative or beyond what SQL counts, is corrupt:
    // queries add these up instead of reading the files)
    f.rows = match body.get("stats").and_then(Value::as_str) {
        None => None,
        Some(s) => match serde_json::from_str::<Value>(s)
            .map_err(|e| corrupt(at, format!("add {path}: stats: {e}")))?
            .get("numRecords")
        {
            None => None,
            Some(n) => Some(
                n.as_u64()
                    .filter(|&n| i64::try_from(n).is_ok())
                    .ok_or_else(|| corrupt(at, format!("add {path}: numRecords {n}")))?,
            ),
        },
    };
    Ok(f)
}

/// A lake-relative path as its table's log names it (relative to the table's root); a path
/// outside the table is an error.
fn table_path(table: Table, path: &str) -> Result<&str, CheckpointError> {
    path.strip_prefix(table.root())
        .and_then(|p| p.strip_prefix('/'))
        .ok_or_else(|| corrupt(&table.log_path(""), format!("{path} is not in this table")))
}

/// The `add` action of a data file.
pub fn add_action(
    table: Table,
    f: &LakeFile,
    data_change: bool,
    now_ms: i64,
) -> Result<Value, CheckpointError> {
    let rel = table_path(table, &f.path)?;
    let mut add = json!({
        "path": rel,
        "partitionValues": table.partition_values(f),
        "size": f.size,
        "modificationTime": now_ms,
        "dataChange": data_change,
    });
    if let Some(n) = f.rows {
        add["stats"] = json!({"numRecords": n}).to_string().into();
    }
    Ok(json!({ "add": add }))
}

/// The `remove` action of a data file.
pub fn remove_action(
    table: Table,
    f: &LakeFile,
    data_change: bool,
    now_ms: i64,
) -> Result<Value, CheckpointError> {
    let rel = table_path(table, &f.path)?;
    Ok(json!({"remove": {
        "path": rel,
        "deletionTimestamp": now_ms,
        "dataChange": data_change,
        "extendedFileMetadata": true,
        "partitionValues": table.partition_values(f),
        "size": f.size,
    }}))
}

/// The `txn` action that records a source's cursor.
pub fn txn_action(source: SourceKind, cursor: i64, now_ms: i64) -> Value {
    txn(&app_id(source), cursor, now_ms)
}

/// A `txn` action: `app`'s version.
pub fn txn(app: &str, version: i64, now_ms: i64) -> Value {
    json!({"txn": {"appId": app, "version": version, "lastUpdated": now_ms}})
}

/// The actions that create a table: protocol and metadata.
pub fn create_actions(table: Table, now_ms: i64) -> Result<Vec<Value>, CheckpointError> {
    Ok(vec![
        json!({"protocol": {"minReaderVersion": 1, "minWriterVersion": 2}}),
        json!({"metaData": {
            "id": table_id(table, now_ms),
            "name": table.name(),
            "format": {"provider": "parquet", "options": {}},
            "schemaString": table.schema_string()?,
            "partitionColumns": table.partition_columns(),
            "configuration": {"delta.checkpointInterval": CHECKPOINT_INTERVAL.to_string()},
            "createdTime": now_ms,
        }}),
    ])
}

/// A table id: a version-4-shaped UUID made from the time and the process (unique enough for
/// an id that only tells tables apart).
fn table_id(table: Table, now_ms: i64) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(
        format!(
            "{table:?}/{now_ms}/{}/{:?}",
            std::process::id(),
            std::time::Instant::now()
        )
        .as_bytes(),
    );
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x: String = b.iter().map(|v| format!("{v:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// Reads a table's log: the last checkpoint, then every commit after it. A gap in the
/// versions, an unreadable commit or an action atlake cannot honour is an error.
pub async fn load(lake: &Lake, table: Table) -> Result<LogState, CheckpointError> {
    let mut st = LogState::default();
    let last = table.log_path("_last_checkpoint");
    let mut next = 0u64;
    if let Some(b) = lake.get(&last).await? {
        let v: Value = serde_json::from_slice(&b).map_err(|e| corrupt(&last, e.to_string()))?;
        let version = v
            .get("version")
            .and_then(Value::as_u64)
            .ok_or_else(|| corrupt(&last, "no version"))?;
        let path = table.log_path(&checkpoint_name(version));
        let bytes = lake
            .get(&path)
            .await?
            .ok_or_else(|| corrupt(&path, "named by _last_checkpoint but missing"))?;
        for action in read_checkpoint(bytes, &path)? {
            st.apply(table, &action, &path)?;
        }
        st.version = Some(version);
        st.checkpoint = Some(version);
        next = version + 1;
        // a checkpoint has no commit information: take the positions from the newest commit
        // at or before it that recorded them (at most one interval back: every commit that
        // moves a cursor records them)
        for v in (version.saturating_sub(CHECKPOINT_INTERVAL)..=version).rev() {
            let Some(info) = commit_info(lake, table, v).await? else {
                break;
            };
            if let Some(p) = positions_of(&info) {
                st.positions = Some(p.clone());
                break;
            }
        }
    }
    let offset = table.log_path(&format!("{:020}", next.saturating_sub(1)));
    let offset = if next == 0 {
        table.log_path("")
    } else {
        offset
    };
    let mut versions: Vec<u64> = lake
        .list_after(&table.log_path(""), &offset)
        .await?
        .into_iter()
        .filter_map(|(p, _)| {
            let name = p.rsplit('/').next()?;
            let v = name.strip_suffix(".json")?;
            // 20 digits beyond u64 name no version this log can reach: not a commit
            (v.len() == 20 && v.bytes().all(|c| c.is_ascii_digit()))
                .then(|| v.parse::<u64>().ok())
                .flatten()
        })
        .filter(|v| *v >= next)
        .collect();
    versions.sort_unstable();
    for v in versions {
        let path = table.log_path(&commit_name(v));
        if v != next {
            return Err(corrupt(
                &path,
                format!("version {next} is missing before it"),
            ));
        }
        let b = lake
            .get(&path)
            .await?
            .ok_or_else(|| corrupt(&path, "listed but missing"))?;
        for line in b.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
            let a: Value =
                serde_json::from_slice(line).map_err(|e| corrupt(&path, e.to_string()))?;
            st.apply(table, &a, &path)?;
        }
        st.version = Some(v);
        next = v + 1;
    }
    if st.version.is_some() && (st.protocol.is_none() || st.metadata.is_none()) {
        return Err(corrupt(
            &table.log_path(""),
            "the log has no protocol or metaData action",
        ));
    }
    Ok(st)
}

/// Bytes of a commit read to find its `commitInfo` (atlake writes it first, and small).
const COMMIT_INFO_HEAD: u64 = 64 * 1024;

/// The `commitInfo` of a commit (`Value::Null` when it has none), or `None` when the commit is
/// not in storage. Only its first bytes are read when `commitInfo` is its first line, as in
/// every commit atlake writes; a version 0 that converted a large lake holds every file.
async fn commit_info(lake: &Lake, table: Table, v: u64) -> Result<Option<Value>, CheckpointError> {
    let path = table.log_path(&commit_name(v));
    let Some(head) = lake.get_head(&path, COMMIT_INFO_HEAD).await? else {
        return Ok(None);
    };
    if let Some(end) = head.iter().position(|c| *c == b'\n') {
        let a: Value =
            serde_json::from_slice(&head[..end]).map_err(|e| corrupt(&path, e.to_string()))?;
        if let Some(ci) = a.get("commitInfo") {
            return Ok(Some(ci.clone()));
        }
    }
    // another writer's layout: read it all
    let b = lake
        .get(&path)
        .await?
        .ok_or_else(|| corrupt(&path, "gone while being read"))?;
    for line in b.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
        let a: Value = serde_json::from_slice(line).map_err(|e| corrupt(&path, e.to_string()))?;
        if let Some(ci) = a.get("commitInfo") {
            return Ok(Some(ci.clone()));
        }
    }
    Ok(Some(Value::Null))
}

/// Deletes the log's entries (commits and checkpoints) that a reader of the newest version no
/// longer needs and that are older than `cutoff_ms`, as Delta's metadata cleanup does
/// (`delta.logRetentionDuration`): every entry before a checkpoint `K` that is
///
/// - at least one checkpoint interval older than the newest checkpoint, so a reader that
///   read `_last_checkpoint` before the newest was written still finds its checkpoint, and
///   the commits [`load`] reads back for the endpoints stay;
/// - committed at or before `cutoff_ms` (its `commitInfo.timestamp`).
///
/// The table stays readable at `K` and every version after it. Returns how many entries were
/// deleted.
pub async fn clean_log(
    lake: &Lake,
    table: Table,
    cutoff_ms: i64,
) -> Result<usize, CheckpointError> {
    let mut commits = Vec::new();
    let mut checkpoints = Vec::new();
    for (p, _) in lake.list(&table.log_path("")).await? {
        let name = p.rsplit_once('/').map_or(p.as_str(), |(_, n)| n);
        let version = |suffix: &str| {
            let v = name.strip_suffix(suffix)?;
            (v.len() == 20 && v.bytes().all(|c| c.is_ascii_digit()))
                .then(|| v.parse::<u64>().ok())
                .flatten()
        };
        if let Some(v) = version(".json") {
            commits.push((v, p));
        } else if let Some(v) = version(".checkpoint.parquet") {
            checkpoints.push((v, p));
        }
    }
    checkpoints.sort_unstable();
    let Some(newest) = checkpoints.last().map(|(v, _)| *v) else {
        return Ok(0);
    };
    let mut keep_from = None;
    for (k, _) in checkpoints.iter().rev() {
        if k.saturating_add(CHECKPOINT_INTERVAL) > newest {
            continue;
        }
        let info = commit_info(lake, table, *k).await?;
        let when = info
            .as_ref()
            .and_then(|i| i.get("timestamp"))
            .and_then(Value::as_i64);
        // a checkpoint whose commit is gone or undated is not one to keep the log from
        if when.is_some_and(|t| t <= cutoff_ms) {
            keep_from = Some(*k);
            break;
        }
    }
    let Some(k) = keep_from else {
        return Ok(0);
    };
    let mut deleted = 0;
    for (v, p) in commits.iter().chain(checkpoints.iter()) {
        if *v < k {
            lake.delete(p).await?;
            deleted += 1;
        }
    }
    if deleted > 0 {
        tracing::info!(
            table = table.root(),
            deleted,
            kept_from = k,
            "removed log entries older than the log retention"
        );
    }
    Ok(deleted)
}

/// Writes a checkpoint of `state` at its version (the conversion of a large lake does at
/// version 0, so that no start reads that commit whole again). A failure is only logged and
/// counted: a checkpoint only speeds up reading.
pub async fn checkpoint_now(lake: &Lake, table: Table, state: &mut LogState) {
    let Some(version) = state.version else {
        return;
    };
    match write_checkpoint(lake, table, state, version).await {
        Ok(()) => state.checkpoint = Some(version),
        Err(e) => {
            metrics::counter!("atlake_storage_errors_total", "kind" => "delta_checkpoint")
                .increment(1);
            tracing::warn!(error = %e, table = table.root(), version, "writing a Delta checkpoint failed; the next interval tries again");
        }
    }
}

/// Why a commit did not land.
#[derive(Debug)]
pub enum CommitOutcome {
    /// It is in the log at this version.
    Committed(u64),
    /// Another commit took that version first (the caller reloads the log).
    Conflict(u64),
}

/// Writes `actions` as the version after `state`'s, with commit information (`operation`, and
/// atlake's own `info`), and applies them to `state` if it landed. Writes a checkpoint when
/// the version is a multiple of [`CHECKPOINT_INTERVAL`].
pub async fn commit(
    lake: &Lake,
    table: Table,
    state: &mut LogState,
    operation: &str,
    info: Value,
    actions: Vec<Value>,
) -> Result<CommitOutcome, CheckpointError> {
    let version = state.version.map_or(0, |v| v + 1);
    let now = crate::model::cursor::now_us() / 1000;
    let mut body = Vec::new();
    let ci = json!({"commitInfo": {
        "timestamp": now,
        "operation": operation,
        "operationParameters": {},
        "engineInfo": concat!("atlake/", env!("CARGO_PKG_VERSION")),
        "isBlindAppend": !matches!(operation, "OPTIMIZE" | "DELETE"),
        "atlake": info,
    }});
    for a in std::iter::once(&ci).chain(actions.iter()) {
        serde_json::to_writer(&mut body, a)
            .map_err(|e| corrupt(&table.log_path(""), e.to_string()))?;
        body.push(b'\n');
    }
    let path = table.log_path(&commit_name(version));
    if !lake.put_new(&path, body.into()).await? {
        return Ok(CommitOutcome::Conflict(version));
    }
    for a in std::iter::once(&ci).chain(actions.iter()) {
        state.apply(table, a, &path)?;
    }
    state.version = Some(version);
    if version > 0 && version.is_multiple_of(CHECKPOINT_INTERVAL) {
        // a checkpoint only speeds up reading: the commit stands without it
        checkpoint_now(lake, table, state).await;
    }
    Ok(CommitOutcome::Committed(version))
}

/// The Arrow schema of a Delta checkpoint (the actions atlake writes).
fn checkpoint_schema() -> Arc<Schema> {
    let s = |n: &str| Field::new(n, DataType::Utf8, true);
    let l = |n: &str| Field::new(n, DataType::Int64, true);
    let map = |n: &str| {
        Field::new_map(
            n,
            "key_value",
            Field::new("key", DataType::Utf8, false),
            Field::new("value", DataType::Utf8, true),
            false,
            true,
        )
    };
    let st = |n: &str, f: Vec<Field>| Field::new(n, DataType::Struct(Fields::from(f)), true);
    Arc::new(Schema::new(vec![
        st("txn", vec![s("appId"), l("version"), l("lastUpdated")]),
        st(
            "add",
            vec![
                s("path"),
                map("partitionValues"),
                l("size"),
                l("modificationTime"),
                Field::new("dataChange", DataType::Boolean, true),
                s("stats"),
            ],
        ),
        st(
            "remove",
            vec![
                s("path"),
                l("deletionTimestamp"),
                Field::new("dataChange", DataType::Boolean, true),
                Field::new("extendedFileMetadata", DataType::Boolean, true),
                map("partitionValues"),
                l("size"),
            ],
        ),
        st(
            "metaData",
            vec![
                s("id"),
                s("name"),
                s("description"),
                st("format", vec![s("provider"), map("options")]),
                s("schemaString"),
                Field::new(
                    "partitionColumns",
                    DataType::List(Arc::new(Field::new("element", DataType::Utf8, true))),
                    true,
                ),
                map("configuration"),
                l("createdTime"),
            ],
        ),
        st(
            "protocol",
            vec![
                Field::new("minReaderVersion", DataType::Int32, true),
                Field::new("minWriterVersion", DataType::Int32, true),
            ],
        ),
    ]))
}

/// Writes the state at `version` as a checkpoint, then points `_last_checkpoint` at it.
async fn write_checkpoint(
    lake: &Lake,
    table: Table,
    state: &LogState,
    version: u64,
) -> Result<(), CheckpointError> {
    let path = table.log_path(&checkpoint_name(version));
    let err = |e: &dyn std::fmt::Display| corrupt(&path, e.to_string());
    let mut lines: Vec<Value> = Vec::new();
    let (Some(p), Some(m)) = (&state.protocol, &state.metadata) else {
        return Err(corrupt(&path, "no protocol or metaData to checkpoint"));
    };
    lines.push(json!({ "protocol": p }));
    lines.push(json!({ "metaData": m }));
    for (app, (v, when)) in &state.txns {
        lines.push(json!({"txn": {"appId": app, "version": v, "lastUpdated": when}}));
    }
    for f in state.files.values() {
        // the time a file was added survives the checkpoint (the purge reads it)
        let added = state
            .added
            .get(&f.path)
            .copied()
            .ok_or_else(|| corrupt(&path, format!("{}: no time it was added", f.path)))?;
        lines.push(add_action(table, f, false, added)?);
    }
    for (p, when) in &state.removed {
        let rel = table_path(table, p)?;
        lines.push(json!({"remove": {"path": rel, "deletionTimestamp": when, "dataChange": true}}));
    }
    let schema = checkpoint_schema();
    let mut ndjson = Vec::new();
    for l in &lines {
        serde_json::to_writer(&mut ndjson, l).map_err(|e| err(&e))?;
        ndjson.push(b'\n');
    }
    let mut decoder = arrow::json::ReaderBuilder::new(schema.clone())
        .with_batch_size(lines.len().max(1))
        .build_decoder()
        .map_err(|e| err(&e))?;
    decoder.decode(&ndjson).map_err(|e| err(&e))?;
    let batch = decoder
        .flush()
        .map_err(|e| err(&e))?
        .ok_or_else(|| corrupt(&path, "no rows decoded"))?;
    let mut out = Vec::new();
    {
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::ZSTD(
                parquet::basic::ZstdLevel::default(),
            ))
            .build();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, Some(props))
            .map_err(|e| err(&e))?;
        w.write(&batch).map_err(|e| err(&e))?;
        w.close().map_err(|e| err(&e))?;
    }
    lake.put_atomic(&path, out.into()).await?;
    let last = json!({"version": version, "size": lines.len()}).to_string();
    lake.put_atomic(&table.log_path("_last_checkpoint"), last.into())
        .await?;
    Ok(())
}

/// The actions of a checkpoint, as JSON values.
fn read_checkpoint(bytes: bytes::Bytes, path: &str) -> Result<Vec<Value>, CheckpointError> {
    let err = |e: &dyn std::fmt::Display| corrupt(path, e.to_string());
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| err(&e))?
        .with_batch_size(8192)
        .build()
        .map_err(|e| err(&e))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| err(&e))?;
        let mut buf = Vec::new();
        {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
            w.write(&b).map_err(|e| err(&e))?;
            w.finish().map_err(|e| err(&e))?;
        }
        for line in buf.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
            out.push(serde_json::from_slice(line).map_err(|e| err(&e))?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Cursor;
    use crate::sink::partition::{FileName, PartitionKey, PartitionName};

    fn file(coll: &str, hour: i64, first: i64, rows: u64) -> LakeFile {
        let key = PartitionKey::at_hour(PartitionName::Collection(coll.into()), hour).unwrap();
        let name = FileName::try_new(
            Cursor::seq(first).unwrap(),
            Cursor::seq(first + 9).unwrap(),
            7,
        )
        .unwrap();
        let path = format!("{}/{}", key.dir(), name.render());
        let mut f = parse_path(&path, 1234).unwrap();
        f.rows = Some(rows);
        f
    }

    async fn new_table(lake: &Lake, table: Table) -> LogState {
        let mut st = LogState::default();
        let acts = create_actions(table, 1).unwrap();
        assert!(matches!(
            commit(lake, table, &mut st, "CREATE TABLE", json!({}), acts)
                .await
                .unwrap(),
            CommitOutcome::Committed(0)
        ));
        st
    }

    /// Files and the cursor committed together are what a fresh read of the log finds; a
    /// second writer of the same version is refused, not merged.
    #[tokio::test]
    async fn a_commit_is_read_back_with_its_files_and_cursor() {
        let lake = Lake::open("memory://").unwrap();
        let mut st = new_table(&lake, Table::Events).await;
        let a = file("app.bsky.feed.post", 493_000, 10, 5);
        let b = file("app.bsky.feed.like", 493_001, 20, 6);
        let acts = vec![
            add_action(Table::Events, &a, true, 5).unwrap(),
            add_action(Table::Events, &b, true, 5).unwrap(),
            txn_action(SourceKind::Firehose, 29, 5),
        ];
        let out = commit(
            &lake,
            Table::Events,
            &mut st,
            "STREAMING UPDATE",
            positions_info(json!({"x": 1})),
            acts,
        )
        .await
        .unwrap();
        assert!(matches!(out, CommitOutcome::Committed(1)));
        let read = load(&lake, Table::Events).await.unwrap();
        assert_eq!(read.version, Some(1));
        assert_eq!(read.files.len(), 2);
        assert_eq!(read.files[&a.path].rows, Some(5));
        assert_eq!(read.files[&b.path].key, b.key);
        assert_eq!(read.txn(SourceKind::Firehose), Some((29, 5)));
        assert_eq!(read.txn(SourceKind::Jetstream), None);
        assert_eq!(read.positions, Some(json!({"x": 1})));
        // a stale writer that still thinks version 0 is the newest
        let mut stale = new_table(&Lake::open("memory://").unwrap(), Table::Events).await;
        stale.version = Some(0);
        let again = commit(
            &lake,
            Table::Events,
            &mut stale,
            "STREAMING UPDATE",
            json!({}),
            vec![],
        )
        .await
        .unwrap();
        assert!(matches!(again, CommitOutcome::Conflict(1)));
        assert_eq!(load(&lake, Table::Events).await.unwrap().files.len(), 2);
    }

    /// Commits a file and a cursor per version until `last`, each recording its positions.
    async fn commit_until(lake: &Lake, st: &mut LogState, last: u64) {
        while st.version.unwrap() < last {
            let v = st.version.unwrap() + 1;
            let f = file("app.bsky.feed.like", 493_000 + v as i64, v as i64 * 10, v);
            let acts = vec![
                add_action(Table::Events, &f, true, 5).unwrap(),
                txn_action(SourceKind::Firehose, v as i64, 6),
            ];
            let info = positions_info(json!({"v": v}));
            commit(lake, Table::Events, st, "WRITE", info, acts)
                .await
                .unwrap();
        }
    }

    /// Log entries go only once they are older than the cutoff and a checkpoint at least one
    /// interval older than the newest covers them; the table reads the same afterwards.
    #[tokio::test]
    async fn old_log_entries_go_once_an_older_checkpoint_covers_them() {
        let lake = Lake::open("memory://").unwrap();
        let mut st = new_table(&lake, Table::Events).await;
        commit_until(&lake, &mut st, 2 * CHECKPOINT_INTERVAL + 20).await;
        let names = |lake: Lake| async move {
            let mut n: Vec<String> = lake
                .list(&Table::Events.log_path(""))
                .await
                .unwrap()
                .into_iter()
                .map(|(p, _)| p.rsplit('/').next().unwrap().to_string())
                .collect();
            n.sort();
            n
        };
        let before = load(&lake, Table::Events).await.unwrap();
        let now = crate::model::cursor::now_us() / 1000;
        // nothing is older than a cutoff an hour ago
        assert_eq!(
            clean_log(&lake, Table::Events, now - 3_600_000)
                .await
                .unwrap(),
            0
        );
        assert_eq!(names(lake.clone()).await.len(), 221 + 2 + 1);
        // everything is old: the entries before the checkpoint one interval behind the newest
        // (100, since the newest is 200) go
        let gone = clean_log(&lake, Table::Events, now + 3_600_000)
            .await
            .unwrap();
        assert_eq!(gone, CHECKPOINT_INTERVAL as usize);
        let left = names(lake.clone()).await;
        assert_eq!(
            left.iter().find(|n| n.ends_with(".json")),
            Some(&commit_name(CHECKPOINT_INTERVAL))
        );
        assert!(left.contains(&checkpoint_name(CHECKPOINT_INTERVAL)));
        assert!(left.contains(&"_last_checkpoint".to_string()));
        let after = load(&lake, Table::Events).await.unwrap();
        assert_eq!(after.version, before.version);
        assert_eq!(
            after.files.keys().collect::<Vec<_>>(),
            before.files.keys().collect::<Vec<_>>()
        );
        assert_eq!(after.txns, before.txns);
        assert_eq!(after.positions, before.positions);
        // a second pass finds nothing more until a newer checkpoint exists
        assert_eq!(
            clean_log(&lake, Table::Events, now + 3_600_000)
                .await
                .unwrap(),
            0
        );
        commit_until(&lake, &mut st, 3 * CHECKPOINT_INTERVAL + 1).await;
        // commits 100..199 and the checkpoint at 100
        let gone = clean_log(&lake, Table::Events, now + 3_600_000)
            .await
            .unwrap();
        assert_eq!(gone, CHECKPOINT_INTERVAL as usize + 1);
        let after = load(&lake, Table::Events).await.unwrap();
        assert_eq!(after.version, st.version);
        assert_eq!(after.files.len(), st.files.len());
        assert_eq!(
            after.positions,
            Some(json!({"v": 3 * CHECKPOINT_INTERVAL + 1}))
        );
        assert_eq!(after.checkpoint, Some(3 * CHECKPOINT_INTERVAL));
    }

    /// Past a checkpoint the log reads the same: the checkpoint's files and txns, then the
    /// commits after it; a removed file stays a tombstone.
    #[tokio::test]
    async fn checkpoints_read_back_like_the_commits_they_replace() {
        let lake = Lake::open("memory://").unwrap();
        let mut st = new_table(&lake, Table::Events).await;
        let mut all = Vec::new();
        for v in 1..=(CHECKPOINT_INTERVAL + 3) {
            let f = file("app.bsky.feed.post", 493_000 + v as i64, v as i64 * 10, v);
            let acts = vec![
                add_action(Table::Events, &f, true, 5).unwrap(),
                txn_action(SourceKind::Jetstream, 1_700_000_000_000_000 + v as i64, 6),
            ];
            all.push(f);
            commit(
                &lake,
                Table::Events,
                &mut st,
                "WRITE",
                // the last commits up to and past the checkpoint record no positions: they
                // are found further back
                if v + 2 <= CHECKPOINT_INTERVAL {
                    positions_info(json!({"v": v}))
                } else {
                    json!({})
                },
                acts,
            )
            .await
            .unwrap();
        }
        let gone = all.remove(0);
        commit(
            &lake,
            Table::Events,
            &mut st,
            "DELETE",
            json!({}),
            vec![remove_action(Table::Events, &gone, true, 9).unwrap()],
        )
        .await
        .unwrap();
        assert!(
            lake.get(&Table::Events.log_path("_last_checkpoint"))
                .await
                .unwrap()
                .is_some()
        );
        let read = load(&lake, Table::Events).await.unwrap();
        assert_eq!(read.version, Some(CHECKPOINT_INTERVAL + 4));
        assert_eq!(read.files.len(), all.len());
        for f in &all {
            assert_eq!(read.files[&f.path].rows, f.rows, "{}", f.path);
        }
        assert!(read.removed.contains_key(&gone.path));
        assert_eq!(
            read.txn(SourceKind::Jetstream).map(|t| t.0),
            Some(1_700_000_000_000_000 + CHECKPOINT_INTERVAL as i64 + 3)
        );
        // the newest commit that recorded positions, two before the checkpoint
        assert_eq!(read.positions, Some(json!({"v": CHECKPOINT_INTERVAL - 2})));
        // the checkpoint alone (as if the commits after it were not there)
        let cp = lake
            .get(&Table::Events.log_path(&checkpoint_name(CHECKPOINT_INTERVAL)))
            .await
            .unwrap()
            .unwrap();
        let acts = read_checkpoint(cp, "cp").unwrap();
        let adds = acts.iter().filter(|a| a.get("add").is_some()).count();
        assert_eq!(adds as u64, CHECKPOINT_INTERVAL);
        assert!(acts.iter().any(|a| a.get("protocol").is_some()));
        assert!(
            acts.iter()
                .any(|a| a["metaData"]["schemaString"].is_string())
        );
    }

    /// A hole in the versions, an add outside the table, a foreign protocol: errors, not a
    /// partial table.
    #[tokio::test]
    async fn a_broken_log_is_an_error() {
        let lake = Lake::open("memory://").unwrap();
        let mut st = new_table(&lake, Table::Events).await;
        commit(&lake, Table::Events, &mut st, "WRITE", json!({}), vec![])
            .await
            .unwrap();
        lake.put_atomic(&Table::Events.log_path(&commit_name(3)), "{}".into())
            .await
            .unwrap();
        assert!(
            load(&lake, Table::Events).await.is_err(),
            "version 2 is missing"
        );

        let lake = Lake::open("memory://").unwrap();
        let mut st = new_table(&lake, Table::Events).await;
        let bad = json!({"add": {"path": "../../etc/passwd", "size": 1, "partitionValues": {}}});
        commit(&lake, Table::Events, &mut st, "WRITE", json!({}), vec![])
            .await
            .unwrap();
        lake.put_atomic(
            &Table::Events.log_path(&commit_name(2)),
            bad.to_string().into(),
        )
        .await
        .unwrap();
        assert!(load(&lake, Table::Events).await.is_err(), "not a data file");

        // a row count that is not one
        let file = "collection_partition=app.bsky.feed.like/date=2026-07-04/hour=14/\
                    js-1783173600001250-1783173715890250-f7c71f08.parquet";
        for (n, ok) in [
            (json!(12), true),
            (json!(-1), false),
            (json!(u64::MAX), false),
            (json!("7"), false),
        ] {
            let lake = Lake::open("memory://").unwrap();
            let mut st = new_table(&lake, Table::Events).await;
            let stats = json!({ "numRecords": n }).to_string();
            let add = json!({"add": {"path": file, "size": 10, "modificationTime": 1,
                "dataChange": true, "stats": stats,
                "partitionValues": {"collection_partition": "app.bsky.feed.like",
                                    "date": "2026-07-04", "hour": "14"}}});
            commit(&lake, Table::Events, &mut st, "WRITE", json!({}), vec![])
                .await
                .unwrap();
            lake.put_atomic(
                &Table::Events.log_path(&commit_name(2)),
                add.to_string().into(),
            )
            .await
            .unwrap();
            let loaded = load(&lake, Table::Events).await;
            assert_eq!(loaded.is_ok(), ok, "numRecords {n}: {loaded:?}");
        }

        let lake = Lake::open("memory://").unwrap();
        let p = json!({"protocol": {"minReaderVersion": 3, "minWriterVersion": 7}});
        lake.put_atomic(
            &Table::Errors.log_path(&commit_name(0)),
            p.to_string().into(),
        )
        .await
        .unwrap();
        assert!(
            load(&lake, Table::Errors).await.is_err(),
            "reader version 3"
        );
    }

    #[test]
    fn the_schema_names_every_stored_column_then_the_partitions() {
        let s: Value = serde_json::from_str(&Table::Events.schema_string().unwrap()).unwrap();
        let names: Vec<&str> = s["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(names[0], "did");
        assert!(names.contains(&"collection"));
        assert!(names.contains(&"handle"));
        assert_eq!(
            &names[names.len() - 3..],
            ["collection_partition", "date", "hour"]
        );
        let f = file("app.bsky.feed.post", 24 * 20_000 + 5, 1, 1);
        let pv = Table::Events.partition_values(&f);
        assert_eq!(pv["hour"], "5");
        assert_eq!(pv["date"], "2024-10-04");
        assert_eq!(pv[COLLECTION_PARTITION], "app.bsky.feed.post");
        // a compacted long-tail day: a null hour, which the schema allows
        let day =
            crate::sink::partition::PartitionKey::day_of(f.key.name.clone(), f.key.hour()).unwrap();
        let d = LakeFile {
            key: day.clone(),
            path: format!("{}/{}", day.dir(), f.name.render()),
            ..f
        };
        let pv = Table::Events.partition_values(&d);
        assert!(pv["hour"].is_null());
        assert_eq!(pv["date"], "2024-10-04");
        let hour = s["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "hour")
            .unwrap();
        assert_eq!(hour["nullable"], true);
    }

    /// A table created when `hour` could not be null gets a `metaData` action with the
    /// current schema (its id and other fields kept); a current table gets none.
    #[test]
    fn an_older_schema_is_brought_up_to_date_once() {
        let mut st = LogState::default();
        for a in create_actions(Table::Events, 1).unwrap() {
            st.apply(Table::Events, &a, "v0").unwrap();
        }
        assert!(st.schema_update(Table::Events).unwrap().is_none());
        let mut old = st.metadata.clone().unwrap();
        old["schemaString"] = old["schemaString"]
            .as_str()
            .unwrap()
            .replace(
                r#""name":"hour","nullable":true"#,
                r#""name":"hour","nullable":false"#,
            )
            .into();
        assert_ne!(
            old["schemaString"],
            st.metadata.as_ref().unwrap()["schemaString"]
        );
        let id = old["id"].clone();
        st.metadata = Some(old);
        let up = st.schema_update(Table::Events).unwrap().unwrap();
        assert_eq!(up["metaData"]["id"], id);
        st.apply(Table::Events, &up, "v1").unwrap();
        assert!(st.schema_update(Table::Events).unwrap().is_none());
    }
}
