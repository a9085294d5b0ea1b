//! Where a fetched repository's blocks wait for the MST walk, with bounded memory.
//!
//! A repo CAR's blocks come in any order, so the walk can start only once the whole CAR is in.
//! Blocks stay in memory up to `memory_cap` bytes; past it, every block moves to an unnamed
//! temporary file (deleted by the OS when the store drops, even after a crash) and only an index
//! (CID → offset, about 50 bytes a block) stays in memory. A repo past `max_total` bytes is refused
//! with [`BlocksError::TooLarge`]: no repo can fill a disk either.

use crate::decode::cid::Cid;
use crate::decode::mst::BlockSource;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Why blocks could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum BlocksError {
    /// The repo is larger than the store accepts.
    #[error("repo is over {max} bytes of blocks")]
    TooLarge {
        /// the limit
        max: u64,
    },
    /// The spill file failed.
    #[error("spill file: {0}")]
    Io(#[from] std::io::Error),
}

/// The blocks of one repo, in memory or spilled to a temporary file.
///
/// In memory, every block sits in one arena (one allocation, not one per block); spilled, in
/// the file, read back through a few 1 MiB windows: a PDS writes a repo's CAR in about the
/// order a walk reads it, so most reads are served from a window, not a system call.
#[derive(Debug)]
pub struct RepoBlocks {
    index: HashMap<Cid, (u64, u32)>,
    /// Spilled: the index by the first 8 bytes of each digest (24 bytes an entry instead of
    /// 56; a big repo has a million blocks). Every spilled read is hashed, so two digests that
    /// share a prefix make the walk fail with a mismatch, never read a wrong block.
    short: HashMap<u64, (u64, u32)>,
    arena: Vec<u8>,
    memory_cap: usize,
    max_total: u64,
    spill_dir: PathBuf,
    total: u64,
    spill: Option<Spill>,
}

#[derive(Debug)]
struct Spill {
    out: BufWriter<File>,
    len: u64,
    windows: std::cell::RefCell<Windows>,
}

/// Recently read stretches of the spill file (at most [`WINDOWS`], least recently used out).
#[derive(Debug, Default)]
struct Windows {
    slots: Vec<(u64, Vec<u8>)>,
    tick: u64,
    used: Vec<u64>,
}

/// Windows kept per spilled repo.
const WINDOWS: usize = 4;
/// Bytes read into a window at once.
const WINDOW: usize = 1 << 20;

impl RepoBlocks {
    /// A store that keeps up to `memory_cap` bytes in memory, spills the rest under `spill_dir`,
    /// and refuses a repo over `max_total` bytes.
    pub fn new(memory_cap: usize, max_total: u64, spill_dir: PathBuf) -> Self {
        RepoBlocks {
            index: HashMap::new(),
            short: HashMap::new(),
            arena: Vec::new(),
            memory_cap,
            max_total,
            spill_dir,
            total: 0,
            spill: None,
        }
    }

    /// Bytes of blocks stored.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes held in memory (blocks, not the index).
    pub fn in_memory(&self) -> usize {
        if self.spill.is_some() {
            0
        } else {
            self.total as usize
        }
    }

    /// Whether the blocks went to disk.
    pub fn spilled(&self) -> bool {
        self.spill.is_some()
    }

    /// Empties the store (a fetch that starts over); the spill file, if any, is dropped.
    pub fn clear(&mut self) {
        self.index = HashMap::new();
        self.short = HashMap::new();
        self.arena = Vec::new();
        self.spill = None;
        self.total = 0;
    }

    /// Adds a block (a duplicate CID is ignored: its bytes are the same, the hash says so).
    pub fn insert(&mut self, cid: Cid, data: &[u8]) -> Result<(), BlocksError> {
        if self.index.contains_key(&cid) || self.short.contains_key(&short_key(&cid)) {
            return Ok(());
        }
        let after = self.total + data.len() as u64;
        if after > self.max_total {
            return Err(BlocksError::TooLarge {
                max: self.max_total,
            });
        }
        if self.spill.is_none() && after > self.memory_cap as u64 {
            self.start_spill()?;
        }
        let len = u32::try_from(data.len()).map_err(std::io::Error::other)?;
        match &mut self.spill {
            Some(s) => {
                let at = s.write(data)?;
                self.short.insert(short_key(&cid), (at, len));
            }
            None => {
                let at = self.arena.len() as u64;
                self.arena.extend_from_slice(data);
                self.index.insert(cid, (at, len));
            }
        }
        self.total = after;
        Ok(())
    }

    fn start_spill(&mut self) -> Result<(), BlocksError> {
        std::fs::create_dir_all(&self.spill_dir)?;
        let file = tempfile::tempfile_in(&self.spill_dir)?;
        let mut s = Spill {
            out: BufWriter::with_capacity(1 << 20, file),
            len: 0,
            windows: Default::default(),
        };
        // the arena goes to the file as it is: the offsets stay valid
        s.write(&self.arena)?;
        self.arena = Vec::new();
        self.short = std::mem::take(&mut self.index)
            .into_iter()
            .map(|(c, v)| (short_key(&c), v))
            .collect();
        tracing::debug!(bytes = self.total, dir = %self.spill_dir.display(), "repo spilled to disk");
        metrics::counter!("atlake_backfill_spills_total").increment(1);
        self.spill = Some(s);
        Ok(())
    }

    /// Ends the inserts: flushes the spill file so the walk can read it.
    pub fn seal(&mut self) -> Result<(), BlocksError> {
        if let Some(s) = &mut self.spill {
            s.out.flush()?;
        }
        Ok(())
    }
}

impl Spill {
    /// Appends bytes; returns where they start.
    fn write(&mut self, data: &[u8]) -> std::io::Result<u64> {
        let at = self.len;
        self.out.write_all(data)?;
        self.len += data.len() as u64;
        Ok(at)
    }

    /// Copies `len` bytes at `at` into `out`, through the windows.
    fn read(&self, at: u64, len: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
        let mut w = self.windows.borrow_mut();
        w.tick += 1;
        let tick = w.tick;
        let end = at + len as u64;
        let hit = w
            .slots
            .iter()
            .position(|(start, data)| *start <= at && end <= *start + data.len() as u64);
        let slot = match hit {
            Some(i) => i,
            None => {
                let size = (len.max(WINDOW) as u64).min(self.len.saturating_sub(at)) as usize;
                // the least recently used window's buffer is read into again (a fresh 1 MiB
                // buffer per read is a fresh mapping and 256 page faults)
                let (slot, mut data) = if w.slots.len() < WINDOWS {
                    w.slots.push((at, Vec::new()));
                    w.used.push(tick);
                    (w.slots.len() - 1, Vec::new())
                } else {
                    let oldest = (0..w.used.len()).min_by_key(|&i| w.used[i]).unwrap_or(0);
                    (oldest, std::mem::take(&mut w.slots[oldest].1))
                };
                data.resize(size, 0);
                let read = self.out.get_ref().read_exact_at(&mut data, at);
                w.slots[slot] = (at, data);
                if let Err(e) = read {
                    // the window holds no valid bytes: it must never serve a read
                    w.slots[slot].1.clear();
                    return Err(e);
                }
                slot
            }
        };
        w.used[slot] = tick;
        let (start, data) = &w.slots[slot];
        let from = (at - start) as usize;
        let bytes = data
            .get(from..from + len)
            .ok_or_else(|| std::io::Error::other("a window is shorter than the block"))?;
        out.clear();
        out.extend_from_slice(bytes);
        Ok(())
    }
}

/// The first 8 bytes of a block's digest.
fn short_key(cid: &Cid) -> u64 {
    let d = cid.digest();
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

impl BlockSource for RepoBlocks {
    fn read_block(&self, cid: &Cid, out: &mut Vec<u8>) -> Result<bool, String> {
        let found = match &self.spill {
            None => self.index.get(cid),
            Some(_) => self.short.get(&short_key(cid)),
        };
        let Some(&(at, len)) = found else {
            out.clear();
            return Ok(false);
        };
        match &self.spill {
            None => {
                let from = usize::try_from(at).map_err(|e| e.to_string())?;
                crate::decode::mst::copy_block(self.arena.get(from..from + len as usize), out)
            }
            Some(s) => {
                if !s.out.buffer().is_empty() {
                    return Err("the spill file was read before it was sealed".into());
                }
                s.read(at, len as usize, out).map_err(|e| e.to_string())?;
                // the file is ours, but a disk can still return wrong bytes: the walk trusts
                // nothing it did not hash
                if !cid.matches(out) {
                    return Err(format!("spilled block {cid} came back changed"));
                }
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(i: u32) -> (Cid, Vec<u8>) {
        let b = format!("block number {i} {}", "x".repeat((i % 50) as usize)).into_bytes();
        (Cid::for_raw(&b), b)
    }

    #[test]
    fn blocks_read_back_the_same_in_memory_and_spilled() {
        let dir = tempfile::tempdir().unwrap();
        for cap in [usize::MAX, 2_000, 0] {
            let mut s = RepoBlocks::new(cap, u64::MAX, dir.path().join("spill"));
            let blocks: Vec<_> = (0..500).map(block).collect();
            for (c, b) in &blocks {
                s.insert(*c, b).unwrap();
                s.insert(*c, b).unwrap(); // duplicates are ignored
            }
            s.seal().unwrap();
            let total: usize = blocks.iter().map(|(_, b)| b.len()).sum();
            assert_eq!(s.total(), total as u64);
            assert_eq!(s.spilled(), cap != usize::MAX, "cap {cap}");
            assert_eq!(s.in_memory(), if s.spilled() { 0 } else { total });
            let mut out = Vec::new();
            for (c, b) in &blocks {
                assert!(s.read_block(c, &mut out).unwrap());
                assert_eq!(&out, b);
            }
            assert!(!s.read_block(&block(9999).0, &mut out).unwrap());
        }
        // the spill files are unnamed: nothing is left in the directory
        let left = std::fs::read_dir(dir.path().join("spill")).unwrap().count();
        assert_eq!(left, 0);
    }

    /// A spill of many windows read forwards, backwards and strided: windows are evicted and
    /// their buffers read into again, at other lengths (a block larger than a window, the short
    /// window at the end of the file), and every read gives the block's own bytes.
    #[test]
    fn reused_windows_give_each_block_its_own_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = RepoBlocks::new(0, u64::MAX, dir.path().to_path_buf());
        let blocks: Vec<(Cid, Vec<u8>)> = (0..120u32)
            .map(|i| {
                // mostly 100 KiB; one of 2.5 MiB; all bytes differ by block
                let len = if i == 57 { 5 << 19 } else { 100 << 10 };
                let b: Vec<u8> = (0..len)
                    .map(|j| (j as u32 ^ i.wrapping_mul(2654435761)) as u8)
                    .collect();
                (Cid::for_raw(&b), b)
            })
            .collect();
        for (c, b) in &blocks {
            s.insert(*c, b).unwrap();
        }
        s.seal().unwrap();
        assert!(s.total() > 8 * WINDOW as u64);
        let n = blocks.len();
        let order = (0..n)
            .chain((0..n).rev())
            .chain((0..n).map(|i| (i * 37) % n))
            .chain([n - 1, 0, 57, n - 1, 56, 58]);
        let mut out = Vec::new();
        for i in order {
            let (c, b) = &blocks[i];
            assert!(s.read_block(c, &mut out).unwrap(), "block {i}");
            assert!(&out == b, "block {i} came back different");
        }
    }

    #[test]
    fn a_repo_over_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = RepoBlocks::new(100, 1_000, dir.path().to_path_buf());
        let mut err = None;
        for i in 0..100 {
            let (c, b) = block(i);
            if let Err(e) = s.insert(c, &b) {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(BlocksError::TooLarge { max: 1_000 })));
        assert!(s.total() <= 1_000);
    }

    #[test]
    fn reading_before_sealing_is_an_error_not_a_short_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = RepoBlocks::new(0, u64::MAX, dir.path().to_path_buf());
        let (c, b) = block(1);
        s.insert(c, &b).unwrap();
        let mut out = Vec::new();
        assert!(s.read_block(&c, &mut out).is_err());
        s.seal().unwrap();
        assert!(s.read_block(&c, &mut out).unwrap());
    }
}

#[cfg(test)]
mod walk_tests {
    use super::*;
    use crate::decode::car::CarStream;
    use crate::decode::repo;

    /// A repo streamed in small chunks into a store with a tiny memory cap spills, and its walk
    /// gives every record, the same as in memory.
    #[test]
    fn a_spilled_repo_walks_like_one_in_memory() {
        let did = "did:plc:spillspillspillspillspil";
        let r = repo::sample::repo(did, 2_000, 0);
        let (root, keys, car) = (r.root, r.keys.clone(), r.car());
        let dir = tempfile::tempdir().unwrap();
        for cap in [usize::MAX, 10_000] {
            let mut store = RepoBlocks::new(cap, u64::MAX, dir.path().to_path_buf());
            let mut s = CarStream::new(1 << 20);
            for part in car.chunks(1000) {
                s.push(part);
                while let Some((c, b)) = s.next_block().unwrap() {
                    store.insert(c, b).unwrap();
                }
            }
            s.finish().unwrap();
            store.seal().unwrap();
            assert_eq!(store.spilled(), cap == 10_000);
            let mut got = Vec::new();
            let (commit, n) = repo::walk_records(&store, &root, did, &mut |r| {
                got.push((format!("{}/{}", r.collection, r.rkey), *r.cid));
                Ok(())
            })
            .unwrap();
            assert_eq!(commit.rev.as_deref(), Some("3l5kq2zbzxk2c"));
            assert_eq!(n, 2_000);
            assert_eq!(got, keys);
        }
    }
}
