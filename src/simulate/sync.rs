//! The simulator's repository sync endpoints, for backfills: a relay that lists repos
//! (`listRepos`, `listReposByCollection`), a PLC directory stand-in that serves DID documents,
//! and several PDS hosts that serve `getRepo`, each on its own port on 127.0.0.1.
//!
//! Repos belong to the simulated accounts ([`super::traffic::did_of`], the DIDs the live
//! traffic commits for). Their records come from [`Traffic::history`]; the MST, commit and CAR
//! are real (hashes, layers and root as the reference implementation builds them), so a
//! backfill verifies them as it would a PDS's. [`SyncSim::truth`] is the ground truth: every
//! record that exists in every repo, at its rev.
//!
//! Faults: every Nth `getRepo` answers 429 with `Retry-After: 1`, or 500, or stalls mid-body;
//! and fixed accounts are broken for good: a truncated CAR, a block whose bytes do not match
//! its CID, the repo of another DID, takendown and deactivated accounts. Account 0 may be made
//! very large.

use super::traffic::{Traffic, did_of};
use crate::decode::car::CarWriter;
use crate::decode::cbor::Encoder;
use crate::decode::cid::Cid;
use crate::decode::mst::build;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Faults of the sync endpoints.
#[derive(Debug, Clone, Default)]
pub struct SyncFaults {
    /// Every Nth `getRepo` gets 429 with `Retry-After: 1`.
    pub rate_limit_every: Option<u64>,
    /// Every Nth `getRepo` gets 500.
    pub error_every: Option<u64>,
    /// Every Nth `getRepo` sends half its body, then stalls for `stall`.
    pub stall_every: Option<u64>,
    /// How long a stall lasts.
    pub stall: Duration,
    /// Accounts whose CAR ends early.
    pub truncated: u64,
    /// Accounts with a record block whose bytes do not hash to its CID.
    pub bad_cid: u64,
    /// Accounts whose PDS serves another account's repo.
    pub wrong_did: u64,
    /// Takendown accounts (inactive in `listRepos`; `getRepo` says `RepoTakendown`).
    pub takendown: u64,
    /// Deactivated accounts (inactive; `RepoDeactivated`).
    pub deactivated: u64,
}

/// Settings of the sync simulator.
#[derive(Debug, Clone)]
pub struct SyncSimConfig {
    /// Seed.
    pub seed: u64,
    /// Accounts (repos).
    pub accounts: u64,
    /// PDS hosts the accounts are spread over.
    pub hosts: usize,
    /// Mean records per repo (repo sizes are skewed: most are small, a few large).
    pub records: u64,
    /// Records of account 0, when it is to be very large.
    pub big_repo: Option<u64>,
    /// Faults.
    pub faults: SyncFaults,
    /// Address of the relay and PLC stand-in (`None`: a free port on 127.0.0.1); the PDS
    /// hosts always take free ports.
    pub listen: Option<SocketAddr>,
}

impl Default for SyncSimConfig {
    fn default() -> Self {
        SyncSimConfig {
            seed: 7,
            accounts: 200,
            hosts: 3,
            records: 60,
            big_repo: None,
            faults: SyncFaults::default(),
            listen: None,
        }
    }
}

/// What is wrong with an account, for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// Nothing.
    No,
    /// Its CAR ends early.
    Truncated,
    /// A block does not match its CID.
    BadCid,
    /// Its PDS serves another account's repo.
    WrongDid,
    /// Takendown.
    Takendown,
    /// Deactivated.
    Deactivated,
}

/// One repo of the ground truth.
#[derive(Debug, Clone)]
pub struct RepoTruth {
    /// The account.
    pub did: String,
    /// Its rev.
    pub rev: String,
    /// Every record: key (`collection/rkey`) → (CID, record JSON as generated).
    pub records: BTreeMap<String, (String, serde_json::Value)>,
    /// What is wrong with it.
    pub broken: Broken,
    /// Bytes of its CAR.
    pub car_bytes: usize,
}

struct Repo {
    truth: RepoTruth,
    head: Cid,
    car: bytes::Bytes,
    host: usize,
}

struct Shared {
    repos: Vec<Repo>,
    by_did: HashMap<String, usize>,
    hosts: Vec<String>,
    faults: SyncFaults,
    requests: AtomicU64,
    get_repo: AtomicU64,
    injected: Mutex<BTreeMap<&'static str, u64>>,
}

use std::sync::Mutex;

