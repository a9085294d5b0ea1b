//! DAG-CBOR as atproto uses it: a zero-copy reader, a one-pass converter to atproto JSON text,
//! and an encoder (used by the simulator and to turn atproto JSON into blocks).
//!
//! Accepted: integers within signed 64 bits, byte strings, UTF-8 text, definite-length arrays,
//! maps with text keys, tag 42 links to atproto CIDs, `true`, `false`, `null`. Rejected with a
//! typed [`CborError`]: floats, `undefined` and other simple values, indefinite lengths, any other
//! tag, non-text and duplicate map keys, invalid UTF-8, lengths beyond the input, and nesting
//! deeper than the depth limit. No length read from the input is used to allocate before it is
//! checked against the bytes that remain, so hostile input cannot cause a large allocation.

use super::cid::{Cid, CidError};
use super::json::{DataModelError, write_i64, write_str};
use data_encoding::BASE64_NOPAD;

/// Default nesting limit for arrays and maps.
pub const MAX_DEPTH: usize = 64;

/// Why bytes are not valid atproto DAG-CBOR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CborError {
    /// Input ended inside an item.
    #[error("unexpected end of input at byte {0}")]
    Eof(usize),
    /// Floats are not part of the atproto data model.
    #[error("float at byte {0} (floats are not allowed)")]
    Float(usize),
    /// Indefinite-length items are not allowed in DAG-CBOR.
    #[error("indefinite-length item at byte {0}")]
    Indefinite(usize),
    /// Reserved additional-information values 28–30.
    #[error("reserved encoding at byte {0}")]
    Reserved(usize),
    /// A tag other than 42.
    #[error("tag {tag} at byte {pos} (only tag 42 is allowed)")]
    Tag {
        /// the tag number
        tag: u64,
        /// byte offset
        pos: usize,
    },
    /// A simple value other than false/true/null (e.g. `undefined`).
    #[error("simple value {value} at byte {pos} is not allowed")]
    Simple {
        /// the simple value
        value: u64,
        /// byte offset
        pos: usize,
    },
    /// Integer outside the signed 64-bit range.
    #[error("integer out of signed 64-bit range at byte {0}")]
    IntRange(usize),
    /// A text string that is not UTF-8.
    #[error("invalid UTF-8 in text string at byte {0}")]
    Utf8(usize),
    /// A map key that is not a text string.
    #[error("map key at byte {0} is not a text string")]
    NonTextKey(usize),
    /// The same key twice in one map.
    #[error("duplicate map key {0:?}")]
    DuplicateKey(String),
    /// Nesting beyond the limit.
    #[error("nesting deeper than {0}")]
    Depth(usize),
    /// A tag-42 payload that is not an atproto CID.
    #[error("invalid CID link at byte {pos}: {err}")]
    Cid {
        /// why
        err: CidError,
        /// byte offset
        pos: usize,
    },
    /// An item of another type was expected.
    #[error("expected {expected} at byte {pos}")]
    Type {
        /// what was expected
        expected: &'static str,
        /// byte offset
        pos: usize,
    },
    /// Bytes remained after the value.
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
    /// Valid CBOR that breaks the atproto data model (`$type`, `$link`, `$bytes`, blobs).
    #[error("data model: {0}")]
    DataModel(#[from] DataModelError),
}

