//! Deterministic synthetic network traffic with the shape of the real firehose.
//!
//! [`Traffic`] yields [`SimMessage`]s: a `subscribeRepos` frame, the Jetstream lines the same
//! event becomes, and the ground truth (keys of the events it carries). The same seed always gives
//! the same bytes. The mix follows published figures (roughly 45% likes, 25% follows, 10% posts,
//! 7% reposts, then blocks, listitems, profiles and a long tail of third-party NSIDs; about 4%
//! deletes, a few updates, identity and account events, some multi-op commits). Commits have the
//! Sync 1.1 shape: a CAR with the signed commit, MST nodes and the record blocks in shuffled order,
//! `since` and `prevData` naming the account's previous commit and its MST root (both absent on
//! its first), per-op `prev` on updates and deletes, no commit-level `prev`, `blobs: []`.

mod commit;
mod frames;
mod records;
mod rng;

pub use frames::{error_frame, frame_bytes, info_frame};
pub use rng::Rng;

use crate::decode::cbor::Encoder;
use crate::decode::cid::Cid;
use crate::decode::jetstream::write_line;
use crate::model::{Account, Did, Envelope, Event, EventData, Identity};
use crate::syntax::{format_datetime_ms, tid_from_parts};
use records::THIRD_PARTY;
use std::collections::HashMap;

/// Settings of the generator.
#[derive(Debug, Clone)]
pub struct TrafficConfig {
    /// Seed; the same seed gives the same traffic.
    pub seed: u64,
    /// Number of distinct accounts.
    pub accounts: u64,
    /// Stream time of the first message, µs since the epoch.
    pub start_time_us: i64,
    /// Mean stream-time step between messages, µs.
    pub step_us: i64,
    /// Stream time advances by each step to the microsecond, so it keeps pace with the clock
    /// when serving at a rate (at more than 1,000 messages/s several frames share a
    /// millisecond). Otherwise each step's microseconds are dropped, as captures always did (the
    /// same seed gives the same bytes), which makes a message about 500 µs shorter than its step.
    pub exact_clock: bool,
    /// First sequence number.
    pub first_seq: i64,
    /// Number of distinct third-party NSIDs in the long tail.
    pub long_tail: u64,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        TrafficConfig {
            seed: 1,
            accounts: 5_000,
            // 2026-07-04T14:00:00Z
            start_time_us: 1_783_173_600_000_000,
            step_us: 2_500,
            exact_clock: false,
            first_seq: 31_527_015_471,
            long_tail: 120,
        }
    }
}

/// The key of one event in the ground truth.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TruthKey {
    /// `commit`, `identity` or `account`.
    pub kind: &'static str,
    /// Account DID.
    pub did: String,
    /// Collection (empty for identity/account).
    pub collection: String,
    /// Record key (empty for identity/account).
    pub rkey: String,
    /// Revision, or the seq for identity/account.
    pub rev: String,
    /// `create`, `update`, `delete`, or empty.
    pub operation: &'static str,
}

/// One message of simulated traffic.
#[derive(Debug, Clone)]
pub struct SimMessage {
    /// Firehose sequence number.
    pub seq: i64,
    /// Stream time, µs.
    pub time_us: i64,
    /// Jetstream's `time_us` of its first event (the others follow one µs apart).
    pub jetstream_us: i64,
    /// The `subscribeRepos` frame.
    pub frame: Vec<u8>,
    /// The events it carries, as both sources should decode them (firehose envelopes).
    pub events: Vec<Envelope>,
}

impl SimMessage {
    /// The Jetstream lines for this message, with Jetstream's own `time_us` (the frame time plus
    /// a small processing delay, strictly increasing).
    pub fn jetstream_lines(&self) -> Vec<(i64, Vec<u8>)> {
        let mut out = Vec::with_capacity(self.events.len());
        for (k, env) in self.events.iter().enumerate() {
            let time_us = self.jetstream_us + k as i64;
            let mut e = env.clone();
            e.time_us = time_us;
            e.seq = None;
            e.chain = None;
            let mut line = Vec::with_capacity(512);
            if write_line(&e, &mut line) {
                out.push((time_us, line));
            }
        }
        out
    }

