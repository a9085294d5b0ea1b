//! Content identifiers (CIDs) as atproto uses them.
//!
//! Only the "blessed" atproto form is accepted: CIDv1, multihash sha2-256 with a 32-byte digest, and
//! codec dag-cbor (`0x71`, records, commits, MST nodes) or raw (`0x55`, blobs). The binary form is
//! 36 bytes; the string form is multibase `b` + lower-case RFC 4648 base32 without padding
//! (`bafyrei…` for dag-cbor, `bafkrei…` for raw).

use sha2::{Digest, Sha256};
use std::fmt;

/// Length of the binary form of an atproto CID.
pub const CID_LEN: usize = 36;

/// Why bytes or a string are not an atproto CID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidError {
    /// The input ended before the CID did.
    #[error("CID truncated")]
    Truncated,
    /// CIDv0 (bare sha2-256 multihash) is not used by atproto.
    #[error("CIDv0 is not supported")]
    V0,
    /// The version varint is not 1.
    #[error("unsupported CID version {0}")]
    Version(u64),
    /// The codec is neither dag-cbor nor raw.
    #[error("unsupported CID codec 0x{0:x}")]
    Codec(u64),
    /// The multihash is not sha2-256 with a 32-byte digest.
    #[error("unsupported multihash 0x{code:x} of length {len}")]
    Multihash {
        /// multihash function code
        code: u64,
        /// digest length
        len: u64,
    },
    /// A tag-42 link did not start with the identity multibase prefix `0x00`.
    #[error("CID link does not start with the 0x00 multibase prefix")]
    LinkPrefix,
    /// Bytes were left after the CID where none are allowed.
    #[error("trailing bytes after CID")]
    Trailing,
    /// The string form is not `b` + base32.
    #[error("invalid CID string")]
    String,
    /// A varint was longer than 9 bytes or overlong.
    #[error("invalid varint in CID")]
    Varint,
}

/// The two codecs atproto uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Codec {
    /// `0x71`: DAG-CBOR (records, commits, MST nodes).
    DagCbor,
    /// `0x55`: raw bytes (blobs).
    Raw,
}

impl Codec {
    fn code(self) -> u8 {
        match self {
            Codec::DagCbor => 0x71,
            Codec::Raw => 0x55,
        }
    }
}

/// A CIDv1 with a sha2-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cid {
    codec: Codec,
    digest: [u8; 32],
}

/// Reads an unsigned LEB128 varint of at most 9 bytes; returns the value and the bytes used.
pub fn read_varint(buf: &[u8]) -> Result<(u64, usize), CidError> {
    let mut value: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(9) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return Err(CidError::Varint);
            }
            return Ok((value, i + 1));
        }
    }
    if buf.len() < 9 {
        Err(CidError::Truncated)
    } else {
        Err(CidError::Varint)
    }
}

impl Cid {
    /// The CID of a DAG-CBOR block: sha2-256 of its bytes.
    pub fn for_dag_cbor(data: &[u8]) -> Cid {
        Cid {
            codec: Codec::DagCbor,
            digest: Sha256::digest(data).into(),
        }
    }

    /// The CID of raw bytes (a blob).
    pub fn for_raw(data: &[u8]) -> Cid {
        Cid {
            codec: Codec::Raw,
            digest: Sha256::digest(data).into(),
        }
    }

    /// Builds a CID from its parts.
    pub fn new(codec: Codec, digest: [u8; 32]) -> Cid {
        Cid { codec, digest }
    }

    /// The codec.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The sha2-256 digest.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// Whether `data` hashes to this CID.
    pub fn matches(&self, data: &[u8]) -> bool {
        let d: [u8; 32] = Sha256::digest(data).into();
        d == self.digest
    }