/// One decoded item; arrays and maps give their length, their contents follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    /// An integer.
    Int(i64),
    /// A byte string.
    Bytes(&'a [u8]),
    /// A text string.
    Text(&'a str),
    /// An array of this many items.
    Array(usize),
    /// A map of this many entries.
    Map(usize),
    /// A tag-42 link.
    Link(Cid),
    /// `true` or `false`.
    Bool(bool),
    /// `null`.
    Null,
}

/// A zero-copy reader over DAG-CBOR bytes.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Current byte offset.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Whether every byte was read.
    pub fn is_at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Errors unless every byte was read.
    pub fn finish(&self) -> Result<(), CborError> {
        if self.is_at_end() {
            Ok(())
        } else {
            Err(CborError::Trailing(self.buf.len() - self.pos))
        }
    }

    #[inline]
    fn head(&mut self) -> Result<(u8, u8, u64), CborError> {
        let start = self.pos;
        let b = *self.buf.get(self.pos).ok_or(CborError::Eof(start))?;
        self.pos += 1;
        let major = b >> 5;
        let info = b & 0x1f;
        let arg = match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.take_fixed::<1>(start)?[0]),
            25 => u64::from(u16::from_be_bytes(self.take_fixed::<2>(start)?)),
            26 => u64::from(u32::from_be_bytes(self.take_fixed::<4>(start)?)),
            27 => u64::from_be_bytes(self.take_fixed::<8>(start)?),
            28..=30 => return Err(CborError::Reserved(start)),
            _ => return Err(CborError::Indefinite(start)),
        };
        Ok((major, info, arg))
    }

    #[inline]
    fn take_fixed<const N: usize>(&mut self, start: usize) -> Result<[u8; N], CborError> {
        let s = self
            .buf
            .get(self.pos..self.pos + N)
            .ok_or(CborError::Eof(start))?;
        self.pos += N;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    #[inline]
    fn take(&mut self, n: u64, start: usize) -> Result<&'a [u8], CborError> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(CborError::Eof(start));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    /// Reads the next item. Arrays and maps return their length; the caller reads the contents.
    #[inline]
    pub fn item(&mut self) -> Result<Item<'a>, CborError> {
        let start = self.pos;
        let (major, info, arg) = self.head()?;
        match major {
            0 => i64::try_from(arg)
                .map(Item::Int)
                .map_err(|_| CborError::IntRange(start)),
            1 => i64::try_from(arg)
                .map(|n| Item::Int(-1 - n))
                .map_err(|_| CborError::IntRange(start)),
            2 => Ok(Item::Bytes(self.take(arg, start)?)),
            3 => {
                let b = self.take(arg, start)?;
                std::str::from_utf8(b)
                    .map(Item::Text)
                    .map_err(|_| CborError::Utf8(start))
            }
            4 => {
                // every item takes at least one byte
                if arg > (self.buf.len() - self.pos) as u64 {
                    return Err(CborError::Eof(start));
                }
                Ok(Item::Array(arg as usize))
            }
            5 => {
                if arg.saturating_mul(2) > (self.buf.len() - self.pos) as u64 {
                    return Err(CborError::Eof(start));
                }
                Ok(Item::Map(arg as usize))
            }
            6 => {
                if arg != 42 {
                    return Err(CborError::Tag {
                        tag: arg,
                        pos: start,
                    });
                }
                let inner = self.pos;
                let (m, _, len) = self.head()?;
                if m != 2 {
                    return Err(CborError::Type {
                        expected: "bytes inside tag 42",
                        pos: inner,
                    });
                }
                let b = self.take(len, inner)?;
                Cid::from_link_bytes(b)
                    .map(Item::Link)
                    .map_err(|err| CborError::Cid { err, pos: start })
            }
            _ => match info {
                20 => Ok(Item::Bool(false)),
                21 => Ok(Item::Bool(true)),
                22 => Ok(Item::Null),
                25..=27 => Err(CborError::Float(start)),
                _ => Err(CborError::Simple {
                    value: arg,
                    pos: start,
                }),
            },
        }
    }

    /// Skips one complete value, validating it.
    pub fn skip(&mut self, depth: usize) -> Result<(), CborError> {
        match self.item()? {
            Item::Array(n) => {
                if depth == 0 {
                    return Err(CborError::Depth(MAX_DEPTH));
                }
                for _ in 0..n {
                    self.skip(depth - 1)?;
                }
            }
            Item::Map(n) => {
                if depth == 0 {
                    return Err(CborError::Depth(MAX_DEPTH));
                }
                for _ in 0..n {
                    self.key()?;
                    self.skip(depth - 1)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn expect_err(&self, expected: &'static str, pos: usize) -> CborError {
        CborError::Type { expected, pos }
    }

    /// Reads a map key (text).
    #[inline]
    pub fn key(&mut self) -> Result<&'a str, CborError> {
        let pos = self.pos;
        match self.item()? {
            Item::Text(s) => Ok(s),
            _ => Err(CborError::NonTextKey(pos)),
        }
    }

    /// Reads a map header.
    pub fn map(&mut self) -> Result<usize, CborError> {
        let pos = self.pos;
        match self.item()? {
            Item::Map(n) => Ok(n),
            _ => Err(self.expect_err("map", pos)),
        }
    }

    /// Reads an array header.
    pub fn array(&mut self) -> Result<usize, CborError> {
        let pos = self.pos;
        match self.item()? {
            Item::Array(n) => Ok(n),
            _ => Err(self.expect_err("array", pos)),
        }
    }

    /// Reads an integer.
    pub fn int(&mut self) -> Result<i64, CborError> {
        let pos = self.pos;
        match self.item()? {
            Item::Int(n) => Ok(n),
            _ => Err(self.expect_err("integer", pos)),
        }
    }

    /// Reads a text string.
    pub fn text(&mut self) -> Result<&'a str, CborError> {
        let pos = self.pos;
        match self.item()? {
            Item::Text(s) => Ok(s),
            _ => Err(self.expect_err("text", pos)),
        }
    }

    /// Reads a text string or null.
    pub fn text_or_null(&mut self) -> Result<Option<&'a str>, CborError> {
        let pos = self.pos;
        match self.item()? {
            Item::Text(s) => Ok(Some(s)),
            Item::Null => Ok(None),
            _ => Err(self.expect_err("text or null", pos)),
        }
    }

    /// Reads a byte string.
    pub fn bytes(&mut self) -> Result<&'a [u8], CborError> {
        let pos = self.pos;
        match self.item()? {
            Item::Bytes(b) => Ok(b),
            _ => Err(self.expect_err("bytes", pos)),
        }
    }

    /// Reads a boolean.
    pub fn bool(&mut self) -> Result<bool, CborError> {
        let pos = self.pos;
        match self.item()? {
            Item::Bool(b) => Ok(b),
            _ => Err(self.expect_err("bool", pos)),
        }
    }

    /// Reads a link.
    pub fn link(&mut self) -> Result<Cid, CborError> {
        let pos = self.pos;
        match self.item()? {
            Item::Link(c) => Ok(c),
            _ => Err(self.expect_err("link", pos)),
        }
    }

    /// Reads a link or null.
    pub fn link_or_null(&mut self) -> Result<Option<Cid>, CborError> {
        let pos = self.pos;
        match self.item()? {
            Item::Link(c) => Ok(Some(c)),
            Item::Null => Ok(None),
            _ => Err(self.expect_err("link or null", pos)),
        }
    }
}

