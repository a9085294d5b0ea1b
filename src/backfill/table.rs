//! The backfill's commits to the lake's Delta logs: every batch's history files to the
//! `history` table (with the batch number as its `txn`, app id
//! [`crate::checkpoint::delta::BACKFILL_APP_ID`]), and its quarantine files to the `_errors`
//! table, just before.
//!
//! The batch's record (`_atlake/backfill/batch-<n>.json`, [`super::progress`]) is written
//! first: it is what says which repos are done. The log commits follow; a crash between the
//! two leaves files of a committed batch that no log names yet, and the next start's
//! [`catch_up`] commits them (every data file of the backfill that survives the recovery of
//! its progress is of a committed batch). Until then Delta readers do not see them; a start of
//! `ingest` or `run` leaves them alone (they are beyond the history's `txn`). A history with no
//! log yet (a lake from before it) gets its first commit the same way: every history file of a
//! committed batch.
//!
//! `atlake backfill` holds the writer lease and commits straight to the logs; in the daemon
//! the committer owns the logs, and the backfill hands it its commits.

use crate::catalog::Catalog;
use crate::checkpoint::compact::{Replace, Submit, ToCommitter, commit_replace};
use crate::checkpoint::delta::Table;
use crate::checkpoint::{CheckpointError, Logs};
use crate::sink::partition::LakeFile;
use crate::sink::store::Lake;
use std::sync::Arc;

/// Where the backfill's commits go.
pub enum Commits {
    /// Straight to the logs (`atlake backfill`, which alone holds the lease), as read at start.
    Direct(Box<Logs>),
    /// Through the daemon's committer, which owns the logs and shows the files to queries.
    Committer(ToCommitter),
}

impl Commits {
    /// Commits `r`. An answer of "not committed" (only a rewrite whose inputs left the table
    /// can get one) is an error here: an append has no inputs.
    async fn submit(&mut self, lake: &Lake, r: Replace) -> Result<(), CheckpointError> {
        let table = r.table;
        let landed = match self {
            Commits::Direct(logs) => commit_replace(lake, logs.get_mut(table), &r).await?,
            Commits::Committer(c) => c.submit(r).await?,
        };
        if landed {
            Ok(())
        } else {
            metrics::counter!("atlake_broken_invariants_total").increment(1);
            Err(CheckpointError::Corrupt {
                path: table.log_path(""),
                message: "a backfill append was refused".into(),
            })
        }
    }

    /// Whether the commits go through the daemon's committer (which shows committed files to
    /// the daemon's queries itself).
    pub fn shows_files(&self) -> bool {
        matches!(self, Commits::Committer(_))
    }
}

/// Commits the files of `batch` (already durable, its record written): the quarantine's to
/// `_errors`, then the history's with the batch number. Without history files the commit
/// still moves the `txn` on.
pub async fn commit_batch(
    commits: &mut Commits,
    lake: &Lake,
    batch: i64,
    files: &[LakeFile],
) -> Result<(), CheckpointError> {
    let (errors, history): (Vec<LakeFile>, Vec<LakeFile>) = files
        .iter()
        .cloned()
        .partition(|f| Table::of(f) == Some(Table::Errors));
    if let Some(f) = history
        .iter()
        .find(|f| Table::of(f) != Some(Table::History))
    {
        metrics::counter!("atlake_broken_invariants_total").increment(1);
        return Err(CheckpointError::Corrupt {
            path: f.path.clone(),
            message: "a backfill file outside the history and the quarantine".into(),
        });
    }
    if !errors.is_empty() {
        commits
            .submit(
                lake,
                Replace {
                    table: Table::Errors,
                    appends: errors,
                    data_change: true,
                    ..Default::default()
                },
            )
            .await?;
    }
    commits
        .submit(
            lake,
            Replace {
                table: Table::History,
                appends: history,
                data_change: true,
                batch: Some(batch),
                ..Default::default()
            },
        )
        .await
}

/// What the catch-up did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CaughtUp {
    /// History files committed.
    pub history: usize,
    /// Quarantine files committed.
    pub errors: usize,
    /// Whether the history table got its log now.
    pub created: bool,
}

