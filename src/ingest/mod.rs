//! The ingest pipeline: source → decode → filter and dedupe → batcher → writer → checkpoint.
//!
//! ```text
//!  source task ─(bounded)─▶ decoders ──(in order)──▶ loop (own thread) ──(bounded)──▶ writer
//!  firehose/jetstream/file  firehose: one per core;  check times, filter, dedupe,    encoders:
//!                           Jetstream: in the loop   batch by (collection, hour)     Parquet, store
//!                                                      ▲         │ seal chunks          │ durable
//!                                                      │         ▼                      ▼
//!                                                      │    Catalog (files + buffered + in-flight rows)
//!                                                      └──── completions ◀──────────────┘
//!                                                            → checkpoint written after the files
//! ```
//!
//! Before anything is written the pipeline takes the lake's writer lease
//! ([`crate::sink::lease`]); every write checks it, and the pipeline stops if it is lost.
//!
//! Every channel is bounded: a slow store fills the job channel, the loop waits, the decoders'
//! channels and then the raw channel fill, the source stops reading its socket
//! ([`decoding`] holds at most a few batches). Nothing is dropped. The checkpoint is
//! recomputed after every completed flush as the lowest cursor still buffered or in flight,
//! minus one (or the last cursor seen when nothing is pending), and written only then.

pub mod checkpointer;
pub mod compactor;
pub mod decoding;
pub mod dedupe;
mod pipeline;
pub mod writer;

use crate::catalog::{Catalog, StorageHealth};
use crate::checkpoint::{CheckpointError, Recovery, recover};
use crate::config::Config;
use crate::model::{Cursor, Filters, SourceKind};
use crate::sink::batcher::{Batcher, FlushJob, FlushPolicy};
use crate::sink::lease::{Lease, LeaseError, LeaseSettings};
use crate::sink::store::{Lake, StoreError};
use crate::source::capture::CaptureError;
use crate::source::file::{FileProgress, FileSource};
use crate::source::firehose::FirehoseSource;
use crate::source::jetstream::JetstreamSource;
use crate::source::{RawMessage, SourceError, WsSettings};
use dedupe::Dedupe;
use pipeline::LoopState;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use writer::Completion;

/// Why ingest failed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The lake could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Recovery or the checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The capture file could not be read.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The source gave up.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The lake's writer lease is held by another writer, or was lost.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The configured filters cannot be used.
    #[error(transparent)]
    Filters(#[from] crate::model::filter::FilterError),
    /// A part of the pipeline failed in a way that is a bug, not bad input.
    #[error("{0}")]
    Broken(String),
}

/// Live creates the cut-over with a backfill remembers (about 40 bytes each).
pub const CUTOVER_KEYS: usize = 4_000_000;

/// Where events come from.
#[derive(Debug, Clone)]
pub enum Input {
    /// The configured network source.
    Network,
    /// A capture file, read to its end.
    File(PathBuf),
}

/// What an ingest run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Messages received.
    pub messages: u64,
    /// Events written.
    pub events: u64,
    /// Inputs quarantined.
    pub quarantined: u64,
    /// Events dropped as duplicates.
    pub duplicates: u64,
    /// Events filtered out.
    pub filtered: u64,
    /// Files written.
    pub files: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// The final checkpoint cursor.
    pub checkpoint: Option<Cursor>,
    /// Everything was flushed and checkpointed before the end.
    pub clean: bool,
}

/// A running ingest.
#[derive(Debug)]
pub struct IngestHandle {
    /// Files, buffered rows and checkpoint, for the SQL endpoint.
    pub catalog: Arc<Catalog>,
    /// The lake.
    pub lake: Lake,
    /// Which kind of source.
    pub source: SourceKind,
    /// Storage health.
    pub health: Arc<StorageHealth>,
    /// File progress (file input).
    pub progress: Option<Arc<FileProgress>>,
    /// Commits for the committer, which owns the lake's logs while ingest runs (a daemon's
    /// backfill commits its batches through it); `None` when nothing but ingest commits.
    pub commits: Option<checkpointer::ToCommitter>,
    filters: watch::Sender<Filters>,
    shutdown: watch::Sender<bool>,
    abandon: watch::Sender<bool>,
    done: oneshot::Receiver<Result<Summary, IngestError>>,
}