/// A running sync simulator.
pub struct SyncSim {
    /// The relay's base URL (`http://127.0.0.1:port`): `listRepos`, `listReposByCollection`.
    pub relay: String,
    /// The PLC directory's base URL.
    pub plc: String,
    /// The PDS hosts' base URLs.
    pub hosts: Vec<String>,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for SyncSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncSim")
            .field("relay", &self.relay)
            .field("hosts", &self.hosts)
            .finish()
    }
}

/// 2023-01-01 and 2026-11-01: the span simulated records were made in.
const FROM_US: i64 = 1_672_531_200_000_000;
const TO_US: i64 = 1_793_491_200_000_000;

fn build_repo(cfg: &SyncSimConfig, account: u64, broken: Broken) -> (RepoTruth, Cid, Vec<u8>) {
    let did = did_of(account);
    // skewed sizes: most repos small, some several times the mean
    let mut rng = super::traffic::Rng::new(cfg.seed ^ (account << 20));
    let n = match (account, cfg.big_repo) {
        (0, Some(b)) => b,
        _ => {
            let r = rng.below(100);
            let mean = cfg.records.max(1);
            if r < 60 {
                rng.below(mean) + 1
            } else if r < 95 {
                mean + rng.below(mean * 2)
            } else {
                mean * 3 + rng.below(mean * 6)
            }
        }
    };
    let records = Traffic::history(cfg.seed, cfg.accounts, account, n, FROM_US, TO_US);
    let mut blocks: Vec<(Cid, Vec<u8>)> = Vec::with_capacity(records.len() + 8);
    let mut keys: Vec<(String, Cid)> = Vec::with_capacity(records.len());
    let mut truth = BTreeMap::new();
    for (key, v) in records {
        let mut e = Encoder::new();
        if e.json(&v).is_err() {
            continue;
        }
        let cid = Cid::for_dag_cbor(&e.buf);
        keys.push((key.clone(), cid));
        truth.insert(key, (cid.to_string(), v));
        blocks.push((cid, e.buf));
    }
    let (data, nodes) = build(&keys);
    let last = truth
        .keys()
        .filter_map(|k| k.rsplit_once('/'))
        .filter_map(|(_, r)| crate::syntax::tid_timestamp_us(r))
        .max()
        .unwrap_or(FROM_US);
    let rev = crate::syntax::tid_from_parts((last + 1_000_000) as u64, 0);
    let mut c = Encoder::new();
    c.map(6)
        .text("did")
        .text(&did)
        .text("rev")
        .text(&rev)
        .text("sig")
        .bytes(&[9; 64])
        .text("data")
        .link(&data)
        .text("prev")
        .null()
        .text("version")
        .int(3);
    let head = Cid::for_dag_cbor(&c.buf);
    // some repos put MST nodes first and the commit last, others the commit first
    let mut w = CarWriter::new(&[head]);
    if account.is_multiple_of(2) {
        w.block(&head, &c.buf);
    }
    for (cid, b) in nodes.iter().chain(blocks.iter()) {
        if broken == Broken::BadCid && std::ptr::eq(b, &blocks[blocks.len() / 2].1) {
            let mut bad = b.clone();
            if let Some(x) = bad.last_mut() {
                *x ^= 1;
            }
            w.block(cid, &bad);
        } else {
            w.block(cid, b);
        }
    }
    if !account.is_multiple_of(2) {
        w.block(&head, &c.buf);
    }
    let mut car = w.buf;
    if broken == Broken::Truncated {
        car.truncate(car.len() * 2 / 3);
    }
    let car_bytes = car.len();
    (
        RepoTruth {
            did,
            rev,
            records: truth,
            broken,
            car_bytes,
        },
        head,
        car,
    )
}

/// Which accounts are broken: account 0 is never (it may be the big one); then the faults in
/// order over accounts 1, 2, ….
fn broken_of(f: &SyncFaults, account: u64) -> Broken {
    let mut at = 1;
    for (n, b) in [
        (f.truncated, Broken::Truncated),
        (f.bad_cid, Broken::BadCid),
        (f.wrong_did, Broken::WrongDid),
        (f.takendown, Broken::Takendown),
        (f.deactivated, Broken::Deactivated),
    ] {
        if (at..at + n).contains(&account) {
            return b;
        }
        at += n;
    }
    Broken::No
}

