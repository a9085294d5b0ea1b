//! One client connection: the request (endpoint, cursor, Jetstream parameters), where its
//! replay starts, and the loop that sends the log from there, with the per-connection faults
//! (`too-slow`, `drop`, `silent`).

use super::{Entry, EntryKind, Faults, SimHandle};
use crate::decode::jetstream::ZstdCodec;
use crate::simulate::traffic::{error_frame, info_frame};
use crate::syntax::nsid_matches;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;

/// Jetstream's parameters (`wantedCollections`, `wantedDids`, `compress`).
#[derive(Debug, Clone, Default)]
struct JsParams {
    collections: Vec<String>,
    dids: Vec<String>,
    compress: bool,
}

impl JsParams {
    fn wants(&self, did: &str, collection: &str) -> bool {
        (self.dids.is_empty() || self.dids.iter().any(|d| d == did))
            && (collection.is_empty()
                || self.collections.is_empty()
                || self.collections.iter().any(|p| nsid_matches(p, collection)))
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a client asked for.
struct Ask {
    firehose: bool,
    path: String,
    cursor: Option<i64>,
    js: JsParams,
}

impl Ask {
    fn parse(uri: &str) -> Ask {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let mut ask = Ask {
            firehose: path.ends_with("com.atproto.sync.subscribeRepos"),
            path: path.to_string(),
            cursor: None,
            js: JsParams::default(),
        };
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = percent_decode(v);
            match k {
                "cursor" => ask.cursor = v.parse().ok(),
                "wantedCollections" => ask.js.collections.push(v),
                "wantedDids" => ask.js.dids.push(v),
                "compress" => ask.js.compress = v == "true",
                _ => {}
            }
        }
        ask
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the client's messages: `options_update` changes the Jetstream parameters; the rest is
/// ignored. The reader holds half of the socket, so it ends with the connection: a dropped
/// connection really closes (a half-open socket would only be noticed by the client's read
/// timeout).
fn spawn_reader(
    mut stream: SplitStream<WebSocketStream<TcpStream>>,
    h: SimHandle,
    params: watch::Sender<JsParams>,
) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            if let Message::Text(t) = msg
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&t)
                && v["type"] == "options_update"
            {
                let p = &v["payload"];
                let list = |k: &str| -> Vec<String> {
                    p[k].as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                h.lock().options_updates.push(list("wantedCollections"));
                params.send_modify(|cur| {
                    cur.collections = list("wantedCollections");
                    cur.dids = list("wantedDids");
                });
            }
        }
    }))
}

/// Where a replay starts.
enum Start {
    /// At this log position.
    At(u64),
    /// The firehose cursor is past the head: `FutureCursor`.
    Future,
    /// The firehose cursor is older than the window: `#info OutdatedCursor`, then the window.
    Outdated(u64),
}

/// Firehose replay starts after the cursor (seq > cursor, as relays do); Jetstream replay at
/// the first entry with a line at or after the cursor.
fn start_of(h: &SimHandle, firehose: bool, cursor: Option<i64>) -> Start {
    let g = h.lock();
    let head_seq = g.truth.seq_range.map(|r| r.1);
    match (firehose, cursor) {
        (_, None) => Start::At(g.first + g.entries.len() as u64),
        (true, Some(c)) => {
            let oldest = g.entries.front().map(|e| e.seq);
            if head_seq.is_some_and(|hs| c > hs) {
                Start::Future
            } else if oldest.is_some_and(|o| c < o - 1) && g.first > 0 {
                Start::Outdated(g.first)
            } else {
                let pos = g
                    .entries
                    .iter()
                    .position(|e| e.kind == EntryKind::Real && e.seq > c);
                Start::At(g.first + pos.unwrap_or(g.entries.len()) as u64)
            }
        }
        (false, Some(c)) => {
            let pos = g
                .entries
                .iter()
                .position(|e| e.lines.iter().any(|(t, ..)| *t >= c));
            Start::At(g.first + pos.unwrap_or(g.entries.len()) as u64)
        }
    }
}

