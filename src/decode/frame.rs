//! `com.atproto.sync.subscribeRepos` frames: a DAG-CBOR header `{op, t}` followed by a body that
//! uses the rest of the message.
//!
//! Bodies keep absent and null apart ([`Field`]): `prev` is absent on create ops, `cid` is null on
//! deletes, the commit-level `prev` is absent in 2026 frames and null in 2025 frames, and `blobs`
//! may be `[]` or null. Unknown fields are skipped, unknown `t` values give [`Body::Unknown`].
//! [`commit_events`] joins each op with its record block and yields one event per op.

use super::car::{Car, CarError};
use super::cbor::{CborError, JsonWriter, KeyCheck, MAX_DEPTH, Reader};
use super::cid::Cid;
use crate::model::cursor::MAX_CURSOR;
use crate::model::{
    Account, CommitOp, Decoded, Envelope, ErrorEvent, ErrorReason, Event, EventData, Identity,
    Operation, SyncInfo,
};
use crate::model::{Did, Nsid, Rkey, Tid};
use crate::syntax;

/// Largest record block atproto allows.
pub const MAX_RECORD_BYTES: usize = 1_000_000;

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header is not valid.
    #[error("frame header: {0}")]
    Header(CborError),
    /// The body is not valid DAG-CBOR of the expected shape.
    #[error("frame body ({t}): {err}")]
    Body {
        /// message type
        t: String,
        /// why
        err: CborError,
    },
    /// A required field is missing.
    #[error("{t} frame is missing required field `{field}`")]
    Missing {
        /// message type
        t: String,
        /// field name
        field: &'static str,
    },
}

/// A field that may be absent, null, or present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Field<T> {
    /// The key is not in the map.
    #[default]
    Absent,
    /// The key is there with `null`.
    Null,
    /// The key is there with a value.
    Value(T),
}

impl<T> Field<T> {
    /// The value, if present.
    pub fn value(&self) -> Option<&T> {
        match self {
            Field::Value(v) => Some(v),
            _ => None,
        }
    }
}

/// The frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// `1` for a message, `-1` for an error.
    pub op: i64,
    /// The message type (`#commit`, …) when `op == 1`.
    pub t: Option<&'a str>,
}

/// One op of a `#commit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoOp<'a> {
    /// `create`, `update`, `delete` (or something unknown).
    pub action: &'a str,
    /// `collection/rkey`.
    pub path: &'a str,
    /// New record CID; null on delete.
    pub cid: Field<Cid>,
    /// Previous record CID (Sync 1.1, update and delete); absent on create.
    pub prev: Field<Cid>,
}

/// A `#commit` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit<'a> {
    /// Stream sequence.
    pub seq: i64,
    /// The account DID.
    pub repo: &'a str,
    /// Revision of the commit.
    pub rev: &'a str,
    /// Revision this diff is relative to.
    pub since: Field<&'a str>,
    /// CID of the signed commit block.
    pub commit: Cid,
    /// CAR slice.
    pub blocks: &'a [u8],
    /// Record ops.
    pub ops: Vec<RepoOp<'a>>,
    /// MST root of the previous commit (Sync 1.1).
    pub prev_data: Field<Cid>,
    /// Deprecated, `[]` or null.
    pub blobs: Field<Vec<Cid>>,
    /// Deprecated; true means the diff is incomplete.
    pub too_big: bool,
    /// Deprecated.
    pub rebase: bool,
    /// Removed in Sync 1.1: absent in 2026 frames, null in 2025 frames.
    pub prev: Field<Cid>,
    /// Broadcast time.
    pub time: &'a str,
}

/// A `#sync` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sync<'a> {
    /// Stream sequence.
    pub seq: i64,
    /// The account DID.
    pub did: &'a str,
    /// Revision.
    pub rev: &'a str,
    /// CAR with the signed commit only.
    pub blocks: &'a [u8],
    /// Broadcast time.
    pub time: &'a str,
}

/// An `#identity` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityBody<'a> {
    /// Stream sequence.
    pub seq: i64,
    /// The account DID.
    pub did: &'a str,
    /// Broadcast time.
    pub time: &'a str,
    /// Handle, if sent.
    pub handle: Field<&'a str>,
}

/// An `#account` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountBody<'a> {
    /// Stream sequence.
    pub seq: i64,
    /// The account DID.
    pub did: &'a str,
    /// Broadcast time.
    pub time: &'a str,
    /// Active at the relay.
    pub active: bool,
    /// Status string.
    pub status: Field<&'a str>,
}

