//! The WebSocket client both network sources share: connect with a message-size limit, read with
//! a timeout, and ping on an interval.

use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

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
