//! What every front end (HTTP, the Postgres wire protocol, Flight SQL) shares around the query core:
//! which protocol a query came through, and its count, latency and errors in `/metrics`
//! under that protocol's name.
//!
//! The core itself is [`super::QueryEngine`]: `plan` (the guard, the read-only check, the
//! snapshot, the dialect, the parameters), `execute_until` (the deadline inside every
//! operator), admission and the query runtime (`pool`), and [`Rows`] (the row limit and the
//! deadline between batches). Each front end only encodes what the core produces and counts
//! its encoded bytes against the same byte limit.

use super::QueryError;
use arrow::record_batch::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The front end a query came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `POST /sql`, `GET /sql`.
    Http,
    /// The Postgres wire protocol (`server.pg_listen`).
    Postgres,
    /// Arrow Flight SQL (`server.flight_listen`).
    FlightSql,
}

impl Protocol {
    /// The `protocol` label in `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Postgres => "postgres",
            Protocol::FlightSql => "flight_sql",
        }
    }
}

/// One query's entry in `/metrics`: counted when it starts, its latency and outcome recorded
/// when it ends (dropped: the client left, recorded as it stands).
#[derive(Debug)]
pub struct Tally {
    protocol: Protocol,
    started: Instant,
    error: Option<&'static str>,
}

impl Tally {
    /// Counts a query of `protocol`.
    pub fn start(protocol: Protocol) -> Tally {
        metrics::counter!("atlake_queries_total", "protocol" => protocol.as_str()).increment(1);
        Tally {
            protocol,
            started: Instant::now(),
            error: None,
        }
    }

    /// Records the query's error (its [`QueryError::code`]); the last one counts.
    pub fn failed(&mut self, e: &QueryError) {
        self.error = Some(e.code());
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let p = self.protocol.as_str();
        metrics::histogram!("atlake_query_seconds", "protocol" => p)
            .record(self.started.elapsed().as_secs_f64());
        if let Some(code) = self.error {
            metrics::counter!("atlake_query_errors_total", "protocol" => p, "error" => code)
                .increment(1);
        }
    }
}

/// A result's batches within the row limit and the deadline.
pub struct Rows {
    stream: SendableRecordBatchStream,
    rows: u64,
    max_rows: u64,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl Rows {
    /// The batches of `stream`, at most `max_rows` rows in all, until `deadline`.
    pub fn new(
        stream: SendableRecordBatchStream,
        limits: &super::Limits,
        deadline: tokio::time::Instant,
    ) -> Rows {
        Rows {
            stream,
            rows: 0,
            max_rows: limits.max_rows,
            deadline,
            timeout: limits.timeout,
        }
    }

    /// The next batch, `None` at the end; a result past the row limit or the deadline is an
    /// error, never a shorter result.
    pub async fn next(&mut self) -> Result<Option<RecordBatch>, QueryError> {
        let next = tokio::time::timeout_at(self.deadline, self.stream.next())
            .await
            .map_err(|_| QueryError::Timeout(self.timeout))?;
        match next {
            None => Ok(None),
            Some(Err(e)) => Err(QueryError::from_datafusion(e)),
            Some(Ok(b)) => {
                self.rows += b.num_rows() as u64;
                if self.rows > self.max_rows {
                    return Err(too_many_rows(self.max_rows));
                }
                Ok(Some(b))
            }
        }
    }
}

/// The row limit's error.
pub fn too_many_rows(max_rows: u64) -> QueryError {
    QueryError::TooLarge(format!("result has more than {max_rows} rows; add a LIMIT"))
}

/// The byte limit's error.
pub fn too_many_bytes(max_bytes: u64) -> QueryError {
    QueryError::TooLarge(format!(
        "result is larger than {max_bytes} bytes; add a LIMIT or select fewer columns"
    ))
}

/// Bytes of the string and binary values of a batch's rows.
pub fn text_bytes(b: &arrow::record_batch::RecordBatch) -> usize {
    use arrow::datatypes::DataType;
    b.columns()
        .iter()
        .filter(|c| {
            matches!(
                c.data_type(),
                DataType::Utf8
                    | DataType::LargeUtf8
                    | DataType::Utf8View
                    | DataType::Binary
                    | DataType::LargeBinary
                    | DataType::BinaryView
            )
        })
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size())
        })
        .sum()
}

/// Bytes a batch's rows hold (a slice counts only its rows).
pub fn batch_bytes(b: &arrow::record_batch::RecordBatch) -> usize {
    b.columns()
        .iter()
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size())
        })
        .sum()
}