fn ended_unexpectedly() -> IngestError {
    IngestError::Broken("the ingest thread ended without a result".into())
}

impl IngestHandle {
    /// Asks the pipeline to stop reading, flush everything and write the checkpoint.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// The filters' sender, for the HTTP endpoint.
    pub fn filters_sender(&self) -> watch::Sender<Filters> {
        self.filters.clone()
    }

    /// Waits for the end (file input end, shutdown, or a failure).
    pub async fn wait(self) -> Result<Summary, IngestError> {
        self.done
            .await
            .unwrap_or_else(|_| Err(ended_unexpectedly()))
    }

    /// Waits for the pipeline to end by itself (the end of a file, or a failure such as a lost
    /// lease), without asking it to stop. A network source never ends by itself.
    pub async fn finished(&mut self) -> Result<Summary, IngestError> {
        (&mut self.done)
            .await
            .unwrap_or_else(|_| Err(ended_unexpectedly()))
    }

    /// Shuts down and waits, abandoning unstorable flushes after `deadline`.
    pub async fn stop(self, deadline: Duration) -> Result<Summary, IngestError> {
        self.shutdown();
        let abandon = self.abandon.clone();
        let mut done = self.done;
        tokio::select! {
            r = &mut done => r.unwrap_or_else(|_| Err(ended_unexpectedly())),
            _ = tokio::time::sleep(deadline) => {
                tracing::error!(?deadline, "shutdown deadline passed; abandoning unfinished flushes (they will be replayed from the checkpoint)");
                let _ = abandon.send(true);
                done.await.unwrap_or_else(|_| Err(ended_unexpectedly()))
            }
        }
    }
}

/// Starts ingesting into the configured lake.
pub async fn start(cfg: Config, input: Input) -> Result<IngestHandle, IngestError> {
    let lake = Lake::open(&cfg.lake.url)?;
    start_with_lake(cfg, input, lake).await
}

/// The source kind and, for file input, the opened file.
fn open_input(
    cfg: &Config,
    input: &Input,
) -> Result<(Option<FileSource>, SourceKind), IngestError> {
    Ok(match input {
        Input::File(p) => {
            let (f, k) = FileSource::open(p)?;
            (Some(f), k)
        }
        Input::Network => (None, cfg.source.kind),
    })
}

/// The stream time a Jetstream reconnect replays at least (the instant it resumes at), µs.
const JETSTREAM_REPLAY_US: u64 = 1_000_000;

/// How far before the lake's cursor a network Jetstream source starts (µs): `time_us` is each
/// instance's own clock. Capture files and the firehose resume exactly.
fn rewind_us(cfg: &Config, kind: SourceKind, input: &Input) -> u64 {
    match (kind, input) {
        (SourceKind::Jetstream, Input::Network) => {
            u64::try_from(cfg.source.rewind.0.as_micros()).unwrap_or(u64::MAX)
        }
        _ => 0,
    }
}

/// Takes the writer lease, then recovers the lake's state under it.
async fn lease_and_recover(
    cfg: &Config,
    lake: &Lake,
    kind: SourceKind,
    rewind: u64,
) -> Result<(Lease, Lake, Recovery), IngestError> {
    let lease = Lease::acquire(
        lake,
        &LeaseSettings {
            command: "ingest".into(),
            ttl: cfg.lake.lease_ttl.0,
            wait: cfg.lake.lease_wait,
        },
    )
    .await?;
    let lake = lake.fenced(lease.fence());
    let started = Instant::now();
    let rec = match recover(&lake, kind, rewind).await {
        Ok(r) => r,
        Err(e) => {
            lease.release().await;
            return Err(e.into());
        }
    };
    tracing::info!(
        lake = lake.url(),
        source = kind.as_str(),
        resume = ?rec.resume_cursor.map(|c| c.value()),
        files = rec.files.len(),
        durable_keys = rec.durable_keys.len(),
        scanned = rec.files_scanned,
        converted = rec.converted,
        took = ?started.elapsed(),
        "recovered lake state"
    );
    Ok((lease, lake, rec))
}

