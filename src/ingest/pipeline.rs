//! The loop: messages in (decoded by [`super::decoding`], or decoded here one at a time);
//! events checked, filtered, deduplicated and batched; flush jobs out; completions in;
//! checkpoint requests out. It runs on its own thread so CPU work never stalls the runtime's
//! I/O.

use super::checkpointer;
use super::decoding::{DecodeStage, DecodedBatch, Incoming};
use super::dedupe::Dedupe;
use super::writer::Completion;
use super::{IngestError, Summary};
use crate::catalog::Catalog;
use crate::checkpoint::{Checkpoint, SourcePosition};
use crate::decode::jetstream::write_line;
use crate::model::key::{error_key, event_key};
use crate::model::lexicon::Lexicon;
use crate::model::{
    Cursor, Decoded, Envelope, ErrorEvent, ErrorReason, EventData, Filters, SourceKind, TimeWindow,
};
use crate::sink::batcher::{Batcher, FlushJob, Refused};
use crate::sink::lease::{Fence, Lease};
use crate::source::file::FileProgress;
use crate::source::{Payload, RawMessage};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// The loop's state.
pub(super) struct LoopState {
    pub batcher: Batcher,
    pub dedupe: Dedupe,
    pub filters: watch::Receiver<Filters>,
    pub source: SourceKind,
    pub source_url: String,
    pub catalog: Arc<Catalog>,
    /// The checkpoint as last requested (every source's position).
    pub checkpoint: Checkpoint,
    pub requested_cursor: Option<Cursor>,
    pub checkpoints: watch::Sender<checkpointer::Request>,
    /// Files made durable, to the committer (each before the position it justifies).
    pub committed: mpsc::UnboundedSender<crate::sink::partition::LakeFile>,
    pub high_water: Option<Cursor>,
    /// job id → (lowest cursor, bytes); abandoned jobs stay here so the checkpoint never
    /// passes their rows
    pub inflight: BTreeMap<u64, (Option<Cursor>, usize)>,
    /// jobs whose completion has not arrived yet
    pub awaiting: HashSet<u64>,
    pub summary: Summary,
    /// (kind, collection label, operation) → events since the last metrics flush
    pub counts: crate::model::KeyedMap<(&'static str, &'static str, &'static str), u64>,
    pub last_event_time_us: Option<i64>,
    pub started: Instant,
    pub progress: Option<Arc<FileProgress>>,
    pub fence: Fence,
    pub lake_url: String,
}

/// The other tasks of the pipeline, joined when the loop ends.
pub(super) struct Tasks {
    pub source: tokio::task::JoinHandle<Result<(), IngestError>>,
    pub writer: tokio::task::JoinHandle<()>,
    pub checkpoint: tokio::task::JoinHandle<Option<Cursor>>,
    pub lease: Lease,
    /// The sweep of what dead writers left, beside the pipeline.
    pub sweep: tokio::task::JoinHandle<Option<crate::checkpoint::Swept>>,
    /// Whether the end waits for the sweep (a file's ingest, which leaves the lake tidy) or
    /// stops it (a daemon's shutdown: the next start sweeps again).
    pub finish_sweep: bool,
}

/// The loop's channels.
pub(super) struct Channels {
    pub decoded: DecodeStage,
    pub jobs: mpsc::Sender<FlushJob>,
    pub done: mpsc::UnboundedReceiver<Completion>,
    pub shutdown: watch::Receiver<bool>,
}

/// Runs the loop on its own thread; the result (joined with the other tasks' results) goes to
/// `result`.
pub(super) fn spawn_loop_thread(
    state: LoopState,
    tasks: Tasks,
    ch: Channels,
    result: oneshot::Sender<Result<Summary, IngestError>>,
) -> Result<(), IngestError> {
    let rt_handle = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("atlake-loop".into())
        .spawn(move || {
            let r = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(state.run(ch)),
                Err(e) => Err(IngestError::Broken(format!(
                    "cannot start the loop thread's runtime: {e}"
                ))),
            };
            let r = rt_handle.block_on(finish(r, tasks));
            let _ = result.send(r);
        })
        .map(|_| ())
        .map_err(|e| IngestError::Broken(format!("cannot start the loop thread: {e}")))
}

