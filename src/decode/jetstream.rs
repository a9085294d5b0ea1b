//! Jetstream v1 JSON events (`commit`, `identity`, `account`; v2's extra top-level `cursor` is
//! tolerated), per-message zstd with Jetstream's v1 dictionary, and the writer that emits the
//! same lines Jetstream would for a firehose event.

use super::cbor::{Encoder, JsonWriter};
use super::cid::Cid;
use super::json::{write_i64, write_str};
use crate::model::ids::text_in;
use crate::model::{
    Account, CommitOp, Decoded, Envelope, ErrorEvent, ErrorReason, Event, EventData, Identity,
    Operation,
};
use crate::model::{Did, Nsid, Rkey, Tid};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// Jetstream's v1 zstd dictionary (112,640 bytes, dictionary ID 1612007021), shipped in the crate.
pub const ZSTD_DICTIONARY_V1: &[u8] = include_bytes!("jetstream_v1.zdict");

/// The v1 dictionary's ID.
pub const ZSTD_DICTIONARY_V1_ID: u32 = 1_612_007_021;

/// Largest decompressed Jetstream message accepted.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    did: Cow<'a, str>,
    time_us: i64,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    commit: Option<LineCommit<'a>>,
    #[serde(borrow, default)]
    identity: Option<LineIdentity<'a>>,
    #[serde(borrow, default)]
    account: Option<LineAccount<'a>>,
}

#[derive(Deserialize)]
struct LineCommit<'a> {
    #[serde(borrow)]
    rev: Cow<'a, str>,
    #[serde(borrow)]
    operation: Cow<'a, str>,
    #[serde(borrow)]
    collection: Cow<'a, str>,
    #[serde(borrow)]
    rkey: Cow<'a, str>,
    #[serde(borrow, default)]
    record: Option<&'a RawValue>,
    #[serde(borrow, default)]
    cid: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct LineIdentity<'a> {
    seq: i64,
    #[serde(borrow)]
    time: Cow<'a, str>,
    #[serde(borrow, default)]
    handle: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct LineAccount<'a> {
    seq: i64,
    #[serde(borrow)]
    time: Cow<'a, str>,
    active: bool,
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
}

/// How strictly lines are checked.
#[derive(Debug, Clone, Copy, Default)]
pub struct JetstreamOptions {
    /// Re-encode each record to DAG-CBOR, check it against the atproto data model and its CID,
    /// and rewrite its JSON in canonical form (sorted keys, Jetstream's escaping). Used by
    /// `convert`; off by default for ingest speed (syntax and identifiers are always checked).
    pub normalize: bool,
}

/// Decodes Jetstream lines to events, reusing buffers between calls.
#[derive(Debug, Default)]
pub struct JetstreamDecoder {
    /// The options in use.
    pub options: JetstreamOptions,
    json: JsonWriter,
    buf: Vec<u8>,
    spare: Spare,
}

/// The strings of a commit event the caller is done with ([`JetstreamDecoder::recycle`]),
/// for the next commit's fields: six allocations and six frees a line fewer.
#[derive(Debug, Default)]
struct Spare {
    did: Option<String>,
    collection: Option<String>,
    rkey: Option<String>,
    rev: Option<String>,
    cid: Option<String>,
    record: Option<String>,
}

/// A recycled string larger than this is freed, not kept (one huge record would otherwise
/// hold its memory for the decoder's life).
const SPARE_MAX: usize = 64 << 10;

fn spare(s: String) -> Option<String> {
    (s.capacity() <= SPARE_MAX).then_some(s)
}

fn line_error(reason: ErrorReason, detail: impl Into<String>, raw: &[u8]) -> Decoded {
    Decoded::Error(ErrorEvent::new(reason, detail, raw))
}

impl JetstreamDecoder {
    /// A decoder with these options.
    pub fn new(options: JetstreamOptions) -> Self {
        JetstreamDecoder {
            options,
            json: JsonWriter::new(),
            buf: Vec::new(),
            spare: Spare::default(),
        }
    }

    /// Takes back an output the caller is done with: a commit's strings are kept for the next
    /// line's fields. Anything else is freed.
    pub fn recycle(&mut self, d: Decoded) {
        if let Decoded::Event(env) = d
            && let EventData::Commit(c) = env.event.data
        {
            self.spare = Spare {
                did: spare(env.event.did.into()),
                collection: spare(c.collection.into()),
                rkey: spare(c.rkey.into()),
                rev: spare(c.rev.into()),
                cid: c.cid.and_then(spare),
                record: c.record.and_then(spare),
            };
        }
    }

