//! The relay firehose over WebSocket: `…/xrpc/com.atproto.sync.subscribeRepos?cursor=N`.
//!
//! - Reconnects with exponential backoff and jitter, resuming after the last seq it delivered.
//! - Frames with a seq at or below the last one delivered are dropped as duplicates (replay
//!   overlap: the spec says replay starts at `≥ cursor`, relays start at `> cursor`).
//! - A seq that is not a positive integer below 2^53 never becomes a cursor: the frame is
//!   delivered without one (the decoder quarantines it) and the resume position stays.
//! - Error frames: `FutureCursor` (our cursor is ahead of the relay, e.g. after a relay reset)
//!   drops the cursor and reconnects at the live tip, forgetting the old seq space;
//!   `ConsumerTooSlow` reconnects from the last seq. `#info OutdatedCursor` (the cursor fell out
//!   of the replay window; events were missed) is logged and counted, and the stream goes on.
//! - Messages over the protocol's 5 MB limit are quarantined as `oversized`, not decoded.
//! - A read timeout (nothing, not even a ping, for `read_timeout`) reconnects.

use super::ws::{
    Ws, WsEvent, after_disconnect, connect_or_wait, deliver, end_reason, next_event, ping_timer,
    stopped,
};
use super::{Payload, RawMessage, SourceError, WsSettings, oversized};
use crate::decode::frame::{parse_error, parse_header, parse_info, peek_seq};
use crate::model::Cursor;
use crate::syntax::firehose_url;
use tokio::sync::{mpsc, watch};

/// The protocol's limit for a whole message.
pub const MAX_FRAME_BYTES: usize = 5_000_000;

/// The firehose source.
#[derive(Debug, Clone)]
pub struct FirehoseSource {
    /// Connection settings.
    pub settings: WsSettings,
    /// Resume after this seq (`None`: live tip).
    pub cursor: Option<Cursor>,
}

/// What a frame is to the reading loop.
enum Control {
    /// Data: deliver it.
    Data,
    /// Handled here (`#info`).
    Consumed,
    /// The relay ended the connection (reason label).
    End(&'static str),
}

/// How one connection ended.
enum Ended {
    /// Reconnect (the reason is a metric label).
    Reconnect(&'static str),
    /// Shutdown, or the pipeline is gone.
    Stop,
}

/// The cursor of a frame: its seq, when that is a valid relay seq (positive, below 2^53).
pub fn frame_cursor(frame: &[u8]) -> Option<Cursor> {
    peek_seq(frame)
        .filter(|&s| s > 0)
        .and_then(|s| Cursor::seq(s).ok())
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
        let mut backoff = self.settings.backoff();
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let url = match last_seq {
                Some(c) => format!("{base}?cursor={}", c.value()),
                None => base.clone(),
            };
            tracing::info!(%url, "connecting to firehose");
            let Some(mut ws) = connect_or_wait(
                &url,
                &self.settings,
                &mut backoff,
                &mut shutdown,
                "firehose",
            )
            .await?
            else {
                continue;
            };
            let mut conn = Connection {
                settings: &self.settings,
                last_seq: &mut last_seq,
                received: 0,
            };
            match conn.read(&mut ws, &tx, &mut shutdown).await {
                Ended::Stop => {
                    let _ = ws.close(None).await;
                    return Ok(());
                }
                Ended::Reconnect(reason) => {
                    if conn.received > 0 {
                        backoff.reset();
                    }
                    after_disconnect(ws, reason, "firehose", &mut backoff, &mut shutdown).await;
                }
            }
        }
    }
}

/// One connection's reading state.
struct Connection<'a> {
    settings: &'a WsSettings,
    last_seq: &'a mut Option<Cursor>,
    received: u64,
}

impl Connection<'_> {
    /// Reads frames until the connection ends, delivering them.
    async fn read(
        &mut self,
        ws: &mut Ws,
        tx: &mpsc::Sender<RawMessage>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Ended {
        let s = self.settings;
        let mut ping = ping_timer(s.ping_interval).await;
        loop {
            let ev = tokio::select! {
                ev = next_event(ws, s.read_timeout, &mut ping) => ev,
                _ = stopped(shutdown) => return Ended::Stop,
            };
            let frame = match ev {
                WsEvent::Binary(b) => b,
                WsEvent::Text(_) => {
                    metrics::counter!("atlake_decode_errors_total", "reason" => "text_frame")
                        .increment(1);
                    continue;
                }
                other => return Ended::Reconnect(end_reason(&other, "firehose", s.read_timeout)),
            };
            self.received += 1;
            metrics::counter!("atlake_bytes_in_total", "source" => "firehose")
                .increment(frame.len() as u64);
            metrics::counter!("atlake_messages_total", "source" => "firehose").increment(1);
            let msg = if frame.len() > MAX_FRAME_BYTES {
                let seq = frame_cursor(&frame);
                self.advance(seq);
                oversized(&frame, seq.or(*self.last_seq), MAX_FRAME_BYTES)
            } else {
                match self.control(&frame) {
                    Control::Data => {}
                    Control::Consumed => continue,
                    Control::End(reason) => return Ended::Reconnect(reason),
                }
                let seq = frame_cursor(&frame);
                if let (Some(s), Some(l)) = (seq, *self.last_seq)
                    && s <= l
                {
                    metrics::counter!("atlake_duplicates_total", "reason" => "seq").increment(1);
                    continue;
                }
                self.advance(seq);
                RawMessage {
                    payload: Payload::Frame(frame),
                    cursor: seq.or(*self.last_seq),
                }
            };
            if !deliver(tx, msg, shutdown).await {
                return Ended::Stop;
            }
        }
    }

    fn advance(&mut self, seq: Option<Cursor>) {
        if let Some(s) = seq {
            *self.last_seq = Some(self.last_seq.map_or(s, |l| l.max(s)));
        }
    }

    /// Handles error frames (the connection ends) and `#info` (consumed).
    fn control(&mut self, frame: &[u8]) -> Control {
        let Ok((h, at)) = parse_header(frame) else {
            return Control::Data;
        };
        if h.op == -1 {
            let body = parse_error(&frame[at..]).ok();
            let name = body.as_ref().map_or("unknown", |b| b.error);
            let message = body.as_ref().and_then(|b| b.message).unwrap_or("");
            metrics::counter!("atlake_stream_errors_total", "error" => name.to_string())
                .increment(1);
            return Control::End(match name {
                "FutureCursor" => {
                    tracing::error!(cursor = ?self.last_seq, %message, "relay says our cursor is in the future (relay reset?); resuming at the live tip");
                    *self.last_seq = None;
                    "future_cursor"
                }
                "ConsumerTooSlow" => {
                    tracing::warn!(%message, "relay dropped us as too slow; resuming from our cursor");
                    "consumer_too_slow"
                }
                _ => {
                    tracing::warn!(error = name, %message, "error frame from relay");
                    "error_frame"
                }
            });
        }
        if h.t == Some("#info") {
            let info = parse_info(&frame[at..]).ok();
            let name = info.as_ref().map_or("unknown", |i| i.name);
            metrics::counter!("atlake_info_total", "name" => name.to_string()).increment(1);
            if name == "OutdatedCursor" {
                tracing::warn!(cursor = ?self.last_seq, "cursor is older than the relay's replay window; events before the window were missed");
            } else {
                tracing::info!(name, "info message from relay");
            }
            return Control::Consumed;
        }
        Control::Data
    }
}
