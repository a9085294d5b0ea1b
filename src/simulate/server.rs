//! The simulator as a server: one port on 127.0.0.1 that speaks both `subscribeRepos`
//! (`/xrpc/com.atproto.sync.subscribeRepos?cursor=N`) and Jetstream v1 (`/subscribe?…`), with
//! cursor replay from a retention window, and injectable faults.
//!
//! Firehose replay starts after the cursor (seq > cursor, as relays do); a cursor beyond the
//! head gets a `FutureCursor` error frame; a cursor older than the window gets
//! `#info OutdatedCursor` and the whole window. Jetstream replay starts at `time_us ≥ cursor`,
//! honours `wantedCollections` (with `prefix.*`), `wantedDids`, `compress=true` and
//! `options_update`.

use super::traffic::{SimMessage, Traffic, TrafficConfig, TruthKey, error_frame, info_frame};
use crate::decode::jetstream::ZstdCodec;
use crate::syntax::nsid_matches;
use futures::{SinkExt, StreamExt};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// Faults the simulator can inject.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Close every connection after this many messages sent on it.
    pub drop_every: Option<u64>,
    /// Insert a garbage frame after every N real messages.
    pub garbage_every: Option<u64>,
    /// Insert an oversized (8 MiB) frame after every N real messages.
    pub oversized_every: Option<u64>,
    /// Insert a commit whose CAR has a block with a wrong hash, every N.
    pub bad_hash_every: Option<u64>,
    /// Insert a commit whose CAR is truncated, every N.
    pub truncated_car_every: Option<u64>,
    /// Insert a commit with a record block over 1 MB, every N.
    pub big_record_every: Option<u64>,
    /// Re-send an old frame (seq jumps backwards), every N.
    pub backwards_every: Option<u64>,
    /// Send `ConsumerTooSlow` and close, every N messages sent on a connection.
    pub too_slow_every: Option<u64>,
    /// The first N connections are accepted and then get nothing at all.
    pub silent_connections: u64,
    /// Every N messages: the frame's `time` is made absurd (far future or before the network;
    /// the event stays real), and Jetstream clients get an extra line whose `time_us` is absurd
    /// (year 10000, `i64::MAX`, 0, negative, 2020).
    pub bad_time_every: Option<u64>,
    /// Insert a copy of a commit whose `seq` is `i64::MAX`, `i64::MIN`, 0 or negative, every N.
    pub bad_seq_every: Option<u64>,
}

impl Faults {
    /// Parses `name=N,name=N` (`drop`, `garbage`, `oversized`, `bad-hash`, `truncated-car`,
    /// `big-record`, `backwards`, `too-slow`, `silent`, `bad-time`, `bad-seq`).
    pub fn parse(spec: &str) -> Result<Faults, String> {
        let mut f = Faults::default();
        for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("fault {part:?} is not name=N"))?;
            let n: u64 = v
                .parse()
                .map_err(|_| format!("fault {part:?}: {v:?} is not a number"))?;
            if n == 0 {
                return Err(format!("fault {part:?}: N must be positive"));
            }
            match k {
                "drop" => f.drop_every = Some(n),
                "garbage" => f.garbage_every = Some(n),
                "oversized" => f.oversized_every = Some(n),
                "bad-hash" => f.bad_hash_every = Some(n),
                "truncated-car" => f.truncated_car_every = Some(n),
                "big-record" => f.big_record_every = Some(n),
                "backwards" => f.backwards_every = Some(n),
                "too-slow" => f.too_slow_every = Some(n),
                "silent" => f.silent_connections = n,
                "bad-time" => f.bad_time_every = Some(n),
                "bad-seq" => f.bad_seq_every = Some(n),
                other => return Err(format!("unknown fault {other:?}")),
            }
        }
        Ok(f)
    }
}

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Traffic shape.
    pub traffic: TrafficConfig,
    /// Stop generating after this many messages (`None`: forever).
    pub messages: Option<u64>,
    /// Messages per second (`None`: as fast as clients read).
    pub rate: Option<f64>,
    /// Messages kept for replay.
    pub retention: usize,
    /// Faults.
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            traffic: TrafficConfig::default(),
            messages: Some(10_000),
            rate: None,
            retention: 200_000,
            faults: Faults::default(),
        }
    }
}

