//! Keeping the tables to their promised size: retention (whole partitions older than the
//! configured age leave the table, in one commit) and vacuum (files a commit removed are
//! deleted from storage once they have been out of the table for the vacuum retention, so a
//! reader's snapshot from before the removal stays readable until then).

use super::CheckpointError;
use super::delta::{self, CommitOutcome, LogState, Table};
use crate::sink::store::Lake;
use serde_json::json;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Files removed from the tables by retention.
    pub expired: usize,
    /// Files deleted from storage by vacuum.
    pub vacuumed: usize,
    /// Log entries (commits, checkpoints) deleted by the log retention.
    pub log_entries: usize,
}

/// How long the tables keep what leaves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// Partitions whose hour ended longer ago than this leave the table (`lake.retention`).
    pub retention_us: Option<i64>,
    /// Removed files are deleted from storage this long after (`lake.vacuum_retention`).
    pub vacuum_after_ms: i64,
    /// Log entries older than this are deleted once a checkpoint covers them
    /// (`lake.log_retention`).
    pub log_after_ms: i64,
}

impl Keep {
    /// The lake's settings (durations beyond i64, about 292,000 years, saturate: "never").
    pub fn of(l: &crate::config::LakeConfig) -> Keep {
        let ms = |d: std::time::Duration| d.as_millis().min(i64::MAX as u128) as i64;
        Keep {
            retention_us: l
                .retention
                .as_ref()
                .map(|r| r.0.as_micros().min(i64::MAX as u128) as i64),
            vacuum_after_ms: ms(l.vacuum_retention.0),
            log_after_ms: ms(l.log_retention.0),
        }
    }
}

/// Removes from `table` every file whose partition ended at or before `cutoff_us`, in one
/// commit (`remove` actions, `dataChange = true`). Returns how many.
pub async fn expire(
    lake: &Lake,
    table: Table,
    state: &mut LogState,
    cutoff_us: i64,
    now_ms: i64,
) -> Result<usize, CheckpointError> {
    let old: Vec<_> = state
        .files
        .values()
        .filter(|f| f.key.end_us() <= cutoff_us)
        .cloned()
        .collect();
    if old.is_empty() {
        return Ok(0);
    }
    let actions = old
        .iter()
        .map(|f| delta::remove_action(table, f, true, now_ms))
        .collect::<Result<Vec<_>, _>>()?;
    let mut info = json!({"retention_cutoff_us": cutoff_us});
    // the endpoints travel on (see `delta::LogState::positions`)
    if let Some(p) = &state.positions {
        info = delta::positions_info(p.clone());
        info["retention_cutoff_us"] = cutoff_us.into();
    }
    match delta::commit(lake, table, state, "DELETE", info, actions).await? {
        CommitOutcome::Committed(_) => {
            tracing::info!(
                table = table.root(),
                files = old.len(),
                cutoff_us,
                "retention removed partitions older than the cutoff"
            );
            Ok(old.len())
        }
        CommitOutcome::Conflict(v) => Err(CheckpointError::Corrupt {
            path: table.log_path(&delta::commit_name(v)),
            message: "another writer committed this version".into(),
        }),
    }
}

/// Deletes from storage every file removed from `table` at or before `older_than_ms`, and
/// forgets its tombstone. Returns how many.
pub async fn vacuum(
    lake: &Lake,
    state: &mut LogState,
    older_than_ms: i64,
) -> Result<usize, CheckpointError> {
    let due: Vec<String> = state
        .removed
        .iter()
        .filter(|(_, when)| **when <= older_than_ms)
        .map(|(p, _)| p.clone())
        .collect();
    for p in &due {
        lake.delete(p).await?;
        state.removed.remove(p);
    }
    Ok(due.len())
}

