//! The simulator as a server: one port on 127.0.0.1 that speaks both `subscribeRepos`
//! (`/xrpc/com.atproto.sync.subscribeRepos?cursor=N`) and Jetstream v1 (`/subscribe?…`), with
//! cursor replay from a retention window, and injectable faults.
//!
//! Firehose replay starts after the cursor (seq > cursor, as relays do); a cursor beyond the
//! head gets a `FutureCursor` error frame; a cursor older than the window gets
//! `#info OutdatedCursor` and the whole window. Jetstream replay starts at `time_us ≥ cursor`,
//! honours `wantedCollections` (with `prefix.*`), `wantedDids`, `compress=true` and
//! `options_update`.

mod conn;

use super::traffic::{SimMessage, Traffic, TrafficConfig, TruthKey};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

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
    /// the cursor every connection asked for, in order
    cursors: Vec<Option<i64>>,
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

    /// The cursor each connection asked for (`None`: the live tip), in order of connection.
    pub fn cursors(&self) -> Vec<Option<i64>> {
        self.lock().cursors.clone()
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
        env.chain = None;
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

/// One generated message, ready for the log: its Jetstream lines and the faults that follow it.
struct Made {
    message: SimMessage,
    lines: Vec<(i64, Vec<u8>, String, String)>,
    faults: Vec<Entry>,
    bad_frame_time: bool,
}

/// The traffic generator with the state its faults need.
struct Generator {
    traffic: Traffic,
    faults: Faults,
    /// The last few frames (for `backwards`).
    recent: VecDeque<(i64, Vec<u8>)>,
    /// Messages generated.
    made: u64,
}

impl Generator {
    /// The next message (number `made + 1`), with `bad-time` applied to its frame and the
    /// faults that go after it.
    fn next(&mut self) -> Made {
        let i = self.made + 1;
        let mut m = self.traffic.next_message();
        let bad_frame_time = self
            .faults
            .bad_time_every
            .is_some_and(|n| i.is_multiple_of(n));
        if bad_frame_time {
            let k = (i / self.faults.bad_time_every.unwrap_or(1)) as usize;
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
                let coll = e
                    .event
                    .commit()
                    .map(|c| c.collection.to_string())
                    .unwrap_or_default();
                (t, l, e.event.did.to_string(), coll)
            })
            .collect();
        // faults right after their message, so their fresh seqs stay in order
        let faults = faults_after(&self.faults, i, &m, &self.recent, &mut self.traffic);
        self.recent.push_back((m.seq, m.frame.clone()));
        if self.recent.len() > 6 {
            self.recent.pop_front();
        }
        self.made = i;
        Made {
            message: m,
            lines,
            faults,
            bad_frame_time,
        }
    }
}

impl Log {
    /// Appends a generated message and its faults, keeping `retention` entries.
    fn append(&mut self, made: Made, retention: usize) {
        let m = made.message;
        self.truth.add_message(&m);
        if made.bad_frame_time {
            *self
                .truth
                .faults
                .entry("bad_frame_time".into())
                .or_default() += 1;
        }
        self.truth.last_time_us = m
            .jetstream_lines()
            .last()
            .map(|(t, _)| *t)
            .or(self.truth.last_time_us);
        self.entries.push_back(Arc::new(Entry {
            kind: EntryKind::Real,
            seq: m.seq,
            frame: m.frame,
            lines: made.lines,
        }));
        for fe in made.faults {
            if let EntryKind::Fault(name) = fe.kind {
                *self.truth.faults.entry(name.to_string()).or_default() += 1;
            }
            self.entries.push_back(Arc::new(fe));
        }
        while self.entries.len() > retention {
            self.entries.pop_front();
            self.first += 1;
        }
    }
}

/// Generates traffic into the log at the configured rate until the message count or stop.
async fn generate(cfg: SimConfig, h: SimHandle, mut stop: watch::Receiver<bool>) {
    let mut g = Generator {
        traffic: Traffic::new(cfg.traffic.clone()),
        faults: cfg.faults.clone(),
        recent: VecDeque::new(),
        made: 0,
    };
    let start = tokio::time::Instant::now();
    let done = |made: u64| cfg.messages.is_some_and(|n| made >= n);
    while !*stop.borrow() && !done(g.made) {
        if let Some(rate) = cfg.rate {
            let due = start + Duration::from_secs_f64(g.made as f64 / rate);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = stop.changed() => break,
            }
        }
        // generate in small batches outside the lock
        let batch = if cfg.rate.is_some() { 1 } else { 64 };
        let mut made = Vec::with_capacity(batch);
        while made.len() < batch && !done(g.made) {
            made.push(g.next());
        }
        {
            let mut log = h.lock();
            for m in made {
                log.append(m, cfg.retention);
            }
        }
        h.notify.notify_waiters();
        tokio::task::yield_now().await;
    }
    h.lock().finished = true;
    h.notify.notify_waiters();
}

/// Accepts connections until stop; each is served on its own task.
async fn accept(
    listener: TcpListener,
    h: SimHandle,
    faults: Faults,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (sock, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = stop.changed() => break,
        };
        let (h, f, st) = (h.clone(), faults.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(e) = conn::serve(sock, h, f, st).await {
                tracing::debug!(error = %e, "simulator connection ended");
            }
        });
    }
}

/// Starts the simulator on `addr` (use port 0 for any free port).
pub async fn start(cfg: SimConfig, addr: SocketAddr) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let handle = SimHandle {
        addr,
        log: Arc::new(Mutex::new(Log::default())),
        notify: Arc::new(Notify::new()),
        stop: stop_tx,
    };
    tokio::spawn(generate(cfg.clone(), handle.clone(), stop_rx.clone()));
    tokio::spawn(accept(
        listener,
        handle.clone(),
        cfg.faults.clone(),
        stop_rx,
    ));
    Ok(handle)
}
