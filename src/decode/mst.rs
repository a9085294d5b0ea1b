//! The repository's Merkle Search Tree (MST): node decoding, a verified in-order walk, and a
//! builder (for the simulator and tests).
//!
//! A node is DAG-CBOR `{e: [{p, k, t, v}], l}`: `l` links the subtree of keys before the first
//! entry, each entry's `t` the subtree between it and the next. Keys are `collection/rkey`, stored
//! prefix-compressed: `p` bytes shared with the previous entry's key in the same node, then `k`.
//! A key's height is the number of leading zero bits of its sha-256, halved (fanout 4); every entry
//! of a node has the node's layer, and a subtree sits exactly one layer below its parent (empty
//! intermediate nodes keep a subtree at its layer). The walk checks all of this, so a tree that
//! does not match its root, a missing node or a key out of order is an error, never a short read.

use super::cbor::{CborError, Encoder, Reader};
use super::cid::Cid;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// The longest key the walk accepts (a collection NSID of ≤ 317 bytes, `/`, an rkey ≤ 512).
pub const MAX_KEY_LEN: usize = 1024;
/// The most entries one node may have (real nodes hold a handful; the bound caps allocation).
pub const MAX_ENTRIES: usize = 4096;
/// The deepest a walk goes: 256 bits of hash give at most 128 layers.
const MAX_DEPTH: usize = 130;

/// Why a tree is not a valid MST for its root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MstError {
    /// A node the tree links to is not among the blocks.
    #[error("missing MST node {0}")]
    MissingNode(Cid),
    /// A node's bytes are not a valid node.
    #[error("bad MST node {cid}: {why}")]
    BadNode {
        /// the node
        cid: Cid,
        /// what is wrong
        why: String,
    },
    /// A key that is not `collection/rkey`, too long, or not UTF-8.
    #[error("bad MST key {0:?}")]
    BadKey(String),
    /// Keys not in strictly increasing order.
    #[error("MST keys out of order: {prev:?} then {next:?}")]
    Order {
        /// the earlier key
        prev: String,
        /// the key that should have been greater
        next: String,
    },
    /// A key whose height does not fit the node it is in.
    #[error("MST key {key:?} has height {height}, its node is at layer {layer}")]
    Layer {
        /// the key
        key: String,
        /// its height
        height: u32,
        /// the node's layer
        layer: u32,
    },
    /// The tree is deeper than any valid MST.
    #[error("MST deeper than {0} levels")]
    TooDeep(usize),
    /// Reading a block failed (a spill file, for example).
    #[error("reading MST block {cid}: {why}")]
    Read {
        /// the block
        cid: Cid,
        /// what failed
        why: String,
    },
}

/// Where a walk gets blocks from.
pub trait BlockSource {
    /// Copies the block with this CID into `out` (cleared first); `Ok(false)` when it is absent.
    fn read_block(&self, cid: &Cid, out: &mut Vec<u8>) -> Result<bool, String>;
}

/// Copies a block found in memory into `out`.
pub fn copy_block(found: Option<&[u8]>, out: &mut Vec<u8>) -> Result<bool, String> {
    out.clear();
    if let Some(b) = found {
        out.extend_from_slice(b);
    }
    Ok(found.is_some())
}

impl BlockSource for HashMap<Cid, Vec<u8>> {
    fn read_block(&self, cid: &Cid, out: &mut Vec<u8>) -> Result<bool, String> {
        copy_block(self.get(cid).map(Vec::as_slice), out)
    }
}

impl BlockSource for super::car::Car<'_> {
    fn read_block(&self, cid: &Cid, out: &mut Vec<u8>) -> Result<bool, String> {
        copy_block(self.get(cid), out)
    }
}

/// A key's height: leading zero bits of its sha-256, divided by two.
pub fn key_height(key: &[u8]) -> u32 {
    let h = Sha256::digest(key);
    let mut zeros = 0;
    for b in h {
        if b == 0 {
            zeros += 8;
        } else {
            zeros += b.leading_zeros();
            break;
        }
    }
    zeros / 2
}

