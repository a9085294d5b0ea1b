//! The deletions the lake knows, and what they do to a row: the rules of the purge, shared by
//! compaction, the purge scan and export.
//!
//! A fact is a record delete (did, collection, rkey, time) or an account deleted or taken down
//! (did, time). Each is held as a 128-bit keyed hash of what it names (two independent 64-bit
//! hashes, keyed at random per process) and the time of its newest event: 24 bytes, not the
//! strings. Two different records share a key with a chance of about n²/2¹²⁹ (10⁻²¹ for a
//! billion deletes), and since the keys are secret, input cannot choose them.
//!
//! **Memory is bounded by [`Budget::memory`], whatever the lake's size.** Facts are gathered in
//! a hash table. When the next growth of that table would pass the budget, its facts are sorted
//! and written as a run to an unnamed temporary file in [`Budget::spill_dir`] (the OS deletes it
//! when the process ends, even by a crash). Sealing merges the runs into one sorted file (the
//! newest time kept per key), and only small indexes stay in memory: a directory of buckets
//! (the top bits of a key give the stretch of the file that holds it; at most an eighth of the
//! budget) and a Bloom filter (half the budget), so that a row whose key is not a fact
//! (almost every row) is answered without reading the file. A key the filter lets through costs
//! a binary search with positional reads in one bucket, served by the page cache, and its answer
//! is kept in a small direct-mapped cache (a sixteenth of the budget), since the rows of one
//! deleted account or record come many times. A lake whose facts fit the budget never touches
//! the disk.

use super::CheckpointError;
use crate::sink::partition::{LakeFile, PartitionName};
use crate::sink::read::Origin;
use crate::sink::store::Lake;
use arrow::array::{Array, AsArray, BooleanArray, RecordBatch, StringArray};
use arrow::datatypes::Int64Type;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Why the facts could not be held or read.
#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    /// A spill file could not be written or read.
    #[error("deletion facts spilled to {dir}: {source}")]
    Spill {
        /// The spill directory.
        dir: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Facts were looked up while some sat in runs not merged yet.
    #[error("deletion facts were read before they were sealed")]
    Unsealed,
}

/// How much memory the facts may take, and where they go beyond it.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Bytes of memory for the facts (the table while loading; the directory, the Bloom filter
    /// and the cache of answers once spilled, and the merge's read buffers while sealing).
    pub memory: usize,
    /// Where runs and the merged file are written (unnamed temporary files).
    pub spill_dir: PathBuf,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget {
            memory: 64 << 20,
            spill_dir: std::env::temp_dir(),
        }
    }
}

impl Budget {
    /// The budget `[privacy]` sets.
    pub fn from_config(c: &crate::config::PrivacyConfig) -> Budget {
        Budget {
            // a budget beyond the address space (only on a 32-bit target) is the address space
            memory: usize::try_from(c.facts_memory.0).unwrap_or(usize::MAX),
            spill_dir: if c.spill_dir.is_empty() {
                std::env::temp_dir()
            } else {
                PathBuf::from(&c.spill_dir)
            },
        }
    }
}

/// A fact's key: the two hashes of what it names.
type Key = [u64; 2];
/// Bytes of one fact on disk: the key's two words, then the time (little-endian).
const ENTRY: usize = 24;
/// Entries read at once at the end of a binary search.
const WINDOW: usize = 170;
/// Bytes of table a fact costs at the table's fullest, with the sorted copy made at a spill
/// (hashbrown: 24 bytes and a control byte a bucket, 8 buckets per 7 facts; the copy: 24).
const SPILL_BYTES_PER_FACT: usize = 53;

/// Deletions known to the lake (see the module's text).
#[derive(Debug, Default)]
pub struct Facts {
    /// The two keys of a fact's hash.
    keys: [ahash::RandomState; 2],
    budget: Budget,
    /// Facts in memory: key → time of the newest event (µs).
    recent: HashMap<Key, i64, ahash::RandomState>,
    /// Sorted runs written since the last seal.
    runs: Vec<Run>,
    /// The merged facts, once any went to disk.
    disk: Option<Disk>,
}

/// A sorted file of facts.
#[derive(Debug)]
struct Run {
    file: File,
    len: u64,
}

