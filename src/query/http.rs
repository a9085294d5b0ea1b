//! The HTTP endpoint (axum).
//!
//! - `POST /sql` (the body is the SQL) and `GET /sql?q=…`, with `format=json|ndjson|csv|arrow|
//!   parquet` or the `Accept` header; results stream.
//!   With `schema=1`, the response carries the result's Arrow schema in an `X-Atlake-Schema`
//!   header (JSON, [`console::SCHEMA_HEADER`]); the body is the same.
//! - `GET /tables`, `GET /health`, `GET /metrics`, `GET`/`PUT /filters` (daemon).
//! - `GET /`: the web console ([`console`]): a SQL editor with the example questions, paged
//!   typed results, CSV/Parquet downloads, the tables, and a live page for the daemon; its
//!   files (`/`, `/console/…`) are embedded in the binary and hold no data.
//! - Errors are JSON `{error, message}` with a 4xx status for bad or forbidden SQL.
//! - With a token configured, every route but `/health` and the console's files needs
//!   `Authorization: Bearer <token>`.
//!
//! Limits: a per-query timeout, the engine's memory pool, and result rows/bytes. The first
//! megabyte of a result is held back, so an error or limit hit early still gets a proper status;
//! after that the body streams, and a limit hit mid-stream aborts the transfer (the client sees
//! an incomplete response, never a silently truncated one).
//!
//! A query runs as one task on the query runtime (`pool`): planning, execution and encoding,
//! all under one deadline. The task sends encoded chunks through a channel of two; the
//! response reads them. When the client goes away, the answer is complete, or the deadline
//! passes, the task is aborted and its plan dropped. A result is encoded a slice of rows at a
//! time, each slice checked against the byte limit, so a result over the limit stops there.
//!
//! Connections ([`serve`]): the header must arrive within `header_timeout` (also the limit for
//! an idle keep-alive connection), the body within `body_timeout`; a connection with nothing
//! read or written for `idle_timeout` is closed; at most `max_connections` are open, more wait
//! in the listen backlog.
use super::console;
use super::format::{Encoder, Format};
use super::{QueryEngine, QueryError};
use crate::catalog::StorageHealth;
use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Shared state of the endpoint.
pub struct AppState {
    /// The engine.
    pub engine: Arc<QueryEngine>,
    /// Bearer token required on every route but `/health`.
    pub token: Option<String>,
    /// Storage health of the daemon's writer, when ingesting.
    pub storage: Option<Arc<StorageHealth>>,
    /// The daemon's collection/DID filters, changeable at run time (`PUT /filters`).
    pub filters: Option<tokio::sync::watch::Sender<crate::model::Filters>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("token", &self.token.is_some())
            .finish()
    }
}

/// Bytes held back before a response starts streaming.
const HOLD_BACK: usize = 1 << 20;

fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn query_error(e: &QueryError) -> Response {
    let status = match e {
        QueryError::Sql(_) | QueryError::ResourcesExhausted(_) => StatusCode::BAD_REQUEST,
        QueryError::Forbidden(_) => StatusCode::FORBIDDEN,
        QueryError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
        QueryError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        QueryError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        QueryError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error_response(status, e.code(), &e.to_string())
}

async fn auth(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(req).await;
    };
    // the console's files hold no data: the page asks for the token for what it fetches
    if req.uri().path() == "/health" || console::is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| super::frontend::ct_eq(t.trim().as_bytes(), token.as_bytes()));
    if ok {
        next.run(req).await
    } else {
        let mut r = error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    }
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/sql", get(sql_get).post(sql_post))
        .route("/tables", get(tables))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/filters", get(filters_get).put(filters_put))
        .merge(console::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Any other route: a JSON error like every other, naming the routes there are.
async fn not_found(uri: axum::http::Uri) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!(
            "no route {}: try POST /sql, GET /sql?q=, GET /tables, GET /health, GET /metrics, or / for the console",
            uri.path()
        ),
    )
}

/// Largest request body.
const BODY_LIMIT: usize = 1 << 20;