/// One entry of a decoded node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The full key (`collection/rkey`).
    pub key: String,
    /// The record's CID.
    pub value: Cid,
    /// The subtree after this entry.
    pub right: Option<Cid>,
}

/// A decoded node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    /// The subtree before the first entry.
    pub left: Option<Cid>,
    /// The entries, keys decompressed.
    pub entries: Vec<Entry>,
}

impl Node {
    /// Decodes a node block. Keys are checked for length and syntax, not yet for order.
    pub fn decode(block: &[u8]) -> Result<Node, String> {
        let e = |e: CborError| e.to_string();
        let mut r = Reader::new(block);
        let n = r.map().map_err(e)?;
        let mut left = None;
        let mut entries = None;
        for _ in 0..n {
            match r.key().map_err(e)? {
                "l" => left = Some(r.link_or_null().map_err(e)?),
                "e" => {
                    let len = r.array().map_err(e)?;
                    if len > MAX_ENTRIES {
                        return Err(format!("{len} entries (at most {MAX_ENTRIES})"));
                    }
                    let mut v: Vec<Entry> = Vec::with_capacity(len);
                    for i in 0..len {
                        let prev = v.last().map(|x| x.key.as_bytes()).unwrap_or(b"");
                        v.push(decode_entry(&mut r, prev, i)?);
                    }
                    entries = Some(v);
                }
                k => return Err(format!("unexpected key {k:?}")),
            }
        }
        r.finish().map_err(e)?;
        let (Some(left), Some(entries)) = (left, entries) else {
            return Err("a node needs both `l` and `e`".into());
        };
        Ok(Node { left, entries })
    }

    /// Encodes a node as canonical DAG-CBOR, prefix-compressing its keys.
    pub fn encode(&self) -> Vec<u8> {
        let mut enc = Encoder::new();
        enc.map(2).text("e").array(self.entries.len());
        let mut prev: &[u8] = b"";
        for en in &self.entries {
            let k = en.key.as_bytes();
            let p = common_prefix(prev, k);
            enc.map(4).text("k").bytes(&k[p..]).text("p").int(p as i64);
            enc.text("t");
            match &en.right {
                Some(c) => enc.link(c),
                None => enc.null(),
            };
            enc.text("v").link(&en.value);
            prev = k;
        }
        enc.text("l");
        match &self.left {
            Some(c) => enc.link(c),
            None => enc.null(),
        };
        enc.buf
    }
}

fn decode_entry(r: &mut Reader<'_>, prev: &[u8], i: usize) -> Result<Entry, String> {
    let e = |e: CborError| e.to_string();
    let n = r.map().map_err(e)?;
    let (mut p, mut k, mut t, mut v) = (None, None, None, None);
    for _ in 0..n {
        match r.key().map_err(e)? {
            "p" => p = Some(r.int().map_err(e)?),
            "k" => k = Some(r.bytes().map_err(e)?),
            "t" => t = Some(r.link_or_null().map_err(e)?),
            "v" => v = Some(r.link().map_err(e)?),
            other => return Err(format!("entry {i}: unexpected key {other:?}")),
        }
    }
    let (Some(p), Some(k), Some(t), Some(v)) = (p, k, t, v) else {
        return Err(format!("entry {i}: needs p, k, t and v"));
    };
    let p = usize::try_from(p)
        .ok()
        .filter(|&p| p <= prev.len())
        .ok_or_else(|| format!("entry {i}: prefix {p} longer than the previous key"))?;
    if i == 0 && p != 0 {
        return Err("entry 0: a node's first key has no prefix".into());
    }
    if p + k.len() > MAX_KEY_LEN {
        return Err(format!("entry {i}: key longer than {MAX_KEY_LEN} bytes"));
    }
    let mut key = Vec::with_capacity(p + k.len());
    key.extend_from_slice(&prev[..p]);
    key.extend_from_slice(k);
    let key = String::from_utf8(key).map_err(|_| format!("entry {i}: key is not UTF-8"))?;
    Ok(Entry {
        key,
        value: v,
        right: t,
    })
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Splits a record key `collection/rkey`, checking both parts' syntax.
pub fn split_key(key: &str) -> Option<(&str, &str)> {
    let (c, r) = key.split_once('/')?;
    (crate::syntax::is_nsid(c) && crate::syntax::is_rkey(r)).then_some((c, r))
}

/// Walks the tree under `root` in key order, calling `f(key, record_cid)` for every entry after
/// checking it: node shape, key syntax, strictly increasing keys, heights that fit their layer.
/// Returns the number of entries.
pub fn walk<E: From<MstError>>(
    src: &dyn BlockSource,
    root: &Cid,
    f: &mut dyn FnMut(&str, &Cid) -> Result<(), E>,
) -> Result<u64, E> {
    let mut w = Walker {
        src,
        buf: Vec::new(),
        prev: None,
        count: 0,
    };
    w.node(root, None, 0, f, true)?;
    Ok(w.count)
}

struct Walker<'s> {
    src: &'s dyn BlockSource,
    buf: Vec<u8>,
    prev: Option<String>,
    count: u64,
}

