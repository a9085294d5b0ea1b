//! Transport only: where raw messages come from, with their cursors.
//!
//! - [`capture`]: capture files (raw frames, length-prefixed frames, Jetstream NDJSON; zstd/gzip).
//! - [`firehose`]: `subscribeRepos` over WebSocket, with reconnect, resume and error frames.
//! - [`jetstream`]: Jetstream `/subscribe` over WebSocket, with filters, zstd and rewind.
//! - [`file`]: a capture file as a stream of messages that ends.
//! - [`sync`]: the repository sync endpoints (`listRepos`, DID resolution, `getRepo`) with
//!   per-host limits, 429 and retries.
//! - [`repo_blocks`]: a fetched repository's blocks, in memory up to a cap, then in a spill file.
//!
//! A source yields [`RawMessage`]s into a bounded channel: when the pipeline is slow the send
//! waits, the socket is not read, and TCP pushes back on the server. Nothing is dropped.

pub mod capture;
#[cfg(feature = "lake")]
pub mod file;
#[cfg(feature = "lake")]
pub mod firehose;
#[cfg(feature = "lake")]
pub mod jetstream;
#[cfg(feature = "lake")]
pub mod repo_blocks;
#[cfg(feature = "lake")]
pub mod sync;
#[cfg(feature = "lake")]
mod ws;

#[cfg(feature = "lake")]
pub use ws::{SourceError, WsSettings};

use crate::model::{Cursor, ErrorEvent, ErrorReason};

/// What a message carries.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A `subscribeRepos` frame.
    Frame(bytes::Bytes),
    /// A Jetstream JSON event.
    Line(bytes::Bytes),
    /// Bytes that could not even be unwrapped (bad zstd, oversized): quarantined as they are.
    Undecodable(ErrorEvent),
}

/// One message and where it stands in its stream.
#[derive(Debug, Clone)]
pub struct RawMessage {
    /// The bytes.
    pub payload: Payload,
    /// Where it stands (firehose seq or Jetstream `time_us`): its own cursor when it has a valid
    /// one, else the position of the stream before it; `None` before any position is known.
    pub cursor: Option<Cursor>,
}

/// A message over `limit` bytes, to be quarantined as `oversized` with its first 64 KiB.
pub fn oversized(data: &[u8], cursor: Option<Cursor>, limit: usize) -> RawMessage {
    let mut e = ErrorEvent::new(
        ErrorReason::Oversized,
        format!(
            "message of {} bytes exceeds the {limit}-byte limit",
            data.len()
        ),
        &data[..data.len().min(64 * 1024)],
    );
    if let Some(c) = cursor
        && c.source() == crate::model::SourceKind::Firehose
    {
        e.seq = Some(c.value());
    }
    #[cfg(feature = "lake")]
    metrics::counter!("atlake_decode_errors_total", "reason" => "oversized").increment(1);
    RawMessage {
        payload: Payload::Undecodable(e),
        cursor,
    }
}

/// Peeks the `"time_us":` value of a Jetstream line without parsing it all.
pub fn peek_time_us(line: &[u8]) -> Option<i64> {
    const KEY: &[u8] = b"\"time_us\":";
    // built once: `memmem::find` builds its searcher on every call, once per line here
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(KEY));
    let at = FINDER.find(line)? + KEY.len();
    let rest = &line[at..];
    let rest = &rest[rest.iter().position(|c| !c.is_ascii_whitespace())?..];
    let end = rest
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek() {
        assert_eq!(
            peek_time_us(br#"{"did":"x","time_us": 1725911162329308,"kind":"commit"}"#),
            Some(1725911162329308)
        );
        assert_eq!(peek_time_us(b"{}"), None);
    }
}
