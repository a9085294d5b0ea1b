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
use crate::sink::parquet::{FileMeta, encode_to};
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
#[allow(clippy::too_many_arguments)] // the writer's whole context, passed once at start-up
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
    // one encoder by default: with the decode loop on its own thread, that keeps two cores
    // busy, and every extra encoder holds its page buffers and row group in memory
    let cfg_concurrency = cfg.encoders.max(1);
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
        .buffer_unordered(cfg_concurrency)
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
    let by_collection = job.key.name == crate::sink::partition::PartitionName::Other;
    // records that do not fit their lexicon's types land anyway (typed columns null); count them
    if let crate::model::rows::TableKind::Events(Some(lex)) = kind {
        let chunks = job.chunks.clone();
        let invalid = tokio::task::spawn_blocking(move || {
            chunks
                .iter()
                .map(|c| crate::model::rows::count_invalid_records(lex, c))
                .sum::<u64>()
        })
        .await
        .unwrap_or(0);
        if invalid > 0 {
            metrics::counter!("atlake_invalid_records_total", "collection" => lex.nsid())
                .increment(invalid);
        }
    }
    let mut delay = Duration::from_millis(200);
    let mut attempts = 0u32;
    let size = loop {
        let (cfg, meta, chunks) = (cfg.clone(), meta.clone(), job.chunks.clone());
        let produce = move |w: &mut (dyn std::io::Write + Send)| {
            encode_to(&cfg, kind, &meta, &chunks, by_collection, w).map_err(|e| match e {
                crate::sink::parquet::EncodeError::Parquet(
                    parquet::errors::ParquetError::External(inner),
                ) => match inner.downcast::<std::io::Error>() {
                    Ok(io) => *io,
                    Err(other) => std::io::Error::other(other.to_string()),
                },
                other => std::io::Error::other(other.to_string()),
            })
        };
        match lake.put_with(&path, produce).await {
            Ok(n) => break n,
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
    };
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
