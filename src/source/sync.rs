//! The repository sync endpoints a backfill reads: `listRepos` / `listReposByCollection` on a
//! relay or PDS, DID → PDS resolution (PLC directory, `did:web`), and `getRepo` streamed into a
//! bounded block store.
//!
//! Politeness and failure, per host: at most `per_host` requests in flight and at least
//! `min_interval` between the starts of two requests; `429` waits for `Retry-After` (seconds) or
//! `RateLimit-Reset` (epoch seconds), capped at `max_wait`; `5xx`, timeouts and transport errors
//! retry with backoff up to `attempts` times. An XRPC error body (`{"error": "RepoTakendown"}`)
//! is returned as [`SyncError::Xrpc`] with its name, never retried. Every body is size-capped:
//! a hostile server cannot make the client buffer without bound.

use super::repo_blocks::{BlocksError, RepoBlocks};
use crate::backoff::Backoff;
use crate::decode::car::{CarError, CarStream};
use crate::decode::cid::Cid;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// The largest JSON body accepted (a `listRepos` page of 1,000 entries is ~150 KB).
const MAX_JSON: usize = 4 << 20;
/// The largest block section in a repo CAR (records are ≤ 1 MiB; MST nodes far smaller).
pub const MAX_BLOCK: usize = 2 << 20;

/// Why a sync request failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The server answered with an XRPC error (`RepoNotFound`, `RepoTakendown`, …).
    #[error("{status} {name}: {message}")]
    Xrpc {
        /// HTTP status
        status: u16,
        /// the error name (`InvalidRequest` when the body has none)
        name: String,
        /// its message
        message: String,
    },
    /// Retries ran out on 429, 5xx, timeouts or transport errors.
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp {
        /// attempts made
        attempts: u32,
        /// the last failure
        last: String,
    },
    /// The response is not what the endpoint promises.
    #[error("bad response from {url}: {why}")]
    BadResponse {
        /// the request
        url: String,
        /// what is wrong
        why: String,
    },
    /// A DID that cannot be resolved to a PDS.
    #[error("cannot resolve {did}: {why}")]
    Resolve {
        /// the DID
        did: String,
        /// why
        why: String,
    },
    /// The repo CAR is malformed.
    #[error("repo CAR: {0}")]
    Car(#[from] CarError),
    /// The repo does not fit the block store.
    #[error("{0}")]
    Blocks(#[from] BlocksError),
}

impl SyncError {
    /// A short reason for counters and the failure record.
    pub fn reason(&self) -> String {
        match self {
            SyncError::Xrpc { name, .. } => name.clone(),
            SyncError::GaveUp { .. } => "gave_up".into(),
            SyncError::BadResponse { .. } => "bad_response".into(),
            SyncError::Resolve { .. } => "resolve".into(),
            SyncError::Car(CarError::HashMismatch(_)) => "hash_mismatch".into(),
            SyncError::Car(CarError::EndsEarly(_)) => "truncated".into(),
            SyncError::Car(_) => "car".into(),
            SyncError::Blocks(BlocksError::TooLarge { .. }) => "too_large".into(),
            SyncError::Blocks(_) => "spill".into(),
        }
    }
}

/// How the client treats hosts.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// The PLC directory (`https://plc.directory`).
    pub plc: String,
    /// Requests in flight per host.
    pub per_host: usize,
    /// Least time between two request starts on one host.
    pub min_interval: Duration,
    /// Attempts per request (429, 5xx, timeouts, transport errors).
    pub attempts: u32,
    /// The longest a 429 is waited out; a longer `Retry-After` fails the request.
    pub max_wait: Duration,
    /// Timeout of one request, body included, except `getRepo`'s body, which has `idle_timeout`
    /// between chunks instead.
    pub timeout: Duration,
    /// Longest pause between two chunks of a repo.
    pub idle_timeout: Duration,
    /// First retry delay.
    pub backoff: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            plc: "https://plc.directory".into(),
            per_host: 4,
            min_interval: Duration::ZERO,
            attempts: 5,
            max_wait: Duration::from_secs(300),
            timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            backoff: Duration::from_millis(500),
        }
    }
}

