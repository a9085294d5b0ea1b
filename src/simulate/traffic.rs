//! Deterministic synthetic network traffic with the shape of the real firehose.
//!
//! [`Traffic`] yields [`SimMessage`]s: a `subscribeRepos` frame, the Jetstream lines the same
//! event becomes, and the ground truth (keys of the events it carries). The same seed always gives
//! the same bytes. The mix follows published figures (roughly 45% likes, 25% follows, 10% posts,
//! 7% reposts, then blocks, listitems, profiles and a long tail of third-party NSIDs; about 4%
//! deletes, a few updates, identity and account events, some multi-op commits). Commits have the
//! Sync 1.1 shape: a CAR with the signed commit, MST nodes and the record blocks in shuffled order,
//! `prevData`, per-op `prev` on updates and deletes, no commit-level `prev`, `blobs: []`.

use crate::decode::car::CarWriter;
use crate::decode::cbor::Encoder;
use crate::decode::cid::Cid;
use crate::decode::jetstream::write_line;
use crate::model::{
    Account, CommitOp, Did, Envelope, Event, EventData, Identity, Nsid, Operation, Rkey, Tid,
};
use crate::syntax::{format_datetime_ms, tid_from_parts};
use serde_json::{Value, json};
use std::collections::HashMap;

/// A small deterministic PRNG (SplitMix64): stable across platforms and crate versions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeds the generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// A skewed index in `0..n`: low indices are much more likely (roughly Zipf-like).
    pub fn skewed(&mut self, n: u64) -> u64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((n as f64).powf(u) - 1.0).floor() as u64 % n.max(1)
    }

    /// Picks an element.
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }

    /// Random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Settings of the generator.
#[derive(Debug, Clone)]
pub struct TrafficConfig {
    /// Seed; the same seed gives the same traffic.
    pub seed: u64,
    /// Number of distinct accounts.
    pub accounts: u64,
    /// Stream time of the first message, µs since the epoch.
    pub start_time_us: i64,
    /// Mean stream-time step between messages, µs (at least 1,000: frame times have ms precision).
    pub step_us: i64,
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
            let time_us = jetstream_time_us(self.time_us, k);
            let mut e = env.clone();
            e.time_us = time_us;
            e.seq = None;
            e.since = None;
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

const WORDS: &[&str] = &[
    "the",
    "a",
    "to",
    "and",
    "of",
    "is",
    "in",
    "it",
    "you",
    "that",
    "this",
    "for",
    "on",
    "my",
    "just",
    "so",
    "be",
    "have",
    "not",
    "with",
    "but",
    "are",
    "was",
    "me",
    "what",
    "all",
    "like",
    "at",
    "do",
    "if",
    "can",
    "about",
    "out",
    "we",
    "one",
    "they",
    "get",
    "up",
    "when",
    "no",
    "more",
    "new",
    "time",
    "people",
    "today",
    "really",
    "good",
    "think",
    "know",
    "love",
    "day",
    "great",
    "bluesky",
    "post",
    "feed",
    "thread",
    "art",
    "music",
    "coffee",
    "weekend",
    "news",
    "game",
    "book",
    "photo",
    "cat",
    "dog",
    "rain",
    "sun",
    "city",
    "train",
    "code",
    "rust",
    "data",
    "lake",
    "sky",
    "night",
    "morning",
    "friends",
    "world",
    "here",
    "there",
    "why",
    "é",
    "über",
    "café",
    "日本",
    "こんにちは",
    "ありがとう",
    "olá",
    "obrigado",
    "hola",
    "gracias",
    "😀",
    "🦋",
    "🎉",
    "❤️",
    "👀",
    "🔥",
    "✨",
    "&",
    "<3",
    "->",
    "\"quoted\"",
    "it's",
];

const LANGS: &[&str] = &[
    "en", "en", "en", "en", "en", "ja", "ja", "pt", "de", "es", "fr", "ko", "en", "pt-BR", "zh",
];

const THIRD_PARTY: &[&str] = &[
    "fm.teal.alpha.actor.status",
    "fm.teal.alpha.feed.play",
    "place.stream.chat.message",
    "place.stream.broadcast.origin",
    "org.hypercerts.claim.activity",
    "sh.tangled.repo",
    "sh.tangled.graph.follow",
    "com.whtwnd.blog.entry",
    "xyz.statusphere.status",
    "events.smokesignal.calendar.event",
    "blue.flashes.feed.post",
    "app.popsky.review",
];

/// Which core collection a commit op touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coll {
    Like,
    Follow,
    Post,
    Repost,
    Block,
    ListItem,
    Profile,
    ThirdParty,
}

