//! The ingest pipeline: source → decode → filter and dedupe → batcher → writer → checkpoint.
//!
//! ```text
//!  source task ──(bounded)──▶ decode loop (own thread) ──(bounded)──▶ writer (2 encoders)
//!  firehose/jetstream/file      decode, filter, dedupe,                sort, Parquet, store
//!                               batch by (collection, hour)                  │
//!                                      ▲         │ seal chunks               │ durable
//!                                      │         ▼                           ▼
//!                                      │    LiveState (files + buffered + in-flight rows)
//!                                      └──── completions ◀───────────────────┘
//!                                            → checkpoint written after the files
//! ```
//!
//! Every channel is bounded: a slow store fills the job channel, the decode loop waits, the raw
//! channel fills, the source stops reading its socket. Nothing is dropped. The checkpoint is
//! recomputed after every completed flush as the lowest cursor still buffered or in flight,
//! minus one (or the last cursor seen when nothing is pending), and written only then.

pub mod checkpointer;
pub mod dedupe;
pub mod live;
pub mod writer;

use crate::checkpoint::{Checkpoint, CheckpointError, SourcePosition, recover};
use crate::config::{Config, SourceKindConfig};
use crate::decode::frame::{DecodeOptions, FrameDecoder};
use crate::decode::jetstream::{JetstreamDecoder, JetstreamOptions, write_line};
use crate::model::lexicon::Lexicon;
use crate::model::{Decoded, ErrorEvent, ErrorReason, EventData, SourceKind};
use crate::sink::batcher::{Accepted, Batcher, FlushJob, FlushPolicy, error_key, event_key};
use crate::sink::store::{Lake, StoreError};
use crate::source::capture::CaptureError;
use crate::source::file::{FileProgress, FileSource};
use crate::source::firehose::{FirehoseSource, SourceError, WsSettings};
use crate::source::jetstream::JetstreamSource;
use crate::source::{Filters, Payload, RawMessage};
use dedupe::Dedupe;
use live::LiveState;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use writer::{Completion, StorageHealth};

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
    /// Something else.
    #[error("{0}")]
    Other(String),
}

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
    pub checkpoint: Option<i64>,
    /// Everything was flushed and checkpointed before the end.
    pub clean: bool,
}

/// A running ingest.
#[derive(Debug)]
pub struct IngestHandle {
    /// Rows and files, for the SQL endpoint.
    pub live: Arc<LiveState>,
    /// The lake.
    pub lake: Lake,
    /// Which kind of source.
    pub source: SourceKind,
    /// Storage health.
    pub health: Arc<StorageHealth>,
    /// File progress (file input).
    pub progress: Option<Arc<FileProgress>>,
    filters: watch::Sender<Filters>,
    shutdown: watch::Sender<bool>,
    abandon: watch::Sender<bool>,
    done: tokio::sync::oneshot::Receiver<Result<Summary, IngestError>>,
}

impl IngestHandle {
    /// Asks the pipeline to stop reading, flush everything and write the checkpoint.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Gives up on flushes that cannot be stored (after the shutdown deadline).
    pub fn abandon(&self) {
        let _ = self.abandon.send(true);
    }

    /// Replaces the collection/DID filters (sent to Jetstream as `options_update`).
    pub fn set_filters(&self, f: Filters) {
        let _ = self.filters.send(f);
    }

    /// The filters' sender, for the HTTP endpoint.
    pub fn filters_sender(&self) -> watch::Sender<Filters> {
        self.filters.clone()
    }

    /// Waits for the end (file input end, or shutdown).
    pub async fn wait(self) -> Result<Summary, IngestError> {
        self.done.await.unwrap_or_else(|_| {
            Err(IngestError::Other(
                "ingest thread ended unexpectedly".into(),
            ))
        })
    }