/// Commits the files of committed batches that no log names yet: `kept` are the backfill's
/// files that the recovery of its progress kept (all of committed batches), `last_batch` the
/// newest committed batch. `logs` are the logs as read after that recovery.
pub async fn catch_up(
    commits: &mut Commits,
    lake: &Lake,
    logs: &Logs,
    kept: &[LakeFile],
    last_batch: Option<i64>,
    catalog: Option<&Arc<Catalog>>,
) -> Result<CaughtUp, CheckpointError> {
    let done = logs.history.backfill_batch();
    let mut out = CaughtUp {
        created: logs.history.version.is_none(),
        ..Default::default()
    };
    let mut files = Vec::new();
    for f in kept.iter().filter(|f| logs.awaits_backfill(f)) {
        let Some(t) = Table::of(f) else { continue };
        let log = logs.get(t);
        if log.files.contains_key(&f.path) || log.removed.contains_key(&f.path) {
            continue;
        }
        match t {
            Table::History => out.history += 1,
            Table::Errors => out.errors += 1,
            Table::Events => continue,
        }
        files.push(f.clone());
    }
    let Some(batch) = last_batch else {
        if files.is_empty() {
            return Ok(CaughtUp::default());
        }
        metrics::counter!("atlake_broken_invariants_total").increment(1);
        return Err(CheckpointError::Corrupt {
            path: Table::History.log_path(""),
            message: format!(
                "{} backfill files of committed batches, and no committed batch",
                files.len()
            ),
        });
    };
    if files.is_empty() && done.is_some_and(|d| d >= batch) {
        return Ok(CaughtUp::default());
    }
    tracing::info!(
        history = out.history,
        quarantine = out.errors,
        batch,
        new_table = out.created,
        "committing backfilled files no log names yet"
    );
    commit_batch(commits, lake, batch, &files).await?;
    if let Some(c) = catalog
        && !commits.shows_files()
    {
        c.add_files(&files);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backfill::progress::{BatchRecord, Progress};
    use crate::sink::partition::parse_path;

    /// Writes a data file and the record of its batch (a flush that crashed before its log
    /// commits).
    async fn batch_without_commits(lake: &Lake, p: &mut Progress, batch: i64, paths: &[String]) {
        for path in paths {
            lake.put_atomic(path, bytes::Bytes::from_static(b"rows"))
                .await
                .unwrap();
        }
        let r = BatchRecord {
            version: 1,
            batch,
            files: paths.to_vec(),
            ..Default::default()
        };
        p.commit(lake, &r).await.unwrap();
    }

    fn history(batch: i64) -> String {
        format!(
            "history/collection=app.bsky.feed.post/month=2024-01/rp-{batch}-{batch}-00000001.parquet"
        )
    }

    fn quarantine(batch: i64) -> String {
        format!("_errors/date=2026-12-01/hour=05/rp-{batch}-{batch}-00000002.parquet")
    }

    /// A start: the progress recovered (files of uncommitted batches removed, returned), then
    /// the catch-up.
    async fn catch_up_now(lake: &Lake) -> (CaughtUp, Vec<String>) {
        let (p, _, removed, kept) = Progress::recover_with_files(lake).await.unwrap();
        let logs = Logs::load(lake).await.unwrap();
        let mut commits = Commits::Direct(Box::new(logs.clone()));
        let got = catch_up(&mut commits, lake, &logs, &kept, p.last_batch, None)
            .await
            .unwrap();
        (got, removed)
    }

    /// A history from before its log gets one (every file of a committed batch); files of a
    /// batch whose record was written but whose commits were not are committed by the next
    /// start, quarantine files to `_errors`; an uncommitted batch's files are removed, never
    /// committed; a start with nothing to catch up commits nothing.
    #[tokio::test]
    async fn a_start_commits_the_files_of_committed_batches_that_no_log_names() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = Lake::open(tmp.path().to_str().unwrap()).unwrap();
        let mut p = Progress::default();
        batch_without_commits(&lake, &mut p, 1, &[history(1)]).await;
        batch_without_commits(&lake, &mut p, 2, &[history(2)]).await;
        let (got, removed) = catch_up_now(&lake).await;
        assert!(removed.is_empty());
        assert_eq!(
            got,
            CaughtUp {
                history: 2,
                errors: 0,
                created: true
            }
        );
        let logs = Logs::load(&lake).await.unwrap();
        assert_eq!(logs.history.version, Some(0));
        assert_eq!(
            logs.history.files.keys().cloned().collect::<Vec<_>>(),
            vec![history(1), history(2)]
        );
        assert_eq!(logs.history.backfill_batch(), Some(2));
        // batch 3 crashed after its record, with a quarantine file; batch 4 before its record
        batch_without_commits(&lake, &mut p, 3, &[history(3), quarantine(3)]).await;
        lake.put_atomic(&history(4), bytes::Bytes::from_static(b"rows"))
            .await
            .unwrap();
        let (got, removed) = catch_up_now(&lake).await;
        assert_eq!(removed, vec![history(4)]);
        assert_eq!(
            got,
            CaughtUp {
                history: 1,
                errors: 1,
                created: false
            }
        );
        let logs = Logs::load(&lake).await.unwrap();
        assert!(logs.history.files.contains_key(&history(3)));
        assert!(!logs.history.files.contains_key(&history(4)));
        assert!(lake.get(&history(4)).await.unwrap().is_none(), "removed");
        assert_eq!(logs.history.backfill_batch(), Some(3));
        assert_eq!(
            logs.errors.files.keys().cloned().collect::<Vec<_>>(),
            vec![quarantine(3)]
        );
        let f = parse_path(&history(3), 4).unwrap();
        assert_eq!(Table::of(&f), Some(Table::History));
        // nothing left to catch up: no commit
        assert_eq!(catch_up_now(&lake).await, (CaughtUp::default(), Vec::new()));
        assert_eq!(Logs::load(&lake).await.unwrap().history.version, Some(1));
    }

    /// On a lake from before the log, a backfill's quarantine files wait for the backfill's
    /// start, not for a writer's conversion of `_errors`: the conversion leaves them out, the
    /// backfill's start commits those of committed batches and removes the rest, and no log
    /// names a file that is gone.
    #[tokio::test]
    async fn a_conversion_leaves_the_backfill_files_to_the_backfill() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = Lake::open(tmp.path().to_str().unwrap()).unwrap();
        let mut p = Progress::default();
        // batch 1 committed (its record written), batch 2 crashed before its record
        batch_without_commits(&lake, &mut p, 1, &[history(1), quarantine(1)]).await;
        lake.put_atomic(&quarantine(2), bytes::Bytes::from_static(b"rows"))
            .await
            .unwrap();
        // a live writer's start converts the live tables
        let (logs, converted) = crate::checkpoint::ensure_logs(&lake).await.unwrap();
        assert_eq!(converted, 2);
        assert!(logs.errors.files.is_empty(), "{:?}", logs.errors.files);
        // then the backfill's start
        let (got, removed) = catch_up_now(&lake).await;
        assert_eq!(removed, vec![quarantine(2)]);
        assert_eq!((got.history, got.errors), (1, 1));
        let logs = Logs::load(&lake).await.unwrap();
        assert_eq!(
            logs.errors.files.keys().cloned().collect::<Vec<_>>(),
            vec![quarantine(1)]
        );
        assert!(lake.get(&quarantine(2)).await.unwrap().is_none());
    }

    /// A batch's commit puts its quarantine files in `_errors` and its history files, with the
    /// batch number, in `history`; a file of another table is refused.
    #[tokio::test]
    async fn a_batch_commits_its_quarantine_and_its_history() {
        let lake = Lake::open("memory://").unwrap();
        let files: Vec<LakeFile> = [history(7), quarantine(7)]
            .iter()
            .map(|p| parse_path(p, 4).unwrap())
            .collect();
        let mut commits = Commits::Direct(Box::default());
        commit_batch(&mut commits, &lake, 7, &files).await.unwrap();
        let logs = Logs::load(&lake).await.unwrap();
        assert_eq!(logs.history.files.len(), 1);
        assert_eq!(logs.errors.files.len(), 1);
        assert_eq!(logs.history.backfill_batch(), Some(7));
        let live = parse_path(
            "events/collection_partition=app.bsky.feed.post/date=2026-12-01/hour=05/fh-1-2-00000003.parquet",
            4,
        )
        .unwrap();
        let err = commit_batch(&mut commits, &lake, 8, &[live])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("outside the history"), "{err}");
    }
}