impl Coll {
    fn nsid(self) -> &'static str {
        match self {
            Coll::Like => "app.bsky.feed.like",
            Coll::Follow => "app.bsky.graph.follow",
            Coll::Post => "app.bsky.feed.post",
            Coll::Repost => "app.bsky.feed.repost",
            Coll::Block => "app.bsky.graph.block",
            Coll::ListItem => "app.bsky.graph.listitem",
            Coll::Profile => "app.bsky.actor.profile",
            Coll::ThirdParty => "",
        }
    }
}

/// (operation, collection, rkey, new record block, previous record CID, record JSON)
type PendingOp = (
    Operation,
    String,
    String,
    Option<(Cid, Vec<u8>)>,
    Option<Cid>,
    Option<String>,
);

#[derive(Debug, Default, Clone)]
struct Repo {
    rev_time: i64,
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

    fn text(&mut self, min: usize, max: usize) -> String {
        let n = min + self.rng.below((max - min + 1) as u64) as usize;
        let mut s = String::new();
        for i in 0..n {
            if i > 0 {
                s.push(if self.rng.chance(0.03) { '\n' } else { ' ' });
            }
            let w: &&str = self.rng.pick(WORDS);
            s.push_str(w);
        }
        s
    }

    fn created_at(&mut self) -> String {
        // user clocks drift; a few are far off
        let skew = if self.rng.chance(0.01) {
            -(self.rng.below(86_400_000_000 * 400) as i64)
        } else {
            -(self.rng.below(3_000_000) as i64)
        };
        format_datetime_ms(self.time_us + skew)
    }

    fn random_cid(&mut self) -> Cid {
        let b = self.rng.bytes(16);
        Cid::for_dag_cbor(&b)
    }

    fn random_post_ref(&mut self) -> (String, Cid) {
        if !self.recent_posts.is_empty() && self.rng.chance(0.7) {
            let i = self.rng.skewed(self.recent_posts.len() as u64) as usize;
            let idx = self.recent_posts.len() - 1 - i;
            return self.recent_posts[idx].clone();
        }
        let did = did_of(self.rng.below(self.cfg.accounts * 4));
        let rkey = tid_from_parts((self.time_us - self.rng.below(1 << 36) as i64) as u64, 3);
        (
            format!("at://{did}/app.bsky.feed.post/{rkey}"),
            self.random_cid(),
        )
    }

    fn blob(&mut self, mime: &str) -> Value {
        let data = self.rng.bytes(24);
        let cid = Cid::for_raw(&data);
        json!({"$type": "blob", "ref": {"$link": cid.to_string()}, "mimeType": mime, "size": 10_000 + self.rng.below(900_000)})
    }

    fn post_record(&mut self) -> Value {
        let text = self.text(1, 45);
        let mut rec =
            json!({"$type": "app.bsky.feed.post", "text": text, "createdAt": self.created_at()});
        if self.rng.chance(0.85) {
            let mut langs = vec![self.rng.pick(LANGS).to_string()];
            if self.rng.chance(0.08) {
                langs.push(self.rng.pick(LANGS).to_string());
            }
            rec["langs"] = json!(langs);
        }
        if self.rng.chance(0.35) {
            let (root_uri, root_cid) = self.random_post_ref();
            let (parent_uri, parent_cid) = if self.rng.chance(0.5) {
                (root_uri.clone(), root_cid)
            } else {
                self.random_post_ref()
            };
            rec["reply"] = json!({
                "parent": {"cid": parent_cid.to_string(), "uri": parent_uri},
                "root": {"cid": root_cid.to_string(), "uri": root_uri}
            });
        }
        if self.rng.chance(0.3) {
            let mut facets = Vec::new();
            let n = 1 + self.rng.below(3);
            for _ in 0..n {
                let start = self.rng.below(40);
                let feature = match self.rng.below(3) {
                    0 => {
                        json!({"$type": "app.bsky.richtext.facet#tag", "tag": self.rng.pick(&["art", "rust", "photography", "music", "news", "bluesky"]).to_string()})
                    }
                    1 => {
                        json!({"$type": "app.bsky.richtext.facet#link", "uri": format!("https://example.com/{}", self.rng.below(100_000))})
                    }
                    _ => {
                        json!({"$type": "app.bsky.richtext.facet#mention", "did": did_of(self.rng.below(self.cfg.accounts))})
                    }
                };
                facets.push(json!({"features": [feature], "index": {"byteEnd": start + 8, "byteStart": start}}));
            }
            rec["facets"] = json!(facets);
        }
        if self.rng.chance(0.3) {
            rec["embed"] = match self.rng.below(4) {
                0 => {
                    let n = 1 + self.rng.below(4);
                    let images: Vec<Value> = (0..n)
                        .map(|_| json!({"alt": self.text(0, 6), "aspectRatio": {"height": 1000 + self.rng.below(1000), "width": 1000 + self.rng.below(1000)}, "image": self.blob("image/jpeg")}))
                        .collect();
                    json!({"$type": "app.bsky.embed.images", "images": images})
                }
                1 => {
                    json!({"$type": "app.bsky.embed.external", "external": {"description": self.text(3, 20), "title": self.text(2, 8), "uri": format!("https://news.example.org/{}", self.rng.below(1_000_000))}})
                }
                2 => {
                    let (uri, cid) = self.random_post_ref();
                    json!({"$type": "app.bsky.embed.record", "record": {"cid": cid.to_string(), "uri": uri}})
                }
                _ => {
                    let (uri, cid) = self.random_post_ref();
                    json!({"$type": "app.bsky.embed.recordWithMedia", "media": {"$type": "app.bsky.embed.images", "images": [{"alt": "", "image": self.blob("image/png")}]}, "record": {"$type": "app.bsky.embed.record", "record": {"cid": cid.to_string(), "uri": uri}}})
                }
            };
        }
        rec
    }

