//! Reading the lake's Parquet files in batches, in bounded memory: a local file in place, an
//! object by ranges (the footer with one suffix read, then one row group's projected column
//! chunks at a time, nearby ranges coalesced), never a whole object. Compaction, the purge and
//! export read through this.

use super::partition::LakeFile;
use super::store::Lake;
use arrow::array::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::async_reader::{
    AsyncFileReader, ParquetRecordBatchStream, ParquetRecordBatchStreamBuilder,
};
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use std::path::PathBuf;
use std::sync::Arc;

/// A lake file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {path}: {message}")]
pub struct ReadError {
    /// Which file (lake-relative).
    pub path: String,
    /// Why.
    pub message: String,
}

fn read_error(path: &str, e: &dyn std::fmt::Display) -> ReadError {
    ReadError {
        path: path.to_string(),
        message: e.to_string(),
    }
}

/// Where a data file is read from: a local path, or an object store read by ranges (the
/// footer, then one row group's projected column chunks at a time), so that memory is one
/// row group per open file whatever the file's size, never the whole object.
///
/// A remote file is read by tasks on the runtime that made the `Origin`, and waited for:
/// call [`Origin::open`] and [`Origin::metadata`] from a blocking thread (`spawn_blocking`),
/// never from a task. A runtime that stops under a read makes it an error, not a panic.
#[derive(Clone)]
pub(crate) enum Origin {
    Path(PathBuf),
    Remote(Arc<Remote>),
}

/// A file in an object store.
pub(crate) struct Remote {
    store: Arc<dyn object_store::ObjectStore>,
    location: object_store::path::Path,
    /// Its size, from the log: no request is spent to learn it.
    size: u64,
    rt: tokio::runtime::Handle,
    /// Its footer, once read.
    meta: std::sync::OnceLock<ArrowReaderMetadata>,
}

impl Remote {
    fn reader(&self) -> RemoteReader {
        RemoteReader {
            store: self.store.clone(),
            location: self.location.clone(),
            size: self.size,
        }
    }
}

/// Ranged reads of one object, for Parquet's async reader.
pub(crate) struct RemoteReader {
    store: Arc<dyn object_store::ObjectStore>,
    location: object_store::path::Path,
    size: u64,
}

fn store_error(e: object_store::Error) -> parquet::errors::ParquetError {
    parquet::errors::ParquetError::External(Box::new(e))
}

impl AsyncFileReader for RemoteReader {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> futures::future::BoxFuture<'_, parquet::errors::Result<Bytes>> {
        use futures::FutureExt;
        async move {
            use object_store::ObjectStoreExt;
            self.store
                .get_range(&self.location, range)
                .await
                .map_err(store_error)
        }
        .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> futures::future::BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        use futures::FutureExt;
        // the store coalesces nearby ranges into fewer requests
        async move {
            self.store
                .get_ranges(&self.location, &ranges)
                .await
                .map_err(store_error)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> futures::future::BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        use futures::FutureExt;
        async move {
            let size = self.size;
            // one request for the footer and the metadata behind it, in the usual case
            let md = ParquetMetaDataReader::new()
                .with_arrow_reader_options(options)
                .with_prefetch_hint(Some(FOOTER_PREFETCH))
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(md))
        }
        .boxed()
    }
}

/// Bytes read from a remote file's end to get its metadata in one request.
const FOOTER_PREFETCH: usize = 64 * 1024;

/// A file's record batches, from either origin.
pub(crate) enum Batches {
    Local(ParquetRecordBatchReader),
    /// Read by a task on the runtime, a batch ahead; `Ok(None)` marks the end, so a channel
    /// that closes without it (the runtime stopped under the read) is an error, never a file
    /// that looks shorter than it is.
    Remote {
        rx: tokio::sync::mpsc::Receiver<Result<Option<RecordBatch>, parquet::errors::ParquetError>>,
        done: bool,
    },
}

/// Why a remote read ended without its end.
fn read_cut_off() -> parquet::errors::ParquetError {
    parquet::errors::ParquetError::General("the read was cut off (the runtime is stopping)".into())
}

