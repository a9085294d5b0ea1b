//! One repository: resolve its PDS, stream `getRepo` into a bounded block store, walk the MST,
//! and send its records to the batch loop in chunks.

use super::{Msg, Rows, Stats};
use crate::decode::cbor::JsonWriter;
use crate::decode::cid::Cid;
use crate::decode::repo::{RepoError, created_at, record_time_us, walk_records};
use crate::model::{ErrorEvent, ErrorReason};
use crate::source::repo_blocks::RepoBlocks;
use crate::source::sync::{SyncClient, SyncError};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

/// Records sent to the batch loop at once.
const CHUNK_ROWS: usize = 512;
/// Record JSON bytes sent at once.
const CHUNK_BYTES: usize = 512 << 10;
/// Largest record block (as on the firehose).
const MAX_RECORD: usize = 1_000_000;

/// A repo to fetch.
#[derive(Debug, Clone)]
pub struct RepoJob {
    /// The account.
    pub did: String,
    /// Resume after this key (records up to it are already in the lake).
    pub after: Option<String>,
    /// A fresh fetch after a gap in the repo's live history: its snapshot replaces the repo.
    pub reset: bool,
}

/// What a fetch needs.
#[derive(Debug, Clone)]
pub struct FetchContext {
    /// The sync client (shared limits and DID cache).
    pub client: SyncClient,
    /// Blocks of one repo kept in memory.
    pub repo_memory: usize,
    /// Largest repo.
    pub max_repo_size: u64,
    /// Where big repos spill.
    pub spill_dir: PathBuf,
    /// Only these collections (empty: all).
    pub collections: Arc<Vec<String>>,
    /// Counters.
    pub stats: Arc<Stats>,
}

/// The quarantine reason of a repo that cannot be read, if it is bad data (not a network
/// failure or an XRPC refusal).
fn quarantine_reason(reason: &str) -> Option<ErrorReason> {
    Some(match reason {
        "hash_mismatch" => ErrorReason::HashMismatch,
        "truncated" => ErrorReason::Truncated,
        "block_too_large" => ErrorReason::Oversized,
        "car" => ErrorReason::Car,
        "missing_block" => ErrorReason::MissingBlock,
        "commit" => ErrorReason::Commit,
        "did_mismatch" => ErrorReason::DidMismatch,
        "mst" => ErrorReason::Mst,
        _ => return None,
    })
}

fn failed(job: &RepoJob, reason: String, detail: String) -> Msg {
    let did = job.did.as_str();
    let quarantine = quarantine_reason(&reason).map(|r| {
        let mut e = ErrorEvent::new(r, detail.clone(), &[]);
        e.did = Some(did.to_string());
        e
    });
    Msg::Failed {
        did: did.to_string(),
        reason,
        detail,
        quarantine,
        reset: job.reset,
    }
}

/// Fetches and walks one repo, sending its rows and then `Done` or `Failed` to `tx`.
pub async fn fetch_one(ctx: FetchContext, job: RepoJob, tx: mpsc::Sender<Msg>) {
    ctx.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    ctx.stats.queued.fetch_sub(1, Ordering::Relaxed);
    let msg = fetch_inner(&ctx, &job, &tx).await;
    // a closed channel means the batch loop ended (a stop or a failure of the run): the repo
    // was not recorded as done, so the next run fetches it again
    if tx.send(msg).await.is_err() {
        tracing::debug!(did = %job.did, "the backfill is stopping; this repo's outcome is not recorded");
    }
    // after the send: a repo is never out of flight before its outcome is in the channel
    ctx.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
}

async fn fetch_inner(ctx: &FetchContext, job: &RepoJob, tx: &mpsc::Sender<Msg>) -> Msg {
    let did = job.did.clone();
    let pds = match ctx.client.resolve_pds(&did).await {
        Ok(p) => p,
        Err(e) => return failed(job, e.reason(), e.to_string()),
    };
    let mut blocks = RepoBlocks::new(ctx.repo_memory, ctx.max_repo_size, ctx.spill_dir.clone());
    let fetched = match ctx.client.get_repo(&pds, &did, &mut blocks).await {
        Ok(f) => f,
        Err(e) => {
            let reason = match &e {
                SyncError::Xrpc { name, .. } => name.clone(),
                other => other.reason(),
            };
            return failed(job, reason, e.to_string());
        }
    };
    ctx.stats
        .car_bytes
        .fetch_add(fetched.bytes, Ordering::Relaxed);
    let fetched_us = crate::model::cursor::now_us();
    let (tx2, job2, colls, stats) = (
        tx.clone(),
        job.clone(),
        ctx.collections.clone(),
        ctx.stats.clone(),
    );
    let walked = tokio::task::spawn_blocking(move || {
        walk(
            &blocks,
            &fetched.root,
            &job2,
            &colls,
            fetched_us,
            &tx2,
            &stats,
        )
    })
    .await;
    match walked {
        Ok(m) => m,
        Err(e) => {
            metrics::counter!("atlake_broken_invariants_total").increment(1);
            failed(job, "panic".into(), e.to_string())
        }
    }
}

/// A chunk being filled.
struct Chunk {
    rows: Rows,
    errors: Vec<ErrorEvent>,
    bytes: usize,
    last_key: Option<String>,
}

impl Chunk {
    fn new() -> Self {
        Chunk {
            rows: Rows::with_capacity(CHUNK_BYTES + (64 << 10)),
            errors: Vec::new(),
            bytes: 0,
            last_key: None,
        }
    }