    /// Decodes one JSON line. Bad input becomes [`Decoded::Error`] with the raw line.
    pub fn decode(&mut self, line: &[u8]) -> Decoded {
        match self.decode_inner(line) {
            Ok(env) => Decoded::Event(env),
            Err(e) => e,
        }
    }

    #[allow(clippy::result_large_err)] // the error is the event we keep
    fn decode_inner(&mut self, raw: &[u8]) -> Result<Envelope, Decoded> {
        // checked whole and once: the parser then takes every string as it is (parsing bytes,
        // it would check each string it keeps, and the record's text again)
        let text = simdutf8::basic::from_utf8(raw)
            .map_err(|_| line_error(ErrorReason::Json, "line is not UTF-8", raw))?;
        let line: Line<'_> = serde_json::from_str(text)
            .map_err(|e| line_error(ErrorReason::Json, e.to_string(), raw))?;
        let fail = |reason, detail: String| {
            let mut e = ErrorEvent::new(reason, detail, raw);
            e.time_us = Some(line.time_us);
            e.did = Some(line.did.to_string());
            Decoded::Error(e)
        };
        let did = Did::parse_reusing(&line.did, self.spare.did.take())
            .map_err(|_| fail(ErrorReason::Did, "invalid DID".into()))?;
        if line.time_us < 0 {
            return Err(fail(ErrorReason::TimeRange, "negative time_us".into()));
        }
        let data = match line.kind.as_ref() {
            "commit" => {
                let c = line
                    .commit
                    .as_ref()
                    .ok_or_else(|| fail(ErrorReason::Json, "commit event without commit".into()))?;
                let path_err = |reason, detail: &str| {
                    let mut e = ErrorEvent::new(reason, detail, raw);
                    e.time_us = Some(line.time_us);
                    e.did = Some(line.did.to_string());
                    e.path = Some(format!("{}/{}", c.collection, c.rkey));
                    Decoded::Error(e)
                };
                let collection = Nsid::parse_reusing(&c.collection, self.spare.collection.take())
                    .map_err(|_| {
                    path_err(ErrorReason::Collection, "collection is not an NSID")
                })?;
                let rkey = Rkey::parse_reusing(&c.rkey, self.spare.rkey.take())
                    .map_err(|_| path_err(ErrorReason::Rkey, "invalid record key"))?;
                let rev = Tid::parse_reusing(&c.rev, self.spare.rev.take())
                    .map_err(|_| path_err(ErrorReason::Rev, "rev is not a TID"))?;
                let operation = Operation::parse(&c.operation)
                    .ok_or_else(|| path_err(ErrorReason::Action, "unknown operation"))?;
                let (cid, record) = match operation {
                    Operation::Delete => (None, None),
                    _ => {
                        let (cid, rec) = match (&c.cid, c.record) {
                            (Some(cid), Some(rec)) => (cid, rec),
                            _ => {
                                return Err(path_err(
                                    ErrorReason::Action,
                                    "create/update without record and cid",
                                ));
                            }
                        };
                        let parsed = Cid::parse(cid)
                            .map_err(|_| path_err(ErrorReason::Record, "cid is not a CID"))?;
                        let text = rec.get();
                        if !text.starts_with('{') {
                            return Err(path_err(ErrorReason::Record, "record is not an object"));
                        }
                        let record = if self.options.normalize {
                            self.normalize(text, &parsed)
                                .map_err(|d| path_err(ErrorReason::Record, &d))?
                        } else {
                            text_in(self.spare.record.take(), text)
                        };
                        (Some(text_in(self.spare.cid.take(), cid)), Some(record))
                    }
                };
                EventData::Commit(CommitOp {
                    rev,
                    operation,
                    collection,
                    rkey,
                    cid,
                    record,
                })
            }
            "identity" => {
                let i = line.identity.as_ref().ok_or_else(|| {
                    fail(ErrorReason::Json, "identity event without identity".into())
                })?;
                EventData::Identity(Identity {
                    seq: i.seq,
                    time: i.time.to_string(),
                    handle: i.handle.as_ref().map(|h| h.to_string()),
                })
            }
            "account" => {
                let a = line.account.as_ref().ok_or_else(|| {
                    fail(ErrorReason::Json, "account event without account".into())
                })?;
                EventData::Account(Account {
                    seq: a.seq,
                    time: a.time.to_string(),
                    active: a.active,
                    status: a.status.as_ref().map(|s| s.to_string()),
                })
            }
            other => {
                return Err(fail(ErrorReason::Json, format!("unknown kind {other:?}")));
            }
        };
        Ok(Envelope {
            event: Event { did, data },
            time_us: line.time_us,
            claimed_time_us: None,
            seq: None,
            chain: None,
        })
    }

