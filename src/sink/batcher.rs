//! The batcher: events buffered per partition (collection, hour of stream time), and the named
//! flush policy that decides when a buffer becomes a file.
//!
//! A partition flushes when it reaches `max_rows` or `max_bytes`, when its oldest row is
//! `max_age` old, when the stream has moved `hour_close_grace` past the end of its hour, when its
//! oldest row lags `max_checkpoint_lag` events behind the newest (so the checkpoint never lags
//! far), or when all buffers together pass `memory_cap` (largest first). Collections beyond
//! `max_open_partitions` share the `_other` partition; core collections always have their own.
//!
//! The batcher is pure: time comes in as arguments, so every rule is tested without sleeping.
//! Rows are kept as Arrow builders and sealed into small record batches ("chunks") often, so the
//! daemon's SQL can read buffered rows.

use super::partition::{PartitionKey, PartitionName, PartitionRangeError, is_path_safe_collection};
use crate::config::FlushConfig;
use crate::model::KeyedMap;
use crate::model::key::{EventKey, error_key};
use crate::model::lexicon::Lexicon;
use crate::model::rows::{RowBuilder, TableKind};
use crate::model::{Cursor, Envelope, ErrorEvent, EventData, SourceKind};
use arrow::record_batch::RecordBatch;
use std::time::{Duration, Instant};

/// Why a partition was flushed (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlushReason {
    /// `max_rows` reached.
    Rows,
    /// `max_bytes` reached.
    Bytes,
    /// `max_age` reached.
    Age,
    /// The stream moved past the partition's hour.
    HourClosed,
    /// All buffers together passed `memory_cap`.
    MemoryCap,
    /// The oldest row lagged too many events behind.
    CheckpointLag,
    /// Shutdown or end of input.
    Drain,
}

impl FlushReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Rows => "rows",
            FlushReason::Bytes => "bytes",
            FlushReason::Age => "age",
            FlushReason::HourClosed => "hour_closed",
            FlushReason::MemoryCap => "memory_cap",
            FlushReason::CheckpointLag => "checkpoint_lag",
            FlushReason::Drain => "drain",
        }
    }
}

/// The flush policy, with durations and sizes resolved.
#[derive(Debug, Clone)]
pub struct FlushPolicy {
    /// Rows per partition.
    pub max_rows: usize,
    /// Bytes per partition.
    pub max_bytes: usize,
    /// Age of the oldest row.
    pub max_age: Duration,
    /// All buffers together.
    pub memory_cap: usize,
    /// Open partitions before collections share `_other`.
    pub max_open_partitions: usize,
    /// How far past an hour's end before its partitions flush, µs of stream time.
    pub hour_close_grace_us: i64,
    /// Events between a partition's oldest row and the newest event.
    pub max_checkpoint_lag: u64,
    /// Rows per sealed chunk.
    pub chunk_rows: usize,
}

impl FlushPolicy {
    /// From the `[flush]` section.
    pub fn from_config(c: &FlushConfig) -> Self {
        FlushPolicy {
            max_rows: c.max_rows.try_into().unwrap_or(usize::MAX),
            max_bytes: c.max_bytes.0.try_into().unwrap_or(usize::MAX),
            max_age: c.max_age.0,
            memory_cap: c.memory_cap.0.try_into().unwrap_or(usize::MAX),
            max_open_partitions: c.max_open_partitions,
            hour_close_grace_us: c
                .hour_close_grace
                .0
                .as_micros()
                .try_into()
                .unwrap_or(i64::MAX),
            max_checkpoint_lag: c.max_checkpoint_lag,
            chunk_rows: 8192,
        }
    }

    /// Whether the stream, at `stream_time_us`, is `hour_close_grace` past the end of `key`'s
    /// span.
    pub fn closed(&self, key: &PartitionKey, stream_time_us: Option<i64>) -> bool {
        stream_time_us.is_some_and(|t| t >= key.end_us().saturating_add(self.hour_close_grace_us))
    }

    /// Whether a partition must flush now, and why.
    pub fn should_complete_file(
        &self,
        p: &PartitionBuffer,
        now: Instant,
        stream_time_us: Option<i64>,
        events_seen: u64,
    ) -> Option<FlushReason> {
        if p.rows == 0 {
            return None;
        }
        if p.rows >= self.max_rows {
            return Some(FlushReason::Rows);
        }
        if p.bytes >= self.max_bytes {
            return Some(FlushReason::Bytes);
        }
        if now.saturating_duration_since(p.opened_at) >= self.max_age {
            return Some(FlushReason::Age);
        }
        if !p.late && self.closed(&p.key, stream_time_us) {
            return Some(FlushReason::HourClosed);
        }
        if events_seen.saturating_sub(p.first_event) > self.max_checkpoint_lag {
            return Some(FlushReason::CheckpointLag);
        }
        None
    }
}

