//! `atlake export`: a slice of the lake as files another tool can take away.
//!
//! Events (the default) and the backfilled history are read from the committed snapshot, one
//! file at a time and one batch at a time (memory: a batch, and the deletion facts within
//! `privacy.facts_memory`), filtered by
//! collection and time, and written to `DEST` in the lake's own layout
//! (`events/collection_partition=…/date=…/hour=…/`, `history/collection=…/month=…/`), one
//! output file per input file, as Parquet, NDJSON or CSV. Whatever the format, a record
//! deleted before the export is not in it: the same facts as the purge
//! ([`crate::checkpoint::facts`]) are applied to every row (a deleted record's content is
//! null, a deleted account's rows are left out), whether or not the lake was purged yet.
//! `--current` exports `current.records` (only records that still exist) through the SQL
//! engine, in files of at most a million rows.

use crate::checkpoint::CheckpointError;
use crate::checkpoint::compact;
use crate::checkpoint::facts::{self, Budget, Facts};
use crate::model::rows::{TableKind, schema};
use crate::sink::partition::{LakeFile, PartitionName};
use crate::sink::store::Lake;
use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{Int64Type, SchemaRef};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Parquet (zstd).
    Parquet,
    /// JSON lines.
    Ndjson,
    /// CSV with a header.
    Csv,
}

impl Format {
    fn ext(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Ndjson => "ndjson",
            Format::Csv => "csv",
        }
    }
}

