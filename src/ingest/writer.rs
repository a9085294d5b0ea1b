//! The writer: flush jobs in, durable Parquet files out.
//!
//! Each job is sorted and encoded on a blocking thread (two at a time), then stored atomically.
//! A failed store is retried with backoff until it succeeds or shutdown gives up; while it
//! retries, the bounded job channel fills and ingest slows down to match (backpressure reaches
//! the socket). A full disk is reported as such, and writing resumes when space returns.

use super::live::LiveState;
use crate::config::WriterConfig;
use crate::model::SourceKind;
use crate::sink::batcher::FlushJob;
use crate::sink::parquet::{FileMeta, encode, sort_batch};
use crate::sink::partition::{FileName, LakeFile};
use crate::sink::store::Lake;
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// A finished flush.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The job.
    pub job_id: u64,
    /// The file written (`None` if the job was abandoned at shutdown).
    pub file: Option<LakeFile>,
    /// Rows.
    pub rows: usize,
}

/// Storage health, for `/health` and logs.
#[derive(Debug, Default)]
pub struct StorageHealth {
    /// The last store failed and is being retried.
    pub failing: AtomicBool,
    /// The last failure was a full disk.
    pub no_space: AtomicBool,
}

/// Runs the writer until the job channel closes.
pub async fn run(
    lake: Lake,
    cfg: WriterConfig,
    source: SourceKind,
    mut jobs: mpsc::Receiver<FlushJob>,
    done: mpsc::UnboundedSender<Completion>,
    live: Arc<LiveState>,
    health: Arc<StorageHealth>,
    abandon: watch::Receiver<bool>,
) {
    let stream = futures::stream::poll_fn(move |cx| jobs.poll_recv(cx));
    stream
        .map(|job| {
            let lake = lake.clone();
            let cfg = cfg.clone();
            let live = live.clone();
            let health = health.clone();
            let abandon = abandon.clone();
            async move { write_job(lake, cfg, source, job, live, health, abandon).await }
        })
        .buffer_unordered(2)
        .for_each(|c| {
            let _ = done.send(c);
            futures::future::ready(())
        })
        .await;
}

async fn write_job(
    lake: Lake,
    cfg: WriterConfig,
    source: SourceKind,
    job: FlushJob,
    live: Arc<LiveState>,
    health: Arc<StorageHealth>,
    abandon: watch::Receiver<bool>,
) -> Completion {
    let started = Instant::now();
    let name = FileName {
        source,
        first: job.first_cursor.unwrap_or(0),
        last: job.last_cursor.unwrap_or(0),
        hash: (job.key_hash ^ (job.key_hash >> 32)) as u32,
    };
    let path = format!("{}/{}", job.key.dir(), name.render());
    let meta = FileMeta {
        source,
        first: name.first,
        last: name.last,
        partition: job.key.dir(),
    };
    let kind = job.kind;
    let chunks = job.chunks.clone();
    let encoded = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let schema = crate::model::rows::schema(kind);
        let batch = arrow::compute::concat_batches(&schema, &chunks).map_err(|e| e.to_string())?;
        let sorted = sort_batch(kind, &batch).map_err(|e| e.to_string())?;
        encode(&cfg, kind, &meta, &sorted).map_err(|e| e.to_string())
    })
    .await;
    let bytes = match encoded {
        Ok(Ok(b)) => bytes::Bytes::from(b),
        other => {
            // encoding our own batches cannot fail short of a bug; keep the rows in memory
            // visible, report loudly, and give the job back as abandoned
            let e = match other {
                Ok(Err(e)) => e,
                Err(e) => e.to_string(),
                Ok(Ok(_)) => String::new(),
            };
            tracing::error!(partition = %job.key, error = %e, "encoding a flush failed; rows stay in memory until restart");
            metrics::counter!("atlake_flush_failures_total").increment(1);
            return Completion {
                job_id: job.id,
                file: None,
                rows: job.rows,
            };
        }
    };
    let size = bytes.len() as u64;
    let mut delay = Duration::from_millis(200);
    let mut attempts = 0u32;
    loop {
        match lake.put_atomic(&path, bytes.clone()).await {
            Ok(()) => break,
            Err(e) => {
                attempts += 1;
                let no_space = e.is_no_space();
                health.failing.store(true, Ordering::Relaxed);
                health.no_space.store(no_space, Ordering::Relaxed);
                let kind = if no_space { "no_space" } else { "store" };
                metrics::counter!("atlake_storage_errors_total", "kind" => kind).increment(1);
                if no_space {
                    tracing::error!(%path, attempts, "disk full: cannot write the lake; ingest is paused until space is freed");
                } else {
                    tracing::warn!(%path, error = %e, attempts, ?delay, "storing a file failed; retrying");
                }
                if *abandon.borrow() {
                    tracing::error!(%path, "giving up on a flush at shutdown; its events will be replayed from the checkpoint");
                    return Completion {
                        job_id: job.id,
                        file: None,
                        rows: job.rows,
                    };
                }
                let mut ab = abandon.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = ab.wait_for(|a| *a) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    if health.failing.swap(false, Ordering::Relaxed) {
        health.no_space.store(false, Ordering::Relaxed);
        tracing::info!("storage is writable again; ingest resumes");
    }
    let file = LakeFile {
        key: job.key.clone(),
        name,
        path,
        size,
        rows: Some(job.rows as u64),
    };
    live.commit(job.id, file.clone());
    let table = job.kind;
    metrics::counter!("atlake_files_written_total", "table" => format!("{table:?}")).increment(1);
    metrics::counter!("atlake_bytes_written_total").increment(size);
    metrics::counter!("atlake_flushes_total", "reason" => job.reason.as_str()).increment(1);
    metrics::histogram!("atlake_flush_seconds").record(started.elapsed().as_secs_f64());
    tracing::debug!(partition = %job.key, rows = job.rows, bytes = size, reason = job.reason.as_str(), "flushed");
    Completion {
        job_id: job.id,
        file: Some(file),
        rows: job.rows,
    }
}