/// The buffered rows of one partition.
#[derive(Debug)]
pub struct PartitionBuffer {
    /// The partition.
    pub key: PartitionKey,
    builder: RowBuilder,
    /// Sealed chunks, oldest first.
    pub chunks: Vec<RecordBatch>,
    /// Rows buffered (sealed and not).
    pub rows: usize,
    /// Estimated bytes buffered.
    pub bytes: usize,
    /// When the first row arrived.
    pub opened_at: Instant,
    /// Lowest cursor buffered (`None` while no row had one).
    pub first_cursor: Option<Cursor>,
    /// Highest cursor buffered.
    pub last_cursor: Option<Cursor>,
    /// Event counter at the first row.
    pub first_event: u64,
    /// Order-independent hash of the rows' keys.
    pub key_hash: u64,
    /// Opened after the stream had closed its hour (late rows): it flushes by age, size,
    /// memory or checkpoint lag, not at the next check. Otherwise rows that keep coming for a
    /// closed hour (events partitioned by the time they were received, their own being more
    /// than 10 minutes ahead, while others up to 10 minutes ahead carried the stream past the
    /// hour) made a file per partition at every check: 880 per collection in 8 minutes.
    pub late: bool,
}

impl PartitionBuffer {
    fn note_cursor(&mut self, cursor: Option<Cursor>) {
        if let Some(c) = cursor {
            self.first_cursor = Some(self.first_cursor.map_or(c, |f| f.min(c)));
            self.last_cursor = Some(self.last_cursor.map_or(c, |l| l.max(c)));
        }
    }
}

/// One partition's rows on their way to a file.
#[derive(Debug, Clone)]
pub struct FlushJob {
    /// Unique per process.
    pub id: u64,
    /// The partition.
    pub key: PartitionKey,
    /// Row shape.
    pub kind: TableKind,
    /// The rows, in chunks.
    pub chunks: Vec<RecordBatch>,
    /// Row count.
    pub rows: usize,
    /// Estimated bytes.
    pub bytes: usize,
    /// Lowest cursor (`None` when no row had one).
    pub first_cursor: Option<Cursor>,
    /// Highest cursor.
    pub last_cursor: Option<Cursor>,
    /// Hash of the rows' keys (for the file name).
    pub key_hash: u64,
    /// Why.
    pub reason: FlushReason,
}

/// Where an event went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Buffered in its own partition.
    Own,
    /// Buffered in `_other` (open-partition cap reached).
    Other,
}

