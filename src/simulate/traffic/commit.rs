//! `#commit` messages: which ops a commit carries (creates, updates and deletes of the
//! account's records), the MST path and signed commit block, the CAR with its blocks in
//! shuffled order, and the frame body in the Sync 1.1 shape.
//!
//! The order of random draws is part of the output: the same seed must give the same bytes, so
//! a change here that draws in another order changes every test fixture made from a seed.

use super::records::Coll;
use super::{Rng, SimMessage, Traffic, frame_bytes, valid};
use crate::decode::car::CarWriter;
use crate::decode::cbor::Encoder;
use crate::decode::cid::Cid;
use crate::model::{CommitOp, Did, Envelope, Event, EventData, Nsid, Operation, Rkey, Tid};
use crate::syntax::tid_from_parts;
use serde_json::Value;

const PROFILE: &str = "app.bsky.actor.profile";

/// One op of a commit being built.
#[derive(Debug, Clone)]
pub(super) struct PendingOp {
    operation: Operation,
    collection: String,
    rkey: String,
    /// The new record's CID and block (creates and updates).
    block: Option<(Cid, Vec<u8>)>,
    /// The previous record's CID (updates and deletes).
    prev: Option<Cid>,
    /// The new record as atproto JSON.
    json: Option<String>,
}

impl PendingOp {
    fn path(&self) -> String {
        format!("{}/{}", self.collection, self.rkey)
    }
}

/// Whether `ops` already touch `collection/rkey` (a commit touches a record once).
fn touches(ops: &[PendingOp], collection: &str, rkey: &str) -> bool {
    ops.iter()
        .any(|o| o.collection == collection && o.rkey == rkey)
}

/// A record's DAG-CBOR block, its CID and its JSON.
fn encoded(rec: &Value) -> (Cid, Vec<u8>, String) {
    let block = encode_record(rec);
    let cid = Cid::for_dag_cbor(&block);
    let json = record_json(&block);
    (cid, block, json)
}

impl Traffic {
    /// A `#commit` of `account` at `seq`.
    pub(super) fn commit(
        &mut self,
        seq: i64,
        account: u64,
        did: String,
        time: String,
    ) -> SimMessage {
        let (rev, since) = self.next_rev(account);
        let ops = self.commit_ops(account, &did);
        let (mst_blocks, root) = self.mst_path(account, &ops);
        let data = root.unwrap_or_else(|| self.random_cid());
        // the commit's `prevData` is the MST root of the account's previous commit (none for
        // its first, as `since`), so a daemon that follows each repo's chain sees no false gap.
        // The random CID this once was is still drawn, so that a seed makes the same traffic
        // it always made (the benchmark corpora are named by seed and size).
        self.rng.bytes(16);
        let prev_data = self
            .repos
            .entry(account)
            .or_default()
            .data
            .replace(data)
            .filter(|_| since.is_some());
        let (commit_cid, commit_block) = self.commit_block(&did, &rev, &data);
        let car = self.shuffled_car(commit_cid, commit_block, mst_blocks, &ops);
        let frame = CommitFrame {
            seq,
            did: &did,
            rev: &rev,
            time: &time,
            since: since.as_deref(),
            ops: &ops,
            car: &car,
            commit: &commit_cid,
            prev_data: prev_data.as_ref(),
        }
        .encode();
        let chain = std::sync::Arc::new(crate::model::Chain {
            since: since.clone(),
            prev_data: prev_data.map(|c| c.to_string()),
            data: data.to_string(),
        });
        let events = ops
            .into_iter()
            .map(|o| Envelope {
                event: Event {
                    did: valid(Did::parse(did.as_str())),
                    data: EventData::Commit(CommitOp {
                        rev: valid(Tid::parse(rev.as_str())),
                        operation: o.operation,
                        collection: valid(Nsid::parse(o.collection)),
                        rkey: valid(Rkey::parse(o.rkey)),
                        cid: o.block.map(|(c, _)| c.to_string()),
                        record: o.json,
                    }),
                },
                time_us: self.time_us,
                claimed_time_us: None,
                seq: Some(seq),
                chain: Some(chain.clone()),
            })
            .collect();
        SimMessage {
            seq,
            time_us: self.time_us,
            jetstream_us: super::jetstream_time_us(self.time_us, 0),
            frame,
            events,
        }
    }