    fn record_for(&mut self, coll: Coll, nsid: &str) -> Value {
        match coll {
            Coll::Like | Coll::Repost => {
                let (uri, cid) = self.random_post_ref();
                json!({"$type": nsid, "createdAt": self.created_at(), "subject": {"cid": cid.to_string(), "uri": uri}})
            }
            Coll::Follow | Coll::Block => {
                let target = did_of(self.rng.skewed(self.cfg.accounts * 4));
                json!({"$type": nsid, "createdAt": self.created_at(), "subject": target})
            }
            Coll::ListItem => {
                let owner = did_of(self.rng.below(self.cfg.accounts));
                let list = tid_from_parts(1_700_000_000_000_000 + self.rng.below(1 << 40), 1);
                json!({"$type": nsid, "createdAt": self.created_at(), "list": format!("at://{owner}/app.bsky.graph.list/{list}"), "subject": did_of(self.rng.below(self.cfg.accounts * 4))})
            }
            Coll::Profile => {
                let mut p = json!({"$type": nsid, "createdAt": self.created_at(), "description": self.text(0, 25), "displayName": self.text(1, 3)});
                if self.rng.chance(0.7) {
                    p["avatar"] = self.blob("image/jpeg");
                }
                p
            }
            Coll::Post => self.post_record(),
            Coll::ThirdParty => {
                let mut v = json!({"$type": nsid, "createdAt": self.created_at()});
                match self.rng.below(4) {
                    0 => v["status"] = json!(self.text(1, 5)),
                    1 => {
                        v["item"] = json!({"name": self.text(1, 4), "duration": self.rng.below(600), "artists": [self.text(1, 2)]})
                    }
                    2 => {
                        v["payload"] = json!({"$bytes": data_encoding::BASE64_NOPAD.encode(&self.rng.bytes(20))})
                    }
                    _ => {
                        v["ref"] = json!({"$link": self.random_cid().to_string()});
                        v["flags"] = json!([true, false, null]);
                        v["count"] = json!(-(self.rng.below(1000) as i64));
                    }
                }
                v
            }
        }
    }

