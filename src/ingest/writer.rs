//! The writer: flush jobs in, durable Parquet files out.
//!
//! Each job is sorted and encoded on a blocking thread, then stored atomically.
//! A failed store is retried with backoff until it succeeds or shutdown gives up; while it
//! retries, the bounded job channel fills and ingest slows down to match (backpressure reaches
//! the socket). A full disk is reported as such, and writing resumes when space returns. A write
//! refused because the writer lease lapsed is retried the same way (it resumes when a renewal
//! succeeds); one refused because the lease was lost is abandoned.

use crate::backoff::Backoff;
use crate::catalog::{Catalog, StorageHealth};
use crate::config::WriterConfig;
use crate::model::{Cursor, SourceKind};
use crate::sink::batcher::FlushJob;
use crate::sink::lease::FenceError;
use crate::sink::parquet::{FileMeta, encode_to};
use crate::sink::partition::{FileName, LakeFile};
use crate::sink::store::{Lake, StoreError};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
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

/// What the writer needs, passed once at start-up.
#[derive(Debug, Clone)]
pub struct WriterContext {
    /// The lake (fenced by the writer lease).
    pub lake: Lake,
    /// Parquet settings.
    pub cfg: WriterConfig,
    /// Which source the rows came from.
    pub source: SourceKind,
    /// Where committed files are published.
    pub catalog: Arc<Catalog>,
    /// Storage health, for `/health`.
    pub health: Arc<StorageHealth>,
    /// Set at the shutdown deadline: give up on flushes that cannot be stored.
    pub abandon: watch::Receiver<bool>,
}

/// Runs the writer until the job channel closes.
pub async fn run(
    ctx: WriterContext,
    mut jobs: mpsc::Receiver<FlushJob>,
    done: mpsc::UnboundedSender<Completion>,
) {
    // one encoder by default: with the decode loop on its own thread, that keeps two cores
    // busy, and every extra encoder holds its page buffers and row group in memory
    let concurrency = ctx.cfg.encoders.max(1);
    let stream = futures::stream::poll_fn(move |cx| jobs.poll_recv(cx));
    stream
        .map(|job| write_job(ctx.clone(), job))
        .buffer_unordered(concurrency)
        .for_each(|c| {
            // the job's rows and its encoded file were dropped with its future
            crate::memory::freed();
            let _ = done.send(c);
            futures::future::ready(())
        })
        .await;
}

/// Counts the records that do not fit their lexicon's types (they land anyway, typed columns
/// null), and returns how many there were.
async fn count_invalid(job: &FlushJob) -> u64 {
    let crate::model::rows::TableKind::Events(Some(lex)) = job.kind else {
        return 0;
    };
    let chunks = job.chunks.clone();
    let counted = tokio::task::spawn_blocking(move || {
        chunks
            .iter()
            .map(|c| crate::model::rows::count_invalid_records(lex, c))
            .sum::<u64>()
    })
    .await;
    match counted {
        Ok(0) => 0,
        Ok(n) => {
            metrics::counter!("atlake_invalid_records_total", "collection" => lex.nsid())
                .increment(n);
            n
        }
        Err(e) => {
            metrics::counter!("atlake_broken_invariants_total").increment(1);
            tracing::error!(error = %e, partition = %job.key, "counting invalid records failed");
            0
        }
    }
}

/// The file name of a job: its source and cursor range (0-0 for rows that had no cursor).
fn file_name(source: SourceKind, job: &FlushJob) -> Result<FileName, String> {
    let zero = Cursor::try_new(source, 0).map_err(|e| e.to_string())?;
    let hash = (job.key_hash ^ (job.key_hash >> 32)) as u32;
    FileName::try_new(
        job.first_cursor.unwrap_or(zero),
        job.last_cursor.unwrap_or(zero),
        hash,
    )
    .map_err(|e| e.to_string())
}

