//! Jetstream over WebSocket: `/subscribe?wantedCollections=…&wantedDids=…&compress=true&cursor=…`.
//!
//! - `compress=true` gets one zstd frame per event with the v1 dictionary shipped in the crate.
//! - Cursors: a `time_us` is only a cursor when the [`TimeWindow`] accepts it (a line from the
//!   year 10000 is delivered without one; the pipeline quarantines it and the position stays).
//! - The first connection starts `rewind` before the lake's cursor: `time_us` is each
//!   instance's own clock, and the cursor may come from another instance or another run.
//! - A reconnect after a dropped connection resumes at the newest `time_us` that connection
//!   delivered (an instance's `time_us` is strictly increasing in the order it sends them), so
//!   every reconnect that followed new events starts later than the one before, however often
//!   the connection drops. Replay includes the cursor's instant; the pipeline deduplicates the
//!   overlap on (did, rev, collection, rkey, operation).
//! - Filters changed at run time are sent as an `options_update` message.
//! - Reconnects with exponential backoff and jitter; a read timeout reconnects.

use super::ws::{
    Ws, WsEvent, after_disconnect, connect_or_wait, deliver, end_reason, next_event, ping_timer,
    stopped,
};
use super::{Payload, RawMessage, SourceError, WsSettings, oversized, peek_time_us};
use crate::decode::jetstream::ZstdCodec;
use crate::model::{Cursor, Filters, TimeWindow};
use crate::model::{ErrorEvent, ErrorReason};
use crate::syntax::jetstream_url;
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
    /// Where to start (`None`: live tip): the checkpoint of the lake, or the configured start.
    pub cursor: Option<Cursor>,
    /// How far before `cursor` the first connection starts, µs (see the module docs).
    pub rewind_us: u64,
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
pub fn subscribe_url(
    base: &str,
    filters: &Filters,
    compress: bool,
    cursor: Option<Cursor>,
) -> String {
    let mut params: Vec<String> = Vec::new();
    for c in filters.collections() {
        params.push(format!("wantedCollections={}", query_escape(c)));
    }
    for d in filters.dids() {
        params.push(format!("wantedDids={}", query_escape(d)));
    }
    if compress {
        params.push("compress=true".into());
    }
    if let Some(c) = cursor {
        params.push(format!("cursor={}", c.value()));
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
            "wantedCollections": filters.collections(),
            "wantedDids": filters.dids().iter().map(|d| d.as_str()).collect::<Vec<_>>(),
        }
    })
    .to_string()
}

/// How one connection ended.
enum Ended {
    /// Reconnect (the reason is a metric label).
    Reconnect(&'static str),
    /// Shutdown, or the pipeline is gone.
    Stop,
}

/// The cursor of a line: its `time_us`, when the [`TimeWindow`] accepts it as a stream time.
pub fn line_cursor(line: &[u8], window: TimeWindow) -> Option<Cursor> {
    peek_time_us(line)
        .filter(|&t| window.contains(t))
        .and_then(|t| Cursor::time_us(t).ok())
}

/// Where the next connection starts: after a connection that delivered newer events, at the
/// newest `time_us` it delivered (replay includes that instant; the pipeline drops the repeats);
/// otherwise where the previous connection started. Never before the previous start.
pub fn next_start(previous: Option<Cursor>, newest_delivered: Option<Cursor>) -> Option<Cursor> {
    match (previous, newest_delivered) {
        (Some(p), Some(n)) => Some(p.max(n)),
        (p, n) => p.or(n),
    }
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
        // the rewind is for the first connection only: the lake's cursor may come from another
        // instance (or another run), whose clock differs by seconds
        let mut start = self.cursor.map(|c| c.back_by(self.rewind_us));
        let mut backoff = s.backoff();
        let mut zstd = ZstdCodec::try_new().map_err(|e| SourceError::Fatal {
            url: s.url.clone(),
            message: e.to_string(),
        })?;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let current = filters.borrow_and_update().clone();
            let url = subscribe_url(&s.url, &current, self.compress, start);
            tracing::info!(%url, "connecting to Jetstream");
            let Some(mut ws) =
                connect_or_wait(&url, s, &mut backoff, &mut shutdown, "jetstream").await?
            else {
                continue;
            };
            let mut conn = Connection {
                settings: s,
                zstd: &mut zstd,
                newest: None,
                received: 0,
                previous: start,
            };
            let ended = conn.read(&mut ws, &tx, &mut filters, &mut shutdown).await;
            start = next_start(start, conn.newest);
            if conn.received > 0 {
                backoff.reset();
            }
            match ended {
                Ended::Stop => {
                    let _ = ws.close(None).await;
                    return Ok(());
                }
                Ended::Reconnect(reason) => {
                    after_disconnect(ws, reason, "jetstream", &mut backoff, &mut shutdown).await
                }
            }
        }
    }
}

