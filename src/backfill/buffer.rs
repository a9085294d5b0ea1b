//! The rows of a backfill between two flushes, and the flush that makes them files.
//!
//! History spreads over thousands of hours, so the live batcher's shape (one row builder per
//! open partition, a file when one fills) would make a file per hour per repo. Here every row
//! goes into one builder with its partition number beside it; a flush cuts the rows by
//! partition and writes one file per partition it touched, so a flush of many repos makes one
//! file per (collection, hour) that those repos wrote in. The buffer's size (`backfill.buffer`)
//! sets how many repos share a file.

use crate::config::WriterConfig;
use crate::model::lexicon::Lexicon;
use crate::model::rows::{RepoRecord, RowBuilder, TableKind};
use crate::model::{Cursor, ErrorEvent, SourceKind};
use crate::sink::parquet::{FileMeta, encode_to};
use crate::sink::partition::{
    FileName, HOUR_US, LakeFile, PartitionKey, PartitionName, PartitionRangeError,
    is_path_safe_collection,
};
use crate::sink::store::Lake;
use arrow::array::{RecordBatch, UInt32Array};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Collections outside the core lexicons that get partitions of their own in one flush; the
/// rest share `_other`.
pub const MAX_NAMED_PARTITIONS: usize = 16;

/// Why a flush failed.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// The rows could not be made a batch.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A file could not be stored (after retries).
    #[error("storing {path}: {why}")]
    Store {
        /// the file
        path: String,
        /// why
        why: String,
    },
    /// A file name could not be made.
    #[error("{0}")]
    Name(String),
}

/// Rows waiting for the next flush.
#[derive(Debug)]
pub struct HistoryBuffer {
    rows: RowBuilder,
    parts: Vec<u32>,
    keys: Vec<PartitionKey>,
    index: HashMap<PartitionKey, u32>,
    named: HashSet<String>,
    errors: RowBuilder,
    error_parts: Vec<u32>,
    /// The partition of the last record: its collection, hours `[from, to)` (its month) and
    /// number. A repo's records come in key order, so most share the previous one's.
    last: Option<(String, i64, i64, u32)>,
}

impl Default for HistoryBuffer {
    fn default() -> Self {
        HistoryBuffer {
            rows: RowBuilder::new(TableKind::Events(None), SourceKind::Repo),
            parts: Vec::new(),
            keys: Vec::new(),
            index: HashMap::new(),
            named: HashSet::new(),
            errors: RowBuilder::new(TableKind::Errors, SourceKind::Repo),
            error_parts: Vec::new(),
            last: None,
        }
    }
}

impl HistoryBuffer {
    /// Estimated bytes buffered.
    pub fn bytes(&self) -> usize {
        self.rows.bytes() + self.errors.bytes() + self.parts.len() * 4
    }