/// Waits for the sweep's task: a sweep that failed was logged and counted by itself, and an
/// aborted one is done again at the next start; one that panicked is a bug, logged and counted.
async fn end_sweep(sweep: tokio::task::JoinHandle<Option<crate::checkpoint::Swept>>) {
    if let Err(e) = sweep.await
        && !e.is_cancelled()
    {
        metrics::counter!("atlake_broken_invariants_total").increment(1);
        tracing::error!(error = %e, "the sweep of the lake's leftovers panicked");
    }
}

/// Joins the other tasks after the loop ended, releases the lease, and says how it all went:
/// a task that failed or panicked is an error, never a success.
async fn finish(r: Result<Summary, IngestError>, t: Tasks) -> Result<Summary, IngestError> {
    if r.is_err() {
        // the loop failed (a lost lease, a broken invariant): nothing more is written; what is
        // not checkpointed is replayed by the next run
        t.source.abort();
        t.writer.abort();
        t.checkpoint.abort();
        t.sweep.abort();
        let _ = t.source.await;
        let _ = t.writer.await;
        let _ = t.checkpoint.await;
        end_sweep(t.sweep).await;
        t.lease.release().await;
        return r;
    }
    // the loop has dropped its senders: the writer ends, and the checkpoint writer stores the
    // last request and ends
    let writer = t.writer.await;
    let written = t.checkpoint.await;
    let src = t.source.await;
    if !t.finish_sweep {
        t.sweep.abort();
    }
    end_sweep(t.sweep).await;
    t.lease.release().await;
    let mut s = r?;
    writer.map_err(|e| IngestError::Broken(format!("the writer task failed: {e}")))?;
    s.checkpoint =
        written.map_err(|e| IngestError::Broken(format!("the checkpoint writer failed: {e}")))?;
    match src {
        Ok(Ok(())) => Ok(s),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(IngestError::Broken(format!("the source task failed: {e}"))),
    }
}

/// A collection's `/metrics` label: its NSID for the known lexicons, else `_other`, the name
/// the lake's long-tail partition has.
fn collection_label(c: &str) -> &'static str {
    Lexicon::of(c).map_or("_other", |l| l.nsid())
}

impl LoopState {
    /// No cut-over, or one whose progress is loaded.
    fn cutover_ready(&self) -> bool {
        self.catalog.cutover().is_none_or(|c| c.is_loaded())
    }