/// An `#info` body (not persisted, no seq).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info<'a> {
    /// e.g. `OutdatedCursor`.
    pub name: &'a str,
    /// Optional message.
    pub message: Option<&'a str>,
}

/// An error frame body (`op == -1`); the server closes the stream after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody<'a> {
    /// e.g. `FutureCursor`, `ConsumerTooSlow`.
    pub error: &'a str,
    /// Optional message.
    pub message: Option<&'a str>,
}

/// A decoded frame body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    /// `#commit`.
    Commit(Commit<'a>),
    /// `#sync`.
    Sync(Sync<'a>),
    /// `#identity`.
    Identity(IdentityBody<'a>),
    /// `#account`.
    Account(AccountBody<'a>),
    /// `#info`.
    Info(Info<'a>),
    /// Error frame.
    Error(ErrorBody<'a>),
    /// A type this decoder does not know; reported, not an error.
    Unknown {
        /// header op
        op: i64,
        /// header t
        t: Option<&'a str>,
    },
}

impl Body<'_> {
    /// The sequence number, for types that have one.
    pub fn seq(&self) -> Option<i64> {
        match self {
            Body::Commit(c) => Some(c.seq),
            Body::Sync(s) => Some(s.seq),
            Body::Identity(i) => Some(i.seq),
            Body::Account(a) => Some(a.seq),
            _ => None,
        }
    }
}

/// Parses the header of a frame; returns it and the offset where the body starts.
pub fn parse_header(frame: &[u8]) -> Result<(Header<'_>, usize), FrameError> {
    let mut r = Reader::new(frame);
    let h = FrameError::Header;
    let n = r.map().map_err(h)?;
    let mut keys = KeyCheck::new();
    let mut op = None;
    let mut t = None;
    for _ in 0..n {
        let k = r.key().map_err(h)?;
        keys.add(k).map_err(h)?;
        match k {
            "op" => op = Some(r.int().map_err(h)?),
            "t" => t = Some(r.text().map_err(h)?),
            _ => r.skip(MAX_DEPTH).map_err(h)?,
        }
    }
    let op = op.ok_or(FrameError::Header(CborError::Type {
        expected: "op in header",
        pos: 0,
    }))?;
    Ok((Header { op, t }, r.position()))
}

/// Parses a whole frame: header and body. The body must use every remaining byte.
pub fn parse_frame(frame: &[u8]) -> Result<(Header<'_>, Body<'_>), FrameError> {
    let (header, at) = parse_header(frame)?;
    let body = &frame[at..];
    let t = header.t.unwrap_or("");
    let b = match (header.op, t) {
        (1, "#commit") => Body::Commit(parse_commit(body)?),
        (1, "#sync") => Body::Sync(parse_sync(body)?),
        (1, "#identity") => Body::Identity(parse_identity(body)?),
        (1, "#account") => Body::Account(parse_account(body)?),
        (1, "#info") => Body::Info(parse_info(body)?),
        (-1, _) => Body::Error(parse_error(body)?),
        (op, _) => Body::Unknown { op, t: header.t },
    };
    Ok((header, b))
}

/// Reads map entries of a body, calling `f` for each key; unknown keys must be skipped by `f`.
fn body_map<'a>(
    buf: &'a [u8],
    t: &str,
    mut f: impl FnMut(&'a str, &mut Reader<'a>) -> Result<(), CborError>,
) -> Result<(), FrameError> {
    let mut r = Reader::new(buf);
    let res = (|| {
        let n = r.map()?;
        let mut keys = KeyCheck::new();
        for _ in 0..n {
            let k = r.key()?;
            keys.add(k)?;
            f(k, &mut r)?;
        }
        r.finish()
    })();
    res.map_err(|err| FrameError::Body {
        t: t.to_string(),
        err,
    })
}

fn need<T>(v: Option<T>, t: &str, field: &'static str) -> Result<T, FrameError> {
    v.ok_or_else(|| FrameError::Missing {
        t: t.to_string(),
        field,
    })
}

fn link_field(r: &mut Reader<'_>) -> Result<Field<Cid>, CborError> {
    Ok(match r.link_or_null()? {
        Some(c) => Field::Value(c),
        None => Field::Null,
    })
}

fn text_field<'a>(r: &mut Reader<'a>) -> Result<Field<&'a str>, CborError> {
    Ok(match r.text_or_null()? {
        Some(s) => Field::Value(s),
        None => Field::Null,
    })
}

fn parse_op<'a>(r: &mut Reader<'a>) -> Result<RepoOp<'a>, CborError> {
    let pos = r.position();
    let n = r.map()?;
    let mut keys = KeyCheck::new();
    let (mut action, mut path) = (None, None);
    let (mut cid, mut prev) = (Field::Absent, Field::Absent);
    for _ in 0..n {
        let k = r.key()?;
        keys.add(k)?;
        match k {
            "action" => action = Some(r.text()?),
            "path" => path = Some(r.text()?),
            "cid" => cid = link_field(r)?,
            "prev" => prev = link_field(r)?,
            _ => r.skip(MAX_DEPTH)?,
        }
    }
    match (action, path) {
        (Some(action), Some(path)) => Ok(RepoOp {
            action,
            path,
            cid,
            prev,
        }),
        _ => Err(CborError::Type {
            expected: "repoOp with action and path",
            pos,
        }),
    }
}