    /// Rows buffered (records and quarantined inputs).
    pub fn len(&self) -> usize {
        self.rows.len() + self.errors.len()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn part(&mut self, key: PartitionKey) -> u32 {
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        let i = self.keys.len() as u32;
        self.keys.push(key.clone());
        self.index.insert(key, i);
        i
    }

    /// The partition of a record of `collection` made at `time_us`.
    fn record_partition(
        &mut self,
        collection: &str,
        time_us: i64,
    ) -> Result<PartitionKey, PartitionRangeError> {
        let own = Lexicon::of(collection).is_some()
            || self.named.contains(collection)
            || (self.named.len() < MAX_NAMED_PARTITIONS && is_path_safe_collection(collection));
        let name = if own && is_path_safe_collection(collection) {
            if Lexicon::of(collection).is_none() {
                self.named.insert(collection.to_string());
            }
            PartitionName::Collection(collection.to_string())
        } else {
            PartitionName::Other
        };
        PartitionKey::month_of(name, time_us)
    }

    /// Buffers one record (its time already bounded by
    /// [`crate::decode::repo::record_time_us`]).
    pub fn push_record(&mut self, r: &RepoRecord<'_>) -> Result<(), PartitionRangeError> {
        let hour = r.time_us.div_euclid(HOUR_US);
        let cached = match &self.last {
            Some((c, from, to, p)) if c == r.collection && (*from..*to).contains(&hour) => Some(*p),
            _ => None,
        };
        let p = match cached {
            Some(p) => p,
            None => {
                let key = self.record_partition(r.collection, r.time_us)?;
                let from = key.hour();
                // the next month starts within 31 days of this one's first hour; the last
                // month of the range has none, and then only its first hour is remembered (the
                // rest of it is computed again, not guessed)
                let to = PartitionKey::month_of(key.name.clone(), (from + 31 * 24) * HOUR_US)
                    .map(|k| k.hour())
                    .unwrap_or(from + 1);
                let p = self.part(key);
                match &mut self.last {
                    Some(last) => {
                        last.0.clear();
                        last.0.push_str(r.collection);
                        (last.1, last.2, last.3) = (from, to, p);
                    }
                    None => self.last = Some((r.collection.to_string(), from, to, p)),
                }
                p
            }
        };
        self.rows.push_record(r);
        self.parts.push(p);
        Ok(())
    }

    /// Buffers the marker of a fresh fetch after a gap: a `sync` row of `did` at the cut
    /// `cut` (the latest rev seen of the repo, at least the snapshot's) with origin `repo`, the
    /// snapshot's rev in its record, in the `_sync` partition of the cut's (bounded) time.
    /// `current.*` takes it to mean that the repo's rows up to the cut are replaced by the
    /// snapshot's.
    pub fn push_reset(&mut self, did: &str, snapshot: &str, cut: &str) -> Result<(), String> {
        use crate::model::{Did, Envelope, Event, EventData, SyncInfo, Tid};
        let now = crate::model::cursor::now_us();
        let time_us = crate::decode::repo::record_time_us("", None, Some(cut), now);
        let (Ok(did), Ok(rev), Ok(snap)) = (Did::parse(did), Tid::parse(cut), Tid::parse(snapshot))
        else {
            // the fetch checked them (the commit's DID is the one asked for; v3 revs are TIDs)
            return Err(format!(
                "a reset marker for {did:?} at {snapshot:?}/{cut:?}"
            ));
        };
        let key =
            PartitionKey::month_of(PartitionName::Sync, time_us).map_err(|e| e.to_string())?;
        let p = self.part(key);
        self.rows.push_event(&Envelope {
            event: Event {
                did,
                data: EventData::Sync(SyncInfo {
                    rev,
                    snapshot: Some(snap),
                }),
            },
            time_us,
            claimed_time_us: None,
            seq: None,
            chain: None,
        });
        self.parts.push(p);
        Ok(())
    }

    /// Buffers a quarantined input, in the quarantine's partition of `time_us`.
    pub fn push_error(
        &mut self,
        err: &ErrorEvent,
        batch: Cursor,
        time_us: i64,
    ) -> Result<(), PartitionRangeError> {
        let key = PartitionKey::try_new(PartitionName::Errors, time_us)?;
        let p = self.part(key);
        self.errors
            .push_error(err, SourceKind::Repo, Some(batch), time_us);
        self.error_parts.push(p);
        Ok(())
    }

    /// The buffered rows cut by partition; the buffer is empty after.
    pub fn take(&mut self) -> Result<Vec<(PartitionKey, RecordBatch)>, FlushError> {
        let mut out = Vec::new();
        let keys = std::mem::take(&mut self.keys);
        self.index.clear();
        self.named.clear();
        self.last = None;
        for (builder, parts) in [
            (&mut self.rows, std::mem::take(&mut self.parts)),
            (&mut self.errors, std::mem::take(&mut self.error_parts)),
        ] {
            if builder.is_empty() {
                continue;
            }
            let batch = builder.finish()?;
            if batch.num_rows() != parts.len() {
                return Err(FlushError::Name(format!(
                    "{} rows but {} partitions",
                    batch.num_rows(),
                    parts.len()
                )));
            }
            // rows of each partition, in buffer order (a counting sort)
            let mut counts = vec![0u32; keys.len() + 1];
            for &p in &parts {
                counts[p as usize + 1] += 1;
            }
            for i in 1..counts.len() {
                counts[i] += counts[i - 1];
            }
            let starts = counts.clone();
            let mut order = vec![0u32; parts.len()];
            for (row, &p) in parts.iter().enumerate() {
                order[counts[p as usize] as usize] = row as u32;
                counts[p as usize] += 1;
            }
            for (p, key) in keys.iter().enumerate() {
                let (a, b) = (starts[p] as usize, starts[p + 1] as usize);
                if a == b {
                    continue;
                }
                let idx = UInt32Array::from(order[a..b].to_vec());
                out.push((
                    key.clone(),
                    arrow::compute::take_record_batch(&batch, &idx)?,
                ));
            }
        }
        Ok(out)
    }
}

/// Files written at once: most history files are small, and each waits for its fsync (local)
/// or its PUT (S3) longer than it takes to encode.
const WRITES_IN_FLIGHT: usize = 6;

/// Rows of one partition per file at most (Arrow bytes), so that a file is encoded within a
/// bounded memory; a bigger partition is written as several files.
const STAGED_FILE_BYTES: u64 = 32 << 20;

/// Arrow bytes of staged rows read back at once by a commit's writes.
const STAGED_READ_BUDGET_MIB: u32 = 16;

/// Rows of several flushes on local disk, written as one file per partition when the batch
/// commits. Each spill is one Arrow IPC file holding a record batch per partition (the
/// quarantine's few rows stay in memory). The directory goes when the stage is dropped; one
/// left by a killed process is removed by the next run ([`Stage::remove_stale`]).
#[derive(Debug)]
pub struct Stage {
    dir: tempfile::TempDir,
    spills: Vec<std::path::PathBuf>,
    /// (partition, spill, batch index in it, Arrow bytes)
    index: Vec<(PartitionKey, usize, usize, u64)>,
    errors: Vec<(PartitionKey, RecordBatch)>,
    bytes: u64,
    rows: u64,
}

/// The prefix of stage directories: `atlake-stage-<pid>-<process start>-…`.
const STAGE_PREFIX: &str = "atlake-stage-";

/// The start time written in a stage's name when the process's start cannot be read.
const UNKNOWN_START: u64 = 0;

impl Stage {
    /// An empty stage in `spill_dir`.
    pub fn new(spill_dir: &std::path::Path) -> std::io::Result<Stage> {
        // the pid and its start time (as the lease records them): a stage is stale when that
        // process is gone, even if its pid was reused since
        let pid = std::process::id();
        // no `/proc` (not Linux): the name says "start unknown", and `remove_stale` then
        // removes the stage only once its pid is gone
        let start = crate::sink::lease::process_start(pid).unwrap_or(UNKNOWN_START);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{STAGE_PREFIX}{pid}-{start}-"))
            .tempdir_in(spill_dir)?;
        Ok(Stage {
            dir,
            spills: Vec::new(),
            index: Vec::new(),
            errors: Vec::new(),
            bytes: 0,
            rows: 0,
        })
    }