/// One connection's reading state.
struct Connection<'a> {
    settings: &'a WsSettings,
    zstd: &'a mut ZstdCodec,
    /// Newest valid `time_us` delivered on this connection.
    newest: Option<Cursor>,
    received: u64,
    /// Where this connection started (the cursor of messages without a valid time of their own
    /// until one arrives).
    previous: Option<Cursor>,
}

impl Connection<'_> {
    async fn read(
        &mut self,
        ws: &mut Ws,
        tx: &mpsc::Sender<RawMessage>,
        filters: &mut watch::Receiver<Filters>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Ended {
        let s = self.settings;
        let mut ping = ping_timer(s.ping_interval).await;
        loop {
            let ev = tokio::select! {
                ev = next_event(ws, s.read_timeout, &mut ping) => ev,
                changed = filters.changed() => {
                    if changed.is_ok() {
                        let f = filters.borrow_and_update().clone();
                        tracing::info!(collections = ?f.collections(), dids = f.dids().len(), "sending options_update");
                        metrics::counter!("atlake_options_updates_total").increment(1);
                        if ws.send(Message::Text(options_update(&f).into())).await.is_err() {
                            return Ended::Reconnect("error");
                        }
                    }
                    continue;
                }
                _ = stopped(shutdown) => return Ended::Stop,
            };
            let (data, compressed) = match ev {
                WsEvent::Binary(b) => (b, true),
                WsEvent::Text(t) => (t, false),
                other => {
                    return Ended::Reconnect(end_reason(&other, "jetstream", s.read_timeout));
                }
            };
            self.received += 1;
            metrics::counter!("atlake_bytes_in_total", "source" => "jetstream")
                .increment(data.len() as u64);
            metrics::counter!("atlake_messages_total", "source" => "jetstream").increment(1);
            let msg = self.message(data, compressed);
            if !deliver(tx, msg, shutdown).await {
                return Ended::Stop;
            }
        }
    }

    /// The message for one WebSocket message: a line with its cursor, or what to quarantine.
    fn message(&mut self, data: bytes::Bytes, compressed: bool) -> RawMessage {
        let here = self.newest.or(self.previous);
        let line = if compressed {
            match self.zstd.decompress(&data) {
                Ok(l) => bytes::Bytes::copy_from_slice(l),
                Err(e) => {
                    metrics::counter!("atlake_decode_errors_total", "reason" => "zstd")
                        .increment(1);
                    return RawMessage {
                        payload: Payload::Undecodable(ErrorEvent::new(
                            ErrorReason::Zstd,
                            e.to_string(),
                            &data,
                        )),
                        cursor: here,
                    };
                }
            }
        } else {
            data
        };
        if line.len() > MAX_EVENT_BYTES {
            return oversized(&line, here, MAX_EVENT_BYTES);
        }
        let t = line_cursor(&line, TimeWindow::now());
        if let Some(t) = t {
            self.newest = Some(self.newest.map_or(t, |n| n.max(t)));
        }
        RawMessage {
            payload: Payload::Line(line),
            cursor: t.or(here),
        }
    }
}