    /// Ground-truth keys of the events in this message.
    pub fn truth(&self) -> Vec<TruthKey> {
        self.events.iter().map(truth_key).collect()
    }
}

/// Jetstream `time_us` for op `k` of a message at `frame_time_us`.
pub fn jetstream_time_us(frame_time_us: i64, k: usize) -> i64 {
    frame_time_us + 250 + k as i64
}

/// An identifier the simulator made: valid by construction, so a failure is a bug in the
/// simulator itself (never input from outside).
fn valid<T>(r: Result<T, crate::model::IdError>) -> T {
    r.unwrap_or_else(|e| panic!("the simulator generated an invalid identifier: {e}"))
}

/// The truth key of an event.
pub fn truth_key(env: &Envelope) -> TruthKey {
    let e = &env.event;
    match &e.data {
        EventData::Commit(c) => TruthKey {
            kind: "commit",
            did: e.did.to_string(),
            collection: c.collection.to_string(),
            rkey: c.rkey.to_string(),
            rev: c.rev.to_string(),
            operation: c.operation.as_str(),
        },
        EventData::Identity(i) => TruthKey {
            kind: "identity",
            did: e.did.to_string(),
            collection: String::new(),
            rkey: String::new(),
            rev: i.seq.to_string(),
            operation: "",
        },
        EventData::Account(a) => TruthKey {
            kind: "account",
            did: e.did.to_string(),
            collection: String::new(),
            rkey: String::new(),
            rev: a.seq.to_string(),
            operation: "",
        },
        EventData::Sync(s) => TruthKey {
            kind: "sync",
            did: e.did.to_string(),
            collection: String::new(),
            rkey: String::new(),
            rev: s.rev.to_string(),
            operation: "",
        },
    }
}

#[derive(Debug, Default, Clone)]
struct Repo {
    rev_time: i64,
    /// The MST root of its last commit.
    data: Option<Cid>,
    records: Vec<(String, String, Cid)>,
    has_profile: bool,
    depth: u8,
}

/// The generator.
#[derive(Debug, Clone)]
pub struct Traffic {
    cfg: TrafficConfig,
    rng: Rng,
    seq: i64,
    time_us: i64,
    /// The stream's clock to the microsecond; frames carry it to the millisecond.
    exact_us: i64,
    /// The lowest Jetstream `time_us` the next message may use.
    jetstream_next_us: i64,
    repos: HashMap<u64, Repo>,
    recent_posts: Vec<(String, Cid)>,
    long_tail: Vec<String>,
    produced: u64,
}

/// The DID of simulated account `i`.
pub fn did_of(i: u64) -> String {
    let mut r = Rng::new(i.wrapping_mul(0x2545_F491_4F6C_DD1D));
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let s: String = (0..24).map(|_| A[r.below(32) as usize] as char).collect();
    format!("did:plc:{s}")
}

impl Traffic {
    /// A generator at the start of the stream.
    pub fn new(cfg: TrafficConfig) -> Self {
        let mut long_tail: Vec<String> = THIRD_PARTY.iter().map(|s| s.to_string()).collect();
        for i in 0..cfg.long_tail {
            long_tail.push(format!("com.example{}.app.record{}", i % 37, i));
        }
        Traffic {
            rng: Rng::new(cfg.seed),
            seq: cfg.first_seq,
            time_us: cfg.start_time_us,
            exact_us: cfg.start_time_us,
            jetstream_next_us: i64::MIN,
            repos: HashMap::new(),
            recent_posts: Vec::new(),
            long_tail,
            produced: 0,
            cfg,
        }
    }

    /// Messages produced so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// The next sequence number.
    pub fn next_seq(&self) -> i64 {
        self.seq
    }

    /// Uses up the next sequence number (for an injected message).
    pub fn skip_seq(&mut self) {
        self.seq += 1;
    }

    fn next_rev(&mut self, account: u64) -> (String, Option<String>) {
        let now = self.time_us;
        let repo = self.repos.entry(account).or_default();
        let since = if repo.rev_time == 0 {
            None
        } else {
            Some(tid_from_parts(repo.rev_time as u64, 0))
        };
        repo.rev_time = now.max(repo.rev_time + 1);
        (tid_from_parts(repo.rev_time as u64, 0), since)
    }