/// Encodes a job's rows into Parquet, writing straight into `w`. Errors keep their I/O kind
/// (a full disk stays a full disk).
fn encoder(
    cfg: &WriterConfig,
    job: &FlushJob,
    meta: &FileMeta,
) -> impl FnOnce(&mut (dyn std::io::Write + Send)) -> std::io::Result<()> + Send + 'static {
    let (cfg, meta, chunks, kind) = (cfg.clone(), meta.clone(), job.chunks.clone(), job.kind);
    let by_collection = job.key.name == crate::sink::partition::PartitionName::Other;
    move |w: &mut (dyn std::io::Write + Send)| {
        encode_to(&cfg, kind, &meta, &chunks, by_collection, w).map_err(|e| match e {
            crate::sink::parquet::EncodeError::Parquet(
                parquet::errors::ParquetError::External(inner),
            ) => match inner.downcast::<std::io::Error>() {
                Ok(io) => *io,
                Err(other) => std::io::Error::other(other.to_string()),
            },
            other => std::io::Error::other(other.to_string()),
        })
    }
}

/// Why a file was not stored.
enum NotStored {
    /// The writer lease was lost: this process may not write any more.
    LeaseLost,
    /// Shutdown gave up on it.
    Abandoned,
}

/// Stores the file, retrying with backoff until it succeeds, the lease is lost, or shutdown
/// gives up. Storage health follows: failing while it retries, writable again after.
async fn store(
    ctx: &WriterContext,
    job: &FlushJob,
    path: &str,
    meta: &FileMeta,
) -> Result<u64, NotStored> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut attempts = 0u32;
    loop {
        let e = match ctx.lake.put_with(path, encoder(&ctx.cfg, job, meta)).await {
            Ok(n) => {
                if ctx.health.failing.swap(false, Ordering::Relaxed) {
                    ctx.health.no_space.store(false, Ordering::Relaxed);
                    tracing::info!("storage is writable again; ingest resumes");
                }
                return Ok(n);
            }
            Err(e) => e,
        };
        attempts += 1;
        let no_space = e.is_no_space();
        ctx.health.failing.store(true, Ordering::Relaxed);
        ctx.health.no_space.store(no_space, Ordering::Relaxed);
        let kind = if no_space { "no_space" } else { "store" };
        metrics::counter!("atlake_storage_errors_total", "kind" => kind).increment(1);
        let delay = backoff.next_delay();
        if no_space {
            tracing::error!(%path, attempts, "disk full: cannot write the lake; ingest is paused until space is freed");
        } else {
            tracing::warn!(%path, error = %e, attempts, ?delay, "storing a file failed; retrying");
        }
        if let StoreError::Fenced(FenceError::Lost(_)) = e {
            return Err(NotStored::LeaseLost);
        }
        if *ctx.abandon.borrow() {
            return Err(NotStored::Abandoned);
        }
        let mut ab = ctx.abandon.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = ab.wait_for(|a| *a) => {}
        }
    }
}