/// What kind of entry the log holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Real traffic.
    Real,
    /// An injected fault (no truth).
    Fault(&'static str),
}

/// One entry of the simulator's log.
#[derive(Debug)]
pub struct Entry {
    /// Real or fault.
    pub kind: EntryKind,
    /// Seq of the message (faults: the seq of the previous real message).
    pub seq: i64,
    /// Frame bytes.
    pub frame: Vec<u8>,
    /// Jetstream lines (time_us, JSON).
    pub lines: Vec<(i64, Vec<u8>, String, String)>,
}

/// The ground truth of everything generated so far.
#[derive(Debug, Clone, Default)]
pub struct Truth {
    /// Real messages generated.
    pub messages: u64,
    /// Events by (kind, collection, operation).
    pub counts: BTreeMap<(String, String, String), u64>,
    /// Every event's key.
    pub keys: HashSet<TruthKey>,
    /// Faults injected, by name.
    pub faults: BTreeMap<String, u64>,
    /// First and last seq.
    pub seq_range: Option<(i64, i64)>,
    /// Last Jetstream time_us.
    pub last_time_us: Option<i64>,
}

impl Truth {
    /// Total events.
    pub fn events(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The truth as JSON (counts by kind/collection/operation, totals, faults).
    pub fn to_json(&self) -> String {
        let counts: Vec<serde_json::Value> = self
            .counts
            .iter()
            .map(|((k, c, o), n)| serde_json::json!({"kind": k, "collection": c, "operation": o, "count": n}))
            .collect();
        serde_json::to_string_pretty(&serde_json::json!({
            "messages": self.messages,
            "events": self.events(),
            "counts": counts,
            "faults": self.faults,
            "first_seq": self.seq_range.map(|r| r.0),
            "last_seq": self.seq_range.map(|r| r.1),
            "last_time_us": self.last_time_us,
        }))
        .unwrap_or_default()
    }

    /// Adds a generated message.
    pub fn add_message(&mut self, m: &SimMessage) {
        self.messages += 1;
        for k in m.truth() {
            *self
                .counts
                .entry((
                    k.kind.to_string(),
                    k.collection.clone(),
                    k.operation.to_string(),
                ))
                .or_default() += 1;
            self.keys.insert(k);
        }
        self.seq_range = Some(match self.seq_range {
            Some((a, _)) => (a, m.seq),
            None => (m.seq, m.seq),
        });
    }
}

#[derive(Debug, Default)]
struct Log {
    entries: VecDeque<Arc<Entry>>,
    /// index of entries[0] in the whole stream
    first: u64,
    truth: Truth,
    finished: bool,
    connections: u64,
    /// messages sent, all connections together
    sent: u64,
    /// collections of every options_update received
    options_updates: Vec<Vec<String>>,
}

/// A running simulator.
#[derive(Debug, Clone)]
pub struct SimHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    notify: Arc<Notify>,
    stop: watch::Sender<bool>,
}

impl SimHandle {
    /// `ws://addr` (use as firehose or Jetstream URL; the path is added by the client).
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// The truth so far.
    pub fn truth(&self) -> Truth {
        self.lock().truth.clone()
    }

    /// Whether generation finished (the message limit was reached).
    pub fn finished(&self) -> bool {
        self.lock().finished
    }

    /// The highest seq sent so far (real or injected).
    pub fn last_seq(&self) -> Option<i64> {
        self.lock().entries.iter().map(|e| e.seq).max()
    }

    /// The `wantedCollections` of every `options_update` received, in order.
    pub fn options_updates(&self) -> Vec<Vec<String>> {
        self.lock().options_updates.clone()
    }

