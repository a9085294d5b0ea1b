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
//! the records it covers are removed. A fold writes only the repos its records named, adding
//! to the state file before it (format 2, with its `base`), until that chain of files would
//! hold half as many repos as the whole state or grow to [`MAX_CHAIN`] files: then it writes
//! the whole state (format 1) and removes the chain. So a fold's cost follows what changed,
//! not the size of the network, and start-up reads one whole state file, a few additions to
//! it and a few records.

use crate::checkpoint::list_files;
use crate::model::SourceKind;
use crate::sink::partition::{LakeFile, STATE_DIR};
use crate::sink::store::{Lake, StoreError};
use crate::syntax::tid_text;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Records folded into a state file once there are this many.
pub const COMPACT_AFTER: usize = 64;

/// State files in a chain (a whole one and the ones adding to it) before a fold writes the
/// whole state again.
const MAX_CHAIN: usize = 16;

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

/// A repo's state as progress keeps it in memory: 16 bytes for a finished repo whose rev is a
/// TID and that left nothing to live creates (nearly every repo), the whole [`RepoState`]
/// boxed otherwise. A finished repo's MST root is not kept: a start loads snapshots "loose"
/// (the next live commit is checked against the rev alone), so only the batch record that
/// finished the repo names it.
#[derive(Debug, Clone)]
enum Slot {
    /// Finished at this rev (a TID as its 64-bit value; [`NO_REV`]: a version-2 repo).
    Done(u64),
    /// Anything else.
    Other(Box<RepoState>),
}

/// The rev of a repo without one. TIDs kept as values have the top bit clear, as the TID
/// spec has it (the syntax lets the first character reach `j`, which sets it: such a rev is
/// kept boxed, as text).
const NO_REV: u64 = u64::MAX;

/// A TID as its 64-bit value; `None` for anything else, and for a TID whose top bit is set.
fn tid_value(rev: &str) -> Option<u64> {
    crate::syntax::tid_value(rev).filter(|v| v >> 63 == 0)
}

impl Slot {
    fn of(s: RepoState) -> Slot {
        if let RepoState::Done { rev, live, .. } = &s
            && live.is_empty()
        {
            match rev.as_deref().map(tid_value) {
                None => return Slot::Done(NO_REV),
                Some(Some(v)) => return Slot::Done(v),
                Some(None) => {}
            }
        }
        Slot::Other(Box::new(s))
    }

    fn state(&self) -> RepoState {
        match self {
            Slot::Done(v) => RepoState::Done {
                rev: (*v != NO_REV).then(|| tid_text(*v)),
                live: Vec::new(),
                data: None,
            },
            Slot::Other(s) => (**s).clone(),
        }
    }

    fn is_done(&self) -> bool {
        self.kind() == 0
    }

    /// The state unless it is a plain finished one (which has no resume key, no keys left to
    /// live creates and no reset).
    fn other(&self) -> Option<&RepoState> {
        match self {
            Slot::Done(_) => None,
            Slot::Other(s) => Some(s),
        }
    }

    /// 0 done, 1 partial, 2 failed.
    fn kind(&self) -> u8 {
        match self {
            Slot::Done(_) => 0,
            Slot::Other(s) => match **s {
                RepoState::Done { .. } => 0,
                RepoState::Partial { .. } => 1,
                RepoState::Failed { .. } => 2,
            },
        }
    }
}

/// Each repo's slot by DID. A `did:plc:` DID (nearly every one) is kept as the 15 bytes its
/// 24 base32 characters spell ([`crate::syntax::plc_bits`]); any other as its text. Measured
/// per finished repo, 1M of them (`progress_memory_now`): 136 bytes with every DID boxed as
/// text, 72–73 bytes so.
#[derive(Debug, Clone, Default)]
struct Repos {
    plc: HashMap<[u8; 15], Slot>,
    other: HashMap<Box<str>, Slot>,
}

impl Repos {
    fn get(&self, did: &str) -> Option<&Slot> {
        match crate::syntax::plc_bits(did) {
            Some(k) => self.plc.get(&k),
            None => self.other.get(did),
        }
    }

    fn insert(&mut self, did: &str, slot: Slot) -> Option<Slot> {
        match crate::syntax::plc_bits(did) {
            Some(k) => self.plc.insert(k, slot),
            None => self.other.insert(did.into(), slot),
        }
    }

    fn len(&self) -> usize {
        self.plc.len() + self.other.len()
    }

    fn values(&self) -> impl Iterator<Item = &Slot> + '_ {
        self.plc.values().chain(self.other.values())
    }

    /// Every repo with its DID's text (made as it is visited).
    fn iter(&self) -> impl Iterator<Item = (std::borrow::Cow<'_, str>, &Slot)> + '_ {
        self.plc
            .iter()
            .map(|(k, v)| (std::borrow::Cow::Owned(crate::syntax::plc_did(k)), v))
            .chain(
                self.other
                    .iter()
                    .map(|(k, v)| (std::borrow::Cow::Borrowed(&**k), v)),
            )
    }
}

