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
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
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

/// Streams the messages of a capture.
pub struct CaptureReader {
    inner: Box<dyn Read + Send>,
    name: String,
    /// Detected message layout.
    pub format: CaptureFormat,
    /// Detected compression.
    pub compression: Compression,
    buf: Vec<u8>,
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
pub fn detect_format(head: &[u8]) -> Option<CaptureFormat> {
    let first = head.iter().position(|c| !c.is_ascii_whitespace())?;
    if head[first] == b'{' {
        return Some(CaptureFormat::JetstreamJson);
    }
    if is_header_at(head) {
        return Some(CaptureFormat::Frames);
    }
    if head.len() > 4 && is_header_at(&head[4..]) {
        return Some(CaptureFormat::LengthPrefixed);
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
        Self::from_reader(BufReader::with_capacity(1 << 20, f), &name)
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
            buf: vec![0u8; 1 << 20],
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
            if self.start > 0 && (free_tail < (1 << 16) || self.start >= self.buf.len() / 2) {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() - self.end < (1 << 12) || self.buf.len() < want {
                let grow = (self.buf.len() * 2).max(want + (1 << 16));
                self.buf.resize(grow, 0);
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
