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

use super::partition::{HOUR_US, PartitionKey, PartitionName, is_path_safe_collection};
use crate::config::FlushConfig;
use crate::model::lexicon::Lexicon;
use crate::model::rows::{RowBuilder, TableKind};
use crate::model::{Envelope, ErrorEvent, EventData, SourceKind};
use arrow::record_batch::RecordBatch;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
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

    /// Whether a partition must flush now, and why.
    pub fn should_complete_file(
        &self,
        p: &PartitionBuffer,
        now: Instant,
        stream_time_us: i64,
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
        if stream_time_us >= (p.key.hour + 1) * HOUR_US + self.hour_close_grace_us {
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
    /// Lowest cursor buffered.
    pub first_cursor: i64,
    /// Highest cursor buffered.
    pub last_cursor: i64,
    /// Event counter at the first row.
    pub first_event: u64,
    /// Order-independent hash of the rows' keys.
    pub key_hash: u64,
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
    pub first_cursor: Option<i64>,
    /// Highest cursor.
    pub last_cursor: Option<i64>,
    /// Hash of the rows' keys (for the file name).
    pub key_hash: u64,
    /// Why.
    pub reason: FlushReason,
}

/// What happened to an event handed to the batcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Buffered in its own partition.
    Own,
    /// Buffered in `_other` (open-partition cap reached).
    Other,
    /// Its collection cannot name a partition; it went to the quarantine instead.
    Quarantined,
}

/// The set of partition buffers.
#[derive(Debug)]
pub struct Batcher {
    /// The policy in force.
    pub policy: FlushPolicy,
    source: SourceKind,
    buffers: HashMap<PartitionKey, PartitionBuffer>,
    total_bytes: usize,
    events_seen: u64,
    stream_time_us: i64,
    next_job: u64,
    sealed: Vec<(PartitionKey, RecordBatch)>,
}

/// The identifying fields of an event, as stored in its row.
#[derive(Debug, Clone, Copy)]
pub struct KeyParts<'a> {
    /// `commit`, `identity`, `account`, `sync`.
    pub kind: &'a str,
    /// Account DID.
    pub did: &'a str,
    /// Collection (commits).
    pub collection: &'a str,
    /// Record key (commits).
    pub rkey: &'a str,
    /// Revision (commits, sync).
    pub rev: &'a str,
    /// Operation (commits).
    pub operation: &'a str,
    /// Relay seq of the body (identity, account).
    pub event_seq: i64,
}

/// A 128-bit key of an event for deduplication: (kind, did, collection, rkey, rev, operation)
/// for commits, (kind, did, seq) for identity/account, (kind, did, rev) for sync. Computed the
/// same way from an event and from its stored row.
pub fn key_of(p: KeyParts<'_>) -> u128 {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    let mut b = std::collections::hash_map::DefaultHasher::new();
    0xA7u8.hash(&mut b);
    for h in [&mut a, &mut b] {
        p.kind.hash(h);
        p.did.hash(h);
        p.collection.hash(h);
        p.rkey.hash(h);
        p.rev.hash(h);
        p.operation.hash(h);
        p.event_seq.hash(h);
    }
    (u128::from(a.finish()) << 64) | u128::from(b.finish())
}

/// The dedupe key of an event (see [`key_of`]).
pub fn event_key(env: &Envelope) -> u128 {
    let e = &env.event;
    let mut p = KeyParts {
        kind: e.kind().as_str(),
        did: &e.did,
        collection: "",
        rkey: "",
        rev: "",
        operation: "",
        event_seq: 0,
    };
    match &e.data {
        EventData::Commit(c) => {
            p.collection = &c.collection;
            p.rkey = &c.rkey;
            p.rev = &c.rev;
            p.operation = c.operation.as_str();
        }
        EventData::Identity(i) => p.event_seq = i.seq,
        EventData::Account(x) => p.event_seq = x.seq,
        EventData::Sync(s) => p.rev = &s.rev,
    }
    key_of(p)
}

/// The dedupe key of a quarantined input: its reason, bytes, path and cursor.
pub fn error_key(err: &ErrorEvent, cursor: Option<i64>) -> u128 {
    error_key_of(
        err.reason.as_str(),
        &err.raw[..err.raw.len().min(crate::model::rows::MAX_QUARANTINE_RAW)],
        err.path.as_deref(),
        cursor,
    )
}