/// Parses a `#commit` body.
pub fn parse_commit(buf: &[u8]) -> Result<Commit<'_>, FrameError> {
    let t = "#commit";
    let (mut seq, mut repo, mut rev, mut commit, mut blocks, mut ops, mut time) =
        (None, None, None, None, None, None, None);
    let mut since = Field::Absent;
    let mut prev_data = Field::Absent;
    let mut blobs = Field::Absent;
    let mut prev = Field::Absent;
    let (mut too_big, mut rebase) = (false, false);
    body_map(buf, t, |k, r| {
        match k {
            "seq" => seq = Some(r.int()?),
            "repo" => repo = Some(r.text()?),
            "rev" => rev = Some(r.text()?),
            "since" => since = text_field(r)?,
            "commit" => commit = Some(r.link()?),
            "blocks" => blocks = Some(r.bytes()?),
            "ops" => {
                let n = r.array()?;
                let mut v = Vec::with_capacity(n.min(256));
                for _ in 0..n {
                    v.push(parse_op(r)?);
                }
                ops = Some(v);
            }
            "prevData" => prev_data = link_field(r)?,
            "blobs" => {
                blobs = match r.item()? {
                    super::cbor::Item::Null => Field::Null,
                    super::cbor::Item::Array(n) => {
                        let mut v = Vec::with_capacity(n.min(64));
                        for _ in 0..n {
                            v.push(r.link()?);
                        }
                        Field::Value(v)
                    }
                    _ => {
                        return Err(CborError::Type {
                            expected: "blobs array or null",
                            pos: r.position(),
                        });
                    }
                }
            }
            "tooBig" => too_big = r.bool()?,
            "rebase" => rebase = r.bool()?,
            "prev" => prev = link_field(r)?,
            "time" => time = Some(r.text()?),
            _ => r.skip(MAX_DEPTH)?,
        }
        Ok(())
    })?;
    Ok(Commit {
        seq: need(seq, t, "seq")?,
        repo: need(repo, t, "repo")?,
        rev: need(rev, t, "rev")?,
        since,
        commit: need(commit, t, "commit")?,
        blocks: need(blocks, t, "blocks")?,
        ops: need(ops, t, "ops")?,
        prev_data,
        blobs,
        too_big,
        rebase,
        prev,
        time: need(time, t, "time")?,
    })
}

/// Parses a `#sync` body.
pub fn parse_sync(buf: &[u8]) -> Result<Sync<'_>, FrameError> {
    let t = "#sync";
    let (mut seq, mut did, mut rev, mut blocks, mut time) = (None, None, None, None, None);
    body_map(buf, t, |k, r| {
        match k {
            "seq" => seq = Some(r.int()?),
            "did" => did = Some(r.text()?),
            "rev" => rev = Some(r.text()?),
            "blocks" => blocks = Some(r.bytes()?),
            "time" => time = Some(r.text()?),
            _ => r.skip(MAX_DEPTH)?,
        }
        Ok(())
    })?;
    Ok(Sync {
        seq: need(seq, t, "seq")?,
        did: need(did, t, "did")?,
        rev: need(rev, t, "rev")?,
        blocks: need(blocks, t, "blocks")?,
        time: need(time, t, "time")?,
    })
}

/// Parses an `#identity` body.
pub fn parse_identity(buf: &[u8]) -> Result<IdentityBody<'_>, FrameError> {
    let t = "#identity";
    let (mut seq, mut did, mut time) = (None, None, None);
    let mut handle = Field::Absent;
    body_map(buf, t, |k, r| {
        match k {
            "seq" => seq = Some(r.int()?),
            "did" => did = Some(r.text()?),
            "time" => time = Some(r.text()?),
            "handle" => handle = text_field(r)?,
            _ => r.skip(MAX_DEPTH)?,
        }
        Ok(())
    })?;
    Ok(IdentityBody {
        seq: need(seq, t, "seq")?,
        did: need(did, t, "did")?,
        time: need(time, t, "time")?,
        handle,
    })
}