    /// Removes stage directories in `spill_dir` left by processes that are gone: no process
    /// has the pid, or it started at another time (its start is read from `/proc`, as the
    /// lease does; a stage whose start is unknown goes only when its pid is gone). Returns how
    /// many were removed.
    pub fn remove_stale(spill_dir: &std::path::Path) -> usize {
        let Ok(entries) = std::fs::read_dir(spill_dir) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(STAGE_PREFIX)) else {
                continue;
            };
            let mut parts = rest.split('-');
            let (Some(pid), Some(start)) = (
                parts.next().and_then(|p| p.parse::<u32>().ok()),
                parts.next().and_then(|p| p.parse::<u64>().ok()),
            ) else {
                continue;
            };
            let gone = match crate::sink::lease::process_start(pid) {
                None => true,
                Some(now) => start != UNKNOWN_START && now != start,
            };
            if !gone {
                continue;
            }
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => removed += 1,
                Err(err) => {
                    tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a stale backfill stage")
                }
            }
        }
        removed
    }

    /// Arrow bytes staged.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Rows staged (records and quarantined inputs).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty() && self.errors.is_empty()
    }

    /// Writes the rows of one flush (blocking file I/O).
    pub fn spill(&mut self, parts: Vec<(PartitionKey, RecordBatch)>) -> Result<(), FlushError> {
        let io = |e: std::io::Error| FlushError::Name(format!("staging rows: {e}"));
        self.rows += parts.iter().map(|(_, b)| b.num_rows() as u64).sum::<u64>();
        let (errors, rows): (Vec<_>, Vec<_>) = parts
            .into_iter()
            .partition(|(k, _)| k.name == PartitionName::Errors);
        self.errors.extend(errors);
        let Some(schema) = rows.first().map(|(_, b)| b.schema()) else {
            return Ok(());
        };
        let n = self.spills.len();
        let path = self.dir.path().join(format!("spill-{n}.arrow"));
        let file =
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path).map_err(io)?);
        let mut w = arrow::ipc::writer::FileWriter::try_new(file, &schema)?;
        for (i, (key, batch)) in rows.into_iter().enumerate() {
            let bytes = batch.get_array_memory_size() as u64;
            w.write(&batch)?;
            self.index.push((key, n, i, bytes));
            self.bytes += bytes;
        }
        w.finish()?;
        w.into_inner()?
            .into_inner()
            .map_err(|e| io(e.into_error()))?;
        self.spills.push(path);
        Ok(())
    }
}

