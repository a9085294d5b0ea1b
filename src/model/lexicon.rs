//! Typed fields of the core lexicons, read from a record's JSON text.
//!
//! Each core collection gets a few columns beside the generic ones. A record whose fields have
//! the wrong types for its lexicon still lands (its `record` text is kept); only its typed
//! columns are null, and the caller counts it.

use serde::Deserialize;
use std::borrow::Cow;

/// Which typed table a collection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lexicon {
    /// `app.bsky.feed.post`.
    Post,
    /// `app.bsky.feed.like`.
    Like,
    /// `app.bsky.feed.repost`.
    Repost,
    /// `app.bsky.graph.follow`.
    Follow,
    /// `app.bsky.graph.block`.
    Block,
    /// `app.bsky.graph.listitem`.
    ListItem,
    /// `app.bsky.actor.profile`.
    Profile,
}

impl Lexicon {
    /// All core lexicons.
    pub const ALL: [Lexicon; 7] = [
        Lexicon::Post,
        Lexicon::Like,
        Lexicon::Repost,
        Lexicon::Follow,
        Lexicon::Block,
        Lexicon::ListItem,
        Lexicon::Profile,
    ];

    /// The lexicon of a collection, if it is a core one.
    pub fn of(collection: &str) -> Option<Lexicon> {
        Some(match collection {
            "app.bsky.feed.post" => Lexicon::Post,
            "app.bsky.feed.like" => Lexicon::Like,
            "app.bsky.feed.repost" => Lexicon::Repost,
            "app.bsky.graph.follow" => Lexicon::Follow,
            "app.bsky.graph.block" => Lexicon::Block,
            "app.bsky.graph.listitem" => Lexicon::ListItem,
            "app.bsky.actor.profile" => Lexicon::Profile,
            _ => return None,
        })
    }

    /// The collection NSID.
    pub fn nsid(self) -> &'static str {
        match self {
            Lexicon::Post => "app.bsky.feed.post",
            Lexicon::Like => "app.bsky.feed.like",
            Lexicon::Repost => "app.bsky.feed.repost",
            Lexicon::Follow => "app.bsky.graph.follow",
            Lexicon::Block => "app.bsky.graph.block",
            Lexicon::ListItem => "app.bsky.graph.listitem",
            Lexicon::Profile => "app.bsky.actor.profile",
        }
    }

    /// The SQL table name.
    pub fn table(self) -> &'static str {
        match self {
            Lexicon::Post => "posts",
            Lexicon::Like => "likes",
            Lexicon::Repost => "reposts",
            Lexicon::Follow => "follows",
            Lexicon::Block => "blocks",
            Lexicon::ListItem => "listitems",
            Lexicon::Profile => "profiles",
        }
    }
}

/// A `{uri, cid}` reference.
#[derive(Debug, Deserialize)]
pub struct StrongRef<'a> {
    /// AT-URI.
    #[serde(borrow)]
    pub uri: Cow<'a, str>,
    /// CID string.
    #[serde(borrow)]
    pub cid: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
struct Reply<'a> {
    #[serde(borrow)]
    root: StrongRef<'a>,
    #[serde(borrow)]
    parent: StrongRef<'a>,
}

#[derive(Debug, Deserialize)]
struct EmbedRecordInner<'a> {
    #[serde(borrow, default)]
    uri: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    record: Option<Box<EmbedRecordInner<'a>>>,
}

#[derive(Debug, Deserialize)]
struct Embed<'a> {
    #[serde(rename = "$type", borrow, default)]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    record: Option<EmbedRecordInner<'a>>,
}

#[derive(Debug, Deserialize)]
struct Feature<'a> {
    #[serde(rename = "$type", borrow, default)]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tag: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    uri: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    did: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
struct Facet<'a> {
    #[serde(borrow)]
    features: Vec<Feature<'a>>,
}

#[derive(Debug, Deserialize)]
struct PostRec<'a> {
    #[serde(borrow)]
    text: Cow<'a, str>,
    #[serde(borrow, default)]
    langs: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    reply: Option<Reply<'a>>,
    #[serde(borrow, default)]
    embed: Option<Embed<'a>>,
    #[serde(borrow, default)]
    facets: Option<Vec<Facet<'a>>>,
    #[serde(rename = "createdAt", borrow)]
    created_at: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
struct SubjectRefRec<'a> {
    #[serde(borrow)]
    subject: StrongRef<'a>,
    #[serde(rename = "createdAt", borrow)]
    created_at: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
struct SubjectDidRec<'a> {
    #[serde(borrow)]
    subject: Cow<'a, str>,
    #[serde(rename = "createdAt", borrow)]
    created_at: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
struct ListItemRec<'a> {
    #[serde(borrow)]
    subject: Cow<'a, str>,
    #[serde(borrow)]
    list: Cow<'a, str>,
    #[serde(rename = "createdAt", borrow)]
    created_at: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