async fn write_job(ctx: WriterContext, job: FlushJob) -> Completion {
    let started = Instant::now();
    let abandoned = |why: &str| {
        tracing::error!(partition = %job.key, why, "giving up on a flush; its events will be replayed from the checkpoint");
        Completion {
            job_id: job.id,
            file: None,
            rows: job.rows,
        }
    };
    let name = match file_name(ctx.source, &job) {
        Ok(n) => n,
        Err(e) => {
            metrics::counter!("atlake_broken_invariants_total").increment(1);
            return abandoned(&e);
        }
    };
    let path = format!("{}/{}", job.key.dir(), name.render());
    let meta = FileMeta {
        source: ctx.source,
        first: name.first().value(),
        last: name.last().value(),
        partition: job.key.dir(),
    };
    count_invalid(&job).await;
    let size = match store(&ctx, &job, &path, &meta).await {
        Ok(n) => n,
        Err(NotStored::LeaseLost) => return abandoned("the writer lease was lost"),
        Err(NotStored::Abandoned) => return abandoned("shutdown deadline"),
    };
    let file = LakeFile {
        key: job.key.clone(),
        name,
        path,
        size,
        rows: Some(job.rows as u64),
    };
    ctx.catalog.commit(job.id, file.clone());
    metrics::counter!("atlake_files_written_total", "table" => job.kind.label()).increment(1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::batcher::{Batcher, FlushPolicy};
    use crate::sink::lease::Fence;
    use tokio::time::Instant as TokioInstant;

    /// One flush job of a few events, as the batcher makes it.
    fn job() -> FlushJob {
        let mut t = crate::simulate::traffic::Traffic::new(Default::default());
        let mut b = Batcher::new(
            FlushPolicy::from_config(&Default::default()),
            SourceKind::Firehose,
        );
        let now = std::time::Instant::now();
        for _ in 0..20 {
            let m = t.next_message();
            for e in &m.events {
                b.push_event(e, e.cursor(), crate::model::key::event_key(e), now)
                    .unwrap();
            }
        }
        b.drain().unwrap().remove(0)
    }

    #[test]
    fn a_file_name_keeps_both_halves_of_the_content_hash() {
        let mut j = job();
        let mut hash = |h: u64| {
            j.key_hash = h;
            file_name(SourceKind::Firehose, &j).unwrap().hash
        };
        for (a, b) in [
            (1u64 << 32, 2u64 << 32),
            (1, 2),
            (0x3_0000_0001, 0x1_0000_0002),
        ] {
            assert_ne!(hash(a), hash(b), "{a:#x} and {b:#x}");
        }
    }

    #[tokio::test]
    async fn records_that_do_not_fit_their_lexicon_are_counted() {
        use crate::model::lexicon::Lexicon;
        use crate::model::rows::TableKind;
        let records: arrow::array::ArrayRef = Arc::new(arrow::array::StringArray::from(vec![
            Some(r#"{"text":"hello","createdAt":"2024-01-01T00:00:00Z"}"#),
            Some(r#"{"text":5}"#),
            Some("not json"),
            None,
        ]));
        let batch = arrow::record_batch::RecordBatch::try_from_iter([("record", records)]).unwrap();
        let mut j = job();
        j.chunks = vec![batch.clone(), batch];
        j.kind = TableKind::Events(Some(Lexicon::Post));
        assert_eq!(count_invalid(&j).await, 4);
        j.kind = TableKind::Events(None);
        assert_eq!(count_invalid(&j).await, 0);
    }

    fn ctx(fence: Fence) -> (WriterContext, watch::Sender<bool>) {
        let lake = Lake::open("memory://").unwrap().fenced(fence);
        let (abandon_tx, abandon) = watch::channel(false);
        let ctx = WriterContext {
            lake,
            cfg: WriterConfig::default(),
            source: SourceKind::Firehose,
            catalog: Arc::new(Catalog::default()),
            health: Arc::new(StorageHealth::default()),
            abandon,
        };
        (ctx, abandon_tx)
    }

    /// A write refused while the lease has lapsed is retried with backoff (storage reported
    /// failing) and lands once a renewal makes the lease valid again.
    #[tokio::test(start_paused = true)]
    async fn a_lapsed_lease_pauses_writes_until_it_is_renewed() {
        let fence = Fence::new(Some(TokioInstant::now()));
        let (ctx, _abandon) = ctx(fence.clone());
        let health = ctx.health.clone();
        let job = job();
        let rows = job.rows;
        let task = tokio::spawn(write_job(ctx.clone(), job));
        // a minute of retries, in virtual time: still waiting, reported as failing
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!task.is_finished());
        assert!(health.failing.load(Ordering::Relaxed));
        fence.extend(TokioInstant::now() + Duration::from_secs(3600));
        // the backoff is capped at 10 s: the next attempt comes within it
        let done = tokio::time::timeout(Duration::from_secs(11), task)
            .await
            .expect("written after the renewal")
            .unwrap();
        let file = done.file.expect("a file");
        assert_eq!(done.rows, rows);
        assert!(!health.failing.load(Ordering::Relaxed));
        assert!(ctx.lake.get(&file.path).await.unwrap().is_some());
    }

    /// A lost lease ends the write at once: no file, and no more retries.
    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_abandons_the_write() {
        let fence = Fence::new(Some(TokioInstant::now()));
        let (ctx, _abandon) = ctx(fence.clone());
        let task = tokio::spawn(write_job(ctx.clone(), job()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        fence.lose("taken over".into());
        let done = tokio::time::timeout(Duration::from_secs(11), task)
            .await
            .expect("ended")
            .unwrap();
        assert!(done.file.is_none());
        assert!(ctx.lake.list("events").await.unwrap().is_empty());
    }

    /// At the shutdown deadline a write that cannot be stored is given up.
    #[tokio::test(start_paused = true)]
    async fn the_shutdown_deadline_abandons_an_unstorable_write() {
        let fence = Fence::new(Some(TokioInstant::now()));
        let (ctx, abandon) = ctx(fence);
        let task = tokio::spawn(write_job(ctx, job()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!task.is_finished());
        abandon.send(true).unwrap();
        let done = tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("ended")
            .unwrap();
        assert!(done.file.is_none());
    }
}