    /// Record JSON → DAG-CBOR (checking the data model) → CID check → canonical JSON.
    fn normalize(&mut self, text: &str, cid: &Cid) -> Result<String, String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut enc = Encoder::new();
        enc.json(&v).map_err(|e| e.to_string())?;
        if Cid::for_dag_cbor(&enc.buf) != *cid {
            return Err("record does not hash to its cid".into());
        }
        self.buf.clear();
        self.json
            .record_to_json(&enc.buf, &mut self.buf)
            .map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&self.buf).into_owned())
    }
}

/// Writes the Jetstream v1 line for an event (no trailing newline). `#sync` events have no
/// Jetstream form; they return `false` and write nothing.
pub fn write_line(env: &Envelope, out: &mut Vec<u8>) -> bool {
    let e = &env.event;
    let kind = match &e.data {
        EventData::Commit(_) => "commit",
        EventData::Identity(_) => "identity",
        EventData::Account(_) => "account",
        EventData::Sync(_) => return false,
    };
    out.extend_from_slice(b"{\"did\":");
    write_str(out, &e.did);
    out.extend_from_slice(b",\"time_us\":");
    write_i64(out, env.time_us);
    out.extend_from_slice(b",\"kind\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\":{");
    match &e.data {
        EventData::Commit(c) => {
            out.extend_from_slice(b"\"rev\":");
            write_str(out, &c.rev);
            out.extend_from_slice(b",\"operation\":\"");
            out.extend_from_slice(c.operation.as_str().as_bytes());
            out.extend_from_slice(b"\",\"collection\":");
            write_str(out, &c.collection);
            out.extend_from_slice(b",\"rkey\":");
            write_str(out, &c.rkey);
            if let Some(r) = &c.record {
                out.extend_from_slice(b",\"record\":");
                out.extend_from_slice(r.as_bytes());
            }
            if let Some(cid) = &c.cid {
                out.extend_from_slice(b",\"cid\":");
                write_str(out, cid);
            }
        }
        EventData::Identity(i) => {
            out.extend_from_slice(b"\"did\":");
            write_str(out, &e.did);
            if let Some(h) = &i.handle {
                out.extend_from_slice(b",\"handle\":");
                write_str(out, h);
            }
            out.extend_from_slice(b",\"seq\":");
            write_i64(out, i.seq);
            out.extend_from_slice(b",\"time\":");
            write_str(out, &i.time);
        }
        EventData::Account(a) => {
            out.extend_from_slice(b"\"active\":");
            out.extend_from_slice(if a.active { b"true" } else { b"false" });
            out.extend_from_slice(b",\"did\":");
            write_str(out, &e.did);
            out.extend_from_slice(b",\"seq\":");
            write_i64(out, a.seq);
            if let Some(s) = &a.status {
                out.extend_from_slice(b",\"status\":");
                write_str(out, s);
            }
            out.extend_from_slice(b",\"time\":");
            write_str(out, &a.time);
        }
        EventData::Sync(_) => {}
    }
    out.extend_from_slice(b"}}");
    true
}

/// Why a compressed message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ZstdError {
    /// zstd refused the bytes.
    #[error("zstd: {0}")]
    Zstd(#[from] std::io::Error),
}

/// Per-message zstd with the v1 dictionary, loaded once.
pub struct ZstdCodec {
    dec: zstd::bulk::Decompressor<'static>,
    enc: Option<zstd::bulk::Compressor<'static>>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for ZstdCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ZstdCodec")
    }
}