/// What to export.
#[derive(Debug, Clone)]
pub struct Slice {
    /// Only these collections (empty: all, identity and account events included).
    pub collections: Vec<String>,
    /// Rows at or after this time (µs).
    pub since_us: Option<i64>,
    /// Rows before this time (µs).
    pub until_us: Option<i64>,
    /// Only records that still exist (`current.records`).
    pub current: bool,
    /// With `current`: rows per output file.
    pub rows_per_file: u64,
    /// Output format.
    pub format: Format,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the lake.
    #[error(transparent)]
    Lake(#[from] CheckpointError),
    /// Writing the destination.
    #[error(transparent)]
    Store(#[from] crate::sink::store::StoreError),
    /// The SQL engine (`--current`).
    #[error(transparent)]
    Query(#[from] crate::query::QueryError),
    /// A slice that cannot be exported.
    #[error("{0}")]
    Slice(&'static str),
    /// Encoding the output.
    #[error("encoding {path}: {message}")]
    Encode {
        /// which file
        path: String,
        /// why
        message: String,
    },
}

/// Progress, for a progress line.
#[derive(Debug, Default)]
pub struct Progress {
    /// Input files to read.
    pub files_total: AtomicU64,
    /// Input files read.
    pub files_done: AtomicU64,
    /// Rows written.
    pub rows: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
    /// Output files written.
    pub outputs: AtomicU64,
}

/// Whether a file's partition can hold rows of `slice`.
fn wanted(f: &LakeFile, slice: &Slice) -> bool {
    let coll_ok = slice.collections.is_empty()
        || match &f.key.name {
            PartitionName::Collection(c) => slice.collections.iter().any(|x| x == c),
            PartitionName::Other => true,
            _ => false,
        };
    let time_ok = slice.since_us.is_none_or(|s| f.key.end_us() > s)
        && slice.until_us.is_none_or(|u| f.key.start_us() < u);
    coll_ok && time_ok
}

/// The rows of `b` inside `slice` (time and collection).
fn filter_rows(b: RecordBatch, slice: &Slice, path: &str) -> Result<RecordBatch, ExportError> {
    if slice.collections.is_empty() && slice.since_us.is_none() && slice.until_us.is_none() {
        return Ok(b);
    }
    let err = |m: String| ExportError::Encode {
        path: path.to_string(),
        message: m,
    };
    let t = b
        .column_by_name("time_us")
        .and_then(|a| a.as_primitive_opt::<Int64Type>())
        .ok_or_else(|| err("column `time_us` is missing".into()))?;
    let c = b
        .column_by_name("collection")
        .and_then(|a| a.as_string_opt::<i32>())
        .ok_or_else(|| err("column `collection` is missing".into()))?;
    let keep: BooleanArray = (0..b.num_rows())
        .map(|i| {
            let time = t.value(i);
            Some(
                slice.since_us.is_none_or(|s| time >= s)
                    && slice.until_us.is_none_or(|u| time < u)
                    && (slice.collections.is_empty()
                        || (c.is_valid(i) && slice.collections.iter().any(|x| x == c.value(i)))),
            )
        })
        .collect();
    arrow::compute::filter_record_batch(&b, &keep).map_err(|e| err(e.to_string()))
}

/// A writer of one output file.
enum Out<W: std::io::Write + Send> {
    Parquet(parquet::arrow::ArrowWriter<W>),
    Ndjson(arrow::json::LineDelimitedWriter<W>),
    Csv(arrow::csv::Writer<W>),
}

impl<W: std::io::Write + Send> Out<W> {
    fn new(format: Format, schema: SchemaRef, w: W) -> Result<Out<W>, String> {
        Ok(match format {
            Format::Parquet => {
                let props = parquet::file::properties::WriterProperties::builder()
                    .set_compression(parquet::basic::Compression::ZSTD(
                        parquet::basic::ZstdLevel::try_new(3).map_err(|e| e.to_string())?,
                    ))
                    .build();
                Out::Parquet(
                    parquet::arrow::ArrowWriter::try_new(w, schema, Some(props))
                        .map_err(|e| e.to_string())?,
                )
            }
            Format::Ndjson => Out::Ndjson(arrow::json::LineDelimitedWriter::new(w)),
            Format::Csv => Out::Csv(arrow::csv::WriterBuilder::new().with_header(true).build(w)),
        })
    }

    fn write(&mut self, b: &RecordBatch) -> Result<(), String> {
        match self {
            Out::Parquet(w) => w.write(b).map_err(|e| e.to_string()),
            Out::Ndjson(w) => w.write(b).map_err(|e| e.to_string()),
            Out::Csv(w) => w.write(b).map_err(|e| e.to_string()),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self {
            Out::Parquet(w) => w.close().map(|_| ()).map_err(|e| e.to_string()),
            Out::Ndjson(mut w) => w.finish().map_err(|e| e.to_string()),
            Out::Csv(_) => Ok(()),
        }
    }
}

/// Rows per output file of `--current`, by default.
pub const CURRENT_FILE_ROWS: u64 = 1_000_000;

/// Exports `slice` of `lake` to `dest`; returns the progress counters at the end.
pub async fn run(
    lake: &Lake,
    dest: &Lake,
    slice: &Slice,
    budget: &Budget,
    progress: Arc<Progress>,
) -> Result<(), ExportError> {
    if slice.current {
        return export_current(lake, dest, slice, progress).await;
    }
    use crate::checkpoint::delta::Table;
    let (files, _) = crate::checkpoint::lake_state(lake).await?;
    // the live events and the backfilled history: one slice covers both, as one query does
    let files: Vec<LakeFile> = files
        .into_iter()
        .filter(|f| {
            matches!(Table::of(f), Some(Table::Events | Table::History)) && wanted(f, slice)
        })
        .collect();
    // every deletion the lake knows, applied whatever the lake's purge has done so far
    let facts = Arc::new(facts::load_facts(lake, &all_event_files(lake).await?, budget).await?);
    progress
        .files_total
        .store(files.len() as u64, Ordering::Relaxed);
    let target = schema(TableKind::Events(None));
    for f in &files {
        // read by row groups (a local file in place, an object by ranges), never whole
        let origin = crate::sink::read::Origin::of(lake, f);
        let (path, facts2, slice2, target2) =
            (f.path.clone(), facts.clone(), slice.clone(), target.clone());
        let name = f.key.name.clone();
        let stem = f.path.trim_end_matches(".parquet");
        let out_path = format!("{stem}.{}", slice.format.ext());
        let rows = Arc::new(AtomicU64::new(0));
        let rows2 = rows.clone();
        // streamed into the destination (a local one never holds the file in memory)
        let n = dest
            .put_with(&out_path, move |w| {
                let r = export_file(&origin, &path, &name, &facts2, &slice2, &target2, w)
                    .map_err(std::io::Error::other)?;
                rows2.store(r, Ordering::Relaxed);
                Ok(())
            })
            .await?;
        progress.files_done.fetch_add(1, Ordering::Relaxed);
        let rows = rows.load(Ordering::Relaxed);
        if rows == 0 {
            // nothing of the slice was in it
            dest.delete(&out_path).await?;
            continue;
        }
        progress.rows.fetch_add(rows, Ordering::Relaxed);
        progress.bytes.fetch_add(n, Ordering::Relaxed);
        progress.outputs.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

async fn all_event_files(lake: &Lake) -> Result<Vec<LakeFile>, ExportError> {
    let (files, _) = crate::checkpoint::lake_state(lake).await?;
    Ok(files
        .into_iter()
        .filter(|f| {
            crate::checkpoint::delta::Table::of(f) == Some(crate::checkpoint::delta::Table::Events)
        })
        .collect())
}

/// One input file, filtered and purged, encoded into `w`: the rows written.
fn export_file(
    origin: &crate::sink::read::Origin,
    path: &str,
    name: &PartitionName,
    facts: &Facts,
    slice: &Slice,
    target: &SchemaRef,
    w: &mut (dyn std::io::Write + Send),
) -> Result<u64, ExportError> {
    let err = |m: String| ExportError::Encode {
        path: path.to_string(),
        message: m,
    };
    let reader = origin
        .open(path, None, 8192)
        .map_err(CheckpointError::from)?;
    let mut out = Out::new(slice.format, target.clone(), w).map_err(err)?;
    let mut rows = 0u64;
    for b in reader {
        let b = b.map_err(|e| err(e.to_string()))?;
        let b = compact::adapt(b, target, path)?;
        let b = facts::purge_batch(b, facts, name, path)?;
        let b = filter_rows(b, slice, path)?;
        if b.num_rows() == 0 {
            continue;
        }
        rows += b.num_rows() as u64;
        out.write(&b).map_err(err)?;
    }
    out.finish().map_err(err)?;
    Ok(rows)
}

/// `--current`: `current.records` through the SQL engine, streamed into files of at most
/// [`Slice::rows_per_file`] rows, each encoded as its batches come.
async fn export_current(
    lake: &Lake,
    dest: &Lake,
    slice: &Slice,
    progress: Arc<Progress>,
) -> Result<(), ExportError> {
    if slice.rows_per_file == 0 {
        return Err(ExportError::Slice("rows per file must be at least 1"));
    }
    let engine = crate::query::QueryEngine::try_new(
        lake.clone(),
        None,
        crate::query::Limits {
            // an export is as long as the lake is big
            timeout: std::time::Duration::from_secs(30 * 24 * 3600),
            ..Default::default()
        },
    )?;
    let mut wheres = Vec::new();
    if !slice.collections.is_empty() {
        // collections were checked as NSIDs: no quote can be in them
        let list: Vec<String> = slice.collections.iter().map(|c| format!("'{c}'")).collect();
        wheres.push(format!("collection IN ({})", list.join(", ")));
    }
    if let Some(s) = slice.since_us {
        wheres.push(format!("time >= to_timestamp_micros({s})"));
    }
    if let Some(u) = slice.until_us {
        wheres.push(format!("time < to_timestamp_micros({u})"));
    }
    let sql = format!(
        "SELECT * FROM current.records{}",
        if wheres.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", wheres.join(" AND "))
        }
    );
    let df = engine.sql(&sql).await?;
    let mut stream = engine.execute(df).await?;
    // the next batch with rows, if any
    async fn next_rows(
        stream: &mut datafusion::physical_plan::SendableRecordBatchStream,
    ) -> Result<Option<RecordBatch>, ExportError> {
        while let Some(b) = stream.next().await {
            let b = b.map_err(crate::query::QueryError::from_datafusion)?;
            if b.num_rows() > 0 {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }
    let mut part = 0u64;
    let mut first = next_rows(&mut stream).await?;
    // one output file at a time, streamed: batches go to the encoder as the query makes them
    // (a local file written in place, an object uploaded in parts), never a whole file in
    // memory
    while let Some(b) = first.take() {
        let path = format!("current/records/part-{part:05}.{}", slice.format.ext());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<RecordBatch, String>>(2);
        let (format, schema) = (slice.format, b.schema());
        let at = path.clone();
        let write = dest.put_with(&path, move |w| {
            let io = |m: String| std::io::Error::other(format!("{at}: {m}"));
            let mut out = Out::new(format, schema, w).map_err(io)?;
            while let Some(b) = rx.blocking_recv() {
                // an error of the query fails the file: nothing is left at its path
                out.write(&b.map_err(io)?).map_err(io)?;
            }
            out.finish().map_err(io)
        });
        let (stream, progress) = (&mut stream, &progress);
        // owns the sender: the encoder sees the end of its file when the feed returns
        let feed = async move {
            let (limit, mut b, mut rows) = (slice.rows_per_file, b, 0u64);
            loop {
                // the file takes what fits; the rest of the batch starts the next one
                let mut rest = None;
                if b.num_rows() as u64 > limit - rows {
                    // fewer rows than the batch has: fits a usize
                    let room = (limit - rows) as usize;
                    rest = Some(b.slice(room, b.num_rows() - room));
                    b = b.slice(0, room);
                }
                rows += b.num_rows() as u64;
                progress
                    .rows
                    .fetch_add(b.num_rows() as u64, Ordering::Relaxed);
                if tx.send(Ok(b)).await.is_err() {
                    // the encoder stopped: its error is the write's
                    return Ok(None);
                }
                if rest.is_some() {
                    return Ok(rest);
                }
                let next = match next_rows(stream).await {
                    Ok(n) => n,
                    Err(e) => {
                        // a closed channel means the encoder already failed; the error is the
                        // query's either way
                        let _closed = tx.send(Err(e.to_string())).await;
                        return Err(e);
                    }
                };
                match next {
                    Some(n) if rows < limit => b = n,
                    // the file is full (the batch starts the next one) or the query ended
                    next => return Ok(next),
                }
            }
        };
        let (written, fed) = tokio::join!(write, feed);
        let (bytes, next) = (written?, fed?);
        progress.bytes.fetch_add(bytes, Ordering::Relaxed);
        progress.outputs.fetch_add(1, Ordering::Relaxed);
        part += 1;
        first = next;
    }
    Ok(())
}