/// One entry of `listRepos`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ListedRepo {
    /// The account.
    pub did: String,
    /// Its commit CID (absent from `listReposByCollection`).
    #[serde(default)]
    pub head: Option<String>,
    /// Its revision (absent from older servers).
    #[serde(default)]
    pub rev: Option<String>,
    /// `false` for takendown, suspended, deleted or deactivated repos (absent: active).
    #[serde(default = "yes")]
    pub active: bool,
    /// Why it is inactive.
    #[serde(default)]
    pub status: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(serde::Deserialize)]
struct Page {
    #[serde(default)]
    cursor: Option<String>,
    repos: Vec<ListedRepo>,
}

/// A fetched repo: its root CID and how many bytes came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    /// The CAR's root: the commit.
    pub root: Cid,
    /// CAR bytes read.
    pub bytes: u64,
}

#[derive(Debug)]
struct Host {
    slots: Semaphore,
    next_start: tokio::sync::Mutex<Instant>,
}

/// The sync client. Cheap to clone; clones share the DID cache and the per-host limits.
#[derive(Debug, Clone)]
pub struct SyncClient {
    http: reqwest::Client,
    settings: Arc<SyncSettings>,
    hosts: Arc<Mutex<HashMap<String, Arc<Host>>>>,
    dids: Arc<Mutex<HashMap<String, String>>>,
}

/// What one attempt came to.
enum Attempt<T> {
    Done(T),
    Retry { why: String, wait: Option<Duration> },
}

