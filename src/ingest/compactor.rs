//! The daemon's compactor: a background task that runs a compaction and purge pass
//! ([`crate::checkpoint::compact`]) every `compaction.interval`, off the ingest path. It reads
//! the `events` log itself, rewrites on one blocking thread at a time (at most one core, and
//! memory bounded by the merge), and hands each commit to the committer, which owns the log
//! while ingest runs. At shutdown a rewrite under way is abandoned: its output is an
//! uncommitted file that the next start removes.

use super::checkpointer::ToCommitter;
use crate::checkpoint::CheckpointError;
use crate::checkpoint::compact::{self, Policy};
use crate::config::Config;
use crate::sink::store::Lake;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// When and how the compactor works.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What a pass does.
    pub policy: Policy,
    /// Between passes.
    pub interval: Duration,
    /// Before the first pass: the interval, at most 10 minutes (a start-up catches up on the
    /// stream first; a daemon restarted more often than hourly still compacts).
    pub first_after: Duration,
}

impl Settings {
    /// The configuration's (`[compaction]`, `[privacy]`).
    pub fn from_config(cfg: &Config) -> Settings {
        let mut policy = Policy::from_config(cfg, false);
        policy.compact = cfg.compaction.enabled;
        let interval = cfg.compaction.interval.0;
        Settings {
            policy,
            interval,
            first_after: interval.min(Duration::from_secs(600)),
        }
    }
}

/// Runs passes until `shutdown`, or until the committer is gone.
pub async fn run(
    lake: Lake,
    settings: Settings,
    mut submit: ToCommitter,
    mut shutdown: watch::Receiver<bool>,
) {
    let cancel = Arc::new(AtomicBool::new(false));
    let mut policy = settings.policy.clone();
    policy.cancel = Some(cancel.clone());
    let mut wait = settings.first_after;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        wait = settings.interval;
        let started = Instant::now();
        let pass = async {
            let logs = crate::checkpoint::Logs::load(&lake).await?;
            let now = crate::model::cursor::now_us();
            compact::pass(&lake, &logs, &policy, now, &mut submit).await
        };
        let result = tokio::select! {
            r = pass => r,
            _ = shutdown.wait_for(|s| *s) => {
                cancel.store(true, Ordering::Relaxed);
                return;
            }
        };
        metrics::counter!("atlake_compaction_passes_total").increment(1);
        // a pass reads and rewrites whole partitions: give back what it held
        crate::memory::freed();
        match result {
            Ok(s) => {
                metrics::counter!("atlake_compaction_files_replaced_total")
                    .increment(s.inputs as u64);
                metrics::counter!("atlake_compaction_files_written_total")
                    .increment(s.outputs as u64);
                metrics::counter!("atlake_purge_rows_total", "action" => "blanked")
                    .increment(s.blanked);
                metrics::counter!("atlake_purge_rows_total", "action" => "dropped")
                    .increment(s.dropped);
                metrics::counter!("atlake_purge_rows_total", "action" => "quarantine_dropped")
                    .increment(s.quarantine_dropped);
                metrics::gauge!("atlake_compaction_last_pass_seconds")
                    .set(started.elapsed().as_secs_f64());
                if s.inputs > 0 || s.purge_scan {
                    tracing::info!(
                        replaced = s.inputs,
                        written = s.outputs,
                        blanked = s.blanked,
                        dropped = s.dropped,
                        quarantine_dropped = s.quarantine_dropped,
                        stale = s.stale,
                        purge_scan = s.purge_scan,
                        took = ?started.elapsed(),
                        "compaction pass"
                    );
                }
            }
            Err(CheckpointError::Stopped) => return,
            Err(e) => {
                metrics::counter!("atlake_storage_errors_total", "kind" => "compaction")
                    .increment(1);
                tracing::warn!(error = %e, "compaction pass failed; the next pass tries again");
            }
        }
    }
}
