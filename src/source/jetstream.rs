//! Jetstream over WebSocket: `/subscribe?wantedCollections=…&wantedDids=…&compress=true&cursor=…`.
//!
//! - `compress=true` gets one zstd frame per event with the v1 dictionary shipped in the crate.
//! - On (re)connect the cursor is the last delivered `time_us` minus `rewind`; the pipeline
//!   deduplicates the replayed overlap on (did, rev, collection, rkey, operation).
//! - Filters changed at run time are sent as an `options_update` message.
//! - Reconnects with exponential backoff and jitter; a read timeout reconnects.

use super::firehose::{SourceError, WsSettings, deliver, oversized, stopped};
use super::ws::{WsEvent, connect, next_event};
use super::{Backoff, Filters, Payload, RawMessage, jetstream_url, peek_time_us};
use crate::decode::jetstream::ZstdCodec;
use crate::model::{ErrorEvent, ErrorReason};
use futures::SinkExt;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

/// Largest Jetstream event accepted after decompression.
pub const MAX_EVENT_BYTES: usize = 5_000_000;

/// The Jetstream source.
#[derive(Debug, Clone)]
pub struct JetstreamSource {
    /// Connection settings.
    pub settings: WsSettings,
    /// Resume at this `time_us` (`None`: live tip). The rewind is subtracted on connect.
    pub cursor: Option<i64>,
    /// Rewind on reconnect, µs.
    pub rewind_us: i64,
    /// Ask for zstd.
    pub compress: bool,
}

fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' | b'*' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The subscribe URL for these settings.
pub fn subscribe_url(base: &str, filters: &Filters, compress: bool, cursor: Option<i64>) -> String {
    let mut params: Vec<String> = Vec::new();
    for c in &filters.collections {
        params.push(format!("wantedCollections={}", query_escape(c)));
    }
    for d in &filters.dids {
        params.push(format!("wantedDids={}", query_escape(d)));
    }
    if compress {
        params.push("compress=true".into());
    }
    if let Some(c) = cursor {
        params.push(format!("cursor={c}"));
    }
    if params.is_empty() {
        jetstream_url(base)
    } else {
        format!("{}?{}", jetstream_url(base), params.join("&"))
    }
}

/// The `options_update` message for these filters.
pub fn options_update(filters: &Filters) -> String {
    serde_json::json!({
        "type": "options_update",
        "payload": {
            "wantedCollections": filters.collections,
            "wantedDids": filters.dids,
        }
    })
    .to_string()
}

impl JetstreamSource {
    /// Runs until shutdown (or a fatal error), delivering lines into `tx`.
    pub async fn run(
        self,
        tx: mpsc::Sender<RawMessage>,
        mut filters: watch::Receiver<Filters>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SourceError> {
        let s = &self.settings;
        let mut last = self.cursor;
        let mut backoff = Backoff::new(s.backoff_initial, s.backoff_max);
        let mut zstd = ZstdCodec::new().map_err(|e| SourceError::Fatal {
            url: s.url.clone(),
            message: e.to_string(),
        })?;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let current = filters.borrow_and_update().clone();
            let cursor = last.map(|c| c.saturating_sub(self.rewind_us).max(0));
            let url = subscribe_url(&s.url, &current, self.compress, cursor);
            tracing::info!(%url, "connecting to Jetstream");
            let mut ws = match connect(&url, s.max_message, s.read_timeout).await {
                Ok(ws) => ws,
                Err(e) if e.fatal => {
                    return Err(SourceError::Fatal {
                        url,
                        message: e.message,
                    });
                }
                Err(e) => {
                    metrics::counter!("atlake_reconnects_total", "source" => "jetstream", "reason" => "connect").increment(1);
                    let delay = e.retry_after.unwrap_or_else(|| backoff.next_delay());
                    tracing::warn!(error = %e.message, ?delay, "Jetstream connect failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = stopped(&mut shutdown) => return Ok(()),
                    }
                }
            };
            let mut ping = tokio::time::interval(s.ping_interval);
            ping.tick().await;
            let mut received = 0u64;
            let reason: &'static str = loop {
                let ev = tokio::select! {
                    ev = next_event(&mut ws, s.read_timeout, &mut ping) => ev,
                    changed = filters.changed() => {
                        if changed.is_ok() {
                            let f = filters.borrow_and_update().clone();
                            tracing::info!(collections = ?f.collections, dids = f.dids.len(), "sending options_update");
                            metrics::counter!("atlake_options_updates_total").increment(1);
                            if ws.send(Message::Text(options_update(&f).into())).await.is_err() {
                                break "error";
                            }
                        }
                        continue;
                    }
                    _ = stopped(&mut shutdown) => {
                        let _ = ws.close(None).await;
                        return Ok(());
                    }
                };
                let (data, compressed) = match ev {
                    WsEvent::Binary(b) => (b, true),
                    WsEvent::Text(t) => (t, false),
                    WsEvent::Timeout => {
                        tracing::warn!(timeout = ?s.read_timeout, "Jetstream read timeout; reconnecting");
                        break "timeout";
                    }
                    WsEvent::Closed(why) => {
                        tracing::info!(%why, "Jetstream closed the connection");
                        break "closed";
                    }
                    WsEvent::Error(e) => {
                        tracing::warn!(error = %e, "Jetstream connection error");
                        break "error";
                    }
                };
                received += 1;
                if received == 1 {
                    backoff.reset();
                }
                metrics::counter!("atlake_bytes_in_total", "source" => "jetstream")
                    .increment(data.len() as u64);
                metrics::counter!("atlake_messages_total", "source" => "jetstream").increment(1);
                let line = if compressed {
                    match zstd.decompress(&data) {
                        Ok(l) => bytes::Bytes::copy_from_slice(l),
                        Err(e) => {
                            metrics::counter!("atlake_decode_errors_total", "reason" => "zstd")
                                .increment(1);
                            let msg = RawMessage {
                                payload: Payload::Undecodable(ErrorEvent::new(
                                    ErrorReason::Zstd,
                                    e.to_string(),
                                    &data,
                                )),
                                cursor: last,
                            };
                            if !deliver(&tx, msg, &mut shutdown).await {
                                return Ok(());
                            }
                            continue;
                        }
                    }
                } else {
                    data
                };
                if line.len() > MAX_EVENT_BYTES {
                    if !deliver(&tx, oversized(&line, last, MAX_EVENT_BYTES), &mut shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
                let t = peek_time_us(&line);
                let msg = RawMessage {
                    payload: Payload::Line(line),
                    cursor: t.or(last),
                };
                if !deliver(&tx, msg, &mut shutdown).await {
                    return Ok(());
                }
                if let Some(t) = t {
                    last = Some(last.map_or(t, |l| l.max(t)));
                }
            };
            metrics::counter!("atlake_reconnects_total", "source" => "jetstream", "reason" => reason).increment(1);
            let _ = ws.close(None).await;
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut shutdown) => return Ok(()),
            }
        }
    }
}