/// The channels between the pipeline's tasks.
struct Wiring {
    filters: (watch::Sender<Filters>, watch::Receiver<Filters>),
    shutdown: (watch::Sender<bool>, watch::Receiver<bool>),
    abandon: (watch::Sender<bool>, watch::Receiver<bool>),
}

/// Spawns the source task: the capture file, or the configured network source.
fn spawn_source(
    cfg: &Config,
    kind: SourceKind,
    file: Option<FileSource>,
    resume: Option<Cursor>,
    rewind: u64,
    raw_tx: mpsc::Sender<RawMessage>,
    w: &Wiring,
) -> (
    tokio::task::JoinHandle<Result<(), IngestError>>,
    Option<Arc<FileProgress>>,
) {
    let sd = w.shutdown.1.clone();
    if let Some(mut f) = file {
        f.resume_after = resume;
        let p = Arc::new(FileProgress::default());
        let p2 = p.clone();
        let task =
            tokio::spawn(async move { f.run(raw_tx, p2, sd).await.map_err(IngestError::from) });
        return (task, Some(p));
    }
    let settings = WsSettings::from_config(&cfg.source);
    let task = match kind {
        SourceKind::Firehose => {
            let src = FirehoseSource {
                settings,
                cursor: resume,
            };
            tokio::spawn(async move { src.run(raw_tx, sd).await.map_err(IngestError::from) })
        }
        SourceKind::Jetstream => {
            let src = JetstreamSource {
                settings,
                cursor: resume,
                rewind_us: rewind,
                compress: cfg.source.compress,
            };
            let f = w.filters.1.clone();
            tokio::spawn(async move { src.run(raw_tx, f, sd).await.map_err(IngestError::from) })
        }
        SourceKind::Repo => tokio::spawn(async move {
            Err(IngestError::Broken(
                "a backfill is not a live source (use `atlake backfill`)".into(),
            ))
        }),
    };
    (task, None)
}