/// The staged batches `(spill, index)` of one file, and their Arrow bytes.
type FileGroup = (Vec<(usize, usize)>, u64);

/// Writes the staged rows of batch `batch` as files: per partition, its rows of every spill
/// (several files when they exceed [`STAGED_FILE_BYTES`]), reading back at most
/// [`STAGED_READ_BUDGET_MIB`] at a time. Returns the files.
pub async fn write_staged(
    lake: &Lake,
    cfg: &WriterConfig,
    batch: Cursor,
    stage: Stage,
    attempts: u32,
) -> Result<Vec<LakeFile>, FlushError> {
    write_staged_in(lake, cfg, batch, stage, attempts, STAGED_FILE_BYTES).await
}

async fn write_staged_in(
    lake: &Lake,
    cfg: &WriterConfig,
    batch: Cursor,
    stage: Stage,
    attempts: u32,
    file_bytes: u64,
) -> Result<Vec<LakeFile>, FlushError> {
    use futures::StreamExt;
    // the directory (and its files) lives until every file is written
    let Stage {
        dir,
        spills,
        index,
        errors,
        ..
    } = stage;
    // partition → groups of (spill, index) of at most STAGED_FILE_BYTES
    let mut by_part: std::collections::BTreeMap<String, (PartitionKey, Vec<FileGroup>)> =
        std::collections::BTreeMap::new();
    for (key, spill, i, bytes) in &index {
        let groups = &mut by_part
            .entry(key.dir())
            .or_insert_with(|| (key.clone(), Vec::new()))
            .1;
        let full = groups
            .last()
            .is_none_or(|(g, b)| !g.is_empty() && b + bytes > file_bytes);
        if full {
            groups.push((Vec::new(), 0));
        }
        if let Some((g, b)) = groups.last_mut() {
            g.push((*spill, *i));
            *b += bytes;
        }
    }
    let budget = Arc::new(tokio::sync::Semaphore::new(STAGED_READ_BUDGET_MIB as usize));
    let spills = Arc::new(spills);
    type Job =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<LakeFile, FlushError>> + Send>>;
    let mut jobs: Vec<Job> = Vec::new();
    for (_, (key, groups)) in by_part {
        let parts = groups.len();
        for (part, (group, bytes)) in groups.into_iter().enumerate() {
            let (lake, cfg, key, spills, budget) = (
                lake.clone(),
                cfg.clone(),
                key.clone(),
                spills.clone(),
                budget.clone(),
            );
            jobs.push(Box::pin(async move {
                let mib = u32::try_from(bytes >> 20)
                    .unwrap_or(u32::MAX)
                    .clamp(1, STAGED_READ_BUDGET_MIB);
                let _permit = budget
                    .acquire_many(mib)
                    .await
                    .map_err(|e| FlushError::Name(format!("the read budget closed: {e}")))?;
                let chunks = tokio::task::spawn_blocking(move || read_staged(&spills, &group))
                    .await
                    .map_err(|e| FlushError::Name(format!("reading staged rows: {e}")))??;
                let part = (parts > 1).then_some(part);
                write_one(&lake, &cfg, batch, key, chunks, part, attempts).await
            }));
        }
    }
    // the quarantine's rows of every spill: one file per partition, as for records
    let mut error_parts: std::collections::BTreeMap<String, (PartitionKey, Vec<RecordBatch>)> =
        std::collections::BTreeMap::new();
    for (key, rows) in errors {
        error_parts
            .entry(key.dir())
            .or_insert_with(|| (key, Vec::new()))
            .1
            .push(rows);
    }
    for (_, (key, chunks)) in error_parts {
        let (lake, cfg) = (lake.clone(), cfg.clone());
        jobs.push(Box::pin(async move {
            write_one(&lake, &cfg, batch, key, chunks, None, attempts).await
        }));
    }
    let results: Vec<Result<LakeFile, FlushError>> = futures::stream::iter(jobs)
        .buffer_unordered(WRITES_IN_FLIGHT)
        .collect()
        .await;
    drop(dir);
    results.into_iter().collect()
}