impl SyncSim {
    /// Builds every repo, then serves the relay, the PLC stand-in and the PDS hosts.
    pub async fn start(cfg: SyncSimConfig) -> std::io::Result<SyncSim> {
        let cfg2 = cfg.clone();
        let built = tokio::task::spawn_blocking(move || {
            (0..cfg2.accounts)
                .map(|a| {
                    let b = broken_of(&cfg2.faults, a);
                    build_repo(&cfg2, a, b)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(std::io::Error::other)?;
        let hosts_n = cfg.hosts.max(1);
        let mut listeners = vec![
            tokio::net::TcpListener::bind(
                cfg.listen
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            )
            .await?,
        ];
        for _ in 0..hosts_n {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
        }
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<_, _>>()?;
        let hosts: Vec<String> = addrs[1..].iter().map(|a| format!("http://{a}")).collect();
        let mut repos = Vec::new();
        let mut by_did = HashMap::new();
        for (i, (truth, head, car)) in built.into_iter().enumerate() {
            by_did.insert(truth.did.clone(), i);
            repos.push(Repo {
                truth,
                head,
                car: car.into(),
                host: i % hosts_n,
            });
        }
        let shared = Arc::new(Shared {
            repos,
            by_did,
            hosts: hosts.clone(),
            faults: cfg.faults.clone(),
            requests: AtomicU64::new(0),
            get_repo: AtomicU64::new(0),
            injected: Mutex::new(BTreeMap::new()),
        });
        let relay_app = axum::Router::new()
            .route(
                "/xrpc/com.atproto.sync.listRepos",
                axum::routing::get(list_repos),
            )
            .route(
                "/xrpc/com.atproto.sync.listReposByCollection",
                axum::routing::get(list_by_collection),
            )
            .route("/plc/{did}", axum::routing::get(did_doc))
            .with_state(shared.clone());
        let mut tasks = Vec::new();
        let mut it = listeners.into_iter();
        let relay_l = it
            .next()
            .ok_or_else(|| std::io::Error::other("no listener"))?;
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(relay_l, relay_app).await;
        }));
        for (h, l) in it.enumerate() {
            let app = axum::Router::new()
                .route(
                    "/xrpc/com.atproto.sync.getRepo",
                    axum::routing::get(get_repo),
                )
                .with_state((shared.clone(), h));
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(l, app).await;
            }));
        }
        Ok(SyncSim {
            relay: format!("http://{}", addrs[0]),
            plc: format!("http://{}/plc", addrs[0]),
            hosts,
            shared,
            tasks,
        })
    }

    /// Every repo as it exists (broken ones included, with what is wrong).
    pub fn truth(&self) -> Vec<RepoTruth> {
        self.shared.repos.iter().map(|r| r.truth.clone()).collect()
    }

    /// Requests served.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// `getRepo` requests served.
    pub fn get_repo_requests(&self) -> u64 {
        self.shared.get_repo.load(Ordering::Relaxed)
    }

    /// Records over every readable repo, and CAR bytes over every repo.
    pub fn size(&self) -> (u64, u64) {
        let records = self
            .shared
            .repos
            .iter()
            .filter(|r| r.truth.broken == Broken::No)
            .map(|r| r.truth.records.len() as u64)
            .sum();
        let bytes = self.shared.repos.iter().map(|r| r.car.len() as u64).sum();
        (records, bytes)
    }

    /// Faults injected so far, by name.
    pub fn injected(&self) -> BTreeMap<&'static str, u64> {
        self.shared
            .injected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops serving.
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for SyncSim {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(serde::Deserialize)]
struct ListParams {
    cursor: Option<String>,
    limit: Option<usize>,
    collection: Option<String>,
}

fn status_of(b: Broken) -> Option<&'static str> {
    match b {
        Broken::Takendown => Some("takendown"),
        Broken::Deactivated => Some("deactivated"),
        _ => None,
    }
}

/// Repos sorted by DID, after the cursor (a DID), `limit` at most.
fn page<'a>(
    s: &'a Shared,
    p: &ListParams,
    keep: impl Fn(&Repo) -> bool,
) -> (Vec<&'a Repo>, Option<String>) {
    let mut all: Vec<&Repo> = s.repos.iter().filter(|r| keep(r)).collect();
    all.sort_by(|a, b| a.truth.did.cmp(&b.truth.did));
    let limit = p.limit.unwrap_or(500).clamp(1, 1000);
    let start = match &p.cursor {
        Some(c) => all.partition_point(|r| r.truth.did.as_str() <= c.as_str()),
        None => 0,
    };
    let out: Vec<&Repo> = all.iter().skip(start).take(limit).copied().collect();
    let next = (start + out.len() < all.len())
        .then(|| out.last().map(|r| r.truth.did.clone()))
        .flatten();
    (out, next)
}