/// Tracks the keys of one map to reject duplicates. Keys in canonical order (length first, then
/// bytewise) are checked in O(1); out-of-order keys fall back to a scan of the keys seen.
#[derive(Default)]
pub struct KeyCheck<'a> {
    keys: Vec<&'a str>,
    ordered: bool,
}

impl<'a> KeyCheck<'a> {
    /// A fresh checker.
    pub fn new() -> Self {
        KeyCheck {
            keys: Vec::new(),
            ordered: true,
        }
    }

    /// Records `k`; errors if it was seen before in this map.
    pub fn add(&mut self, k: &'a str) -> Result<(), CborError> {
        if let Some(&prev) = self.keys.last() {
            if self.ordered && canonical_lt(prev, k) {
                self.keys.push(k);
                return Ok(());
            }
            self.ordered = false;
            if self.keys.contains(&k) {
                return Err(CborError::DuplicateKey(k.to_string()));
            }
        }
        self.keys.push(k);
        Ok(())
    }
}

/// DAG-CBOR canonical key order: shorter first, then bytewise.
#[inline]
pub fn canonical_lt(a: &str, b: &str) -> bool {
    (a.len(), a.as_bytes()) < (b.len(), b.as_bytes())
}

/// The type of a value already written as JSON, for blob and `$type` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    NegInt,
    Bytes,
    Text,
    Link,
    Array,
    Map,
    Bool,
    Null,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    key_start: usize,
    key_end: usize,
    start: usize,
    value_start: usize,
    end: usize,
    kind: Kind,
}

/// Converts DAG-CBOR records to atproto JSON text in one pass, reusing its buffers.
///
/// Output matches Jetstream's: object keys sorted bytewise (Go map order), except blob objects,
/// which keep `$type, ref, mimeType, size`; links as `{"$link":"b…"}`; bytes as
/// `{"$bytes":"<base64, no padding>"}`; strings escaped as in [`super::json`].
#[derive(Debug)]
pub struct JsonWriter {
    entries: Vec<Entry>,
    scratch: Vec<u8>,
    max_depth: usize,
}