    /// Shuts down and waits, abandoning unstorable flushes after `deadline`.
    pub async fn stop(self, deadline: Duration) -> Result<Summary, IngestError> {
        self.shutdown();
        let abandon = self.abandon.clone();
        let mut done = self.done;
        tokio::select! {
            r = &mut done => r.unwrap_or_else(|_| Err(IngestError::Other("ingest thread ended unexpectedly".into()))),
            _ = tokio::time::sleep(deadline) => {
                tracing::error!(?deadline, "shutdown deadline passed; abandoning unfinished flushes (they will be replayed from the checkpoint)");
                let _ = abandon.send(true);
                done.await.unwrap_or_else(|_| Err(IngestError::Other("ingest thread ended unexpectedly".into())))
            }
        }
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn rfc3339_now() -> String {
    crate::decode::syntax::format_datetime_ms(now_us())
}

/// Starts ingesting into the configured lake.
pub async fn start(cfg: Config, input: Input) -> Result<IngestHandle, IngestError> {
    let lake = Lake::open(&cfg.lake.url)?;
    start_with_lake(cfg, input, lake).await
}

/// Starts ingesting into an already opened lake.
pub async fn start_with_lake(
    cfg: Config,
    input: Input,
    lake: Lake,
) -> Result<IngestHandle, IngestError> {
    let (file, kind) = match &input {
        Input::File(p) => {
            let (f, k) = FileSource::open(p)?;
            (Some(f), k)
        }
        Input::Network => (
            None,
            match cfg.source.kind {
                SourceKindConfig::Firehose => SourceKind::Firehose,
                SourceKindConfig::Jetstream => SourceKind::Jetstream,
            },
        ),
    };
    let rewind_us: i64 = match (kind, &input) {
        (SourceKind::Jetstream, Input::Network) => {
            cfg.source.rewind.0.as_micros().try_into().unwrap_or(0)
        }
        _ => 0,
    };
    let started = Instant::now();
    let rec = recover(&lake, kind, rewind_us).await?;
    tracing::info!(
        lake = lake.url(),
        source = kind.as_str(),
        resume = ?rec.resume_cursor,
        files = rec.files.len(),
        durable_keys = rec.durable_keys.len(),
        scanned = rec.files_scanned,
        temp_removed = rec.temp_removed,
        took = ?started.elapsed(),
        "recovered lake state"
    );
    let mut rec = rec;
    if rec.resume_cursor.is_none()
        && let (Input::Network, Some(c)) = (&input, cfg.source.start_cursor)
    {
        tracing::info!(
            cursor = c,
            "no checkpoint: starting from the configured start_cursor"
        );
        rec.resume_cursor = Some(c);
    }
    let live = Arc::new(LiveState::new(rec.files.clone(), rec.checkpoint.clone()));
    let filters = Filters::new(cfg.source.collections.clone(), cfg.source.dids.clone())
        .map_err(IngestError::Other)?;
    let (filters_tx, filters_rx) = watch::channel(filters);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (abandon_tx, abandon_rx) = watch::channel(false);
    let (raw_tx, raw_rx) = mpsc::channel::<RawMessage>(1024);
    let (jobs_tx, jobs_rx) = mpsc::channel::<FlushJob>(2);
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Completion>();
    let health = Arc::new(StorageHealth::default());

    // source
    let mut progress = None;
    let source_task: tokio::task::JoinHandle<Result<(), IngestError>> = match file {
        Some(mut f) => {
            f.resume_after = rec.resume_cursor;
            let p = Arc::new(FileProgress::default());
            progress = Some(p.clone());
            let sd = shutdown_rx.clone();
            tokio::spawn(async move { f.run(raw_tx, p, sd).await.map_err(IngestError::from) })
        }
        None => {
            let settings = WsSettings::from_config(&cfg.source);
            let sd = shutdown_rx.clone();
            match kind {
                SourceKind::Firehose => {
                    let src = FirehoseSource {
                        settings,
                        cursor: rec.resume_cursor,
                    };
                    tokio::spawn(
                        async move { src.run(raw_tx, sd).await.map_err(IngestError::from) },
                    )
                }
                SourceKind::Jetstream => {
                    let src = JetstreamSource {
                        settings,
                        cursor: rec.resume_cursor,
                        rewind_us,
                        compress: cfg.source.compress,
                    };
                    let f = filters_rx.clone();
                    tokio::spawn(
                        async move { src.run(raw_tx, f, sd).await.map_err(IngestError::from) },
                    )
                }
            }
        }
    };

    // writer
    tokio::spawn(writer::run(
        lake.clone(),
        cfg.writer.clone(),
        kind,
        jobs_rx,
        done_tx,
        live.clone(),
        health.clone(),
        abandon_rx.clone(),
    ));

    // checkpoint writer
    let (cp_tx, cp_rx) = watch::channel(None);
    let checkpoint_task = tokio::spawn(checkpointer::run(
        lake.clone(),
        live.clone(),
        cp_rx,
        abandon_rx.clone(),
        rec.resume_cursor,
    ));

    // decode loop, on its own thread so CPU work never stalls the runtime's I/O
    let (result_tx, result_rx) = tokio::sync::oneshot::channel();
    let state = LoopState {
        batcher: Batcher::new(FlushPolicy::from_config(&cfg.flush), kind),
        dedupe: Dedupe::new(rec.durable_keys, rec.durable_high, rewind_us),
        filters: filters_rx,
        source: kind,
        source_url: match &input {
            Input::File(p) => format!("file:{}", p.display()),
            Input::Network => cfg.source.url.clone(),
        },
        frames: FrameDecoder::new(DecodeOptions {
            verify_hashes: cfg.source.verify_hashes,
        }),
        lines: JetstreamDecoder::new(JetstreamOptions::default()),
        live: live.clone(),
        checkpoint: rec.checkpoint,
        requested_cursor: rec.resume_cursor,
        checkpoints: cp_tx,
        high_water: rec.resume_cursor,
        inflight: BTreeMap::new(),
        awaiting: Default::default(),
        summary: Summary::default(),
        counts: HashMap::new(),
        last_event_time_us: None,
        started: Instant::now(),
        progress: progress.clone(),
    };
    let rt_handle = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("atlake-decode".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = result_tx.send(Err(IngestError::Other(e.to_string())));
                    return;
                }
            };
            let r = rt.block_on(state.run(raw_rx, jobs_tx, done_rx, shutdown_rx));
            // the loop has dropped its request sender: the writer stores the last one and ends
            let written = rt_handle.block_on(checkpoint_task).unwrap_or(None);
            let r = r.map(|mut s| {
                s.checkpoint = written;
                s
            });
            // the source's own result explains an early end (fatal error)
            let src = rt_handle.block_on(source_task);
            let r = match (r, src) {
                (Ok(s), Ok(Ok(()))) => Ok(s),
                (Ok(_), Ok(Err(e))) => Err(e),
                (Ok(s), Err(_)) => Ok(s),
                (Err(e), _) => Err(e),
            };
            let _ = result_tx.send(r);
        })
        .map_err(|e| IngestError::Other(e.to_string()))?;

    Ok(IngestHandle {
        live,
        lake,
        source: kind,
        health,
        progress,
        filters: filters_tx,
        shutdown: shutdown_tx,
        abandon: abandon_tx,
        done: result_rx,
    })
}