/// Reads record batches `(spill, index)` back from the stage's IPC files.
fn read_staged(
    spills: &[std::path::PathBuf],
    group: &[(usize, usize)],
) -> Result<Vec<RecordBatch>, FlushError> {
    let io = |e: std::io::Error| FlushError::Name(format!("reading staged rows: {e}"));
    let mut out = Vec::with_capacity(group.len());
    let mut open: Option<(
        usize,
        arrow::ipc::reader::FileReader<std::io::BufReader<std::fs::File>>,
    )> = None;
    for &(spill, i) in group {
        if open.as_ref().map(|(n, _)| *n) != Some(spill) {
            let path = spills
                .get(spill)
                .ok_or_else(|| FlushError::Name(format!("no staged spill {spill}")))?;
            let f = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
            open = Some((spill, arrow::ipc::reader::FileReader::try_new(f, None)?));
        }
        let Some((_, r)) = open.as_mut() else {
            return Err(FlushError::Name("a staged spill is not open".into()));
        };
        r.set_index(i)?;
        let b = r.next().ok_or_else(|| {
            FlushError::Name(format!("staged batch {i} of spill {spill} is missing"))
        })??;
        out.push(b);
    }
    Ok(out)
}

/// Writes one file per partition of batch `batch` ([`WRITES_IN_FLIGHT`] at a time), retrying
/// a failing store with backoff until `attempts` run out. Returns the files.
pub async fn write_files(
    lake: &Lake,
    cfg: &WriterConfig,
    batch: Cursor,
    parts: Vec<(PartitionKey, RecordBatch)>,
    attempts: u32,
) -> Result<Vec<LakeFile>, FlushError> {
    use futures::StreamExt;
    let jobs = parts.into_iter().map(|(key, rows)| {
        let lake = lake.clone();
        let cfg = cfg.clone();
        async move { write_one(&lake, &cfg, batch, key, vec![rows], None, attempts).await }
    });
    let results: Vec<Result<LakeFile, FlushError>> = futures::stream::iter(jobs)
        .buffer_unordered(WRITES_IN_FLIGHT)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn write_one(
    lake: &Lake,
    cfg: &WriterConfig,
    batch: Cursor,
    key: PartitionKey,
    rows: Vec<RecordBatch>,
    part: Option<usize>,
    attempts: u32,
) -> Result<LakeFile, FlushError> {
    let dir = key.dir();
    // several files of one partition in one batch (a big partition) differ by their hash
    let hash = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(dir.as_bytes());
        if let Some(p) = part {
            h.update(format!("/{p}").as_bytes());
        }
        let d = h.finalize();
        u32::from_be_bytes([d[0], d[1], d[2], d[3]])
    };
    let name =
        FileName::try_new(batch, batch, hash).map_err(|e| FlushError::Name(e.to_string()))?;
    let path = format!("{dir}/{}", name.render());
    let meta = FileMeta {
        source: SourceKind::Repo,
        first: batch.value(),
        last: batch.value(),
        partition: dir,
    };
    let kind = key.name.table_kind();
    let by_collection = key.name == PartitionName::Other;
    let n: u64 = rows.iter().map(|r| r.num_rows() as u64).sum();
    let mut backoff = crate::backoff::Backoff::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(10),
    );
    let mut tries = 0;
    loop {
        let (cfg2, meta2, chunk) = (cfg.clone(), meta.clone(), rows.clone());
        let produce = move |w: &mut (dyn std::io::Write + Send)| {
            encode_to(&cfg2, kind, &meta2, &chunk, by_collection, w)
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        match lake.put_with(&path, produce).await {
            Ok(size) => {
                return Ok(LakeFile {
                    key,
                    name,
                    path,
                    size,
                    rows: Some(n),
                });
            }
            // the lease's renewals are late: wait for one (or for the lease to be lost)
            Err(crate::sink::store::StoreError::Fenced(
                crate::sink::lease::FenceError::Expired,
            )) => {
                tracing::warn!(%path, "the writer lease is not valid now; the write waits for a renewal");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => {
                tries += 1;
                metrics::counter!("atlake_storage_errors_total", "kind" => "store").increment(1);
                let fenced = matches!(e, crate::sink::store::StoreError::Fenced(_));
                if tries >= attempts || fenced {
                    return Err(FlushError::Store {
                        path,
                        why: e.to_string(),
                    });
                }
                let d = backoff.next_delay();
                tracing::warn!(%path, error = %e, tries, ?d, "storing a backfill file failed; retrying");
                tokio::time::sleep(d).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};

    const T: i64 = 1_700_000_000_000_000;

    /// Rows are cut by (collection, month); long-tail collections past the cap share `_other`.
    #[test]
    fn rows_are_cut_by_partition() {
        let mut b = HistoryBuffer::default();
        for i in 0..10i64 {
            let coll = if i % 2 == 0 {
                "app.bsky.feed.post"
            } else {
                "app.bsky.feed.like"
            };
            push(
                &mut b,
                coll,
                i,
                T + (i % 3) * 40 * 24 * crate::sink::partition::HOUR_US,
            );
        }
        for i in 0..(MAX_NAMED_PARTITIONS + 5) {
            b.push_record(&RepoRecord {
                did: "did:plc:a",
                time_us: T,
                collection: &format!("com.example.c{i}"),
                rkey: "self",
                rev: None,
                cid: "bafy",
                record: "{}",
            })
            .unwrap();
        }
        assert!(b.bytes() > 0);
        let parts = b.take().unwrap();
        assert!(b.is_empty());
        let total: usize = parts.iter().map(|(_, r)| r.num_rows()).sum();
        assert_eq!(total, 10 + MAX_NAMED_PARTITIONS + 5);
        let other = parts
            .iter()
            .find(|(k, _)| k.name == PartitionName::Other)
            .unwrap();
        assert_eq!(other.1.num_rows(), 5);
        // every row sits in its partition's collection and hour
        for (k, r) in &parts {
            let t = r
                .column_by_name("time_us")
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>();
            let c = r.column_by_name("collection").unwrap().as_string::<i32>();
            let o = r.column_by_name("origin").unwrap().as_string::<i32>();
            assert_eq!(k.span(), crate::sink::partition::Span::Month);
            for i in 0..r.num_rows() {
                assert!((k.start_us()..k.end_us()).contains(&t.value(i)));
                if let PartitionName::Collection(n) = &k.name {
                    assert_eq!(c.value(i), n);
                }
                assert_eq!(o.value(i), "repo");
                assert!(r.column_by_name("seq").unwrap().is_null(i));
            }
        }
        // posts and likes in three months each: 6 partitions, plus 64 named and `_other`
        assert_eq!(parts.len(), 6 + MAX_NAMED_PARTITIONS + 1);
    }

    /// Buffers a record `k{i}` of `coll` made at `time_us`.
    fn push(b: &mut HistoryBuffer, coll: &str, i: i64, time_us: i64) {
        b.push_record(&RepoRecord {
            did: "did:plc:a",
            time_us,
            collection: coll,
            rkey: &format!("k{i}"),
            rev: Some("3l"),
            cid: "bafy",
            record: "{}",
        })
        .unwrap();
    }

    #[test]
    fn a_run_of_one_collection_changes_partition_at_each_month_edge() {
        let us = |d: &str| crate::syntax::parse_datetime_us(d).unwrap();
        // one collection, in order across month edges, then back, with another collection
        // between: each row must land in its own month
        let times = [
            us("2024-01-31T23:59:59.999999Z"),
            us("2024-02-01T00:00:00Z"),
            us("2024-02-29T23:59:59.999999Z"),
            us("2024-03-01T00:00:00Z"),
            us("2024-01-01T00:00:00Z"),
            us("2024-01-15T12:00:00Z"),
            us("2023-12-31T23:59:59.999999Z"),
        ];
        let mut b = HistoryBuffer::default();
        for (i, &t) in times.iter().enumerate() {
            for coll in ["app.bsky.feed.post", "app.bsky.feed.like"] {
                if coll.ends_with("like") && i % 3 != 0 {
                    continue;
                }
                push(&mut b, coll, i as i64, t);
            }
        }
        let parts = b.take().unwrap();
        let mut posts = std::collections::BTreeMap::new();
        for (k, r) in &parts {
            let t = r
                .column_by_name("time_us")
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>();
            for i in 0..r.num_rows() {
                assert!(
                    (k.start_us()..k.end_us()).contains(&t.value(i)),
                    "{} is not in {}",
                    t.value(i),
                    k.dir()
                );
            }
            if k.name == PartitionName::Collection("app.bsky.feed.post".into()) {
                posts.insert(k.start_us(), r.num_rows());
            }
        }
        // 2023-12: 1, 2024-01: 3, 2024-02: 2, 2024-03: 1
        assert_eq!(posts.values().copied().collect::<Vec<_>>(), [1, 3, 2, 1]);
    }

    fn fill(b: &mut HistoryBuffer, from: usize, n: usize) {
        for i in from..from + n {
            let coll = if i % 2 == 0 {
                "app.bsky.feed.post"
            } else {
                "app.bsky.feed.like"
            };
            b.push_record(&RepoRecord {
                did: "did:plc:a",
                time_us: T + (i as i64 % 2) * 40 * 24 * crate::sink::partition::HOUR_US,
                collection: coll,
                rkey: &format!("k{i:05}"),
                rev: Some("3l"),
                cid: "bafy",
                record: "{\"text\":\"a record of some length to stage\"}",
            })
            .unwrap();
        }
    }

    /// Rows of several flushes staged on disk become one file per partition at the commit
    /// (several when a partition exceeds the file size), every row once; the quarantine's rows
    /// too; the stage's directory goes after, and a stage left by a dead process is removed.
    #[tokio::test]
    async fn staged_flushes_become_one_file_per_partition() {
        let spill = tempfile::tempdir().unwrap();
        let lake_dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(lake_dir.path().to_str().unwrap()).unwrap();
        let mut stage = Stage::new(spill.path()).unwrap();
        let mut b = HistoryBuffer::default();
        let batch = Cursor::try_new(SourceKind::Repo, 7).unwrap();
        for round in 0..3 {
            fill(&mut b, round * 100, 100);
            let mut e = ErrorEvent::new(
                crate::model::ErrorReason::Mst,
                String::from("bad"),
                &b"x"[..],
            );
            e.did = Some("did:plc:a".into());
            b.push_error(&e, batch, T).unwrap();
            stage.spill(b.take().unwrap()).unwrap();
        }
        assert_eq!(stage.rows(), 303);
        assert!(stage.bytes() > 0);
        let dir = stage.dir.path().to_path_buf();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);
        let files = write_staged(&lake, &WriterConfig::default(), batch, stage, 3)
            .await
            .unwrap();
        // posts in one month, likes in another, and the quarantine's rows of three flushes
        assert_eq!(files.len(), 2 + 1, "{files:?}");
        let names: HashSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names.len(), files.len());
        let rows: u64 = files.iter().map(|f| f.rows.unwrap()).sum();
        assert_eq!(rows, 303);
        assert!(!dir.exists(), "the stage's directory is removed");
        // a small file size splits a partition into several files, with distinct names
        let mut stage = Stage::new(spill.path()).unwrap();
        for round in 0..4 {
            fill(&mut b, 1000 + round * 50, 50);
            stage.spill(b.take().unwrap()).unwrap();
        }
        let batch = Cursor::try_new(SourceKind::Repo, 8).unwrap();
        let files = write_staged_in(&lake, &WriterConfig::default(), batch, stage, 3, 1)
            .await
            .unwrap();
        assert_eq!(files.len(), 8, "{files:?}");
        let names: HashSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names.len(), 8);
        assert_eq!(files.iter().map(|f| f.rows.unwrap()).sum::<u64>(), 200);
        // a stage of a process that is gone (no such pid), or of an earlier process with this
        // pid (another start time), is removed; a live one is kept
        let dead = spill
            .path()
            .join(format!("{STAGE_PREFIX}{}-5-x", u32::MAX - 1));
        std::fs::create_dir(&dead).unwrap();
        let reused = spill
            .path()
            .join(format!("{STAGE_PREFIX}{}-1-x", std::process::id()));
        std::fs::create_dir(&reused).unwrap();
        let live = Stage::new(spill.path()).unwrap();
        assert_eq!(Stage::remove_stale(spill.path()), 2);
        assert!(!dead.exists() && !reused.exists());
        assert!(live.dir.path().exists());
    }
}
