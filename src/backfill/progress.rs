//! What a backfill has made durable, per repository, in the lake itself.
//!
//! Each flush writes its data files (`rp-<batch>-<batch>-<hash>.parquet`, one per partition),
//! then, only after every one of them is durable, the batch's record
//! `_atlake/backfill/batch-<batch>.json`: the files, the repos it finished (with their `rev`),
//! the repos it holds only a part of (every record up to a key), and the repos that failed
//! (with their reason). A batch without its record is not committed: start-up removes its
//! files before anything new is written (under the writer lease), so a repo is either fetched
//! again or its rows are in the lake exactly once.
//!
//! A repo's state is the last record that names it. Records are folded in batch order; past
//! [`COMPACT_AFTER`] records, the fold is written as `_atlake/backfill/state-<batch>.json` and
//! the records it covers are removed, so start-up reads one state file and a few records.

use crate::checkpoint::list_files;
use crate::model::SourceKind;
use crate::sink::partition::STATE_DIR;
use crate::sink::store::{Lake, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Records folded into a state file once there are this many.
pub const COMPACT_AFTER: usize = 64;

/// Lake-relative directory of the backfill's records.
pub fn dir() -> String {
    format!("{STATE_DIR}/backfill")
}

fn batch_path(batch: i64) -> String {
    format!("{}/batch-{batch:020}.json", dir())
}

fn state_path(batch: i64) -> String {
    format!("{}/state-{batch:020}.json", dir())
}

/// Why progress could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Listing the lake failed.
    #[error(transparent)]
    List(#[from] crate::checkpoint::CheckpointError),
    /// A record is not what this version writes.
    #[error("corrupt backfill record {path}: {why}")]
    Corrupt {
        /// the record
        path: String,
        /// what is wrong
        why: String,
    },
}

/// A repo whose every record is in the lake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoDone {
    /// The account.
    pub did: String,
    /// The snapshot's revision (absent for a version-2 repo).
    pub rev: Option<String>,
    /// Records written from it by the run that finished it (a repo resumed after a restart
    /// counts only what that run wrote; an empty repo has 0).
    pub records: u64,
    /// Keys left to their live create by the daemon's cut-over (`collection/rkey`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub live: Vec<String>,
    /// The snapshot's MST root (the commit's `data`), which the next live commit must name
    /// as its `prevData`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// A fresh fetch after a gap: the snapshot replaces what the lake held of the repo.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
}

/// A repo of which the records up to `after` (MST key order) are in the lake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoPartial {
    /// The account.
    pub did: String,
    /// The snapshot's revision.
    pub rev: Option<String>,
    /// The last `collection/rkey` written.
    pub after: String,
    /// Keys left to their live create by the daemon's cut-over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub live: Vec<String>,
    /// A fresh fetch after a gap: the snapshot replaces what the lake held of the repo.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
}

/// A repo that could not be read; fetched again by the next run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoFailed {
    /// The account.
    pub did: String,
    /// A short reason (`hash_mismatch`, `RepoTakendown`, `gave_up`, …).
    pub reason: String,
    /// The error.
    pub detail: String,
    /// It was a fresh fetch after a gap (the next one is too).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
}

/// One committed flush.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// Format version (1).
    pub version: u32,
    /// The batch number (the cursor in its files' names).
    pub batch: i64,
    /// When it was written (RFC 3339).
    pub written_at: String,
    /// Its data files, lake-relative.
    pub files: Vec<String>,
    /// Rows in them.
    pub rows: u64,
    /// Repos it finished.
    pub done: Vec<RepoDone>,
    /// Repos it holds a part of.
    pub partial: Vec<RepoPartial>,
    /// Repos that failed since the previous batch.
    pub failed: Vec<RepoFailed>,
}

/// Where a repo stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum RepoState {
    /// Every record is in the lake.
    Done {
        /// at this revision
        rev: Option<String>,
        /// keys left to their live create
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        live: Vec<String>,
        /// the snapshot's MST root
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
    },
    /// Records up to `after` are in the lake.
    Partial {
        /// at this revision
        rev: Option<String>,
        /// the last key written
        after: String,
        /// keys left to their live create
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        live: Vec<String>,
        /// a fresh fetch after a gap
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        reset: bool,
    },
    /// It failed; records up to `after` (if any) are in the lake.
    Failed {
        /// why
        reason: String,
        /// the last key written
        after: Option<String>,
        /// a fresh fetch after a gap
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        reset: bool,
    },
}

impl RepoState {
    /// The key after which a new fetch resumes (`None`: from the start).
    pub fn after(&self) -> Option<&str> {
        match self {
            RepoState::Done { .. } => None,
            RepoState::Partial { after, .. } => Some(after),
            RepoState::Failed { after, .. } => after.as_deref(),
        }
    }