/// The folded state file, as read: each repo goes straight into its [`Slot`].
#[derive(Debug, Default, Deserialize)]
struct StateFile {
    version: u32,
    batch: i64,
    /// The state file this one adds to (format 2); none: it is whole (format 1).
    #[serde(default)]
    base: Option<i64>,
    rows: u64,
    #[serde(deserialize_with = "slots")]
    repos: Repos,
}

/// Reads the `repos` object one entry at a time (no map of whole states in between).
fn slots<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Repos, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Repos;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of repo states by DID")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Repos::default();
            while let Some((did, state)) =
                m.next_entry::<std::borrow::Cow<'de, str>, RepoState>()?
            {
                out.insert(&did, Slot::of(state));
            }
            Ok(out)
        }
    }
    d.deserialize_map(Visit)
}

/// The folded state file, as written: the same JSON, repos in DID order, each state made
/// from its slot as it is written.
#[derive(Serialize)]
struct StateFileOut<'a> {
    version: u32,
    batch: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    base: Option<i64>,
    rows: u64,
    repos: SortedRepos<'a>,
}

/// The repos in DID order: the packed `did:plc:` DIDs sort as their text does, so the two
/// kinds are each sorted by key and merged as they are written (a DID's text is made only
/// when it is written).
struct SortedRepos<'a> {
    plc: Vec<(&'a [u8; 15], &'a Slot)>,
    other: Vec<(&'a str, &'a Slot)>,
}

impl<'a> SortedRepos<'a> {
    fn of(repos: &'a Repos) -> Self {
        let mut plc: Vec<_> = repos.plc.iter().collect();
        plc.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut other: Vec<_> = repos.other.iter().map(|(k, v)| (&**k, v)).collect();
        other.sort_unstable_by(|a, b| a.0.cmp(b.0));
        SortedRepos { plc, other }
    }
}

impl Serialize for SortedRepos<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.plc.len() + self.other.len()))?;
        let mut plc = self
            .plc
            .iter()
            .map(|(k, v)| (crate::syntax::plc_did(k), *v));
        let mut other = self.other.iter().peekable();
        let mut next_plc = plc.next();
        loop {
            let plc_first = match (&next_plc, other.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((a, _)), Some((b, _))) => a.as_str() < *b,
            };
            if plc_first {
                if let Some((did, slot)) = next_plc.take() {
                    m.serialize_entry(&did, &slot.state())?;
                }
                next_plc = plc.next();
            } else if let Some((did, slot)) = other.next() {
                m.serialize_entry(did, &slot.state())?;
            }
        }
        m.end()
    }
}

/// Everything the lake says about a backfill.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Each repo's state, by DID (one map for the whole run: the listing looks repos up here).
    repos: Repos,
    /// The last committed batch.
    pub last_batch: Option<i64>,
    /// Rows committed over every batch.
    pub rows: u64,
    /// Records not yet folded into a state file.
    pub unfolded: Vec<i64>,
    /// The state file they follow.
    pub state_batch: Option<i64>,
    /// Repos per state (`done`, `partial`, `failed`), kept as `repos` changes.
    tally: (u64, u64, u64),
    /// The state files that make the state, the whole one first, each with the repos it holds.
    chain: Vec<(i64, usize)>,
    /// Repos named by records not yet folded (a fold writes only these, unless it writes the
    /// whole state).
    changed: Vec<Box<str>>,
    /// State files no chain needs (left by a crash between a whole fold and its clean-up).
    stale: Vec<i64>,
}

impl Progress {
    /// Whether a repo is finished.
    pub fn is_done(&self, did: &str) -> bool {
        self.repos.get(did).is_some_and(Slot::is_done)
    }

    /// A repo's state, if the lake has one.
    pub fn get(&self, did: &str) -> Option<RepoState> {
        self.repos.get(did).map(Slot::state)
    }

    /// Repos the lake has a state for.
    pub fn len(&self) -> usize {
        self.repos.len()
    }

    /// Whether no repo has a state yet.
    pub fn is_empty(&self) -> bool {
        self.repos.len() == 0
    }

