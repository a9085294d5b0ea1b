//! Event keys: the identity of an event for deduplication, computed the same way from a decoded
//! event and from its stored row, so recovery can read back what is already durable.

use super::rows::{MAX_QUARANTINE_RAW, truncate_str};
use super::{Cursor, Envelope, ErrorEvent, EventData};
use std::hash::{Hash, Hasher};

/// A 128-bit key of an event: (kind, did, collection, rkey, rev, operation) for commits,
/// (kind, did, seq) for identity/account, (kind, did, rev) for sync; (reason, bytes, path,
/// cursor) for a quarantined input.
///
/// Keys are computed with the standard library's SipHash at fixed keys: an attacker who chooses
/// event fields can at worst make two of their own events collide (one is then dropped as a
/// duplicate of the other), not slow down the set. Keys are only compared within one process
/// (recovery recomputes them from the files), so the hash may change between Rust releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventKey(u128);

impl EventKey {
    /// Folds the key to 64 bits (for order-independent hashes of a file's rows).
    pub fn fold(self) -> u64 {
        self.0 as u64 ^ (self.0 >> 64) as u64
    }
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

fn two_hashes(salt: u8, f: impl Fn(&mut std::collections::hash_map::DefaultHasher)) -> EventKey {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    let mut b = std::collections::hash_map::DefaultHasher::new();
    salt.hash(&mut b);
    f(&mut a);
    f(&mut b);
    EventKey((u128::from(a.finish()) << 64) | u128::from(b.finish()))
}

/// The key of an event from its identifying fields.
pub fn key_of(p: KeyParts<'_>) -> EventKey {
    two_hashes(0xA7, |h| {
        p.kind.hash(h);
        p.did.hash(h);
        p.collection.hash(h);
        p.rkey.hash(h);
        p.rev.hash(h);
        p.operation.hash(h);
        p.event_seq.hash(h);
    })
}

/// The key of a decoded event (see [`key_of`]).
pub fn event_key(env: &Envelope) -> EventKey {
    let e = &env.event;
    let mut p = KeyParts {
        kind: e.kind().as_str(),
        did: e.did.as_str(),
        collection: "",
        rkey: "",
        rev: "",
        operation: "",
        event_seq: 0,
    };
    match &e.data {
        EventData::Commit(c) => {
            p.collection = c.collection.as_str();
            p.rkey = c.rkey.as_str();
            p.rev = c.rev.as_str();
            p.operation = c.operation.as_str();
        }
        EventData::Identity(i) => p.event_seq = i.seq,
        EventData::Account(x) => p.event_seq = x.seq,
        EventData::Sync(s) => p.rev = s.rev.as_str(),
    }
    key_of(p)
}

/// The key of a quarantined input: its reason, bytes (as stored: at most
/// [`MAX_QUARANTINE_RAW`]), path and cursor.
pub fn error_key(err: &ErrorEvent, cursor: Option<Cursor>) -> EventKey {
    error_key_of(
        err.reason.as_str(),
        &err.raw[..err.raw.len().min(MAX_QUARANTINE_RAW)],
        err.path.as_deref(),
        cursor.map(Cursor::value),
    )
}

/// [`error_key`] from stored fields.
pub fn error_key_of(reason: &str, raw: &[u8], path: Option<&str>, cursor: Option<i64>) -> EventKey {
    two_hashes(0x5A, |h| {
        reason.hash(h);
        raw.hash(h);
        path.map(|p| truncate_str(p, 4096)).hash(h);
        cursor.hash(h);
    })
}