    /// Reads a binary CID at the start of `buf` (as in a CAR block section) and returns it with
    /// the number of bytes it took.
    pub fn read_prefix(buf: &[u8]) -> Result<(Cid, usize), CidError> {
        if buf.len() >= 2 && buf[0] == 0x12 && buf[1] == 0x20 {
            return Err(CidError::V0);
        }
        let (version, a) = read_varint(buf)?;
        if version != 1 {
            return Err(CidError::Version(version));
        }
        let (codec, b) = read_varint(&buf[a..])?;
        let codec = match codec {
            0x71 => Codec::DagCbor,
            0x55 => Codec::Raw,
            other => return Err(CidError::Codec(other)),
        };
        let (code, c) = read_varint(&buf[a + b..])?;
        let (len, d) = read_varint(&buf[a + b + c..])?;
        if code != 0x12 || len != 32 {
            return Err(CidError::Multihash { code, len });
        }
        let start = a + b + c + d;
        let digest: [u8; 32] = buf
            .get(start..start + 32)
            .ok_or(CidError::Truncated)?
            .try_into()
            .map_err(|_| CidError::Truncated)?;
        Ok((Cid { codec, digest }, start + 32))
    }

    /// Parses a binary CID that must use all of `buf`.
    pub fn from_bytes(buf: &[u8]) -> Result<Cid, CidError> {
        let (cid, n) = Cid::read_prefix(buf)?;
        if n != buf.len() {
            return Err(CidError::Trailing);
        }
        Ok(cid)
    }

    /// Parses the payload of a DAG-CBOR tag-42 link: `0x00` + binary CID.
    pub fn from_link_bytes(buf: &[u8]) -> Result<Cid, CidError> {
        match buf.split_first() {
            Some((0, rest)) => Cid::from_bytes(rest),
            Some(_) => Err(CidError::LinkPrefix),
            None => Err(CidError::Truncated),
        }
    }

    /// The 36-byte binary form.
    pub fn to_bytes(&self) -> [u8; CID_LEN] {
        let mut out = [0u8; CID_LEN];
        out[0] = 0x01;
        out[1] = self.codec.code();
        out[2] = 0x12;
        out[3] = 0x20;
        out[4..].copy_from_slice(&self.digest);
        out
    }

    /// Parses the string form `b` + base32.
    pub fn parse(s: &str) -> Result<Cid, CidError> {
        let body = s.strip_prefix('b').ok_or(CidError::String)?;
        // every CID this crate takes is 36 bytes; a text of another length is not one
        let mut bytes = [0u8; CID_LEN];
        base32_decode_into(body.as_bytes(), &mut bytes).ok_or(CidError::String)?;
        Cid::from_bytes(&bytes).map_err(|e| match e {
            CidError::Truncated | CidError::Trailing => CidError::String,
            other => other,
        })
    }

    /// Appends the string form to `out` (59 ASCII bytes).
    pub fn write_str(&self, out: &mut Vec<u8>) {
        out.push(b'b');
        base32_encode(&self.to_bytes(), out);
    }
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = Vec::with_capacity(59);
        self.write_str(&mut buf);
        // base32 output is ASCII
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cid({self})")
    }
}

const B32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Lower-case RFC 4648 base32 without padding.
pub fn base32_encode(data: &[u8], out: &mut Vec<u8>) {
    let mut acc: u64 = 0;
    let mut bits = 0u32;
    for &b in data {
        acc = (acc << 8) | u64::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(B32[((acc >> bits) & 31) as usize]);
        }
    }
    if bits > 0 {
        out.push(B32[((acc << (5 - bits)) & 31) as usize]);
    }
}

/// Decodes lower-case RFC 4648 base32 without padding; `None` on any invalid character or on
/// non-zero trailing bits.
pub fn base32_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = vec![0u8; s.len() * 5 / 8];
    base32_decode_into(s, &mut out)?;
    Some(out)
}