impl Default for JsonWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonWriter {
    /// A writer with the default depth limit.
    pub fn new() -> Self {
        JsonWriter {
            entries: Vec::with_capacity(64),
            scratch: Vec::with_capacity(1024),
            max_depth: MAX_DEPTH,
        }
    }

    /// Converts one record (a map that uses every byte of `block`) and appends its JSON to `out`.
    /// On error `out` is restored to its previous length.
    pub fn record_to_json(&mut self, block: &[u8], out: &mut Vec<u8>) -> Result<(), CborError> {
        let mark = out.len();
        self.entries.clear();
        let mut r = Reader::new(block);
        let res = (|| {
            let pos = r.position();
            match r.item()? {
                Item::Map(n) => self.map(&mut r, block, n, out, 1)?,
                _ => {
                    return Err(CborError::Type {
                        expected: "map (record)",
                        pos,
                    });
                }
            }
            r.finish()
        })();
        if res.is_err() {
            out.truncate(mark);
        }
        res
    }

    /// Converts any single DAG-CBOR value that uses every byte of `buf`.
    pub fn value_to_json(&mut self, buf: &[u8], out: &mut Vec<u8>) -> Result<(), CborError> {
        let mark = out.len();
        self.entries.clear();
        let mut r = Reader::new(buf);
        let res = self.value(&mut r, buf, out, 0).and_then(|_| r.finish());
        if res.is_err() {
            out.truncate(mark);
        }
        res
    }

    fn value(
        &mut self,
        r: &mut Reader<'_>,
        src: &[u8],
        out: &mut Vec<u8>,
        depth: usize,
    ) -> Result<Kind, CborError> {
        Ok(match r.item()? {
            Item::Int(n) => {
                write_i64(out, n);
                if n < 0 { Kind::NegInt } else { Kind::Int }
            }
            Item::Text(s) => {
                write_str(out, s);
                Kind::Text
            }
            Item::Bytes(b) => {
                out.extend_from_slice(b"{\"$bytes\":\"");
                let start = out.len();
                out.resize(start + BASE64_NOPAD.encode_len(b.len()), 0);
                BASE64_NOPAD.encode_mut(b, &mut out[start..]);
                out.extend_from_slice(b"\"}");
                Kind::Bytes
            }
            Item::Link(c) => {
                out.extend_from_slice(b"{\"$link\":\"");
                c.write_str(out);
                out.extend_from_slice(b"\"}");
                Kind::Link
            }
            Item::Bool(b) => {
                out.extend_from_slice(if b { b"true" } else { b"false" });
                Kind::Bool
            }
            Item::Null => {
                out.extend_from_slice(b"null");
                Kind::Null
            }
            Item::Array(n) => {
                if depth + 1 > self.max_depth {
                    return Err(CborError::Depth(self.max_depth));
                }
                out.push(b'[');
                for i in 0..n {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.value(r, src, out, depth + 1)?;
                }
                out.push(b']');
                Kind::Array
            }
            Item::Map(n) => {
                self.map(r, src, n, out, depth + 1)?;
                Kind::Map
            }
        })
    }