    /// Whether a new fetch is a fresh fetch after a gap (it replaces the repo's rows).
    pub fn reset(&self) -> bool {
        match self {
            RepoState::Done { .. } => false,
            RepoState::Partial { reset, .. } | RepoState::Failed { reset, .. } => *reset,
        }
    }
}

/// The folded state file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    batch: i64,
    rows: u64,
    repos: BTreeMap<String, RepoState>,
}

/// Everything the lake says about a backfill.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Each repo's state.
    pub repos: HashMap<String, RepoState>,
    /// The last committed batch.
    pub last_batch: Option<i64>,
    /// Rows committed over every batch.
    pub rows: u64,
    /// Records not yet folded into a state file.
    pub unfolded: Vec<i64>,
    /// The state file they follow.
    pub state_batch: Option<i64>,
}

impl Progress {
    /// Whether a repo is finished.
    pub fn is_done(&self, did: &str) -> bool {
        matches!(self.repos.get(did), Some(RepoState::Done { .. }))
    }

    /// Repos per state (`done`, `partial`, `failed`).
    pub fn counts(&self) -> (u64, u64, u64) {
        let mut c = (0, 0, 0);
        for s in self.repos.values() {
            match s {
                RepoState::Done { .. } => c.0 += 1,
                RepoState::Partial { .. } => c.1 += 1,
                RepoState::Failed { .. } => c.2 += 1,
            }
        }
        c
    }

    /// Failed repos per reason.
    pub fn failures(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for s in self.repos.values() {
            if let RepoState::Failed { reason, .. } = s {
                *m.entry(reason.clone()).or_insert(0) += 1;
            }
        }
        m
    }

    /// Keys a repo left to live creates so far.
    fn live_of(&self, did: &str) -> Vec<String> {
        match self.repos.get(did) {
            Some(RepoState::Done { live, .. } | RepoState::Partial { live, .. }) => live.clone(),
            _ => Vec::new(),
        }
    }

    /// The keys left to live creates that a repo's next record carries on: none when it
    /// starts a fresh fetch (the snapshot replaces the repo; what earlier ones left is moot).
    fn live_before(&self, did: &str, reset: bool) -> Vec<String> {
        let resumed = matches!(
            self.repos.get(did),
            Some(RepoState::Partial { reset: true, .. })
        );
        if reset && !resumed {
            Vec::new()
        } else {
            self.live_of(did)
        }
    }

    /// Applies a committed record: its partial repos, then its failures (which keep the key a
    /// partial wrote up to), then the repos it finished.
    pub fn apply(&mut self, r: &BatchRecord) {
        for p in &r.partial {
            // a fresh fetch starts over: what earlier snapshots left to live creates is moot
            let mut live = self.live_before(&p.did, p.reset);
            live.extend(p.live.iter().cloned());
            self.repos.insert(
                p.did.clone(),
                RepoState::Partial {
                    rev: p.rev.clone(),
                    after: p.after.clone(),
                    live,
                    reset: p.reset,
                },
            );
        }
        for f in &r.failed {
            let after = self
                .repos
                .get(&f.did)
                .and_then(|s| s.after())
                .map(str::to_string);
            self.repos.insert(
                f.did.clone(),
                RepoState::Failed {
                    reason: f.reason.clone(),
                    after,
                    reset: f.reset,
                },
            );
        }
        for d in &r.done {
            let mut live = self.live_before(&d.did, d.reset);
            live.extend(d.live.iter().cloned());
            self.repos.insert(
                d.did.clone(),
                RepoState::Done {
                    rev: d.rev.clone(),
                    live,
                    data: d.data.clone(),
                },
            );
        }
        self.rows += r.rows;
        self.last_batch = Some(self.last_batch.map_or(r.batch, |b| b.max(r.batch)));
    }