/// Parses an `#account` body.
pub fn parse_account(buf: &[u8]) -> Result<AccountBody<'_>, FrameError> {
    let t = "#account";
    let (mut seq, mut did, mut time, mut active) = (None, None, None, None);
    let mut status = Field::Absent;
    body_map(buf, t, |k, r| {
        match k {
            "seq" => seq = Some(r.int()?),
            "did" => did = Some(r.text()?),
            "time" => time = Some(r.text()?),
            "active" => active = Some(r.bool()?),
            "status" => status = text_field(r)?,
            _ => r.skip(MAX_DEPTH)?,
        }
        Ok(())
    })?;
    Ok(AccountBody {
        seq: need(seq, t, "seq")?,
        did: need(did, t, "did")?,
        time: need(time, t, "time")?,
        active: need(active, t, "active")?,
        status,
    })
}

/// Parses an `#info` body.
pub fn parse_info(buf: &[u8]) -> Result<Info<'_>, FrameError> {
    let t = "#info";
    let (mut name, mut message) = (None, None);
    body_map(buf, t, |k, r| {
        match k {
            "name" => name = Some(r.text()?),
            "message" => message = r.text_or_null()?,
            _ => r.skip(MAX_DEPTH)?,
        }
        Ok(())
    })?;
    Ok(Info {
        name: need(name, t, "name")?,
        message,
    })
}

/// Parses an error frame body.
pub fn parse_error(buf: &[u8]) -> Result<ErrorBody<'_>, FrameError> {
    let t = "error";
    let (mut error, mut message) = (None, None);
    body_map(buf, t, |k, r| {
        match k {
            "error" => error = Some(r.text()?),
            "message" => message = r.text_or_null()?,
            _ => r.skip(MAX_DEPTH)?,
        }
        Ok(())
    })?;
    Ok(ErrorBody {
        error: need(error, t, "error")?,
        message,
    })
}

/// Options for turning frames into events.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Check every CAR block's sha2-256 against its CID (default on).
    pub verify_hashes: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            verify_hashes: true,
        }
    }
}

/// Reusable state for frame decoding (JSON buffers).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    json: JsonWriter,
    buf: Vec<u8>,
    /// The options in use.
    pub options: DecodeOptions,
}

fn frame_error(reason: ErrorReason, detail: String, raw: &[u8], seq: Option<i64>) -> Decoded {
    let mut e = ErrorEvent::new(reason, detail, raw);
    e.seq = seq;
    Decoded::Error(e)
}

impl FrameDecoder {
    /// A decoder with these options.
    pub fn new(options: DecodeOptions) -> Self {
        FrameDecoder {
            json: JsonWriter::new(),
            buf: Vec::with_capacity(4096),
            options,
        }
    }

    /// Decodes one frame to events, appending to `out`. Frames without events (`#info`, error
    /// frames, unknown types) append nothing; the caller inspects those with [`parse_frame`].
    /// Bad input never fails the call: it becomes [`Decoded::Error`] with the raw bytes.
    pub fn decode(&mut self, frame: &[u8], out: &mut Vec<Decoded>) {
        let body = match parse_frame(frame) {
            Ok((_, b)) => b,
            Err(e) => {
                out.push(frame_error(ErrorReason::Frame, e.to_string(), frame, None));
                return;
            }
        };
        match body {
            Body::Commit(c) => self.commit(&c, frame, out),
            Body::Identity(i) => {
                let seq = Some(i.seq);
                match check_common(i.did, i.time, frame, seq) {
                    Err(e) => out.push(e),
                    Ok((did, time_us)) => out.push(Decoded::Event(Envelope {
                        event: Event {
                            did,
                            data: EventData::Identity(Identity {
                                seq: i.seq,
                                time: i.time.to_string(),
                                handle: i.handle.value().map(|s| s.to_string()),
                            }),
                        },
                        time_us,
                        seq,
                        claimed_time_us: None,
                        since: None,
                    })),
                }
            }
            Body::Account(a) => {
                let seq = Some(a.seq);
                match check_common(a.did, a.time, frame, seq) {
                    Err(e) => out.push(e),
                    Ok((did, time_us)) => out.push(Decoded::Event(Envelope {
                        event: Event {
                            did,
                            data: EventData::Account(Account {
                                seq: a.seq,
                                time: a.time.to_string(),
                                active: a.active,
                                status: a.status.value().map(|s| s.to_string()),
                            }),
                        },
                        time_us,
                        seq,
                        claimed_time_us: None,
                        since: None,
                    })),
                }
            }
            Body::Sync(s) => {
                let seq = Some(s.seq);
                match check_common(s.did, s.time, frame, seq) {
                    Err(e) => out.push(e),
                    Ok((did, time_us)) => {
                        let Ok(rev) = Tid::parse(s.rev) else {
                            out.push(frame_error(
                                ErrorReason::Rev,
                                format!("rev {:?} is not a TID", s.rev),
                                frame,
                                seq,
                            ));
                            return;
                        };
                        out.push(Decoded::Event(Envelope {
                            event: Event {
                                did,
                                data: EventData::Sync(SyncInfo { rev }),
                            },
                            time_us,
                            seq,
                            claimed_time_us: None,
                            since: None,
                        }))
                    }
                }
            }
            Body::Info(_) | Body::Error(_) | Body::Unknown { .. } => {}
        }
    }