    fn map(
        &mut self,
        r: &mut Reader<'_>,
        src: &[u8],
        n: usize,
        out: &mut Vec<u8>,
        depth: usize,
    ) -> Result<(), CborError> {
        if depth > self.max_depth {
            return Err(CborError::Depth(self.max_depth));
        }
        let base = self.entries.len();
        out.push(b'{');
        let region = out.len();
        let mut ordered_canonical = true;
        for i in 0..n {
            let kpos = r.position();
            let key = match r.item()? {
                Item::Text(s) => s,
                _ => return Err(CborError::NonTextKey(kpos)),
            };
            // the key bytes are the tail of the item just read
            let key_end = r.position();
            let key_start = key_end - key.len();
            if i > 0 {
                let prev = self.entries[self.entries.len() - 1];
                let prev_key = &src[prev.key_start..prev.key_end];
                if !(ordered_canonical && (prev_key.len(), prev_key) < (key.len(), key.as_bytes()))
                {
                    ordered_canonical = false;
                    if self.entries[base..]
                        .iter()
                        .any(|e| &src[e.key_start..e.key_end] == key.as_bytes())
                    {
                        return Err(CborError::DuplicateKey(key.to_string()));
                    }
                }
                out.push(b',');
            }
            if key == "$link" {
                return Err(DataModelError::Link("reserved key $link in a CBOR map").into());
            }
            if key == "$bytes" {
                return Err(DataModelError::Bytes("reserved key $bytes in a CBOR map").into());
            }
            let start = out.len();
            write_str(out, key);
            out.push(b':');
            let value_start = out.len();
            let kind = self.value(r, src, out, depth)?;
            self.entries.push(Entry {
                key_start,
                key_end,
                start,
                value_start,
                end: out.len(),
                kind,
            });
        }
        let entries = &mut self.entries[base..];
        let key = |e: &Entry| &src[e.key_start..e.key_end];
        let mut blob = false;
        if let Some(t) = entries.iter().find(|e| key(e) == b"$type") {
            if t.kind != Kind::Text || t.end - t.value_start <= 2 {
                return Err(DataModelError::BadType.into());
            }
            blob = &out[t.value_start..t.end] == b"\"blob\"";
        }
        if blob {
            let rank = |k: &[u8]| match k {
                b"$type" => Some(0u8),
                b"ref" => Some(1),
                b"mimeType" => Some(2),
                b"size" => Some(3),
                _ => None,
            };
            if entries.len() != 4 {
                return Err(
                    DataModelError::Blob("a blob has exactly $type, ref, mimeType, size").into(),
                );
            }
            for e in entries.iter() {
                let ok = match rank(key(e)) {
                    Some(0) => true,
                    Some(1) => e.kind == Kind::Link,
                    Some(2) => e.kind == Kind::Text,
                    Some(3) => e.kind == Kind::Int,
                    _ => return Err(DataModelError::Blob("unexpected key in blob").into()),
                };
                if !ok {
                    return Err(DataModelError::Blob("wrong type for a blob field").into());
                }
            }
            entries.sort_unstable_by_key(|e| rank(key(e)));
            reorder(out, region, entries, &mut self.scratch);
        } else if entries.len() > 1 && !entries.windows(2).all(|w| key(&w[0]) < key(&w[1])) {
            entries.sort_unstable_by(|a, b| key(a).cmp(key(b)));
            reorder(out, region, entries, &mut self.scratch);
        }
        self.entries.truncate(base);
        out.push(b'}');
        Ok(())
    }
}

/// Rewrites `out[region..]` (comma-separated `"k":v` members) in the order of `entries`.
fn reorder(out: &mut Vec<u8>, region: usize, entries: &[Entry], scratch: &mut Vec<u8>) {
    scratch.clear();
    scratch.extend_from_slice(&out[region..]);
    out.truncate(region);
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&scratch[e.start - region..e.end - region]);
    }
}