/// Serves one connection until the client goes, the simulator stops, or a fault ends it.
#[allow(clippy::result_large_err)] // tungstenite's handshake callback type
pub(super) async fn serve(
    sock: TcpStream,
    h: SimHandle,
    faults: Faults,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut uri = String::new();
    let ws = tokio_tungstenite::accept_hdr_async(sock, |req: &Request, resp: Response| {
        uri = req.uri().to_string();
        Ok(resp)
    })
    .await
    .map_err(|e| e.to_string())?;
    let conn_no = {
        let mut g = h.lock();
        g.connections += 1;
        g.connections
    };
    let ask = Ask::parse(&uri);
    h.lock().cursors.push(ask.cursor);
    let (mut sink, mut stream) = ws.split();
    if conn_no <= faults.silent_connections {
        // accept, then say nothing until the client gives up
        while let Some(Ok(_)) = stream.next().await {}
        return Ok(());
    }
    if !ask.firehose && !ask.path.ends_with("/subscribe") {
        let _ = sink.send(Message::Close(None)).await;
        return Err(format!("unknown path {}", ask.path));
    }
    let (params_tx, params_rx) = watch::channel(ask.js.clone());
    let _reader = spawn_reader(stream, h.clone(), params_tx);
    let next = match start_of(&h, ask.firehose, ask.cursor) {
        Start::At(n) => n,
        Start::Future => {
            let frame = error_frame("FutureCursor", "cursor in the future");
            let _ = sink.send(Message::Binary(frame.into())).await;
            let _ = sink.close().await;
            return Ok(());
        }
        Start::Outdated(n) => {
            let frame = info_frame("OutdatedCursor", "cursor is older than the replay window");
            let _ = sink.send(Message::Binary(frame.into())).await;
            n
        }
    };
    let mut sender = Sender {
        sink,
        h: h.clone(),
        firehose: ask.firehose,
        cursor: ask.cursor,
        params: params_rx,
        zstd: ZstdCodec::try_new().map_err(|e| e.to_string())?,
        sent: 0,
        faults,
    };
    sender.send_from(next, &mut stop).await
}

/// The sending side of one connection.
struct Sender {
    sink: Sink,
    h: SimHandle,
    firehose: bool,
    /// The Jetstream cursor of the first entry (replay may start mid-message).
    cursor: Option<i64>,
    params: watch::Receiver<JsParams>,
    zstd: ZstdCodec,
    sent: u64,
    faults: Faults,
}

impl Sender {
    /// Sends the log from position `next`, waiting for new entries at the head.
    async fn send_from(
        &mut self,
        mut next: u64,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let h = self.h.clone();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let notified = h.notify.notified();
            let batch: Vec<Arc<Entry>> = {
                let g = self.h.lock();
                next = next.max(g.first);
                let start = (next - g.first) as usize;
                g.entries.iter().skip(start).take(256).cloned().collect()
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = notified => continue,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = stop.changed() => return Ok(()),
                }
            }
            for e in batch {
                next += 1;
                if self.firehose {
                    self.send_frame(&e).await?;
                } else {
                    self.send_lines(&e).await?;
                }
                if self.fault_ends_connection().await {
                    return Ok(());
                }
            }
            self.cursor = None;
        }
    }

    async fn send_frame(&mut self, e: &Entry) -> Result<(), String> {
        if e.frame.is_empty() {
            return Ok(()); // a fault for Jetstream clients only
        }
        self.sink
            .send(Message::Binary(e.frame.clone().into()))
            .await
            .map_err(|x| x.to_string())?;
        self.sent += 1;
        self.h.lock().sent += 1;
        Ok(())
    }

    async fn send_lines(&mut self, e: &Entry) -> Result<(), String> {
        let params = self.params.borrow_and_update().clone();
        if matches!(e.kind, EntryKind::Fault("garbage")) {
            self.sink
                .send(Message::Text("{\"did\":garbage".into()))
                .await
                .map_err(|x| x.to_string())?;
            self.sent += 1;
        }
        for (t, line, did, coll) in &e.lines {
            if self.cursor.is_some_and(|c| *t < c) || !params.wants(did, coll) {
                continue;
            }
            let msg = if params.compress {
                Message::Binary(self.zstd.compress(line).map_err(|x| x.to_string())?.into())
            } else {
                Message::Text(String::from_utf8_lossy(line).into_owned().into())
            };
            self.sink.send(msg).await.map_err(|x| x.to_string())?;
            self.sent += 1;
        }
        Ok(())
    }

    /// `too-slow`: a `ConsumerTooSlow` error frame and a close; `drop`: the connection just
    /// ends, without a close frame, as a network failure would.
    async fn fault_ends_connection(&mut self) -> bool {
        let sent = self.sent;
        if self
            .faults
            .too_slow_every
            .is_some_and(|n| sent > 0 && sent.is_multiple_of(n))
        {
            let frame = error_frame("ConsumerTooSlow", "too slow");
            let _ = self.sink.send(Message::Binary(frame.into())).await;
            let _ = self.sink.close().await;
            return true;
        }
        self.faults.drop_every.is_some_and(|n| sent >= n)
    }
}
