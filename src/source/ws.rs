//! The WebSocket client both network sources share: connect with a message-size limit (retrying
//! what may pass), read with a timeout, ping on an interval, and hand messages to the pipeline
//! unless shutdown comes first.

use super::RawMessage;
use crate::backoff::Backoff;
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a source stopped for good.
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
            max_message: usize::try_from(c.max_message_size.0).unwrap_or(usize::MAX),
            backoff_initial: c.backoff_initial.0,
            backoff_max: c.backoff_max.0,
        }
    }

    /// A backoff with these settings.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.backoff_initial, self.backoff_max)
    }
}

/// What reading the socket gave.
pub(crate) enum WsEvent {
    /// A binary message.
    Binary(bytes::Bytes),
    /// A text message.
    Text(bytes::Bytes),
    /// The server closed the connection.
    Closed(String),
    /// Nothing arrived within the read timeout.
    Timeout,
    /// The connection failed.
    Error(String),
}

/// One connection attempt, with the source's retry policy applied: `Ok(Some(ws))` when
/// connected, `Ok(None)` when the attempt failed in a way that may pass (the delay has been
/// waited, unless shutdown came first), `Err` when retrying cannot help.
pub(crate) async fn connect_or_wait(
    url: &str,
    s: &WsSettings,
    backoff: &mut Backoff,
    shutdown: &mut watch::Receiver<bool>,
    source: &'static str,
) -> Result<Option<Ws>, SourceError> {
    match connect(url, s.max_message, s.read_timeout).await {
        Ok(ws) => Ok(Some(ws)),
        Err(e) if e.fatal => Err(SourceError::Fatal {
            url: url.to_string(),
            message: e.message,
        }),
        Err(e) => {
            metrics::counter!("atlake_reconnects_total", "source" => source, "reason" => "connect")
                .increment(1);
            let delay = e.retry_after.unwrap_or_else(|| backoff.next_delay());
            tracing::warn!(source, error = %e.message, ?delay, "connect failed; retrying");
            pause(delay, shutdown).await;
            Ok(None)
        }
    }
}

/// Waits `delay` or until shutdown.
pub(crate) async fn pause(delay: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = stopped(shutdown) => {}
    }
}

/// Closes a connection that ended with `reason`, counts the reconnect, and waits the backoff.
pub(crate) async fn after_disconnect(
    mut ws: Ws,
    reason: &'static str,
    source: &'static str,
    backoff: &mut Backoff,
    shutdown: &mut watch::Receiver<bool>,
) {
    metrics::counter!("atlake_reconnects_total", "source" => source, "reason" => reason)
        .increment(1);
    let _ = ws.close(None).await;
    pause(backoff.next_delay(), shutdown).await;
}

/// A ping timer whose first (immediate) tick has been taken.
pub(crate) async fn ping_timer(every: Duration) -> tokio::time::Interval {
    let mut ping = tokio::time::interval(every);
    ping.tick().await;
    ping
}

/// Connects to `url`. HTTP errors before the upgrade (429, 5xx, …) come back as `Err` with the
/// status and any `Retry-After`.
pub(crate) async fn connect(
    url: &str,
    max_message: usize,
    timeout: Duration,
) -> Result<Ws, ConnectError> {
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let fut = tokio_tungstenite::connect_async_with_config(url, Some(cfg), true);
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(ConnectError {
            message: format!("connect timed out after {timeout:?}"),
            retry_after: None,
            fatal: false,
        }),
        Ok(Ok((ws, _resp))) => Ok(ws),
        Ok(Err(e)) => {
            use tokio_tungstenite::tungstenite::Error as E;
            Err(match e {
                E::Http(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    ConnectError {
                        message: format!("HTTP {status} before the WebSocket upgrade"),
                        retry_after,
                        // 501: the server does not support this endpoint
                        fatal: status == 501 || status == 404 || status == 400,
                    }
                }
                E::Url(u) => ConnectError {
                    message: format!("invalid URL {url:?}: {u}"),
                    retry_after: None,
                    fatal: true,
                },
                other => ConnectError {
                    message: other.to_string(),
                    retry_after: None,
                    fatal: false,
                },
            })
        }
    }
}

/// A failed connection attempt.
#[derive(Debug, Clone)]
pub(crate) struct ConnectError {
    pub message: String,
    pub retry_after: Option<Duration>,
    /// Retrying will not help (bad URL, endpoint not supported).
    pub fatal: bool,
}

/// Reads the next data message, answering pings and sending ours when `ping` ticks.
pub(crate) async fn next_event(
    ws: &mut Ws,
    read_timeout: Duration,
    ping: &mut tokio::time::Interval,
) -> WsEvent {
    let deadline = tokio::time::sleep(read_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return WsEvent::Timeout,
            _ = ping.tick() => {
                if let Err(e) = ws.send(Message::Ping(bytes::Bytes::from_static(b"atlake"))).await {
                    return WsEvent::Error(e.to_string());
                }
            }
            msg = ws.next() => {
                return match msg {
                    None => WsEvent::Closed("end of stream".into()),
                    Some(Err(e)) => WsEvent::Error(e.to_string()),
                    Some(Ok(Message::Binary(b))) => WsEvent::Binary(b),
                    Some(Ok(Message::Text(t))) => WsEvent::Text(bytes::Bytes::from(t)),
                    Some(Ok(Message::Close(c))) => WsEvent::Closed(c.map(|c| format!("{} {}", c.code, c.reason)).unwrap_or_default()),
                    // pings are answered by tungstenite; pongs and raw frames carry nothing
                    Some(Ok(_)) => continue,
                };
            }
        }
    }
}

/// The reason label of a connection that ended without a protocol error, logged once.
pub(crate) fn end_reason(
    ev: &WsEvent,
    source: &'static str,
    read_timeout: Duration,
) -> &'static str {
    match ev {
        WsEvent::Timeout => {
            tracing::warn!(source, timeout = ?read_timeout, "read timeout; reconnecting");
            "timeout"
        }
        WsEvent::Closed(why) => {
            tracing::info!(source, %why, "the server closed the connection");
            "closed"
        }
        WsEvent::Error(e) => {
            tracing::warn!(source, error = %e, "connection error");
            "error"
        }
        WsEvent::Binary(_) | WsEvent::Text(_) => "message",
    }
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

/// Resolves when shutdown is requested (the watch guard never lives across an await).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
