//! The committer: commits written files and the newest durable position to the lake's Delta
//! log, off the decode loop.
//!
//! The decode loop sends every file the writer made durable (an unbounded channel, in
//! order) and then *asks* for a position (a watch channel: the newest request wins, older ones
//! are skipped). Because a file is always sent before the position it justifies, the files
//! drained after a position is seen include every file that position needs. This task
//! commits them together: quarantine files to the `_errors` log, then the `events` files and
//! the cursor (a `txn` action) in one `events` commit. A failed commit (object store
//! unreachable, disk full) is retried with backoff until it succeeds, a newer request joins
//! it, or shutdown gives up; before a retry the logs are read again, so a commit that landed
//! although its reply was lost is not made twice. So a slow or failing store never stalls
//! reading, and the last position is never forgotten because no further flush happened to come
//! along.

use crate::backoff::Backoff;
use crate::catalog::Catalog;
use crate::checkpoint::compact::{Replace, commit_replace};
pub use crate::checkpoint::compact::{RewriteRequest, ToCommitter};
use crate::checkpoint::delta::{self, CommitOutcome, Table};
use crate::checkpoint::{Checkpoint, CheckpointError, Logs};
use crate::model::{Cursor, SourceKind};
use crate::sink::lease::FenceError;
use crate::sink::partition::LakeFile;
use crate::sink::store::Lake;
use crate::sink::store::StoreError;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// A position to store: the whole checkpoint and the cursor it carries for this source.
pub type Request = Option<(Checkpoint, Cursor)>;

/// What the committer works on.
pub struct Committer {
    /// The lake (fenced by the writer lease).
    pub lake: Lake,
    /// Where the committed checkpoint is published.
    pub catalog: Arc<Catalog>,
    /// The source whose cursor is committed.
    pub source: SourceKind,
    /// Both logs as recovery read them.
    pub logs: Logs,
    /// Retention, vacuum and log retention (`lake.*`).
    pub keep: crate::checkpoint::retention::Keep,
    /// Commits of the compactor (compaction and purge rewrites), each answered.
    pub rewrites: Option<mpsc::Receiver<RewriteRequest>>,
}

/// Commits a compactor's rewrite and shows it to the daemon's queries. After an error the
/// logs are read again: a commit that landed although its reply was lost counts as landed.
async fn commit_rewrite(c: &mut Committer, r: &Replace) -> Result<bool, CheckpointError> {
    let res = commit_replace(&c.lake, c.logs.get_mut(r.table), r).await;
    let res = match res {
        Err(e) => match Logs::load(&c.lake).await {
            Ok(l) => {
                let landed = r.landed(l.get(r.table));
                c.logs = l;
                if landed { Ok(true) } else { Err(e) }
            }
            Err(_) => Err(e),
        },
        ok => ok,
    };
    if let Ok(true) = res {
        let gone: Vec<String> = r.removes.iter().map(|f| f.path.clone()).collect();
        let added: Vec<LakeFile> = r.added().cloned().collect();
        c.catalog.replace_files(&gone, &added);
    }
    res
}

/// How often retention and vacuum run (also once at start).
const MAINTENANCE_EVERY: Duration = Duration::from_secs(3600);

/// One retention and vacuum pass; a failure is logged and counted, and the next pass tries
/// again. Files retention removed leave the daemon's view at once.
async fn maintain(c: &mut Committer) {
    expire_and_vacuum(c).await;
    let gone: Vec<String> = c
        .logs
        .events
        .removed
        .keys()
        .chain(c.logs.errors.removed.keys())
        .chain(c.logs.history.removed.keys())
        .cloned()
        .collect();
    c.catalog.remove_paths(&gone);
}

async fn expire_and_vacuum(c: &mut Committer) {
    let now = crate::model::cursor::now_us();
    match crate::checkpoint::retention::pass(&c.lake, &mut c.logs, c.keep, now).await {
        Ok(p) if p.expired + p.vacuumed + p.log_entries > 0 => {
            tracing::info!(
                expired = p.expired,
                vacuumed = p.vacuumed,
                log_entries = p.log_entries,
                "retention and vacuum"
            );
        }
        Ok(_) => {}
        Err(e) => {
            metrics::counter!("atlake_storage_errors_total", "kind" => "retention").increment(1);
            tracing::warn!(error = %e, "retention or vacuum failed; the next pass tries again");
        }
    }
}