async fn list_repos(State(s): State<Arc<Shared>>, Query(p): Query<ListParams>) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let (repos, next) = page(&s, &p, |_| true);
    let repos: Vec<serde_json::Value> = repos
        .iter()
        .map(|r| {
            let mut v = serde_json::json!({
                "did": r.truth.did,
                "head": r.head.to_string(),
                "rev": r.truth.rev,
                "active": status_of(r.truth.broken).is_none(),
            });
            if let Some(st) = status_of(r.truth.broken) {
                v["status"] = st.into();
            }
            v
        })
        .collect();
    axum::Json(serde_json::json!({"repos": repos, "cursor": next})).into_response()
}

async fn list_by_collection(State(s): State<Arc<Shared>>, Query(p): Query<ListParams>) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let Some(coll) = p.collection.clone() else {
        return xrpc_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "collection is required",
        );
    };
    let prefix = format!("{coll}/");
    let (repos, next) = page(&s, &p, |r| {
        status_of(r.truth.broken).is_none()
            && r.truth
                .records
                .range(prefix.clone()..)
                .next()
                .is_some_and(|(k, _)| k.starts_with(&prefix))
    });
    let repos: Vec<serde_json::Value> = repos
        .iter()
        .map(|r| serde_json::json!({"did": r.truth.did}))
        .collect();
    axum::Json(serde_json::json!({"repos": repos, "cursor": next})).into_response()
}

async fn did_doc(State(s): State<Arc<Shared>>, Path(did): Path<String>) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let Some(&i) = s.by_did.get(&did) else {
        return (StatusCode::NOT_FOUND, "DID not registered").into_response();
    };
    let host = &s.hosts[s.repos[i].host];
    axum::Json(serde_json::json!({
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": did,
        "alsoKnownAs": [format!("at://user{i}.sim.test")],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": host}],
    }))
    .into_response()
}

fn xrpc_error(status: StatusCode, name: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": name, "message": message})),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct RepoParams {
    did: String,
}

fn count(s: &Shared, what: &'static str) {
    *s.injected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(what)
        .or_insert(0) += 1;
}

async fn get_repo(
    State((s, host)): State<(Arc<Shared>, usize)>,
    Query(p): Query<RepoParams>,
) -> Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let n = s.get_repo.fetch_add(1, Ordering::Relaxed) + 1;
    let every = |x: Option<u64>| x.is_some_and(|e| n.is_multiple_of(e));
    if every(s.faults.rate_limit_every) {
        count(&s, "rate_limited");
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("1"));
        return (
            StatusCode::TOO_MANY_REQUESTS,
            h,
            axum::Json(serde_json::json!({"error": "RateLimitExceeded", "message": "slow down"})),
        )
            .into_response();
    }
    if every(s.faults.error_every) {
        count(&s, "server_error");
        return xrpc_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "boom",
        );
    }
    let Some(&i) = s.by_did.get(&p.did) else {
        return xrpc_error(StatusCode::BAD_REQUEST, "RepoNotFound", "no such repo");
    };
    let r = &s.repos[i];
    if r.host != host {
        return xrpc_error(StatusCode::BAD_REQUEST, "RepoNotFound", "not on this host");
    }
    match r.truth.broken {
        Broken::Takendown => {
            return xrpc_error(StatusCode::BAD_REQUEST, "RepoTakendown", "takendown");
        }
        Broken::Deactivated => {
            return xrpc_error(StatusCode::BAD_REQUEST, "RepoDeactivated", "deactivated");
        }
        _ => {}
    }
    let car = if r.truth.broken == Broken::WrongDid {
        s.repos[(i + 1) % s.repos.len()].car.clone()
    } else {
        r.car.clone()
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/vnd.ipld.car"),
    );
    if every(s.faults.stall_every) {
        count(&s, "stalled");
        let stall = s.faults.stall;
        let half = car.slice(..car.len() / 2);
        let stream = futures::stream::unfold(0u8, move |step| {
            let half = half.clone();
            async move {
                match step {
                    0 => Some((Ok::<_, std::io::Error>(half), 1)),
                    // then the connection breaks: the client sees a transport error, not an end
                    1 => {
                        tokio::time::sleep(stall).await;
                        Some((Err(std::io::Error::other("stalled")), 2))
                    }
                    _ => None,
                }
            }
        });
        return (headers, axum::body::Body::from_stream(stream)).into_response();
    }
    // in chunks, as a PDS streams it
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..car.len())
        .step_by(64 << 10)
        .map(|o| Ok(car.slice(o..(o + (64 << 10)).min(car.len()))))
        .collect();
    (
        headers,
        axum::body::Body::from_stream(futures::stream::iter(chunks)),
    )
        .into_response()
}