    fn pick_coll(&mut self) -> Coll {
        let r = self.rng.below(1000);
        match r {
            0..=449 => Coll::Like,
            450..=699 => Coll::Follow,
            700..=799 => Coll::Post,
            800..=869 => Coll::Repost,
            870..=899 => Coll::Block,
            900..=929 => Coll::ListItem,
            930..=949 => Coll::Profile,
            _ => Coll::ThirdParty,
        }
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

    /// Generates the next message.
    pub fn next_message(&mut self) -> SimMessage {
        self.produced += 1;
        let jitter = self.rng.below(self.cfg.step_us as u64) as i64;
        let step = (self.cfg.step_us / 2 + jitter).max(1000);
        self.time_us += step;
        // frame times have millisecond precision
        self.time_us -= self.time_us % 1000;
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
            since: None,
        };
        SimMessage {
            seq,
            time_us: self.time_us,
            frame,
            events: vec![env],
        }
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
            since: None,
        };
        SimMessage {
            seq,
            time_us: self.time_us,
            frame,
            events: vec![env],
        }
    }

    fn commit(&mut self, seq: i64, account: u64, did: String, time: String) -> SimMessage {
        let (rev, since) = self.next_rev(account);
        // how many ops: mostly one; some bulk commits
        let n_ops = if self.rng.chance(0.03) {
            {
                let big = self.rng.chance(0.1);
                2 + self.rng.below(if big { 40 } else { 6 }) as usize
            }
        } else {
            1
        };
        let mut ops: Vec<PendingOp> = Vec::with_capacity(n_ops);
        let bulk_coll = self.pick_coll();
        for i in 0..n_ops {
            let repo_len = self.repos.get(&account).map_or(0, |r| r.records.len());
            let roll = self.rng.below(1000);
            if roll < 40 && repo_len > 0 {
                // delete one of this account's records
                let idx = self.rng.below(repo_len as u64) as usize;
                let repo = self.repos.entry(account).or_default();
                let (coll, rkey, prev) = repo.records.swap_remove(idx);
                if coll == "app.bsky.actor.profile" {
                    repo.has_profile = false;
                }
                if ops.iter().any(|o| o.1 == coll && o.2 == rkey) {
                    continue;
                }
                ops.push((Operation::Delete, coll, rkey, None, Some(prev), None));
                continue;
            }
            let coll = if n_ops > 1 && i > 0 {
                bulk_coll
            } else {
                self.pick_coll()
            };
            let nsid = if coll == Coll::ThirdParty {
                let i = self.rng.skewed(self.long_tail.len() as u64) as usize;
                self.long_tail[i].clone()
            } else {
                coll.nsid().to_string()
            };
            let has_profile = self.repos.get(&account).is_some_and(|r| r.has_profile);
            let (operation, rkey, prev) = if coll == Coll::Profile {
                if has_profile {
                    let prev = self.repos.get(&account).and_then(|r| {
                        r.records
                            .iter()
                            .find(|x| x.0 == "app.bsky.actor.profile")
                            .map(|x| x.2)
                    });
                    (Operation::Update, "self".to_string(), prev)
                } else {
                    (Operation::Create, "self".to_string(), None)
                }
            } else if roll < 48 && repo_len > 0 {
                // a few updates of existing non-profile records
                let repo = &self.repos[&account];
                let idx = self.rng.below(repo_len as u64) as usize;
                let (c, k, p) = repo.records[idx].clone();
                if c == "app.bsky.actor.profile" || ops.iter().any(|o| o.1 == c && o.2 == k) {
                    continue;
                }
                let rec = self.record_for(
                    if c == "app.bsky.feed.post" {
                        Coll::Post
                    } else {
                        Coll::ThirdParty
                    },
                    &c,
                );
                let block = encode_record(&rec);
                let cid = Cid::for_dag_cbor(&block);
                let json = record_json(&block);
                let repo = self.repos.entry(account).or_default();
                repo.records[idx].2 = cid;
                ops.push((
                    Operation::Update,
                    c,
                    k,
                    Some((cid, block)),
                    Some(p),
                    Some(json),
                ));
                continue;
            } else {
                let tid = tid_from_parts(
                    (self.time_us + i as i64) as u64,
                    self.rng.below(1024) as u16,
                );
                (Operation::Create, tid, None)
            };
            if ops.iter().any(|o| o.1 == nsid && o.2 == rkey) {
                continue;
            }
            let rec = self.record_for(coll, &nsid);
            let block = encode_record(&rec);
            let cid = Cid::for_dag_cbor(&block);
            let json = record_json(&block);
            let repo = self.repos.entry(account).or_default();
            match operation {
                Operation::Create => {
                    repo.records.push((nsid.clone(), rkey.clone(), cid));
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
            ops.push((operation, nsid, rkey, Some((cid, block)), prev, Some(json)));
        }
        let depth = {
            let repo = self.repos.entry(account).or_default();
            if repo.depth == 0 {
                repo.depth = 3 + (account % 6) as u8;
            }
            repo.depth
        };
        // MST: a path of nodes from the root down to the leaf holding the op keys
        let mut mst_blocks: Vec<(Cid, Vec<u8>)> = Vec::new();
        let mut child: Option<Cid> = None;
        let mut op_keys: Vec<String> = ops.iter().map(|o| format!("{}/{}", o.1, o.2)).collect();
        op_keys.sort();
        for level in 0..depth {
            let mut keys: Vec<(String, Cid)> = Vec::new();
            if level == 0 {
                for (k, o) in op_keys.iter().zip(ops.iter()) {
                    let v =
                        o.3.as_ref()
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
            mst_blocks.push((cid, node));
            child = Some(cid);
        }
        let data = child.unwrap_or_else(|| self.random_cid());
        let prev_data = self.random_cid();
        let mut cb = Encoder::new();
        cb.map(6)
            .text("did")
            .text(&did)
            .text("rev")
            .text(&rev)
            .text("sig")
            .bytes(&self.rng.bytes(64))
            .text("data")
            .link(&data)
            .text("prev")
            .null()
            .text("version")
            .int(3);
        let commit_block = cb.buf;
        let commit_cid = Cid::for_dag_cbor(&commit_block);
        let mut blocks: Vec<(Cid, Vec<u8>)> = vec![(commit_cid, commit_block)];
        blocks.extend(mst_blocks);
        for o in &ops {
            if let Some((c, b)) = &o.3 {
                blocks.push((*c, b.clone()));
            }
        }
        // block order in a CAR is arbitrary
        for i in (1..blocks.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            blocks.swap(i, j);
        }
        let mut car = CarWriter::new(&[commit_cid]);
        for (c, b) in &blocks {
            car.block(c, b);
        }
        let mut body = Encoder::new();
        body.map(12);
        body.text("ops").array(ops.len());
        for o in &ops {
            let n = if o.4.is_some() { 4 } else { 3 };
            body.map(n);
            body.text("cid");
            match &o.3 {
                Some((c, _)) => body.link(c),
                None => body.null(),
            };
            body.text("path").text(&format!("{}/{}", o.1, o.2));
            if let Some(p) = &o.4 {
                body.text("prev").link(p);
            }
            body.text("action").text(o.0.as_str());
        }
        body.text("rev").text(&rev);
        body.text("seq").int(seq);
        body.text("repo").text(&did);
        body.text("time").text(&time);
        body.text("blobs").array(0);
        body.text("since");
        match &since {
            Some(s) => body.text(s),
            None => body.null(),
        };
        body.text("blocks").bytes(&car.buf);
        body.text("commit").link(&commit_cid);
        body.text("rebase").bool(false);
        body.text("tooBig").bool(false);
        body.text("prevData").link(&prev_data);
        let frame = frame_bytes("#commit", &body.buf);
        let events = ops
            .into_iter()
            .map(|(operation, collection, rkey, block, _, json)| Envelope {
                event: Event {
                    did: valid(Did::parse(did.as_str())),
                    data: EventData::Commit(CommitOp {
                        rev: valid(Tid::parse(rev.as_str())),
                        operation,
                        collection: valid(Nsid::parse(collection)),
                        rkey: valid(Rkey::parse(rkey)),
                        cid: block.map(|(c, _)| c.to_string()),
                        record: json,
                    }),
                },
                time_us: self.time_us,
                claimed_time_us: None,
                seq: Some(seq),
                since: since.clone(),
            })
            .collect();
        SimMessage {
            seq,
            time_us: self.time_us,
            frame,
            events,
        }
    }
}

fn encode_record(v: &Value) -> Vec<u8> {
    let mut e = Encoder::new();
    // generated records are valid by construction
    if e.json(v).is_err() {
        return Vec::new();
    }
    e.buf
}

fn record_json(block: &[u8]) -> String {
    let mut out = Vec::new();
    let mut w = crate::decode::cbor::JsonWriter::new();
    if w.record_to_json(block, &mut out).is_err() {
        return String::new();
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

/// Builds a frame from a message type and an encoded body.
pub fn frame_bytes(t: &str, body: &[u8]) -> Vec<u8> {
    let mut h = Encoder::new();
    h.map(2).text("t").text(t).text("op").int(1);
    h.buf.extend_from_slice(body);
    h.buf
}

/// Builds an error frame.
pub fn error_frame(error: &str, message: &str) -> Vec<u8> {
    let mut h = Encoder::new();
    h.map(1).text("op").int(-1);
    h.map(2)
        .text("error")
        .text(error)
        .text("message")
        .text(message);
    h.buf
}

/// Builds an `#info` frame.
pub fn info_frame(name: &str, message: &str) -> Vec<u8> {
    let mut b = Encoder::new();
    b.map(2)
        .text("name")
        .text(name)
        .text("message")
        .text(message);
    frame_bytes("#info", &b.buf)
}
