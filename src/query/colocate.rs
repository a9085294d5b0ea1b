//! Each group's files in one partition, for `count(DISTINCT …)` grouped by partition columns.
//!
//! DataFusion splits a scan's files over the cores by size, cutting files into byte ranges, so
//! the files of one collection reach every partial aggregate. For `count(DISTINCT did)` per
//! collection (JSONBench Q2) each partial phase then builds its own set of the collection's
//! DIDs, and the final phase merges them into one more set, on one core: at 10M events about
//! 200 ms of a 0.85 s query, for the like collection alone.
//!
//! When the group keys are partition columns of a scan, this rule deals the scan's files out
//! by key value instead: all files of a value in one partition, values placed largest first
//! on the least-loaded partition, and only when that leaves no partition more than a quarter
//! above an even share (else the scan keeps its balance and the merge happens as before). The
//! final phase then receives one partial state per group, which [`super::distinct`] counts
//! without building a set.

use super::rowcount::{group_columns, partition_keys, rewrite_aggregates};
use datafusion::common::{Result, ScalarValue};
use datafusion::config::ConfigOptions;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::{ExecutionPlan, InputOrderMode, Partitioning};
use std::collections::HashMap;
use std::sync::Arc;

/// The aggregate whose merge this rule spares.
const DISTINCT: &str = "atlake_count_distinct";

/// Deals the files of scans under a partial `count(DISTINCT)` out by group key value.
#[derive(Debug, Default)]
pub struct ColocateGroups;

impl PhysicalOptimizerRule for ColocateGroups {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        rewrite_aggregates(plan, |p, agg| match regrouped(agg)? {
            Some(input) => Ok(Some(p.clone().replace_children(
                vec![input],
                ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
            )?)),
            None => Ok(None),
        })
    }

    fn name(&self) -> &str {
        "atlake_colocate_groups"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// `agg`'s input with its scans' files dealt out by key value; `None` when nothing changes.
fn regrouped(agg: &AggregateExec) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    if *agg.mode() != AggregateMode::Partial
        || !agg.group_expr().is_single()
        || agg.group_expr().expr().is_empty()
        || agg.limit_options().is_some()
        || *agg.input_order_mode() != InputOrderMode::Linear
        || !agg.aggr_expr().iter().any(|a| a.fun().name() == DISTINCT)
    {
        return Ok(None);
    }
    let Some(keys) = group_columns(agg) else {
        return Ok(None);
    };
    let input = agg.input();
    let union = input.downcast_ref::<UnionExec>().is_some();
    let inputs: Vec<Arc<dyn ExecutionPlan>> = if union {
        input.children().into_iter().cloned().collect()
    } else {
        vec![input.clone()]
    };
    let mut changed = false;
    let mut out = Vec::with_capacity(inputs.len());
    for i in inputs {
        match colocated_scan(&i, &keys) {
            Some(scan) => {
                changed = true;
                out.push(scan);
            }
            None => out.push(i),
        }
    }
    if !changed {
        return Ok(None);
    }
    if union {
        Ok(Some(UnionExec::try_new(out)?))
    } else {
        Ok(out.pop())
    }
}

/// The scan `plan` with its files dealt out by the values of the partition columns `keys`
/// (output columns), or `None` when it is not such a scan or the deal would be uneven.
fn colocated_scan(plan: &Arc<dyn ExecutionPlan>, keys: &[usize]) -> Option<Arc<dyn ExecutionPlan>> {
    let exec = plan.downcast_ref::<DataSourceExec>()?;
    let config = exec.data_source().downcast_ref::<FileScanConfig>()?;
    if config.limit.is_some() {
        return None;
    }
    let part = partition_keys(config, keys)?;
    let groups = deal(&config.file_groups, &part)?;
    let n = groups.len();
    let new = FileScanConfigBuilder::from(config.clone())
        .with_file_groups(groups)
        // the files of a group are no longer in the order of their statistics; the partial
        // aggregate above reads them in any order (`Linear`), and is the only reader
        .with_output_ordering(Vec::new())
        .with_output_partitioning(Some(Partitioning::UnknownPartitioning(n)))
        .build();
    Some(DataSourceExec::from_data_source(new))
}