    /// Every repo with its DID and state (both made as they are visited).
    pub fn states(&self) -> impl Iterator<Item = (std::borrow::Cow<'_, str>, RepoState)> + '_ {
        self.repos.iter().map(|(k, v)| (k, v.state()))
    }

    /// Repos per state (`done`, `partial`, `failed`).
    pub fn counts(&self) -> (u64, u64, u64) {
        self.tally
    }

    fn count(tally: &mut (u64, u64, u64), s: &Slot, add: bool) {
        let n = match s.kind() {
            0 => &mut tally.0,
            1 => &mut tally.1,
            _ => &mut tally.2,
        };
        *n = if add { *n + 1 } else { n.saturating_sub(1) };
    }

    /// Sets a repo's state, keeping the counts.
    fn set(&mut self, did: &str, s: RepoState) {
        let slot = Slot::of(s);
        Self::count(&mut self.tally, &slot, true);
        if let Some(old) = self.repos.insert(did, slot) {
            Self::count(&mut self.tally, &old, false);
        }
    }

    /// Failed repos per reason.
    pub fn failures(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for s in self.repos.values() {
            if let Slot::Other(s) = s
                && let RepoState::Failed { reason, .. } = &**s
            {
                *m.entry(reason.clone()).or_insert(0) += 1;
            }
        }
        m
    }

    /// Keys a repo left to live creates so far.
    fn live_of(&self, did: &str) -> Vec<String> {
        match self.repos.get(did).and_then(Slot::other) {
            Some(RepoState::Done { live, .. } | RepoState::Partial { live, .. }) => live.clone(),
            _ => Vec::new(),
        }
    }

    /// The keys left to live creates that a repo's next record carries on: none when it
    /// starts a fresh fetch (the snapshot replaces the repo; what earlier ones left is moot).
    fn live_before(&self, did: &str, reset: bool) -> Vec<String> {
        let resumed = matches!(
            self.repos.get(did).and_then(Slot::other),
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
            self.set(
                &p.did,
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
                .and_then(Slot::other)
                .and_then(|s| s.after())
                .map(str::to_string);
            self.set(
                &f.did,
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
            self.set(
                &d.did,
                RepoState::Done {
                    rev: d.rev.clone(),
                    live,
                    data: d.data.clone(),
                },
            );
        }
        self.changed.extend(
            r.partial
                .iter()
                .map(|x| &x.did)
                .chain(r.failed.iter().map(|x| &x.did))
                .chain(r.done.iter().map(|x| &x.did))
                .map(|d| d.as_str().into()),
        );
        self.rows += r.rows;
        self.last_batch = Some(self.last_batch.map_or(r.batch, |b| b.max(r.batch)));
    }

    /// Puts every repo of a state file read back (a later file's state replaces an earlier's),
    /// keeping the counts.
    fn merge(&mut self, repos: Repos) {
        if self.repos.len() == 0 {
            // the whole state file: taken as it is (no second map of every repo)
            for slot in repos.values() {
                Self::count(&mut self.tally, slot, true);
            }
            self.repos = repos;
            return;
        }
        let Repos { plc, other } = repos;
        for (k, slot) in plc {
            Self::count(&mut self.tally, &slot, true);
            if let Some(old) = self.repos.plc.insert(k, slot) {
                Self::count(&mut self.tally, &old, false);
            }
        }
        for (k, slot) in other {
            Self::count(&mut self.tally, &slot, true);
            if let Some(old) = self.repos.other.insert(k, slot) {
                Self::count(&mut self.tally, &old, false);
            }
        }
    }

    /// Reads the lake's backfill records and removes the files of batches that were never
    /// committed (a crash between a flush's files and its record). The caller holds the writer
    /// lease. Returns the progress, the next batch number and the files removed.
    pub async fn recover(lake: &Lake) -> Result<(Progress, i64, Vec<String>), ProgressError> {
        let (p, next, removed, _) = Progress::recover_with_files(lake).await?;
        Ok((p, next, removed))
    }

    /// [`Progress::recover`], with the backfill's data files that stay (those of committed
    /// batches, history and quarantine), for the catch-up of the lake's logs.
    pub async fn recover_with_files(
        lake: &Lake,
    ) -> Result<(Progress, i64, Vec<String>, Vec<LakeFile>), ProgressError> {
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
        // the newest state file, then the ones it adds to, down to a whole one
        let by_batch: HashMap<i64, &String> = states.iter().map(|(n, path)| (*n, path)).collect();
        let mut files: Vec<(i64, StateFile)> = Vec::new();
        let mut next = states.iter().map(|(n, _)| *n).max();
        while let Some(n) = next {
            let path = by_batch
                .get(&n)
                .copied()
                .ok_or_else(|| ProgressError::Corrupt {
                    path: state_path(n),
                    why: format!(
                        "missing: state file {} adds to it",
                        files.last().map_or(n, |f| f.0)
                    ),
                })?;
            let s: StateFile = read_json(lake, path).await?;
            let corrupt = |why: String| ProgressError::Corrupt {
                path: path.to_string(),
                why,
            };
            if s.batch != n {
                return Err(corrupt(format!(
                    "holds batch {} in a file named for {n}",
                    s.batch
                )));
            }
            match (s.version, s.base) {
                (1, None) => {}
                (2, Some(b)) if b < n => {}
                (1 | 2, base) => {
                    return Err(corrupt(format!(
                        "state format {} adding to {base:?}",
                        s.version
                    )));
                }
                (v, _) => {
                    return Err(corrupt(format!(
                        "state format {v} (this version reads 1 and 2)"
                    )));
                }
            }
            next = s.base;
            files.push((n, s));
        }
        if let Some((n, newest)) = files.first() {
            p.rows = newest.rows;
            p.last_batch = Some(*n);
            p.state_batch = Some(*n);
        }
        for (n, s) in files.into_iter().rev() {
            p.chain.push((n, s.repos.len()));
            p.merge(s.repos);
        }
        p.stale = states
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| !p.chain.iter().any(|(c, _)| c == n))
            .collect();
        batches.sort();
        for (n, path) in &batches {
            if p.state_batch.is_some_and(|s| *n <= s) {
                // folded already (a crash came between a fold and its clean-up)
                tracing::info!(%path, "removing a backfill record a state file covers");
                lake.delete(path).await?;
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
        let mut kept = Vec::new();
        for f in list_files(lake).await? {
            if f.name.source() != SourceKind::Repo {
                continue;
            }
            let b = f.name.first().value();
            let folded = p.state_batch.is_some_and(|s| b <= s);
            if committed.contains(&b) || folded {
                kept.push(f);
                continue;
            }
            tracing::info!(path = %f.path, batch = b, "removing a backfill file whose batch was never committed");
            lake.delete(&f.path).await?;
            removed.push(f.path);
            highest = highest.max(b);
        }
        Ok((p, highest + 1, removed, kept))
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

    /// Writes the state as of `batch`, then removes the records it covers. The file holds only
    /// the repos the records named, adding to the state file before it, unless the chain of such
    /// files would then hold more than half as many repos as the whole state (or be longer than
    /// [`MAX_CHAIN`]): then it holds the whole state, and the chain before it is removed.
    async fn fold(&mut self, lake: &Lake, batch: i64) -> Result<(), ProgressError> {
        // kept until the file is written: a fold that fails leaves them for the next one
        self.changed.sort_unstable();
        self.changed.dedup();
        let changed = &self.changed;
        let in_chain: usize = self.chain.iter().skip(1).map(|(_, n)| n).sum();
        let base = self.chain.last().map(|(b, _)| *b).filter(|_| {
            self.chain.len() < MAX_CHAIN && 2 * (in_chain + changed.len()) <= self.repos.len()
        });
        let delta;
        let (version, repos) = match base {
            Some(_) => {
                let mut d = Repos::default();
                for did in changed {
                    match self.repos.get(did) {
                        Some(slot) => {
                            d.insert(did, slot.clone());
                        }
                        None => {
                            // every repo a record names has a state once it is applied
                            metrics::counter!("atlake_broken_invariants_total").increment(1);
                            return Err(ProgressError::Corrupt {
                                path: state_path(batch),
                                why: format!("{did} was named by a record but has no state"),
                            });
                        }
                    }
                }
                delta = d;
                (2, &delta)
            }
            None => (1, &self.repos),
        };
        let held = repos.len();
        let body = serde_json::to_vec(&StateFileOut {
            version,
            batch,
            base,
            rows: self.rows,
            repos: SortedRepos::of(repos),
        })
        .map_err(|e| ProgressError::Corrupt {
            path: state_path(batch),
            why: e.to_string(),
        })?;
        put(lake, &state_path(batch), body).await?;
        self.changed.clear();
        for b in std::mem::take(&mut self.unfolded) {
            lake.delete(&batch_path(b)).await?;
        }
        if base.is_none() {
            let old = std::mem::take(&mut self.chain);
            for b in old
                .iter()
                .map(|(b, _)| *b)
                .chain(std::mem::take(&mut self.stale))
            {
                lake.delete(&state_path(b)).await?;
            }
        }
        self.chain.push((batch, held));
        self.state_batch = Some(batch);
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

    /// The record of `batch` finishing `per` new repos (DIDs shaped as the network's), the
    /// next of them numbered `*repo`.
    fn finishing(batch: i64, per: usize, repo: &mut usize) -> BatchRecord {
        let mut r = rec(batch);
        for _ in 0..per {
            r.done.push(RepoDone {
                did: measured_did(*repo),
                rev: Some(tid_text((1_700_000_000_000_000 + *repo as u64) << 10)),
                records: 1,
                live: Vec::new(),
                data: None,
                reset: false,
            });
            *repo += 1;
        }
        r.rows = per as u64;
        r
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
            p.get("did:plc:a").unwrap(),
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
        assert!(p.get(did).unwrap().reset());
        assert_eq!(p.get(did).unwrap().after(), Some("app.bsky.feed.like/3k2"));
        assert_eq!(p.live_of(did), Vec::<String>::new());
        let mut c = rec(3);
        c.failed.push(RepoFailed {
            did: did.into(),
            reason: "truncated".into(),
            detail: String::new(),
            reset: true,
        });
        p.apply(&c);
        assert!(p.get(did).unwrap().reset());
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
            p.get(did).unwrap(),
            RepoState::Done {
                rev: Some("3kc".into()),
                live: Vec::new(),
                data: Some("bafyroot2".into()),
            }
        );
        assert!(!p.get(did).unwrap().reset());
        // a record round-trips through JSON, and older records (no reset, no data) still read
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<BatchRecord>(&json).unwrap(), d);
        let old: RepoDone =
            serde_json::from_str(r#"{"did":"did:plc:a","rev":null,"records":1}"#).unwrap();
        assert!(!old.reset && old.data.is_none());
    }

    /// A finished repo at a TID rev is kept in 16 bytes and reads back as it was (its MST root
    /// aside); a rev that is no TID, keys left to live creates, partial and failed repos keep
    /// their whole state; the state file round-trips every kind.
    #[tokio::test]
    async fn finished_repos_are_kept_compactly_and_read_back_the_same() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
        for rev in [
            "2222222222222",
            "3kbaaaaaaaaa2",
            "bzzzzzzzzzzzz",
            "3lzqv5mgtxk2a",
        ] {
            let v = tid_value(rev).unwrap();
            assert_eq!(tid_text(v), rev);
            assert_ne!(v, NO_REV);
        }
        // the syntax takes a first character up to `j`, which sets the top bit (and
        // "jzzzzzzzzzzzz" would be the sentinel): kept as text instead
        assert_eq!(tid_value("czzzzzzzzzzzz"), None);
        assert_eq!(tid_value("jzzzzzzzzzzzz"), None);
        assert_eq!(tid_value("kzzzzzzzzzzzz"), None);
        assert_eq!(tid_value("3kb"), None);
        let high = RepoState::Done {
            rev: Some("jzzzzzzzzzzzz".into()),
            live: vec![],
            data: None,
        };
        assert!(matches!(Slot::of(high.clone()), Slot::Other(_)));
        assert_eq!(Slot::of(high.clone()).state(), high);
        let done = |rev: Option<&str>, live: Vec<String>, data: Option<&str>| RepoState::Done {
            rev: rev.map(str::to_string),
            live,
            data: data.map(str::to_string),
        };
        let tid = "3lzqv5mgtxk2a";
        let cases = [
            (
                done(Some(tid), vec![], Some("bafyroot")),
                true,
                done(Some(tid), vec![], None),
            ),
            (done(None, vec![], None), true, done(None, vec![], None)),
            (
                done(Some("not-a-tid"), vec![], Some("r")),
                false,
                done(Some("not-a-tid"), vec![], Some("r")),
            ),
            (
                done(Some(tid), vec!["app.bsky.feed.post/3k".into()], None),
                false,
                done(Some(tid), vec!["app.bsky.feed.post/3k".into()], None),
            ),
            (
                RepoState::Partial {
                    rev: Some(tid.into()),
                    after: "a/b".into(),
                    live: vec![],
                    reset: true,
                },
                false,
                RepoState::Partial {
                    rev: Some(tid.into()),
                    after: "a/b".into(),
                    live: vec![],
                    reset: true,
                },
            ),
            (
                RepoState::Failed {
                    reason: "mst".into(),
                    after: None,
                    reset: false,
                },
                false,
                RepoState::Failed {
                    reason: "mst".into(),
                    after: None,
                    reset: false,
                },
            ),
        ];
        let mut p = Progress::default();
        for (i, (state, compact, back)) in cases.iter().enumerate() {
            let slot = Slot::of(state.clone());
            assert_eq!(matches!(slot, Slot::Done(_)), *compact, "{state:?}");
            assert_eq!(&slot.state(), back);
            p.set(&format!("did:plc:{i}"), state.clone());
        }
        assert_eq!(p.counts(), (4, 1, 1));
        // a state replaced keeps the counts
        p.set("did:plc:5", done(Some(tid), vec![], None));
        assert_eq!(p.counts(), (5, 1, 0));
        assert!(p.is_done("did:plc:5") && !p.is_done("did:plc:4") && !p.is_done("did:plc:9"));
        // through a state file and back
        let lake = Lake::open("memory://").unwrap();
        p.fold(&lake, 7).await.unwrap();
        let (q, _, _) = Progress::recover(&lake).await.unwrap();
        assert_eq!(q.counts(), p.counts());
        let mut a: Vec<_> = p.states().collect();
        let mut b: Vec<_> = q.states().collect();
        a.sort_by(|x, y| x.0.cmp(&y.0));
        b.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(a, b);
        assert_eq!(q.get("did:plc:0"), Some(done(Some(tid), vec![], None)));
    }

    /// `did:plc:` DIDs are kept packed and every other DID as text; both are found by their
    /// text, and the state file lists them all in the order of their text, read back the same.
    #[tokio::test]
    async fn dids_are_kept_packed_and_the_state_file_lists_them_in_text_order() {
        let plc = [
            "did:plc:z72i7hdynmk6r22z27h6tvur",
            "did:plc:222222222222222222222222",
            "did:plc:ewvi7nxzyoun6zhxrhs64oiz",
            "did:plc:7zzzzzzzzzzzzzzzzzzzzzzz",
            "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa",
        ];
        // text that sorts between, before and after the packed ones
        let other = [
            "did:plc:7zzzzzzzzzzzzzzzzzzzzzzz0",
            "did:plc:abc",
            "did:plc:zzzzzzzzzzzzzzzzzzzzzzzzz",
            "did:web:example.com",
            "did:key:z6Mk",
        ];
        let mut p = Progress::default();
        for (i, d) in plc.iter().chain(other.iter()).enumerate() {
            let rev = tid_text((1_700_000_000_000_000 + i as u64) << 10);
            p.set(d, measured_state_at(&rev));
        }
        assert_eq!((p.repos.plc.len(), p.repos.other.len()), (5, 5));
        for (i, d) in plc.iter().chain(other.iter()).enumerate() {
            let rev = tid_text((1_700_000_000_000_000 + i as u64) << 10);
            assert!(p.is_done(d), "{d}");
            assert_eq!(
                p.get(d),
                Some(measured_state_at(&rev).without_data()),
                "{d}"
            );
        }
        assert!(!p.is_done("did:plc:zzzzzzzzzzzzzzzzzzzzzzzy"));
        let lake = Lake::open("memory://").unwrap();
        p.fold(&lake, 3).await.unwrap();
        let body = lake.get(&state_path(3)).await.unwrap().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        // serde_json's map keeps the file's order only with `preserve_order`: read the keys
        // from the text instead
        let text = std::str::from_utf8(&body).unwrap();
        let mut at: Vec<(usize, &str)> = plc
            .iter()
            .chain(other.iter())
            .map(|d| (text.find(&format!("\"{d}\":")).unwrap(), *d))
            .collect();
        at.sort();
        let mut sorted: Vec<&str> = plc.iter().chain(other.iter()).copied().collect();
        sorted.sort();
        assert_eq!(at.iter().map(|x| x.1).collect::<Vec<_>>(), sorted);
        assert_eq!(json["repos"].as_object().unwrap().len(), 10);
        let (q, _, _) = Progress::recover(&lake).await.unwrap();
        assert_eq!((q.repos.plc.len(), q.repos.other.len()), (5, 5));
        let mut a: Vec<_> = p.states().collect();
        let mut b: Vec<_> = q.states().collect();
        a.sort_by(|x, y| x.0.cmp(&y.0));
        b.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(a, b);
    }

    /// Resident bytes of the process (Linux).
    fn rss() -> u64 {
        let s = std::fs::read_to_string("/proc/self/statm").unwrap();
        s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
    }

    const MEASURED: usize = 1_000_000;

    /// A DID shaped as the network's are (24 base32 characters).
    fn measured_did(i: usize) -> String {
        crate::simulate::traffic::did_of(i as u64)
    }

    fn measured_state(i: usize) -> RepoState {
        // a TID of a time in 2024 (µs since 1970, then 10 bits of clock id)
        measured_state_at(&tid_text((1_700_000_000_000_000 + i as u64) << 10))
    }

    fn measured_state_at(rev: &str) -> RepoState {
        RepoState::Done {
            rev: Some(rev.to_string()),
            live: Vec::new(),
            data: Some(format!("bafyreib{rev:0>51}")),
        }
    }

    impl RepoState {
        /// The state as progress keeps a plain finished repo (no MST root).
        fn without_data(self) -> RepoState {
            match self {
                RepoState::Done { rev, live, .. } => RepoState::Done {
                    rev,
                    live,
                    data: None,
                },
                s => s,
            }
        }
    }

    fn per_repo(a: u64, b: u64) -> f64 {
        b.saturating_sub(a) as f64 / MEASURED as f64
    }

    /// A measurement, not a check: the memory a backfill's progress takes per finished repo,
    /// as this version keeps it (one map with boxed DIDs, and the listing's 16-byte keys).
    /// Run alone, so that no freed memory is reused:
    /// `cargo test --lib progress_memory_now -- --ignored --nocapture --exact backfill::progress::tests::progress_memory_now`
    #[test]
    #[ignore]
    fn progress_memory_now() {
        let r0 = rss();
        let mut p = Progress::default();
        for i in 0..MEASURED {
            p.set(&measured_did(i), measured_state(i));
        }
        let r1 = rss();
        let mut seen = crate::backfill::Seen::default();
        for i in 0..MEASURED {
            assert!(seen.insert(&measured_did(i)));
        }
        let r2 = rss();
        eprintln!(
            "now: map {:.0} B/repo, with the listing's set {:.0} B/repo",
            per_repo(r0, r1),
            per_repo(r0, r2)
        );
        assert_eq!(p.counts(), (MEASURED as u64, 0, 0));
    }

    /// A measurement, not a check: how long a start takes to read the folded progress of
    /// `MEASURED` finished repos and give their snapshots to the daemon's cut-over (the live
    /// pipeline waits for both), and what the fold that wrote it took. Local disk. Run alone:
    /// `cargo test --release --lib progress_load_time -- --ignored --nocapture --exact backfill::progress::tests::progress_load_time`
    #[tokio::test]
    #[ignore]
    async fn progress_load_time() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = Lake::open(tmp.path().to_str().unwrap()).unwrap();
        let mut p = Progress::default();
        for i in 0..MEASURED {
            p.set(&measured_did(i), measured_state(i));
        }
        let t = std::time::Instant::now();
        p.fold(&lake, 1).await.unwrap();
        let fold = t.elapsed();
        let bytes = std::fs::metadata(tmp.path().join(state_path(1)))
            .unwrap()
            .len();
        let t = std::time::Instant::now();
        let (q, _, _) = Progress::recover(&lake).await.unwrap();
        let read = t.elapsed();
        let cut = crate::catalog::Cutover::new(usize::MAX);
        let t = std::time::Instant::now();
        crate::backfill::load_snapshots(&q, &cut);
        let load = t.elapsed();
        eprintln!(
            "{MEASURED} repos: state file {bytes} B, fold {fold:?}, read {read:?}, cut-over load {load:?}"
        );
        assert_eq!(q.counts(), (MEASURED as u64, 0, 0));
        assert_eq!(cut.followed().0, MEASURED);
    }

    /// The same for the way the version before kept it: the map with `String` DIDs, plus the
    /// listing's copies (a set of finished DIDs, a map of resume points, a set of DIDs seen).
    #[test]
    #[ignore]
    fn progress_memory_before() {
        let r0 = rss();
        let map: HashMap<String, RepoState> = (0..MEASURED)
            .map(|i| (measured_did(i), measured_state(i)))
            .collect();
        let r1 = rss();
        let done: std::collections::HashSet<String> = map.keys().cloned().collect();
        let resume: HashMap<String, (Option<String>, bool)> = map
            .iter()
            .map(|(d, s)| (d.clone(), (s.after().map(str::to_string), s.reset())))
            .collect();
        let seen: std::collections::HashSet<String> = map.keys().cloned().collect();
        let r2 = rss();
        eprintln!(
            "before: map {:.0} B/repo, with the listing's copies {:.0} B/repo",
            per_repo(r0, r1),
            per_repo(r0, r2)
        );
        assert_eq!(done.len() + resume.len() + seen.len(), 3 * MEASURED);
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
        assert_eq!(q.len(), COMPACT_AFTER + 3);
        assert_eq!(q.rows, COMPACT_AFTER as u64 + 3);
        assert_eq!(q.state_batch, Some(COMPACT_AFTER as i64));
        assert_eq!(q.unfolded.len(), 3);
        // only one state file and the unfolded records remain
        let left = lake.list(&dir()).await.unwrap();
        assert_eq!(left.len(), 4, "{left:?}");
    }

    /// The states of every repo, in DID order.
    fn sorted_states(p: &Progress) -> Vec<(String, RepoState)> {
        let mut v: Vec<_> = p.states().map(|(d, s)| (d.into_owned(), s)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The state files in the lake, by batch, with their format, base and repo count.
    async fn state_files(lake: &Lake) -> Vec<(i64, u64, Option<i64>, usize)> {
        let mut out = Vec::new();
        for (path, _) in lake.list(&dir()).await.unwrap() {
            let name = path.rsplit('/').next().unwrap();
            if let Some(n) = number(name, "state-") {
                let v: serde_json::Value =
                    serde_json::from_slice(&lake.get(&path).await.unwrap().unwrap()).unwrap();
                out.push((
                    n,
                    v["version"].as_u64().unwrap(),
                    v["base"].as_i64(),
                    v["repos"].as_object().unwrap().len(),
                ));
            }
        }
        out.sort();
        out
    }

    /// A fold writes only the repos its records named, adding to the state file before it,
    /// until that chain would hold half as many repos as the whole state or grow past
    /// [`MAX_CHAIN`] files; then it writes the whole state and removes the chain. Every start
    /// reads back the same state, and a state file no chain needs is removed by the next whole
    /// fold; a chain with a file missing is an error.
    #[tokio::test]
    async fn folds_write_what_changed_and_the_whole_state_now_and_then() {
        let lake = Lake::open("memory://").unwrap();
        let mut p = Progress::default();
        let mut batch = 0i64;
        let mut repo = 0usize;
        // `per` new repos finished by each of `COMPACT_AFTER` records
        let mut fold = |per: usize| {
            let mut recs = Vec::new();
            for _ in 0..COMPACT_AFTER {
                batch += 1;
                recs.push(finishing(batch, per, &mut repo));
            }
            recs
        };
        // the first fold writes the whole state
        for r in fold(20) {
            p.commit(&lake, &r).await.unwrap();
        }
        assert_eq!(state_files(&lake).await, vec![(64, 1, None, 1280)]);
        // then 640 new repos, and a repo of the whole state fails again: 641 repos, at most
        // half of the 1,920
        let mut recs = fold(10);
        recs[10].failed.push(RepoFailed {
            did: measured_did(3),
            reason: "mst".into(),
            detail: String::new(),
            reset: false,
        });
        for r in recs {
            p.commit(&lake, &r).await.unwrap();
        }
        assert_eq!(
            state_files(&lake).await,
            vec![(64, 1, None, 1280), (128, 2, Some(64), 641)]
        );
        let (q, next, _) = Progress::recover(&lake).await.unwrap();
        assert_eq!(sorted_states(&q), sorted_states(&p));
        assert_eq!((q.counts(), q.rows, next), (p.counts(), p.rows, 129));
        assert_eq!(q.counts(), (1919, 0, 1));
        assert_eq!(q.rows, 1280 + 640);
        // 640 more would make the chain hold 1,281 of 2,560 repos: the whole state is written,
        // and the chain before it removed
        for r in fold(10) {
            p.commit(&lake, &r).await.unwrap();
        }
        assert_eq!(state_files(&lake).await, vec![(192, 1, None, 2560)]);
        let (q, _, _) = Progress::recover(&lake).await.unwrap();
        assert_eq!(sorted_states(&q), sorted_states(&p));
        assert_eq!(q.counts(), p.counts());
        // a state file no chain needs (a crash between a whole fold and its clean-up) is read
        // by no one and removed by the next whole fold
        let whole = state_files(&lake).await[0].0;
        let stale = state_path(whole - 1);
        let body = lake.get(&state_path(whole)).await.unwrap().unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["batch"] = (whole - 1).into();
        lake.put_atomic(&stale, serde_json::to_vec(&v).unwrap().into())
            .await
            .unwrap();
        // and so is a batch record a state file covers (a crash between a fold and its
        // clean-up): removed at start, not applied again
        let covered = batch_path(whole - 2);
        let mut old = rec(whole - 2);
        old.failed.push(RepoFailed {
            did: measured_did(0),
            reason: "mst".into(),
            detail: String::new(),
            reset: false,
        });
        lake.put_atomic(&covered, serde_json::to_vec(&old).unwrap().into())
            .await
            .unwrap();
        let (mut q, _, _) = Progress::recover(&lake).await.unwrap();
        assert_eq!(sorted_states(&q), sorted_states(&p));
        assert_eq!(q.stale, vec![whole - 1]);
        assert!(lake.get(&covered).await.unwrap().is_none());
        // a chain that reaches MAX_CHAIN files is written whole, the stale file removed with it
        let mut i = 0;
        while lake.get(&stale).await.unwrap().is_some() {
            for r in fold(0) {
                q.commit(&lake, &r).await.unwrap();
            }
            i += 1;
            assert!(i <= MAX_CHAIN, "never written whole");
        }
        assert_eq!(i, MAX_CHAIN);
        assert_eq!(state_files(&lake).await.len(), 1);
        // a file of the chain missing is an error, not a smaller state
        for r in fold(1) {
            q.commit(&lake, &r).await.unwrap();
        }
        let files = state_files(&lake).await;
        assert_eq!(files.len(), 2);
        lake.delete(&state_path(files[0].0)).await.unwrap();
        let err = Progress::recover(&lake).await.unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }

    /// A fold whose state file cannot be written is an error, and leaves the batch records and
    /// its list of changed repos in place: the next fold writes them, so the chain still adds
    /// up to the state in memory.
    #[tokio::test]
    async fn a_failed_fold_leaves_its_repos_to_the_next_one() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = Lake::open(tmp.path().to_str().unwrap()).unwrap();
        let mut p = Progress::default();
        let mut repo = 0usize;
        let mut record = |batch: i64, per: usize| finishing(batch, per, &mut repo);
        let n = COMPACT_AFTER as i64;
        // a whole state of 640 repos first
        for b in 1..=n {
            p.commit(&lake, &record(b, 10)).await.unwrap();
        }
        assert_eq!(state_files(&lake).await, vec![(n, 1, None, 640)]);
        // the next fold meets a directory where its state file goes (the tests run as root, so
        // a read-only directory would not stop the write): it fails
        let blocker = tmp.path().join(state_path(2 * n));
        std::fs::create_dir_all(blocker.join("x")).unwrap();
        for b in n + 1..2 * n {
            p.commit(&lake, &record(b, 2)).await.unwrap();
        }
        let err = p.commit(&lake, &record(2 * n, 2)).await.unwrap_err();
        assert!(matches!(err, ProgressError::Store(_)), "{err}");
        // the batch records are still there, and a start reads the same state from them
        assert!(lake.get(&batch_path(n + 1)).await.unwrap().is_some());
        let (q, next, _) = Progress::recover(&lake).await.unwrap();
        assert_eq!(sorted_states(&q), sorted_states(&p));
        assert_eq!(next, 2 * n + 1);
        // the next record folds again: its file adds the failed fold's 128 repos and its own 2
        std::fs::remove_dir_all(&blocker).unwrap();
        p.commit(&lake, &record(2 * n + 1, 2)).await.unwrap();
        assert_eq!(
            state_files(&lake).await,
            vec![(n, 1, None, 640), (2 * n + 1, 2, Some(n), 130)]
        );
        assert!(lake.get(&batch_path(n + 1)).await.unwrap().is_none());
        let (q, _, _) = Progress::recover(&lake).await.unwrap();
        assert_eq!(sorted_states(&q), sorted_states(&p));
        assert_eq!(q.counts(), (770, 0, 0));
    }
}