    /// Reads the lake's backfill records and removes the files of batches that were never
    /// committed (a crash between a flush's files and its record). The caller holds the writer
    /// lease. Returns the progress, the next batch number and the files removed.
    pub async fn recover(lake: &Lake) -> Result<(Progress, i64, Vec<String>), ProgressError> {
        let mut states = Vec::new();
        let mut batches = Vec::new();
        for (path, _) in lake.list(&dir()).await? {
            let name = path.rsplit('/').next().unwrap_or("");
            if let Some(n) = number(name, "state-") {
                states.push((n, path));
            } else if let Some(n) = number(name, "batch-") {
                batches.push((n, path));
            }
        }
        let mut p = Progress::default();
        if let Some((n, path)) = states.iter().max_by_key(|(n, _)| *n) {
            let s: StateFile = read_json(lake, path).await?;
            if s.batch != *n {
                return Err(ProgressError::Corrupt {
                    path: path.clone(),
                    why: format!("holds batch {} in a file named for {n}", s.batch),
                });
            }
            p.repos = s.repos.into_iter().collect();
            p.rows = s.rows;
            p.last_batch = Some(s.batch);
            p.state_batch = Some(s.batch);
        }
        batches.sort();
        for (n, path) in &batches {
            if p.state_batch.is_some_and(|s| *n <= s) {
                continue;
            }
            let r: BatchRecord = read_json(lake, path).await?;
            if r.batch != *n {
                return Err(ProgressError::Corrupt {
                    path: path.clone(),
                    why: format!("holds batch {} in a file named for {n}", r.batch),
                });
            }
            p.apply(&r);
            p.unfolded.push(*n);
        }
        let committed: std::collections::HashSet<i64> = batches.iter().map(|(n, _)| *n).collect();
        let mut highest = p.last_batch.unwrap_or(0);
        let mut removed = Vec::new();
        for f in list_files(lake).await? {
            if f.name.source() != SourceKind::Repo {
                continue;
            }
            let b = f.name.first().value();
            let folded = p.state_batch.is_some_and(|s| b <= s);
            if committed.contains(&b) || folded {
                continue;
            }
            tracing::info!(path = %f.path, batch = b, "removing a backfill file whose batch was never committed");
            lake.delete(&f.path).await?;
            removed.push(f.path);
            highest = highest.max(b);
        }
        Ok((p, highest + 1, removed))
    }

    /// Writes a committed record (after its files are durable), and folds the records into a
    /// state file once there are [`COMPACT_AFTER`] of them.
    pub async fn commit(&mut self, lake: &Lake, r: &BatchRecord) -> Result<(), ProgressError> {
        let body = serde_json::to_vec(r).map_err(|e| ProgressError::Corrupt {
            path: batch_path(r.batch),
            why: e.to_string(),
        })?;
        put(lake, &batch_path(r.batch), body).await?;
        self.apply(r);
        self.unfolded.push(r.batch);
        if self.unfolded.len() >= COMPACT_AFTER {
            self.fold(lake, r.batch).await?;
        }
        Ok(())
    }

