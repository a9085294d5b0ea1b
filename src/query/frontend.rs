//! What every front end (HTTP, the Postgres wire protocol) shares around the query core:
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
}

impl Protocol {
    /// The `protocol` label in `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Postgres => "postgres",
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