/// Reads the whole body (at most [`BODY_LIMIT`]) within the body timeout, before the handler.
async fn read_body(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let limit = state.engine.limits.conn.body_timeout;
    let read = tokio::time::timeout(limit, axum::body::to_bytes(body, BODY_LIMIT)).await;
    let bytes = match read {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if too_large {
                error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "bad_request",
                    &format!("the body is larger than {BODY_LIMIT} bytes"),
                )
            } else {
                error_response(StatusCode::BAD_REQUEST, "bad_request", &e.to_string())
            };
        }
        Err(_) => {
            metrics::counter!("atlake_http_body_timeouts_total").increment(1);
            return error_response(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                &format!("the request body did not arrive within {limit:?}"),
            );
        }
    };
    next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// `?q=`, `?format=` and `?schema=`.
#[derive(Debug, Deserialize)]
pub struct SqlParams {
    q: Option<String>,
    format: Option<String>,
    /// `1` or `true`: the result's Arrow schema in the `X-Atlake-Schema` header.
    schema: Option<String>,
}

impl SqlParams {
    fn wants_schema(&self) -> bool {
        matches!(self.schema.as_deref(), Some("1" | "true"))
    }
}

#[allow(clippy::result_large_err)] // the error is the response to send
fn pick_format(params: &SqlParams, headers: &HeaderMap) -> Result<Format, Response> {
    if let Some(f) = &params.format {
        return Format::parse(f).ok_or_else(|| {
            error_response(
                StatusCode::BAD_REQUEST,
                "bad_format",
                &format!("unknown format {f:?} (json, ndjson, csv, arrow, parquet)"),
            )
        });
    }
    Ok(headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .and_then(Format::from_accept)
        .unwrap_or(Format::Json))
}

async fn sql_get(
    State(s): State<Arc<AppState>>,
    Query(p): Query<SqlParams>,
    headers: HeaderMap,
) -> Response {
    let format = match pick_format(&p, &headers) {
        Ok(f) => f,
        Err(r) => return r,
    };
    match p.q.as_deref() {
        Some(q) if !q.trim().is_empty() => run(&s, q.to_string(), format, p.wants_schema()).await,
        _ => error_response(
            StatusCode::BAD_REQUEST,
            "bad_sql",
            "missing query: use GET /sql?q=SELECT… or POST /sql",
        ),
    }
}

async fn sql_post(
    State(s): State<Arc<AppState>>,
    Query(p): Query<SqlParams>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let format = match pick_format(&p, &headers) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => return error_response(e.status(), "bad_request", &e.body_text()),
    };
    let Ok(sql) = std::str::from_utf8(&body) else {
        return error_response(StatusCode::BAD_REQUEST, "bad_sql", "the body is not UTF-8");
    };
    if sql.trim().is_empty() {
        return error_response(StatusCode::BAD_REQUEST, "bad_sql", "empty query");
    }
    run(&s, sql.to_string(), format, p.wants_schema()).await
}

/// Rows encoded at once when a batch is large: the byte limit is checked between slices.
const ENCODE_SLICE_BYTES: usize = 1 << 20;

/// A result on its way out: batches encoded in the response format, counted against the row
/// and byte limits, within the deadline.
struct Encoding {
    rows: super::frontend::Rows,
    enc: Encoder,
    schema: arrow::datatypes::SchemaRef,
    /// Bytes produced so far.
    bytes: u64,
    limits: super::Limits,
    deadline: Instant,
    done: bool,
    format: Format,
}

impl Encoding {
    fn too_large(&self) -> QueryError {
        super::frontend::too_many_bytes(self.limits.max_bytes)
    }