/// The sealed facts on disk.
#[derive(Debug)]
struct Disk {
    run: Run,
    /// A key's bucket is the top `bits` bits of its first word (none: one bucket).
    bits: u32,
    /// Bucket b's entries are `dir[b]..dir[b + 1]`.
    dir: Vec<u64>,
    bloom: Vec<u64>,
    hashes: u32,
    /// The last answers read from the file, one per slot (a key's slot from its first word):
    /// the rows of one account, or of one record, come many times, and each would cost a read.
    cache: Vec<CacheSlot>,
}

/// A slot of [`Disk::cache`]: a key and its answer.
type CacheSlot = std::sync::Mutex<Option<(Key, Option<i64>)>>;

/// What happens to one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Keep,
    /// Keep the row, without its content.
    Blank,
    /// Remove the row.
    Drop,
}

/// The bucket of a key whose first word is `k0`, of `1 << bits` buckets (`bits` ≤ 40).
fn bucket_of(k0: u64, bits: u32) -> usize {
    if bits == 0 {
        0
    } else {
        (k0 >> (64 - bits)) as usize
    }
}

fn encode(key: Key, t: i64) -> [u8; ENTRY] {
    let mut b = [0u8; ENTRY];
    b[..8].copy_from_slice(&key[0].to_le_bytes());
    b[8..16].copy_from_slice(&key[1].to_le_bytes());
    b[16..].copy_from_slice(&t.to_le_bytes());
    b
}

fn decode(b: &[u8; ENTRY]) -> (Key, i64) {
    let w = |i: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[i..i + 8]);
        x
    };
    (
        [u64::from_le_bytes(w(0)), u64::from_le_bytes(w(8))],
        i64::from_le_bytes(w(16)),
    )
}

impl Disk {
    /// The filter's word for `key` and the bits it sets there: a blocked Bloom filter (one
    /// 64-bit word per key, so one cache miss per lookup), the word from the key's second half,
    /// the bits from 6-bit slices of its first.
    fn slot(key: Key, hashes: u32, words: usize) -> (usize, u64) {
        let mask = (0..hashes).fold(0u64, |m, i| m | 1 << ((key[0] >> (6 * i)) & 63));
        ((key[1] % words as u64) as usize, mask)
    }

    fn may_hold(&self, key: Key) -> bool {
        let (w, mask) = Self::slot(key, self.hashes, self.bloom.len());
        self.bloom[w] & mask == mask
    }

    fn read(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.run.file.read_exact_at(buf, at * ENTRY as u64)
    }

