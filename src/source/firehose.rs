//! The relay firehose over WebSocket: `…/xrpc/com.atproto.sync.subscribeRepos?cursor=N`.
//!
//! - Reconnects with exponential backoff and jitter, resuming after the last seq it delivered.
//! - Frames with a seq at or below the last one delivered are dropped as duplicates (replay
//!   overlap: the spec says replay starts at `≥ cursor`, relays start at `> cursor`).
//! - Error frames: `FutureCursor` (our cursor is ahead of the relay, e.g. after a relay reset)
//!   drops the cursor and reconnects at the live tip, forgetting the old seq space;
//!   `ConsumerTooSlow` reconnects from the last seq. `#info OutdatedCursor` (the cursor fell out
//!   of the replay window; events were missed) is logged and counted, and the stream goes on.
//! - Messages over the protocol's 5 MB limit are quarantined as `oversized`, not decoded.
//! - A read timeout (nothing, not even a ping, for `read_timeout`) reconnects.

use super::ws::{WsEvent, connect, next_event};
use super::{Backoff, Payload, RawMessage, firehose_url};
use crate::decode::frame::{parse_error, parse_header, parse_info, peek_seq};
use crate::model::{ErrorEvent, ErrorReason};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The protocol's limit for a whole message.
pub const MAX_FRAME_BYTES: usize = 5_000_000;

/// Why the source stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The endpoint refuses us in a way retrying will not fix.
    #[error("{url}: {message}")]
    Fatal {
        /// endpoint
        url: String,
        /// why
        message: String,
    },
}

/// Settings of a WebSocket source.
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// Endpoint (bare host or full URL).
    pub url: String,
    /// Reconnect when nothing arrives for this long.
    pub read_timeout: Duration,
    /// Ping interval.
    pub ping_interval: Duration,
    /// Largest message accepted by the WebSocket layer.
    pub max_message: usize,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

impl WsSettings {
    /// From the `[source]` section.
    pub fn from_config(c: &crate::config::SourceConfig) -> Self {
        WsSettings {
            url: c.url.clone(),
            read_timeout: c.read_timeout.0,
            ping_interval: c.ping_interval.0,
            max_message: c.max_message_size.0.try_into().unwrap_or(usize::MAX),
            backoff_initial: c.backoff_initial.0,
            backoff_max: c.backoff_max.0,
        }
    }
}

/// The firehose source.
#[derive(Debug, Clone)]
pub struct FirehoseSource {
    /// Connection settings.
    pub settings: WsSettings,
    /// Resume after this seq (`None`: live tip).
    pub cursor: Option<i64>,
}

/// Sends unless shutdown comes first; `false` when the pipeline is gone or shutting down.
pub(crate) async fn deliver(
    tx: &mpsc::Sender<RawMessage>,
    msg: RawMessage,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        r = tx.send(msg) => r.is_ok(),
        _ = stopped(shutdown) => false,
    }
}

pub(crate) fn oversized(frame: &[u8], cursor: Option<i64>, limit: usize) -> RawMessage {
    let mut e = ErrorEvent::new(
        ErrorReason::Oversized,
        format!(
            "message of {} bytes exceeds the {limit}-byte limit",
            frame.len()
        ),
        &frame[..frame.len().min(64 * 1024)],
    );
    e.seq = cursor;
    metrics::counter!("atlake_decode_errors_total", "reason" => "oversized").increment(1);
    RawMessage {
        payload: Payload::Undecodable(e),
        cursor,
    }
}