impl ZstdCodec {
    /// A decompressor with the v1 dictionary.
    pub fn try_new() -> Result<Self, ZstdError> {
        Ok(ZstdCodec {
            dec: zstd::bulk::Decompressor::with_dictionary(ZSTD_DICTIONARY_V1)?,
            enc: None,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// Decompresses one message (at most [`MAX_MESSAGE_BYTES`]).
    pub fn decompress(&mut self, data: &[u8]) -> Result<&[u8], ZstdError> {
        self.buf.clear();
        // the first call reserves the cap once; untouched pages cost nothing
        self.buf.reserve(MAX_MESSAGE_BYTES);
        self.dec.decompress_to_buffer(data, &mut self.buf)?;
        Ok(&self.buf)
    }

    /// Compresses one message as Jetstream does (one frame, v1 dictionary).
    pub fn compress(&mut self, data: &[u8]) -> Result<Vec<u8>, ZstdError> {
        if self.enc.is_none() {
            self.enc = Some(zstd::bulk::Compressor::with_dictionary(
                3,
                ZSTD_DICTIONARY_V1,
            )?);
        }
        match self.enc.as_mut() {
            Some(enc) => Ok(enc.compress(data)?),
            None => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines() -> Vec<Vec<u8>> {
        let did = "did:plc:z72i7hdynmk6r22z27h6tvur";
        let cid = "bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq";
        let long = "x".repeat(SPARE_MAX + 10);
        let mut v: Vec<Vec<u8>> = [
            format!(r#"{{"did":"{did}","time_us":1,"kind":"commit","commit":{{"rev":"3mmoojp7vgo2g","operation":"create","collection":"app.bsky.feed.post","rkey":"3mmoojp7etg2g","record":{{"text":"a longer record than the next one","createdAt":"2026-07-04T14:38:07Z"}},"cid":"{cid}"}}}}"#),
            r#"{"did":"did:web:example.com","time_us":2,"kind":"commit","commit":{"rev":"3mmoojp7vgo2h","operation":"delete","collection":"app.bsky.feed.like","rkey":"k"}}"#.to_string(),
            format!(r#"{{"did":"{did}","time_us":3,"kind":"commit","commit":{{"rev":"3mmoojp7vgo2i","operation":"update","collection":"app.bsky.actor.profile","rkey":"self","record":{{"d":1}},"cid":"{cid}"}}}}"#),
            format!(r#"{{"did":"{did}","time_us":4,"kind":"identity","identity":{{"seq":5,"time":"2026-07-04T14:38:07Z","handle":"a.b"}}}}"#),
            format!(r#"{{"did":"{did}","time_us":5,"kind":"commit","commit":{{"rev":"3mmoojp7vgo2j","operation":"create","collection":"../x","rkey":"k","record":{{}},"cid":"{cid}"}}}}"#),
            format!(r#"{{"did":"{did}","time_us":6,"kind":"commit","commit":{{"rev":"3mmoojp7vgo2k","operation":"create","collection":"app.bsky.feed.post","rkey":"k2","record":{{"text":"{long}"}},"cid":"{cid}"}}}}"#),
            format!(r#"{{"did":"{did}","time_us":7,"kind":"commit","commit":{{"rev":"3mmoojp7vgo2l","operation":"create","collection":"app.bsky.feed.like","rkey":"k3","record":{{"s":"\u00e9"}},"cid":"{cid}"}}}}"#),
            format!(r#"{{"did":"{did}","time_us":8,"kind":"account","account":{{"seq":9,"time":"2026-07-04T14:38:07Z","active":false,"status":"deleted"}}}}"#),
        ]
        .into_iter()
        .map(String::into_bytes)
        .collect();
        // a line whose record holds bytes that are not UTF-8
        let mut bad = v[0].clone();
        let at = bad.windows(6).position(|w| w == b"longer").unwrap();
        bad[at] = 0xff;
        v.insert(2, bad);
        v
    }

    #[test]
    fn a_decoder_that_reuses_the_last_event_s_strings_decodes_what_a_fresh_one_does() {
        let mut reusing = JetstreamDecoder::default();
        for round in 0..3 {
            for (i, l) in lines().iter().enumerate() {
                let want = JetstreamDecoder::default().decode(l);
                let got = reusing.decode(l);
                assert_eq!(got, want, "round {round} line {i}");
                reusing.recycle(got);
            }
        }
        // the record over the spare limit was not kept for the next line
        let long = &lines()[6];
        let got = reusing.decode(long);
        reusing.recycle(got);
        assert!(reusing.spare.record.is_none());
        assert!(reusing.spare.did.is_some());
    }

    #[test]
    fn a_line_that_is_not_utf8_is_set_aside_whole() {
        let l = &lines()[2];
        let Decoded::Error(e) = JetstreamDecoder::default().decode(l) else {
            panic!("a line with a 0xff byte decoded")
        };
        assert_eq!(e.reason, ErrorReason::Json);
        assert_eq!(&e.raw, l);
        // the line before the byte was changed decodes
        assert!(matches!(
            JetstreamDecoder::default().decode(&lines()[0]),
            Decoded::Event(_)
        ));
    }
}