    fn get(&self, key: Key) -> std::io::Result<Option<i64>> {
        if !self.may_hold(key) {
            return Ok(None);
        }
        let slot = &self.cache[(key[0] % self.cache.len() as u64) as usize];
        // a poisoned slot holds a whole answer all the same (it is written in one assignment)
        let lock = || slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, v)) = *lock()
            && k == key
        {
            return Ok(v);
        }
        let v = self.search(key)?;
        *lock() = Some((key, v));
        Ok(v)
    }

    /// The binary search for `key` in its bucket of the file.
    fn search(&self, key: Key) -> std::io::Result<Option<i64>> {
        let b = bucket_of(key[0], self.bits);
        let (mut lo, mut hi) = (self.dir[b], self.dir[b + 1]);
        let mut one = [0u8; ENTRY];
        while hi - lo > WINDOW as u64 {
            let mid = lo + (hi - lo) / 2;
            self.read(mid, &mut one)?;
            let (k, t) = decode(&one);
            match k.cmp(&key) {
                std::cmp::Ordering::Equal => return Ok(Some(t)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        let mut window = [0u8; WINDOW * ENTRY];
        let n = (hi - lo) as usize;
        self.read(lo, &mut window[..n * ENTRY])?;
        for e in window[..n * ENTRY].as_chunks::<ENTRY>().0 {
            let (k, t) = decode(e);
            if k == key {
                return Ok(Some(t));
            }
            if k > key {
                break;
            }
        }
        Ok(None)
    }
}

impl Facts {
    /// No facts, held within `budget`.
    pub fn new(budget: Budget) -> Facts {
        Facts {
            budget,
            ..Facts::default()
        }
    }

    /// Whether there is nothing to purge.
    pub fn is_empty(&self) -> bool {
        self.recent.is_empty()
            && self.runs.is_empty()
            && self.disk.as_ref().is_none_or(|d| d.run.len == 0)
    }

    /// Distinct facts held (sealed; runs not merged yet may count a fact twice).
    pub fn len(&self) -> u64 {
        self.recent.len() as u64
            + self.runs.iter().map(|r| r.len).sum::<u64>()
            + self.disk.as_ref().map_or(0, |d| d.run.len)
    }

    /// Whether any fact went to disk.
    pub fn spilled(&self) -> bool {
        self.disk.is_some() || !self.runs.is_empty()
    }

    /// Bytes of memory held now: the table, and the disk's directory, filter and cache.
    pub fn memory_bytes(&self) -> usize {
        let table = if self.recent.capacity() == 0 {
            0
        } else {
            // buckets: a power of two of at least 8/7 of the capacity
            (self.recent.capacity() * 8 / 7).next_power_of_two() * (ENTRY + 1)
        };
        table + self.disk_bytes()
    }

    /// Bytes the sealed facts' indexes hold: the directory, the filter and the cache.
    fn disk_bytes(&self) -> usize {
        self.disk.as_ref().map_or(0, |d| {
            (d.dir.capacity() + d.bloom.capacity()) * 8
                + d.cache.capacity() * std::mem::size_of::<CacheSlot>()
        })
    }

    /// The key of a record: its (did, collection, rkey) hashed under both keys (a `str` hashes
    /// its bytes and a terminator, so the parts cannot run into each other; the tag keeps a
    /// record's key apart from an account's).
    fn record_key(&self, did: &str, coll: &str, rkey: &str) -> Key {
        let [a, b] = &self.keys;
        [
            a.hash_one((0u8, did, coll, rkey)),
            b.hash_one((0u8, did, coll, rkey)),
        ]
    }

    fn account_key(&self, did: &str) -> Key {
        let [a, b] = &self.keys;
        [a.hash_one((1u8, did)), b.hash_one((1u8, did))]
    }

    fn get(&self, key: Key) -> Result<Option<i64>, FactsError> {
        if !self.runs.is_empty() {
            return Err(FactsError::Unsealed);
        }
        let mem = self.recent.get(&key).copied();
        let disk = match &self.disk {
            Some(d) => d.get(key).map_err(|e| self.spill_error(e))?,
            None => None,
        };
        Ok(mem.max(disk))
    }

    /// When the record was last deleted, if it was.
    pub fn record_deleted(
        &self,
        did: &str,
        coll: &str,
        rkey: &str,
    ) -> Result<Option<i64>, FactsError> {
        self.get(self.record_key(did, coll, rkey))
    }

    /// When the account was last deleted or taken down, if it was.
    pub fn account_deleted(&self, did: &str) -> Result<Option<i64>, FactsError> {
        self.get(self.account_key(did))
    }

    fn spill_error(&self, source: std::io::Error) -> FactsError {
        FactsError::Spill {
            dir: self.budget.spill_dir.display().to_string(),
            source,
        }
    }

    fn add(&mut self, key: Key, t: i64) -> Result<(), FactsError> {
        if let Some(slot) = self.recent.get_mut(&key) {
            *slot = (*slot).max(t);
            return Ok(());
        }
        // the table is full: it grows only if twice its capacity, with the sorted copy a
        // spill makes, still fits the budget beside the sealed facts' indexes
        let cap = self.recent.capacity();
        let room = self.budget.memory.saturating_sub(self.disk_bytes());
        if self.recent.len() == cap
            && cap > 0
            && cap.saturating_mul(2).saturating_mul(SPILL_BYTES_PER_FACT) > room
        {
            self.spill()?;
        }
        self.recent.insert(key, t);
        Ok(())
    }

    /// Adds a delete of the record (did, collection, rkey) at `t` (µs).
    pub fn add_record(
        &mut self,
        did: &str,
        coll: &str,
        rkey: &str,
        t: i64,
    ) -> Result<(), FactsError> {
        self.add(self.record_key(did, coll, rkey), t)
    }

    /// Adds a deletion or takedown of the account at `t` (µs).
    pub fn add_account(&mut self, did: &str, t: i64) -> Result<(), FactsError> {
        self.add(self.account_key(did), t)
    }

    /// Writes the table's facts, sorted, as a run, and empties the table.
    fn spill(&mut self) -> Result<(), FactsError> {
        let table = std::mem::take(&mut self.recent);
        let mut sorted: Vec<(Key, i64)> = table.into_iter().collect();
        sorted.sort_unstable_by_key(|e| e.0);
        let io = || -> std::io::Result<File> {
            let file = tempfile::tempfile_in(&self.budget.spill_dir)?;
            let mut w = BufWriter::with_capacity(1 << 16, &file);
            for (k, t) in &sorted {
                w.write_all(&encode(*k, *t))?;
            }
            w.flush()?;
            drop(w);
            Ok(file)
        };
        let file = io().map_err(|e| self.spill_error(e))?;
        self.runs.push(Run {
            file,
            len: sorted.len() as u64,
        });
        Ok(())
    }

    /// Makes every fact readable: runs (and the facts of the table and of an earlier seal, when
    /// there are runs) are merged into one sorted file, with its directory and filter.
    pub fn seal(&mut self) -> Result<(), FactsError> {
        if self.runs.is_empty() {
            return Ok(());
        }
        if !self.recent.is_empty() {
            self.spill()?;
        }
        // the table's memory goes back before the merge and the indexes take theirs
        self.recent = HashMap::default();
        let mut runs = std::mem::take(&mut self.runs);
        if let Some(d) = self.disk.take() {
            runs.push(d.run);
        }
        let disk = self.merge(runs).map_err(|e| self.spill_error(e))?;
        self.disk = Some(disk);
        Ok(())
    }

    fn merge(&self, runs: Vec<Run>) -> std::io::Result<Disk> {
        let memory = self.budget.memory;
        let upper: u64 = runs.iter().map(|r| r.len).sum();
        // buckets of about 32 to 64 facts, the directory within an eighth of the budget
        let max_dir = (memory / 64).max(2) as u64;
        let mut bits = 0u32;
        while bits < 40 && (2u64 << bits) < max_dir && (upper >> (bits + 1)) >= 32 {
            bits += 1;
        }
        let buckets = 1usize << bits;
        let mut dir = vec![0u64; buckets + 1];
        let words = (memory / 2 / 8).max(1);
        let mut bloom = vec![0u64; words];
        let m = words as u64 * 64;
        let hashes = ((m as f64 / upper.max(1) as f64) * std::f64::consts::LN_2)
            .round()
            .clamp(1.0, 8.0) as u32;

        let per = (memory / 4 / runs.len().max(1)).clamp(4 << 10, 1 << 20);
        let mut readers = Vec::with_capacity(runs.len());
        for r in &runs {
            let mut f = &r.file;
            f.seek(SeekFrom::Start(0))?;
            readers.push((BufReader::with_capacity(per, f), r.len));
        }
        let next = |r: &mut (BufReader<&File>, u64)| -> std::io::Result<Option<(Key, i64)>> {
            if r.1 == 0 {
                return Ok(None);
            }
            r.1 -= 1;
            let mut e = [0u8; ENTRY];
            r.0.read_exact(&mut e)?;
            Ok(Some(decode(&e)))
        };
        let mut heap = BinaryHeap::with_capacity(readers.len());
        for (i, r) in readers.iter_mut().enumerate() {
            if let Some((k, t)) = next(r)? {
                heap.push(Reverse((k, t, i)));
            }
        }
        let out = tempfile::tempfile_in(&self.budget.spill_dir)?;
        let mut w = BufWriter::with_capacity(1 << 20, &out);
        let (mut n, mut next_bucket) = (0u64, 0usize);
        let mut pending: Option<(Key, i64)> = None;
        let mut emit = |(k, t): (Key, i64), n: &mut u64| -> std::io::Result<()> {
            w.write_all(&encode(k, t))?;
            let b = bucket_of(k[0], bits);
            while next_bucket <= b {
                dir[next_bucket] = *n;
                next_bucket += 1;
            }
            let (w, mask) = Disk::slot(k, hashes, words);
            bloom[w] |= mask;
            *n += 1;
            Ok(())
        };
        while let Some(Reverse((k, t, i))) = heap.pop() {
            match &mut pending {
                Some((pk, pt)) if *pk == k => *pt = (*pt).max(t),
                _ => {
                    if let Some(p) = pending.replace((k, t)) {
                        emit(p, &mut n)?;
                    }
                }
            }
            if let Some((k, t)) = next(&mut readers[i])? {
                heap.push(Reverse((k, t, i)));
            }
        }
        if let Some(p) = pending {
            emit(p, &mut n)?;
        }
        w.flush()?;
        drop(w);
        for d in dir.iter_mut().skip(next_bucket) {
            *d = n;
        }
        // the read buffers are gone: the cache takes a sixteenth of the budget
        let slots = (memory / 16 / std::mem::size_of::<CacheSlot>()).clamp(16, 1 << 16);
        Ok(Disk {
            run: Run { file: out, len: n },
            bits,
            dir,
            bloom,
            hashes,
            cache: (0..slots).map(|_| std::sync::Mutex::new(None)).collect(),
        })
    }

    pub(crate) fn verdict(
        &self,
        name: &PartitionName,
        row: &KeyRow<'_>,
    ) -> Result<Verdict, FactsError> {
        if *name == PartitionName::Account {
            return Ok(Verdict::Keep);
        }
        if self.account_deleted(row.did)?.is_some_and(|t| row.time < t) {
            return Ok(Verdict::Drop);
        }
        if !row.has_content || !matches!(row.op, Some("create" | "update")) {
            return Ok(Verdict::Keep);
        }
        let (Some(c), Some(r)) = (row.coll, row.rkey) else {
            return Ok(Verdict::Keep);
        };
        Ok(match self.record_deleted(row.did, c, r)? {
            Some(t) if row.time < t => Verdict::Blank,
            _ => Verdict::Keep,
        })
    }
}

/// The columns of a row the purge decides on.
pub(crate) struct KeyRow<'a> {
    pub did: &'a str,
    pub coll: Option<&'a str>,
    pub rkey: Option<&'a str>,
    pub op: Option<&'a str>,
    pub time: i64,
    pub has_content: bool,
}

pub(crate) fn opt(a: &StringArray, i: usize) -> Option<&str> {
    a.is_valid(i).then(|| a.value(i))
}

/// The columns [`KeyRow`] reads.
pub(crate) const KEY_COLUMNS: &[&str] =
    &["did", "collection", "rkey", "operation", "time_us", "cid"];

/// The verdict of every row of `b` (which has at least [`KEY_COLUMNS`] and, for content,
/// `record` when present).
pub(crate) fn verdicts(
    facts: &Facts,
    name: &PartitionName,
    b: &RecordBatch,
    path: &str,
) -> Result<Vec<Verdict>, CheckpointError> {
    let err = |m: String| CheckpointError::File {
        path: path.to_string(),
        message: m,
    };
    let s = |n: &str| -> Result<&StringArray, CheckpointError> {
        b.column_by_name(n)
            .and_then(|a| a.as_string_opt::<i32>())
            .ok_or_else(|| err(format!("column `{n}` is missing or not Utf8")))
    };
    let (did, coll, rkey, op, cid) = (
        s("did")?,
        s("collection")?,
        s("rkey")?,
        s("operation")?,
        s("cid")?,
    );
    let record = b.column_by_name("record");
    let time = b
        .column_by_name("time_us")
        .and_then(|a| a.as_primitive_opt::<Int64Type>())
        .ok_or_else(|| err("column `time_us` is missing or not Int64".into()))?;
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        if !did.is_valid(i) || !time.is_valid(i) {
            return Err(err(format!("row {i}: `did` or `time_us` is null")));
        }
        out.push(facts.verdict(
            name,
            &KeyRow {
                did: did.value(i),
                coll: opt(coll, i),
                rkey: opt(rkey, i),
                op: opt(op, i),
                time: time.value(i),
                has_content: cid.is_valid(i) || record.is_some_and(|r| r.is_valid(i)),
            },
        )?);
    }
    Ok(out)
}

