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

    /// Reads the checkpoint of a lake (`None` for a new lake). A cursor out of range is an
    /// error, not a position.
    pub async fn load(lake: &Lake) -> Result<Option<Checkpoint>, CheckpointError> {
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
    pub resume_cursor: Option<Cursor>,
    /// Every data file in the lake.
    pub files: Vec<LakeFile>,
    /// Keys of durable events beyond the resume point.
    pub durable_keys: HashSet<EventKey>,
    /// Highest cursor among this source's files.
    pub durable_high: Option<Cursor>,
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
        crate::sink::partition::HISTORY_DIR,
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
/// resumed stream may deliver again. `rewind` is how far before the checkpoint the stream will
/// resume, in cursor units (µs for Jetstream). The caller holds the lake's writer lease: only
/// then are leftover temporary files safe to remove.
pub async fn recover(
    lake: &Lake,
    source: SourceKind,
    rewind: u64,
) -> Result<Recovery, CheckpointError> {
    let temp_removed = lake.remove_temp_files().await?;
    let checkpoint = Checkpoint::load(lake).await?.unwrap_or_default();
    let files = list_files(lake).await?;
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
        files_scanned,
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
        cp.store(&lake).await.unwrap();
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
        let mut b = Batcher::new(
            FlushPolicy::from_config(&Default::default()),
            SourceKind::Firehose,
        );
        for e in &evs {
            b.push_event(e, e.cursor(), event_key(e), Instant::now())
                .unwrap();
        }
        write(&lake, SourceKind::Firehose, b.drain().unwrap()).await;
        let part = dir
            .path()
            .join("events/collection=app.bsky.feed.like/date=2026-07-04/hour=14");
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
}