    /// Encodes a batch a slice at a time, stopping as soon as the byte limit is passed.
    fn encode(&mut self, b: &arrow::record_batch::RecordBatch) -> Result<Vec<u8>, QueryError> {
        let size = super::frontend::batch_bytes(b);
        let rows = b.num_rows();
        // a batch whose values alone pass the limit is refused before any is encoded: strings
        // and binaries encode to at least their own size in every format but Parquet; other
        // columns may shrink (a 0 takes one byte in JSON), so they get four times the room
        let text = super::frontend::text_bytes(b) as u64;
        if self.bytes + size as u64 > self.limits.max_bytes.saturating_mul(4)
            || (self.format != Format::Parquet && self.bytes + text > self.limits.max_bytes)
        {
            return Err(self.too_large());
        }
        let per_slice = if size <= ENCODE_SLICE_BYTES || rows <= 1 {
            rows.max(1)
        } else {
            (rows * ENCODE_SLICE_BYTES / size).max(1)
        };
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < rows {
            if Instant::now() >= self.deadline {
                return Err(QueryError::Timeout(self.limits.timeout));
            }
            let len = per_slice.min(rows - offset);
            let part = self
                .enc
                .batch(&b.slice(offset, len))
                .map_err(|e| QueryError::Internal(e.to_string()))?;
            out.extend_from_slice(&part);
            if self.bytes + (out.len() + self.enc.buffered()) as u64 > self.limits.max_bytes {
                return Err(self.too_large());
            }
            offset += len;
        }
        Ok(out)
    }

    /// The next encoded bytes (`None` after the last, which carries the format's tail).
    async fn next_bytes(&mut self) -> Result<Option<Vec<u8>>, QueryError> {
        if self.done {
            return Ok(None);
        }
        let out = match self.rows.next().await? {
            None => {
                self.done = true;
                self.enc
                    .finish(&self.schema)
                    .map_err(|e| QueryError::Internal(e.to_string()))?
            }
            Some(b) => self.encode(&b)?,
        };
        self.bytes += out.len() as u64;
        if self.bytes + self.enc.buffered() as u64 > self.limits.max_bytes {
            return Err(self.too_large());
        }
        Ok(Some(out))
    }
}

/// One query from plan to encoded bytes, on the query runtime: chunks go to `tx` until the
/// result ends, fails, reaches the deadline, or the receiver is gone.
async fn produce(
    engine: Arc<QueryEngine>,
    sql: String,
    format: Format,
    deadline: Instant,
    ticket: super::pool::Ticket,
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, QueryError>>,
    schema_tx: Option<tokio::sync::oneshot::Sender<arrow::datatypes::SchemaRef>>,
) {
    let limits = engine.limits.clone();
    let work = async {
        let _slot = ticket.slot().await?;
        let (schema, stream) = engine
            .open(&sql, None, deadline.into_std(), super::Dialect::DataFusion)
            .await?;
        // before the first chunk: the response has it once it has any bytes
        if let Some(s) = schema_tx
            && s.send(schema.clone()).is_err()
        {
            tracing::debug!("a query's schema had no response to go to");
        }
        let (enc, head) =
            Encoder::try_new(format, &schema).map_err(|e| QueryError::Internal(e.to_string()))?;
        let mut out = Encoding {
            rows: super::frontend::Rows::new(stream, &limits, deadline),
            enc,
            schema,
            bytes: head.len() as u64,
            limits: limits.clone(),
            deadline,
            done: false,
            format,
        };
        if tx.send(Ok(head)).await.is_err() {
            return Ok(());
        }
        while let Some(b) = out.next_bytes().await? {
            if tx.send(Ok(b)).await.is_err() {
                // the client is gone: drop the plan
                return Ok(());
            }
        }
        Ok(())
    };
    let r = match tokio::time::timeout_at(deadline, work).await {
        Ok(r) => r,
        Err(_) => Err(QueryError::Timeout(limits.timeout)),
    };
    // the response side may be gone (the client left): nobody is left to tell
    if let Err(e) = r
        && tx.send(Err(e)).await.is_err()
    {
        tracing::debug!("a query's error had no client to go to");
    }
}

/// The response side of a query: chunks from its task, within the deadline (plus a moment
/// for the task's own timeout error to arrive first).
struct Chunks {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, QueryError>>,
    /// The query's entry in `/metrics`, closed when the response is dropped.
    tally: super::frontend::Tally,
    /// Aborted when the response is dropped.
    _task: super::pool::QueryTask<()>,
    deadline: Instant,
    timeout: Duration,
    done: bool,
}

