//! CARv1 archives as carried in `#commit.blocks` and `#sync.blocks`.
//!
//! Layout: `varint(len) | header {version: 1, roots: [CID…]}`, then blocks
//! `varint(len(cid) + len(data)) | cid | data`, in any order. Duplicate blocks are tolerated (the
//! first copy wins). Every block's sha2-256 is checked against its CID unless verification is
//! turned off. Blocks borrow from the input; nothing is copied.

use super::cbor::{CborError, KeyCheck, Reader};
use super::cid::{Cid, CidError, read_varint};
use std::collections::HashMap;

/// Why bytes are not a valid CAR slice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CarError {
    /// A length varint is malformed or truncated.
    #[error("bad varint at byte {0}")]
    Varint(usize),
    /// A section claims more bytes than remain.
    #[error("section at byte {0} is longer than the input")]
    Truncated(usize),
    /// The header is not a DAG-CBOR map with `version` 1 and `roots`.
    #[error("bad CAR header: {0}")]
    Header(String),
    /// A block's CID does not parse.
    #[error("bad block CID at byte {pos}: {err}")]
    Cid {
        /// why
        err: CidError,
        /// byte offset
        pos: usize,
    },
    /// A block's bytes do not hash to its CID.
    #[error("block {0} does not match its hash")]
    HashMismatch(Cid),
    /// The archive has no roots.
    #[error("CAR has no roots")]
    NoRoots,
    /// A section longer than the reader accepts (a hostile length must not make it buffer).
    #[error("section at byte {pos} claims {len} bytes (at most {max})")]
    SectionTooLarge {
        /// byte offset
        pos: u64,
        /// the claimed length
        len: u64,
        /// the limit
        max: usize,
    },
    /// The stream ended inside a section, or before its header.
    #[error("CAR stream ends inside the section at byte {0}")]
    EndsEarly(u64),
}

/// A parsed CAR: roots and blocks, borrowing the input.
#[derive(Debug, Clone, Default)]
pub struct Car<'a> {
    /// The header's roots; the first is the commit for repo slices.
    pub roots: Vec<Cid>,
    /// Blocks in file order, without duplicates.
    pub blocks: Vec<(Cid, &'a [u8])>,
    /// Index by CID, built once the archive has many blocks.
    index: Option<HashMap<Cid, usize>>,
}

/// Below this many blocks a linear scan beats hashing.
const INDEX_AFTER: usize = 24;

impl<'a> Car<'a> {
    /// Parses `buf`; `verify` checks every block's hash.
    pub fn parse(buf: &'a [u8], verify: bool) -> Result<Car<'a>, CarError> {
        let mut pos = 0;
        let (hlen, n) = read_varint(buf).map_err(|_| CarError::Varint(0))?;
        pos += n;
        let header = section(buf, pos, hlen)?;
        let roots = parse_header(header)?;
        pos += header.len();
        let mut car = Car {
            roots,
            blocks: Vec::new(),
            index: None,
        };
        while pos < buf.len() {
            let at = pos;
            let (len, n) = read_varint(&buf[pos..]).map_err(|_| CarError::Varint(at))?;
            pos += n;
            let sec = section(buf, pos, len)?;
            pos += sec.len();
            let (cid, used) =
                Cid::read_prefix(sec).map_err(|err| CarError::Cid { err, pos: at })?;
            let data = &sec[used..];
            if verify && !cid.matches(data) {
                return Err(CarError::HashMismatch(cid));
            }
            if car.get(&cid).is_none() {
                car.blocks.push((cid, data));
                let i = car.blocks.len() - 1;
                match &mut car.index {
                    Some(ix) => {
                        ix.insert(cid, i);
                    }
                    None if car.blocks.len() > INDEX_AFTER => {
                        car.index = Some(
                            car.blocks
                                .iter()
                                .enumerate()
                                .map(|(i, (c, _))| (*c, i))
                                .collect(),
                        );
                    }
                    None => {}
                }
            }
        }
        Ok(car)
    }

    /// The block with this CID.
    pub fn get(&self, cid: &Cid) -> Option<&'a [u8]> {
        match &self.index {
            Some(ix) => ix.get(cid).map(|&i| self.blocks[i].1),
            None => self.blocks.iter().find(|(c, _)| c == cid).map(|(_, d)| *d),
        }
    }
}

fn section(buf: &[u8], pos: usize, len: u64) -> Result<&[u8], CarError> {
    let end = (pos as u64)
        .checked_add(len)
        .filter(|&e| e <= buf.len() as u64)
        .ok_or(CarError::Truncated(pos))?;
    Ok(&buf[pos..end as usize])
}