/// Runs until `requests` and `files` close and what they carried is committed (or `abandon`
/// is set while it cannot be). Returns the last cursor committed.
pub async fn run(
    mut c: Committer,
    mut requests: watch::Receiver<Request>,
    mut files: mpsc::UnboundedReceiver<LakeFile>,
    mut abandon: watch::Receiver<bool>,
    mut written: Option<Cursor>,
) -> Option<Cursor> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut closed = false;
    let mut files_closed = false;
    let mut pending: Vec<LakeFile> = Vec::new();
    let mut rewrites = c.rewrites.take();
    let mut maintenance = tokio::time::interval(MAINTENANCE_EVERY);
    maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if !(closed && files_closed) {
            tokio::select! {
                _ = maintenance.tick() => maintain(&mut c).await,
                r = async { match rewrites.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                } }, if rewrites.is_some() => match r {
                    Some((r, reply)) => {
                        let res = commit_rewrite(&mut c, &r).await;
                        if let Err(e) = &res {
                            metrics::counter!("atlake_storage_errors_total", "kind" => "compaction").increment(1);
                            tracing::warn!(error = %e, "committing a compaction failed");
                        }
                        // the compactor may have stopped waiting (shutdown): nothing to tell
                        let _ = reply.send(res);
                    }
                    None => rewrites = None,
                },
                r = requests.changed(), if !closed => closed = r.is_err(),
                f = files.recv(), if !files_closed => match f {
                    Some(f) => pending.push(f),
                    None => files_closed = true,
                },
            }
        }
        // commit the files and the newest request, retrying until they land
        loop {
            let request = requests.borrow_and_update().clone();
            while let Ok(f) = files.try_recv() {
                pending.push(f);
            }
            let cursor = request
                .as_ref()
                .map(|(_, c)| *c)
                .filter(|c| Some(*c) != written);
            if pending.is_empty() && cursor.is_none() {
                break;
            }
            match commit(&mut c, &pending, request.as_ref(), cursor).await {
                Ok(()) => {
                    pending.clear();
                    backoff.reset();
                    if let (Some((cp, _)), Some(cur)) = (request, cursor) {
                        written = Some(cur);
                        c.catalog.set_checkpoint(cp);
                        metrics::gauge!("atlake_checkpoint_cursor").set(cur.value() as f64);
                    }
                    break;
                }
                Err(e) => {
                    metrics::counter!("atlake_storage_errors_total", "kind" => "checkpoint")
                        .increment(1);
                    if let CheckpointError::Store(StoreError::Fenced(FenceError::Lost(why))) = &e {
                        tracing::error!(%why, "the writer lease was lost; nothing further is committed");
                        return written;
                    }
                    if *abandon.borrow() {
                        tracing::error!(error = %e, "giving up on the commit at shutdown; what is not committed comes again on the next start");
                        return written;
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "committing to the lake's log failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = abandon.wait_for(|a| *a) => {}
                        // a newer position arrived: commit that one instead
                        r = requests.changed(), if !closed => closed = r.is_err(),
                    }
                    // the failed commit may have landed: read the logs again before retrying
                    match Logs::load(&c.lake).await {
                        Ok(l) => {
                            pending.retain(|f| match Table::of(f) {
                                Some(Table::Events) => !l.events.files.contains_key(&f.path),
                                Some(Table::Errors) => !l.errors.files.contains_key(&f.path),
                                Some(Table::History) | None => true,
                            });
                            if let Some((v, _)) = l.events.txn(c.source)
                                && let Ok(cur) = Cursor::try_new(c.source, v)
                            {
                                written = written.max(Some(cur));
                            }
                            c.logs = l;
                        }
                        Err(e) => tracing::warn!(error = %e, "reading the lake's log again failed"),
                    }
                }
            }
        }
        if closed && files_closed {
            return written;
        }
    }
}

