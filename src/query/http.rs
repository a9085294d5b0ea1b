//! The HTTP endpoint (axum).
//!
//! - `POST /sql` (the body is the SQL) and `GET /sql?q=…`, with `format=json|ndjson|csv|arrow|
//!   parquet` or the `Accept` header; results stream.
//! - `GET /tables`, `GET /health`, `GET /metrics`.
//! - Errors are JSON `{error, message}` with a 4xx status for bad or forbidden SQL.
//! - With a token configured, every route but `/health` needs `Authorization: Bearer <token>`.
//!
//! Limits: a per-query timeout, the engine's memory pool, and result rows/bytes. The first
//! megabyte of a result is held back, so an error or limit hit early still gets a proper status;
//! after that the body streams, and a limit hit mid-stream aborts the transfer (the client sees
//! an incomplete response, never a silently truncated one).

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
use datafusion::physical_plan::SendableRecordBatchStream;
use futures::StreamExt;
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
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
    };
    error_response(status, e.code(), &e.to_string())
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| ct_eq(t.trim().as_bytes(), token.as_bytes()));
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
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

/// `?q=` and `?format=`.
#[derive(Debug, Deserialize)]
pub struct SqlParams {
    q: Option<String>,
    format: Option<String>,
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
        Some(q) if !q.trim().is_empty() => run(&s, q.to_string(), format).await,
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
    run(&s, sql.to_string(), format).await
}

/// Plans and starts a query within the deadline.
async fn start_query(
    engine: &QueryEngine,
    sql: &str,
    deadline: Instant,
) -> Result<(arrow::datatypes::SchemaRef, SendableRecordBatchStream), QueryError> {
    let limits = &engine.limits;
    let planned = tokio::time::timeout_at(deadline, async {
        let df = engine.sql(sql).await?;
        let schema: arrow::datatypes::SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let stream = engine.execute(df).await?;
        Ok::<_, QueryError>((schema, stream))
    })
    .await;
    match planned {
        Err(_) => Err(QueryError::Timeout(limits.timeout)),
        Ok(r) => r,
    }
}

/// A result on its way out: batches encoded in the response format, counted against the row
/// and byte limits, within the deadline.
struct Encoding {
    stream: SendableRecordBatchStream,
    enc: Encoder,
    schema: arrow::datatypes::SchemaRef,
    rows: u64,
    /// Bytes produced so far.
    bytes: u64,
    limits: super::Limits,
    deadline: Instant,
    done: bool,
}

impl Encoding {
    fn too_large(&self, what: &str) -> QueryError {
        QueryError::TooLarge(match what {
            "rows" => format!(
                "result has more than {} rows; add a LIMIT",
                self.limits.max_rows
            ),
            _ => format!(
                "result is larger than {} bytes; add a LIMIT or select fewer columns",
                self.limits.max_bytes
            ),
        })
    }

    /// The next encoded bytes (`None` after the last, which carries the format's tail).
    async fn next_bytes(&mut self) -> Result<Option<Vec<u8>>, QueryError> {
        if self.done {
            return Ok(None);
        }
        let next = tokio::time::timeout_at(self.deadline, self.stream.next())
            .await
            .map_err(|_| QueryError::Timeout(self.limits.timeout))?;
        let out = match next {
            None => {
                self.done = true;
                self.enc
                    .finish(&self.schema)
                    .map_err(|e| QueryError::Internal(e.to_string()))?
            }
            Some(Err(e)) => return Err(QueryError::from_datafusion(e)),
            Some(Ok(b)) => {
                self.rows += b.num_rows() as u64;
                if self.rows > self.limits.max_rows {
                    return Err(self.too_large("rows"));
                }
                self.enc
                    .batch(&b)
                    .map_err(|e| QueryError::Internal(e.to_string()))?
            }
        };
        self.bytes += out.len() as u64;
        if self.bytes + self.enc.buffered() as u64 > self.limits.max_bytes {
            return Err(self.too_large("bytes"));
        }
        Ok(Some(out))
    }
}

async fn run(s: &AppState, sql: String, format: Format) -> Response {
    let engine = s.engine.clone();
    let limits = engine.limits.clone();
    let deadline = Instant::now() + limits.timeout;
    metrics::counter!("atlake_queries_total").increment(1);
    let (schema, stream) = match start_query(&engine, &sql, deadline).await {
        Ok(x) => x,
        Err(e) => {
            metrics::counter!("atlake_query_errors_total", "error" => e.code()).increment(1);
            return query_error(&e);
        }
    };
    let (enc, head) = match Encoder::try_new(format, &schema) {
        Ok(x) => x,
        Err(e) => return query_error(&QueryError::Internal(e.to_string())),
    };
    let mut out = Encoding {
        stream,
        enc,
        schema,
        rows: 0,
        bytes: head.len() as u64,
        limits,
        deadline,
        done: false,
    };
    // hold back the first part, so early errors and limits get a real status (Parquet is
    // only complete at its end: all of it is held)
    let mut held = head;
    while held.len() < HOLD_BACK || format == Format::Parquet {
        match out.next_bytes().await {
            Ok(Some(b)) => held.extend_from_slice(&b),
            Ok(None) => {
                return ([(header::CONTENT_TYPE, format.content_type())], held).into_response();
            }
            Err(e) => return query_error(&e),
        }
    }
    // then stream the rest; a failure now can only abort the transfer (the client sees an
    // incomplete response, never a silently truncated one)
    let rest = futures::stream::unfold(out, |mut out| async move {
        match out.next_bytes().await {
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
    Response::builder()
        .header(header::CONTENT_TYPE, format.content_type())
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| {
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
            "ingesting": s.storage.is_some(),
            "lake": s.engine.lake().url(),
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

/// Serves the endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Gives up waiting for in-flight requests after this long at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
