//! Capture files: what a firehose or Jetstream connection delivered, saved to disk.
//!
//! Formats, detected from the first bytes (after decompression):
//! - concatenated raw frames, a CBOR sequence of header+body pairs (`websocat --binary`);
//! - length-prefixed records `[u32 little-endian length][frame]`;
//! - Jetstream NDJSON, one event per line;
//! - any of these compressed with zstd or gzip.
//!
//! The reader streams: it holds at most one message (≤ [`MAX_CAPTURE_MESSAGE`]) plus a read
//! buffer, whatever the file size.

use crate::decode::cbor::{MAX_DEPTH, Reader};
use crate::decode::frame::parse_header;
use bytes::{Bytes, BytesMut};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

/// Largest message a capture may hold.
pub const MAX_CAPTURE_MESSAGE: usize = 16 << 20;

/// The layout of messages in a capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureFormat {
    /// Concatenated raw firehose frames.
    Frames,
    /// `[u32 LE length][frame]` records.
    LengthPrefixed,
    /// Jetstream JSON lines.
    JetstreamJson,
}

impl CaptureFormat {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureFormat::Frames => "frames",
            CaptureFormat::LengthPrefixed => "length-prefixed",
            CaptureFormat::JetstreamJson => "jetstream-ndjson",
        }
    }
}

/// Compression wrapped around a capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain.
    None,
    /// zstd (magic `28 B5 2F FD`).
    Zstd,
    /// gzip (magic `1F 8B`).
    Gzip,
}

/// Why a capture could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// the file
        path: String,
        /// the OS error
        source: io::Error,
    },
    /// The bytes are none of the known formats.
    #[error(
        "unrecognised capture format (expected firehose frames, length-prefixed frames or Jetstream NDJSON, optionally zstd/gzip)"
    )]
    UnknownFormat,
    /// A message is malformed in a way that loses the framing; reading stops here.
    #[error("capture corrupt at byte {offset}: {detail}")]
    Corrupt {
        /// decompressed byte offset
        offset: u64,
        /// what is wrong
        detail: String,
    },
    /// A message is larger than [`MAX_CAPTURE_MESSAGE`].
    #[error("message at byte {offset} is larger than {MAX_CAPTURE_MESSAGE} bytes")]
    TooLarge {
        /// decompressed byte offset
        offset: u64,
    },
}

/// One message of a capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// A firehose frame.
    Frame(&'a [u8]),
    /// A Jetstream JSON line (without the newline).
    Line(&'a [u8]),
}

/// One message of a capture, owned: a view of the reader's buffer, not a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedMessage {
    /// A firehose frame.
    Frame(Bytes),
    /// A Jetstream JSON line (without the newline).
    Line(Bytes),
}

/// The read buffer's size: the reader reads into it and hands out views of it
/// ([`CaptureReader::next_owned`]), so a buffer lives until its last message is dropped, and a
/// new one is taken when it is used up. Under the mmap threshold the binary sets (256 KiB), so
/// a buffer comes from the heap and goes back to it, not from fresh zeroed pages.
const CHUNK: usize = 192 << 10;

/// Streams the messages of a capture.
pub struct CaptureReader {
    inner: Box<dyn Read + Send>,
    name: String,
    /// Detected message layout.
    pub format: CaptureFormat,
    /// Detected compression.
    pub compression: Compression,
    /// `[start, end)` is read and not yet handed out; `[end, len)` is room to read into.
    buf: BytesMut,
    start: usize,
    end: usize,
    eof: bool,
    /// Decompressed bytes consumed so far.
    pub offset: u64,
}

impl std::fmt::Debug for CaptureReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureReader")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("compression", &self.compression)
            .finish()
    }
}

fn detect_compression(head: &[u8]) -> Compression {
    if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        Compression::Zstd
    } else if head.starts_with(&[0x1F, 0x8B]) {
        Compression::Gzip
    } else {
        Compression::None
    }
}