/// `b` with the purge applied: dropped rows removed, blanked rows without `cid` and `record`.
pub fn purge_batch(
    b: RecordBatch,
    facts: &Facts,
    name: &PartitionName,
    path: &str,
) -> Result<RecordBatch, CheckpointError> {
    if facts.is_empty() {
        return Ok(b);
    }
    let err = |e: arrow::error::ArrowError| CheckpointError::File {
        path: path.to_string(),
        message: e.to_string(),
    };
    let v = verdicts(facts, name, &b, path)?;
    let mut b = b;
    if v.contains(&Verdict::Blank) {
        let blank = BooleanArray::from(v.iter().map(|v| *v == Verdict::Blank).collect::<Vec<_>>());
        let schema = b.schema();
        let mut cols = b.columns().to_vec();
        for c in ["cid", "record"] {
            if let Ok(i) = schema.index_of(c) {
                cols[i] = arrow::compute::nullif(&cols[i], &blank).map_err(err)?;
            }
        }
        b = RecordBatch::try_new(schema, cols).map_err(err)?;
    }
    if v.contains(&Verdict::Drop) {
        let keep = BooleanArray::from(v.iter().map(|v| *v != Verdict::Drop).collect::<Vec<_>>());
        b = arrow::compute::filter_record_batch(&b, &keep).map_err(err)?;
    }
    Ok(b)
}