    async fn run(mut self, mut ch: Channels) -> Result<Summary, IngestError> {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_progress = Instant::now();
        let fence = self.fence.clone();
        let lost = fence.lost();
        tokio::pin!(lost);
        loop {
            tokio::select! {
                biased;
                why = &mut lost => {
                    return Err(IngestError::Lease(crate::sink::lease::LeaseError::Lost {
                        lake: self.lake_url.clone(),
                        why,
                    }));
                }
                Some(c) = ch.done.recv() => self.completed(c),
                _ = ch.shutdown.wait_for(|s| *s) => {
                    tracing::info!("shutdown: stop reading, flush everything, write the checkpoint");
                    break;
                }
                // byte-based backpressure: stop reading while buffers and flushes in flight use
                // the whole memory cap; completions free it
                // with a backfill beside it, nothing is read before the cut-over holds the
                // backfill's progress (the tick looks again)
                batch = ch.decoded.recv(), if !self.over_budget() && self.cutover_ready() => {
                    let Some(batch) = batch else {
                        break;
                    };
                    let now = Instant::now();
                    let window = TimeWindow::now();
                    match batch? {
                        Incoming::Raw(messages) => {
                            for msg in &messages {
                                let decoded = ch.decoded.decode_here(msg)?;
                                self.process(msg, decoded, now, window)?;
                            }
                        }
                        Incoming::Decoded(mut batch) => {
                            let r = self.process_batch(&mut batch, now, window);
                            ch.decoded.give_back(batch);
                            r?;
                        }
                    }
                    self.publish();
                    let jobs_due = self.batcher.size_due().map_err(broken)?;
                    self.submit(jobs_due, &ch.jobs).await;
                    let over = self.batcher.over_cap(self.inflight_bytes()).map_err(broken)?;
                    self.submit(over, &ch.jobs).await;
                }
                _ = tick.tick() => {
                    self.batcher.seal_all().map_err(broken)?;
                    self.publish();
                    let due = self.batcher.due(Instant::now()).map_err(broken)?;
                    self.submit(due, &ch.jobs).await;
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
        let rest = self.batcher.drain().map_err(broken)?;
        self.submit(rest, &ch.jobs).await;
        drop(ch.jobs);
        while !self.awaiting.is_empty() {
            tokio::select! {
                c = ch.done.recv() => match c {
                    Some(c) => self.completed(c),
                    None => break,
                },
                why = &mut lost => {
                    return Err(IngestError::Lease(crate::sink::lease::LeaseError::Lost {
                        lake: self.lake_url.clone(),
                        why,
                    }));
                }
            }
        }
        self.flush_metrics();
        if self.progress.is_some() {
            self.log_progress();
        }
        self.summary.clean = self.inflight.is_empty();
        Ok(self.summary)
    }

    /// One batch decoded elsewhere, message by message in stream order. The batch is left
    /// for its decoder to free (see `DecodeStage::give_back`).
    fn process_batch(
        &mut self,
        batch: &mut DecodedBatch,
        now: Instant,
        window: TimeWindow,
    ) -> Result<(), IngestError> {
        let DecodedBatch {
            messages,
            ends,
            outputs,
            ..
        } = batch;
        if ends.len() != messages.len() || ends.last().is_some_and(|&e| e != outputs.len()) {
            return Err(broken(format!(
                "a decoded batch of {} messages has {} ends and {} outputs",
                messages.len(),
                ends.len(),
                outputs.len()
            )));
        }
        let mut start = 0;
        for (msg, &end) in messages.iter().zip(ends.iter()) {
            let decoded = outputs
                .get_mut(start..end)
                .ok_or_else(|| broken(format!("a decoded batch's ends go back: {start}..{end}")))?;
            self.process(msg, decoded, now, window)?;
            start = end;
        }
        Ok(())
    }

    fn process(
        &mut self,
        msg: &RawMessage,
        decoded: &mut [Decoded],
        now: Instant,
        window: TimeWindow,
    ) -> Result<(), IngestError> {
        self.summary.messages += 1;
        let cursor = msg.cursor.or(self.high_water);
        for d in decoded {
            match d {
                Decoded::Event(env) => self.accept_event(env, msg, cursor, now, window)?,
                Decoded::Error(e) => {
                    // moved out, an empty one left for the decoder to free
                    let e = std::mem::replace(e, ErrorEvent::new(e.reason, String::new(), &[]));
                    self.accept_error(e, cursor, now, window)?
                }
            }
        }
        if let Some(c) = msg.cursor {
            self.high_water = Some(self.high_water.map_or(c, |h| h.max(c)));
        }
        Ok(())
    }

    /// Checks an event's stream time: a time outside the window never becomes a partition or
    /// a cursor. On Jetstream `time_us` *is* the cursor, so such a line is quarantined; on the
    /// firehose the time comes from the account's PDS, so the event is kept, partitioned by
    /// the time atlake received it, with the claimed time in `claimed_time_us`.
    fn check_time(
        &mut self,
        env: &mut Envelope,
        msg: &RawMessage,
        window: TimeWindow,
    ) -> Result<(), Box<ErrorEvent>> {
        let Err(e) = window.check(env.time_us) else {
            return Ok(());
        };
        let source = self.source.as_str();
        match self.source {
            SourceKind::Jetstream | SourceKind::Repo => {
                metrics::counter!("atlake_time_out_of_range_total", "source" => source, "action" => "quarantined").increment(1);
                let raw = match &msg.payload {
                    Payload::Line(l) => l.to_vec(),
                    _ => {
                        let mut line = Vec::new();
                        write_line(env, &mut line);
                        line
                    }
                };
                let mut err = ErrorEvent::new(ErrorReason::TimeRange, e.to_string(), &raw);
                err.did = Some(env.event.did.to_string());
                err.time_us = Some(env.time_us);
                Err(Box::new(err))
            }
            SourceKind::Firehose => {
                metrics::counter!("atlake_time_out_of_range_total", "source" => source, "action" => "receive_time").increment(1);
                tracing::debug!(did = %env.event.did, time_us = env.time_us, "stream time outside the window; partitioned by receive time");
                env.claimed_time_us = Some(env.time_us);
                env.time_us = window.received_us;
                Ok(())
            }
        }
    }

    fn accept_event(
        &mut self,
        env: &mut Envelope,
        msg: &RawMessage,
        cursor: Option<Cursor>,
        now: Instant,
        window: TimeWindow,
    ) -> Result<(), IngestError> {
        if let Err(e) = self.check_time(env, msg, window) {
            return self.accept_error(*e, cursor, now, window);
        }
        let c = cursor.or_else(|| env.cursor());
        let (did_wanted, collection_wanted) = {
            let f = self.filters.borrow();
            (f.wants_did(&env.event.did), f.wants_collection(env))
        };
        // a DID left out by the filter is not followed at all: the daemon keeps no head for it
        if !did_wanted {
            self.summary.filtered += 1;
            return Ok(());
        }
        // the repo's chain of commits: a gap marks it for a fresh fetch by the backfill. Every
        // commit of a wanted DID is followed, whatever its collection (a commit of a collection
        // left out still moves the chain on), and duplicates too: the events a restart replays
        // from a checkpoint held before a gap are in the lake already, and they are what marks
        // the repo again.
        if let Some(cut) = self.catalog.cutover() {
            match &env.event.data {
                EventData::Commit(op) => {
                    cut.live_commit(&env.event.did, &op.rev, env.chain.as_deref(), c);
                }
                EventData::Sync(s) => {
                    cut.live_sync(&env.event.did, &s.rev, c);
                }
                _ => {}
            }
        }
        if !collection_wanted {
            self.summary.filtered += 1;
            return Ok(());
        }
        let key = event_key(env);
        if self.dedupe.is_duplicate(key) {
            self.summary.duplicates += 1;
            metrics::counter!("atlake_duplicates_total", "reason" => "key").increment(1);
            return Ok(());
        }
        // a create the daemon's backfill already holds in a snapshot at a later rev
        if let (Some(cut), EventData::Commit(op)) = (self.catalog.cutover(), &env.event.data)
            && op.operation == crate::model::Operation::Create
            && !cut.live_create(&env.event.did, &op.collection, &op.rkey, &op.rev)
        {
            metrics::counter!("atlake_backfill_cutover_dropped_total", "side" => "live")
                .increment(1);
            self.summary.filtered += 1;
            return Ok(());
        }
        match self.batcher.push_event(env, c, key, now) {
            Ok(_) => {}
            Err(Refused::Collection) => {
                let mut line = Vec::new();
                write_line(env, &mut line);
                let mut e = ErrorEvent::new(
                    ErrorReason::Collection,
                    Refused::Collection.to_string(),
                    &line,
                );
                e.did = Some(env.event.did.to_string());
                e.seq = env.seq;
                e.time_us = Some(env.time_us);
                if let EventData::Commit(op) = &env.event.data {
                    e.path = Some(format!("{}/{}", op.collection, op.rkey));
                }
                return self.quarantine(e, c, window.received_us, now);
            }
            Err(e) => return Err(broken(e)),
        }
        self.dedupe.remember(key, c);
        self.summary.events += 1;
        self.last_event_time_us = Some(env.time_us);
        let (coll, op) = match &env.event.data {
            EventData::Commit(c) => (collection_label(&c.collection), c.operation.as_str()),
            _ => ("", ""),
        };
        *self
            .counts
            .entry((env.event.kind().as_str(), coll, op))
            .or_default() += 1;
        Ok(())
    }

    fn accept_error(
        &mut self,
        e: ErrorEvent,
        cursor: Option<Cursor>,
        now: Instant,
        window: TimeWindow,
    ) -> Result<(), IngestError> {
        let key = error_key(&e, cursor);
        if self.dedupe.is_duplicate(key) {
            self.summary.duplicates += 1;
            return Ok(());
        }
        self.dedupe.remember(key, cursor);
        let at = e
            .time_us
            .filter(|&t| window.contains(t))
            .unwrap_or(window.received_us);
        self.quarantine(e, cursor, at, now)
    }

    fn inflight_bytes(&self) -> usize {
        self.inflight.values().map(|(_, b)| *b).sum()
    }

    fn over_budget(&self) -> bool {
        self.batcher.buffered_bytes() + self.inflight_bytes() > self.batcher.data_budget()
            && !self.awaiting.is_empty()
    }

    fn quarantine(
        &mut self,
        e: ErrorEvent,
        cursor: Option<Cursor>,
        partition_time_us: i64,
        now: Instant,
    ) -> Result<(), IngestError> {
        metrics::counter!("atlake_quarantined_total", "reason" => e.reason.as_str()).increment(1);
        tracing::debug!(reason = %e.reason, detail = %e.detail, cursor = ?cursor, "quarantined input");
        self.summary.quarantined += 1;
        self.batcher
            .push_error(&e, cursor, partition_time_us, now)
            .map_err(broken)
    }

    fn publish(&mut self) {
        self.catalog.append(self.batcher.take_sealed());
    }

    async fn submit(&mut self, jobs: Vec<FlushJob>, tx: &mpsc::Sender<FlushJob>) {
        for job in jobs {
            self.catalog
                .start_flush(job.id, &job.key, job.chunks.clone());
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
            if self.committed.send(f.clone()).is_err() {
                metrics::counter!("atlake_broken_invariants_total").increment(1);
                tracing::error!(path = %f.path, "the committer is gone; the file is not committed and comes again on the next start");
            }
        }
        metrics::gauge!("atlake_inflight_flushes").set(self.inflight.len() as f64);
        self.request_checkpoint();
    }

    /// The cursor at or below which everything accepted is durable: just before the lowest
    /// cursor still buffered or in flight, or the newest cursor seen when nothing is pending.
    /// With a backfill beside the stream, also just before the earliest event whose gap is not
    /// yet covered by a committed fresh fetch (a crash replays it, and it marks again).
    fn durable_cursor(&self) -> Option<Cursor> {
        let pending = self
            .batcher
            .min_buffered_cursor()
            .into_iter()
            .chain(self.inflight.values().filter_map(|(c, _)| *c))
            .chain(self.catalog.cutover().and_then(|cut| cut.hold()))
            .min();
        match pending {
            Some(p) => p.prev(),
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
        if let Err(e) = self
            .checkpoint
            .set(self.source, SourcePosition::new(c, &self.source_url))
        {
            tracing::error!(error = %e, "checkpoint not requested");
            metrics::counter!("atlake_broken_invariants_total").increment(1);
            return;
        }
        self.requested_cursor = Some(c);
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
            metrics::gauge!("atlake_last_cursor").set(h.value() as f64);
        }
        if let Some(t) = self.last_event_time_us {
            metrics::gauge!("atlake_lag_seconds")
                .set(crate::model::cursor::now_us().saturating_sub(t) as f64 / 1e6);
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

/// A broken invariant inside the pipeline (not caused by input): the pipeline stops with it.
fn broken(e: impl std::fmt::Display) -> IngestError {
    tracing::error!(error = %e, "broken invariant in the ingest pipeline");
    metrics::counter!("atlake_broken_invariants_total").increment(1);
    IngestError::Broken(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::lease::LeaseSettings;

    async fn tasks(
        source: tokio::task::JoinHandle<Result<(), IngestError>>,
        checkpoint: tokio::task::JoinHandle<Option<Cursor>>,
    ) -> Tasks {
        let lake = crate::sink::store::Lake::open("memory://").unwrap();
        let lease = Lease::acquire(
            &lake,
            &LeaseSettings {
                command: "test".into(),
                ttl: Duration::from_secs(30),
                wait: false,
            },
        )
        .await
        .unwrap();
        Tasks {
            source,
            writer: tokio::spawn(async {}),
            checkpoint,
            lease,
            sweep: tokio::spawn(async { None }),
            finish_sweep: true,
        }
    }

    #[tokio::test]
    async fn a_panicked_task_is_an_error_never_a_success() {
        let t = tasks(
            tokio::spawn(async { panic!("source blew up") }),
            tokio::spawn(async { None }),
        )
        .await;
        let r = finish(Ok(Summary::default()), t).await;
        assert!(
            matches!(&r, Err(IngestError::Broken(m)) if m.contains("source task")),
            "{r:?}"
        );
        let t = tasks(
            tokio::spawn(async { Ok(()) }),
            tokio::spawn(async { panic!("checkpoint writer blew up") }),
        )
        .await;
        let r = finish(Ok(Summary::default()), t).await;
        assert!(
            matches!(&r, Err(IngestError::Broken(m)) if m.contains("checkpoint writer")),
            "{r:?}"
        );
        let c = Cursor::seq(7).unwrap();
        let t = tasks(
            tokio::spawn(async { Ok(()) }),
            tokio::spawn(async move { Some(c) }),
        )
        .await;
        let s = finish(Ok(Summary::default()), t).await.unwrap();
        assert_eq!(s.checkpoint, Some(c));
    }

    #[tokio::test]
    async fn a_failed_loop_ends_every_task_and_keeps_its_error() {
        let t = tasks(
            tokio::spawn(std::future::pending()),
            tokio::spawn(std::future::pending()),
        )
        .await;
        let r = finish(Err(IngestError::Broken("loop failed".into())), t).await;
        assert!(matches!(&r, Err(IngestError::Broken(m)) if m == "loop failed"));
    }
}