/// The next connection of a front end: waits for one of `slots` (the connection cap), then for
/// a connection; `None` once `shutdown` resolves. An accept error (out of file descriptors
/// and the like) is counted and waited out while connections close.
pub async fn next_connection<F: std::future::Future<Output = ()>>(
    listener: &tokio::net::TcpListener,
    slots: &Arc<tokio::sync::Semaphore>,
    mut shutdown: std::pin::Pin<&mut F>,
    protocol: Protocol,
) -> std::io::Result<Option<(tokio::net::TcpStream, tokio::sync::OwnedSemaphorePermit)>> {
    let slot = tokio::select! {
        _ = &mut shutdown => return Ok(None),
        s = slots.clone().acquire_owned() => s.map_err(std::io::Error::other)?,
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(None),
            r = listener.accept() => match r {
                Ok((sock, _)) => return Ok(Some((sock, slot))),
                Err(e) => {
                    match protocol {
                        Protocol::Http => metrics::counter!("atlake_http_accept_errors_total").increment(1),
                        Protocol::Postgres => metrics::counter!("atlake_pg_accept_errors_total").increment(1),
                        Protocol::FlightSql => metrics::counter!("atlake_flight_accept_errors_total").increment(1),
                    }
                    tracing::warn!(error = %e, protocol = protocol.as_str(), "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Whether two byte strings are equal, in time that depends only on their lengths (token
/// checks of every front end).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Time a query's own timeout error gets to arrive before the waiting side gives up on it.
const GRACE: Duration = Duration::from_millis(250);

/// Starts a query on the query runtime through the core and waits for its columns: the
/// admission ticket, a slot, [`super::QueryEngine::open`] (the guard, the read-only check, the
/// snapshot, the parameters) and [`Rows`], all under one deadline. `head` turns the result's
/// schema into what the front end sends first (and the state its encoder keeps); `encode`
/// turns each batch into what it sends next, counting bytes against the limit it keeps.
///
/// Planning errors come back before anything is sent. The returned stream ends after the
/// last batch, or with the first error; dropping it aborts the query's task and drops the
/// plan (the client left). A task that does not stop at its deadline is counted in
/// `atlake_query_overruns_total` and reported as a timeout.
pub async fn start<H, S, T, F, E>(
    engine: &Arc<super::QueryEngine>,
    sql: String,
    params: Option<datafusion::common::ParamValues>,
    dialect: super::Dialect,
    head: F,
    mut encode: E,
) -> Result<
    (
        H,
        impl futures::Stream<Item = Result<T, QueryError>> + Send + 'static,
    ),
    QueryError,
>
where
    H: Send + 'static,
    S: Send + 'static,
    T: Send + 'static,
    F: FnOnce(&arrow::datatypes::SchemaRef) -> Result<(H, S), QueryError> + Send + 'static,
    E: FnMut(&mut S, RecordBatch) -> Result<T, QueryError> + Send + 'static,
{
    let limits = engine.limits.clone();
    let timeout = limits.timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let ticket = engine.admit()?;
    let (head_tx, head_rx) = tokio::sync::oneshot::channel::<Result<H, QueryError>>();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Option<T>, QueryError>>(2);
    let e = engine.clone();
    let task = super::pool::spawn(async move {
        let open = async {
            let _slot = ticket.slot().await?;
            let (schema, stream) = e.open(&sql, params, deadline.into_std(), dialect).await?;
            let (h, state) = head(&schema)?;
            Ok::<_, QueryError>((h, state, Rows::new(stream, &limits, deadline)))
        };
        let (h, mut state, mut rows) = match tokio::time::timeout_at(deadline, open).await {
            Ok(Ok(x)) => x,
            Ok(Err(err)) => {
                if head_tx.send(Err(err)).is_err() {
                    tracing::debug!("a query's error had no client to go to");
                }
                return;
            }
            Err(_) => {
                if head_tx.send(Err(QueryError::Timeout(timeout))).is_err() {
                    tracing::debug!("a query's timeout had no client to go to");
                }
                return;
            }
        };
        if head_tx.send(Ok(h)).is_err() {
            return;
        }
        loop {
            let chunk = match rows.next().await {
                Ok(None) => Ok(None),
                Ok(Some(b)) => encode(&mut state, b).map(Some),
                Err(err) => Err(err),
            };
            let last = !matches!(chunk, Ok(Some(_)));
            // the client is gone, or that was the last word: the plan is dropped
            if tx.send(chunk).await.is_err() || last {
                return;
            }
        }
    })?;
    let h = match tokio::time::timeout_at(deadline + GRACE, head_rx).await {
        Ok(Ok(r)) => r?,
        Ok(Err(_)) => {
            return Err(QueryError::Internal(
                "the query ended without an answer (see the log)".into(),
            ));
        }
        Err(_) => {
            metrics::counter!("atlake_query_overruns_total").increment(1);
            return Err(QueryError::Timeout(timeout));
        }
    };
    // the task is aborted when the stream is dropped (the client left, or the rows are sent)
    let rows = futures::stream::unfold((rx, Some(task)), move |(mut rx, task)| async move {
        task.as_ref()?;
        let item = match tokio::time::timeout_at(deadline + GRACE, rx.recv()).await {
            Err(_) => {
                metrics::counter!("atlake_query_overruns_total").increment(1);
                Err(QueryError::Timeout(timeout))
            }
            // a task that ends without its last word failed (it panicked, or was stopped)
            Ok(None) => Err(QueryError::Internal(
                "the query ended before its last row (see the log)".into(),
            )),
            Ok(Some(Ok(None))) => return None,
            Ok(Some(Ok(Some(rows)))) => Ok(rows),
            Ok(Some(Err(err))) => Err(err),
        };
        let task = if item.is_err() { None } else { task };
        Some((item, (rx, task)))
    });
    Ok((h, rows))
}