/// Writes canonical DAG-CBOR. The caller writes map keys in canonical order (see
/// [`canonical_lt`]); [`Encoder::json`] sorts them itself.
#[derive(Debug, Default, Clone)]
pub struct Encoder {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Encoder { buf: Vec::new() }
    }

    fn head(&mut self, major: u8, arg: u64) {
        let m = major << 5;
        if arg < 24 {
            self.buf.push(m | arg as u8);
        } else if arg <= u64::from(u8::MAX) {
            self.buf.extend_from_slice(&[m | 24, arg as u8]);
        } else if arg <= u64::from(u16::MAX) {
            self.buf.push(m | 25);
            self.buf.extend_from_slice(&(arg as u16).to_be_bytes());
        } else if arg <= u64::from(u32::MAX) {
            self.buf.push(m | 26);
            self.buf.extend_from_slice(&(arg as u32).to_be_bytes());
        } else {
            self.buf.push(m | 27);
            self.buf.extend_from_slice(&arg.to_be_bytes());
        }
    }

    /// An integer.
    pub fn int(&mut self, v: i64) -> &mut Self {
        if v >= 0 {
            self.head(0, v as u64);
        } else {
            self.head(1, (-1 - v) as u64);
        }
        self
    }

    /// A text string.
    pub fn text(&mut self, s: &str) -> &mut Self {
        self.head(3, s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
        self
    }

    /// A byte string.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.head(2, b.len() as u64);
        self.buf.extend_from_slice(b);
        self
    }

    /// A tag-42 link.
    pub fn link(&mut self, c: &Cid) -> &mut Self {
        self.buf.extend_from_slice(&[0xd8, 42]);
        self.head(2, 37);
        self.buf.push(0);
        self.buf.extend_from_slice(&c.to_bytes());
        self
    }

    /// A boolean.
    pub fn bool(&mut self, b: bool) -> &mut Self {
        self.buf.push(if b { 0xf5 } else { 0xf4 });
        self
    }

    /// `null`.
    pub fn null(&mut self) -> &mut Self {
        self.buf.push(0xf6);
        self
    }

    /// An array header for `n` items.
    pub fn array(&mut self, n: usize) -> &mut Self {
        self.head(4, n as u64);
        self
    }

    /// A map header for `n` entries.
    pub fn map(&mut self, n: usize) -> &mut Self {
        self.head(5, n as u64);
        self
    }

    /// Appends already-encoded bytes.
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// Encodes atproto JSON as DAG-CBOR, checking the data model on the way (`$link`, `$bytes`,
    /// blobs, `$type`, integers only).
    pub fn json(&mut self, v: &serde_json::Value) -> Result<&mut Self, DataModelError> {
        self.json_at(v, 0)?;
        Ok(self)
    }

    fn json_at(&mut self, v: &serde_json::Value, depth: usize) -> Result<(), DataModelError> {
        use serde_json::Value;
        if depth > MAX_DEPTH {
            return Err(DataModelError::Depth(MAX_DEPTH));
        }
        match v {
            Value::Null => {
                self.null();
            }
            Value::Bool(b) => {
                self.bool(*b);
            }
            Value::Number(n) => {
                let i = json_int(n)?;
                self.int(i);
            }
            Value::String(s) => {
                self.text(s);
            }
            Value::Array(a) => {
                self.array(a.len());
                for x in a {
                    self.json_at(x, depth + 1)?;
                }
            }
            Value::Object(m) => {
                if let Some(l) = m.get("$link") {
                    if m.len() != 1 {
                        return Err(DataModelError::Link("extra keys"));
                    }
                    let s = l.as_str().ok_or(DataModelError::Link("not a string"))?;
                    let c = Cid::parse(s).map_err(|_| DataModelError::Link("not a CID"))?;
                    self.link(&c);
                    return Ok(());
                }
                if let Some(b) = m.get("$bytes") {
                    if m.len() != 1 {
                        return Err(DataModelError::Bytes("extra keys"));
                    }
                    let s = b.as_str().ok_or(DataModelError::Bytes("not a string"))?;
                    let bytes = decode_base64(s).ok_or(DataModelError::Bytes("not base64"))?;
                    self.bytes(&bytes);
                    return Ok(());
                }
                if let Some(t) = m.get("$type") {
                    match t.as_str() {
                        Some("") | None => return Err(DataModelError::BadType),
                        Some("blob") => check_blob_json(m)?,
                        Some(_) => {}
                    }
                }
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort_by(|a, b| (a.len(), a.as_bytes()).cmp(&(b.len(), b.as_bytes())));
                self.map(keys.len());
                for k in keys {
                    self.text(k);
                    self.json_at(&m[k.as_str()], depth + 1)?;
                }
            }
        }
        Ok(())
    }
}

fn json_int(n: &serde_json::Number) -> Result<i64, DataModelError> {
    if let Some(i) = n.as_i64() {
        return Ok(i);
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => Ok(f as i64),
        _ => Err(DataModelError::Float(n.to_string())),
    }
}

fn check_blob_json(m: &serde_json::Map<String, serde_json::Value>) -> Result<(), DataModelError> {
    let r = m.get("ref").ok_or(DataModelError::Blob("missing ref"))?;
    let link = r
        .as_object()
        .and_then(|o| o.get("$link"))
        .ok_or(DataModelError::Blob("ref is not a link"))?;
    if link.as_str().and_then(|s| Cid::parse(s).ok()).is_none() {
        return Err(DataModelError::Blob("ref is not a CID"));
    }
    if m.get("mimeType").and_then(|v| v.as_str()).is_none() {
        return Err(DataModelError::Blob("mimeType is not a string"));
    }
    match m.get("size") {
        Some(serde_json::Value::Number(n)) if json_int(n).map(|s| s >= 0).unwrap_or(false) => {}
        _ => return Err(DataModelError::Blob("size is not a non-negative integer")),
    }
    if m.len() != 4 {
        return Err(DataModelError::Blob("unexpected keys"));
    }
    Ok(())
}

