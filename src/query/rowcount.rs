//! `count(*)` grouped by partition columns, answered from the row counts in the table's log
//! instead of a scan.
//!
//! The lake's Delta log records every file's row count (`numRecords` in the `add` action's
//! stats) and the table provider attaches it to the file ([`LoggedRows`]). Files of a
//! one-collection partition carry `kind` and `collection` as partition values. So for JSONBench
//! Q1 (`SELECT collection, count(*) FROM events GROUP BY collection`), the counts of those files
//! are sums of numbers already in memory; only the `_other` partition (many collections in one
//! file) and the rows still buffered in the daemon need their rows read.
//!
//! The rule replaces the partial phase of such an aggregate: the scans it can answer become one
//! in-memory batch of partial states (group values, counts), and the scans it cannot keep
//! their partial aggregate. The final phase merges both, unchanged.
//!
//! It applies only when nothing could make the rows read differ from the rows logged: no filter
//! or predicate on the scan, no limit, every group key a partition column, every aggregate a
//! plain `count` of a non-null constant, and every file with a logged count (a lake written
//! without stats is scanned as before). A file split into byte ranges is counted once.

use arrow::array::{ArrayRef, Int64Array, RecordBatch};
use arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::config::ConfigOptions;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_expr::expressions::{Column, Literal};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// A lake file's row count as the table's log states it, attached to its `PartitionedFile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoggedRows(pub u64);

/// Answers the partial phase of `count(*) … GROUP BY <partition columns>` from [`LoggedRows`].
#[derive(Debug, Default)]
pub struct CountFromLog;

