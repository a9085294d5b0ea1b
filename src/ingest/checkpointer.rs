//! The checkpoint writer: stores the newest durable position off the decode loop.
//!
//! The decode loop only ever *asks* for a position (a watch channel: the newest request wins,
//! older ones are skipped). This task stores it; a failed store (object store unreachable, disk
//! full) is retried with backoff until it succeeds, a newer request replaces it, or shutdown
//! gives up. So a slow or failing checkpoint store never stalls reading, and the last position
//! is never forgotten because no further flush happened to come along.

use crate::backoff::Backoff;
use crate::catalog::Catalog;
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::model::Cursor;
use crate::sink::lease::FenceError;
use crate::sink::store::Lake;
use crate::sink::store::StoreError;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A position to store: the whole checkpoint file and the cursor it carries for this source.
pub type Request = Option<(Checkpoint, Cursor)>;

/// Runs until `requests` closes and its last request is stored (or `abandon` is set while it
/// cannot be). Returns the last cursor stored.
pub async fn run(
    lake: Lake,
    catalog: Arc<Catalog>,
    mut requests: watch::Receiver<Request>,
    mut abandon: watch::Receiver<bool>,
    mut written: Option<Cursor>,
) -> Option<Cursor> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
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
                    backoff.reset();
                    catalog.set_checkpoint(cp);
                    metrics::gauge!("atlake_checkpoint_cursor").set(cursor.value() as f64);
                    break;
                }
                Err(e) => {
                    metrics::counter!("atlake_storage_errors_total", "kind" => "checkpoint")
                        .increment(1);
                    if let CheckpointError::Store(StoreError::Fenced(FenceError::Lost(why))) = &e {
                        tracing::error!(%why, "the writer lease was lost; no further checkpoint is written");
                        return written;
                    }
                    if *abandon.borrow() {
                        tracing::error!(error = %e, "giving up on the checkpoint at shutdown; the lake's files stay authoritative");
                        return written;
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "writing the checkpoint failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = abandon.wait_for(|a| *a) => {}
                        // a newer position arrived: store that one instead
                        r = requests.changed(), if !closed => closed = r.is_err(),
                    }
                }
            }
        }
        if closed {
            return written;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::SourcePosition;
    use crate::model::{Cursor, SourceKind};
    use crate::sink::lease::Fence;
    use tokio::time::Instant;

    fn request(v: i64) -> Request {
        let c = Cursor::seq(v).unwrap();
        let mut cp = Checkpoint::default();
        cp.set(SourceKind::Firehose, SourcePosition::new(c, "wss://relay"))
            .unwrap();
        Some((cp, c))
    }

    /// A failing store is retried with backoff until it works; a newer position replaces the
    /// one being retried; the last position asked for is the one stored.
    #[tokio::test(start_paused = true)]
    async fn retries_until_stored_and_the_newest_request_wins() {
        let fence = Fence::new(Some(Instant::now()));
        let lake = Lake::open("memory://").unwrap().fenced(fence.clone());
        let catalog = Arc::new(Catalog::default());
        let (tx, rx) = watch::channel(None);
        let (_abandon_tx, abandon) = watch::channel(false);
        let task = tokio::spawn(run(lake.clone(), catalog.clone(), rx, abandon, None));
        tx.send(request(10)).unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(
            Checkpoint::load(&lake).await.unwrap(),
            None,
            "not stored yet"
        );
        tx.send(request(20)).unwrap();
        fence.extend(Instant::now() + Duration::from_secs(3600));
        tokio::time::sleep(Duration::from_secs(11)).await;
        let stored = Checkpoint::load(&lake).await.unwrap().unwrap();
        assert_eq!(stored.cursor(SourceKind::Firehose), Cursor::seq(20).ok());
        assert_eq!(
            catalog.snapshot().checkpoint.cursor(SourceKind::Firehose),
            stored.cursor(SourceKind::Firehose)
        );
        drop(tx);
        let written = task.await.unwrap();
        assert_eq!(written, Cursor::seq(20).ok());
    }

    /// A lost lease ends the checkpoint writer without storing.
    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_stops_the_checkpoint_writer() {
        let fence = Fence::new(Some(Instant::now()));
        let lake = Lake::open("memory://").unwrap().fenced(fence.clone());
        let (tx, rx) = watch::channel(None);
        let (_abandon_tx, abandon) = watch::channel(false);
        let task = tokio::spawn(run(lake.clone(), Arc::default(), rx, abandon, None));
        tx.send(request(10)).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        fence.lose("taken over".into());
        let written = tokio::time::timeout(Duration::from_secs(11), task)
            .await
            .expect("ended")
            .unwrap();
        assert_eq!(written, None);
        assert_eq!(Checkpoint::load(&lake).await.unwrap(), None);
    }
}
