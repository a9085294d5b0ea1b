//! Records of the shape of the real network: posts (text, languages, replies, facets, embeds),
//! likes and reposts of recent posts, follows and blocks skewed to popular accounts, list items,
//! profiles, and a long tail of third-party collections.

use super::{Traffic, did_of};
use crate::decode::cid::Cid;
use crate::syntax::{format_datetime_ms, tid_from_parts};
use serde_json::{Value, json};

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

pub(super) const THIRD_PARTY: &[&str] = &[
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
pub(super) enum Coll {
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
    pub(super) fn nsid(self) -> &'static str {
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

impl Traffic {
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

    pub(super) fn random_cid(&mut self) -> Cid {
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

    pub(super) fn record_for(&mut self, coll: Coll, nsid: &str) -> Value {
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

    pub(super) fn pick_coll(&mut self) -> Coll {
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
}