    /// Messages sent so far, all connections together.
    pub fn sent(&self) -> u64 {
        self.lock().sent
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.lock().connections
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the server and the generator.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until `n` real messages exist.
    pub async fn wait_for_messages(&self, n: u64) {
        loop {
            let notified = self.notify.notified();
            if self.lock().truth.messages >= n {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }
}

fn garbage(i: u64) -> Vec<u8> {
    // a header that parses, then a body that does not
    let mut f = super::traffic::frame_bytes("#commit", &[]);
    f.extend_from_slice(&[0xbf, 0xff, 0x00, (i % 251) as u8, 0x1c]);
    f
}

/// Builds the fault frames that go after real message `m` (number `i`).
fn faults_after(
    f: &Faults,
    i: u64,
    m: &SimMessage,
    recent: &VecDeque<(i64, Vec<u8>)>,
    traffic: &mut Traffic,
) -> Vec<Entry> {
    use super::faults::{Corruption, corrupt};
    let mut out = Vec::new();
    let due = |every: Option<u64>| every.is_some_and(|n| i > 0 && i.is_multiple_of(n));
    let mk = |name: &'static str, seq: i64, frame: Vec<u8>| Entry {
        kind: EntryKind::Fault(name),
        seq,
        frame,
        lines: Vec::new(),
    };
    if due(f.garbage_every) {
        out.push(mk("garbage", m.seq, garbage(i)));
    }
    for (every, name, how) in [
        (f.oversized_every, "oversized", Corruption::Oversized),
        (f.bad_hash_every, "hash_mismatch", Corruption::BadHash),
        (f.truncated_car_every, "car", Corruption::TruncatedCar),
        (
            f.big_record_every,
            "record_too_large",
            Corruption::BigRecord,
        ),
    ] {
        if due(every) {
            let seq = traffic.next_seq();
            if let Some(frame) = corrupt(m, seq, how) {
                traffic.skip_seq();
                out.push(mk(name, seq, frame));
            }
        }
    }
    if due(f.backwards_every)
        && let Some((seq, frame)) = recent.front()
    {
        out.push(mk("backwards", *seq, frame.clone()));
    }
    if due(f.bad_seq_every) {
        let n = i / f.bad_seq_every.unwrap_or(1);
        let seq = [i64::MAX, i64::MIN, 0, -5][(n % 4) as usize];
        if let Some(frame) = super::faults::with_seq(&m.frame, seq) {
            out.push(mk("bad_seq", m.seq, frame));
        }
    }
    if due(f.bad_time_every)
        && let (Some((t, _)), Some(env)) = (m.jetstream_lines().into_iter().last(), m.events.last())
    {
        // a distinct event (its own rkey) whose `time_us` is absurd; the replay position
        // stays the real one (`t`)
        let n = i / f.bad_time_every.unwrap_or(1);
        let mut env = env.clone();
        env.time_us = BAD_TIMES_US[(n % BAD_TIMES_US.len() as u64) as usize];
        env.seq = None;
        env.since = None;
        if let crate::model::EventData::Commit(c) = &mut env.event.data
            && let Ok(k) = crate::model::Rkey::parse(format!("badtime{i}"))
        {
            c.rkey = k;
        }
        let mut line = Vec::new();
        if crate::decode::jetstream::write_line(&env, &mut line) {
            let mut e = mk("bad_time", m.seq, Vec::new());
            e.lines.push((t, line, String::new(), String::new()));
            out.push(e);
        }
    }
    out
}

/// The `time_us` values of the `bad-time` fault's Jetstream lines: year 10000, `i64::MAX`,
/// 0, negative, 2020-01-01 (before the network), 2050.
pub const BAD_TIMES_US: [i64; 6] = [
    253_402_300_800_000_000,
    i64::MAX,
    0,
    -1_000_000,
    1_577_836_800_000_000,
    2_524_608_000_000_000,
];

/// The frame `time` values of the `bad-time` fault: far future, and before the network.
pub const BAD_FRAME_TIMES: [&str; 2] = ["9999-12-31T23:59:59.999Z", "1970-01-01T00:00:00.000Z"];

/// Starts the simulator on `addr` (use port 0 for any free port).
pub async fn start(cfg: SimConfig, addr: SocketAddr) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let log = Arc::new(Mutex::new(Log::default()));
    let notify = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let handle = SimHandle {
        addr,
        log: log.clone(),
        notify: notify.clone(),
        stop: stop_tx,
    };
    // generator
    {
        let log = log.clone();
        let notify = notify.clone();
        let cfg = cfg.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut traffic = Traffic::new(cfg.traffic.clone());
            let mut recent: VecDeque<(i64, Vec<u8>)> = VecDeque::new();
            let start = tokio::time::Instant::now();
            let mut i = 0u64;
            loop {
                if *stop.borrow() || cfg.messages.is_some_and(|n| i >= n) {
                    break;
                }
                if let Some(rate) = cfg.rate {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = stop.changed() => break,
                    }
                }
                // generate in small batches outside the lock
                let batch = if cfg.rate.is_some() { 1 } else { 64 };
                let mut made = Vec::with_capacity(batch);
                for _ in 0..batch {
                    if cfg.messages.is_some_and(|n| i >= n) {
                        break;
                    }
                    let mut m = traffic.next_message();
                    let bad_frame_time = cfg
                        .faults
                        .bad_time_every
                        .is_some_and(|n| (i + 1).is_multiple_of(n));
                    if bad_frame_time {
                        let k = ((i + 1) / cfg.faults.bad_time_every.unwrap_or(1)) as usize;
                        let t = BAD_FRAME_TIMES[k % BAD_FRAME_TIMES.len()];
                        if let Some(f) = super::faults::with_time(&m.frame, t) {
                            m.frame = f;
                        }
                    }
                    let lines = m
                        .jetstream_lines()
                        .into_iter()
                        .zip(m.events.iter())
                        .map(|((t, l), e)| {
                            let (did, coll) = (
                                e.event.did.to_string(),
                                e.event
                                    .commit()
                                    .map(|c| c.collection.to_string())
                                    .unwrap_or_default(),
                            );
                            (t, l, did, coll)
                        })
                        .collect();
                    // faults right after their message, so their fresh seqs stay in order
                    let faults = faults_after(&cfg.faults, i + 1, &m, &recent, &mut traffic);
                    recent.push_back((m.seq, m.frame.clone()));
                    if recent.len() > 6 {
                        recent.pop_front();
                    }
                    made.push((m, lines, faults, bad_frame_time));
                    i += 1;
                }
                {
                    let mut g = log.lock().unwrap_or_else(|e| e.into_inner());
                    for (m, lines, faults, bad_frame_time) in made {
                        g.truth.add_message(&m);
                        if bad_frame_time {
                            *g.truth.faults.entry("bad_frame_time".into()).or_default() += 1;
                        }
                        g.truth.last_time_us = m
                            .jetstream_lines()
                            .last()
                            .map(|(t, _)| *t)
                            .or(g.truth.last_time_us);
                        g.entries.push_back(Arc::new(Entry {
                            kind: EntryKind::Real,
                            seq: m.seq,
                            frame: m.frame,
                            lines,
                        }));
                        for fe in faults {
                            if let EntryKind::Fault(name) = fe.kind {
                                *g.truth.faults.entry(name.to_string()).or_default() += 1;
                            }
                            g.entries.push_back(Arc::new(fe));
                        }
                        while g.entries.len() > cfg.retention {
                            g.entries.pop_front();
                            g.first += 1;
                        }
                    }
                }
                notify.notify_waiters();
                tokio::task::yield_now().await;
            }
            log.lock().unwrap_or_else(|e| e.into_inner()).finished = true;
            notify.notify_waiters();
        });
    }
    // acceptor
    {
        let handle2 = handle.clone();
        let mut stop = stop_rx.clone();
        let faults = cfg.faults.clone();
        tokio::spawn(async move {
            loop {
                let (sock, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stop.changed() => break,
                };
                let h = handle2.clone();
                let f = faults.clone();
                let st = stop.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(sock, h, f, st).await {
                        tracing::debug!(error = %e, "simulator connection ended");
                    }
                });
            }
        });
    }
    Ok(handle)
}

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

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[allow(clippy::result_large_err)] // tungstenite's handshake callback type
async fn serve(
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
    let (path, query) = uri.split_once('?').unwrap_or((uri.as_str(), ""));
    let mut cursor: Option<i64> = None;
    let mut js = JsParams::default();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_decode(v);
        match k {
            "cursor" => cursor = v.parse().ok(),
            "wantedCollections" => js.collections.push(v),
            "wantedDids" => js.dids.push(v),
            "compress" => js.compress = v == "true",
            _ => {}
        }
    }
    let (mut sink, mut stream) = ws.split();
    if conn_no <= faults.silent_connections {
        // accept, then say nothing until the client gives up
        while let Some(Ok(_)) = stream.next().await {}
        return Ok(());
    }
    let firehose = path.ends_with("com.atproto.sync.subscribeRepos");
    if !firehose && !path.ends_with("/subscribe") {
        let _ = sink.send(Message::Close(None)).await;
        return Err(format!("unknown path {path}"));
    }
    let (params_tx, mut params_rx) = watch::channel(js.clone());
    // client messages: options_update for Jetstream; everything else ignored
    let h2 = h.clone();
    // the reader holds half of the socket: end it with this function, so a dropped connection
    // really closes (a half-open socket would only be noticed by the client's read timeout)
    let _reader = AbortOnDrop(tokio::spawn(async move {
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
                h2.lock().options_updates.push(list("wantedCollections"));
                params_tx.send_modify(|cur| {
                    cur.collections = list("wantedCollections");
                    cur.dids = list("wantedDids");
                });
            }
        }
    }));
    // where to start
    enum Start {
        At(u64),
        Future,
        Outdated(u64),
    }
    let start = {
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
    };
    let mut next = match start {
        Start::At(n) => n,
        Start::Future => {
            let _ = sink
                .send(Message::Binary(
                    error_frame("FutureCursor", "cursor in the future").into(),
                ))
                .await;
            let _ = sink.close().await;
            return Ok(());
        }
        Start::Outdated(n) => {
            let _ = sink
                .send(Message::Binary(
                    info_frame("OutdatedCursor", "cursor is older than the replay window").into(),
                ))
                .await;
            n
        }
    };
    let mut zstd = ZstdCodec::try_new().map_err(|e| e.to_string())?;
    let mut sent = 0u64;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let notified = h.notify.notified();
        let batch: Vec<Arc<Entry>> = {
            let g = h.lock();
            if next < g.first {
                next = g.first;
            }
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
            let first_line_time = e.lines.first().map(|(t, ..)| *t);
            if firehose {
                if e.frame.is_empty() {
                    continue; // a fault for Jetstream clients only
                }
                sink.send(Message::Binary(e.frame.clone().into()))
                    .await
                    .map_err(|x| x.to_string())?;
                sent += 1;
                h.lock().sent += 1;
            } else {
                // replay of the first matching entry may start mid-message
                let params = params_rx.borrow_and_update().clone();
                if matches!(e.kind, EntryKind::Fault("garbage")) {
                    sink.send(Message::Text("{\"did\":garbage".into()))
                        .await
                        .map_err(|x| x.to_string())?;
                    sent += 1;
                }
                for (t, line, did, coll) in &e.lines {
                    if cursor.is_some_and(|c| *t < c) {
                        continue;
                    }
                    if !params.wants(did, coll) {
                        continue;
                    }
                    let msg = if params.compress {
                        Message::Binary(zstd.compress(line).map_err(|x| x.to_string())?.into())
                    } else {
                        Message::Text(String::from_utf8_lossy(line).into_owned().into())
                    };
                    sink.send(msg).await.map_err(|x| x.to_string())?;
                    sent += 1;
                }
                let _ = first_line_time;
            }
            if faults
                .too_slow_every
                .is_some_and(|n| sent > 0 && sent.is_multiple_of(n))
            {
                let _ = sink
                    .send(Message::Binary(
                        error_frame("ConsumerTooSlow", "too slow").into(),
                    ))
                    .await;
                let _ = sink.close().await;
                return Ok(());
            }
            if faults.drop_every.is_some_and(|n| sent >= n) {
                // drop without a close frame, as a network failure would
                return Ok(());
            }
        }
        cursor = None;
    }
}