impl Chunks {
    async fn next(&mut self) -> Result<Option<Vec<u8>>, QueryError> {
        if self.done {
            return Ok(None);
        }
        let grace = Duration::from_millis(250);
        match tokio::time::timeout_at(self.deadline + grace, self.rx.recv()).await {
            Err(_) => {
                self.done = true;
                metrics::counter!("atlake_query_overruns_total").increment(1);
                tracing::warn!(timeout = ?self.timeout, "a query did not stop at its deadline; its task is aborted");
                let e = QueryError::Timeout(self.timeout);
                self.tally.failed(&e);
                Err(e)
            }
            Ok(None) => {
                self.done = true;
                Ok(None)
            }
            Ok(Some(Err(e))) => {
                self.done = true;
                self.tally.failed(&e);
                Err(e)
            }
            Ok(Some(Ok(b))) => Ok(Some(b)),
        }
    }
}

async fn run(s: &AppState, sql: String, format: Format, with_schema: bool) -> Response {
    let engine = s.engine.clone();
    let limits = engine.limits.clone();
    let deadline = Instant::now() + limits.timeout;
    let mut tally = super::frontend::Tally::start(super::frontend::Protocol::Http);
    let mut fail = |e: QueryError| {
        tally.failed(&e);
        query_error(&e)
    };
    let ticket = match engine.admit() {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let (schema_tx, mut schema_rx) = tokio::sync::oneshot::channel();
    let schema_tx = with_schema.then_some(schema_tx);
    let task = match super::pool::spawn(produce(
        engine, sql, format, deadline, ticket, tx, schema_tx,
    )) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let mut out = Chunks {
        tally,
        rx,
        _task: task,
        deadline,
        timeout: limits.timeout,
        done: false,
    };
    // hold back the first part, so early errors and limits get a real status (Parquet is
    // only complete at its end: all of it is held)
    let mut held = Vec::new();
    let mut complete = false;
    while held.len() < HOLD_BACK || format == Format::Parquet {
        match out.next().await {
            Ok(Some(b)) => held.extend_from_slice(&b),
            Ok(None) => {
                complete = true;
                break;
            }
            Err(e) => return query_error(&e),
        }
    }
    // sent before the first chunk, so here by now
    let schema = if with_schema {
        // the task sends it before its first chunk: missing here is a broken invariant
        let header = schema_rx
            .try_recv()
            .ok()
            .and_then(|s| console::schema_header(&s));
        if header.is_none() {
            metrics::counter!("atlake_http_schema_header_missing_total").increment(1);
            tracing::error!(
                "schema=1 was asked for but the result's schema did not arrive before its rows; the response goes without X-Atlake-Schema"
            );
        }
        header
    } else {
        None
    };
    if complete {
        let mut r = ([(header::CONTENT_TYPE, format.content_type())], held).into_response();
        if let Some(v) = schema {
            r.headers_mut().insert(console::SCHEMA_HEADER, v);
        }
        return r;
    }
    // then stream the rest; a failure now can only abort the transfer (the client sees an
    // incomplete response, never a silently truncated one)
    let rest = futures::stream::unfold(out, |mut out| async move {
        match out.next().await {
            Ok(Some(b)) => Some((Ok(Bytes::from(b)), out)),
            Ok(None) => None,
            Err(e) => {
                out.done = true;
                Some((
                    Err(std::io::Error::other(format!("{e}; response aborted"))),
                    out,
                ))
            }
        }
    });
    let body = futures::stream::once(async move { Ok::<Bytes, std::io::Error>(Bytes::from(held)) })
        .chain(rest);
    let mut builder = Response::builder().header(header::CONTENT_TYPE, format.content_type());
    if let Some(v) = schema {
        builder = builder.header(console::SCHEMA_HEADER, v);
    }
    builder.body(Body::from_stream(body)).unwrap_or_else(|e| {
        error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        )
    })
}