struct ProfileRec<'a> {
    #[serde(rename = "displayName", borrow, default)]
    display_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    description: Option<Cow<'a, str>>,
    #[serde(rename = "createdAt", borrow, default)]
    created_at: Option<Cow<'a, str>>,
}

/// Typed fields of a post.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PostFields {
    /// Post text.
    pub text: String,
    /// Declared languages.
    pub langs: Vec<String>,
    /// Thread root URI when a reply.
    pub reply_root_uri: Option<String>,
    /// Parent URI when a reply.
    pub reply_parent_uri: Option<String>,
    /// Quoted post URI (`app.bsky.embed.record` or `recordWithMedia`).
    pub quote_uri: Option<String>,
    /// `$type` of the embed.
    pub embed_type: Option<String>,
    /// Hashtags from facets.
    pub facet_tags: Vec<String>,
    /// Links from facets.
    pub facet_links: Vec<String>,
    /// Mentioned DIDs from facets.
    pub facet_mentions: Vec<String>,
    /// `createdAt` in µs (null if unparsable; user-controlled).
    pub created_at: Option<i64>,
}

/// Typed fields of any core record.
#[derive(Debug, Clone, PartialEq)]
pub enum Typed {
    /// A post.
    Post(PostFields),
    /// A like or repost.
    SubjectRef {
        /// Subject URI.
        uri: String,
        /// Subject CID.
        cid: String,
        /// createdAt µs.
        created_at: Option<i64>,
    },
    /// A follow or block.
    SubjectDid {
        /// Subject DID.
        did: String,
        /// createdAt µs.
        created_at: Option<i64>,
    },
    /// A list item.
    ListItem {
        /// Subject DID.
        did: String,
        /// List URI.
        list: String,
        /// createdAt µs.
        created_at: Option<i64>,
    },
    /// A profile.
    Profile {
        /// Display name.
        display_name: Option<String>,
        /// Description.
        description: Option<String>,
        /// createdAt µs.
        created_at: Option<i64>,
    },
}

fn ts(s: &str) -> Option<i64> {
    crate::syntax::parse_datetime_us(s).ok()
}

/// Whether `record` fits `lex`'s types: exactly when [`extract`] gives `Some`, without
/// copying a field out or parsing a time (the writer counts the records that do not fit).
pub fn fits(lex: Lexicon, record: &str) -> bool {
    match lex {
        Lexicon::Post => serde_json::from_str::<PostRec<'_>>(record).is_ok(),
        Lexicon::Like | Lexicon::Repost => {
            serde_json::from_str::<SubjectRefRec<'_>>(record).is_ok()
        }
        Lexicon::Follow | Lexicon::Block => {
            serde_json::from_str::<SubjectDidRec<'_>>(record).is_ok()
        }
        Lexicon::ListItem => serde_json::from_str::<ListItemRec<'_>>(record).is_ok(),
        Lexicon::Profile => serde_json::from_str::<ProfileRec<'_>>(record).is_ok(),
    }
}

