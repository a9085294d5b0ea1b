//! The `current` schema: the log folded into what exists now.
//!
//! - `current.records`: one row per existing `(did, collection, rkey)`: its latest `cid`, `rev`,
//!   `time`, `record` and `origin`.
//! - `current.posts`, `current.likes`, `current.reposts`, `current.follows`, `current.blocks`,
//!   `current.listitems`, `current.profiles`: the same, with each lexicon's typed columns.
//!
//! The latest version of a record is the row with the highest `rev` (TIDs sort in time order;
//! a backfilled row of a version-2 repo, with no `rev`, loses to any row that has one). A latest
//! row that is a delete removes the record. A repo the daemon fetched again after a gap in its
//! live history (a `#sync`, or a commit that did not follow the last one) is replaced: only
//! that snapshot's rows and rows after its cut (the latest rev seen of the repo then) count. Accounts whose latest `#account` event says
//! `active = false` with status `deleted` or `takendown` have no rows. Views over the tables, so
//! they include the rows still in the daemon's memory and are as fresh as the tables.

use datafusion::catalog::SchemaProvider;
use datafusion::datasource::ViewTable;
use datafusion::execution::SessionState;
use datafusion::prelude::SessionContext;
use std::sync::Arc;

/// Accounts that are gone: their latest `#account` event is inactive, deleted or takendown.
const GONE: &str = "SELECT did FROM (SELECT did, active, status, \
     row_number() OVER (PARTITION BY did ORDER BY time_us DESC, event_seq DESC NULLS LAST) AS rn \
     FROM account) WHERE rn = 1 AND NOT active AND status IN ('deleted', 'takendown')";

/// Repos fetched again after a gap in their live history: the backfill's latest marker of
/// each (a `sync` row with origin `repo`): its cut (`rev`: the latest rev seen of the repo
/// when the snapshot was taken) and the snapshot's rev (its `record` is
/// `{"snapshot_rev":"<13-character TID>"}`).
const RESETS: &str = "SELECT reset_did, reset_cut, reset_snapshot FROM (SELECT did AS reset_did, \
     rev AS reset_cut, substr(record, 18, 13) AS reset_snapshot, row_number() OVER \
     (PARTITION BY did ORDER BY rev DESC) AS reset_rn FROM events \
     WHERE kind = 'sync' AND origin = 'repo') WHERE reset_rn = 1";

/// The fold of `table` (its commit rows) to the latest version of each record. A repo
/// replaced by a fresh snapshot keeps only that snapshot's rows and rows after its cut.
fn fold(columns: &str, table: &str) -> String {
    format!(
        "SELECT {columns} FROM (SELECT t.*, row_number() OVER (PARTITION BY t.did, \
         t.collection, t.rkey ORDER BY t.rev DESC NULLS LAST, t.time_us DESC) AS current_rn \
         FROM {table} t LEFT JOIN ({RESETS}) r ON t.did = r.reset_did \
         WHERE t.kind = 'commit' AND (r.reset_did IS NULL OR t.rev > r.reset_cut \
         OR (t.origin = 'repo' AND t.rev = r.reset_snapshot))) \
         WHERE current_rn = 1 AND operation <> 'delete' AND did NOT IN ({GONE})"
    )
}

/// The views: (name, SQL).
pub fn views() -> Vec<(&'static str, String)> {
    let mut v = vec![(
        "records",
        fold(
            "did, collection, rkey, cid, rev, time_us, time, record, origin",
            "events",
        ),
    )];
    for t in [
        "posts",
        "likes",
        "reposts",
        "follows",
        "blocks",
        "listitems",
        "profiles",
    ] {
        v.push((
            t,
            fold(
                "* EXCLUDE (current_rn, operation, kind, seq, claimed_time_us)",
                t,
            ),
        ));
    }
    v
}

/// The `current` schema: each view is planned when a query names it (planning all eight for
/// every query cost every query, the trivial ones too).
struct CurrentSchema {
    state: Box<dyn Fn() -> Option<SessionState> + Send + Sync>,
}

impl std::fmt::Debug for CurrentSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CurrentSchema")
    }
}

#[async_trait::async_trait]
impl SchemaProvider for CurrentSchema {
    fn table_names(&self) -> Vec<String> {
        views().into_iter().map(|(n, _)| n.to_string()).collect()
    }

    async fn table(
        &self,
        name: &str,
    ) -> datafusion::error::Result<Option<Arc<dyn datafusion::catalog::TableProvider>>> {
        let Some((_, sql)) = views().into_iter().find(|(n, _)| *n == name) else {
            return Ok(None);
        };
        let mut state = (self.state)().ok_or_else(|| {
            datafusion::error::DataFusionError::Internal(
                "the session of a current.* view is gone".into(),
            )
        })?;
        // the views are written in DataFusion's SQL (`* EXCLUDE`), whatever the session speaks
        state
            .config_mut()
            .options_mut()
            .set("datafusion.sql_parser.dialect", "generic")?;
        let plan = state.create_logical_plan(&sql).await?;
        Ok(Some(Arc::new(ViewTable::new(plan, Some(sql)))))
    }

    fn table_exist(&self, name: &str) -> bool {
        views().iter().any(|(n, _)| *n == name)
    }
}

/// Registers the `current` schema in `ctx` (whose tables are already registered).
pub fn register(ctx: &SessionContext) -> datafusion::error::Result<()> {
    let weak = ctx.state_weak_ref();
    let schema = Arc::new(CurrentSchema {
        // a weak reference: the session owns the schema, not the other way round
        state: Box::new(move || weak.upgrade().map(|s| s.read().clone())),
    });
    if let Some(cat) = ctx.catalog("datafusion") {
        cat.register_schema("current", schema)?;
    }
    Ok(())
}