impl Walker<'_> {
    fn load(&mut self, cid: &Cid) -> Result<Node, MstError> {
        let found = self
            .src
            .read_block(cid, &mut self.buf)
            .map_err(|why| MstError::Read { cid: *cid, why })?;
        if !found {
            return Err(MstError::MissingNode(*cid));
        }
        Node::decode(&self.buf).map_err(|why| MstError::BadNode { cid: *cid, why })
    }

    /// `layer`: the layer this node must be at (one below its parent), unknown at the root.
    fn node<E: From<MstError>>(
        &mut self,
        cid: &Cid,
        layer: Option<u32>,
        depth: usize,
        f: &mut dyn FnMut(&str, &Cid) -> Result<(), E>,
        root: bool,
    ) -> Result<(), E> {
        if depth >= MAX_DEPTH {
            return Err(MstError::TooDeep(MAX_DEPTH).into());
        }
        let node = self.load(cid)?;
        if node.entries.is_empty() && node.left.is_none() && !root {
            return Err(MstError::BadNode {
                cid: *cid,
                why: "an empty node below the root".into(),
            }
            .into());
        }
        let layer = match node.entries.first() {
            Some(first) => {
                let h = key_height(first.key.as_bytes());
                if let Some(l) = layer.filter(|&l| l != h) {
                    return Err(MstError::Layer {
                        key: first.key.clone(),
                        height: h,
                        layer: l,
                    }
                    .into());
                }
                Some(h)
            }
            None => layer,
        };
        let below = match layer {
            Some(0) => None,
            Some(l) => Some(Some(l - 1)),
            // an entry-less root: its subtree's layer is whatever it is
            None => Some(None),
        };
        let child = |c: &Option<Cid>| -> Result<Option<(Cid, Option<u32>)>, MstError> {
            match (c, below) {
                (None, _) => Ok(None),
                (Some(c), Some(l)) => Ok(Some((*c, l))),
                (Some(_), None) => Err(MstError::BadNode {
                    cid: *cid,
                    why: "a layer-0 node with a subtree".into(),
                }),
            }
        };
        if let Some((c, l)) = child(&node.left)? {
            self.node(&c, l, depth + 1, f, false)?;
        }
        for en in &node.entries {
            let h = key_height(en.key.as_bytes());
            if Some(h) != layer {
                return Err(MstError::Layer {
                    key: en.key.clone(),
                    height: h,
                    layer: layer.unwrap_or(h),
                }
                .into());
            }
            if split_key(&en.key).is_none() {
                return Err(MstError::BadKey(en.key.clone()).into());
            }
            if let Some(prev) = &self.prev
                && prev.as_str() >= en.key.as_str()
            {
                return Err(MstError::Order {
                    prev: prev.clone(),
                    next: en.key.clone(),
                }
                .into());
            }
            f(&en.key, &en.value)?;
            self.count += 1;
            self.prev = Some(en.key.clone());
            if let Some((c, l)) = child(&en.right)? {
                self.node(&c, l, depth + 1, f, false)?;
            }
        }
        Ok(())
    }
}

