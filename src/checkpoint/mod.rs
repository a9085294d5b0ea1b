//! The checkpoint and start-up recovery.
//!
//! **Invariant**: the checkpoint cursor `C` of a source means every event that source delivered
//! with a cursor `≤ C` is in a committed file. It is written (atomically, to
//! `<lake>/_atlake/checkpoint.json`) only after the files that justify it are durable, so it is
//! never ahead of the data; it lives in the lake, so the lake describes itself.
//!
//! **Recovery**: files may hold events beyond `C` (partitions flush independently). On start we
//! list the lake, remove temporary leftovers of interrupted writes, and read the dedupe keys of
//! every row beyond `C` (minus the Jetstream rewind) from the files themselves. The stream is
//! resumed from `C`; a replayed event whose key is already durable is skipped. Nothing depends on
//! which partition an event landed in, so the `_other` routing (which depends on what was open)
//! cannot cause duplicates.

use crate::model::SourceKind;
use crate::sink::batcher::{KeyParts, error_key_of, key_of};
use crate::sink::partition::{LakeFile, STATE_DIR, parse_path};
use crate::sink::store::{Lake, StoreError};
use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Lake-relative path of the checkpoint.
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
    /// A data file could not be read back.
    #[error("reading {path}: {message}")]
    File {
        /// which
        path: String,
        /// why
        message: String,
    },
}

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
        }
    }

    /// Sets the position of a source kind.
    pub fn set(&mut self, kind: SourceKind, pos: SourcePosition) {
        match kind {
            SourceKind::Firehose => self.firehose = Some(pos),
            SourceKind::Jetstream => self.jetstream = Some(pos),
        }
    }

    /// Reads the checkpoint of a lake (`None` for a new lake).
    pub async fn load(lake: &Lake) -> Result<Option<Checkpoint>, CheckpointError> {
        let path = checkpoint_path();
        match lake.get(&path).await? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| CheckpointError::Corrupt {
                    path,
                    message: e.to_string(),
                }),
        }
    }

    /// Writes the checkpoint atomically.
    pub async fn store(&self, lake: &Lake) -> Result<(), CheckpointError> {
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
    pub resume_cursor: Option<i64>,
    /// Every data file in the lake.
    pub files: Vec<LakeFile>,
    /// Keys of durable events beyond the resume point.
    pub durable_keys: HashSet<u128>,
    /// Highest cursor among this source's files.
    pub durable_high: Option<i64>,
    /// Temporary files removed.
    pub temp_removed: usize,
    /// Files read for keys.
    pub files_scanned: usize,
}

/// Lists every data file of the lake.
pub async fn list_files(lake: &Lake) -> Result<Vec<LakeFile>, CheckpointError> {
    let mut files = Vec::new();
    for dir in [
        crate::sink::partition::EVENTS_DIR,
        crate::sink::partition::ERRORS_DIR,
    ] {
        for (path, size) in lake.list(dir).await? {
            if let Some(f) = parse_path(&path, size) {
                files.push(f);
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Recovers the state for `source`: checkpoint, files, and the keys of durable events that a
/// resumed stream may deliver again. `rewind` is the Jetstream rewind in cursor units (µs).
pub async fn recover(
    lake: &Lake,
    source: SourceKind,
    rewind: i64,
) -> Result<Recovery, CheckpointError> {
    let temp_removed = lake.remove_temp_files().await?;
    let checkpoint = Checkpoint::load(lake).await?.unwrap_or_default();
    let files = list_files(lake).await?;
    let mine: Vec<&LakeFile> = files.iter().filter(|f| f.name.source == source).collect();
    let durable_high = mine.iter().map(|f| f.name.last).max();
    let cursor = checkpoint.position(source).map(|p| p.cursor);
    // without a checkpoint (a new lake, or a crash before the first checkpoint) nothing says
    // which events are durable: the caller starts at its configured start, and every file of
    // this source is read for dedupe keys
    let resume_cursor = cursor;
    let threshold = match cursor {
        Some(c) => c.saturating_sub(rewind),
        None => i64::MIN,
    };
    let mut durable_keys = HashSet::new();
    let mut files_scanned = 0;
    for f in mine.iter().filter(|f| f.name.last >= threshold) {
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
        files_scanned,
    })
}

fn str_col<'a>(
    b: &'a arrow::record_batch::RecordBatch,
    name: &str,
) -> Option<&'a arrow::array::StringArray> {
    b.column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
}

fn get(c: Option<&arrow::array::StringArray>, i: usize) -> &str {
    match c {
        Some(c) if c.is_valid(i) => c.value(i),
        _ => "",
    }
}

/// Adds the dedupe keys of the rows of `f` whose cursor is at or above `threshold`.
async fn read_keys(
    lake: &Lake,
    f: &LakeFile,
    source: SourceKind,
    threshold: i64,
    keys: &mut HashSet<u128>,
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
    let wanted: &[&str] = if is_errors {
        &["reason", "raw", "path", "cursor"]
    } else {
        &[
            "did",
            "kind",
            "collection",
            "rkey",
            "rev",
            "operation",
            "seq",
            "time_us",
            "event_seq",
        ]
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
        if is_errors {
            let reason = str_col(&b, "reason");
            let path = str_col(&b, "path");
            let raw = b
                .column_by_name("raw")
                .and_then(|c| c.as_binary_opt::<i32>());
            let cursor = b
                .column_by_name("cursor")
                .and_then(|c| c.as_primitive_opt::<Int64Type>());
            for i in 0..b.num_rows() {
                let c = cursor.and_then(|c| c.is_valid(i).then(|| c.value(i)));
                if c.is_some_and(|c| c < threshold) {
                    continue;
                }
                let p = path.and_then(|p| p.is_valid(i).then(|| p.value(i)));
                let r = raw.map(|r| r.value(i)).unwrap_or_default();
                keys.insert(error_key_of(get(reason, i), r, p, c));
            }
            continue;
        }
        let cur_name = match source {
            SourceKind::Firehose => "seq",
            SourceKind::Jetstream => "time_us",
        };
        let cursor = b
            .column_by_name(cur_name)
            .and_then(|c| c.as_primitive_opt::<Int64Type>());
        let event_seq = b
            .column_by_name("event_seq")
            .and_then(|c| c.as_primitive_opt::<Int64Type>());
        let (did, kind, coll, rkey, rev, op) = (
            str_col(&b, "did"),
            str_col(&b, "kind"),
            str_col(&b, "collection"),
            str_col(&b, "rkey"),
            str_col(&b, "rev"),
            str_col(&b, "operation"),
        );
        for i in 0..b.num_rows() {
            if let Some(c) = cursor
                && c.is_valid(i)
                && c.value(i) < threshold
            {
                continue;
            }
            let kind_s = get(kind, i);
            let es = match event_seq {
                Some(s) if s.is_valid(i) && (kind_s == "identity" || kind_s == "account") => {
                    s.value(i)
                }
                _ => 0,
            };
            keys.insert(key_of(KeyParts {
                kind: kind_s,
                did: get(did, i),
                collection: get(coll, i),
                rkey: get(rkey, i),
                rev: get(rev, i),
                operation: get(op, i),
                event_seq: es,
            }));
        }
    }
    Ok(())
}