/// Starts ingesting into an already opened lake.
pub async fn start_with_lake(
    cfg: Config,
    input: Input,
    lake: Lake,
) -> Result<IngestHandle, IngestError> {
    let (file, kind) = open_input(&cfg, &input)?;
    if !kind.is_live() {
        return Err(IngestError::Broken(format!(
            "{kind} is not a live source (use `atlake backfill`)"
        )));
    }
    let rewind = rewind_us(&cfg, kind, &input);
    let filters = Filters::try_new(cfg.source.collections.clone(), cfg.source.dids.clone())?;
    let (lease, lake, mut rec) = lease_and_recover(&cfg, &lake, kind, rewind).await?;
    // what dead writers left goes beside the pipeline, not before it
    let sweep = crate::checkpoint::spawn_sweep(lake.clone(), rec.logs.clone());
    if rec.resume_cursor.is_none()
        && let (Input::Network, Some(c)) = (&input, cfg.source.start_cursor)
    {
        let c = Cursor::try_new(kind, c).map_err(|e| IngestError::Broken(e.to_string()))?;
        tracing::info!(cursor = %c, "no checkpoint: starting from the configured start_cursor");
        rec.resume_cursor = Some(c);
    }
    let catalog = Arc::new(Catalog::new(rec.files.clone(), rec.checkpoint.clone()));
    if cfg.backfill.enabled && matches!(input, Input::Network) {
        // before the source starts: every live create is seen by the cut-over
        catalog.enable_cutover(
            crate::catalog::Cutover::new(CUTOVER_KEYS)
                .with_refetch_delay(cfg.backfill.refetch_delay.0),
        );
    }
    let w = Wiring {
        filters: watch::channel(filters),
        shutdown: watch::channel(false),
        abandon: watch::channel(false),
    };
    let (raw_tx, raw_rx) = mpsc::channel::<RawMessage>(1024);
    let (jobs_tx, jobs_rx) = mpsc::channel::<FlushJob>(2);
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Completion>();
    let health = Arc::new(StorageHealth::default());
    let (source_task, progress) =
        spawn_source(&cfg, kind, file, rec.resume_cursor, rewind, raw_tx, &w);
    let writer_task = tokio::spawn(writer::run(
        writer::WriterContext {
            lake: lake.clone(),
            cfg: cfg.writer.clone(),
            source: kind,
            catalog: catalog.clone(),
            health: health.clone(),
            abandon: w.abandon.1.clone(),
        },
        jobs_rx,
        done_tx,
    ));
    let (cp_tx, cp_rx) = watch::channel(None);
    let (files_tx, files_rx) = mpsc::unbounded_channel();
    let backfills = cfg.backfill.enabled && matches!(input, Input::Network);
    let (commits, rewrites) = if cfg.compaction.enabled || cfg.privacy.purge_deleted || backfills {
        let (tx, rx) = mpsc::channel(1);
        let commits = checkpointer::ToCommitter(tx);
        if cfg.compaction.enabled || cfg.privacy.purge_deleted {
            tokio::spawn(compactor::run(
                lake.clone(),
                compactor::Settings::from_config(&cfg),
                commits.clone(),
                w.shutdown.1.clone(),
            ));
        }
        (Some(commits), Some(rx))
    } else {
        (None, None)
    };
    let checkpoint_task = tokio::spawn(checkpointer::run(
        checkpointer::Committer {
            lake: lake.clone(),
            catalog: catalog.clone(),
            source: kind,
            logs: std::mem::take(&mut rec.logs),
            keep: crate::checkpoint::retention::Keep::of(&cfg.lake),
            rewrites,
        },
        cp_rx,
        files_rx,
        w.abandon.1.clone(),
        rec.resume_cursor,
    ));
    // a reconnect replays the instant it resumes at: keep a second of keys even without rewind.
    // A Jetstream capture may hold such a replay too (made by a client that reconnected), so a
    // file gets the same second; the firehose resumes after its cursor and replays nothing.
    let window = match kind {
        SourceKind::Jetstream => rewind.max(JETSTREAM_REPLAY_US),
        SourceKind::Firehose | SourceKind::Repo => rewind,
    };
    let state = LoopState {
        batcher: Batcher::new(FlushPolicy::from_config(&cfg.flush), kind),
        dedupe: Dedupe::new(rec.durable_keys, rec.durable_high, window),
        filters: w.filters.1.clone(),
        source: kind,
        source_url: match &input {
            Input::File(p) => format!("file:{}", p.display()),
            Input::Network => cfg.source.url.clone(),
        },
        catalog: catalog.clone(),
        checkpoint: rec.checkpoint,
        requested_cursor: rec.resume_cursor,
        checkpoints: cp_tx,
        committed: files_tx,
        high_water: rec.resume_cursor,
        inflight: Default::default(),
        awaiting: Default::default(),
        summary: Summary::default(),
        counts: Default::default(),
        last_event_time_us: None,
        started: Instant::now(),
        progress: progress.clone(),
        fence: lease.fence(),
        lake_url: lake.url().to_string(),
    };
    let (result_tx, result_rx) = oneshot::channel();
    let tasks = pipeline::Tasks {
        source: source_task,
        writer: writer_task,
        checkpoint: checkpoint_task,
        lease,
        sweep,
        finish_sweep: matches!(input, Input::File(_)),
    };
    pipeline::spawn_loop_thread(
        state,
        tasks,
        pipeline::Channels {
            decoded: decoding::DecodeStage::start(
                raw_rx,
                decoding::decoder_count(cfg.source.decode_threads, kind),
                cfg.source.verify_hashes,
            )?,
            jobs: jobs_tx,
            done: done_rx,
            shutdown: w.shutdown.1.clone(),
        },
        result_tx,
    )?;
    Ok(IngestHandle {
        catalog,
        lake,
        source: kind,
        health,
        progress,
        commits,
        filters: w.filters.0,
        shutdown: w.shutdown.0,
        abandon: w.abandon.0,
        done: result_rx,
    })
}
