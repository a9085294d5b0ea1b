//! A whole repository as `getRepo` serves it: the signed commit and every record under its MST.
//!
//! The caller streams the CAR through [`super::car::CarStream`] into a block store of its choice
//! (memory, or a spill file for repos over a cap), then calls [`walk_records`]: it decodes the
//! commit (the CAR's first root), checks that it belongs to the DID that was asked for, and walks
//! the MST from the commit's `data`, handing each record's collection, rkey, CID and block to the
//! caller in key order. Version 3 commits (with `rev`) and version 2 commits (2023: `prev`, no
//! `rev`) both decode.

use super::cbor::{CborError, Reader};
use super::cid::Cid;
use super::mst::{self, BlockSource, MstError};

/// Why a repository cannot be read. [`RepoError::reason`] names it for the quarantine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepoError {
    /// The CAR itself is malformed or truncated.
    #[error("CAR: {0}")]
    Car(#[from] super::car::CarError),
    /// The commit block (the first root) is not in the CAR.
    #[error("the commit block {0} is missing")]
    MissingCommit(Cid),
    /// The commit block is not a valid commit.
    #[error("bad commit: {0}")]
    Commit(String),
    /// The commit is another account's.
    #[error("the repo's commit is for {found}, not {asked}")]
    DidMismatch {
        /// the DID asked for
        asked: String,
        /// the DID in the commit
        found: String,
    },
    /// The MST does not match its root, or a node is missing.
    #[error("MST: {0}")]
    Mst(#[from] MstError),
    /// A record the MST names is not in the CAR.
    #[error("the record {key} ({cid}) is missing")]
    MissingRecord {
        /// its key
        key: String,
        /// its CID
        cid: Cid,
    },
    /// The caller stopped the walk.
    #[error("{0}")]
    Stopped(String),
}

impl RepoError {
    /// A short reason for the quarantine and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            RepoError::Car(super::car::CarError::HashMismatch(_)) => "hash_mismatch",
            RepoError::Car(super::car::CarError::EndsEarly(_)) => "truncated",
            RepoError::Car(super::car::CarError::SectionTooLarge { .. }) => "block_too_large",
            RepoError::Car(_) => "car",
            RepoError::MissingCommit(_) | RepoError::MissingRecord { .. } => "missing_block",
            RepoError::Mst(MstError::MissingNode(_)) => "missing_block",
            RepoError::Commit(_) => "commit",
            RepoError::DidMismatch { .. } => "did_mismatch",
            RepoError::Mst(_) => "mst",
            RepoError::Stopped(_) => "stopped",
        }
    }
}

/// A repo commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The account.
    pub did: String,
    /// 3 today, 2 for repos last written in 2023.
    pub version: i64,
    /// The MST root.
    pub data: Cid,
    /// The revision (a TID); absent in version 2.
    pub rev: Option<String>,
    /// The previous commit (version 2; null or absent in version 3).
    pub prev: Option<Cid>,
}

impl Commit {
    /// Decodes a commit block: `did`, `version` (2 or 3), `data`, `rev` (required from version 3,
    /// a TID), `prev`, `sig`.
    pub fn decode(block: &[u8]) -> Result<Commit, RepoError> {
        let e = |e: CborError| RepoError::Commit(e.to_string());
        let mut r = Reader::new(block);
        let n = r.map().map_err(e)?;
        let (mut did, mut version, mut data, mut rev, mut prev, mut sig) =
            (None, None, None, None, None, false);
        for _ in 0..n {
            match r.key().map_err(e)? {
                "did" => did = Some(r.text().map_err(e)?),
                "version" => version = Some(r.int().map_err(e)?),
                "data" => data = Some(r.link().map_err(e)?),
                "rev" => rev = Some(r.text().map_err(e)?),
                "prev" => prev = r.link_or_null().map_err(e)?,
                "sig" => {
                    r.bytes().map_err(e)?;
                    sig = true;
                }
                _ => r.skip(super::cbor::MAX_DEPTH).map_err(e)?,
            }
        }
        r.finish().map_err(e)?;
        let bad = |w: &str| RepoError::Commit(w.to_string());
        let did = did.ok_or_else(|| bad("no did"))?;
        if !crate::syntax::is_did(did) {
            return Err(bad("did is not a DID"));
        }
        let version = version.ok_or_else(|| bad("no version"))?;
        let data = data.ok_or_else(|| bad("no data"))?;
        if !sig {
            return Err(bad("no sig"));
        }
        match (version, rev) {
            (3, None) => return Err(bad("version 3 without rev")),
            (2 | 3, Some(r)) if !crate::syntax::is_tid(r) => return Err(bad("rev is not a TID")),
            (2 | 3, _) => {}
            (v, _) => return Err(RepoError::Commit(format!("version {v}"))),
        }
        Ok(Commit {
            did: did.to_string(),
            version,
            data,
            rev: rev.map(str::to_string),
            prev,
        })
    }
}