impl Batches {
    /// Reads `stream` on the runtime `rt`, a batch ahead of the caller.
    fn remote(
        stream: ParquetRecordBatchStream<RemoteReader>,
        rt: &tokio::runtime::Handle,
    ) -> Batches {
        use futures::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        rt.spawn(async move {
            let mut stream = stream;
            while let Some(b) = stream.next().await {
                let failed = b.is_err();
                // a reader that stopped reading ends the task
                if tx.send(b.map(Some)).await.is_err() || failed {
                    return;
                }
            }
            // the end marker; a failed send means the reader was dropped, and nobody is left
            // to tell
            if tx.send(Ok(None)).await.is_err() {
                tracing::debug!("a remote read ended after its reader stopped reading");
            }
        });
        Batches::Remote { rx, done: false }
    }
}

impl Iterator for Batches {
    type Item = Result<RecordBatch, parquet::errors::ParquetError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Batches::Local(r) => r.next().map(|b| b.map_err(Into::into)),
            Batches::Remote { done: true, .. } => None,
            Batches::Remote { rx, done } => match rx.blocking_recv() {
                Some(Ok(Some(b))) => Some(Ok(b)),
                Some(Ok(None)) => {
                    *done = true;
                    None
                }
                Some(Err(e)) => {
                    *done = true;
                    Some(Err(e))
                }
                None => {
                    *done = true;
                    Some(Err(read_cut_off()))
                }
            },
        }
    }
}

impl Origin {
    /// Where `f` is read from (for an object store, on the current runtime).
    pub(crate) fn of(lake: &Lake, f: &LakeFile) -> Origin {
        match lake.local_root() {
            Some(root) => Origin::Path(root.join(&f.path)),
            None => Origin::Remote(Arc::new(Remote {
                store: lake.object_store(),
                location: lake.object_path(&f.path),
                size: f.size,
                rt: tokio::runtime::Handle::current(),
                meta: std::sync::OnceLock::new(),
            })),
        }
    }

    /// The file's footer, read once.
    pub(crate) fn metadata(&self, path: &str) -> Result<ArrowReaderMetadata, ReadError> {
        let err = |e: &dyn std::fmt::Display| read_error(path, e);
        match self {
            Origin::Path(p) => {
                let f = std::fs::File::open(p).map_err(|e| err(&e))?;
                ArrowReaderMetadata::load(&f, ArrowReaderOptions::new()).map_err(|e| err(&e))
            }
            Origin::Remote(r) => {
                if let Some(m) = r.meta.get() {
                    return Ok(m.clone());
                }
                let mut reader = r.reader();
                // on the runtime (which drives the store's I/O and timers), waited for here
                let (tx, rx) = tokio::sync::oneshot::channel();
                r.rt.spawn(async move {
                    let m = ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new())
                        .await;
                    // a failed send means the waiting thread is gone: nobody is left to tell
                    if tx.send(m).is_err() {
                        tracing::debug!("a footer read ended after its reader gave up");
                    }
                });
                let m = rx
                    .blocking_recv()
                    .map_err(|_| err(&read_cut_off()))?
                    .map_err(|e| err(&e))?;
                Ok(r.meta.get_or_init(|| m).clone())
            }
        }
    }

    /// Reads the file's `columns` (all when `None`) in batches of `batch_rows`.
    pub(crate) fn open(
        &self,
        path: &str,
        columns: Option<&[&str]>,
        batch_rows: usize,
    ) -> Result<Batches, ReadError> {
        let err = |e: &dyn std::fmt::Display| read_error(path, e);
        let meta = self.metadata(path)?;
        let mask = columns.map(|cols| {
            let schema = meta.parquet_schema();
            let idx: Vec<usize> = (0..schema.num_columns())
                .filter(|&i| cols.contains(&schema.column(i).path().parts()[0].as_str()))
                .collect();
            ProjectionMask::leaves(schema, idx)
        });
        let rows = batch_rows.max(1);
        Ok(match self {
            Origin::Path(p) => {
                let f = std::fs::File::open(p).map_err(|e| err(&e))?;
                let mut b = ParquetRecordBatchReaderBuilder::new_with_metadata(f, meta);
                if let Some(m) = mask {
                    b = b.with_projection(m);
                }
                Batches::Local(b.with_batch_size(rows).build().map_err(|e| err(&e))?)
            }
            Origin::Remote(r) => {
                let mut b = ParquetRecordBatchStreamBuilder::new_with_metadata(r.reader(), meta);
                if let Some(m) = mask {
                    b = b.with_projection(m);
                }
                Batches::remote(b.with_batch_size(rows).build().map_err(|e| err(&e))?, &r.rt)
            }
        })
    }
}