    /// How many ops the next commit carries: mostly one; some bulk commits.
    fn ops_in_commit(&mut self) -> usize {
        if self.rng.chance(0.03) {
            let big = self.rng.chance(0.1);
            2 + self.rng.below(if big { 40 } else { 6 }) as usize
        } else {
            1
        }
    }

    /// The ops of a commit of `account`.
    fn commit_ops(&mut self, account: u64, did: &str) -> Vec<PendingOp> {
        let n_ops = self.ops_in_commit();
        let mut ops: Vec<PendingOp> = Vec::with_capacity(n_ops);
        // the ops of a bulk commit after the first share a collection
        let bulk_coll = self.pick_coll();
        for i in 0..n_ops {
            let repo_len = self.repos.get(&account).map_or(0, |r| r.records.len());
            let roll = self.rng.below(1000);
            let op = if roll < 40 && repo_len > 0 {
                self.delete_op(account, repo_len, &ops)
            } else {
                let coll = if n_ops > 1 && i > 0 {
                    bulk_coll
                } else {
                    self.pick_coll()
                };
                self.write_op(account, did, i, coll, roll, repo_len, &ops)
            };
            ops.extend(op);
        }
        ops
    }

    /// Deletes one of the account's records.
    fn delete_op(&mut self, account: u64, repo_len: usize, ops: &[PendingOp]) -> Option<PendingOp> {
        let idx = self.rng.below(repo_len as u64) as usize;
        let repo = self.repos.entry(account).or_default();
        let (collection, rkey, prev) = repo.records.swap_remove(idx);
        if collection == PROFILE {
            repo.has_profile = false;
        }
        if touches(ops, &collection, &rkey) {
            return None;
        }
        Some(PendingOp {
            operation: Operation::Delete,
            collection,
            rkey,
            block: None,
            prev: Some(prev),
            json: None,
        })
    }

    /// A create (or, for the profile and a few others, an update) in collection `coll`.
    #[allow(clippy::too_many_arguments)] // one op's whole context
    fn write_op(
        &mut self,
        account: u64,
        did: &str,
        i: usize,
        coll: Coll,
        roll: u64,
        repo_len: usize,
        ops: &[PendingOp],
    ) -> Option<PendingOp> {
        let nsid = if coll == Coll::ThirdParty {
            let i = self.rng.skewed(self.long_tail.len() as u64) as usize;
            self.long_tail[i].clone()
        } else {
            coll.nsid().to_string()
        };
        let (operation, rkey, prev) = if coll == Coll::Profile {
            let prev = self
                .repos
                .get(&account)
                .and_then(|r| r.records.iter().find(|x| x.0 == PROFILE).map(|x| x.2));
            match (
                self.repos.get(&account).is_some_and(|r| r.has_profile),
                prev,
            ) {
                (true, prev) => (Operation::Update, "self".to_string(), prev),
                (false, _) => (Operation::Create, "self".to_string(), None),
            }
        } else if roll < 48 && repo_len > 0 {
            // a few updates of existing non-profile records
            return self.update_op(account, repo_len, ops);
        } else {
            // the clock to the microsecond (equal to the frame time in captures): frames that
            // share a millisecond still make distinct keys
            let tid = tid_from_parts(
                (self.exact_us + i as i64) as u64,
                self.rng.below(1024) as u16,
            );
            (Operation::Create, tid, None)
        };
        if touches(ops, &nsid, &rkey) {
            return None;
        }
        let rec = self.record_for(coll, &nsid);
        let (cid, block, json) = encoded(&rec);
        self.remember_record(account, did, coll, &nsid, &rkey, operation, cid);
        Some(PendingOp {
            operation,
            collection: nsid,
            rkey,
            block: Some((cid, block)),
            prev,
            json: Some(json),
        })
    }