impl SyncClient {
    /// A client with these settings.
    pub fn new(settings: SyncSettings) -> Result<Self, SyncError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("atlake/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| SyncError::BadResponse {
                url: String::new(),
                why: format!("HTTP client: {e}"),
            })?;
        Ok(SyncClient {
            http,
            settings: Arc::new(settings),
            hosts: Arc::default(),
            dids: Arc::default(),
        })
    }

    fn host(&self, url: &reqwest::Url) -> Result<Arc<Host>, SyncError> {
        let (Some(name), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return Err(SyncError::BadResponse {
                url: url.to_string(),
                why: "no host or port".into(),
            });
        };
        // a poisoned map still holds valid limiters: no update is left half done in it
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        Ok(hosts
            .entry(format!("{name}:{port}"))
            .or_insert_with(|| {
                Arc::new(Host {
                    slots: Semaphore::new(self.settings.per_host.max(1)),
                    next_start: tokio::sync::Mutex::new(Instant::now()),
                })
            })
            .clone())
    }

    /// Runs `attempt` under the host's limits, retrying as the module says.
    async fn with_retries<T, F, Fut>(
        &self,
        url: &reqwest::Url,
        mut attempt: F,
    ) -> Result<T, SyncError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, SyncError>>,
    {
        let host = self.host(url)?;
        let mut backoff = Backoff::new(self.settings.backoff, Duration::from_secs(30));
        let mut last = String::new();
        for n in 1..=self.settings.attempts.max(1) {
            let outcome = {
                let _slot = host.slots.acquire().await.map_err(|_| SyncError::GaveUp {
                    attempts: n,
                    last: "the host's request limiter was closed".into(),
                })?;
                {
                    let mut next = host.next_start.lock().await;
                    tokio::time::sleep_until(*next).await;
                    *next = Instant::now() + self.settings.min_interval;
                }
                attempt().await?
            };
            match outcome {
                Attempt::Done(v) => return Ok(v),
                Attempt::Retry { why, wait } => {
                    metrics::counter!("atlake_backfill_retries_total").increment(1);
                    let delay = match wait {
                        Some(w) if w > self.settings.max_wait => {
                            return Err(SyncError::GaveUp {
                                attempts: n,
                                last: format!("{why} (asked to wait {w:?})"),
                            });
                        }
                        Some(w) => {
                            // the whole host waits, not only this request
                            let mut next = host.next_start.lock().await;
                            *next = (*next).max(Instant::now() + w);
                            w
                        }
                        None => backoff.next_delay(),
                    };
                    tracing::debug!(%url, attempt = n, ?delay, %why, "sync request retried");
                    last = why;
                    if n < self.settings.attempts {
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
        Err(SyncError::GaveUp {
            attempts: self.settings.attempts,
            last,
        })
    }

    /// Classifies a response status: success, an XRPC error to return, or a retry.
    async fn check(resp: reqwest::Response) -> Result<Attempt<reqwest::Response>, SyncError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(Attempt::Done(resp));
        }
        if status.as_u16() == 429 {
            let wait = retry_after(resp.headers());
            return Ok(Attempt::Retry {
                why: "429 Too Many Requests".into(),
                wait: Some(wait.unwrap_or(Duration::from_secs(1))),
            });
        }
        if status.is_server_error() {
            return Ok(Attempt::Retry {
                why: format!("{status}"),
                wait: None,
            });
        }
        let url = resp.url().to_string();
        // an unreadable or oversized error body still leaves the status to report
        let body = match read_capped(resp, 64 << 10).await {
            Ok(Ok(b)) => b,
            _ => Vec::new(),
        };
        #[derive(serde::Deserialize)]
        struct XrpcError {
            error: Option<String>,
            message: Option<String>,
        }
        // a body that is not an XRPC error (a proxy's HTML page) keeps the status as the name
        let e: Option<XrpcError> = serde_json::from_slice(&body).ok();
        let name = e
            .as_ref()
            .and_then(|e| e.error.clone())
            .filter(|n| n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric()))
            .unwrap_or_else(|| format!("Http{}", status.as_u16()));
        let message = e.and_then(|e| e.message).unwrap_or_default();
        tracing::debug!(%url, %status, %name, "sync request refused");
        Err(SyncError::Xrpc {
            status: status.as_u16(),
            name,
            message: message.chars().take(200).collect(),
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: reqwest::Url,
    ) -> Result<T, SyncError> {
        let timeout = self.settings.timeout;
        let body = self
            .with_retries(&url, || {
                let req = self.http.get(url.clone()).timeout(timeout);
                let url = url.clone();
                async move {
                    let resp = match req.send().await {
                        Ok(r) => r,
                        Err(e) => return retry(transport(&e)),
                    };
                    match Self::check(resp).await? {
                        Attempt::Done(resp) => match read_capped(resp, MAX_JSON).await {
                            Ok(Ok(b)) => Ok(Attempt::Done(b)),
                            Ok(Err(why)) => Err(SyncError::BadResponse {
                                url: url.to_string(),
                                why,
                            }),
                            Err(why) => retry(why),
                        },
                        Attempt::Retry { why, wait } => Ok(Attempt::Retry { why, wait }),
                    }
                }
            })
            .await?;
        serde_json::from_slice(&body).map_err(|e| SyncError::BadResponse {
            url: url.to_string(),
            why: e.to_string(),
        })
    }

    /// One page of `com.atproto.sync.listRepos` (or `listReposByCollection` when `collection`
    /// is given) from `host`; the next cursor is `None` on the last page. Entries whose DID is
    /// not a DID are an error for the whole page (the server is broken).
    pub async fn list_repos(
        &self,
        host: &str,
        collection: Option<&str>,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<ListedRepo>, Option<String>), SyncError> {
        let method = if collection.is_some() {
            "com.atproto.sync.listReposByCollection"
        } else {
            "com.atproto.sync.listRepos"
        };
        let mut url = xrpc(host, method)?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("limit", &limit.to_string());
            if let Some(c) = collection {
                q.append_pair("collection", c);
            }
            if let Some(c) = cursor {
                q.append_pair("cursor", c);
            }
        }
        let page: Page = self.get_json(url.clone()).await?;
        if let Some(bad) = page.repos.iter().find(|r| !crate::syntax::is_did(&r.did)) {
            return Err(SyncError::BadResponse {
                url: url.to_string(),
                why: format!("{:?} is not a DID", bad.did),
            });
        }
        if page.cursor.as_deref() == cursor && cursor.is_some() {
            return Err(SyncError::BadResponse {
                url: url.to_string(),
                why: "the cursor did not move".into(),
            });
        }
        Ok((page.repos, page.cursor.filter(|c| !c.is_empty())))
    }

    /// The PDS endpoint of `did` (cached): `did:plc` through the PLC directory, `did:web` through
    /// its host's `/.well-known/did.json` (`http` for `localhost` and loopback hosts, `https`
    /// otherwise).
    pub async fn resolve_pds(&self, did: &str) -> Result<String, SyncError> {
        if let Some(p) = self.dids.lock().unwrap_or_else(|e| e.into_inner()).get(did) {
            return Ok(p.clone());
        }
        let err = |why: String| SyncError::Resolve {
            did: did.to_string(),
            why,
        };
        if !crate::syntax::is_did(did) {
            return Err(err("not a DID".into()));
        }
        let url = if let Some(id) = did.strip_prefix("did:plc:") {
            if !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(err("bad did:plc identifier".into()));
            }
            let base = self.settings.plc.trim_end_matches('/');
            reqwest::Url::parse(&format!("{base}/did%3Aplc%3A{id}"))
                .map_err(|e| err(e.to_string()))?
        } else if let Some(host) = did.strip_prefix("did:web:") {
            if host.contains(':') {
                return Err(err("did:web with a path is not a repo host".into()));
            }
            let host = host.replace("%3A", ":").replace("%3a", ":");
            let name = host.split(':').next().unwrap_or("");
            let scheme = if name == "localhost" || name == "127.0.0.1" {
                "http"
            } else {
                "https"
            };
            reqwest::Url::parse(&format!("{scheme}://{host}/.well-known/did.json"))
                .map_err(|e| err(e.to_string()))?
        } else {
            return Err(err("unsupported DID method".into()));
        };
        let doc: serde_json::Value = match self.get_json(url).await {
            Ok(d) => d,
            Err(SyncError::Xrpc { status, name, .. }) => {
                return Err(err(format!("directory answered {status} {name}")));
            }
            Err(e) => return Err(e),
        };
        if doc.get("id").and_then(|v| v.as_str()) != Some(did) {
            return Err(err("the document is for another DID".into()));
        }
        let pds = doc
            .get("service")
            .and_then(|s| s.as_array())
            .into_iter()
            .flatten()
            .find(|s| {
                s.get("id")
                    .and_then(|v| v.as_str())
                    .is_some_and(|id| id == "#atproto_pds" || id == format!("{did}#atproto_pds"))
            })
            .and_then(|s| s.get("serviceEndpoint"))
            .and_then(|v| v.as_str())
            .ok_or_else(|| err("no #atproto_pds service".into()))?;
        let parsed = reqwest::Url::parse(pds).map_err(|e| err(format!("endpoint: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(err(format!("endpoint {pds:?} is not an http(s) URL")));
        }
        let pds = pds.trim_end_matches('/').to_string();
        self.dids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(did.to_string(), pds.clone());
        Ok(pds)
    }

    /// Forgets a DID's PDS (after an `#identity` event, or when the PDS says the repo moved).
    pub fn forget(&self, did: &str) {
        self.dids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(did);
    }

    /// Streams `getRepo` of `did` from `pds` into `blocks`, verifying every block's hash. A retry
    /// (429, 5xx, a stall) starts the repo over with an emptied store.
    pub async fn get_repo(
        &self,
        pds: &str,
        did: &str,
        blocks: &mut RepoBlocks,
    ) -> Result<Fetched, SyncError> {
        let mut url = xrpc(pds, "com.atproto.sync.getRepo")?;
        url.query_pairs_mut().append_pair("did", did);
        let idle = self.settings.idle_timeout;
        let cell = tokio::sync::Mutex::new(blocks);
        let fetched = self
            .with_retries(&url, || {
                let req = self.http.get(url.clone());
                let cell = &cell;
                async move {
                    let resp = match tokio::time::timeout(idle, req.send()).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => return retry(transport(&e)),
                        Err(_) => return retry("no response".into()),
                    };
                    let mut resp = match Self::check(resp).await? {
                        Attempt::Done(r) => r,
                        Attempt::Retry { why, wait } => return Ok(Attempt::Retry { why, wait }),
                    };
                    let mut store = cell.lock().await;
                    store.clear();
                    let mut car = CarStream::new(MAX_BLOCK);
                    let mut bytes = 0u64;
                    loop {
                        let chunk = match tokio::time::timeout(idle, resp.chunk()).await {
                            Ok(Ok(Some(c))) => c,
                            Ok(Ok(None)) => break,
                            Ok(Err(e)) => return retry(transport(&e)),
                            Err(_) => return retry(format!("stalled for {idle:?}")),
                        };
                        bytes += chunk.len() as u64;
                        car.push(&chunk);
                        while let Some((cid, data)) = car.next_block()? {
                            store.insert(cid, data)?;
                        }
                    }
                    car.finish()?;
                    store.seal()?;
                    let root = car
                        .roots()
                        .and_then(|r| r.first())
                        .copied()
                        .ok_or(CarError::NoRoots)?;
                    Ok(Attempt::Done(Fetched { root, bytes }))
                }
            })
            .await?;
        metrics::counter!("atlake_backfill_car_bytes_total").increment(fetched.bytes);
        Ok(fetched)
    }
}

/// `{host}/xrpc/{method}`, with `host` a base URL (`https://bsky.network`).
fn xrpc(host: &str, method: &str) -> Result<reqwest::Url, SyncError> {
    let base = host.trim_end_matches('/');
    let url = reqwest::Url::parse(&format!("{base}/xrpc/{method}")).map_err(|e| {
        SyncError::BadResponse {
            url: host.to_string(),
            why: format!("not a URL: {e}"),
        }
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(SyncError::BadResponse {
            url: host.to_string(),
            why: "not an http(s) URL".into(),
        });
    }
    Ok(url)
}

/// An attempt to retry after the backoff.
fn retry<T>(why: String) -> Result<Attempt<T>, SyncError> {
    Ok(Attempt::Retry { why, wait: None })
}

fn transport(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else {
        format!("transport: {e}")
    }
}

/// How long a 429 asks to wait: `Retry-After` in seconds, else `RateLimit-Reset` as epoch
/// seconds (or, when small, as seconds from now, as some servers send it).
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let num = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(s) = num("retry-after") {
        return Some(Duration::from_secs(s));
    }
    let reset = num("ratelimit-reset")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(if reset > 1_000_000_000 {
        Duration::from_secs(reset.saturating_sub(now))
    } else {
        Duration::from_secs(reset)
    })
}

/// The body, at most `cap` bytes: `Err` on a transport failure (retryable), `Ok(Err)` when the
/// body is over the cap (not retryable).
async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
) -> Result<Result<Vec<u8>, String>, String> {
    let mut out = Vec::new();
    while let Some(c) = resp.chunk().await.map_err(|e| transport(&e))? {
        if out.len() + c.len() > cap {
            return Ok(Err(format!("body over {cap} bytes")));
        }
        out.extend_from_slice(&c);
    }
    Ok(Ok(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::repo;
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const DID: &str = "did:plc:aaaabbbbccccddddeeeeffff";

    fn repo_car(did: &str, n: u64) -> Vec<u8> {
        repo::sample::repo(did, n, 0).car()
    }

    #[derive(Default)]
    struct Server {
        hits: AtomicUsize,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
        /// what getRepo answers, in turn, before the good CAR
        script: Mutex<Vec<&'static str>>,
        car: Vec<u8>,
        port: AtomicUsize,
    }

    async fn serve(state: Arc<Server>) -> String {
        let app = axum::Router::new()
            .route("/xrpc/com.atproto.sync.listRepos", axum::routing::get(list))
            .route(
                "/xrpc/com.atproto.sync.listReposByCollection",
                axum::routing::get(by_collection),
            )
            .route(
                "/xrpc/com.atproto.sync.getRepo",
                axum::routing::get(get_repo),
            )
            .route("/.well-known/did.json", axum::routing::get(did_web))
            .route("/{did}", axum::routing::get(plc))
            .with_state(state.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        state.port.store(port as usize, Ordering::SeqCst);
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        format!("http://127.0.0.1:{port}")
    }

    async fn list(
        State(s): State<Arc<Server>>,
        Query(q): Query<HashMap<String, String>>,
    ) -> Response {
        s.hits.fetch_add(1, Ordering::SeqCst);
        assert_eq!(q.get("limit").map(String::as_str), Some("2"));
        let page = match q.get("cursor").map(String::as_str) {
            None => serde_json::json!({"cursor": "p2", "repos": [
                {"did": "did:plc:one", "head": "bafyx", "rev": "3l5kq2zbzxk2c", "active": true},
                {"did": "did:plc:two", "head": "bafyx", "rev": "3l5kq2zbzxk2c", "active": false, "status": "takendown"}]}),
            Some("p2") => {
                serde_json::json!({"cursor": "p3", "repos": [{"did": "did:web:example.com", "head": "bafyx"}]})
            }
            Some("p3") => serde_json::json!({"repos": []}),
            Some(_) => return StatusCode::BAD_REQUEST.into_response(),
        };
        axum::Json(page).into_response()
    }

    async fn by_collection(Query(q): Query<HashMap<String, String>>) -> Response {
        assert_eq!(
            q.get("collection").map(String::as_str),
            Some("app.bsky.feed.post")
        );
        axum::Json(serde_json::json!({"repos": [{"did": "did:plc:one"}, {"did": "not a did"}]}))
            .into_response()
    }

    fn doc(did: &str, endpoint: &str) -> Response {
        axum::Json(serde_json::json!({
            "id": did,
            "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": endpoint}]
        }))
        .into_response()
    }

    async fn plc(
        State(s): State<Arc<Server>>,
        axum::extract::Path(did): axum::extract::Path<String>,
    ) -> Response {
        s.hits.fetch_add(1, Ordering::SeqCst);
        let port = s.port.load(Ordering::SeqCst);
        match did.as_str() {
            DID => doc(DID, &format!("http://127.0.0.1:{port}/")),
            "did:plc:wrongdocument" => doc("did:plc:someoneelse", "http://127.0.0.1:1"),
            "did:plc:noservice" => axum::Json(serde_json::json!({"id": did})).into_response(),
            "did:plc:ftpservice" => doc(&did, "ftp://example.com"),
            _ => (StatusCode::NOT_FOUND, "not found").into_response(),
        }
    }

    async fn did_web(State(s): State<Arc<Server>>) -> Response {
        let port = s.port.load(Ordering::SeqCst);
        doc(
            &format!("did:web:localhost%3A{port}"),
            &format!("http://127.0.0.1:{port}"),
        )
    }

    async fn get_repo(
        State(s): State<Arc<Server>>,
        Query(q): Query<HashMap<String, String>>,
    ) -> Response {
        s.hits.fetch_add(1, Ordering::SeqCst);
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.in_flight.fetch_sub(1, Ordering::SeqCst);
        let step = {
            let mut sc = s.script.lock().unwrap();
            if sc.is_empty() { "ok" } else { sc.remove(0) }
        };
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/vnd.ipld.car".parse().unwrap());
        match step {
            "429" => {
                h.insert("retry-after", "1".parse().unwrap());
                (StatusCode::TOO_MANY_REQUESTS, h, "slow down").into_response()
            }
            "429-long" => {
                h.insert("retry-after", "3600".parse().unwrap());
                (StatusCode::TOO_MANY_REQUESTS, h, "slow down").into_response()
            }
            "500" => (StatusCode::INTERNAL_SERVER_ERROR, "oops").into_response(),
            "takendown" => (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": "RepoTakendown", "message": "gone"})),
            )
                .into_response(),
            "truncated" => (h, s.car[..s.car.len() - 10].to_vec()).into_response(),
            "tampered" => {
                let mut b = s.car.clone();
                let n = b.len();
                b[n - 2] ^= 0x40;
                (h, b).into_response()
            }
            "stall" => {
                let half = s.car[..s.car.len() / 2].to_vec();
                let body = futures::stream::iter(vec![Ok::<_, std::io::Error>(half)]).chain(
                    futures::stream::once(async {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        Ok(Vec::new())
                    }),
                );
                (h, axum::body::Body::from_stream(body)).into_response()
            }
            _ => {
                assert_eq!(q.get("did").map(String::as_str), Some(DID));
                (h, s.car.clone()).into_response()
            }
        }
    }

    fn client(base: &str) -> SyncClient {
        SyncClient::new(SyncSettings {
            plc: base.to_string(),
            backoff: Duration::from_millis(10),
            idle_timeout: Duration::from_millis(500),
            attempts: 3,
            ..SyncSettings::default()
        })
        .unwrap()
    }

    fn store() -> RepoBlocks {
        RepoBlocks::new(1 << 20, 1 << 30, std::env::temp_dir())
    }

    async fn fetch(c: &SyncClient, base: &str) -> Result<(Fetched, u64), SyncError> {
        let mut b = store();
        let f = c.get_repo(base, DID, &mut b).await?;
        let (_, n) = repo::walk_records(&b, &f.root, DID, &mut |_| Ok(())).unwrap();
        Ok((f, n))
    }

    use futures::StreamExt;

    #[tokio::test]
    async fn lists_every_page_and_keeps_inactive_repos_marked() {
        let s = Arc::new(Server::default());
        let base = serve(s.clone()).await;
        let c = client(&base);
        let mut cursor = None;
        let mut all = Vec::new();
        loop {
            let (repos, next) = c
                .list_repos(&base, None, cursor.as_deref(), 2)
                .await
                .unwrap();
            all.extend(repos);
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        assert_eq!(all.len(), 3);
        assert!(all[0].active && !all[1].active);
        assert_eq!(all[1].status.as_deref(), Some("takendown"));
        assert!(all[2].active, "an entry without `active` is active");
        assert_eq!(
            s.hits.load(Ordering::SeqCst),
            3,
            "three pages, the last without a cursor"
        );
        // a page with a non-DID is a broken server, not a silent skip
        let e = c
            .list_repos(&base, Some("app.bsky.feed.post"), None, 2)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "bad_response");
    }

    #[tokio::test]
    async fn resolves_plc_and_web_dids_once_and_refuses_bad_documents() {
        let s = Arc::new(Server::default());
        let base = serve(s.clone()).await;
        let c = client(&base);
        let pds = c.resolve_pds(DID).await.unwrap();
        assert_eq!(pds, base);
        let hits = s.hits.load(Ordering::SeqCst);
        assert_eq!(c.resolve_pds(DID).await.unwrap(), base);
        assert_eq!(s.hits.load(Ordering::SeqCst), hits, "cached");
        c.forget(DID);
        c.resolve_pds(DID).await.unwrap();
        assert_eq!(s.hits.load(Ordering::SeqCst), hits + 1);
        let port = s.port.load(Ordering::SeqCst);
        let web = format!("did:web:localhost%3A{port}");
        assert_eq!(c.resolve_pds(&web).await.unwrap(), base);
        for bad in [
            "did:plc:wrongdocument",
            "did:plc:noservice",
            "did:plc:ftpservice",
            "did:plc:unknown",
            "did:key:zabc",
            "not-a-did",
        ] {
            let e = c.resolve_pds(bad).await.unwrap_err();
            assert_eq!(e.reason(), "resolve", "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn fetches_a_repo_and_retries_what_can_be_retried() {
        let car = repo_car(DID, 500);
        let s = Arc::new(Server {
            car,
            ..Server::default()
        });
        let base = serve(s.clone()).await;
        let c = client(&base);
        let (f, n) = fetch(&c, &base).await.unwrap();
        assert_eq!((f.bytes, n), (s.car.len() as u64, 500));
        // 500 then 429 (Retry-After: 1) then the repo
        *s.script.lock().unwrap() = vec!["500", "429"];
        let t = std::time::Instant::now();
        let (_, n) = fetch(&c, &base).await.unwrap();
        assert_eq!(n, 500);
        assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
        // a stalled body is retried: the store starts over and the records come out once
        *s.script.lock().unwrap() = vec!["stall"];
        let (_, n) = fetch(&c, &base).await.unwrap();
        assert_eq!(n, 500);
    }

    #[tokio::test]
    async fn refusals_and_broken_cars_end_with_their_reason() {
        let s = Arc::new(Server {
            car: repo_car(DID, 50),
            ..Server::default()
        });
        let base = serve(s.clone()).await;
        let c = client(&base);
        for (step, reason) in [
            ("takendown", "RepoTakendown"),
            ("truncated", "truncated"),
            ("tampered", "hash_mismatch"),
            ("429-long", "gave_up"),
        ] {
            *s.script.lock().unwrap() = vec![step];
            let e = fetch(&c, &base).await.unwrap_err();
            assert_eq!(e.reason(), reason, "{step}: {e}");
        }
        // retries run out
        *s.script.lock().unwrap() = vec!["500", "500", "500"];
        let e = fetch(&c, &base).await.unwrap_err();
        assert!(matches!(e, SyncError::GaveUp { attempts: 3, .. }), "{e}");
    }

    #[tokio::test]
    async fn at_most_per_host_requests_are_in_flight() {
        let s = Arc::new(Server {
            car: repo_car(DID, 20),
            ..Server::default()
        });
        let base = serve(s.clone()).await;
        let c = SyncClient::new(SyncSettings {
            per_host: 2,
            ..SyncSettings::default()
        })
        .unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (c, base) = (c.clone(), base.clone());
                tokio::spawn(async move {
                    let mut b = store();
                    c.get_repo(&base, DID, &mut b).await.map(|_| ())
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(s.hits.load(Ordering::SeqCst), 8);
        assert_eq!(s.max_in_flight.load(Ordering::SeqCst), 2);
    }
}