/// One round: the quarantine's files, then the `events` files with the cursor.
async fn commit(
    c: &mut Committer,
    pending: &[LakeFile],
    request: Option<&(Checkpoint, Cursor)>,
    cursor: Option<Cursor>,
) -> Result<(), CheckpointError> {
    let now = crate::model::cursor::now_us() / 1000;
    // every `events` commit records the newest requested checkpoint (the endpoints); before
    // the first request there is none to record
    let info = match request {
        Some((cp, _)) => delta::positions_info(serde_json::to_value(cp).map_err(|e| {
            CheckpointError::Corrupt {
                path: Table::Events.log_path(""),
                message: e.to_string(),
            }
        })?),
        None => serde_json::json!({}),
    };
    for table in Table::ALL {
        let mut actions: Vec<serde_json::Value> = pending
            .iter()
            .filter(|f| Table::of(f) == Some(table))
            .map(|f| delta::add_action(table, f, true, now))
            .collect::<Result<_, _>>()?;
        if table == Table::Events
            && let Some(cur) = cursor
        {
            actions.push(delta::txn_action(c.source, cur.value(), now));
        }
        if actions.is_empty() {
            continue;
        }
        let log = c.logs.get_mut(table);
        let info = if table == Table::Events {
            info.clone()
        } else {
            serde_json::json!({})
        };
        match delta::commit(&c.lake, table, log, "STREAMING UPDATE", info, actions).await? {
            CommitOutcome::Committed(_) => {}
            CommitOutcome::Conflict(v) => {
                // the lease makes this process the only writer: another commit at our version
                // is a broken invariant, not a race to retry
                metrics::counter!("atlake_broken_invariants_total").increment(1);
                return Err(CheckpointError::Corrupt {
                    path: table.log_path(&delta::commit_name(v)),
                    message: "another writer committed this version".into(),
                });
            }
        }
    }
    Ok(())
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

    type Running = (
        tokio::task::JoinHandle<Option<Cursor>>,
        watch::Sender<Request>,
        mpsc::UnboundedSender<LakeFile>,
        watch::Sender<bool>,
    );

    /// Runs `c` with fresh channels: its task, and the request, file and abandon senders.
    fn start(c: Committer) -> Running {
        let (tx, rx) = watch::channel(None);
        let (ftx, frx) = mpsc::unbounded_channel();
        let (abandon_tx, abandon) = watch::channel(false);
        (
            tokio::spawn(run(c, rx, frx, abandon, None)),
            tx,
            ftx,
            abandon_tx,
        )
    }

    /// A committer writing through `lake`, after recovery through its unfenced `base`.
    async fn committer(base: &Lake, lake: &Lake, catalog: Arc<Catalog>) -> Committer {
        let rec = crate::checkpoint::recover(base, SourceKind::Firehose, 0)
            .await
            .unwrap();
        Committer {
            lake: lake.clone(),
            catalog,
            source: SourceKind::Firehose,
            logs: rec.logs,
            keep: crate::checkpoint::retention::Keep::of(&crate::config::LakeConfig::default()),
            rewrites: None,
        }
    }

    fn data_file(first: i64) -> LakeFile {
        use crate::sink::partition::{FileName, PartitionKey, PartitionName, parse_path};
        let key = PartitionKey::at_hour(
            PartitionName::Collection("app.bsky.feed.post".into()),
            493_000,
        )
        .unwrap();
        let name = FileName::try_new(
            Cursor::seq(first).unwrap(),
            Cursor::seq(first + 1).unwrap(),
            1,
        )
        .unwrap();
        parse_path(&format!("{}/{}", key.dir(), name.render()), 10).unwrap()
    }

    /// A failing store is retried with backoff until it works; a newer position replaces the
    /// one being retried; the last position asked for is the one committed, with the files
    /// sent before it.
    #[tokio::test(start_paused = true)]
    async fn retries_until_committed_and_the_newest_request_wins() {
        let fence = Fence::new(Some(Instant::now()));
        let base = Lake::open("memory://").unwrap();
        let lake = base.fenced(fence.clone());
        let catalog = Arc::new(Catalog::default());
        let c = committer(&base, &lake, catalog.clone()).await;
        let (task, tx, ftx, _abandon) = start(c);
        ftx.send(data_file(1)).unwrap();
        tx.send(request(10)).unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(
            Checkpoint::load(&lake)
                .await
                .unwrap()
                .unwrap()
                .cursor(SourceKind::Firehose),
            None,
            "not committed yet"
        );
        ftx.send(data_file(11)).unwrap();
        tx.send(request(20)).unwrap();
        fence.extend(Instant::now() + Duration::from_secs(3600));
        tokio::time::sleep(Duration::from_secs(11)).await;
        let stored = Checkpoint::load(&lake).await.unwrap().unwrap();
        assert_eq!(stored.cursor(SourceKind::Firehose), Cursor::seq(20).ok());
        assert_eq!(
            stored.position(SourceKind::Firehose).unwrap().url,
            "wss://relay"
        );
        let log = delta::load(&lake, Table::Events).await.unwrap();
        assert_eq!(log.files.len(), 2, "both files, once");
        assert_eq!(
            catalog.snapshot().checkpoint.cursor(SourceKind::Firehose),
            stored.cursor(SourceKind::Firehose)
        );
        drop(tx);
        drop(ftx);
        let written = task.await.unwrap();
        assert_eq!(written, Cursor::seq(20).ok());
    }

    /// A file alone (the cursor pinned by an older partition) is committed without waiting for
    /// the cursor to move.
    #[tokio::test]
    async fn files_are_committed_without_a_new_position() {
        let lake = Lake::open("memory://").unwrap();
        let c = committer(&lake, &lake, Arc::default()).await;
        let (task, _tx, ftx, _abandon) = start(c);
        ftx.send(data_file(5)).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while delta::load(&lake, Table::Events)
            .await
            .unwrap()
            .files
            .is_empty()
        {
            assert!(std::time::Instant::now() < until, "never committed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
    }

    /// A lost lease ends the committer without committing.
    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_stops_the_committer() {
        let fence = Fence::new(Some(Instant::now()));
        let base = Lake::open("memory://").unwrap();
        let lake = base.fenced(fence.clone());
        let c = committer(&base, &lake, Arc::default()).await;
        let (task, tx, _ftx, _abandon) = start(c);
        tx.send(request(10)).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        fence.lose("taken over".into());
        let written = tokio::time::timeout(Duration::from_secs(11), task)
            .await
            .expect("ended")
            .unwrap();
        assert_eq!(written, None);
        assert_eq!(
            Checkpoint::load(&lake)
                .await
                .unwrap()
                .unwrap()
                .cursor(SourceKind::Firehose),
            None
        );
    }

    /// With `lake.retention` set, the committer drops partitions older than it as soon as it
    /// starts (and every hour after): the old file leaves the log, the recent one stays.
    #[tokio::test]
    async fn the_committer_applies_retention_at_start() {
        let lake = Lake::open("memory://").unwrap();
        let mut c = committer(&lake, &lake, Arc::default()).await;
        let old = data_file(1); // hour 493_000: the year 2026
        let recent = {
            use crate::sink::partition::{FileName, PartitionKey, PartitionName, parse_path};
            let hour = crate::model::cursor::now_us() / crate::sink::partition::HOUR_US;
            let key = PartitionKey::at_hour(PartitionName::Account, hour).unwrap();
            let name =
                FileName::try_new(Cursor::seq(9).unwrap(), Cursor::seq(9).unwrap(), 1).unwrap();
            parse_path(&format!("{}/{}", key.dir(), name.render()), 10).unwrap()
        };
        let mut adds: Vec<_> = [&old, &recent]
            .iter()
            .map(|f| delta::add_action(Table::Events, f, true, 1).unwrap())
            .collect();
        adds.push(delta::txn_action(SourceKind::Firehose, 9, 1));
        let (cp, _) = request(9).unwrap();
        delta::commit(
            &lake,
            Table::Events,
            &mut c.logs.events,
            "WRITE",
            delta::positions_info(serde_json::to_value(&cp).unwrap()),
            adds,
        )
        .await
        .unwrap();
        c.keep.retention_us = Some(2 * 3600 * 1_000_000);
        let (task, _tx, _ftx, _abandon) = start(c);
        let until = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = delta::load(&lake, Table::Events).await.unwrap();
            if !log.files.contains_key(&old.path) {
                assert!(log.files.contains_key(&recent.path));
                assert!(log.removed.contains_key(&old.path));
                // the retention commit records no positions: the endpoint stays known
                let read = Checkpoint::load(&lake).await.unwrap().unwrap();
                assert_eq!(read.cursor(SourceKind::Firehose), Cursor::seq(9).ok());
                assert_eq!(
                    read.position(SourceKind::Firehose).unwrap().url,
                    "wss://relay"
                );
                break;
            }
            assert!(std::time::Instant::now() < until, "retention never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
    }
}