    /// The records of simulated account `account`'s repository as a backfill finds it: `n`
    /// records made between `from_us` and `to_us` (collections in the live mix; TID record
    /// keys of their creation time, `self` for the profile, some third-party keys that are not
    /// TIDs). Keys are unique; the same seed and account give the same records.
    pub fn history(
        seed: u64,
        accounts: u64,
        account: u64,
        n: u64,
        from_us: i64,
        to_us: i64,
    ) -> Vec<(String, serde_json::Value)> {
        let mut t = Traffic::new(TrafficConfig {
            seed: seed ^ account.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            accounts,
            ..Default::default()
        });
        let span = (to_us - from_us).max(1) as u64;
        let mut keys = std::collections::BTreeMap::new();
        let mut profile = false;
        for i in 0..n {
            // creation times spread over the span, older records first
            let at = from_us + (span / n.max(1) * i + t.rng.below(span / n.max(1) + 1)) as i64;
            t.time_us = at.min(to_us);
            let coll = t.pick_coll();
            let nsid = match coll {
                records::Coll::ThirdParty => {
                    let k = t.rng.below(t.long_tail.len() as u64) as usize;
                    t.long_tail[k].clone()
                }
                c => c.nsid().to_string(),
            };
            let rkey = match coll {
                records::Coll::Profile if !profile => {
                    profile = true;
                    "self".to_string()
                }
                records::Coll::ThirdParty if t.rng.chance(0.3) => {
                    format!("k{}-{}", t.rng.below(1 << 30), i)
                }
                _ => tid_from_parts(t.time_us as u64, (i % 1024) as u16),
            };
            let coll = if rkey != "self" && coll == records::Coll::Profile {
                records::Coll::Post
            } else {
                coll
            };
            let nsid = if coll == records::Coll::Post && nsid == "app.bsky.actor.profile" {
                "app.bsky.feed.post".to_string()
            } else {
                nsid
            };
            let rec = t.record_for(coll, &nsid);
            keys.insert(format!("{nsid}/{rkey}"), rec);
        }
        keys.into_iter().collect()
    }

    /// Generates the next message.
    pub fn next_message(&mut self) -> SimMessage {
        self.produced += 1;
        let jitter = self.rng.below(self.cfg.step_us as u64) as i64;
        // frame times have millisecond precision
        if self.cfg.exact_clock {
            // serving at a rate: the clock to the microsecond (several frames may share a
            // millisecond). With each step rounded up to a millisecond and then cut to one,
            // stream time ran 3.5 times faster than the clock at 3,500 messages/s and 1.3 times
            // at 500, and after a while passed the 10 minutes ahead of it that a sink accepts.
            self.exact_us += (self.cfg.step_us / 2 + jitter).max(1);
        } else {
            self.exact_us += (self.cfg.step_us / 2 + jitter).max(1000);
            self.exact_us -= self.exact_us % 1000;
        }
        self.time_us = self.exact_us - self.exact_us % 1000;
        let mut m = self.next_event();
        // Jetstream's times are strictly increasing, also within a shared millisecond
        m.jetstream_us = (m.time_us + 250).max(self.jetstream_next_us);
        self.jetstream_next_us = m.jetstream_us + m.events.len().max(1) as i64;
        m
    }

    fn next_event(&mut self) -> SimMessage {
        let seq = self.seq;
        self.seq += 1;
        let account = self.rng.skewed(self.cfg.accounts);
        let did = did_of(account);
        let time = format_datetime_ms(self.time_us);
        let r = self.rng.below(1000);
        if r < 5 {
            return self.identity(seq, did, time);
        }
        if r < 10 {
            return self.account(seq, did, time);
        }
        self.commit(seq, account, did, time)
    }

    /// A frame carrying one event, at the stream's current time.
    fn one_event(&self, seq: i64, frame: Vec<u8>, env: Envelope) -> SimMessage {
        SimMessage {
            seq,
            time_us: self.time_us,
            jetstream_us: jetstream_time_us(self.time_us, 0),
            frame,
            events: vec![env],
        }
    }