/// Builds the MST of `entries` (sorted by key, unique) and returns its root and every node block.
/// Deterministic: the same keys and values give the same root as the reference implementation.
pub fn build(entries: &[(String, Cid)]) -> (Cid, Vec<(Cid, Vec<u8>)>) {
    let mut blocks = Vec::new();
    let top = entries.iter().map(|(k, _)| key_height(k.as_bytes())).max();
    let root = match top {
        None => {
            let b = Node::default().encode();
            let c = Cid::for_dag_cbor(&b);
            blocks.push((c, b));
            c
        }
        Some(top) => {
            let heights: Vec<u32> = entries
                .iter()
                .map(|(k, _)| key_height(k.as_bytes()))
                .collect();
            build_layer(entries, &heights, top, &mut blocks)
        }
    };
    (root, blocks)
}

fn build_layer(
    entries: &[(String, Cid)],
    heights: &[u32],
    layer: u32,
    blocks: &mut Vec<(Cid, Vec<u8>)>,
) -> Cid {
    let mut node = Node::default();
    let mut run_start = 0;
    let sub = |from: usize, to: usize, blocks: &mut Vec<(Cid, Vec<u8>)>| {
        (from < to).then(|| build_layer(&entries[from..to], &heights[from..to], layer - 1, blocks))
    };
    for (i, (k, v)) in entries.iter().enumerate() {
        if heights[i] == layer {
            let s = sub(run_start, i, blocks);
            match node.entries.last_mut() {
                Some(last) => last.right = s,
                None => node.left = s,
            }
            node.entries.push(Entry {
                key: k.clone(),
                value: *v,
                right: None,
            });
            run_start = i + 1;
        }
    }
    let s = sub(run_start, entries.len(), blocks);
    match node.entries.last_mut() {
        Some(last) => last.right = s,
        None => node.left = s,
    }
    let b = node.encode();
    let c = Cid::for_dag_cbor(&b);
    blocks.push((c, b));
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixture(name: &str) -> Value {
        let p = format!(
            "{}/tests/fixtures/atproto-interop-tests/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    #[test]
    fn key_heights_match_the_interop_fixtures() {
        let v = fixture("mst/key_heights.json");
        let cases = v.as_array().unwrap();
        assert!(cases.len() >= 9);
        for c in cases {
            let key = c["key"].as_str().unwrap();
            assert_eq!(
                u64::from(key_height(key.as_bytes())),
                c["height"].as_u64().unwrap(),
                "{key}"
            );
        }
    }

    /// The builder reproduces the reference roots of the commit-proof fixtures, before and after
    /// each change, so the walk below is checked against real trees.
    #[test]
    fn builder_matches_the_reference_roots() {
        let v = fixture("firehose/commit-proof-fixtures.json");
        let cases = v.as_array().unwrap();
        assert_eq!(cases.len(), 6);
        for c in cases {
            let leaf = Cid::parse(c["leafValue"].as_str().unwrap()).unwrap();
            let keys = |v: &Value| -> Vec<String> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|k| k.as_str().unwrap().to_string())
                    .collect()
            };
            let mut before = keys(&c["keys"]);
            before.sort();
            let with: Vec<(String, Cid)> = before.iter().map(|k| (k.clone(), leaf)).collect();
            let (root, _) = build(&with);
            let want = Cid::parse(c["rootBeforeCommit"].as_str().unwrap()).unwrap();
            assert_eq!(root, want, "{}: before", c["comment"]);
            let mut after = before.clone();
            after.extend(keys(&c["adds"]));
            let dels = keys(&c["dels"]);
            after.retain(|k| !dels.contains(k));
            after.sort();
            let with: Vec<(String, Cid)> = after.iter().map(|k| (k.clone(), leaf)).collect();
            let (root, _) = build(&with);
            let want = Cid::parse(c["rootAfterCommit"].as_str().unwrap()).unwrap();
            assert_eq!(root, want, "{}: after", c["comment"]);
        }
    }
}