struct LoopState {
    batcher: Batcher,
    dedupe: Dedupe,
    filters: watch::Receiver<Filters>,
    source: SourceKind,
    source_url: String,
    frames: FrameDecoder,
    lines: JetstreamDecoder,
    live: Arc<LiveState>,
    /// The checkpoint as last requested (every source's position).
    checkpoint: Checkpoint,
    requested_cursor: Option<i64>,
    checkpoints: watch::Sender<checkpointer::Request>,
    high_water: Option<i64>,
    /// job id → (lowest cursor, bytes); abandoned jobs stay here so the checkpoint never
    /// passes their rows
    inflight: BTreeMap<u64, (Option<i64>, usize)>,
    /// jobs whose completion has not arrived yet
    awaiting: std::collections::HashSet<u64>,
    summary: Summary,
    /// (kind, collection label, operation) → events since the last metrics flush
    counts: HashMap<(&'static str, &'static str, &'static str), u64>,
    last_event_time_us: Option<i64>,
    started: Instant,
    progress: Option<Arc<FileProgress>>,
}

fn collection_label(c: &str) -> &'static str {
    Lexicon::of(c).map_or("other", |l| l.nsid())
}

impl LoopState {
    async fn run(
        mut self,
        mut raw: mpsc::Receiver<RawMessage>,
        jobs: mpsc::Sender<FlushJob>,
        mut done: mpsc::UnboundedReceiver<Completion>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Summary, IngestError> {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = Vec::with_capacity(256);
        let mut decoded = Vec::with_capacity(64);
        let mut last_progress = Instant::now();
        loop {
            tokio::select! {
                biased;
                Some(c) = done.recv() => self.completed(c),
                _ = shutdown.wait_for(|s| *s) => {
                    tracing::info!("shutdown: stop reading, flush everything, write the checkpoint");
                    break;
                }
                // byte-based backpressure: stop reading while buffers and flushes in flight use
                // the whole memory cap; completions free it
                n = raw.recv_many(&mut buf, 256), if !self.over_budget() => {
                    if n == 0 {
                        break;
                    }
                    let now = Instant::now();
                    for msg in buf.drain(..) {
                        self.process(msg, &mut decoded, now);
                    }
                    self.publish();
                    let jobs_due = self.batcher.size_due();
                    self.submit(jobs_due, &jobs).await;
                    let over = self.batcher.over_cap(self.inflight_bytes());
                    self.submit(over, &jobs).await;
                }
                _ = tick.tick() => {
                    self.batcher.seal_all();
                    self.publish();
                    let due = self.batcher.due(Instant::now());
                    self.submit(due, &jobs).await;
                    // the position also moves without a flush: a tail of duplicates or of
                    // filtered events leaves nothing to write, yet is behind us
                    self.request_checkpoint();
                    self.flush_metrics();
                    if self.progress.is_some() && last_progress.elapsed() >= Duration::from_secs(5) {
                        last_progress = Instant::now();
                        self.log_progress();
                    }
                }
            }
        }
        // drain: whatever is buffered becomes files, then the final checkpoint
        let rest = self.batcher.drain();
        self.submit(rest, &jobs).await;
        drop(jobs);
        while !self.awaiting.is_empty() {
            match done.recv().await {
                Some(c) => self.completed(c),
                None => break,
            }
        }
        self.flush_metrics();
        if self.progress.is_some() {
            self.log_progress();
        }
        self.summary.clean = self.inflight.is_empty();
        Ok(self.summary)
    }

    fn process(&mut self, msg: RawMessage, decoded: &mut Vec<Decoded>, now: Instant) {
        self.summary.messages += 1;
        decoded.clear();
        match &msg.payload {
            Payload::Frame(f) => self.frames.decode(f, decoded),
            Payload::Line(l) => decoded.push(self.lines.decode(l)),
            Payload::Undecodable(e) => decoded.push(Decoded::Error(e.clone())),
        }
        let cursor = msg.cursor.or(self.high_water);
        let filters = self.filters.clone();
        let filters = filters.borrow();
        for d in decoded.drain(..) {
            match d {
                Decoded::Event(env) => {
                    if !filters.is_empty() && !filters.matches(&env) {
                        self.summary.filtered += 1;
                        continue;
                    }
                    let key = event_key(&env);
                    if self.dedupe.is_duplicate(key) {
                        self.summary.duplicates += 1;
                        metrics::counter!("atlake_duplicates_total", "reason" => "key")
                            .increment(1);
                        continue;
                    }
                    let c = cursor.unwrap_or(env.cursor());
                    match self.batcher.push_event(&env, c, key, now) {
                        Accepted::Quarantined => {
                            let mut line = Vec::new();
                            write_line(&env, &mut line);
                            let mut e = ErrorEvent::new(
                                ErrorReason::Collection,
                                "collection cannot name a partition (not lower-case or longer than 253 bytes)",
                                &line,
                            );
                            e.did = Some(env.event.did.clone());
                            e.seq = env.seq;
                            e.time_us = Some(env.time_us);
                            if let EventData::Commit(op) = &env.event.data {
                                e.path = Some(format!("{}/{}", op.collection, op.rkey));
                            }
                            self.quarantine(e, Some(c), now);
                            continue;
                        }
                        Accepted::Own | Accepted::Other => {}
                    }
                    self.dedupe.remember(key, Some(c));
                    self.summary.events += 1;
                    self.last_event_time_us = Some(env.time_us);
                    let (coll, op) = match &env.event.data {
                        EventData::Commit(c) => {
                            (collection_label(&c.collection), c.operation.as_str())
                        }
                        _ => ("", ""),
                    };
                    *self
                        .counts
                        .entry((env.event.kind().as_str(), coll, op))
                        .or_default() += 1;
                }
                Decoded::Error(e) => {
                    let key = error_key(&e, cursor);
                    if self.dedupe.is_duplicate(key) {
                        self.summary.duplicates += 1;
                        continue;
                    }
                    self.dedupe.remember(key, cursor);
                    self.quarantine(e, cursor, now);
                }
            }
        }
        if let Some(c) = msg.cursor {
            self.high_water = Some(self.high_water.map_or(c, |h| h.max(c)));
        }
    }

    fn inflight_bytes(&self) -> usize {
        self.inflight.values().map(|(_, b)| *b).sum()
    }

    fn over_budget(&self) -> bool {
        self.batcher.buffered_bytes() + self.inflight_bytes() > self.batcher.data_budget()
            && !self.awaiting.is_empty()
    }

    fn quarantine(&mut self, e: ErrorEvent, cursor: Option<i64>, now: Instant) {
        metrics::counter!("atlake_quarantined_total", "reason" => e.reason.as_str()).increment(1);
        tracing::debug!(reason = %e.reason, detail = %e.detail, cursor = ?cursor, "quarantined input");
        self.summary.quarantined += 1;
        self.batcher.push_error(&e, cursor, now_us(), now);
    }

    fn publish(&mut self) {
        self.live.append(self.batcher.take_sealed());
    }

    async fn submit(&mut self, jobs: Vec<FlushJob>, tx: &mpsc::Sender<FlushJob>) {
        for job in jobs {
            self.live.start_flush(job.id, &job.key, job.chunks.clone());
            self.inflight.insert(job.id, (job.first_cursor, job.bytes));
            self.awaiting.insert(job.id);
            metrics::gauge!("atlake_inflight_flushes").set(self.inflight.len() as f64);
            if tx.send(job).await.is_err() {
                tracing::error!("writer is gone; cannot flush");
            }
        }
    }

    fn completed(&mut self, c: Completion) {
        self.awaiting.remove(&c.job_id);
        // an abandoned job (no file) stays pinned so the checkpoint never passes its rows
        if let Some(f) = &c.file {
            self.inflight.remove(&c.job_id);
            self.summary.files += 1;
            self.summary.bytes_written += f.size;
        }
        metrics::gauge!("atlake_inflight_flushes").set(self.inflight.len() as f64);
        self.request_checkpoint();
    }

    /// The cursor at or below which everything accepted is durable.
    fn durable_cursor(&self) -> Option<i64> {
        let pending = self
            .batcher
            .min_buffered_cursor()
            .into_iter()
            .chain(self.inflight.values().filter_map(|(c, _)| *c))
            .min();
        match pending {
            Some(p) => Some(p - 1),
            None => self.high_water,
        }
    }

    /// Asks the checkpoint writer to store the durable position, if it moved.
    fn request_checkpoint(&mut self) {
        let Some(c) = self.durable_cursor() else {
            return;
        };
        if Some(c) == self.requested_cursor {
            return;
        }
        self.requested_cursor = Some(c);
        self.checkpoint.set(
            self.source,
            SourcePosition {
                cursor: c,
                url: self.source_url.clone(),
                updated_at: rfc3339_now(),
            },
        );
        let _ = self.checkpoints.send(Some((self.checkpoint.clone(), c)));
    }

    fn flush_metrics(&mut self) {
        for ((kind, coll, op), n) in self.counts.drain() {
            metrics::counter!("atlake_events_total", "kind" => kind, "collection" => coll, "operation" => op).increment(n);
        }
        tracing::trace!(
            buffered = self.batcher.buffered_bytes(),
            inflight = self.inflight_bytes(),
            rows = self.batcher.buffered_rows(),
            jobs = self.awaiting.len(),
            "memory"
        );
        metrics::gauge!("atlake_buffered_rows").set(self.batcher.buffered_rows() as f64);
        metrics::gauge!("atlake_buffered_bytes").set(self.batcher.buffered_bytes() as f64);
        metrics::gauge!("atlake_open_partitions").set(self.batcher.open_partitions() as f64);
        metrics::gauge!("atlake_dedupe_keys").set(self.dedupe.len() as f64);
        if let Some(h) = self.high_water {
            metrics::gauge!("atlake_last_cursor").set(h as f64);
        }
        if let Some(t) = self.last_event_time_us {
            metrics::gauge!("atlake_lag_seconds").set((now_us() - t) as f64 / 1e6);
        }
    }

    fn log_progress(&self) {
        let Some(p) = &self.progress else { return };
        let read = p.bytes_read.load(Ordering::Relaxed);
        let total = p.total.load(Ordering::Relaxed).max(1);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        tracing::info!(
            "ingest: {} events ({:.0}/s), {} messages, {:.1}% of the file ({:.1} of {:.1} MB), {} quarantined, {} duplicates skipped, {} files written",
            self.summary.events,
            self.summary.events as f64 / secs,
            self.summary.messages,
            100.0 * read as f64 / total as f64,
            read as f64 / 1e6,
            total as f64 / 1e6,
            self.summary.quarantined,
            self.summary.duplicates + p.skipped.load(Ordering::Relaxed),
            self.summary.files,
        );
    }
}
