//! Where queries run: their own threads, a concurrency limit and a bounded queue.
//!
//! Planning and execution happen on a dedicated tokio runtime ([`runtime`]) whose worker
//! threads have [`QUERY_STACK`] of stack, so a plan as deep as the guard allows (`guard`) is
//! far from the stack's end, and a query that keeps its threads busy cannot delay `/health`,
//! `/metrics` or ingest, which run on the process's main runtime. DataFusion's own tasks
//! (repartitions, parallel scans) are spawned from the query's task and land on the same
//! runtime.
//!
//! Admission ([`Admission`]): at most `max_concurrent` queries run at once; up to
//! `queue` more wait for a slot (their wait counts against their timeout); beyond that a query
//! is refused at once with [`QueryError::Busy`] (HTTP 503), so an overload answers quickly
//! instead of piling up.
//!
//! A query's task is aborted when its handle ([`QueryTask`]) is dropped: when the client goes
//! away, when the answer is complete, or at the timeout. Work that does not yield (one long
//! function call) stops at the next deadline check (`bounded`, `deadline`).

use super::QueryError;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// Stack of each query thread. Only the pages a query touches are committed.
pub const QUERY_STACK: usize = 256 << 20;

/// The query runtime, started on first use; one per process (its threads are shared by every
/// engine; admission is per engine).
pub fn runtime() -> Result<&'static tokio::runtime::Runtime, QueryError> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .thread_name("atlake-query")
            .thread_stack_size(QUERY_STACK)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| QueryError::Internal(format!("cannot start the query runtime: {e}")))
}

/// The concurrency limit and the queue of one engine.
#[derive(Debug)]
pub struct Admission {
    running: Arc<Semaphore>,
    /// Queries admitted (running or waiting).
    admitted: Arc<AtomicUsize>,
    max_concurrent: usize,
    queue: usize,
}

/// A query's place: running or waiting; dropping it leaves.
#[derive(Debug)]
pub struct Ticket {
    admitted: Arc<AtomicUsize>,
    running: Arc<Semaphore>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // the last query of this engine has ended: what it held can go back to the system
        if self.admitted.fetch_sub(1, Ordering::AcqRel) == 1 {
            crate::memory::freed();
        }
    }
}

impl Ticket {
    /// Waits for a slot to run in.
    pub async fn slot(&self) -> Result<OwnedSemaphorePermit, QueryError> {
        self.running
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| QueryError::Internal(format!("query slots closed: {e}")))
    }
}

impl Admission {
    /// `max_concurrent` queries at once (at least one), `queue` more waiting.
    pub fn new(max_concurrent: usize, queue: usize) -> Self {
        let max_concurrent = max_concurrent.max(1);
        Admission {
            running: Arc::new(Semaphore::new(max_concurrent)),
            admitted: Arc::new(AtomicUsize::new(0)),
            max_concurrent,
            queue,
        }
    }

    /// A place for one query, or [`QueryError::Busy`] when the slots and the queue are full.
    pub fn admit(&self) -> Result<Ticket, QueryError> {
        let limit = self.max_concurrent + self.queue;
        let mut n = self.admitted.load(Ordering::Acquire);
        loop {
            if n >= limit {
                metrics::counter!("atlake_queries_refused_busy_total").increment(1);
                return Err(QueryError::Busy(format!(
                    "{} queries are running and {} waiting; try again later",
                    self.max_concurrent, self.queue
                )));
            }
            match self
                .admitted
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(Ticket {
                        admitted: self.admitted.clone(),
                        running: self.running.clone(),
                    });
                }
                Err(now) => n = now,
            }
        }
    }
}

/// A query's task on the query runtime; aborted when dropped.
#[derive(Debug)]
pub struct QueryTask<T>(JoinHandle<T>);

impl<T> Drop for QueryTask<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> QueryTask<T> {
    /// Waits for the task's output.
    pub async fn join(&mut self) -> Result<T, QueryError> {
        (&mut self.0).await.map_err(|e| {
            if e.is_panic() {
                metrics::counter!("atlake_query_panics_total").increment(1);
                tracing::error!(error = %e, "a query panicked");
                QueryError::Internal("the query failed unexpectedly (panic); see the log".into())
            } else {
                QueryError::Internal("the query was cancelled".into())
            }
        })
    }
}

/// Runs `work` on the query runtime.
pub fn spawn<F>(work: F) -> Result<QueryTask<F::Output>, QueryError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    Ok(QueryTask(runtime()?.spawn(work)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_refuses_beyond_the_slots_and_the_queue_and_frees_on_drop() {
        let a = Admission::new(2, 1);
        let t: Vec<Ticket> = (0..3).map(|_| a.admit().unwrap()).collect();
        assert!(matches!(a.admit(), Err(QueryError::Busy(_))));
        drop(t);
        assert!(a.admit().is_ok());
    }

    #[tokio::test]
    async fn a_dropped_task_is_aborted() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        })
        .unwrap();
        drop(task);
        // the sender is dropped with the aborted task
        assert!(rx.await.is_err());
    }

    #[test]
    fn query_threads_have_the_large_stack() {
        // a recursion that needs ~64 MiB: fine on a query thread
        fn deep(n: usize) -> usize {
            let pad = [n as u8; 1024];
            if n == 0 {
                return pad[0] as usize;
            }
            deep(n - 1) + std::hint::black_box(pad)[1] as usize
        }
        let rt = runtime().unwrap();
        let n = rt.block_on(async { spawn(async { deep(60_000) }).unwrap().join().await });
        assert!(n.is_ok());
    }
}