fn is_header_at(head: &[u8]) -> bool {
    parse_header(head).is_ok_and(|(h, _)| h.op == 1 || h.op == -1)
}

/// Guesses the message layout from the first bytes of a decompressed capture.
///
/// Frames first: a CBOR header is never text, but a length prefix can be (a first frame of
/// 123 bytes, or 379, starts with `{`), so the strict checks go before the JSON one.
pub fn detect_format(head: &[u8]) -> Option<CaptureFormat> {
    if is_header_at(head) {
        return Some(CaptureFormat::Frames);
    }
    if head.len() > 4 && is_header_at(&head[4..]) {
        return Some(CaptureFormat::LengthPrefixed);
    }
    let first = head.iter().position(|c| !c.is_ascii_whitespace())?;
    if head[first] == b'{' {
        return Some(CaptureFormat::JetstreamJson);
    }
    None
}

impl CaptureReader {
    /// Opens a capture file and detects its compression and format.
    pub fn open(path: &Path) -> Result<Self, CaptureError> {
        let name = path.display().to_string();
        let f = File::open(path).map_err(|source| CaptureError::Io {
            path: name.clone(),
            source,
        })?;
        // unbuffered: the reader buffers itself (and the decompressors buffer their input)
        Self::from_reader(f, &name)
    }