impl PhysicalOptimizerRule for CountFromLog {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        rewrite_aggregates(plan, |_, agg| replaced(agg))
    }

    fn name(&self) -> &str {
        "atlake_count_from_log"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// The columns of the group keys in the aggregate's input, when the aggregate is a partial
/// `count` of constants grouped by plain columns.
fn counted_keys(agg: &AggregateExec) -> Option<Vec<usize>> {
    if *agg.mode() != AggregateMode::Partial
        || !agg.group_expr().is_single()
        || agg.group_expr().expr().is_empty()
        || agg.limit_options().is_some()
        || agg.filter_expr().iter().any(Option::is_some)
        || agg.aggr_expr().is_empty()
    {
        return None;
    }
    // the input's partitioning is replaced: only where nothing above relies on it
    if !matches!(
        agg.properties().output_partitioning(),
        Partitioning::UnknownPartitioning(_) | Partitioning::RoundRobinBatch(_)
    ) {
        return None;
    }
    for a in agg.aggr_expr() {
        let args = a.expressions();
        let constant = args.len() == 1
            && args[0]
                .downcast_ref::<Literal>()
                .is_some_and(|l| !l.value().is_null());
        let state_is_count = a
            .state_fields()
            .ok()
            .is_some_and(|f| f.len() == 1 && f[0].data_type() == &DataType::Int64);
        if a.fun().name() != "count"
            || a.is_distinct()
            || !a.order_bys().is_empty()
            || !constant
            || !state_is_count
        {
            return None;
        }
    }
    group_columns(agg)
}

/// `plan` with each `AggregateExec` for which `f` (given the node and the aggregate) returns
/// a new plan replaced by it, top down; the new plan's own children are not visited again.
pub fn rewrite_aggregates(
    plan: Arc<dyn ExecutionPlan>,
    f: impl Fn(&Arc<dyn ExecutionPlan>, &AggregateExec) -> Result<Option<Arc<dyn ExecutionPlan>>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_down(|p| {
        let Some(agg) = p.downcast_ref::<AggregateExec>() else {
            return Ok(Transformed::no(p));
        };
        match f(&p, agg)? {
            Some(new) => Ok(Transformed::new(new, true, TreeNodeRecursion::Jump)),
            None => Ok(Transformed::no(p)),
        }
    })
    .map(|t| t.data)
}

/// The input columns of `agg`'s group keys, when every key is a plain column.
pub fn group_columns(agg: &AggregateExec) -> Option<Vec<usize>> {
    agg.group_expr()
        .expr()
        .iter()
        .map(|(e, _)| e.downcast_ref::<Column>().map(Column::index))
        .collect()
}

/// Rows per value of the partition columns that `keys` (columns of `plan`'s output) name,
/// summed from the logged counts; `None` when `plan` is not a plain scan of logged files
/// whose keys are all partition columns. Counts whose sum overflows are an error: the log
/// that states them is corrupt.
pub fn logged_counts(
    plan: &Arc<dyn ExecutionPlan>,
    keys: &[usize],
) -> Result<Option<HashMap<Vec<ScalarValue>, i64>>> {
    let Some(exec) = plan.downcast_ref::<DataSourceExec>() else {
        return Ok(None);
    };
    let Some(config) = exec.data_source().downcast_ref::<FileScanConfig>() else {
        return Ok(None);
    };
    if config.limit.is_some() || config.file_source().filter().is_some() {
        return Ok(None);
    }
    let Some(partition) = partition_keys(config, keys) else {
        return Ok(None);
    };
    let mut seen = HashSet::new();
    let mut counts: HashMap<Vec<ScalarValue>, i64> = HashMap::new();
    for file in config.file_groups.iter().flat_map(|g| g.iter()) {
        let Some(LoggedRows(rows)) = file.extension::<LoggedRows>() else {
            return Ok(None);
        };
        // a file split into byte ranges appears once per range
        if !seen.insert(file.object_meta.location.clone()) {
            continue;
        }
        let Some(key) = partition
            .iter()
            .map(|&i| file.partition_values.get(i).cloned())
            .collect::<Option<Vec<ScalarValue>>>()
        else {
            return Ok(None);
        };
        add_rows(counts.entry(key).or_default(), *rows)?;
    }
    Ok(Some(counts))
}

/// `rows` more into `total`; past `i64::MAX` (what `count` returns) the log is corrupt.
fn add_rows(total: &mut i64, rows: u64) -> Result<()> {
    *total = i64::try_from(rows)
        .ok()
        .and_then(|r| total.checked_add(r))
        .ok_or_else(corrupt_counts)?;
    Ok(())
}

fn corrupt_counts() -> DataFusionError {
    DataFusionError::Execution(format!(
        "the lake's log states row counts that add up past {}: the log is corrupt",
        i64::MAX
    ))
}

/// The partition columns (indices into the scan's partition values) that the output columns
/// `keys` of a scan with `config` are; `None` when one is not a partition column.
pub fn partition_keys(config: &FileScanConfig, keys: &[usize]) -> Option<Vec<usize>> {
    let file_columns = config.file_schema().fields().len();
    let table_columns = file_columns + config.table_partition_cols().len();
    // the table column behind each output column
    let columns: Vec<usize> = match config.file_source().projection() {
        None => (0..table_columns).collect(),
        Some(p) => p
            .iter()
            .map(|e| e.expr.downcast_ref::<Column>().map(Column::index))
            .collect::<Option<_>>()?,
    };
    keys.iter()
        .map(|&k| {
            let c = *columns.get(k)?;
            (file_columns..table_columns)
                .contains(&c)
                .then(|| c - file_columns)
        })
        .collect()
}

/// `agg` with the inputs it can count from the log answered by one batch of partial states.
fn replaced(agg: &AggregateExec) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let Some(keys) = counted_keys(agg) else {
        return Ok(None);
    };
    let input = agg.input();
    let inputs: Vec<Arc<dyn ExecutionPlan>> = match input.downcast_ref::<UnionExec>() {
        Some(u) => u.children().into_iter().cloned().collect(),
        None => vec![input.clone()],
    };
    let mut counts: HashMap<Vec<ScalarValue>, i64> = HashMap::new();
    let mut rest = Vec::new();
    let mut answered = false;
    for i in inputs {
        match logged_counts(&i, &keys)? {
            Some(c) => {
                answered = true;
                for (k, n) in c {
                    let total = counts.entry(k).or_default();
                    *total = total.checked_add(n).ok_or_else(corrupt_counts)?;
                }
            }
            None => rest.push(i),
        }
    }
    if !answered {
        return Ok(None);
    }
    let schema = agg.schema();
    let groups = keys.len();
    let aggregates = agg.aggr_expr().len();
    if schema.fields().len() != groups + aggregates {
        return Ok(None);
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(groups + aggregates);
    for g in 0..groups {
        let field = schema.field(g);
        let values = counts
            .keys()
            .map(|k| k[g].cast_to(field.data_type()))
            .collect::<Result<Vec<_>>>()?;
        columns.push(if values.is_empty() {
            arrow::array::new_empty_array(field.data_type())
        } else {
            ScalarValue::iter_to_array(values)?
        });
    }
    let totals: ArrayRef = Arc::new(counts.values().copied().collect::<Int64Array>());
    for _ in 0..aggregates {
        columns.push(totals.clone());
    }
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let mut parts: Vec<Arc<dyn ExecutionPlan>> = vec![MemorySourceConfig::try_new_exec(
        &[vec![batch]],
        schema.clone(),
        None,
    )?];
    if !rest.is_empty() {
        let scanned = UnionExec::try_new(rest)?;
        parts.push(Arc::new(AggregateExec::try_new(
            AggregateMode::Partial,
            agg.group_expr().clone(),
            agg.aggr_expr().to_vec(),
            agg.filter_expr().to_vec(),
            scanned,
            agg.input_schema(),
        )?));
    }
    Ok(Some(UnionExec::try_new(parts)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema};
    use datafusion::datasource::listing::PartitionedFile;
    use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
    use datafusion::datasource::table_schema::TableSchema;
    use datafusion::execution::object_store::ObjectStoreUrl;
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::PhysicalExpr;
    use datafusion::physical_expr::expressions::{BinaryExpr, lit};

    const LIKE: &str = "app.bsky.feed.like";
    const POST: &str = "app.bsky.feed.post";

    fn file(path: &str, coll: &str, rows: Option<u64>) -> PartitionedFile {
        let f = PartitionedFile::new(path, 1000).with_partition_values(vec![
            ScalarValue::Utf8View(Some("commit".into())),
            ScalarValue::Utf8View(Some(coll.into())),
        ]);
        match rows {
            Some(n) => f.with_extension(LoggedRows(n)),
            None => f,
        }
    }

    /// A scan of `groups` whose table is (did | kind, collection), projected to `columns`.
    fn scan(
        groups: Vec<Vec<PartitionedFile>>,
        columns: Vec<usize>,
        limit: Option<usize>,
        predicate: bool,
    ) -> Arc<dyn ExecutionPlan> {
        let file_schema = Arc::new(Schema::new(vec![Field::new(
            "did",
            DataType::Utf8View,
            true,
        )]));
        let table = TableSchema::builder(file_schema)
            .with_table_partition_cols(vec![
                Arc::new(Field::new("kind", DataType::Utf8View, false)),
                Arc::new(Field::new("collection", DataType::Utf8View, true)),
            ])
            .build();
        let mut source = ParquetSource::new(table);
        if predicate {
            let did: Arc<dyn PhysicalExpr> = Arc::new(Column::new("did", 0));
            source = source.with_predicate(Arc::new(BinaryExpr::new(
                did,
                Operator::Eq,
                lit(ScalarValue::Utf8View(Some("did:plc:x".into()))),
            )));
        }
        let config =
            FileScanConfigBuilder::new(ObjectStoreUrl::local_filesystem(), Arc::new(source))
                .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
                .with_projection_indices(Some(columns))
                .unwrap()
                .with_limit(limit)
                .build();
        DataSourceExec::from_data_source(config)
    }

    fn key(c: &str) -> Vec<ScalarValue> {
        vec![ScalarValue::Utf8View(Some(c.into()))]
    }

    #[test]
    fn a_file_split_into_ranges_is_counted_once() {
        let groups = vec![
            vec![
                file("a.parquet", LIKE, Some(7)).with_range(0, 500),
                file("b.parquet", POST, Some(5)),
            ],
            vec![
                file("a.parquet", LIKE, Some(7)).with_range(500, 1000),
                file("c.parquet", LIKE, Some(11)),
            ],
        ];
        // output column 0 is `collection` (table column 2)
        let got = logged_counts(&scan(groups, vec![2], None, false), &[0])
            .unwrap()
            .unwrap();
        let want: HashMap<_, _> = [(key(LIKE), 18), (key(POST), 5)].into();
        assert_eq!(got, want);
    }

    #[test]
    fn two_keys_follow_the_projection() {
        let groups = vec![vec![file("a", LIKE, Some(3)), file("b", POST, Some(4))]];
        // output (collection, kind): keys [1, 0] are (kind, collection)
        let got = logged_counts(&scan(groups, vec![2, 1], None, false), &[1, 0])
            .unwrap()
            .unwrap();
        let commit = ScalarValue::Utf8View(Some("commit".into()));
        let want: HashMap<_, _> = [
            (vec![commit.clone(), key(LIKE)[0].clone()], 3),
            (vec![commit, key(POST)[0].clone()], 4),
        ]
        .into();
        assert_eq!(got, want);
    }

    #[test]
    fn anything_that_could_change_the_rows_read_is_not_counted() {
        let logged = || vec![vec![file("a", LIKE, Some(3)), file("b", POST, Some(4))]];
        assert!(
            logged_counts(&scan(logged(), vec![2], None, false), &[0])
                .unwrap()
                .is_some()
        );
        // a file without a logged count
        let unlogged = vec![vec![file("a", LIKE, Some(3)), file("b", POST, None)]];
        assert!(
            logged_counts(&scan(unlogged, vec![2], None, false), &[0])
                .unwrap()
                .is_none()
        );
        // a key that is a column of the file, not of the partition
        assert!(
            logged_counts(&scan(logged(), vec![0, 2], None, false), &[0])
                .unwrap()
                .is_none()
        );
        assert!(
            logged_counts(&scan(logged(), vec![0, 2], None, false), &[1])
                .unwrap()
                .is_some()
        );
        // a limit, a predicate
        assert!(
            logged_counts(&scan(logged(), vec![2], Some(1), false), &[0])
                .unwrap()
                .is_none()
        );
        assert!(
            logged_counts(&scan(logged(), vec![2], None, true), &[0])
                .unwrap()
                .is_none()
        );
        // not a file scan
        let schema = Arc::new(Schema::new(vec![Field::new("c", DataType::Utf8View, true)]));
        let memory = MemorySourceConfig::try_new_exec(&[vec![]], schema, None).unwrap();
        assert!(
            logged_counts(&(memory as Arc<dyn ExecutionPlan>), &[0])
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn counts_past_what_count_returns_are_an_error() {
        let huge = vec![vec![
            file("a", LIKE, Some(i64::MAX as u64)),
            file("b", LIKE, Some(1)),
        ]];
        let err = logged_counts(&scan(huge, vec![2], None, false), &[0]).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        let beyond = vec![vec![file("a", LIKE, Some(u64::MAX))]];
        assert!(logged_counts(&scan(beyond, vec![2], None, false), &[0]).is_err());
        // up to the limit is a count
        let max = vec![vec![file("a", LIKE, Some(i64::MAX as u64))]];
        let got = logged_counts(&scan(max, vec![2], None, false), &[0])
            .unwrap()
            .unwrap();
        assert_eq!(got[&key(LIKE)], i64::MAX);
    }
}
