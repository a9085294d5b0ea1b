//! Event keys: the identity of an event for deduplication, computed the same way from a decoded
//! event and from its stored row, so recovery can read back what is already durable.

use super::rows::{MAX_QUARANTINE_RAW, truncate_str};
use super::{Cursor, Envelope, ErrorEvent, EventData};
use siphasher::sip128::{Hasher128, SipHasher13};
use std::hash::{Hash, Hasher};

/// A 128-bit key of an event: (kind, did, collection, rkey, rev, operation) for commits,
/// (kind, did, seq) for identity/account, (kind, did, rev) for sync; (reason, bytes, path,
/// cursor) for a quarantined input.
///
/// Keys are one pass of SipHash-1-3 with a 128-bit output at fixed keys, over the fields as
/// the standard library's `Hash` writes them (each string followed by `0xff`), gathered in a
/// buffer first so the hasher sees one write. An attacker who chooses event fields can at worst
/// make two of their own events collide (one is then dropped as a duplicate of the other), not
/// slow down the set. Keys are only compared within one process (recovery recomputes them from
/// the files); file names take a fold of them, so the same events written again by the same
/// version have the same names.
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

/// SipHash-1-3's fixed keys (the first digits of pi; any fixed value would do).
const KEYS: (u64, u64) = (0x243f_6a88_85a3_08d3, 0x1319_8a2e_0370_7344);

/// A hasher that gathers what it is given and hashes it in one write: `Hash` of a few short
/// strings is a dozen small writes, and each costs SipHash a call and its own tail handling.
/// The result is the same as writing each piece (SipHash is a stream), only faster.
struct Gathered {
    buf: [u8; 256],
    len: usize,
    sip: SipHasher13,
}

impl Hasher for Gathered {
    fn write(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.buf.len() {
            self.sip.write(&self.buf[..self.len]);
            self.len = 0;
            if bytes.len() > self.buf.len() {
                self.sip.write(bytes);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn finish(&self) -> u64 {
        // only `finish128` is used; this is the 64-bit fold of it
        let h = self.finish128_ref();
        h.h1 ^ h.h2
    }
}

impl Gathered {
    fn finish128_ref(&self) -> siphasher::sip128::Hash128 {
        let mut sip = self.sip;
        sip.write(&self.buf[..self.len]);
        sip.finish128()
    }
}

fn hash128(salt: u8, f: impl FnOnce(&mut Gathered)) -> EventKey {
    let mut h = Gathered {
        buf: [0; 256],
        len: 0,
        sip: SipHasher13::new_with_keys(KEYS.0, KEYS.1),
    };
    salt.hash(&mut h);
    f(&mut h);
    EventKey(h.finish128_ref().as_u128())
}

/// The key of an event from its identifying fields.
pub fn key_of(p: KeyParts<'_>) -> EventKey {
    hash128(0xA7, |h| {
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
    hash128(0x5A, |h| {
        reason.hash(h);
        raw.hash(h);
        path.map(|p| truncate_str(p, 4096)).hash(h);
        cursor.hash(h);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same fields hashed piece by piece, without the gathering buffer.
    fn piecewise(p: KeyParts<'_>) -> EventKey {
        let mut sip = SipHasher13::new_with_keys(KEYS.0, KEYS.1);
        0xA7u8.hash(&mut sip);
        for s in [p.kind, p.did, p.collection, p.rkey, p.rev, p.operation] {
            s.hash(&mut sip);
        }
        p.event_seq.hash(&mut sip);
        EventKey(sip.finish128().as_u128())
    }

    #[test]
    fn gathering_the_fields_hashes_what_writing_them_one_by_one_does() {
        let long = "x".repeat(700);
        let mid = "y".repeat(250);
        for did in ["did:plc:z72i7hdynmk6r22z27h6tvur", &long, &mid, ""] {
            for rkey in ["3mmoojp7etg2g", &mid, &long] {
                let p = KeyParts {
                    kind: "commit",
                    did,
                    collection: "app.bsky.feed.post",
                    rkey,
                    rev: "3mmoojp7vgo2g",
                    operation: "create",
                    event_seq: 7,
                };
                assert_eq!(
                    key_of(p),
                    piecewise(p),
                    "did {} rkey {}",
                    did.len(),
                    rkey.len()
                );
            }
        }
    }

    #[test]
    fn every_field_and_its_boundaries_make_the_key() {
        let base = KeyParts {
            kind: "commit",
            did: "did:plc:a",
            collection: "app.bsky.feed.like",
            rkey: "3mmoojp7etg2g",
            rev: "3mmoojp7vgo2g",
            operation: "create",
            event_seq: 0,
        };
        let k = key_of(base);
        assert_eq!(k, key_of(base));
        let moved = [
            KeyParts {
                kind: "account",
                ..base
            },
            KeyParts {
                did: "did:plc:b",
                ..base
            },
            KeyParts {
                collection: "app.bsky.feed.post",
                ..base
            },
            KeyParts {
                rkey: "3mmoojp7etg2h",
                ..base
            },
            KeyParts {
                rev: "3mmoojp7vgo2h",
                ..base
            },
            KeyParts {
                operation: "delete",
                ..base
            },
            KeyParts {
                event_seq: 1,
                ..base
            },
            // the same bytes split at another place between two fields
            KeyParts {
                did: "did:plc:aapp.bsky.feed.like",
                collection: "",
                ..base
            },
        ];
        for (i, p) in moved.iter().enumerate() {
            assert_ne!(key_of(*p), k, "change {i}");
        }
        assert_ne!(
            k.0 >> 64,
            k.0 & u128::from(u64::MAX),
            "both halves carry bits"
        );
        // an error's key is salted apart from an event's
        assert_ne!(error_key_of("json", b"", None, None), key_of(base));
    }
}