/// One record of a repo.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Its collection (an NSID).
    pub collection: &'a str,
    /// Its record key.
    pub rkey: &'a str,
    /// Its CID (verified: the block hashes to it).
    pub cid: &'a Cid,
    /// Its DAG-CBOR bytes.
    pub block: &'a [u8],
}

/// Decodes the commit `root` of a repo fetched for `did` and walks every record in key order.
/// `f` may stop the walk with [`RepoError::Stopped`]. Returns the commit and the record count.
pub fn walk_records(
    src: &dyn BlockSource,
    root: &Cid,
    did: &str,
    f: &mut dyn FnMut(Record<'_>) -> Result<(), RepoError>,
) -> Result<(Commit, u64), RepoError> {
    let mut buf = Vec::new();
    let found = src
        .read_block(root, &mut buf)
        .map_err(|why| MstError::Read { cid: *root, why })?;
    if !found {
        return Err(RepoError::MissingCommit(*root));
    }
    let commit = Commit::decode(&buf)?;
    if commit.did != did {
        return Err(RepoError::DidMismatch {
            asked: did.to_string(),
            found: commit.did,
        });
    }
    let n = mst::walk(src, &commit.data, &mut |key: &str, cid: &Cid| {
        let found = src
            .read_block(cid, &mut buf)
            .map_err(|why| MstError::Read { cid: *cid, why })?;
        if !found {
            return Err(RepoError::MissingRecord {
                key: key.to_string(),
                cid: *cid,
            });
        }
        let (collection, rkey) = mst::split_key(key).ok_or_else(|| MstError::BadKey(key.into()))?;
        f(Record {
            collection,
            rkey,
            cid,
            block: &buf,
        })
    })?;
    Ok((commit, n))
}

/// The record's own `createdAt` (a top-level field): `Ok(None)` when it has none or it is not
/// text (a claim that does not parse is not used); an error when the record is not a map of
/// valid DAG-CBOR.
pub fn created_at(block: &[u8]) -> Result<Option<&str>, CborError> {
    let mut r = Reader::new(block);
    let n = r.map()?;
    for _ in 0..n {
        let k = r.key()?;
        if k == "createdAt" {
            return Ok(match r.item()? {
                super::cbor::Item::Text(t) => Some(t),
                _ => None,
            });
        }
        r.skip(super::cbor::MAX_DEPTH)?;
    }
    Ok(None)
}

/// When a backfilled record was made, for its partition: the timestamp inside its rkey when the
/// rkey is a TID, else its `createdAt` when that parses; either only if it lies between the
/// network's start (2022-11-17) and `upper_us`, else `upper_us`. `upper_us` is the repo's `rev`
/// time, itself clamped to the network's start and to when the repo was fetched (+10 min); a
/// version-2 repo (no `rev`) uses the fetch time. A record's claim is never trusted beyond those
/// bounds.
pub fn record_time_us(
    rkey: &str,
    created_at: Option<&str>,
    rev: Option<&str>,
    fetched_us: i64,
) -> i64 {
    use crate::model::cursor::{MAX_FUTURE_US, NETWORK_EPOCH_US};
    let ceiling = fetched_us.saturating_add(MAX_FUTURE_US);
    let upper = rev
        .and_then(crate::syntax::tid_timestamp_us)
        .unwrap_or(fetched_us)
        .clamp(NETWORK_EPOCH_US, ceiling.max(NETWORK_EPOCH_US));
    let within = |t: i64| (NETWORK_EPOCH_US..=upper).contains(&t).then_some(t);
    if crate::syntax::is_tid(rkey)
        && let Some(t) = crate::syntax::tid_timestamp_us(rkey).and_then(within)
    {
        return t;
    }
    created_at
        .and_then(|c| crate::syntax::parse_datetime_us(c).ok())
        .and_then(within)
        .unwrap_or(upper)
}

/// Small valid repos for tests (here, in the block store's and in the sync client's).
#[cfg(test)]
pub(crate) mod sample {
    use super::super::car::CarWriter;
    use super::super::cbor::Encoder;
    use super::super::mst::build;
    use super::Cid;

    /// A post record.
    pub fn record(text: &str) -> Vec<u8> {
        let mut e = Encoder::new();
        e.map(2)
            .text("text")
            .text(text)
            .text("$type")
            .text("app.bsky.feed.post");
        e.buf
    }

    /// A signed-looking commit block.
    pub fn commit(did: &str, version: i64, data: &Cid, rev: Option<&str>) -> Vec<u8> {
        let mut e = Encoder::new();
        e.map(if rev.is_some() { 6 } else { 5 });
        e.text("did").text(did);
        if let Some(r) = rev {
            e.text("rev").text(r);
        }
        e.text("sig").bytes(&[7; 64]).text("data").link(data);
        e.text("prev").null().text("version").int(version);
        e.buf
    }

    /// A repo: its commit CID, every block, and its record keys in order.
    pub struct Repo {
        pub root: Cid,
        pub blocks: Vec<(Cid, Vec<u8>)>,
        pub keys: Vec<(String, Cid)>,
    }

    /// A repo of `posts` posts (TID rkeys) and `likes` likes (other rkeys).
    pub fn repo(did: &str, posts: u64, likes: u64) -> Repo {
        let mut keys = Vec::new();
        let mut blocks = Vec::new();
        for i in 0..posts {
            let b = record(&format!("post {i}"));
            let c = Cid::for_dag_cbor(&b);
            let rkey = crate::syntax::tid_from_parts(1_700_000_000_000_000 + i * 1000, 0);
            keys.push((format!("app.bsky.feed.post/{rkey}"), c));
            blocks.push((c, b));
        }
        for i in 0..likes {
            let b = record(&format!("like {i}"));
            let c = Cid::for_dag_cbor(&b);
            keys.push((format!("app.bsky.feed.like/l{i:05}"), c));
            blocks.push((c, b));
        }
        keys.sort();
        let (data, nodes) = build(&keys);
        blocks.extend(nodes);
        let cb = commit(did, 3, &data, Some("3l5kq2zbzxk2c"));
        let root = Cid::for_dag_cbor(&cb);
        blocks.push((root, cb));
        Repo { root, blocks, keys }
    }

    impl Repo {
        /// Its CAR: records and nodes first, the commit last (an order real repos may use).
        pub fn car(&self) -> Vec<u8> {
            let mut w = CarWriter::new(&[self.root]);
            for (c, b) in &self.blocks {
                w.block(c, b);
            }
            w.buf
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::car::{Car, CarError, CarStream, CarWriter};
    use super::super::cbor::Encoder;
    use super::super::mst::Node;
    use super::sample::{Repo, commit, record};
    use super::*;
    use std::collections::HashMap;

    const DID: &str = "did:plc:abcdefghijklmnopqrstuvwx";

    /// `n` posts and `n / 3` likes.
    fn repo(n: usize, did: &str) -> Repo {
        sample::repo(did, n as u64, n as u64 / 3)
    }

    fn car(r: &Repo) -> Vec<u8> {
        r.car()
    }

    fn store(bytes: &[u8], chunk: usize) -> Result<(Cid, HashMap<Cid, Vec<u8>>), RepoError> {
        let mut s = CarStream::new(1 << 20);
        let mut m = HashMap::new();
        for part in bytes.chunks(chunk) {
            s.push(part);
            while let Some((c, b)) = s.next_block()? {
                m.insert(c, b.to_vec());
            }
        }
        s.finish()?;
        Ok((s.roots().unwrap()[0], m))
    }

    fn walk_all(
        src: &HashMap<Cid, Vec<u8>>,
        root: &Cid,
        did: &str,
    ) -> Result<Vec<(String, Cid)>, RepoError> {
        let mut out = Vec::new();
        walk_records(src, root, did, &mut |r| {
            assert!(r.cid.matches(r.block));
            out.push((format!("{}/{}", r.collection, r.rkey), *r.cid));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn every_record_comes_out_in_key_order_whatever_the_chunking() {
        let r = repo(300, DID);
        let bytes = car(&r);
        for chunk in [1, 7, 64, 4096, bytes.len()] {
            let (root, m) = store(&bytes, chunk).unwrap();
            assert_eq!(root, r.root);
            let got = walk_all(&m, &root, DID).unwrap();
            assert_eq!(got, r.keys, "chunk {chunk}");
        }
        // the same through the whole-buffer reader
        let parsed = Car::parse(&bytes, true).unwrap();
        let mut n = 0;
        walk_records(&parsed, &r.root, DID, &mut |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 400);
    }

    #[test]
    fn an_empty_repo_has_no_records() {
        let r = repo(0, DID);
        let (root, m) = store(&car(&r), 10).unwrap();
        assert_eq!(walk_all(&m, &root, DID).unwrap(), vec![]);
    }

    #[test]
    fn a_version_2_commit_still_decodes() {
        let r = repo(5, DID);
        let data = Commit::decode(&r.blocks.last().unwrap().1).unwrap().data;
        let mut e = Encoder::new();
        e.map(5).text("did").text(DID).text("sig").bytes(&[1; 64]);
        e.text("data").link(&data).text("prev").link(&r.keys[0].1);
        e.text("version").int(2);
        let c = Commit::decode(&e.buf).unwrap();
        assert_eq!((c.version, c.rev, c.prev), (2, None, Some(r.keys[0].1)));
        let mut m: HashMap<Cid, Vec<u8>> = r.blocks.iter().cloned().collect();
        let root = Cid::for_dag_cbor(&e.buf);
        m.insert(root, e.buf);
        assert_eq!(walk_all(&m, &root, DID).unwrap().len(), 6);
    }

    #[test]
    fn bad_commits_are_refused_by_reason() {
        let data = Cid::for_dag_cbor(b"x");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (commit(DID, 3, &data, None), "version 3 without rev"),
            (commit(DID, 3, &data, Some("not-a-tid")), "rev is not a TID"),
            (commit("nope", 3, &data, Some("3l5kq2zbzxk2c")), "not a DID"),
            (commit(DID, 4, &data, Some("3l5kq2zbzxk2c")), "version 4"),
        ];
        for (b, want) in cases {
            let e = Commit::decode(&b).unwrap_err();
            assert!(e.to_string().contains(want), "{e} / {want}");
            assert_eq!(e.reason(), "commit");
        }
        let mut e = Encoder::new();
        e.map(3).text("did").text(DID).text("data").link(&data);
        e.text("version").int(3);
        assert!(Commit::decode(&e.buf).is_err(), "no sig, no rev");
    }

    #[test]
    fn another_accounts_repo_is_refused() {
        let r = repo(3, "did:plc:someoneelse0000000000000");
        let (root, m) = store(&car(&r), 100).unwrap();
        let e = walk_all(&m, &root, DID).unwrap_err();
        assert_eq!(e.reason(), "did_mismatch");
    }

    #[test]
    fn a_truncated_or_tampered_car_is_refused() {
        let r = repo(40, DID);
        let bytes = car(&r);
        for cut in [1, 30, bytes.len() / 2, bytes.len() - 1] {
            let e = store(&bytes[..cut], 50).unwrap_err();
            assert_eq!(e.reason(), "truncated", "cut at {cut}: {e}");
        }
        let mut bad = bytes.clone();
        let last = bad.len() - 3;
        bad[last] ^= 1;
        assert_eq!(store(&bad, 64).unwrap_err().reason(), "hash_mismatch");
        // a length prefix that claims a huge section is refused before buffering
        let mut huge = CarWriter::new(&[r.root]).buf;
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        let mut s = CarStream::new(1 << 20);
        s.push(&huge);
        assert!(matches!(
            s.next_block(),
            Err(CarError::SectionTooLarge { .. })
        ));
    }

    #[test]
    fn missing_blocks_are_named() {
        let r = repo(30, DID);
        let all: HashMap<Cid, Vec<u8>> = r.blocks.iter().cloned().collect();
        // a record
        let mut m = all.clone();
        m.remove(&r.keys[10].1);
        let e = walk_all(&m, &r.root, DID).unwrap_err();
        assert!(matches!(e, RepoError::MissingRecord { .. }), "{e}");
        assert_eq!(e.reason(), "missing_block");
        // an MST node
        let data = Commit::decode(&all[&r.root]).unwrap().data;
        let mut m = all.clone();
        m.remove(&data);
        let e = walk_all(&m, &r.root, DID).unwrap_err();
        assert_eq!(e, RepoError::Mst(MstError::MissingNode(data)));
        // the commit
        let mut m = all;
        m.remove(&r.root);
        assert_eq!(
            walk_all(&m, &r.root, DID).unwrap_err().reason(),
            "missing_block"
        );
    }

    /// Trees that do not follow the MST rules are refused: keys out of order, a key at the wrong
    /// layer, a bad key, an empty inner node.
    #[test]
    fn malformed_trees_are_refused() {
        let leaf = Cid::for_dag_cbor(&record("x"));
        let mut blocks: HashMap<Cid, Vec<u8>> = HashMap::new();
        blocks.insert(leaf, record("x"));
        let put = |n: &Node, blocks: &mut HashMap<Cid, Vec<u8>>| {
            let b = n.encode();
            let c = Cid::for_dag_cbor(&b);
            blocks.insert(c, b);
            c
        };
        // find keys of height 0 to build single-layer nodes
        let zero: Vec<String> = (0..200)
            .map(|i| format!("app.bsky.feed.post/k{i:04}"))
            .filter(|k| mst::key_height(k.as_bytes()) == 0)
            .take(3)
            .collect();
        let tall = (0..2000)
            .map(|i| format!("app.bsky.feed.post/t{i:04}"))
            .find(|k| mst::key_height(k.as_bytes()) == 1)
            .unwrap();
        let entry = |k: &str| mst::Entry {
            key: k.to_string(),
            value: leaf,
            right: None,
        };
        let with_root = |data: Cid, blocks: &mut HashMap<Cid, Vec<u8>>| {
            let b = commit(DID, 3, &data, Some("3l5kq2zbzxk2c"));
            let c = Cid::for_dag_cbor(&b);
            blocks.insert(c, b);
            c
        };
        // out of order
        let n = Node {
            left: None,
            entries: vec![entry(&zero[1]), entry(&zero[0])],
        };
        let c = put(&n, &mut blocks);
        let root = with_root(c, &mut blocks);
        let e = walk_all(&blocks, &root, DID).unwrap_err();
        assert!(matches!(e, RepoError::Mst(MstError::Order { .. })), "{e}");
        // a height-1 key beside height-0 keys
        let n = Node {
            left: None,
            entries: vec![entry(&zero[0]), entry(&tall)],
        };
        let c = put(&n, &mut blocks);
        let root = with_root(c, &mut blocks);
        let e = walk_all(&blocks, &root, DID).unwrap_err();
        assert!(matches!(e, RepoError::Mst(MstError::Layer { .. })), "{e}");
        // a child at the parent's layer
        let child = put(
            &Node {
                left: None,
                entries: vec![entry(&zero[0])],
            },
            &mut blocks,
        );
        let n = Node {
            left: Some(child),
            entries: vec![entry(&zero[1])],
        };
        let c = put(&n, &mut blocks);
        let root = with_root(c, &mut blocks);
        let e = walk_all(&blocks, &root, DID).unwrap_err();
        assert!(matches!(e, RepoError::Mst(MstError::BadNode { .. })), "{e}");
        // a key that is not collection/rkey
        let bad = (0..5000)
            .map(|i| format!("nocollection{i}"))
            .find(|k| mst::key_height(k.as_bytes()) == 0)
            .unwrap();
        let n = Node {
            left: None,
            entries: vec![entry(&bad)],
        };
        let c = put(&n, &mut blocks);
        let root = with_root(c, &mut blocks);
        let e = walk_all(&blocks, &root, DID).unwrap_err();
        assert!(matches!(e, RepoError::Mst(MstError::BadKey(_))), "{e}");
        // an empty node below the root
        let empty = put(&Node::default(), &mut blocks);
        let n = Node {
            left: None,
            entries: vec![mst::Entry {
                key: tall.clone(),
                value: leaf,
                right: Some(empty),
            }],
        };
        let c = put(&n, &mut blocks);
        let root = with_root(c, &mut blocks);
        let e = walk_all(&blocks, &root, DID).unwrap_err();
        assert!(matches!(e, RepoError::Mst(MstError::BadNode { .. })), "{e}");
        assert_eq!(e.reason(), "mst");
    }

    /// Random bytes and random cuts of a valid repo never panic the reader or the walk.
    #[test]
    fn hostile_bytes_never_panic() {
        let r = repo(20, DID);
        let bytes = car(&r);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mut b = bytes.clone();
            let i = (rng as usize) % b.len();
            b[i] = (rng >> 32) as u8;
            // a change that passes every hash check cannot change what the repo holds
            if let Ok((root, m)) = store(&b, 97)
                && let Ok(got) = walk_all(&m, &root, DID)
            {
                assert_eq!(got, r.keys);
            }
        }
    }

    #[test]
    fn a_record_time_comes_from_its_tid_then_created_at_then_the_rev() {
        use crate::syntax::tid_from_parts;
        let day = 86_400_000_000i64;
        let fetched = 1_790_000_000_000_000; // 2026-09
        let rev_t = fetched - 30 * day;
        let rev = tid_from_parts(rev_t as u64, 0);
        let tid_t = 1_700_000_000_000_000; // 2023-11
        let tid = tid_from_parts(tid_t as u64, 5);
        let made = "2024-01-02T03:04:05.000Z";
        let made_t = crate::syntax::parse_datetime_us(made).unwrap();
        // a TID rkey wins over createdAt
        assert_eq!(record_time_us(&tid, Some(made), Some(&rev), fetched), tid_t);
        // not a TID: createdAt
        assert_eq!(
            record_time_us("self", Some(made), Some(&rev), fetched),
            made_t
        );
        // neither: the rev's time
        assert_eq!(record_time_us("self", None, Some(&rev), fetched), rev_t);
        assert_eq!(
            record_time_us("self", Some("yesterday"), Some(&rev), fetched),
            rev_t
        );
        // claims after the rev or before the network are not trusted
        let future = tid_from_parts((rev_t + day) as u64, 0);
        assert_eq!(record_time_us(&future, None, Some(&rev), fetched), rev_t);
        assert_eq!(
            record_time_us("self", Some("2030-01-01T00:00:00Z"), Some(&rev), fetched),
            rev_t
        );
        assert_eq!(
            record_time_us("self", Some("2001-01-01T00:00:00Z"), Some(&rev), fetched),
            rev_t
        );
        let old = tid_from_parts(1_000_000_000_000_000, 0); // 2001
        assert_eq!(
            record_time_us(&old, Some(made), Some(&rev), fetched),
            made_t
        );
        // a rev in the future is held to the fetch time (+10 min); no rev (version 2): fetch time
        let far = tid_from_parts((fetched + 365 * day) as u64, 0);
        let ceiling = fetched + crate::model::cursor::MAX_FUTURE_US;
        assert_eq!(record_time_us("self", None, Some(&far), fetched), ceiling);
        assert_eq!(record_time_us("self", None, None, fetched), fetched);
        assert_eq!(record_time_us("self", Some(made), None, fetched), made_t);
    }

    #[test]
    fn created_at_is_read_from_the_top_level_only() {
        let mut e = Encoder::new();
        e.map(2)
            .text("text")
            .text("hi")
            .text("createdAt")
            .text("2024-01-02T03:04:05Z");
        assert_eq!(created_at(&e.buf), Ok(Some("2024-01-02T03:04:05Z")));
        let mut e = Encoder::new();
        e.map(1)
            .text("embed")
            .map(1)
            .text("createdAt")
            .text("2024-01-02T03:04:05Z");
        assert_eq!(created_at(&e.buf), Ok(None));
        let mut e = Encoder::new();
        e.map(1).text("createdAt").int(5);
        assert_eq!(
            created_at(&e.buf),
            Ok(None),
            "a createdAt that is not text is no claim"
        );
        assert!(created_at(b"\xff").is_err(), "a broken record is an error");
    }
}