    fn commit(&mut self, c: &Commit<'_>, frame: &[u8], out: &mut Vec<Decoded>) {
        let seq = Some(c.seq);
        let (did, time_us) = match check_common(c.repo, c.time, frame, seq) {
            Ok(t) => t,
            Err(e) => {
                out.push(e);
                return;
            }
        };
        let whole = |reason, detail: String| {
            let mut e = ErrorEvent::new(reason, detail, frame);
            e.seq = seq;
            e.time_us = Some(time_us);
            e.did = Some(c.repo.to_string());
            Decoded::Error(e)
        };
        let Ok(rev) = Tid::parse(c.rev) else {
            out.push(whole(
                ErrorReason::Rev,
                format!("rev {:?} is not a TID", c.rev),
            ));
            return;
        };
        if c.too_big {
            out.push(whole(ErrorReason::TooBig, "commit flagged tooBig".into()));
            return;
        }
        let car = match Car::parse(c.blocks, self.options.verify_hashes) {
            Ok(car) => car,
            Err(e @ CarError::HashMismatch(_)) => {
                out.push(whole(ErrorReason::HashMismatch, e.to_string()));
                return;
            }
            Err(e) => {
                out.push(whole(ErrorReason::Car, e.to_string()));
                return;
            }
        };
        if car.roots.first() != Some(&c.commit) {
            out.push(whole(
                ErrorReason::CommitMismatch,
                "first CAR root is not the commit".into(),
            ));
            return;
        }
        if let Err(detail) = check_commit_block(&car, c) {
            out.push(whole(ErrorReason::CommitMismatch, detail));
            return;
        }
        let since = c.since.value().map(|s| s.to_string());
        for op in &c.ops {
            let op_error = |reason, detail: String, raw: &[u8]| {
                let mut e = ErrorEvent::new(reason, detail, raw);
                e.seq = seq;
                e.time_us = Some(time_us);
                e.did = Some(c.repo.to_string());
                e.path = Some(op.path.to_string());
                Decoded::Error(e)
            };
            let (collection, rkey) = match op.path.split_once('/') {
                Some((a, b)) if !b.contains('/') => (a, b),
                _ => {
                    out.push(op_error(
                        ErrorReason::Path,
                        "path is not collection/rkey".into(),
                        &[],
                    ));
                    continue;
                }
            };
            let Ok(collection) = Nsid::parse(collection) else {
                out.push(op_error(
                    ErrorReason::Collection,
                    "collection is not an NSID".into(),
                    &[],
                ));
                continue;
            };
            let Ok(rkey) = Rkey::parse(rkey) else {
                out.push(op_error(
                    ErrorReason::Rkey,
                    "invalid record key".into(),
                    &[],
                ));
                continue;
            };
            let operation = match Operation::parse(op.action) {
                Some(o) => o,
                None => {
                    out.push(op_error(
                        ErrorReason::Action,
                        format!("unknown action {:?}", op.action),
                        &[],
                    ));
                    continue;
                }
            };
            let (cid, record) = match operation {
                Operation::Delete => (None, None),
                Operation::Create | Operation::Update => {
                    let cid = match op.cid {
                        Field::Value(c) => c,
                        _ => {
                            out.push(op_error(
                                ErrorReason::Action,
                                format!("{} without a cid", op.action),
                                &[],
                            ));
                            continue;
                        }
                    };
                    let block = match car.get(&cid) {
                        Some(b) => b,
                        None => {
                            out.push(op_error(
                                ErrorReason::MissingBlock,
                                format!("record block {cid} is not in the CAR"),
                                &[],
                            ));
                            continue;
                        }
                    };
                    if block.len() > MAX_RECORD_BYTES {
                        out.push(op_error(
                            ErrorReason::RecordTooLarge,
                            format!("record block of {} bytes", block.len()),
                            block,
                        ));
                        continue;
                    }
                    self.buf.clear();
                    if let Err(e) = self.json.record_to_json(block, &mut self.buf) {
                        out.push(op_error(ErrorReason::Record, e.to_string(), block));
                        continue;
                    }
                    // JsonWriter emits UTF-8 only (validated text, ASCII escapes)
                    let json = String::from_utf8_lossy(&self.buf).into_owned();
                    (Some(cid.to_string()), Some(json))
                }
            };
            out.push(Decoded::Event(Envelope {
                event: Event {
                    did: did.clone(),
                    data: EventData::Commit(CommitOp {
                        rev: rev.clone(),
                        operation,
                        collection,
                        rkey,
                        cid,
                        record,
                    }),
                },
                time_us,
                seq,
                claimed_time_us: None,
                since: since.clone(),
            }));
        }
    }
}