/// Reads the typed fields of `record` for `lex`; `None` when the record does not fit the
/// lexicon's types.
pub fn extract(lex: Lexicon, record: &str) -> Option<Typed> {
    match lex {
        Lexicon::Post => {
            let p: PostRec<'_> = serde_json::from_str(record).ok()?;
            let mut f = PostFields {
                text: p.text.into_owned(),
                langs: p
                    .langs
                    .unwrap_or_default()
                    .into_iter()
                    .map(Cow::into_owned)
                    .collect(),
                created_at: ts(&p.created_at),
                ..Default::default()
            };
            if let Some(r) = p.reply {
                f.reply_root_uri = Some(r.root.uri.into_owned());
                f.reply_parent_uri = Some(r.parent.uri.into_owned());
            }
            if let Some(e) = p.embed {
                f.embed_type = e.ty.map(Cow::into_owned);
                if let Some(r) = e.record {
                    // embed.record = {uri, cid}; recordWithMedia: embed.record.record = {uri, cid}
                    f.quote_uri = match (r.uri, r.record) {
                        (Some(u), _) => Some(u.into_owned()),
                        (None, Some(inner)) => inner.uri.map(Cow::into_owned),
                        _ => None,
                    };
                }
            }
            for facet in p.facets.unwrap_or_default() {
                for feat in facet.features {
                    match feat.ty.as_deref() {
                        Some("app.bsky.richtext.facet#tag") => {
                            f.facet_tags.extend(feat.tag.map(Cow::into_owned))
                        }
                        Some("app.bsky.richtext.facet#link") => {
                            f.facet_links.extend(feat.uri.map(Cow::into_owned))
                        }
                        Some("app.bsky.richtext.facet#mention") => {
                            f.facet_mentions.extend(feat.did.map(Cow::into_owned))
                        }
                        _ => {}
                    }
                }
            }
            Some(Typed::Post(f))
        }
        Lexicon::Like | Lexicon::Repost => {
            let r: SubjectRefRec<'_> = serde_json::from_str(record).ok()?;
            Some(Typed::SubjectRef {
                uri: r.subject.uri.into_owned(),
                cid: r.subject.cid.into_owned(),
                created_at: ts(&r.created_at),
            })
        }
        Lexicon::Follow | Lexicon::Block => {
            let r: SubjectDidRec<'_> = serde_json::from_str(record).ok()?;
            Some(Typed::SubjectDid {
                did: r.subject.into_owned(),
                created_at: ts(&r.created_at),
            })
        }
        Lexicon::ListItem => {
            let r: ListItemRec<'_> = serde_json::from_str(record).ok()?;
            Some(Typed::ListItem {
                did: r.subject.into_owned(),
                list: r.list.into_owned(),
                created_at: ts(&r.created_at),
            })
        }
        Lexicon::Profile => {
            let r: ProfileRec<'_> = serde_json::from_str(record).ok()?;
            Some(Typed::Profile {
                display_name: r.display_name.map(Cow::into_owned),
                description: r.description.map(Cow::into_owned),
                created_at: r.created_at.and_then(|c| ts(&c)),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_fields() {
        let rec = r#"{"$type":"app.bsky.feed.post","createdAt":"2026-07-04T14:38:07.000Z","embed":{"$type":"app.bsky.embed.recordWithMedia","media":{},"record":{"$type":"app.bsky.embed.record","record":{"cid":"c","uri":"at://q"}}},"facets":[{"features":[{"$type":"app.bsky.richtext.facet#tag","tag":"rust"},{"$type":"app.bsky.richtext.facet#mention","did":"did:plc:x"}],"index":{"byteEnd":1,"byteStart":0}}],"langs":["en","ja"],"reply":{"parent":{"cid":"c","uri":"at://p"},"root":{"cid":"c","uri":"at://r"}},"text":"hi"}"#;
        let Some(Typed::Post(p)) = extract(Lexicon::Post, rec) else {
            panic!()
        };
        assert_eq!(p.text, "hi");
        assert_eq!(p.langs, vec!["en", "ja"]);
        assert_eq!(p.reply_root_uri.as_deref(), Some("at://r"));
        assert_eq!(p.reply_parent_uri.as_deref(), Some("at://p"));
        assert_eq!(p.quote_uri.as_deref(), Some("at://q"));
        assert_eq!(
            p.embed_type.as_deref(),
            Some("app.bsky.embed.recordWithMedia")
        );
        assert_eq!(p.facet_tags, vec!["rust"]);
        assert_eq!(p.facet_mentions, vec!["did:plc:x"]);
        assert!(p.created_at.is_some());
    }

    #[test]
    fn fitting_is_extracting_without_the_copies() {
        let records = [
            r#"{"text":"hi","createdAt":"2026-07-04T14:38:07.000Z","langs":["en"]}"#,
            r#"{"text":5,"createdAt":"x"}"#,
            r#"{"text":"hi"}"#,
            r#"{"text":"a\u00e9\"b","createdAt":"yesterday","facets":[{"features":[{"$type":"app.bsky.richtext.facet#tag","tag":"x"}]}]}"#,
            r#"{"text":"hi","createdAt":"x","reply":{"root":{"uri":"at://r"}}}"#,
            r#"{"subject":{"uri":"at://x","cid":"c"},"createdAt":"2026-07-04T14:38:07Z"}"#,
            r#"{"subject":{"uri":"at://x"},"createdAt":"x"}"#,
            r#"{"subject":"did:plc:x","createdAt":"x"}"#,
            r#"{"subject":"did:plc:x","list":"at://l","createdAt":"x"}"#,
            r#"{"displayName":"n","description":7}"#,
            r#"{"displayName":"n"}"#,
            r#"{}"#,
            r#"[1]"#,
            r#"{"text":"unterminated"#,
        ];
        let mut fitted = 0;
        for lex in Lexicon::ALL {
            for rec in records {
                assert_eq!(fits(lex, rec), extract(lex, rec).is_some(), "{lex:?} {rec}");
                fitted += usize::from(fits(lex, rec));
            }
        }
        assert!(
            fitted >= Lexicon::ALL.len(),
            "every lexicon fits something: {fitted}"
        );
    }

    #[test]
    fn wrong_types_give_none() {
        assert!(extract(Lexicon::Post, r#"{"text":5,"createdAt":"x"}"#).is_none());
        assert!(extract(Lexicon::Like, r#"{"subject":"did:plc:x","createdAt":"x"}"#).is_none());
        assert!(
            extract(
                Lexicon::Follow,
                r#"{"subject":{"uri":"x"},"createdAt":"x"}"#
            )
            .is_none()
        );
        // an unparsable createdAt is not a type error: the column is null
        let Some(Typed::SubjectDid { created_at, .. }) = extract(
            Lexicon::Follow,
            r#"{"subject":"did:plc:x","createdAt":"yesterday"}"#,
        ) else {
            panic!()
        };
        assert_eq!(created_at, None);
    }
}