/// Decodes standard base64 with or without padding.
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let trimmed = s.trim_end_matches('=');
    BASE64_NOPAD.decode(trimmed.as_bytes()).ok()
}

/// Checks that a JSON value is valid atproto data (an object at the top level).
pub fn validate_json(v: &serde_json::Value) -> Result<(), DataModelError> {
    if !v.is_object() {
        return Err(DataModelError::NotObject);
    }
    Encoder::new().json(v).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(block: &[u8]) -> Result<String, CborError> {
        let mut out = Vec::new();
        JsonWriter::new().value_to_json(block, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn rejects_what_atproto_forbids() {
        assert!(matches!(
            json_of(&[0xfb, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(CborError::Float(0))
        ));
        assert!(matches!(
            json_of(&[0x9f, 0xff]),
            Err(CborError::Indefinite(0))
        ));
        assert!(matches!(
            json_of(&[0xc1, 0x00]),
            Err(CborError::Tag { tag: 1, .. })
        ));
        assert!(matches!(json_of(&[0xf7]), Err(CborError::Simple { .. })));
        assert!(matches!(
            json_of(&[0xa1, 0x01, 0x02]),
            Err(CborError::NonTextKey(1))
        ));
        assert!(matches!(
            json_of(&[0xa2, 0x61, b'a', 0x01, 0x61, b'a', 0x02]),
            Err(CborError::DuplicateKey(_))
        ));
        assert!(matches!(
            json_of(&[0x62, 0xff, 0xfe]),
            Err(CborError::Utf8(0))
        ));
        assert!(matches!(
            json_of(&[0x1b, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            Err(CborError::IntRange(0))
        ));
        assert!(matches!(
            json_of(&[0x01, 0x02]),
            Err(CborError::Trailing(1))
        ));
        assert!(matches!(
            json_of(&[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(CborError::Eof(0))
        ));
    }

    #[test]
    fn integers_at_the_edges() {
        let mut e = Encoder::new();
        e.array(2).int(i64::MAX).int(i64::MIN);
        assert_eq!(
            json_of(&e.buf).unwrap(),
            format!("[{},{}]", i64::MAX, i64::MIN)
        );
    }

    #[test]
    fn keys_sorted_bytewise_and_blob_order() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"subject":"x","$type":"a.b.c","createdAt":"t","img":{"$type":"blob","ref":{"$link":"bafkreiccldh766hwcnuxnf2wh6jgzepf2nlu2lvcllt63eww5p6chi4ity"},"mimeType":"image/jpeg","size":1}}"#,
        )
        .unwrap();
        let mut e = Encoder::new();
        e.json(&v).unwrap();
        assert_eq!(
            json_of(&e.buf).unwrap(),
            r#"{"$type":"a.b.c","createdAt":"t","img":{"$type":"blob","ref":{"$link":"bafkreiccldh766hwcnuxnf2wh6jgzepf2nlu2lvcllt63eww5p6chi4ity"},"mimeType":"image/jpeg","size":1},"subject":"x"}"#
        );
    }

    /// Skipping a value counts its depth through maps as well as arrays.
    #[test]
    fn skip_stops_at_the_depth_limit_in_maps_and_arrays() {
        for map in [true, false] {
            let mut e = Encoder::new();
            for _ in 0..MAX_DEPTH + 5 {
                if map {
                    e.map(1).text("k");
                } else {
                    e.array(1);
                }
            }
            e.int(1);
            assert_eq!(
                Reader::new(&e.buf).skip(MAX_DEPTH),
                Err(CborError::Depth(MAX_DEPTH)),
                "maps: {map}"
            );
            let mut e = Encoder::new();
            for _ in 0..MAX_DEPTH {
                if map {
                    e.map(1).text("k");
                } else {
                    e.array(1);
                }
            }
            e.int(1);
            assert_eq!(Reader::new(&e.buf).skip(MAX_DEPTH), Ok(()), "maps: {map}");
        }
    }

    #[test]
    fn depth_limit() {
        let mut b = vec![0x81; 200];
        b.push(0x01);
        assert!(matches!(json_of(&b), Err(CborError::Depth(_))));
    }
}