/// [`error_key`] from stored fields.
pub fn error_key_of(reason: &str, raw: &[u8], path: Option<&str>, cursor: Option<i64>) -> u128 {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    let mut b = std::collections::hash_map::DefaultHasher::new();
    0x5Au8.hash(&mut b);
    for h in [&mut a, &mut b] {
        reason.hash(h);
        raw.hash(h);
        path.map(|p| crate::model::rows::truncate_str(p, 4096))
            .hash(h);
        cursor.hash(h);
    }
    (u128::from(a.finish()) << 64) | u128::from(b.finish())
}

impl Batcher {
    /// An empty batcher.
    pub fn new(policy: FlushPolicy, source: SourceKind) -> Self {
        Batcher {
            policy,
            source,
            buffers: HashMap::new(),
            total_bytes: 0,
            events_seen: 0,
            stream_time_us: i64::MIN,
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
    pub fn min_buffered_cursor(&self) -> Option<i64> {
        self.buffers
            .values()
            .map(|b| b.first_cursor)
            .filter(|&c| c != i64::MAX)
            .min()
    }

    /// Latest stream time seen.
    pub fn stream_time_us(&self) -> i64 {
        self.stream_time_us
    }

    fn partition_for(&self, env: &Envelope) -> Result<PartitionName, ()> {
        Ok(match &env.event.data {
            EventData::Identity(_) => PartitionName::Identity,
            EventData::Account(_) => PartitionName::Account,
            EventData::Sync(_) => PartitionName::Sync,
            EventData::Commit(c) => {
                if !is_path_safe_collection(&c.collection) {
                    return Err(());
                }
                let name = PartitionName::Collection(c.collection.clone());
                let key = PartitionKey::new(name.clone(), env.time_us);
                if Lexicon::of(&c.collection).is_some()
                    || self.buffers.contains_key(&key)
                    || self.buffers.len() < self.policy.max_open_partitions
                {
                    name
                } else {
                    PartitionName::Other
                }
            }
        })
    }

    fn buffer(&mut self, key: PartitionKey, now: Instant) -> &mut PartitionBuffer {
        let events_seen = self.events_seen;
        self.buffers
            .entry(key.clone())
            .or_insert_with(|| PartitionBuffer {
                builder: RowBuilder::new(key.name.table_kind()),
                key,
                chunks: Vec::new(),
                rows: 0,
                bytes: 0,
                opened_at: now,
                first_cursor: i64::MAX,
                last_cursor: i64::MIN,
                first_event: events_seen,
                key_hash: 0,
            })
    }

    /// Buffers an event at `cursor`. Events whose collection cannot name a partition are
    /// quarantined (returned as [`Accepted::Quarantined`]; the caller builds the error row).
    pub fn push_event(&mut self, env: &Envelope, cursor: i64, key: u128, now: Instant) -> Accepted {
        let name = match self.partition_for(env) {
            Ok(n) => n,
            Err(()) => return Accepted::Quarantined,
        };
        let other = name == PartitionName::Other;
        self.events_seen += 1;
        self.stream_time_us = self.stream_time_us.max(env.time_us);
        let pk = PartitionKey::new(name, env.time_us);
        let chunk_rows = self.policy.chunk_rows;
        let b = self.buffer(pk, now);
        let before = b.builder.bytes();
        b.builder.push_event(env);
        let added = b.builder.bytes() - before;
        b.rows += 1;
        b.bytes += added;
        b.first_cursor = b.first_cursor.min(cursor);
        b.last_cursor = b.last_cursor.max(cursor);
        b.key_hash = b.key_hash.wrapping_add(key as u64 ^ (key >> 64) as u64);
        let seal = (b.builder.len() >= chunk_rows).then(|| b.key.clone());
        self.total_bytes += added;
        if let Some(k) = seal {
            self.seal_one(&k);
        }
        if other {
            Accepted::Other
        } else {
            Accepted::Own
        }
    }

    /// Buffers a quarantined input at `cursor` (when known).
    pub fn push_error(&mut self, err: &ErrorEvent, cursor: Option<i64>, now_us: i64, now: Instant) {
        let time_us = err.time_us.unwrap_or(now_us);
        self.stream_time_us = self.stream_time_us.max(time_us.min(now_us));
        let pk = PartitionKey::new(PartitionName::Errors, time_us);
        let source = self.source;
        let chunk_rows = self.policy.chunk_rows;
        let key = error_key(err, cursor);
        let b = self.buffer(pk, now);
        let before = b.builder.bytes();
        b.builder.push_error(err, source, cursor, time_us);
        let added = b.builder.bytes() - before;
        b.rows += 1;
        b.bytes += added;
        if let Some(c) = cursor {
            b.first_cursor = b.first_cursor.min(c);
            b.last_cursor = b.last_cursor.max(c);
        }
        b.key_hash = b.key_hash.wrapping_add(key as u64 ^ (key >> 64) as u64);
        let seal = (b.builder.len() >= chunk_rows).then(|| b.key.clone());
        self.total_bytes += added;
        if let Some(k) = seal {
            self.seal_one(&k);
        }
    }

    fn seal_one(&mut self, key: &PartitionKey) {
        if let Some(b) = self.buffers.get_mut(key) {
            if b.builder.is_empty() {
                return;
            }
            let estimate = b.builder.bytes();
            match b.builder.finish() {
                Ok(batch) => {
                    // from here on the chunk's real size counts, not the estimate
                    let real = batch.get_array_memory_size();
                    b.bytes = b.bytes - estimate.min(b.bytes) + real;
                    self.total_bytes = self.total_bytes - estimate.min(self.total_bytes) + real;
                    self.sealed.push((key.clone(), batch.clone()));
                    b.chunks.push(batch);
                }
                Err(e) => tracing::error!(partition = %key, error = %e, "sealing rows failed"),
            }
        }
    }

    /// Seals every partition's pending rows into chunks (for freshness of live queries).
    pub fn seal_all(&mut self) {
        let keys: Vec<PartitionKey> = self
            .buffers
            .iter()
            .filter(|(_, b)| !b.builder.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.seal_one(&k);
        }
    }

    /// Chunks sealed since the last call (to publish to live queries).
    pub fn take_sealed(&mut self) -> Vec<(PartitionKey, RecordBatch)> {
        std::mem::take(&mut self.sealed)
    }

    fn take_job(&mut self, key: &PartitionKey, reason: FlushReason) -> Option<FlushJob> {
        let mut b = self.buffers.remove(key)?;
        // the last rows go straight into the job, not to the list of chunks to publish
        if !b.builder.is_empty() {
            match b.builder.finish() {
                Ok(batch) => b.chunks.push(batch),
                Err(e) => tracing::error!(partition = %key, error = %e, "sealing rows failed"),
            }
        }
        self.total_bytes = self.total_bytes.saturating_sub(b.bytes);
        let id = self.next_job;
        self.next_job += 1;
        Some(FlushJob {
            id,
            kind: b.key.name.table_kind(),
            key: b.key,
            chunks: b.chunks,
            rows: b.rows,
            bytes: b.bytes,
            first_cursor: (b.first_cursor != i64::MAX).then_some(b.first_cursor),
            last_cursor: (b.last_cursor != i64::MIN).then_some(b.last_cursor),
            key_hash: b.key_hash,
            reason,
        })
    }

    /// Partitions that must flush now (by size after a push, or by any rule on a tick).
    pub fn due(&mut self, now: Instant) -> Vec<FlushJob> {
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
        let mut jobs: Vec<FlushJob> = due
            .into_iter()
            .filter_map(|(k, r)| self.take_job(&k, r))
            .collect();
        jobs.extend(self.over_cap(0));
        jobs
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
    pub fn over_cap(&mut self, inflight_bytes: usize) -> Vec<FlushJob> {
        let mut jobs = Vec::new();
        let budget = self.buffer_budget().min(
            self.data_budget()
                .saturating_sub(inflight_bytes)
                .max(self.policy.memory_cap / 16),
        );
        while self.total_bytes > budget && !self.buffers.is_empty() {
            let Some(largest) = self
                .buffers
                .values()
                .max_by_key(|b| b.bytes)
                .map(|b| b.key.clone())
            else {
                break;
            };
            match self.take_job(&largest, FlushReason::MemoryCap) {
                Some(j) => jobs.push(j),
                None => break,
            }
        }
        jobs
    }

    /// Every buffered partition, for shutdown or the end of a file.
    pub fn drain(&mut self) -> Vec<FlushJob> {
        let mut keys: Vec<PartitionKey> = self.buffers.keys().cloned().collect();
        keys.sort();
        keys.iter()
            .filter_map(|k| self.take_job(k, FlushReason::Drain))
            .collect()
    }

    /// Whether a partition has reached its size limits (checked after each push).
    pub fn size_due(&mut self) -> Vec<FlushJob> {
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
        let mut jobs: Vec<FlushJob> = due
            .into_iter()
            .filter_map(|(k, r)| self.take_job(&k, r))
            .collect();
        jobs.extend(self.over_cap(0));
        jobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CommitOp, Event, Operation};

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
                did: format!("did:plc:{i:024}"),
                data: EventData::Commit(CommitOp {
                    rev: "3mmoojp7vgo2g".into(),
                    operation: Operation::Create,
                    collection: collection.into(),
                    rkey: format!("k{i}"),
                    cid: Some("bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq".into()),
                    record: Some(r#"{"$type":"x","createdAt":"2026-07-04T14:38:07.000Z","subject":"did:plc:x"}"#.into()),
                }),
            },
            time_us,
            seq: Some(i as i64),
            since: None,
        }
    }

    fn push(b: &mut Batcher, e: &Envelope, cursor: i64, now: Instant) -> Accepted {
        b.push_event(e, cursor, event_key(e), now)
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
        assert!(b.size_due().is_empty());
        push(&mut b, &ev("app.bsky.graph.follow", T0 + 99, 99), 99, now);
        let jobs = b.size_due();
        assert_eq!(jobs.len(), 1);
        assert_eq!((jobs[0].rows, jobs[0].reason), (100, FlushReason::Rows));
        assert_eq!(
            jobs[0].chunks.iter().map(|c| c.num_rows()).sum::<usize>(),
            100
        );
        assert_eq!(
            (jobs[0].first_cursor, jobs[0].last_cursor),
            (Some(0), Some(99))
        );
        assert_eq!(b.buffered_rows(), 0);
    }

    #[test]
    fn flushes_when_max_age_elapses() {
        let mut b = Batcher::new(policy(), SourceKind::Firehose);
        let t = Instant::now();
        push(&mut b, &ev("app.bsky.feed.like", T0, 1), 1, t);
        assert!(b.due(t + Duration::from_secs(59)).is_empty());
        let jobs = b.due(t + Duration::from_secs(60));
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
        assert!(b.due(t).is_empty());
        push(
            &mut b,
            &ev("app.bsky.feed.like", T0 + HOUR_US + 6_000_000, 3),
            3,
            t,
        );
        let jobs = b.due(t);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].reason, FlushReason::HourClosed);
        assert_eq!(jobs[0].key.hour, T0 / HOUR_US);
        assert_eq!(b.min_buffered_cursor(), Some(2));
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
        let jobs = b.size_due();
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
        let jobs = b.over_cap(14_000);
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
                    Accepted::Own
                } else {
                    Accepted::Other
                },
                "{i}"
            );
        }
        assert_eq!(b.open_partitions(), 21);
        assert_eq!(
            push(&mut b, &ev("app.bsky.feed.post", T0, 99), 99, t),
            Accepted::Own
        );
        assert_eq!(
            push(&mut b, &ev("app.bsky.graph.follow", T0, 98), 98, t),
            Accepted::Own
        );
        // an already open one keeps its partition
        assert_eq!(
            push(&mut b, &ev("com.example3.app.thing", T0, 97), 97, t),
            Accepted::Own
        );
        // a name that cannot be a path goes to the quarantine
        assert_eq!(
            push(&mut b, &ev("Com.Example.thing", T0, 96), 96, t),
            Accepted::Quarantined
        );
        let jobs = b.drain();
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
        let jobs = b.due(t);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].reason, FlushReason::CheckpointLag);
        assert_eq!(b.min_buffered_cursor(), Some(1));
    }
}