/// `groups`' files in as many groups, all files of one value of the partition columns `part`
/// in one group; `None` when there are fewer values than groups or a group would carry more
/// than 5/4 of an even share of the bytes.
pub fn deal(groups: &[FileGroup], part: &[usize]) -> Option<Vec<FileGroup>> {
    let n = groups.len();
    if n < 2 {
        return None;
    }
    let mut by_value: HashMap<Vec<ScalarValue>, (u64, Vec<PartitionedFile>)> = HashMap::new();
    for f in groups.iter().flat_map(|g| g.iter()) {
        let key: Vec<ScalarValue> = part
            .iter()
            .map(|&i| f.partition_values.get(i).cloned())
            .collect::<Option<_>>()?;
        let e = by_value.entry(key).or_default();
        e.0 = e.0.saturating_add(f.effective_size());
        e.1.push(f.clone());
    }
    if by_value.len() < n {
        return None;
    }
    let mut values: Vec<(u64, Vec<PartitionedFile>)> = by_value.into_values().collect();
    // largest first; ties by the first file's path, so a plan is the same every time
    values.sort_by(|a, b| {
        b.0.cmp(&a.0).then_with(|| {
            let first =
                |v: &Vec<PartitionedFile>| v.first().map(|f| f.object_meta.location.clone());
            first(&a.1).cmp(&first(&b.1))
        })
    });
    let total: u64 = values.iter().map(|v| v.0).fold(0, u64::saturating_add);
    let mut bins: Vec<(u64, Vec<PartitionedFile>)> = vec![(0, Vec::new()); n];
    for (bytes, files) in values {
        let bin = bins.iter_mut().min_by_key(|b| b.0)?;
        bin.0 = bin.0.saturating_add(bytes);
        bin.1.extend(files);
    }
    let largest = bins.iter().map(|b| b.0).max()?;
    // largest / (total / n) <= 5/4
    if u128::from(largest) * 4 * n as u128 > u128::from(total) * 5 {
        return None;
    }
    Some(bins.into_iter().map(|(_, f)| FileGroup::new(f)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Files `(collection, size)`, each its own group entry, spread over `n` groups.
    fn groups(files: &[(&str, u64)], n: usize) -> Vec<FileGroup> {
        let mut g: Vec<Vec<PartitionedFile>> = vec![Vec::new(); n];
        for (i, (c, size)) in files.iter().enumerate() {
            g[i % n].push(
                PartitionedFile::new(format!("{c}/{i}.parquet"), *size).with_partition_values(
                    vec![
                        ScalarValue::Utf8View(Some("commit".into())),
                        ScalarValue::Utf8View(Some(c.to_string())),
                    ],
                ),
            );
        }
        g.into_iter().map(FileGroup::new).collect()
    }

    fn value(f: &PartitionedFile) -> ScalarValue {
        f.partition_values[1].clone()
    }

    #[test]
    fn every_value_lands_in_one_group_and_no_file_is_lost() {
        let files: Vec<(&str, u64)> = (0..40)
            .map(|i| {
                let c = ["like", "follow", "post", "repost", "block", "listitem"][i % 6];
                (c, 100 + (i as u64 * 37) % 300)
            })
            .collect();
        let before = groups(&files, 2);
        // a file cut into two byte ranges by DataFusion: both ranges go with their value
        let mut before = before;
        let cut = before[0].iter().next().unwrap().clone();
        before[1].push(cut.clone().with_range(0, 50));
        let dealt = deal(&before, &[1]).expect("an even deal exists");
        assert_eq!(dealt.len(), 2);
        let mut seen = HashSet::new();
        for g in &dealt {
            let values: HashSet<ScalarValue> = g.iter().map(value).collect();
            for v in values {
                assert!(seen.insert(v.clone()), "{v} is in two groups");
            }
        }
        let paths = |gs: &[FileGroup]| {
            let mut p: Vec<(String, Option<(i64, i64)>)> = gs
                .iter()
                .flat_map(|g| g.iter())
                .map(|f| {
                    (
                        f.object_meta.location.to_string(),
                        f.range.as_ref().map(|r| (r.start, r.end)),
                    )
                })
                .collect();
            p.sort();
            p
        };
        assert_eq!(paths(&dealt), paths(&before));
        // the same deal every time
        let again = deal(&before, &[1]).unwrap();
        assert_eq!(
            dealt.iter().map(|g| g.len()).collect::<Vec<_>>(),
            again.iter().map(|g| g.len()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn an_uneven_deal_or_too_few_values_keep_the_scan_as_it_is() {
        // like 47 % of the bytes: two groups of 47 and 53 % are even enough
        let even = [("like", 47), ("follow", 25), ("post", 18), ("repost", 10)];
        assert!(deal(&groups(&even, 2), &[1]).is_some());
        // like 70 %: one group would carry 1.4 even shares
        let uneven = [("like", 70), ("follow", 20), ("post", 10)];
        assert!(deal(&groups(&uneven, 2), &[1]).is_none());
        // four cores, like 47 %: 1.88 even shares
        assert!(deal(&groups(&even, 4), &[1]).is_none());
        // one value, two groups
        assert!(deal(&groups(&[("like", 5), ("like", 5)], 2), &[1]).is_none());
        // one group
        assert!(deal(&groups(&even, 1), &[1]).is_none());
        // a key that is not a partition value of the files
        assert!(deal(&groups(&even, 2), &[2]).is_none());
    }

    /// A Hive-partitioned Parquet table written by DataFusion: `did` and `n` in files under
    /// `collection=…/`, several files a collection.
    async fn hive_table(dir: &std::path::Path) {
        let ctx = datafusion::prelude::SessionContext::new();
        for part in 0..3 {
            let sql = format!(
                "COPY (SELECT 'did:plc:' || lpad(CAST((value * 7919 + {part}) % 3001 AS VARCHAR), 24, '0') AS did, \
                   value AS n, \
                   CASE WHEN value % 100 < 47 THEN 'like' WHEN value % 100 < 72 THEN 'follow' \
                        WHEN value % 100 < 90 THEN 'post' ELSE 'repost' END AS collection \
                 FROM generate_series({}, {}) ) TO '{}' STORED AS PARQUET PARTITIONED BY (collection)",
                part * 20_000,
                part * 20_000 + 19_999,
                dir.display()
            );
            ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        }
    }

    async fn context(ours: bool, dir: &std::path::Path) -> datafusion::prelude::SessionContext {
        use datafusion::execution::session_state::SessionStateBuilder;
        use datafusion::prelude::{SessionConfig, SessionContext};
        // files cut into byte ranges and spread, as on a real lake
        let cfg = SessionConfig::new()
            .with_target_partitions(2)
            .set_usize("datafusion.optimizer.repartition_file_min_size", 1)
            // filters inside the scan, as the lake's engine sets it
            .set_bool("datafusion.execution.parquet.pushdown_filters", true);
        let mut b = SessionStateBuilder::new()
            .with_config(cfg)
            .with_default_features();
        if ours {
            b = b.with_physical_optimizer_rule(Arc::new(ColocateGroups));
        }
        let ctx = SessionContext::new_with_state(b.build());
        super::super::distinct::register(&ctx);
        ctx.sql(&format!(
            "CREATE EXTERNAL TABLE t STORED AS PARQUET PARTITIONED BY (collection) LOCATION '{}/'",
            dir.display()
        ))
        .await
        .unwrap();
        ctx
    }

    #[tokio::test]
    async fn a_distinct_count_by_partition_reads_each_value_in_one_partition() {
        use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
        let dir = tempfile::tempdir().unwrap();
        hive_table(dir.path()).await;
        let sql = "SELECT collection, count(*) AS n, count(DISTINCT did) AS u, sum(n) AS s \
                   FROM t WHERE n % 3 <> 0 GROUP BY collection ORDER BY collection";
        let (plain, ours) = (
            context(false, dir.path()).await,
            context(true, dir.path()).await,
        );
        let groups_of = |plan: &Arc<dyn ExecutionPlan>| {
            let mut out = Vec::new();
            plan.apply(|p| {
                if let Some(c) = p
                    .downcast_ref::<DataSourceExec>()
                    .and_then(|e| e.data_source().downcast_ref::<FileScanConfig>())
                {
                    for g in &c.file_groups {
                        let values: HashSet<ScalarValue> =
                            g.iter().map(|f| f.partition_values[0].clone()).collect();
                        out.push(values);
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .unwrap();
            out
        };
        let spread = |groups: &[HashSet<ScalarValue>]| {
            let mut seen = HashSet::new();
            groups.iter().flatten().any(|v| !seen.insert(v.clone()))
        };
        let df = plain.sql(sql).await.unwrap();
        let before = groups_of(&df.clone().create_physical_plan().await.unwrap());
        assert!(
            spread(&before),
            "DataFusion spreads a value over partitions: {before:?}"
        );
        let want = arrow::util::pretty::pretty_format_batches(&df.collect().await.unwrap())
            .unwrap()
            .to_string();
        let df = ours.sql(sql).await.unwrap();
        let after = groups_of(&df.clone().create_physical_plan().await.unwrap());
        assert_eq!(after.len(), 2);
        assert!(!spread(&after), "each value in one partition: {after:?}");
        let got = arrow::util::pretty::pretty_format_batches(&df.collect().await.unwrap())
            .unwrap()
            .to_string();
        assert_eq!(got, want);
        // without a distinct count the scan is left as DataFusion made it
        let df = ours
            .sql("SELECT collection, count(*) FROM t GROUP BY collection")
            .await
            .unwrap();
        assert!(spread(&groups_of(
            &df.create_physical_plan().await.unwrap()
        )));
    }
}