/// Reads the facts (record deletes, account deletions and takedowns) of `files`, held within
/// `budget`, and seals them.
pub async fn load_facts(
    lake: &Lake,
    files: &[LakeFile],
    budget: &Budget,
) -> Result<Facts, CheckpointError> {
    let mut facts = Facts::new(budget.clone());
    for f in files {
        let account = f.key.name == PartitionName::Account;
        if !account
            && !matches!(
                f.key.name,
                PartitionName::Collection(_) | PartitionName::Other
            )
        {
            continue;
        }
        let origin = Origin::of(lake, f);
        let path = f.path.clone();
        // the file is read and its facts added (maybe spilled) off the runtime
        facts = tokio::task::spawn_blocking(move || {
            facts_of(&origin, &path, account, &mut facts).map(|()| facts)
        })
        .await
        .map_err(|e| CheckpointError::File {
            path: f.path.clone(),
            message: e.to_string(),
        })??;
    }
    let facts = tokio::task::spawn_blocking(move || facts.seal().map(|()| facts))
        .await
        .map_err(|e| CheckpointError::File {
            path: "deletion facts".into(),
            message: e.to_string(),
        })??;
    tracing::info!(
        files = files.len(),
        facts = facts.len(),
        spilled = facts.spilled(),
        memory_bytes = facts.memory_bytes(),
        "deletion facts loaded"
    );
    Ok(facts)
}