fn parse_header(h: &[u8]) -> Result<Vec<Cid>, CarError> {
    let err = |e: CborError| CarError::Header(e.to_string());
    let mut r = Reader::new(h);
    let n = r.map().map_err(err)?;
    let mut keys = KeyCheck::new();
    let mut version = None;
    let mut roots = None;
    for _ in 0..n {
        let k = r.key().map_err(err)?;
        keys.add(k).map_err(err)?;
        match k {
            "version" => version = Some(r.int().map_err(err)?),
            "roots" => {
                let len = r.array().map_err(err)?;
                let mut v = Vec::with_capacity(len.min(16));
                for _ in 0..len {
                    v.push(r.link().map_err(err)?);
                }
                roots = Some(v);
            }
            _ => r.skip(super::cbor::MAX_DEPTH).map_err(err)?,
        }
    }
    r.finish().map_err(err)?;
    if version != Some(1) {
        return Err(CarError::Header(format!("version {version:?}, expected 1")));
    }
    let roots = roots.ok_or_else(|| CarError::Header("missing roots".into()))?;
    if roots.is_empty() {
        return Err(CarError::NoRoots);
    }
    Ok(roots)
}

/// Reads a CAR from a stream of chunks without holding more than one section beyond what the
/// caller keeps: [`CarStream::push`] bytes as they arrive, then take blocks with
/// [`CarStream::next_block`] until it says it needs more. Every block's hash is verified; a
/// section longer than `max_section` is an error before any of it is buffered.
#[derive(Debug)]
pub struct CarStream {
    buf: Vec<u8>,
    /// bytes of `buf` already consumed
    start: usize,
    /// stream offset of `buf[0]`
    base: u64,
    roots: Option<Vec<Cid>>,
    max_section: usize,
}

impl CarStream {
    /// A reader that refuses sections (header or block) longer than `max_section` bytes.
    pub fn new(max_section: usize) -> Self {
        CarStream {
            buf: Vec::new(),
            start: 0,
            base: 0,
            roots: None,
            max_section,
        }
    }

    /// Appends bytes from the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.base += self.start as u64;
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The header's roots, once the header has been read.
    pub fn roots(&self) -> Option<&[Cid]> {
        self.roots.as_deref()
    }

    /// The next complete section's bytes, or `None` if more input is needed.
    fn section(&mut self) -> Result<Option<(u64, std::ops::Range<usize>)>, CarError> {
        let at = self.base + self.start as u64;
        let rest = &self.buf[self.start..];
        if rest.is_empty() {
            return Ok(None);
        }
        let (len, n) = match read_varint(rest) {
            Ok(v) => v,
            Err(super::cid::CidError::Truncated) => return Ok(None),
            Err(_) => return Err(CarError::Varint(at as usize)),
        };
        if len > self.max_section as u64 {
            return Err(CarError::SectionTooLarge {
                pos: at,
                len,
                max: self.max_section,
            });
        }
        let len = len as usize;
        if rest.len() - n < len {
            self.buf.reserve(len + n - rest.len());
            return Ok(None);
        }
        let from = self.start + n;
        self.start = from + len;
        Ok(Some((at, from..from + len)))
    }

    /// The next block, hash verified; `Ok(None)` when more input is needed (or the stream is
    /// done: see [`CarStream::finish`]). Reads the header first.
    pub fn next_block(&mut self) -> Result<Option<(Cid, &[u8])>, CarError> {
        if self.roots.is_none() {
            let Some((_, range)) = self.section()? else {
                return Ok(None);
            };
            self.roots = Some(parse_header(&self.buf[range])?);
        }
        let Some((at, range)) = self.section()? else {
            return Ok(None);
        };
        let sec = &self.buf[range];
        let (cid, used) = Cid::read_prefix(sec).map_err(|err| CarError::Cid {
            err,
            pos: at as usize,
        })?;
        let data = &sec[used..];
        if !cid.matches(data) {
            return Err(CarError::HashMismatch(cid));
        }
        Ok(Some((cid, data)))
    }

    /// Checks that the stream ended at a section boundary, after its header.
    pub fn finish(&self) -> Result<(), CarError> {
        if self.roots.is_none() || self.buffered() > 0 {
            return Err(CarError::EndsEarly(self.base + self.start as u64));
        }
        Ok(())
    }
}

/// Writes CAR slices (used by the simulator and tests).
#[derive(Debug, Default)]
pub struct CarWriter {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

impl CarWriter {
    /// Starts a CAR with these roots.
    pub fn new(roots: &[Cid]) -> Self {
        let mut h = super::cbor::Encoder::new();
        h.map(2).text("roots").array(roots.len());
        for r in roots {
            h.link(r);
        }
        h.text("version").int(1);
        let mut buf = Vec::new();
        write_varint(&mut buf, h.buf.len() as u64);
        buf.extend_from_slice(&h.buf);
        CarWriter { buf }
    }

    /// Appends a block.
    pub fn block(&mut self, cid: &Cid, data: &[u8]) -> &mut Self {
        write_varint(&mut self.buf, (36 + data.len()) as u64);
        self.buf.extend_from_slice(&cid.to_bytes());
        self.buf.extend_from_slice(data);
        self
    }
}
