//! Corrupted frames for fault injection: a CAR block whose bytes no longer match its hash, a
//! truncated CAR, a record block over 1 MB, an 8 MiB message. Each gets a fresh seq so it
//! reaches the decoder (a reused seq would be dropped as a duplicate first).

use super::traffic::{SimMessage, frame_bytes};
use crate::decode::car::{Car, CarWriter};
use crate::decode::cbor::{Encoder, JsonWriter, decode_base64};
use crate::decode::cid::Cid;
use crate::decode::frame::parse_header;
use serde_json::{Value, json};

/// The kinds of corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// One non-commit block's bytes altered.
    BadHash,
    /// The CAR cut in half.
    TruncatedCar,
    /// A record block over 1,000,000 bytes.
    BigRecord,
    /// The whole message padded to 8 MiB.
    Oversized,
}

fn body_json(frame: &[u8]) -> Option<(String, Value)> {
    let (h, at) = parse_header(frame).ok()?;
    let mut out = Vec::new();
    JsonWriter::new()
        .value_to_json(&frame[at..], &mut out)
        .ok()?;
    Some((h.t?.to_string(), serde_json::from_slice(&out).ok()?))
}

fn encode_frame(t: &str, body: &Value) -> Option<Vec<u8>> {
    let mut e = Encoder::new();
    e.json(body).ok()?;
    Some(frame_bytes(t, &e.buf))
}

fn bytes_of(v: &Value) -> Option<Vec<u8>> {
    decode_base64(v.get("$bytes")?.as_str()?)
}

fn bytes_value(b: &[u8]) -> Value {
    json!({ "$bytes": data_encoding::BASE64_NOPAD.encode(b) })
}

/// A corrupted copy of commit `m` with sequence number `seq` (`None` if `m` is not a commit
/// with a record).
pub fn corrupt(m: &SimMessage, seq: i64, how: Corruption) -> Option<Vec<u8>> {
    let (t, mut body) = body_json(&m.frame)?;
    if t != "#commit" {
        return None;
    }
    body["seq"] = json!(seq);
    let blocks = bytes_of(&body["blocks"])?;
    let car = Car::parse(&blocks, false).ok()?;
    let commit = *car.roots.first()?;
    match how {
        Corruption::BadHash => {
            let (victim, _) = car.blocks.iter().find(|(c, _)| *c != commit)?;
            let mut w = CarWriter::new(&car.roots);
            for (c, d) in &car.blocks {
                if c == victim {
                    let mut d = d.to_vec();
                    let i = d.len() / 2;
                    d[i] ^= 0x55;
                    w.block(c, &d);
                } else {
                    w.block(c, d);
                }
            }
            body["blocks"] = bytes_value(&w.buf);
            encode_frame(&t, &body)
        }
        Corruption::TruncatedCar => {
            body["blocks"] = bytes_value(&blocks[..blocks.len() / 2]);
            encode_frame(&t, &body)
        }
        Corruption::BigRecord => {
            let rec = json!({
                "$type": "app.bsky.feed.post",
                "createdAt": "2026-07-04T14:00:00.000Z",
                "text": "x".repeat(1_100_000),
            });
            let mut e = Encoder::new();
            e.json(&rec).ok()?;
            let cid = Cid::for_dag_cbor(&e.buf);
            let mut w = CarWriter::new(&car.roots);
            for (c, d) in &car.blocks {
                w.block(c, d);
            }
            w.block(&cid, &e.buf);
            body["blocks"] = bytes_value(&w.buf);
            let ops = body["ops"].as_array_mut()?;
            let op = ops.first_mut()?;
            let path = op["path"].as_str()?.to_string();
            let coll = path.split('/').next()?.to_string();
            *op = json!({
                "action": "create",
                "cid": {"$link": cid.to_string()},
                "path": format!("{coll}/3zzzzzzzzzzzz"),
            });
            ops.truncate(1);
            encode_frame(&t, &body)
        }
        Corruption::Oversized => {
            let mut f = encode_frame(&t, &body)?;
            f.resize(8 << 20, 0);
            Some(f)
        }
    }
}

/// A copy of frame `frame` with its body's `seq` replaced (any value, even one no relay sends).
pub fn with_seq(frame: &[u8], seq: i64) -> Option<Vec<u8>> {
    let (t, mut body) = body_json(frame)?;
    body["seq"] = json!(seq);
    encode_frame(&t, &body)
}

/// A copy of frame `frame` with its body's `time` replaced.
pub fn with_time(frame: &[u8], time: &str) -> Option<Vec<u8>> {
    let (t, mut body) = body_json(frame)?;
    body["time"] = json!(time);
    encode_frame(&t, &body)
}
