//! Transport only: where raw messages come from, with their cursors.
//!
//! - [`capture`]: capture files (raw frames, length-prefixed frames, Jetstream NDJSON; zstd/gzip).
//! - [`firehose`]: `subscribeRepos` over WebSocket, with reconnect, resume and error frames.
//! - [`jetstream`]: Jetstream `/subscribe` over WebSocket, with filters, zstd and rewind.
//! - [`file`]: a capture file as a stream of messages that ends.
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
mod ws;

use crate::decode::syntax::{is_did, is_nsid_pattern, nsid_matches};
use crate::model::{Envelope, ErrorEvent, EventData};
use std::time::Duration;

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
    /// Its cursor (firehose seq or Jetstream `time_us`), when it could be read.
    pub cursor: Option<i64>,
}

/// Collection and DID filters, shared by both sources (applied by Jetstream's server and,
/// for the firehose, client-side).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    /// NSIDs or `prefix.*`; empty keeps all.
    pub collections: Vec<String>,
    /// DIDs; empty keeps all.
    pub dids: Vec<String>,
}

impl Filters {
    /// Validated filters.
    pub fn new(collections: Vec<String>, dids: Vec<String>) -> Result<Filters, String> {
        if let Some(c) = collections.iter().find(|c| !is_nsid_pattern(c)) {
            return Err(format!("{c:?} is not an NSID or prefix.* pattern"));
        }
        if let Some(d) = dids.iter().find(|d| !is_did(d)) {
            return Err(format!("{d:?} is not a DID"));
        }
        if collections.len() > 100 {
            return Err("at most 100 collections".into());
        }
        if dids.len() > 10_000 {
            return Err("at most 10,000 DIDs".into());
        }
        Ok(Filters { collections, dids })
    }

    /// Whether an event passes: DIDs filter every kind; collections filter commits only
    /// (identity and account events always pass, as on Jetstream).
    pub fn matches(&self, env: &Envelope) -> bool {
        if !self.dids.is_empty() && !self.dids.contains(&env.event.did) {
            return false;
        }
        match &env.event.data {
            EventData::Commit(c) if !self.collections.is_empty() => self
                .collections
                .iter()
                .any(|p| nsid_matches(p, &c.collection)),
            _ => true,
        }
    }

    /// Whether nothing is filtered.
    pub fn is_empty(&self) -> bool {
        self.collections.is_empty() && self.dids.is_empty()
    }
}

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay: uniform in `[current/2, current]`; then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let c = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = c / 2;
        // jitter only has to decorrelate clients: a clock-seeded SplitMix draw is enough
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let jitter = (crate::simulate::traffic::Rng::new(seed).next_u64() >> 11) as f64
            / (1u64 << 53) as f64;
        half + half.mul_f64(jitter)
    }

    /// Back to the initial delay (after a healthy connection).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// The full `subscribeRepos` URL for a bare host or full URL.
pub fn firehose_url(url: &str) -> String {
    const PATH: &str = "/xrpc/com.atproto.sync.subscribeRepos";
    let u = with_scheme(url);
    let base = u.split('?').next().unwrap_or(&u).trim_end_matches('/');
    if base.ends_with(PATH) {
        base.to_string()
    } else {
        format!("{base}{PATH}")
    }
}

/// The full Jetstream `/subscribe` URL for a bare host or full URL.
pub fn jetstream_url(url: &str) -> String {
    let u = with_scheme(url);
    let base = u.split('?').next().unwrap_or(&u).trim_end_matches('/');
    if base.ends_with("/subscribe") {
        base.to_string()
    } else {
        format!("{base}/subscribe")
    }
}

/// Checks that a source URL (bare host or full URL) is a usable WebSocket URL.
pub fn validate_url(url: &str) -> Result<(), String> {
    if let Some((scheme, _)) = url.trim().split_once("://")
        && !matches!(scheme, "ws" | "wss" | "http" | "https")
    {
        return Err(format!(
            "{url:?}: unsupported scheme {scheme:?} (use wss://, ws://, https:// or a bare host)"
        ));
    }
    let u = with_scheme(url);
    let rest = u
        .strip_prefix("wss://")
        .or_else(|| u.strip_prefix("ws://"))
        .ok_or_else(|| format!("{url:?} is not a ws://, wss://, http(s):// URL or a host name"))?;
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let name = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let ok_host = !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'[' | b']' | b':'));
    if !ok_host
        || u.bytes()
            .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
    {
        return Err(format!(
            "{url:?} is not a valid source URL (expected e.g. wss://bsky.network or wss://jetstream2.us-east.bsky.network/subscribe)"
        ));
    }
    Ok(())
}

fn with_scheme(url: &str) -> String {
    let u = url.trim();
    if u.starts_with("ws://") || u.starts_with("wss://") {
        u.to_string()
    } else if let Some(rest) = u.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = u.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        format!("wss://{u}")
    }
}

/// Peeks the `"time_us":` value of a Jetstream line without parsing it all.
pub fn peek_time_us(line: &[u8]) -> Option<i64> {
    const KEY: &[u8] = b"\"time_us\":";
    let at = memchr::memmem::find(line, KEY)? + KEY.len();
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
    fn urls() {
        assert_eq!(
            firehose_url("wss://bsky.network"),
            "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert_eq!(
            firehose_url("bsky.network"),
            "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert_eq!(
            firehose_url("ws://127.0.0.1:9/xrpc/com.atproto.sync.subscribeRepos?cursor=5"),
            "ws://127.0.0.1:9/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert_eq!(
            jetstream_url("wss://jetstream2.us-east.bsky.network"),
            "wss://jetstream2.us-east.bsky.network/subscribe"
        );
        assert_eq!(
            jetstream_url("wss://j.example/subscribe?x=1"),
            "wss://j.example/subscribe"
        );
    }

    #[test]
    fn url_validation() {
        assert!(validate_url("wss://bsky.network").is_ok());
        assert!(validate_url("bsky.network").is_ok());
        assert!(validate_url("ws://127.0.0.1:6008").is_ok());
        assert!(validate_url("ht!tp://bad url").is_err());
        assert!(validate_url("wss://").is_err());
        assert!(validate_url("ftp://x").is_err());
    }

    #[test]
    fn peek() {
        assert_eq!(
            peek_time_us(br#"{"did":"x","time_us": 1725911162329308,"kind":"commit"}"#),
            Some(1725911162329308)
        );
        assert_eq!(peek_time_us(b"{}"), None);
    }

    #[test]
    fn backoff_grows_and_is_jittered() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[5] >= Duration::from_millis(500) && d[5] <= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