/// One pass over both tables: retention (if set), vacuum of what was removed longer ago than
/// the vacuum retention, and cleanup of log entries older than the log retention.
pub async fn pass(
    lake: &Lake,
    logs: &mut super::Logs,
    keep: Keep,
    now_us: i64,
) -> Result<Pass, CheckpointError> {
    let mut out = Pass::default();
    let now_ms = now_us / 1000;
    for t in Table::EVERY {
        let state = logs.get_mut(t);
        if state.version.is_none() {
            continue;
        }
        // retention is for what the streams bring; the history is what a backfill fetched
        // (it would fetch it again), kept whole
        if let Some(r) = keep.retention_us.filter(|_| t != Table::History) {
            out.expired += expire(lake, t, state, now_us.saturating_sub(r), now_ms).await?;
        }
        out.vacuumed += vacuum(lake, state, now_ms.saturating_sub(keep.vacuum_after_ms)).await?;
        out.log_entries +=
            delta::clean_log(lake, t, now_ms.saturating_sub(keep.log_after_ms)).await?;
    }
    if out.log_entries > 0 {
        metrics::counter!("atlake_log_entries_deleted_total").increment(out.log_entries as u64);
    }
    if out.expired > 0 {
        metrics::counter!("atlake_retention_files_removed_total").increment(out.expired as u64);
    }
    if out.vacuumed > 0 {
        metrics::counter!("atlake_vacuum_files_deleted_total").increment(out.vacuumed as u64);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Cursor;
    use crate::sink::partition::{FileName, HOUR_US, PartitionKey, PartitionName, parse_path};

    fn file(hour: i64, first: i64) -> crate::sink::partition::LakeFile {
        let key =
            PartitionKey::at_hour(PartitionName::Collection("app.bsky.feed.like".into()), hour)
                .unwrap();
        let name =
            FileName::try_new(Cursor::seq(first).unwrap(), Cursor::seq(first).unwrap(), 1).unwrap();
        parse_path(&format!("{}/{}", key.dir(), name.render()), 3).unwrap()
    }

    /// Partitions that ended before the cutoff leave the table in one commit while their files
    /// stay readable; once out for the vacuum retention the files are deleted. A partition
    /// that ends exactly at the cutoff goes; the next one stays.
    #[tokio::test]
    async fn retention_removes_whole_old_partitions_and_vacuum_deletes_them_later() {
        let lake = Lake::open("memory://").unwrap();
        crate::checkpoint::recover(&lake, crate::model::SourceKind::Firehose, 0)
            .await
            .unwrap();
        let mut logs = crate::checkpoint::Logs::load(&lake).await.unwrap();
        let hours = [490_000, 490_001, 490_002, 490_003];
        let files: Vec<_> = hours
            .iter()
            .enumerate()
            .map(|(i, h)| file(*h, i as i64 + 1))
            .collect();
        for f in &files {
            lake.put_atomic(&f.path, bytes::Bytes::from_static(b"abc"))
                .await
                .unwrap();
        }
        let adds = files
            .iter()
            .map(|f| delta::add_action(Table::Events, f, true, 1).unwrap())
            .collect();
        delta::commit(
            &lake,
            Table::Events,
            &mut logs.events,
            "WRITE",
            json!({}),
            adds,
        )
        .await
        .unwrap();
        // now: the end of hour 490_003 plus 1 h; retention 2 h: hours ending at or before
        // 490_002's end go
        let now_us = (490_004 + 1) * HOUR_US;
        let retention = 2 * HOUR_US;
        let hour_ms = HOUR_US / 1000;
        let keep = |retention_us| Keep {
            retention_us,
            vacuum_after_ms: hour_ms,
            log_after_ms: 30 * 24 * hour_ms,
        };
        let p = pass(&lake, &mut logs, keep(Some(retention)), now_us)
            .await
            .unwrap();
        assert_eq!(
            p,
            Pass {
                expired: 3,
                ..Pass::default()
            }
        );
        let read = delta::load(&lake, Table::Events).await.unwrap();
        assert_eq!(read.files.keys().collect::<Vec<_>>(), vec![&files[3].path]);
        assert_eq!(read.removed.len(), 3);
        for f in &files {
            assert!(
                lake.get(&f.path).await.unwrap().is_some(),
                "still there for readers"
            );
        }
        // not yet an hour out of the table
        let p = pass(
            &lake,
            &mut logs,
            keep(Some(retention)),
            now_us + HOUR_US - 1000,
        )
        .await
        .unwrap();
        assert_eq!(p, Pass::default());
        let p = pass(&lake, &mut logs, keep(None), now_us + HOUR_US)
            .await
            .unwrap();
        assert_eq!(
            p,
            Pass {
                vacuumed: 3,
                ..Pass::default()
            }
        );
        for f in &files[..3] {
            assert!(lake.get(&f.path).await.unwrap().is_none(), "{}", f.path);
        }
        assert!(lake.get(&files[3].path).await.unwrap().is_some());
        // nothing more to vacuum, nothing else leaves
        let p = pass(&lake, &mut logs, keep(None), now_us + 100 * HOUR_US)
            .await
            .unwrap();
        assert_eq!(p, Pass::default());
        assert_eq!(
            delta::load(&lake, Table::Events).await.unwrap().files.len(),
            1
        );
    }
}