    /// Detects compression and format of any byte stream.
    pub fn from_reader(
        mut r: impl Read + Send + 'static,
        name: &str,
    ) -> Result<Self, CaptureError> {
        let io = |source| CaptureError::Io {
            path: name.to_string(),
            source,
        };
        let mut head = vec![0u8; 4];
        let n = read_full(&mut r, &mut head).map_err(io)?;
        head.truncate(n);
        let compression = detect_compression(&head);
        let chained = io::Cursor::new(head).chain(r);
        let inner: Box<dyn Read + Send> = match compression {
            Compression::None => Box::new(chained),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(chained).map_err(io)?),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(chained)),
        };
        let mut reader = CaptureReader {
            inner,
            name: name.to_string(),
            format: CaptureFormat::Frames,
            compression,
            buf: BytesMut::zeroed(CHUNK),
            start: 0,
            end: 0,
            eof: false,
            offset: 0,
        };
        reader.fill(4096).map_err(io)?;
        reader.format =
            detect_format(&reader.buf[..reader.end]).ok_or(CaptureError::UnknownFormat)?;
        Ok(reader)
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Makes at least `want` bytes available unless the stream ends first. The buffer only
    /// grows when one message needs more room than it has, never with the size of the file.
    fn fill(&mut self, want: usize) -> io::Result<()> {
        while self.end - self.start < want && !self.eof {
            let free_tail = self.buf.len() - self.end;
            let held = self.end - self.start;
            if free_tail < (16 << 10) || self.buf.len() - self.start < want {
                if self.start > 0 && self.start >= self.buf.len() / 2 && self.buf.len() >= want {
                    // what was handed out as slices ([`Self::next_message`]) is done with
                    self.buf.copy_within(self.start..self.end, 0);
                } else {
                    // a new buffer: the old one may still be held by messages handed out as
                    // views ([`Self::next_owned`]), which free it when they are dropped
                    let mut fresh = BytesMut::zeroed(CHUNK.max(want + (64 << 10)));
                    fresh[..held].copy_from_slice(&self.buf[self.start..self.end]);
                    self.buf = fresh;
                }
                self.end = held;
                self.start = 0;
            }
            let n = match self.inner.read(&mut self.buf[self.end..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                self.eof = true;
            }
            self.end += n;
        }
        Ok(())
    }

    fn io_err(&self, source: io::Error) -> CaptureError {
        CaptureError::Io {
            path: self.name.clone(),
            source,
        }
    }

    /// The next message, `None` at the end. After an error the reader is finished.
    pub fn next_message(&mut self) -> Option<Result<Message<'_>, CaptureError>> {
        match self.next_range() {
            Ok(None) => None,
            Ok(Some((kind, s, e))) => Some(Ok(match kind {
                CaptureFormat::JetstreamJson => Message::Line(&self.buf[s..e]),
                _ => Message::Frame(&self.buf[s..e]),
            })),
            Err(err) => {
                self.eof = true;
                self.start = self.end;
                Some(Err(err))
            }
        }
    }

    /// The next message as a view of the read buffer (no copy), `None` at the end. After an
    /// error the reader is finished. The view keeps its buffer ([`CHUNK`] bytes, or one
    /// message's size) alive until it is dropped.
    pub fn next_owned(&mut self) -> Option<Result<OwnedMessage, CaptureError>> {
        match self.next_range() {
            Ok(None) => None,
            Ok(Some((kind, s, e))) => {
                // everything before `e` leaves the buffer; the message is its part from `s`
                let mut head = self.buf.split_to(e);
                self.start -= e;
                self.end -= e;
                let msg = head.split_off(s).freeze();
                Some(Ok(match kind {
                    CaptureFormat::JetstreamJson => OwnedMessage::Line(msg),
                    _ => OwnedMessage::Frame(msg),
                }))
            }
            Err(err) => {
                self.eof = true;
                self.start = self.end;
                Some(Err(err))
            }
        }
    }

    fn next_range(&mut self) -> Result<Option<(CaptureFormat, usize, usize)>, CaptureError> {
        match self.format {
            CaptureFormat::JetstreamJson => loop {
                // find a newline; lines may be huge but not beyond the cap
                let mut searched = 0;
                let nl = loop {
                    if let Some(i) = memchr(b'\n', &self.available()[searched..]) {
                        break Some(searched + i);
                    }
                    searched = self.end - self.start;
                    if self.eof {
                        break None;
                    }
                    if searched > MAX_CAPTURE_MESSAGE {
                        return Err(CaptureError::TooLarge {
                            offset: self.offset,
                        });
                    }
                    self.fill(searched + (1 << 16))
                        .map_err(|e| self.io_err(e))?;
                };
                let (len, consumed) = match nl {
                    Some(i) => (i, i + 1),
                    None => {
                        let n = self.end - self.start;
                        if n == 0 {
                            return Ok(None);
                        }
                        (n, n)
                    }
                };
                let s = self.start;
                self.start += consumed;
                self.offset += consumed as u64;
                let mut line = &self.buf[s..s + len];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                if line.iter().all(|c| c.is_ascii_whitespace()) {
                    continue;
                }
                return Ok(Some((CaptureFormat::JetstreamJson, s, s + line.len())));
            },
            CaptureFormat::LengthPrefixed => {
                self.fill(4).map_err(|e| self.io_err(e))?;
                let avail = self.end - self.start;
                if avail == 0 {
                    return Ok(None);
                }
                if avail < 4 {
                    return Err(CaptureError::Corrupt {
                        offset: self.offset,
                        detail: "truncated length prefix".into(),
                    });
                }
                let len = u32::from_le_bytes([
                    self.buf[self.start],
                    self.buf[self.start + 1],
                    self.buf[self.start + 2],
                    self.buf[self.start + 3],
                ]) as usize;
                if len > MAX_CAPTURE_MESSAGE {
                    return Err(CaptureError::TooLarge {
                        offset: self.offset,
                    });
                }
                self.fill(4 + len).map_err(|e| self.io_err(e))?;
                if self.end - self.start < 4 + len {
                    return Err(CaptureError::Corrupt {
                        offset: self.offset,
                        detail: format!("record of {len} bytes is truncated"),
                    });
                }
                let s = self.start + 4;
                self.start += 4 + len;
                self.offset += 4 + len as u64;
                Ok(Some((CaptureFormat::LengthPrefixed, s, s + len)))
            }
            CaptureFormat::Frames => {
                let mut want = 1 << 16;
                loop {
                    self.fill(want).map_err(|e| self.io_err(e))?;
                    let avail = self.available();
                    if avail.is_empty() {
                        return Ok(None);
                    }
                    let mut r = Reader::new(avail);
                    let res = r.skip(MAX_DEPTH).and_then(|_| r.skip(MAX_DEPTH));
                    match res {
                        Ok(()) => {
                            let n = r.position();
                            let s = self.start;
                            self.start += n;
                            self.offset += n as u64;
                            return Ok(Some((CaptureFormat::Frames, s, s + n)));
                        }
                        Err(crate::decode::cbor::CborError::Eof(_)) if !self.eof => {
                            if avail.len() >= MAX_CAPTURE_MESSAGE {
                                return Err(CaptureError::TooLarge {
                                    offset: self.offset,
                                });
                            }
                            want = avail.len() * 2;
                        }
                        Err(e) => {
                            return Err(CaptureError::Corrupt {
                                offset: self.offset,
                                detail: e.to_string(),
                            });
                        }
                    }
                }
            }
        }
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    ::memchr::memchr(needle, hay)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes captures in any of the formats (used by the simulator and tests).
pub struct CaptureWriter {
    out: Box<dyn Write + Send>,
    format: CaptureFormat,
}

impl std::fmt::Debug for CaptureWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureWriter")
            .field("format", &self.format)
            .finish()
    }
}