/// Checks the seq, the DID and the time of a body; returns the DID and the time in µs, or the
/// error event.
/// A seq must be a positive integer below 2^53 (relays promise it): anything else could not
/// be a resume cursor.
#[allow(clippy::result_large_err)] // the error is the event we keep; it is moved, not copied
fn check_common(
    did: &str,
    time: &str,
    frame: &[u8],
    seq: Option<i64>,
) -> Result<(Did, i64), Decoded> {
    if let Some(s) = seq
        && !(1..=MAX_CURSOR).contains(&s)
    {
        let mut e = ErrorEvent::new(
            ErrorReason::Seq,
            format!("seq {s} is not a positive integer below 2^53"),
            frame,
        );
        e.seq = seq;
        e.did = Some(did.to_string());
        return Err(Decoded::Error(e));
    }
    let Ok(parsed) = Did::parse(did) else {
        return Err(frame_error(
            ErrorReason::Did,
            "invalid DID".to_string(),
            frame,
            seq,
        ));
    };
    let time_us = syntax::parse_datetime_us(time).map_err(|e| {
        let mut ev = ErrorEvent::new(ErrorReason::Time, format!("time {time:?}: {e}"), frame);
        ev.seq = seq;
        ev.did = Some(did.to_string());
        Decoded::Error(ev)
    })?;
    Ok((parsed, time_us))
}

/// Checks that the commit block exists and agrees with the frame on `did`, `rev` and version 3.
fn check_commit_block(car: &Car<'_>, c: &Commit<'_>) -> Result<(), String> {
    let block = car
        .get(&c.commit)
        .ok_or_else(|| "commit block is not in the CAR".to_string())?;
    let mut r = Reader::new(block);
    let mut did = None;
    let mut rev = None;
    let mut version = None;
    let res: Result<(), CborError> = (|| {
        let n = r.map()?;
        let mut keys = KeyCheck::new();
        for _ in 0..n {
            let k = r.key()?;
            keys.add(k)?;
            match k {
                "did" => did = Some(r.text()?),
                "rev" => rev = Some(r.text()?),
                "version" => version = Some(r.int()?),
                _ => r.skip(MAX_DEPTH)?,
            }
        }
        r.finish()
    })();
    res.map_err(|e| format!("commit block: {e}"))?;
    if did != Some(c.repo) {
        return Err("commit block did differs from repo".into());
    }
    if rev != Some(c.rev) {
        return Err("commit block rev differs from frame rev".into());
    }
    if version != Some(3) {
        return Err(format!("commit version {version:?}, expected 3"));
    }
    Ok(())
}

/// The `seq` of a frame's body, read without decoding the rest (`None` when absent or when the
/// frame is malformed before it).
pub fn peek_seq(frame: &[u8]) -> Option<i64> {
    let (_, at) = parse_header(frame).ok()?;
    let mut r = Reader::new(&frame[at..]);
    let n = r.map().ok()?;
    for _ in 0..n {
        let k = r.key().ok()?;
        if k == "seq" {
            return r.int().ok();
        }
        r.skip(MAX_DEPTH).ok()?;
    }
    None
}