    /// A new version of one of the account's records (not its profile).
    fn update_op(&mut self, account: u64, repo_len: usize, ops: &[PendingOp]) -> Option<PendingOp> {
        let idx = self.rng.below(repo_len as u64) as usize;
        let (c, k, p) = self.repos[&account].records[idx].clone();
        if c == PROFILE || touches(ops, &c, &k) {
            return None;
        }
        let kind = if c == "app.bsky.feed.post" {
            Coll::Post
        } else {
            Coll::ThirdParty
        };
        let rec = self.record_for(kind, &c);
        let (cid, block, json) = encoded(&rec);
        self.repos.entry(account).or_default().records[idx].2 = cid;
        Some(PendingOp {
            operation: Operation::Update,
            collection: c,
            rkey: k,
            block: Some((cid, block)),
            prev: Some(p),
            json: Some(json),
        })
    }

    /// Keeps a written record in the account's repo (and a post among the recent ones, for
    /// replies, likes and reposts to point at).
    #[allow(clippy::too_many_arguments)] // the record's whole identity
    fn remember_record(
        &mut self,
        account: u64,
        did: &str,
        coll: Coll,
        nsid: &str,
        rkey: &str,
        operation: Operation,
        cid: Cid,
    ) {
        let repo = self.repos.entry(account).or_default();
        match operation {
            Operation::Create => {
                repo.records.push((nsid.to_string(), rkey.to_string(), cid));
                if coll == Coll::Profile {
                    repo.has_profile = true;
                }
                if repo.records.len() > 64 {
                    repo.records.remove(0);
                }
            }
            _ => {
                if let Some(x) = repo.records.iter_mut().find(|x| x.0 == nsid && x.1 == rkey) {
                    x.2 = cid;
                }
            }
        }
        if coll == Coll::Post {
            self.recent_posts
                .push((format!("at://{did}/{nsid}/{rkey}"), cid));
            if self.recent_posts.len() > 4096 {
                self.recent_posts.drain(..2048);
            }
        }
    }

    /// The MST nodes from the root down to the leaf holding the op keys (each with a few other
    /// keys), and the root's CID.
    fn mst_path(&mut self, account: u64, ops: &[PendingOp]) -> (Vec<(Cid, Vec<u8>)>, Option<Cid>) {
        let depth = {
            let repo = self.repos.entry(account).or_default();
            if repo.depth == 0 {
                repo.depth = 3 + (account % 6) as u8;
            }
            repo.depth
        };
        let mut blocks: Vec<(Cid, Vec<u8>)> = Vec::new();
        let mut child: Option<Cid> = None;
        let mut op_keys: Vec<String> = ops.iter().map(PendingOp::path).collect();
        op_keys.sort();
        for level in 0..depth {
            let mut keys: Vec<(String, Cid)> = Vec::new();
            if level == 0 {
                for (k, o) in op_keys.iter().zip(ops.iter()) {
                    let v = o
                        .block
                        .as_ref()
                        .map(|(c, _)| *c)
                        .unwrap_or_else(|| self.random_cid());
                    keys.push((k.clone(), v));
                }
            }
            let extra = 6 + self.rng.below(12) as usize;
            let colls = [
                "app.bsky.feed.like",
                "app.bsky.feed.post",
                "app.bsky.graph.follow",
                "app.bsky.feed.repost",
            ];
            for _ in 0..extra {
                let c = *self.rng.pick(&colls);
                let k = format!(
                    "{c}/{}",
                    tid_from_parts((self.time_us - self.rng.below(1 << 40) as i64) as u64, 0)
                );
                let v = self.random_cid();
                keys.push((k, v));
            }
            keys.sort_by(|a, b| a.0.cmp(&b.0));
            keys.dedup_by(|a, b| a.0 == b.0);
            let node = encode_mst_node(&keys, child, &mut self.rng);
            let cid = Cid::for_dag_cbor(&node);
            blocks.push((cid, node));
            child = Some(cid);
        }
        (blocks, child)
    }

    /// The signed commit block (version 3, no `prev`) and its CID.
    fn commit_block(&mut self, did: &str, rev: &str, data: &Cid) -> (Cid, Vec<u8>) {
        let mut cb = Encoder::new();
        cb.map(6)
            .text("did")
            .text(did)
            .text("rev")
            .text(rev)
            .text("sig")
            .bytes(&self.rng.bytes(64))
            .text("data")
            .link(data)
            .text("prev")
            .null()
            .text("version")
            .int(3);
        (Cid::for_dag_cbor(&cb.buf), cb.buf)
    }

