//! `subscribeRepos` bodies as events: the DID, seq and time checked, each commit op joined with
//! its record block (every block's hash verified, the commit checked against the frame), and
//! one event per op. Input that cannot become an event becomes a [`Decoded::Error`] with its
//! reason and raw bytes; no input makes decoding fail or panic.

use super::car::{Car, CarError};
use super::cbor::{CborError, JsonWriter, KeyCheck, MAX_DEPTH, Reader};
use super::cid::Cid;
use super::frame::{Body, Commit, Field, RepoOp, parse_frame};
use crate::model::cursor::MAX_CURSOR;
use crate::model::{
    Account, Chain, CommitOp, Decoded, Did, Envelope, ErrorEvent, ErrorReason, Event, EventData,
    Identity, Nsid, Operation, Rkey, SyncInfo, Tid,
};
use crate::syntax;
use std::sync::Arc;

/// Largest record block atproto allows.
pub const MAX_RECORD_BYTES: usize = 1_000_000;

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
                        chain: None,
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
                        chain: None,
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
                                data: EventData::Sync(SyncInfo {
                                    rev,
                                    snapshot: None,
                                }),
                            },
                            time_us,
                            seq,
                            claimed_time_us: None,
                            chain: None,
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
        let (car, data) = match self.checked_car(c) {
            Ok(v) => v,
            Err((reason, detail)) => {
                out.push(whole(reason, detail));
                return;
            }
        };
        let ctx = CommitContext {
            did,
            rev,
            chain: Arc::new(Chain {
                since: c.since.value().map(|s| s.to_string()),
                prev_data: c.prev_data.value().map(|d| d.to_string()),
                data: data.to_string(),
            }),
            seq,
            time_us,
            car: &car,
        };
        for op in &c.ops {
            out.push(match self.op_event(&ctx, op) {
                Ok(env) => Decoded::Event(env),
                Err((reason, detail, raw)) => {
                    let mut e = ErrorEvent::new(reason, detail, raw);
                    e.seq = seq;
                    e.time_us = Some(time_us);
                    e.did = Some(c.repo.to_string());
                    e.path = Some(op.path.to_string());
                    Decoded::Error(e)
                }
            });
        }
    }

    /// The commit's CAR, with every block's hash checked (when asked), the commit as its first
    /// root, and the commit block agreeing with the frame.
    fn checked_car<'a>(&self, c: &Commit<'a>) -> Result<(Car<'a>, Cid), (ErrorReason, String)> {
        let car = Car::parse(c.blocks, self.options.verify_hashes).map_err(|e| match e {
            CarError::HashMismatch(_) => (ErrorReason::HashMismatch, e.to_string()),
            _ => (ErrorReason::Car, e.to_string()),
        })?;
        if car.roots.first() != Some(&c.commit) {
            return Err((
                ErrorReason::CommitMismatch,
                "first CAR root is not the commit".into(),
            ));
        }
        let data = check_commit_block(&car, c).map_err(|d| (ErrorReason::CommitMismatch, d))?;
        Ok((car, data))
    }

    /// One op as an event: its path checked, its record (creates and updates) found in the CAR
    /// and turned into atproto JSON. On failure: the reason, a detail, and the bytes to keep.
    fn op_event<'a>(
        &mut self,
        ctx: &CommitContext<'a, '_>,
        op: &RepoOp<'_>,
    ) -> Result<Envelope, (ErrorReason, String, &'a [u8])> {
        let (collection, rkey) = match op.path.split_once('/') {
            Some((a, b)) if !b.contains('/') => (a, b),
            _ => return Err((ErrorReason::Path, "path is not collection/rkey".into(), &[])),
        };
        let collection = Nsid::parse(collection).map_err(|_| {
            (
                ErrorReason::Collection,
                "collection is not an NSID".into(),
                &[][..],
            )
        })?;
        let rkey = Rkey::parse(rkey)
            .map_err(|_| (ErrorReason::Rkey, "invalid record key".into(), &[][..]))?;
        let operation = Operation::parse(op.action).ok_or_else(|| {
            (
                ErrorReason::Action,
                format!("unknown action {:?}", op.action),
                &[][..],
            )
        })?;
        let (cid, record) = match operation {
            Operation::Delete => (None, None),
            Operation::Create | Operation::Update => {
                let (cid, json) = self.op_record(ctx.car, op)?;
                (Some(cid), Some(json))
            }
        };
        Ok(Envelope {
            event: Event {
                did: ctx.did.clone(),
                data: EventData::Commit(CommitOp {
                    rev: ctx.rev.clone(),
                    operation,
                    collection,
                    rkey,
                    cid,
                    record,
                }),
            },
            time_us: ctx.time_us,
            claimed_time_us: None,
            seq: ctx.seq,
            chain: Some(ctx.chain.clone()),
        })
    }

    /// The record of a create or update: its CID and atproto JSON.
    fn op_record<'a>(
        &mut self,
        car: &Car<'a>,
        op: &RepoOp<'_>,
    ) -> Result<(String, String), (ErrorReason, String, &'a [u8])> {
        let Field::Value(cid) = op.cid else {
            return Err((
                ErrorReason::Action,
                format!("{} without a cid", op.action),
                &[],
            ));
        };
        let block = car.get(&cid).ok_or_else(|| {
            (
                ErrorReason::MissingBlock,
                format!("record block {cid} is not in the CAR"),
                &[][..],
            )
        })?;
        if block.len() > MAX_RECORD_BYTES {
            return Err((
                ErrorReason::RecordTooLarge,
                format!("record block of {} bytes", block.len()),
                block,
            ));
        }
        self.buf.clear();
        self.json
            .record_to_json(block, &mut self.buf)
            .map_err(|e| (ErrorReason::Record, e.to_string(), block))?;
        // JsonWriter emits UTF-8 only (validated text, ASCII escapes)
        let json = String::from_utf8_lossy(&self.buf).into_owned();
        Ok((cid.to_string(), json))
    }
}

/// What every op of one commit shares.
struct CommitContext<'a, 'b> {
    did: Did,
    rev: Tid,
    chain: Arc<Chain>,
    seq: Option<i64>,
    time_us: i64,
    car: &'b Car<'a>,
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
/// Checks the commit block against the frame; returns its MST root (`data`).
fn check_commit_block(car: &Car<'_>, c: &Commit<'_>) -> Result<Cid, String> {
    let block = car
        .get(&c.commit)
        .ok_or_else(|| "commit block is not in the CAR".to_string())?;
    let mut r = Reader::new(block);
    let mut did = None;
    let mut rev = None;
    let mut version = None;
    let mut data = None;
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
                "data" => data = Some(r.link()?),
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
    data.ok_or_else(|| "commit block has no data".to_string())
}