impl FirehoseSource {
    /// Runs until shutdown (or a fatal error), delivering frames into `tx`.
    pub async fn run(
        self,
        tx: mpsc::Sender<RawMessage>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SourceError> {
        let base = firehose_url(&self.settings.url);
        let mut last_seq = self.cursor;
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        let s = &self.settings;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let url = match last_seq {
                Some(c) => format!("{base}?cursor={c}"),
                None => base.clone(),
            };
            tracing::info!(%url, "connecting to firehose");
            let mut ws = match connect(&url, s.max_message, s.read_timeout).await {
                Ok(ws) => ws,
                Err(e) if e.fatal => {
                    return Err(SourceError::Fatal {
                        url,
                        message: e.message,
                    });
                }
                Err(e) => {
                    metrics::counter!("atlake_reconnects_total", "source" => "firehose", "reason" => "connect").increment(1);
                    let delay = e.retry_after.unwrap_or_else(|| backoff.next_delay());
                    tracing::warn!(error = %e.message, ?delay, "firehose connect failed; retrying");
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
                    _ = stopped(&mut shutdown) => {
                        let _ = ws.close(None).await;
                        return Ok(());
                    }
                };
                let frame = match ev {
                    WsEvent::Binary(b) => b,
                    WsEvent::Text(_) => {
                        metrics::counter!("atlake_decode_errors_total", "reason" => "text_frame")
                            .increment(1);
                        continue;
                    }
                    WsEvent::Timeout => {
                        tracing::warn!(timeout = ?s.read_timeout, "firehose read timeout; reconnecting");
                        break "timeout";
                    }
                    WsEvent::Closed(why) => {
                        tracing::info!(%why, "firehose closed the connection");
                        break "closed";
                    }
                    WsEvent::Error(e) => {
                        tracing::warn!(error = %e, "firehose connection error");
                        break "error";
                    }
                };
                received += 1;
                if received == 1 {
                    backoff.reset();
                }
                metrics::counter!("atlake_bytes_in_total", "source" => "firehose")
                    .increment(frame.len() as u64);
                metrics::counter!("atlake_messages_total", "source" => "firehose").increment(1);
                if frame.len() > MAX_FRAME_BYTES {
                    let seq = peek_seq(&frame);
                    if !deliver(
                        &tx,
                        oversized(&frame, seq.or(last_seq), MAX_FRAME_BYTES),
                        &mut shutdown,
                    )
                    .await
                    {
                        return Ok(());
                    }
                    if let Some(seq) = seq {
                        last_seq = Some(last_seq.map_or(seq, |l| l.max(seq)));
                    }
                    continue;
                }
                if let Ok((h, at)) = parse_header(&frame) {
                    if h.op == -1 {
                        let body = parse_error(&frame[at..]).ok();
                        let name = body.as_ref().map_or("unknown", |b| b.error);
                        let message = body.as_ref().and_then(|b| b.message).unwrap_or("");
                        metrics::counter!("atlake_stream_errors_total", "error" => name.to_string()).increment(1);
                        match name {
                            "FutureCursor" => {
                                tracing::error!(cursor = ?last_seq, %message, "relay says our cursor is in the future (relay reset?); resuming at the live tip");
                                last_seq = None;
                                break "future_cursor";
                            }
                            "ConsumerTooSlow" => {
                                tracing::warn!(%message, "relay dropped us as too slow; resuming from our cursor");
                                break "consumer_too_slow";
                            }
                            _ => {
                                tracing::warn!(error = name, %message, "error frame from relay");
                                break "error_frame";
                            }
                        }
                    }
                    if h.t == Some("#info") {
                        let info = parse_info(&frame[at..]).ok();
                        let name = info.as_ref().map_or("unknown", |i| i.name);
                        metrics::counter!("atlake_info_total", "name" => name.to_string())
                            .increment(1);
                        if name == "OutdatedCursor" {
                            tracing::warn!(cursor = ?last_seq, "cursor is older than the relay's replay window; events before the window were missed");
                        } else {
                            tracing::info!(name, "info message from relay");
                        }
                        continue;
                    }
                }
                let seq = peek_seq(&frame);
                if let (Some(s), Some(l)) = (seq, last_seq)
                    && s <= l
                {
                    metrics::counter!("atlake_duplicates_total", "reason" => "seq").increment(1);
                    continue;
                }
                let msg = RawMessage {
                    payload: Payload::Frame(frame),
                    cursor: seq.or(last_seq),
                };
                if !deliver(&tx, msg, &mut shutdown).await {
                    return Ok(());
                }
                if seq.is_some() {
                    last_seq = seq;
                }
            };
            metrics::counter!("atlake_reconnects_total", "source" => "firehose", "reason" => reason).increment(1);
            let _ = ws.close(None).await;
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut shutdown) => return Ok(()),
            }
        }
    }
}

/// Resolves when shutdown is requested (the watch guard never lives across an await).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