    /// The CAR: the commit, the MST nodes and the record blocks, in shuffled order (block order
    /// in a CAR is arbitrary; the commit is the root).
    fn shuffled_car(
        &mut self,
        commit_cid: Cid,
        commit_block: Vec<u8>,
        mst_blocks: Vec<(Cid, Vec<u8>)>,
        ops: &[PendingOp],
    ) -> Vec<u8> {
        let mut blocks: Vec<(Cid, Vec<u8>)> = vec![(commit_cid, commit_block)];
        blocks.extend(mst_blocks);
        for o in ops {
            if let Some((c, b)) = &o.block {
                blocks.push((*c, b.clone()));
            }
        }
        for i in (1..blocks.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            blocks.swap(i, j);
        }
        let mut car = CarWriter::new(&[commit_cid]);
        for (c, b) in &blocks {
            car.block(c, b);
        }
        car.buf
    }
}

/// The fields of a `#commit` body.
struct CommitFrame<'a> {
    seq: i64,
    did: &'a str,
    rev: &'a str,
    time: &'a str,
    since: Option<&'a str>,
    ops: &'a [PendingOp],
    car: &'a [u8],
    commit: &'a Cid,
    prev_data: Option<&'a Cid>,
}

impl CommitFrame<'_> {
    /// The whole frame: header, then the 12-field body.
    fn encode(&self) -> Vec<u8> {
        let mut body = Encoder::new();
        // `prevData` is left out of a repo's first commit
        body.map(if self.prev_data.is_some() { 12 } else { 11 });
        body.text("ops").array(self.ops.len());
        for o in self.ops {
            let n = if o.prev.is_some() { 4 } else { 3 };
            body.map(n);
            body.text("cid");
            match &o.block {
                Some((c, _)) => body.link(c),
                None => body.null(),
            };
            body.text("path").text(&o.path());
            if let Some(p) = &o.prev {
                body.text("prev").link(p);
            }
            body.text("action").text(o.operation.as_str());
        }
        body.text("rev").text(self.rev);
        body.text("seq").int(self.seq);
        body.text("repo").text(self.did);
        body.text("time").text(self.time);
        body.text("blobs").array(0);
        body.text("since");
        match self.since {
            Some(s) => body.text(s),
            None => body.null(),
        };
        body.text("blocks").bytes(self.car);
        body.text("commit").link(self.commit);
        body.text("rebase").bool(false);
        body.text("tooBig").bool(false);
        if let Some(p) = self.prev_data {
            body.text("prevData").link(p);
        }
        frame_bytes("#commit", &body.buf)
    }
}

/// A generated record's DAG-CBOR (generated records are valid by construction: a failure is a
/// bug in the simulator).
fn encode_record(v: &Value) -> Vec<u8> {
    let mut e = Encoder::new();
    if let Err(err) = e.json(v) {
        panic!("the simulator generated a record that is not DAG-CBOR: {err}");
    }
    e.buf
}

/// A generated record's atproto JSON.
fn record_json(block: &[u8]) -> String {
    let mut out = Vec::new();
    let mut w = crate::decode::cbor::JsonWriter::new();
    if let Err(err) = w.record_to_json(block, &mut out) {
        panic!("the simulator generated a record it cannot read back: {err}");
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn encode_mst_node(keys: &[(String, Cid)], child: Option<Cid>, rng: &mut Rng) -> Vec<u8> {
    let mut e = Encoder::new();
    e.map(2).text("e").array(keys.len());
    let mut prev: &[u8] = b"";
    let link_at = if keys.is_empty() {
        0
    } else {
        rng.below(keys.len() as u64) as usize
    };
    for (i, (k, v)) in keys.iter().enumerate() {
        let kb = k.as_bytes();
        let p = common_prefix(prev, kb);
        e.map(4)
            .text("k")
            .bytes(&kb[p..])
            .text("p")
            .int(p as i64)
            .text("t");
        match (i == link_at, child) {
            (true, Some(c)) => e.link(&c),
            _ => e.null(),
        };
        e.text("v").link(v);
        prev = kb;
    }
    e.text("l").null();
    e.buf
}
