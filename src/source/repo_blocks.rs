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
#[derive(Debug)]
pub struct RepoBlocks {
    mem: HashMap<Cid, Vec<u8>>,
    memory_cap: usize,
    max_total: u64,
    spill_dir: PathBuf,
    total: u64,
    spill: Option<Spill>,
}

#[derive(Debug)]
struct Spill {
    out: BufWriter<File>,
    index: HashMap<Cid, (u64, u32)>,
    len: u64,
}

impl RepoBlocks {
    /// A store that keeps up to `memory_cap` bytes in memory, spills the rest under `spill_dir`,
    /// and refuses a repo over `max_total` bytes.
    pub fn new(memory_cap: usize, max_total: u64, spill_dir: PathBuf) -> Self {
        RepoBlocks {
            mem: HashMap::new(),
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
        self.mem.clear();
        self.spill = None;
        self.total = 0;
    }

    /// Adds a block (a duplicate CID is ignored: its bytes are the same, the hash says so).
    pub fn insert(&mut self, cid: Cid, data: &[u8]) -> Result<(), BlocksError> {
        if self.contains(&cid) {
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
        match &mut self.spill {
            Some(s) => s.write(cid, data)?,
            None => {
                self.mem.insert(cid, data.to_vec());
            }
        }
        self.total = after;
        Ok(())
    }

    fn contains(&self, cid: &Cid) -> bool {
        match &self.spill {
            Some(s) => s.index.contains_key(cid),
            None => self.mem.contains_key(cid),
        }
    }

    fn start_spill(&mut self) -> Result<(), BlocksError> {
        std::fs::create_dir_all(&self.spill_dir)?;
        let file = tempfile::tempfile_in(&self.spill_dir)?;
        let mut s = Spill {
            out: BufWriter::with_capacity(1 << 20, file),
            index: HashMap::with_capacity(self.mem.len() * 2),
            len: 0,
        };
        for (cid, data) in std::mem::take(&mut self.mem) {
            s.write(cid, &data)?;
        }
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
    fn write(&mut self, cid: Cid, data: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(data.len()).map_err(std::io::Error::other)?;
        self.out.write_all(data)?;
        self.index.insert(cid, (self.len, len));
        self.len += u64::from(len);
        Ok(())
    }
}

impl BlockSource for RepoBlocks {
    fn read_block(&self, cid: &Cid, out: &mut Vec<u8>) -> Result<bool, String> {
        match &self.spill {
            None => crate::decode::mst::copy_block(self.mem.get(cid).map(Vec::as_slice), out),
            Some(s) => {
                out.clear();
                let Some(&(at, len)) = s.index.get(cid) else {
                    return Ok(false);
                };
                if !s.out.buffer().is_empty() {
                    return Err("the spill file was read before it was sealed".into());
                }
                out.resize(len as usize, 0);
                s.out
                    .get_ref()
                    .read_exact_at(out, at)
                    .map_err(|e| e.to_string())?;
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