    /// Writes the state as of `batch`, then removes the records and older state it covers.
    async fn fold(&mut self, lake: &Lake, batch: i64) -> Result<(), ProgressError> {
        let s = StateFile {
            version: 1,
            batch,
            rows: self.rows,
            repos: self
                .repos
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let body = serde_json::to_vec(&s).map_err(|e| ProgressError::Corrupt {
            path: state_path(batch),
            why: e.to_string(),
        })?;
        put(lake, &state_path(batch), body).await?;
        for b in std::mem::take(&mut self.unfolded) {
            lake.delete(&batch_path(b)).await?;
        }
        if let Some(old) = self.state_batch.replace(batch) {
            lake.delete(&state_path(old)).await?;
        }
        Ok(())
    }
}

/// Writes a record atomically; while the writer lease's renewals are late the write waits for
/// one (a lost lease, or any other failure, is an error).
async fn put(lake: &Lake, path: &str, body: Vec<u8>) -> Result<(), StoreError> {
    let body = bytes::Bytes::from(body);
    loop {
        match lake.put_atomic(path, body.clone()).await {
            Err(StoreError::Fenced(crate::sink::lease::FenceError::Expired)) => {
                tracing::warn!(%path, "the writer lease is not valid now; the record waits for a renewal");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            r => return r,
        }
    }
}

/// The number in `<prefix><digits>.json`.
fn number(name: &str, prefix: &str) -> Option<i64> {
    let d = name.strip_prefix(prefix)?.strip_suffix(".json")?;
    if d.len() != 20 || !d.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    d.parse().ok()
}

async fn read_json<T: serde::de::DeserializeOwned>(
    lake: &Lake,
    path: &str,
) -> Result<T, ProgressError> {
    let b = lake
        .get(path)
        .await?
        .ok_or_else(|| ProgressError::Corrupt {
            path: path.to_string(),
            why: "listed but gone".into(),
        })?;
    serde_json::from_slice(&b).map_err(|e| ProgressError::Corrupt {
        path: path.to_string(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(batch: i64) -> BatchRecord {
        BatchRecord {
            version: 1,
            batch,
            ..Default::default()
        }
    }

    /// The last record naming a repo decides its state; a failure keeps what a partial wrote.
    #[test]
    fn the_last_record_decides() {
        let mut p = Progress::default();
        let mut a = rec(1);
        a.partial.push(RepoPartial {
            did: "did:plc:a".into(),
            rev: None,
            after: "app.bsky.feed.post/3k".into(),
            live: Vec::new(),
            reset: false,
        });
        a.done.push(RepoDone {
            did: "did:plc:b".into(),
            rev: Some("3l".into()),
            records: 3,
            live: Vec::new(),
            data: None,
            reset: false,
        });
        a.rows = 7;
        p.apply(&a);
        let mut b = rec(2);
        b.failed.push(RepoFailed {
            did: "did:plc:a".into(),
            reason: "mst".into(),
            detail: String::new(),
            reset: false,
        });
        b.rows = 2;
        p.apply(&b);
        assert_eq!(
            p.repos["did:plc:a"],
            RepoState::Failed {
                reason: "mst".into(),
                after: Some("app.bsky.feed.post/3k".into()),
                reset: false,
            }
        );
        assert!(p.is_done("did:plc:b"));
        assert!(!p.is_done("did:plc:a"));
        assert_eq!(p.counts(), (1, 0, 1));
        assert_eq!(p.rows, 9);
        assert_eq!(p.last_batch, Some(2));
        assert_eq!(p.failures()["mst"], 1);
    }

    /// A fresh fetch after a gap starts the repo's keys left to live creates over, carries
    /// its `reset` through a partial and a failure (the next fetch is one too), and a done
    /// record keeps the snapshot's MST root.
    #[test]
    fn a_fresh_fetch_replaces_what_the_repo_left_to_live_creates() {
        let did = "did:plc:a";
        let mut p = Progress::default();
        let mut a = rec(1);
        a.done.push(RepoDone {
            did: did.into(),
            rev: Some("3ka".into()),
            records: 2,
            live: vec!["app.bsky.feed.post/3k1".into()],
            data: Some("bafyroot1".into()),
            reset: false,
        });
        p.apply(&a);
        let mut b = rec(2);
        b.partial.push(RepoPartial {
            did: did.into(),
            rev: Some("3kb".into()),
            after: "app.bsky.feed.like/3k2".into(),
            live: Vec::new(),
            reset: true,
        });
        p.apply(&b);
        assert!(p.repos[did].reset());
        assert_eq!(p.repos[did].after(), Some("app.bsky.feed.like/3k2"));
        assert_eq!(p.live_of(did), Vec::<String>::new());
        let mut c = rec(3);
        c.failed.push(RepoFailed {
            did: did.into(),
            reason: "truncated".into(),
            detail: String::new(),
            reset: true,
        });
        p.apply(&c);
        assert!(p.repos[did].reset());
        let mut d = rec(4);
        d.done.push(RepoDone {
            did: did.into(),
            rev: Some("3kc".into()),
            records: 5,
            live: Vec::new(),
            data: Some("bafyroot2".into()),
            reset: true,
        });
        p.apply(&d);
        assert_eq!(
            p.repos[did],
            RepoState::Done {
                rev: Some("3kc".into()),
                live: Vec::new(),
                data: Some("bafyroot2".into()),
            }
        );
        assert!(!p.repos[did].reset());
        // a record round-trips through JSON, and older records (no reset, no data) still read
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<BatchRecord>(&json).unwrap(), d);
        let old: RepoDone =
            serde_json::from_str(r#"{"did":"did:plc:a","rev":null,"records":1}"#).unwrap();
        assert!(!old.reset && old.data.is_none());
    }

    /// Records and state files round-trip through a lake; files of an uncommitted batch go.
    #[tokio::test]
    async fn recovery_reads_records_and_removes_uncommitted_files() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = Lake::open(tmp.path().to_str().unwrap()).unwrap();
        let mut p = Progress::default();
        for b in 1..=(COMPACT_AFTER as i64 + 3) {
            let mut r = rec(b);
            r.done.push(RepoDone {
                did: format!("did:plc:r{b}"),
                rev: None,
                records: 1,
                live: Vec::new(),
                data: None,
                reset: false,
            });
            r.rows = 1;
            p.commit(&lake, &r).await.unwrap();
        }
        let orphan =
            "history/collection=app.bsky.feed.post/month=2024-01/rp-99-99-00000001.parquet";
        let kept = "history/collection=app.bsky.feed.post/month=2024-01/rp-2-2-00000001.parquet";
        for path in [orphan, kept] {
            lake.put_atomic(path, bytes::Bytes::from_static(b"x"))
                .await
                .unwrap();
        }
        let (q, next, removed) = Progress::recover(&lake).await.unwrap();
        assert_eq!(removed, vec![orphan.to_string()]);
        assert_eq!(next, 100);
        assert!(lake.get(orphan).await.unwrap().is_none());
        assert!(lake.get(kept).await.unwrap().is_some());
        assert_eq!(q.repos.len(), COMPACT_AFTER + 3);
        assert_eq!(q.rows, COMPACT_AFTER as u64 + 3);
        assert_eq!(q.state_batch, Some(COMPACT_AFTER as i64));
        assert_eq!(q.unfolded.len(), 3);
        // only one state file and the unfolded records remain
        let left = lake.list(&dir()).await.unwrap();
        assert_eq!(left.len(), 4, "{left:?}");
    }
}