/// Why the batcher could not take a row.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The event's collection cannot name a partition (the caller quarantines it).
    #[error("collection cannot name a partition (not lower-case or longer than 253 bytes)")]
    Collection,
    /// The partition time cannot name a partition (the caller checks times first, so this is
    /// a broken invariant).
    #[error(transparent)]
    Time(#[from] PartitionRangeError),
    /// A chunk could not be sealed (a broken invariant).
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// Rows that could not be turned into a record batch: a broken invariant (a builder out of step
/// with its schema), never caused by input.
#[derive(Debug, thiserror::Error)]
#[error("sealing the rows of {partition} failed: {source}")]
pub struct SealError {
    /// The partition.
    pub partition: String,
    /// Arrow's error.
    pub source: arrow::error::ArrowError,
}

/// The set of partition buffers.
#[derive(Debug)]
pub struct Batcher {
    /// The policy in force.
    pub policy: FlushPolicy,
    source: SourceKind,
    buffers: KeyedMap<PartitionKey, PartitionBuffer>,
    total_bytes: usize,
    events_seen: u64,
    stream_time_us: Option<i64>,
    next_job: u64,
    sealed: Vec<(PartitionKey, RecordBatch)>,
}

impl Batcher {
    /// An empty batcher.
    pub fn new(policy: FlushPolicy, source: SourceKind) -> Self {
        Batcher {
            policy,
            source,
            buffers: KeyedMap::default(),
            total_bytes: 0,
            events_seen: 0,
            stream_time_us: None,
            next_job: 1,
            sealed: Vec::new(),
        }
    }

    /// Bytes buffered in all partitions.
    pub fn buffered_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Rows buffered in all partitions.
    pub fn buffered_rows(&self) -> usize {
        self.buffers.values().map(|b| b.rows).sum()
    }

    /// Open partitions.
    pub fn open_partitions(&self) -> usize {
        self.buffers.len()
    }

    /// Lowest cursor still buffered.
    pub fn min_buffered_cursor(&self) -> Option<Cursor> {
        self.buffers.values().filter_map(|b| b.first_cursor).min()
    }

    fn note_time(&mut self, t: i64) {
        self.stream_time_us = Some(self.stream_time_us.map_or(t, |s| s.max(t)));
    }

    fn partition_for(&self, env: &Envelope) -> Result<PartitionKey, Refused> {
        let name = match &env.event.data {
            EventData::Identity(_) => PartitionName::Identity,
            EventData::Account(_) => PartitionName::Account,
            EventData::Sync(_) => PartitionName::Sync,
            EventData::Commit(c) => {
                if !is_path_safe_collection(&c.collection) {
                    return Err(Refused::Collection);
                }
                let own = PartitionKey::try_new(
                    PartitionName::Collection(c.collection.to_string()),
                    env.time_us,
                )?;
                if Lexicon::of(&c.collection).is_some()
                    || self.buffers.contains_key(&own)
                    || self.buffers.len() < self.policy.max_open_partitions
                {
                    return Ok(own);
                }
                PartitionName::Other
            }
        };
        Ok(PartitionKey::try_new(name, env.time_us)?)
    }

    fn buffer(&mut self, key: PartitionKey, now: Instant) -> &mut PartitionBuffer {
        let events_seen = self.events_seen;
        let late = self.policy.closed(&key, self.stream_time_us);
        self.buffers
            .entry(key.clone())
            .or_insert_with(|| PartitionBuffer {
                late,
                builder: RowBuilder::new(key.name.table_kind(), self.source),
                key,
                chunks: Vec::new(),
                rows: 0,
                bytes: 0,
                opened_at: now,
                first_cursor: None,
                last_cursor: None,
                first_event: events_seen,
                key_hash: 0,
            })
    }

    /// Buffers an event at `cursor`, in the partition of its `time_us` (the caller has checked
    /// that time against the [`TimeWindow`](crate::model::TimeWindow)).
    pub fn push_event(
        &mut self,
        env: &Envelope,
        cursor: Option<Cursor>,
        key: EventKey,
        now: Instant,
    ) -> Result<Accepted, Refused> {
        let pk = self.partition_for(env)?;
        let accepted = if pk.name == PartitionName::Other {
            Accepted::Other
        } else {
            Accepted::Own
        };
        self.events_seen += 1;
        self.note_time(env.time_us);
        let chunk_rows = self.policy.chunk_rows;
        let b = self.buffer(pk, now);
        let before = b.builder.bytes();
        b.builder.push_event(env);
        let added = b.builder.bytes() - before;
        b.rows += 1;
        b.bytes += added;
        b.note_cursor(cursor);
        b.key_hash = b.key_hash.wrapping_add(key.fold());
        let seal = (b.builder.len() >= chunk_rows).then(|| b.key.clone());
        self.total_bytes += added;
        if let Some(k) = seal {
            self.seal_one(&k)?;
        }
        Ok(accepted)
    }

    /// Buffers a quarantined input at `cursor` (when known) in the partition of
    /// `partition_time_us` (the input's own time when the window accepts it, else the time it
    /// was received).
    pub fn push_error(
        &mut self,
        err: &ErrorEvent,
        cursor: Option<Cursor>,
        partition_time_us: i64,
        now: Instant,
    ) -> Result<(), Refused> {
        let pk = PartitionKey::try_new(PartitionName::Errors, partition_time_us)?;
        self.note_time(partition_time_us);
        let source = self.source;
        let chunk_rows = self.policy.chunk_rows;
        let key = error_key(err, cursor);
        let b = self.buffer(pk, now);
        let before = b.builder.bytes();
        b.builder.push_error(err, source, cursor, partition_time_us);
        let added = b.builder.bytes() - before;
        b.rows += 1;
        b.bytes += added;
        b.note_cursor(cursor);
        b.key_hash = b.key_hash.wrapping_add(key.fold());
        let seal = (b.builder.len() >= chunk_rows).then(|| b.key.clone());
        self.total_bytes += added;
        if let Some(k) = seal {
            self.seal_one(&k)?;
        }
        Ok(())
    }

    fn seal_one(&mut self, key: &PartitionKey) -> Result<(), SealError> {
        let Some(b) = self.buffers.get_mut(key) else {
            return Ok(());
        };
        if b.builder.is_empty() {
            return Ok(());
        }
        let estimate = b.builder.bytes();
        let batch = b.builder.finish().map_err(|source| SealError {
            partition: key.to_string(),
            source,
        })?;
        // from here on the chunk's real size counts, not the estimate
        let real = batch.get_array_memory_size();
        b.bytes = b.bytes - estimate.min(b.bytes) + real;
        self.total_bytes = self.total_bytes - estimate.min(self.total_bytes) + real;
        self.sealed.push((key.clone(), batch.clone()));
        b.chunks.push(batch);
        Ok(())
    }

    /// Seals every partition's pending rows into chunks (for freshness of live queries).
    pub fn seal_all(&mut self) -> Result<(), SealError> {
        let keys: Vec<PartitionKey> = self
            .buffers
            .iter()
            .filter(|(_, b)| !b.builder.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.seal_one(&k)?;
        }
        Ok(())
    }

    /// Chunks sealed since the last call (to publish to live queries).
    pub fn take_sealed(&mut self) -> Vec<(PartitionKey, RecordBatch)> {
        std::mem::take(&mut self.sealed)
    }

    fn take_job(
        &mut self,
        key: &PartitionKey,
        reason: FlushReason,
    ) -> Result<Option<FlushJob>, SealError> {
        let Some(mut b) = self.buffers.remove(key) else {
            return Ok(None);
        };
        // the last rows go straight into the job, not to the list of chunks to publish
        if !b.builder.is_empty() {
            let batch = b.builder.finish().map_err(|source| SealError {
                partition: key.to_string(),
                source,
            })?;
            b.chunks.push(batch);
        }
        self.total_bytes = self.total_bytes.saturating_sub(b.bytes);
        let id = self.next_job;
        self.next_job += 1;
        Ok(Some(FlushJob {
            id,
            kind: b.key.name.table_kind(),
            key: b.key,
            chunks: b.chunks,
            rows: b.rows,
            bytes: b.bytes,
            first_cursor: b.first_cursor,
            last_cursor: b.last_cursor,
            key_hash: b.key_hash,
            reason,
        }))
    }

    fn take_jobs(
        &mut self,
        due: Vec<(PartitionKey, FlushReason)>,
    ) -> Result<Vec<FlushJob>, SealError> {
        let mut jobs = Vec::with_capacity(due.len());
        for (k, r) in due {
            jobs.extend(self.take_job(&k, r)?);
        }
        Ok(jobs)
    }

    /// Partitions that must flush now (by size after a push, or by any rule on a tick).
    pub fn due(&mut self, now: Instant) -> Result<Vec<FlushJob>, SealError> {
        let stream = self.stream_time_us;
        let seen = self.events_seen;
        let mut due: Vec<(PartitionKey, FlushReason)> = self
            .buffers
            .values()
            .filter_map(|b| {
                self.policy
                    .should_complete_file(b, now, stream, seen)
                    .map(|r| (b.key.clone(), r))
            })
            .collect();
        due.sort_by(|a, b| a.0.cmp(&b.0));
        let mut jobs = self.take_jobs(due)?;
        jobs.extend(self.over_cap(0)?);
        Ok(jobs)
    }

    /// The share of the memory cap buffered rows may use. The cap budgets the whole process:
    /// buffered rows get 1/4 of it and buffered plus in-flight rows 5/16; the rest covers what
    /// encoding holds (page buffers, a row group, the gathered slice), builder slack, the
    /// read-ahead, the code and the allocator. The shares were measured (README, "Memory"): with
    /// the default 256 MiB cap, ingesting the benchmark's capture files peaks at 135-147 MiB
    /// resident; a bigger buffer share makes fewer, larger files (1/8 of the cap made 2.4 times
    /// as many files, 3 % larger in all, since each repeats its `did` dictionary).
    pub fn buffer_budget(&self) -> usize {
        self.policy.memory_cap / 4
    }

    /// Buffered plus in-flight rows may use this much before reading pauses.
    pub fn data_budget(&self) -> usize {
        self.policy.memory_cap / 16 * 5
    }

    /// Flushes the largest partitions until the buffers fit their share of the memory cap
    /// (`inflight_bytes` further lowers it while flushes are pending, never below a sixteenth).
    pub fn over_cap(&mut self, inflight_bytes: usize) -> Result<Vec<FlushJob>, SealError> {
        let mut jobs = Vec::new();
        let budget = self.buffer_budget().min(
            self.data_budget()
                .saturating_sub(inflight_bytes)
                .max(self.policy.memory_cap / 16),
        );
        while self.total_bytes > budget {
            let Some(largest) = self
                .buffers
                .values()
                .max_by_key(|b| b.bytes)
                .map(|b| b.key.clone())
            else {
                break;
            };
            match self.take_job(&largest, FlushReason::MemoryCap)? {
                Some(j) => jobs.push(j),
                None => break,
            }
        }
        Ok(jobs)
    }

    /// Every buffered partition, for shutdown or the end of a file.
    pub fn drain(&mut self) -> Result<Vec<FlushJob>, SealError> {
        let mut keys: Vec<PartitionKey> = self.buffers.keys().cloned().collect();
        keys.sort();
        self.take_jobs(keys.into_iter().map(|k| (k, FlushReason::Drain)).collect())
    }

    /// Partitions that reached their size limits (checked after each push).
    pub fn size_due(&mut self) -> Result<Vec<FlushJob>, SealError> {
        let due: Vec<(PartitionKey, FlushReason)> = self
            .buffers
            .values()
            .filter_map(|b| {
                if b.rows >= self.policy.max_rows {
                    Some((b.key.clone(), FlushReason::Rows))
                } else if b.bytes >= self.policy.max_bytes {
                    Some((b.key.clone(), FlushReason::Bytes))
                } else {
                    None
                }
            })
            .collect();
        let mut jobs = self.take_jobs(due)?;
        jobs.extend(self.over_cap(0)?);
        Ok(jobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::key::event_key;
    use crate::model::{CommitOp, Did, Event, Nsid, Operation, Rkey, Tid};
    use crate::sink::partition::HOUR_US;

    fn policy() -> FlushPolicy {
        FlushPolicy {
            max_rows: 100,
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(60),
            memory_cap: 1 << 30,
            max_open_partitions: 20,
            hour_close_grace_us: 5_000_000,
            max_checkpoint_lag: 1_000_000,
            chunk_rows: 16,
        }
    }

    fn ev(collection: &str, time_us: i64, i: usize) -> Envelope {
        Envelope {
            event: Event {
                did: Did::parse(format!("did:plc:{i:024}")).unwrap(),
                data: EventData::Commit(CommitOp {
                    rev: Tid::parse("3mmoojp7vgo2g").unwrap(),
                    operation: Operation::Create,
                    collection: Nsid::parse(collection).unwrap(),
                    rkey: Rkey::parse(format!("k{i}")).unwrap(),
                    cid: Some("bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq".into()),
                    record: Some(r#"{"$type":"x","createdAt":"2026-07-04T14:38:07.000Z","subject":"did:plc:x"}"#.into()),
                }),
            },
            time_us,
            claimed_time_us: None,
            seq: Some(i as i64),
            chain: None,
        }
    }

    fn push(b: &mut Batcher, e: &Envelope, cursor: i64, now: Instant) -> Option<Accepted> {
        b.push_event(e, Some(Cursor::seq(cursor).unwrap()), event_key(e), now)
            .ok()
    }

    const T0: i64 = 1_783_173_600_000_000; // an hour boundary

    #[test]
    fn flushes_when_max_rows_reached() {
        let mut b = Batcher::new(policy(), SourceKind::Firehose);
        let now = Instant::now();
        for i in 0..99 {
            push(
                &mut b,
                &ev("app.bsky.graph.follow", T0 + i as i64, i),
                i as i64,
                now,
            );
        }
        assert!(b.size_due().unwrap().is_empty());
        push(&mut b, &ev("app.bsky.graph.follow", T0 + 99, 99), 99, now);
        let jobs = b.size_due().unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!((jobs[0].rows, jobs[0].reason), (100, FlushReason::Rows));
        assert_eq!(
            jobs[0].chunks.iter().map(|c| c.num_rows()).sum::<usize>(),
            100
        );
        assert_eq!(
            (jobs[0].first_cursor, jobs[0].last_cursor),
            (Cursor::seq(0).ok(), Cursor::seq(99).ok())
        );
        assert_eq!(b.buffered_rows(), 0);
    }

    /// Rows below a chunk's size are sealed on demand, so live queries see them; nothing is
    /// sealed twice and the rows stay buffered until their flush.
    #[test]
    fn seal_all_publishes_pending_rows_once() {
        let mut b = Batcher::new(policy(), SourceKind::Firehose);
        let now = Instant::now();
        for i in 0..5 {
            push(
                &mut b,
                &ev("app.bsky.feed.like", T0 + i as i64, i),
                i as i64,
                now,
            );
        }
        push(&mut b, &ev("app.bsky.graph.follow", T0, 9), 9, now);
        assert!(
            b.take_sealed().is_empty(),
            "below chunk_rows nothing is sealed yet"
        );
        b.seal_all().unwrap();
        let mut sealed: Vec<(String, usize)> = b
            .take_sealed()
            .iter()
            .map(|(k, c)| (k.to_string(), c.num_rows()))
            .collect();
        sealed.sort();
        assert_eq!(sealed.len(), 2, "{sealed:?}");
        assert_eq!(sealed.iter().map(|(_, n)| n).sum::<usize>(), 6);
        b.seal_all().unwrap();
        assert!(
            b.take_sealed().is_empty(),
            "sealed rows are not published twice"
        );
        assert_eq!(b.buffered_rows(), 6);
    }

    #[test]
    fn flushes_when_max_age_elapses() {
        let mut b = Batcher::new(policy(), SourceKind::Firehose);
        let t = Instant::now();
        push(&mut b, &ev("app.bsky.feed.like", T0, 1), 1, t);
        assert!(b.due(t + Duration::from_secs(59)).unwrap().is_empty());
        let jobs = b.due(t + Duration::from_secs(60)).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].reason, FlushReason::Age);
    }

    #[test]
    fn flushes_an_hour_once_the_stream_is_past_it() {
        let mut b = Batcher::new(policy(), SourceKind::Firehose);
        let t = Instant::now();
        push(&mut b, &ev("app.bsky.feed.like", T0 + 10, 1), 1, t);
        // next hour, but inside the grace
        push(
            &mut b,
            &ev("app.bsky.feed.like", T0 + HOUR_US + 1_000_000, 2),
            2,
            t,
        );
        assert!(b.due(t).unwrap().is_empty());
        push(
            &mut b,
            &ev("app.bsky.feed.like", T0 + HOUR_US + 6_000_000, 3),
            3,
            t,
        );
        let jobs = b.due(t).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].reason, FlushReason::HourClosed);
        assert_eq!(jobs[0].key.hour(), T0 / HOUR_US);
        assert_eq!(b.min_buffered_cursor(), Cursor::seq(2).ok());
    }

    /// Rows that keep coming for an hour the stream has closed go to a late buffer, which
    /// flushes by age (and size), not at every check: a file per check was the storm.
    #[test]
    fn late_rows_of_a_closed_hour_flush_by_age_not_at_every_check() {
        let mut b = Batcher::new(policy(), SourceKind::Firehose);
        let t = Instant::now();
        push(&mut b, &ev("app.bsky.feed.like", T0 + 10, 1), 1, t);
        push(
            &mut b,
            &ev("app.bsky.feed.like", T0 + HOUR_US + 6_000_000, 2),
            2,
            t,
        );
        // the buffer opened before the close flushes once, at the close
        let jobs = b.due(t).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].reason, FlushReason::HourClosed);
        // rows for the closed hour keep coming: they wait for the buffer's age
        for i in 3..10 {
            push(
                &mut b,
                &ev("app.bsky.feed.like", T0 + 20 + i, i as usize),
                i,
                t,
            );
            assert!(
                b.due(t + Duration::from_secs(1)).unwrap().is_empty(),
                "late row {i} flushed at once"
            );
        }
        assert!(b.due(t + Duration::from_secs(59)).unwrap().is_empty());
        let jobs = b.due(t + Duration::from_secs(60)).unwrap();
        assert_eq!(jobs.len(), 2, "{jobs:?}");
        assert!(
            jobs.iter().all(|j| j.reason == FlushReason::Age),
            "{jobs:?}"
        );
        let late = jobs.iter().find(|j| j.key.hour() == T0 / HOUR_US).unwrap();
        assert_eq!(late.rows, 7);
        // a buffer of a closed hour opened again later is late too
        let later = t + Duration::from_secs(61);
        push(&mut b, &ev("app.bsky.feed.like", T0 + 30, 11), 11, later);
        assert!(b.due(later + Duration::from_secs(1)).unwrap().is_empty());
    }

    /// Buffers exactly at their budget are within it: only going over flushes.
    #[test]
    fn buffers_at_exactly_the_budget_stay() {
        let t = Instant::now();
        let fill = |b: &mut Batcher| {
            for i in 0..40 {
                push(b, &ev("app.bsky.feed.like", T0, i), i as i64, t);
            }
        };
        let mut probe = Batcher::new(policy(), SourceKind::Firehose);
        fill(&mut probe);
        let size = probe.buffered_bytes();
        let mut p = policy();
        p.memory_cap = size * 4;
        let mut b = Batcher::new(p, SourceKind::Firehose);
        fill(&mut b);
        assert_eq!((b.buffered_bytes(), b.buffer_budget()), (size, size));
        assert!(b.over_cap(0).unwrap().is_empty());
        push(&mut b, &ev("app.bsky.feed.like", T0, 99), 99, t);
        assert_eq!(b.over_cap(0).unwrap().len(), 1);
    }

    #[test]
    fn memory_cap_flushes_the_largest_first() {
        let mut p = policy();
        p.memory_cap = 50_000;
        let mut b = Batcher::new(p, SourceKind::Firehose);
        let t = Instant::now();
        for i in 0..3 {
            push(&mut b, &ev("app.bsky.feed.post", T0, i), i as i64, t);
        }
        let mut i = 10;
        // buffers get a quarter of the cap
        while b.buffered_bytes() <= 12_500 {
            push(&mut b, &ev("app.bsky.feed.like", T0, i), i as i64, t);
            i += 1;
        }
        let jobs = b.size_due().unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].reason, FlushReason::MemoryCap);
        assert_eq!(
            jobs[0].key.name,
            PartitionName::Collection("app.bsky.feed.like".into())
        );
        assert!(b.buffered_bytes() <= 12_500);
        // with flushes in flight the buffers get less (never below a sixteenth)
        for j in 0..15 {
            push(
                &mut b,
                &ev("app.bsky.feed.repost", T0, 1000 + j),
                1000 + j as i64,
                t,
            );
        }
        let before = b.buffered_bytes();
        let jobs = b.over_cap(14_000).unwrap();
        assert!(before > 3_125 && !jobs.is_empty(), "{before}");
        assert!(b.buffered_bytes() <= 3_125);
    }

    #[test]
    fn long_tail_shares_other_but_core_collections_never_do() {
        let mut b = Batcher::new(policy(), SourceKind::Firehose);
        let t = Instant::now();
        for i in 0..25 {
            let a = push(
                &mut b,
                &ev(&format!("com.example{i}.app.thing"), T0, i),
                i as i64,
                t,
            );
            assert_eq!(
                a,
                if i < 20 {
                    Some(Accepted::Own)
                } else {
                    Some(Accepted::Other)
                },
                "{i}"
            );
        }
        assert_eq!(b.open_partitions(), 21);
        assert_eq!(
            push(&mut b, &ev("app.bsky.feed.post", T0, 99), 99, t),
            Some(Accepted::Own)
        );
        assert_eq!(
            push(&mut b, &ev("app.bsky.graph.follow", T0, 98), 98, t),
            Some(Accepted::Own)
        );
        // an already open one keeps its partition
        assert_eq!(
            push(&mut b, &ev("com.example3.app.thing", T0, 97), 97, t),
            Some(Accepted::Own)
        );
        // a name that cannot be a path goes to the quarantine
        assert_eq!(push(&mut b, &ev("Com.Example.thing", T0, 96), 96, t), None);
        let jobs = b.drain().unwrap();
        let other = jobs
            .iter()
            .find(|j| j.key.name == PartitionName::Other)
            .unwrap();
        assert_eq!(other.rows, 5);
        // the real collection is kept in the rows of _other
        let col = other.chunks[0].column_by_name("collection").unwrap();
        let col = col
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        assert_eq!(col.value(0), "com.example20.app.thing");
    }

    #[test]
    fn checkpoint_lag_bounds_replay() {
        let mut p = policy();
        p.max_checkpoint_lag = 10;
        p.max_rows = 1000;
        let mut b = Batcher::new(p, SourceKind::Firehose);
        let t = Instant::now();
        push(&mut b, &ev("com.rare.app.thing", T0, 0), 0, t);
        for i in 1..=11 {
            push(&mut b, &ev("app.bsky.feed.like", T0, i), i as i64, t);
        }
        let jobs = b.due(t).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].reason, FlushReason::CheckpointLag);
        assert_eq!(b.min_buffered_cursor(), Cursor::seq(1).ok());
    }

    /// One step of the property test: a push, or time moving on and the batcher asked what is
    /// due.
    #[derive(Debug, Clone)]
    enum Step {
        /// An event of collection number `coll` at stream time `+dt` µs from the last.
        Push { coll: usize, dt: i64 },
        /// The clock moves on `ms` and the tick asks for due flushes.
        Tick { ms: u64 },
        /// The check after a push: size limits and the memory cap.
        Sizes,
    }

    const COLLS: [&str; 6] = [
        "app.bsky.feed.like",
        "app.bsky.feed.post",
        "com.example.one.thing",
        "com.example.two.thing",
        "com.example.three.thing",
        "com.example.four.thing",
    ];

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0..COLLS.len(), -5_000_000i64..20 * 60 * 1_000_000)
                .prop_map(|(coll, dt)| Step::Push { coll, dt }),
            2 => (0u64..90_000).prop_map(|ms| Step::Tick { ms }),
            1 => Just(Step::Sizes),
        ]
    }

    /// Every row of `jobs`: (cursor, time_us, collection), and each job checked on its own.
    fn check_jobs(jobs: &[FlushJob], out: &mut Vec<(i64, i64, String)>) {
        use arrow::array::AsArray;
        for j in jobs {
            let mut rows = Vec::new();
            for c in &j.chunks {
                let seq = c
                    .column_by_name("seq")
                    .unwrap()
                    .as_primitive::<arrow::datatypes::Int64Type>();
                let t = c
                    .column_by_name("time_us")
                    .unwrap()
                    .as_primitive::<arrow::datatypes::Int64Type>();
                let coll = c.column_by_name("collection").unwrap().as_string::<i32>();
                for i in 0..c.num_rows() {
                    rows.push((seq.value(i), t.value(i), coll.value(i).to_string()));
                }
            }
            assert_eq!(rows.len(), j.rows, "a job's row count is its rows");
            for (_, t, coll) in &rows {
                assert!(
                    (j.key.start_us()..j.key.end_us()).contains(t),
                    "a row's time lies in its partition's hour"
                );
                match &j.key.name {
                    PartitionName::Collection(c) => assert_eq!(c, coll),
                    PartitionName::Other => assert!(Lexicon::of(coll).is_none()),
                    other => panic!("unexpected partition {other:?}"),
                }
            }
            let first = rows.iter().map(|r| r.0).min();
            let last = rows.iter().map(|r| r.0).max();
            assert_eq!(j.first_cursor.map(|c| c.value()), first);
            assert_eq!(j.last_cursor.map(|c| c.value()), last);
            out.extend(rows);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever the order of pushes and ticks, and however the clock and stream time move:
        /// every row leaves the batcher exactly once, in a job of its own partition and hour,
        /// with the job's cursor range right; after a tick nothing due is left behind; the
        /// lowest buffered cursor is the lowest cursor not yet flushed.
        #[test]
        fn every_row_is_flushed_once_in_its_partition(
            steps in proptest::collection::vec(step(), 1..120),
            max_rows in 3usize..40,
            open in 2usize..5,
        ) {
            let mut policy = policy();
            policy.max_rows = max_rows;
            policy.max_age = Duration::from_secs(30);
            policy.max_open_partitions = open;
            policy.memory_cap = 400_000;
            policy.max_checkpoint_lag = 50;
            let mut b = Batcher::new(policy, SourceKind::Firehose);
            let start = Instant::now();
            let (mut now, mut time, mut cursor) = (start, T0, 0i64);
            let mut pending: std::collections::BTreeMap<i64, ()> = Default::default();
            let mut flushed = Vec::new();
            for s in steps {
                let jobs = match s {
                    Step::Push { coll, dt } => {
                        time = (time + dt).max(T0);
                        cursor += 1;
                        let mut e = ev(COLLS[coll], time, cursor as usize);
                        e.seq = Some(cursor);
                        push(&mut b, &e, cursor, now).expect("a valid event is taken");
                        pending.insert(cursor, ());
                        Vec::new()
                    }
                    Step::Tick { ms } => {
                        now += Duration::from_millis(ms);
                        let jobs = b.due(now).unwrap();
                        // nothing due stays behind
                        proptest::prop_assert!(b.due(now).unwrap().is_empty());
                        jobs
                    }
                    Step::Sizes => b.size_due().unwrap(),
                };
                let before = flushed.len();
                check_jobs(&jobs, &mut flushed);
                for (c, _, _) in &flushed[before..] {
                    proptest::prop_assert!(pending.remove(c).is_some(), "row {c} flushed twice");
                }
                proptest::prop_assert_eq!(b.buffered_rows(), pending.len());
                proptest::prop_assert_eq!(
                    b.min_buffered_cursor().map(|c| c.value()),
                    pending.keys().next().copied()
                );
            }
            let rest = b.drain().unwrap();
            check_jobs(&rest, &mut flushed);
            proptest::prop_assert_eq!(b.buffered_rows(), 0);
            proptest::prop_assert_eq!(b.buffered_bytes(), 0);
            let mut all: Vec<i64> = flushed.iter().map(|r| r.0).collect();
            all.sort_unstable();
            let n = all.len();
            all.dedup();
            proptest::prop_assert_eq!(all.len(), n, "a row flushed twice");
            proptest::prop_assert_eq!(n as i64, cursor, "every row flushed");
        }
    }
}