/// [`base32_decode`] into `out`, which must be exactly `s.len() * 5 / 8` bytes long: eight
/// characters at a time into five bytes, no allocation (a CID's 58 characters are 36 bytes).
pub fn base32_decode_into(s: &[u8], out: &mut [u8]) -> Option<()> {
    static VALUE: [u8; 256] = {
        let mut t = [0xffu8; 256];
        let mut i = 0;
        while i < 32 {
            t[B32[i] as usize] = i as u8;
            i += 1;
        }
        t
    };
    if out.len() != s.len() * 5 / 8 {
        return None;
    }
    let mut chunks = s.chunks_exact(8);
    let mut groups = out.chunks_exact_mut(5);
    for (c, o) in (&mut chunks).zip(&mut groups) {
        let mut acc: u64 = 0;
        let mut seen = 0u8;
        for &ch in c {
            let v = VALUE[ch as usize];
            seen |= v;
            acc = (acc << 5) | u64::from(v & 31);
        }
        // a valid value is below 32; an invalid character is 0xff
        if seen >= 32 {
            return None;
        }
        o.copy_from_slice(&acc.to_be_bytes()[3..]);
    }
    let rest = groups.into_remainder();
    let mut acc: u64 = 0;
    let mut bits = 0u32;
    let mut o = 0;
    for &c in chunks.remainder() {
        let v = VALUE[c as usize];
        if v == 0xff {
            return None;
        }
        acc = (acc << 5) | u64::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            *rest.get_mut(o)? = (acc >> bits) as u8;
            o += 1;
        }
    }
    if o != rest.len() || bits >= 5 || (acc & ((1 << bits) - 1)) != 0 {
        return None;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_round_trip() {
        let s = "bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq";
        let cid = Cid::parse(s).unwrap();
        assert_eq!(cid.to_string(), s);
        assert_eq!(cid.codec(), Codec::DagCbor);
        let raw = "bafkreiccldh766hwcnuxnf2wh6jgzepf2nlu2lvcllt63eww5p6chi4ity";
        assert_eq!(Cid::parse(raw).unwrap().codec(), Codec::Raw);
        assert_eq!(Cid::parse(raw).unwrap().to_string(), raw);
    }

    #[test]
    fn rejects_other_forms() {
        assert!(Cid::parse("QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR").is_err());
        assert!(Cid::parse("bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi").is_err());
        assert!(Cid::parse("b").is_err());
        let good = "bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq";
        assert!(Cid::parse(&good[..good.len() - 1]).is_err());
        assert_eq!(
            Cid::parse(&format!("{good}aaaaaaaa")),
            Err(CidError::String)
        );
        assert!(Cid::parse("").is_err());
        assert_eq!(Cid::from_bytes(&[0x12, 0x20]), Err(CidError::V0));
    }

    /// Bit by bit, the slow way: what every base32 decode must agree with.
    fn reference_decode(s: &[u8]) -> Option<Vec<u8>> {
        let mut bits = Vec::new();
        for &c in s {
            let v = B32.iter().position(|&b| b == c)?;
            bits.extend((0..5).rev().map(|i| (v >> i) & 1 == 1));
        }
        let whole = bits.len() / 8 * 8;
        if bits.len() - whole >= 5 || bits[whole..].iter().any(|&b| b) {
            return None;
        }
        Some(
            bits[..whole]
                .chunks(8)
                .map(|byte| byte.iter().fold(0u8, |a, &b| (a << 1) | u8::from(b)))
                .collect(),
        )
    }

    #[test]
    fn base32_decodes_every_length_and_refuses_what_the_slow_way_refuses() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in 0..40usize {
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let mut text = Vec::new();
            base32_encode(&data, &mut text);
            assert_eq!(
                base32_decode(&text).as_deref(),
                Some(&data[..]),
                "len {len}"
            );
            assert_eq!(reference_decode(&text).as_deref(), Some(&data[..]));
            // a bad character at each place; a changed last character (trailing bits)
            for at in 0..text.len() {
                let mut bad = text.clone();
                bad[at] = [b'1', b'A', b'=', 0xff, b'8'][(next() % 5) as usize];
                assert_eq!(base32_decode(&bad), None, "len {len} at {at}");
                let mut other = text.clone();
                other[at] = B32[(next() % 32) as usize];
                assert_eq!(base32_decode(&other), reference_decode(&other));
            }
        }
        // a length no byte count spells (1, 3, 6 characters)
        for n in [1, 3, 6, 9] {
            assert_eq!(base32_decode(&vec![b'a'; n]), None);
        }
        let mut short = [0u8; 4];
        assert_eq!(base32_decode_into(b"aaaaaaaa", &mut short), None);
    }

    #[test]
    fn binary_round_trip() {
        let cid = Cid::for_dag_cbor(b"hello");
        assert_eq!(Cid::from_bytes(&cid.to_bytes()).unwrap(), cid);
        assert!(cid.matches(b"hello"));
        assert!(!cid.matches(b"hellp"));
        for n in 0..CID_LEN {
            assert!(Cid::from_bytes(&cid.to_bytes()[..n]).is_err());
        }
    }
}
