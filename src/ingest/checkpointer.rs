//! The checkpoint writer: stores the newest durable position off the decode loop.
//!
//! The decode loop only ever *asks* for a position (a watch channel: the newest request wins,
//! older ones are skipped). This task stores it; a failed store (object store unreachable, disk
//! full) is retried with backoff until it succeeds, a newer request replaces it, or shutdown
//! gives up. So a slow or failing checkpoint store never stalls reading, and the last position
//! is never forgotten because no further flush happened to come along.

use super::live::LiveState;
use crate::checkpoint::Checkpoint;
use crate::sink::store::Lake;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A position to store: the whole checkpoint file and the cursor it carries for this source.
pub type Request = Option<(Checkpoint, i64)>;

/// Runs until `requests` closes and its last request is stored (or `abandon` is set while it
/// cannot be). Returns the last cursor stored.
pub async fn run(
    lake: Lake,
    live: Arc<LiveState>,
    mut requests: watch::Receiver<Request>,
    mut abandon: watch::Receiver<bool>,
    mut written: Option<i64>,
) -> Option<i64> {
    let mut delay = Duration::from_millis(200);
    let mut closed = false;
    loop {
        closed |= requests.changed().await.is_err();
        // store the newest request, retrying until it lands or is superseded
        loop {
            let Some((cp, cursor)) = requests.borrow_and_update().clone() else {
                break;
            };
            if Some(cursor) == written {
                break;
            }
            match cp.store(&lake).await {
                Ok(()) => {
                    written = Some(cursor);
                    delay = Duration::from_millis(200);
                    live.set_checkpoint(cp);
                    metrics::gauge!("atlake_checkpoint_cursor").set(cursor as f64);
                    break;
                }
                Err(e) => {
                    metrics::counter!("atlake_storage_errors_total", "kind" => "checkpoint")
                        .increment(1);
                    if *abandon.borrow() {
                        tracing::error!(error = %e, "giving up on the checkpoint at shutdown; the lake's files stay authoritative");
                        return written;
                    }
                    tracing::warn!(error = %e, ?delay, "writing the checkpoint failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = abandon.wait_for(|a| *a) => {}
                        // a newer position arrived: store that one instead
                        r = requests.changed(), if !closed => closed = r.is_err(),
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        if closed {
            return written;
        }
    }
}