    fn full(&self) -> bool {
        self.rows.len() + self.errors.len() >= CHUNK_ROWS || self.bytes >= CHUNK_BYTES
    }
}

/// Walks a fetched repo (blocking: hashing is done, this decodes records to JSON).
fn walk(
    blocks: &RepoBlocks,
    root: &Cid,
    job: &RepoJob,
    collections: &[String],
    fetched_us: i64,
    tx: &mpsc::Sender<Msg>,
    stats: &Stats,
) -> Msg {
    let did = job.did.as_str();
    let mut json = JsonWriter::new();
    let mut key = String::new();
    let mut text = Vec::new();
    let mut chunk = Chunk::new();
    let mut records = 0u64;
    // the rev is only known once the commit is decoded: rows are sent with it after the walk
    // begins, so the commit is read first
    let mut commit_buf = Vec::new();
    let (rev, data) =
        match crate::decode::mst::BlockSource::read_block(blocks, root, &mut commit_buf) {
            Ok(true) => match crate::decode::repo::Commit::decode(&commit_buf) {
                Ok(c) => (c.rev, c.data.to_string()),
                Err(e) => return failed(job, e.reason().into(), e.to_string()),
            },
            Ok(false) => {
                let e = RepoError::MissingCommit(*root);
                return failed(job, e.reason().into(), e.to_string());
            }
            Err(why) => return failed(job, "spill".into(), why),
        };
    if job.reset && rev.is_none() {
        // a replacement is marked by its rev: a version-2 repo cannot be one
        return failed(
            job,
            "commit".into(),
            "a fresh fetch after a gap found a version-2 repo (no rev)".into(),
        );
    }
    let send = |chunk: &mut Chunk| -> Result<(), RepoError> {
        if chunk.rows.is_empty() && chunk.errors.is_empty() {
            return Ok(());
        }
        let c = std::mem::replace(chunk, Chunk::new());
        let Some(last_key) = c.last_key else {
            return Ok(());
        };
        tx.blocking_send(Msg::Rows {
            did: did.to_string(),
            rev: rev.clone(),
            rows: c.rows,
            errors: c.errors,
            last_key,
            reset: job.reset,
        })
        .map_err(|_| RepoError::Stopped("the backfill is stopping".into()))
    };
    let walked = walk_records(blocks, root, did, &mut |r| {
        let key_len = r.collection.len() + 1 + r.rkey.len();
        key.clear();
        key.push_str(r.collection);
        key.push('/');
        key.push_str(r.rkey);
        let skip = job.after.as_deref().is_some_and(|a| key.as_str() <= a);
        if skip || (!collections.is_empty() && !collections.iter().any(|c| c == r.collection)) {
            return Ok(());
        }
        let bad = |reason: ErrorReason, detail: String| {
            let mut e = ErrorEvent::new(reason, detail, &r.block[..r.block.len().min(MAX_RECORD)]);
            e.did = Some(did.to_string());
            e.path = Some(key.clone());
            e
        };
        if !crate::syntax::is_nsid(r.collection) {
            chunk
                .errors
                .push(bad(ErrorReason::Collection, "not an NSID".into()));
        } else if !crate::syntax::is_rkey(r.rkey) {
            chunk
                .errors
                .push(bad(ErrorReason::Rkey, "not a record key".into()));
        } else if r.block.len() > MAX_RECORD {
            chunk.errors.push(bad(
                ErrorReason::RecordTooLarge,
                format!("{} bytes", r.block.len()),
            ));
        } else {
            // collection, rkey, CID, then the JSON, built in one buffer for the whole walk and
            // copied into the chunk's
            text.clear();
            text.extend_from_slice(r.collection.as_bytes());
            text.extend_from_slice(r.rkey.as_bytes());
            let rkey_end = text.len();
            r.cid.write_str(&mut text);
            let ends = [r.collection.len(), rkey_end, text.len()];
            match json.record_to_json(r.block, &mut text) {
                Err(e) => chunk.errors.push(bad(ErrorReason::Record, e.to_string())),
                Ok(()) => {
                    let claimed = created_at(r.block).ok().flatten();
                    let time_us = record_time_us(r.rkey, claimed, rev.as_deref(), fetched_us);
                    let record_len = text.len() - ends[2];
                    // the JSON writer emits UTF-8 only (DAG-CBOR text is valid UTF-8): checked
                    match chunk.rows.push(&text, ends, time_us) {
                        Ok(()) => {
                            chunk.bytes += record_len + key_len + 80;
                            records += 1;
                        }
                        Err(e) => chunk.errors.push(bad(ErrorReason::Record, e.to_string())),
                    }
                }
            }
        }
        // the chunk's last key, in the chunk's own buffer
        match &mut chunk.last_key {
            Some(k) => k.clone_from(&key),
            None => chunk.last_key = Some(key.clone()),
        }
        if chunk.full() {
            send(&mut chunk)?;
        }
        Ok(())
    });
    let outcome = walked.and_then(|_| send(&mut chunk));
    stats.records.fetch_add(records, Ordering::Relaxed);
    match outcome {
        Ok(()) => Msg::Done {
            did: did.to_string(),
            rev,
            data: Some(data),
            reset: job.reset,
        },
        Err(e) => {
            // what was walked before the error is verified (every node on its path hashed to
            // its link): it is kept, and a later fetch resumes after it. If the batch loop is
            // gone, the run is stopping: that is the failure to report
            match send(&mut chunk) {
                Ok(()) => failed(job, e.reason().into(), e.to_string()),
                Err(stopped) => failed(job, stopped.reason().into(), stopped.to_string()),
            }
        }
    }
}