/// Adds the facts of one file: record deletes, and (for `_account`) account deletions.
fn facts_of(
    origin: &Origin,
    path: &str,
    account: bool,
    facts: &mut Facts,
) -> Result<(), CheckpointError> {
    let err = |m: String| CheckpointError::File {
        path: path.to_string(),
        message: m,
    };
    let cols: &[&str] = if account {
        &["did", "time_us", "status"]
    } else {
        &["did", "collection", "rkey", "operation", "time_us"]
    };
    for b in origin.open(path, Some(cols), 8192)? {
        let b = b.map_err(|e| err(e.to_string()))?;
        let s = |n: &str| {
            b.column_by_name(n)
                .and_then(|a| a.as_string_opt::<i32>())
                .ok_or_else(|| err(format!("column `{n}` is missing or not Utf8")))
        };
        let did = s("did")?;
        let time = b
            .column_by_name("time_us")
            .and_then(|a| a.as_primitive_opt::<Int64Type>())
            .ok_or_else(|| err("column `time_us` is missing or not Int64".into()))?;
        if account {
            let status = s("status")?;
            for i in 0..b.num_rows() {
                if status.is_valid(i) && matches!(status.value(i), "deleted" | "takendown") {
                    facts.add_account(did.value(i), time.value(i))?;
                }
            }
        } else {
            let (coll, rkey, op) = (s("collection")?, s("rkey")?, s("operation")?);
            for i in 0..b.num_rows() {
                if op.is_valid(i) && op.value(i) == "delete" && coll.is_valid(i) && rkey.is_valid(i)
                {
                    facts.add_record(did.value(i), coll.value(i), rkey.value(i), time.value(i))?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record delete is found by exactly its (did, collection, rkey): not by the same
    /// bytes cut elsewhere, nor by another record of the account, nor in another `Facts` (each
    /// has its own keys), and the newest delete's time is kept.
    #[test]
    fn record_facts_match_exactly_their_record() {
        let mut f = Facts::default();
        f.add_record("did:plc:a", "app.bsky.feed.like", "3kabc", 10)
            .unwrap();
        f.add_record("did:plc:a", "app.bsky.feed.like", "3kabc", 30)
            .unwrap();
        f.add_record("did:plc:a", "app.bsky.feed.like", "3kabc", 20)
            .unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(
            f.record_deleted("did:plc:a", "app.bsky.feed.like", "3kabc")
                .unwrap(),
            Some(30)
        );
        for (d, c, r) in [
            ("did:plc:a", "app.bsky.feed.like3", "kabc"),
            ("did:plc:a", "app.bsky.feed.lik", "e3kabc"),
            ("did:plc:aapp.bsky.feed.like", "", "3kabc"),
            ("did:plc:a", "app.bsky.feed.like", "3kabd"),
            ("did:plc:b", "app.bsky.feed.like", "3kabc"),
        ] {
            assert_eq!(f.record_deleted(d, c, r).unwrap(), None, "{d} {c} {r}");
        }
        assert_eq!(
            Facts::default()
                .record_deleted("did:plc:a", "app.bsky.feed.like", "3kabc")
                .unwrap(),
            None
        );
    }

    /// The purge's verdicts: older content of a deleted record is blanked, newer is kept, a
    /// delete row stays, a deleted account's older rows go except its `#account` events.
    #[test]
    fn verdicts_follow_the_facts() {
        let mut f = Facts::default();
        f.add_record("did:plc:a", "app.bsky.feed.post", "3k1", 100)
            .unwrap();
        f.add_account("did:plc:gone", 500).unwrap();
        let post = PartitionName::Collection("app.bsky.feed.post".into());
        let row = |did, rkey, op, time, content| KeyRow {
            did,
            coll: Some("app.bsky.feed.post"),
            rkey: Some(rkey),
            op: Some(op),
            time,
            has_content: content,
        };
        let (ident, acct) = (PartitionName::Identity, PartitionName::Account);
        let cases = [
            (
                &post,
                ("did:plc:a", "3k1", "create", 50, true),
                Verdict::Blank,
                "older content",
            ),
            (
                &post,
                ("did:plc:a", "3k1", "update", 99, true),
                Verdict::Blank,
                "older update",
            ),
            (
                &post,
                ("did:plc:a", "3k1", "create", 50, false),
                Verdict::Keep,
                "already purged",
            ),
            (
                &post,
                ("did:plc:a", "3k1", "create", 150, true),
                Verdict::Keep,
                "re-created later",
            ),
            (
                &post,
                ("did:plc:a", "3k1", "delete", 100, false),
                Verdict::Keep,
                "the delete",
            ),
            (
                &post,
                ("did:plc:a", "3k2", "create", 50, true),
                Verdict::Keep,
                "another rkey",
            ),
            (
                &post,
                ("did:plc:b", "3k1", "create", 50, true),
                Verdict::Keep,
                "another did",
            ),
            (
                &post,
                ("did:plc:gone", "x", "create", 499, true),
                Verdict::Drop,
                "gone account",
            ),
            (
                &post,
                ("did:plc:gone", "x", "delete", 499, false),
                Verdict::Drop,
                "its deletes",
            ),
            (
                &post,
                ("did:plc:gone", "x", "create", 501, true),
                Verdict::Keep,
                "after the deletion",
            ),
            (
                &ident,
                ("did:plc:gone", "x", "create", 1, false),
                Verdict::Drop,
                "its identity",
            ),
            (
                &acct,
                ("did:plc:gone", "x", "create", 1, false),
                Verdict::Keep,
                "its account events",
            ),
        ];
        for (name, (did, rkey, op, t, content), want, why) in cases {
            assert_eq!(
                f.verdict(name, &row(did, rkey, op, t, content)).unwrap(),
                want,
                "{why}"
            );
        }
        f.add_record("did:plc:a", "app.bsky.feed.post", "3k1", 40)
            .unwrap();
        assert_eq!(
            f.verdict(&post, &row("did:plc:a", "3k1", "create", 50, true))
                .unwrap(),
            Verdict::Blank,
            "the newest delete counts"
        );
        assert_eq!(f.len(), 2);
    }

    /// Facts beyond the budget go to disk and answer exactly as in memory: every record and
    /// account with its newest time and nothing else, memory within the budget all along, no
    /// answer before the runs are sealed, and a second seal after more facts keeps the first.
    #[test]
    fn spilled_facts_answer_exactly_within_their_budget() {
        let dir = tempfile::tempdir().unwrap();
        let budget = Budget {
            memory: 64 << 10,
            spill_dir: dir.path().into(),
        };
        let mut f = Facts::new(budget.clone());
        let mut want = (HashMap::new(), HashMap::new());
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut peak = 0;
        type Want = (HashMap<(String, String), i64>, HashMap<String, i64>);
        let mut add = |f: &mut Facts, n: u64, from: u64, peak: &mut usize, want: &mut Want| {
            let (records, accounts) = want;
            for i in from..from + n {
                let did = format!("did:plc:{:06}", rnd() % 5000);
                // every 5th delete is of a record deleted before (an older or newer time)
                let rkey = if i % 5 == 4 {
                    format!("3k{}", i / 2)
                } else {
                    format!("3k{i}")
                };
                let t = (rnd() % 1_000_000) as i64;
                f.add_record(&did, "app.bsky.feed.like", &rkey, t).unwrap();
                let e = records.entry((did.clone(), rkey)).or_insert(t);
                *e = (*e).max(t);
                if i % 40 == 0 {
                    f.add_account(&did, t).unwrap();
                    let e = accounts.entry(did).or_insert(t);
                    *e = (*e).max(t);
                }
                *peak = (*peak).max(f.memory_bytes());
            }
        };
        let check = |f: &Facts,
                     records: &HashMap<(String, String), i64>,
                     accounts: &HashMap<String, i64>| {
            assert_eq!(f.len(), (records.len() + accounts.len()) as u64);
            for ((did, rkey), t) in records {
                let got = f.record_deleted(did, "app.bsky.feed.like", rkey).unwrap();
                assert_eq!(got, Some(*t), "{did} {rkey}");
                assert_eq!(
                    f.record_deleted(did, "app.bsky.feed.post", rkey).unwrap(),
                    None
                );
                assert_eq!(
                    f.record_deleted(did, "app.bsky.feed.like", &format!("{rkey}x"))
                        .unwrap(),
                    None
                );
            }
            for n in 0..5000 {
                let did = format!("did:plc:{n:06}");
                assert_eq!(
                    f.account_deleted(&did).unwrap(),
                    accounts.get(&did).copied(),
                    "{did}"
                );
            }
        };
        add(&mut f, 100_000, 0, &mut peak, &mut want);
        assert!(f.spilled());
        assert!(peak > 0 && peak <= budget.memory, "{peak}");
        assert!(matches!(
            f.record_deleted("did:plc:000001", "app.bsky.feed.like", "3k1"),
            Err(FactsError::Unsealed)
        ));
        f.seal().unwrap();
        assert!(f.memory_bytes() <= budget.memory, "{}", f.memory_bytes());
        check(&f, &want.0, &want.1);
        // more facts after a seal (some of the same records, deleted again), sealed again
        add(&mut f, 30_000, 90_000, &mut peak, &mut want);
        f.seal().unwrap();
        assert!(peak <= budget.memory && f.memory_bytes() <= budget.memory);
        check(&f, &want.0, &want.1);
        // the spill files have no names: nothing is left behind in the directory
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }

    /// Within the budget nothing goes to disk.
    #[test]
    fn facts_within_the_budget_stay_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Facts::new(Budget {
            memory: 1 << 20,
            spill_dir: dir.path().join("absent"),
        });
        for i in 0..5000 {
            f.add_record("did:plc:a", "app.bsky.feed.like", &format!("3k{i}"), i)
                .unwrap();
        }
        f.seal().unwrap();
        assert!(!f.spilled());
        assert_eq!(
            f.record_deleted("did:plc:a", "app.bsky.feed.like", "3k4999")
                .unwrap(),
            Some(4999)
        );
    }
}