async fn tables(State(s): State<Arc<AppState>>) -> Response {
    match s.engine.tables().await {
        Ok(ts) => {
            let v: Vec<serde_json::Value> = ts
                .iter()
                .map(|(name, schema)| {
                    serde_json::json!({
                        "name": name,
                        "columns": schema.fields().iter().map(|f| serde_json::json!({
                            "name": f.name(),
                            "type": f.data_type().to_string(),
                            "nullable": f.is_nullable(),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            axum::Json(v).into_response()
        }
        Err(e) => query_error(&e),
    }
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let (status, storage) = match &s.storage {
        Some(h) if h.no_space.load(Ordering::Relaxed) => ("degraded", "disk_full"),
        Some(h) if h.failing.load(Ordering::Relaxed) => ("degraded", "failing"),
        _ => ("ok", "ok"),
    };
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(serde_json::json!({
            "status": status,
            "storage": storage,
        })),
    )
        .into_response()
}

fn filters_json(f: &crate::model::Filters) -> serde_json::Value {
    serde_json::json!({
        "collections": f.collections(),
        "dids": f.dids().iter().map(|d| d.as_str()).collect::<Vec<_>>(),
    })
}

async fn filters_get(State(s): State<Arc<AppState>>) -> Response {
    match &s.filters {
        Some(tx) => axum::Json(filters_json(&tx.borrow())).into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            "not_ingesting",
            "filters exist only in the daemon (atlake run)",
        ),
    }
}

#[derive(Debug, Deserialize)]
struct FiltersBody {
    #[serde(default)]
    collections: Vec<String>,
    #[serde(default)]
    dids: Vec<String>,
}

/// Replaces the filters; Jetstream gets them as an `options_update`, the firehose applies them
/// client-side.
async fn filters_put(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let Some(tx) = &s.filters else {
        return error_response(
            StatusCode::NOT_FOUND,
            "not_ingesting",
            "filters exist only in the daemon (atlake run)",
        );
    };
    let parsed: FiltersBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_filters",
                &format!("expected {{\"collections\": [...], \"dids\": [...]}}: {e}"),
            );
        }
    };
    match crate::model::Filters::try_new(parsed.collections, parsed.dids) {
        Ok(f) => {
            let _ = tx.send(f.clone());
            tracing::info!(collections = ?f.collections(), dids = f.dids().len(), "filters changed");
            axum::Json(filters_json(&f)).into_response()
        }
        Err(e) => error_response(StatusCode::BAD_REQUEST, "bad_filters", &e.to_string()),
    }
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics().render(),
    )
        .into_response()
}

/// Serves the endpoint on `listener` until `shutdown` resolves, then lets the open
/// connections finish their requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.engine.limits.conn.clone();
    let app = router(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    while let Some((sock, slot)) = super::frontend::next_connection(
        &listener,
        &slots,
        shutdown.as_mut(),
        super::frontend::Protocol::Http,
    )
    .await?
    {
        while conns.try_join_next().is_some() {}
        conns.spawn(connection(
            sock,
            app.clone(),
            limits.clone(),
            stopped.clone(),
            slot,
        ));
    }
    let _ = stop.send(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// When a connection last read or wrote a byte, in milliseconds since `since`.
#[derive(Debug)]
struct Activity {
    since: std::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.since.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.since + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let until = last + idle;
            if std::time::Instant::now() >= until {
                return;
            }
            tokio::time::sleep_until(until.into()).await;
        }
    }
}

/// A socket that records its activity.
struct Tracked {
    inner: tokio::net::TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for Tracked {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl tokio::io::AsyncWrite for Tracked {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One connection, until it ends, idles out, or the server stops (then its current request
/// finishes first).
async fn connection(
    sock: tokio::net::TcpStream,
    app: Router,
    limits: super::ConnLimits,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let _ = sock.set_nodelay(true);
    let activity = Arc::new(Activity {
        since: std::time::Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let io = hyper_util::rt::TokioIo::new(Tracked {
        inner: sock,
        activity: activity.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let conn = builder.serve_connection(io, hyper_util::service::TowerToHyperService::new(app));
    tokio::pin!(conn);
    let mut stopping = false;
    metrics::gauge!("atlake_http_connections").increment(1.0);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            _ = stopped.wait_for(|s| *s), if !stopping => {
                conn.as_mut().graceful_shutdown();
                stopping = true;
            }
            _ = activity.idle_for(limits.idle_timeout) => {
                metrics::counter!("atlake_http_idle_closed_total").increment(1);
                tracing::debug!(idle = ?limits.idle_timeout, "closing an idle connection");
                break;
            }
        }
    }
    metrics::gauge!("atlake_http_connections").decrement(1.0);
}

/// Gives up waiting for in-flight requests after this long at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