    fn identity(&mut self, seq: i64, did: String, time: String) -> SimMessage {
        let handle = if self.rng.chance(0.2) {
            Some(format!("user{}.bsky.social", self.rng.below(100_000)))
        } else {
            None
        };
        let mut e = Encoder::new();
        let n = 3 + usize::from(handle.is_some());
        e.map(n)
            .text("did")
            .text(&did)
            .text("seq")
            .int(seq)
            .text("time")
            .text(&time);
        if let Some(h) = &handle {
            e.text("handle").text(h);
        }
        let frame = frame_bytes("#identity", &e.buf);
        let env = Envelope {
            event: Event {
                did: valid(Did::parse(did)),
                data: EventData::Identity(Identity { seq, time, handle }),
            },
            time_us: self.time_us,
            claimed_time_us: None,
            seq: Some(seq),
            chain: None,
        };
        self.one_event(seq, frame, env)
    }

    fn account(&mut self, seq: i64, did: String, time: String) -> SimMessage {
        let active = self.rng.chance(0.6);
        let status = if active {
            None
        } else {
            Some(
                self.rng
                    .pick(&[
                        "deactivated",
                        "takendown",
                        "suspended",
                        "deleted",
                        "desynchronized",
                        "throttled",
                    ])
                    .to_string(),
            )
        };
        let mut e = Encoder::new();
        let n = 4 + usize::from(status.is_some());
        e.map(n)
            .text("did")
            .text(&did)
            .text("seq")
            .int(seq)
            .text("time")
            .text(&time);
        e.text("active").bool(active);
        if let Some(s) = &status {
            e.text("status").text(s);
        }
        let frame = frame_bytes("#account", &e.buf);
        let env = Envelope {
            event: Event {
                did: valid(Did::parse(did)),
                data: EventData::Account(Account {
                    seq,
                    time,
                    active,
                    status,
                }),
            },
            time_us: self.time_us,
            claimed_time_us: None,
            seq: Some(seq),
            chain: None,
        };
        self.one_event(seq, frame, env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At more than 1,000 messages/s stream time keeps pace with the clock (several frames
    /// share a millisecond) and Jetstream's times stay strictly increasing; at the default
    /// step the frames are as they always were.
    #[test]
    fn stream_time_keeps_pace_with_the_rate() {
        let start = TrafficConfig::default().start_time_us;
        for step_us in [100, 285, 999, 2000] {
            let mut t = Traffic::new(TrafficConfig {
                step_us,
                exact_clock: true,
                ..Default::default()
            });
            let n = 4_000;
            let (mut last_frame, mut last_jet) = (i64::MIN, i64::MIN);
            let mut shared = 0;
            for _ in 0..n {
                let m = t.next_message();
                assert_eq!(m.time_us % 1000, 0, "frame times are milliseconds");
                assert!(m.time_us >= last_frame);
                shared += usize::from(m.time_us == last_frame);
                last_frame = m.time_us;
                for (jt, _) in m.jetstream_lines() {
                    assert!(jt > last_jet, "jetstream time {jt} after {last_jet}");
                    assert!(jt >= m.time_us);
                    last_jet = jt;
                }
            }
            let elapsed = last_frame - start;
            let expected = step_us * n;
            assert!(
                (elapsed - expected).abs() < expected / 20 + 1000,
                "step {step_us}: {elapsed} µs for {n} messages, expected about {expected}"
            );
            assert!(
                step_us > 1000 || shared > 0,
                "step {step_us}: no frames shared a millisecond"
            );
        }
        // captures (the default step, 2,500 µs, without the exact clock): every frame a
        // millisecond or more after the last, and Jetstream's time 250 µs after the frame's, as
        // before
        let mut t = Traffic::new(TrafficConfig::default());
        let mut last = start;
        for _ in 0..1_000 {
            let m = t.next_message();
            assert!(m.time_us - last >= 1000);
            assert_eq!(m.jetstream_us, m.time_us + 250);
            last = m.time_us;
        }
    }
}
