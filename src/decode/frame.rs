//! `com.atproto.sync.subscribeRepos` frames: a DAG-CBOR header `{op, t}` followed by a body that
//! uses the rest of the message.
//!
//! Bodies keep absent and null apart ([`Field`]): `prev` is absent on create ops, `cid` is null on
//! deletes, the commit-level `prev` is absent in 2026 frames and null in 2025 frames, and `blobs`
//! may be `[]` or null. Unknown fields are skipped, unknown `t` values give [`Body::Unknown`].
//!
//! This module is the wire format only; [`super::events`] turns bodies into events.

use super::cbor::{CborError, KeyCheck, MAX_DEPTH, Reader};
use super::cid::Cid;

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