impl CaptureWriter {
    /// Creates `path`, compressing as asked.
    pub fn create(
        path: &Path,
        format: CaptureFormat,
        compression: Compression,
    ) -> io::Result<Self> {
        let f = io::BufWriter::with_capacity(1 << 20, File::create(path)?);
        let out: Box<dyn Write + Send> = match compression {
            Compression::None => Box::new(f),
            Compression::Zstd => Box::new(zstd::stream::write::Encoder::new(f, 3)?.auto_finish()),
            Compression::Gzip => Box::new(flate2::write::GzEncoder::new(
                f,
                flate2::Compression::fast(),
            )),
        };
        Ok(CaptureWriter { out, format })
    }

    /// Appends one message (a frame, or a JSON line without newline).
    pub fn write(&mut self, msg: &[u8]) -> io::Result<()> {
        match self.format {
            CaptureFormat::Frames => self.out.write_all(msg),
            CaptureFormat::LengthPrefixed => {
                let len = u32::try_from(msg.len()).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "message too large")
                })?;
                self.out.write_all(&len.to_le_bytes())?;
                self.out.write_all(msg)
            }
            CaptureFormat::JetstreamJson => {
                self.out.write_all(msg)?;
                self.out.write_all(b"\n")
            }
        }
    }

    /// Flushes and closes.
    pub fn finish(mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame the format detection takes: header `{op: 1, t: "#commit"}`, then a body
    /// `{x: <n bytes>}` whose bytes say which message it is.
    fn frame(i: usize, n: usize) -> Vec<u8> {
        let mut f = vec![0xa2, 0x62, b'o', b'p', 0x01, 0x61, b't', 0x67];
        f.extend_from_slice(b"#commit");
        f.extend_from_slice(&[0xa1, 0x61, b'x', 0x5a]);
        f.extend_from_slice(&(n as u32).to_be_bytes());
        f.extend((0..n).map(|k| (i * 31 + k) as u8));
        f
    }

    fn line(i: usize, n: usize) -> Vec<u8> {
        let mut l = format!("{{\"i\":{i},\"pad\":\"").into_bytes();
        l.extend((0..n).map(|k| b'a' + ((i + k) % 26) as u8));
        l.extend_from_slice(b"\"}");
        l
    }

    /// Sizes around the buffer's: small, a chunk's worth, several chunks. The first frame is
    /// 123 bytes long, so a length-prefixed capture starts with `{`.
    fn sizes() -> Vec<usize> {
        let mut v = Vec::new();
        for i in 0..400 {
            v.push(match i % 50 {
                7 => CHUNK - 100,
                19 => CHUNK + 5_000,
                33 => 3 * CHUNK + 17,
                _ => 100 + (i * 977) % 9_000,
            });
        }
        v
    }

    fn write(path: &Path, format: CaptureFormat, compression: Compression, msgs: &[Vec<u8>]) {
        let mut w = CaptureWriter::create(path, format, compression).unwrap();
        for m in msgs {
            w.write(m).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn owned_messages_are_the_messages_and_stay_intact_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = sizes();
        for format in [
            CaptureFormat::Frames,
            CaptureFormat::LengthPrefixed,
            CaptureFormat::JetstreamJson,
        ] {
            let msgs: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| match format {
                    CaptureFormat::JetstreamJson => line(i, n),
                    _ => frame(i, n),
                })
                .collect();
            for compression in [Compression::None, Compression::Zstd, Compression::Gzip] {
                let path = dir.path().join(format!("{format:?}-{compression:?}"));
                write(&path, format, compression, &msgs);
                // every view kept until the end: none may be overwritten by later reads
                let mut r = CaptureReader::open(&path).unwrap();
                assert_eq!((r.format, r.compression), (format, compression));
                let mut held = Vec::new();
                while let Some(m) = r.next_owned() {
                    held.push(match (m.unwrap(), format) {
                        (OwnedMessage::Line(l), CaptureFormat::JetstreamJson) => l,
                        (OwnedMessage::Frame(f), CaptureFormat::Frames)
                        | (OwnedMessage::Frame(f), CaptureFormat::LengthPrefixed) => f,
                        (m, _) => panic!("{format:?}: {m:?}"),
                    });
                }
                assert_eq!(held.len(), msgs.len(), "{format:?} {compression:?}");
                for (i, (h, m)) in held.iter().zip(&msgs).enumerate() {
                    assert!(
                        h[..] == m[..],
                        "{format:?} {compression:?}: message {i} differs"
                    );
                }
                // the borrowed reading gives the same messages
                let mut r = CaptureReader::open(&path).unwrap();
                let mut i = 0;
                while let Some(m) = r.next_message() {
                    let (Message::Frame(b) | Message::Line(b)) = m.unwrap();
                    assert!(b == &msgs[i][..], "{format:?} {compression:?}: slice {i}");
                    i += 1;
                }
                assert_eq!(i, msgs.len());
            }
        }
    }

    #[test]
    fn owned_lines_skip_blank_lines_and_lose_their_carriage_return() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crlf.jsonl");
        std::fs::write(&path, b"{\"a\":1}\r\n\n   \n{\"b\":2}\n{\"c\":3}").unwrap();
        let mut r = CaptureReader::open(&path).unwrap();
        let mut got = Vec::new();
        while let Some(m) = r.next_owned() {
            let OwnedMessage::Line(l) = m.unwrap() else {
                panic!("not a line")
            };
            got.push(l);
        }
        assert_eq!(got, [&b"{\"a\":1}"[..], b"{\"b\":2}", b"{\"c\":3}"]);
    }

    #[test]
    fn a_truncated_record_is_an_error_after_the_whole_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.lp");
        let msgs: Vec<Vec<u8>> = (0..5).map(|i| frame(i, 1_000 + i * 70_000)).collect();
        write(
            &path,
            CaptureFormat::LengthPrefixed,
            Compression::None,
            &msgs,
        );
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let mut r = CaptureReader::open(&path).unwrap();
        for m in &msgs[..4] {
            let Some(Ok(OwnedMessage::Frame(f))) = r.next_owned() else {
                panic!("a whole record is missing")
            };
            assert!(f[..] == m[..]);
        }
        assert!(matches!(
            r.next_owned(),
            Some(Err(CaptureError::Corrupt { .. }))
        ));
        assert!(r.next_owned().is_none());
    }
}
