//! The first (partial) phase of a GROUP BY that looks up a batch's group once when the batch has
//! one group.
//!
//! The lake is partitioned by collection and hour, so a batch read from one file has the same
//! `collection` on every row, and the same hour of `time`: JSONBench's questions group by
//! exactly those (`GROUP BY collection`, `GROUP BY collection, extract(hour FROM time)`).
//! DataFusion's partial aggregation hashes every row's key (a collection is about 20 bytes) and
//! compares it with the stored one: a third of the CPU of those queries. This operator takes
//! the place of the partial `AggregateExec` and, per batch, first checks whether every key
//! column holds one value (16-byte string views all equal, or fixed-width values all equal: a
//! pass over the column, no hashing); if so, it looks the group up once from the first row and
//! gives every row that group. Otherwise it does what DataFusion does, with DataFusion's own
//! group table. The accumulators, their states and the output are DataFusion's, so the final
//! phase that merges the states is unchanged.
//!
//! Like DataFusion's, it emits what it has early when the memory pool refuses more, and stops
//! aggregating (passing rows on as states) when the first 100,000 rows (by default) show nearly
//! as many groups as rows.

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::config::ConfigOptions;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{ColumnarValue, EmitTo, GroupsAccumulator};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, InputOrderMode, PlanProperties,
};
use datafusion_functions_aggregate_common::aggregate::groups_accumulator::GroupsAccumulatorAdapter;
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::Arc;

/// Puts [`ConstantKeyAggregateExec`] in place of every partial `AggregateExec` it can stand
/// for: one grouping set (no ROLLUP/CUBE), unordered input and aggregates, no LIMIT.
#[derive(Debug, Default)]
pub struct UseConstantKeyAggregate;

impl PhysicalOptimizerRule for UseConstantKeyAggregate {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|p| {
            let Some(agg) = p.downcast_ref::<AggregateExec>() else {
                return Ok(Transformed::no(p));
            };
            if !replaceable(agg) {
                return Ok(Transformed::no(p));
            }
            let node = ConstantKeyAggregateExec::try_new(agg.clone())?;
            Ok(Transformed::new(
                Arc::new(node) as Arc<dyn ExecutionPlan>,
                true,
                TreeNodeRecursion::Continue,
            ))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "atlake_constant_key_aggregate"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

fn replaceable(agg: &AggregateExec) -> bool {
    *agg.mode() == AggregateMode::Partial
        && agg.group_expr().is_single()
        && !agg.group_expr().expr().is_empty()
        && agg.limit_options().is_none()
        && *agg.input_order_mode() == InputOrderMode::Linear
        && agg.aggr_expr().iter().all(|a| a.order_bys().is_empty())
}

/// The partial phase of a GROUP BY, with one lookup for a batch of one group.
#[derive(Debug)]
pub struct ConstantKeyAggregateExec {
    /// The aggregate it stands for (its expressions, schema and input).
    agg: AggregateExec,
    props: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl ConstantKeyAggregateExec {
    fn try_new(agg: AggregateExec) -> Result<Self> {
        if !replaceable(&agg) {
            return internal_err!("ConstantKeyAggregateExec stands for partial aggregates only");
        }
        Ok(ConstantKeyAggregateExec {
            props: agg.properties().clone(),
            agg,
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }
}

impl DisplayAs for ConstantKeyAggregateExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "ConstantKey")?;
        self.agg.fmt_as(t, f)
    }
}

impl ExecutionPlan for ConstantKeyAggregateExec {
    fn name(&self) -> &str {
        "ConstantKeyAggregateExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn input_distribution_requirements(
        &self,
    ) -> datafusion::physical_plan::InputDistributionRequirements {
        self.agg.input_distribution_requirements()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.agg.apply_expressions(f)
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![self.agg.input()]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let agg = Arc::new(self.agg.clone()).replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )?;
        let Some(agg) = agg.downcast_ref::<AggregateExec>() else {
            return internal_err!("AggregateExec::with_new_children changed its type");
        };
        Ok(Arc::new(ConstantKeyAggregateExec::try_new(agg.clone())?))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.agg.input().execute(partition, context.clone())?;
        let options = context.session_config().options();
        let input_schema = self.agg.input().schema();
        let group_exprs: Vec<Arc<dyn PhysicalExpr>> = self
            .agg
            .group_expr()
            .expr()
            .iter()
            .map(|(e, _)| e.clone())
            .collect();
        let group_fields = self
            .agg
            .group_expr()
            .expr()
            .iter()
            .map(|(e, name)| {
                Ok(Field::new(
                    name,
                    e.data_type(&input_schema)?,
                    e.nullable(&input_schema)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let group_schema = Arc::new(Schema::new(group_fields));
        let state = State {
            schema: self.agg.schema(),
            group_schema: group_schema.clone(),
            group_exprs,
            args: self
                .agg
                .aggr_expr()
                .iter()
                .map(|a| a.expressions())
                .collect(),
            filters: self.agg.filter_expr().to_vec(),
            aggs: self.agg.aggr_expr().to_vec(),
            groups: new_group_values(group_schema, &GroupOrdering::None)?,
            accs: accumulators(self.agg.aggr_expr())?,
            ids: Vec::new(),
            reservation: MemoryConsumer::new(format!("ConstantKeyAggregate[{partition}]"))
                .register(context.memory_pool()),
            batch_size: context.session_config().batch_size().max(1),
            probe_rows: options
                .execution
                .skip_partial_aggregation_probe_rows_threshold,
            probe_ratio: options
                .execution
                .skip_partial_aggregation_probe_ratio_threshold,
            rows_seen: 0,
            literals: self
                .agg
                .aggr_expr()
                .iter()
                .map(|a| vec![None; a.expressions().len()])
                .collect(),
            probing: true,
            skipping: false,
            metrics: BaselineMetrics::new(&self.metrics, partition),
        };
        let out_schema = self.agg.schema();
        let stream = futures::stream::unfold(
            (input, state, VecDeque::<RecordBatch>::new(), false),
            |(mut input, mut st, mut pending, mut done)| async move {
                loop {
                    if let Some(b) = pending.pop_front() {
                        st.metrics.record_output(b.num_rows());
                        return Some((Ok(b), (input, st, pending, done)));
                    }
                    if done {
                        return None;
                    }
                    let step = match input.next().await {
                        Some(Ok(batch)) => {
                            let time = st.metrics.elapsed_compute().clone();
                            let timer = time.timer();
                            let r = st.absorb(&batch);
                            timer.done();
                            r
                        }
                        Some(Err(e)) => Err(e),
                        None => {
                            done = true;
                            st.emit()
                        }
                    };
                    match step {
                        Ok(out) => pending.extend(out),
                        Err(e) => {
                            done = true;
                            pending.clear();
                            return Some((Err(e), (input, st, pending, done)));
                        }
                    }
                }
            },
        );
        Ok(Box::pin(RecordBatchStreamAdapter::new(out_schema, stream)))
    }
}

/// DataFusion's choice of accumulator: the aggregate's own groups accumulator, or one
/// accumulator per group behind an adapter.
fn accumulators(aggs: &[Arc<AggregateFunctionExpr>]) -> Result<Vec<Box<dyn GroupsAccumulator>>> {
    aggs.iter()
        .map(|a| {
            if a.groups_accumulator_supported() {
                a.create_groups_accumulator()
            } else {
                let a = a.clone();
                Ok(Box::new(GroupsAccumulatorAdapter::new(move || {
                    a.create_accumulator()
                })) as Box<dyn GroupsAccumulator>)
            }
        })
        .collect()
}

/// Whether every row of `a` holds the same value (conservatively: `false` may still be one
/// value). Nulls count as different.
fn one_value(a: &ArrayRef) -> bool {
    if a.len() <= 1 {
        return true;
    }
    if a.null_count() != 0 {
        return false;
    }
    fn same<T: PartialEq + Copy>(v: &[T]) -> bool {
        v.first().is_some_and(|f| v.iter().all(|x| x == f))
    }
    match a.data_type() {
        // equal views: the same length and bytes (inline), or the same bytes of one buffer
        DataType::Utf8View => same(a.as_string_view().views()),
        DataType::BinaryView => same(a.as_binary_view().views()),
        dt => {
            let data = a.to_data();
            match (dt.primitive_width(), data.buffers().first()) {
                (Some(1), Some(_)) => same(data.buffer::<u8>(0)),
                (Some(2), Some(_)) => same(data.buffer::<u16>(0)),
                (Some(4), Some(_)) => same(data.buffer::<u32>(0)),
                (Some(8), Some(_)) => same(data.buffer::<u64>(0)),
                (Some(16), Some(_)) => same(data.buffer::<u128>(0)),
                _ => false,
            }
        }
    }
}

struct State {
    schema: SchemaRef,
    group_schema: SchemaRef,
    group_exprs: Vec<Arc<dyn PhysicalExpr>>,
    args: Vec<Vec<Arc<dyn PhysicalExpr>>>,
    filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    aggs: Vec<Arc<AggregateFunctionExpr>>,
    groups: Box<dyn GroupValues>,
    accs: Vec<Box<dyn GroupsAccumulator>>,
    ids: Vec<usize>,
    reservation: MemoryReservation,
    batch_size: usize,
    probe_rows: usize,
    probe_ratio: f64,
    rows_seen: usize,
    probing: bool,
    skipping: bool,
    metrics: BaselineMetrics,
    /// Per aggregate, per argument: a literal argument (`count(*)` is `count(1)`) expanded
    /// once, sliced for each batch, instead of a fresh array of the batch's length each time.
    literals: Vec<Vec<Option<(ScalarValue, ArrayRef)>>>,
}

impl State {
    fn evaluate(exprs: &[Arc<dyn PhysicalExpr>], batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        exprs
            .iter()
            .map(|e| e.evaluate(batch)?.into_array(batch.num_rows()))
            .collect()
    }

    /// The group keys of a batch as they come: a key that is a literal, or a function of the
    /// file's constants (the hour of a file of one hour), stays one value.
    fn keys(&self, batch: &RecordBatch) -> Result<Vec<ColumnarValue>> {
        self.group_exprs.iter().map(|e| e.evaluate(batch)).collect()
    }

    /// The arguments of aggregate `i`: literals come from an array expanded once per stream.
    fn arguments(&mut self, i: usize, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        let n = batch.num_rows();
        let mut out = Vec::with_capacity(self.args[i].len());
        for (j, e) in self.args[i].iter().enumerate() {
            match e.evaluate(batch)? {
                ColumnarValue::Array(a) => out.push(a),
                ColumnarValue::Scalar(s) => {
                    let slot = &mut self.literals[i][j];
                    let fits = slot.as_ref().is_some_and(|(v, a)| *v == s && a.len() >= n);
                    if !fits {
                        let a = s.to_array_of_size(n.max(self.batch_size))?;
                        *slot = Some((s, a));
                    }
                    match slot {
                        Some((_, a)) => out.push(a.slice(0, n)),
                        None => return internal_err!("a literal argument was not expanded"),
                    }
                }
            }
        }
        Ok(out)
    }

    fn filter(
        f: &Option<Arc<dyn PhysicalExpr>>,
        batch: &RecordBatch,
    ) -> Result<Option<arrow::array::BooleanArray>> {
        let Some(f) = f else { return Ok(None) };
        let a = f.evaluate(batch)?.into_array(batch.num_rows())?;
        match a.as_boolean_opt() {
            Some(b) => Ok(Some(b.clone())),
            None => internal_err!("aggregate FILTER is not boolean"),
        }
    }

    /// Adds a batch; returns batches to send on (early emission, or rows passed on as states).
    fn absorb(&mut self, batch: &RecordBatch) -> Result<Vec<RecordBatch>> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(Vec::new());
        }
        let keys = self.keys(batch)?;
        // once skipping, every row goes on as it is: no need to look for one value
        let one = !self.skipping
            && keys.iter().all(|k| match k {
                ColumnarValue::Scalar(_) => true,
                ColumnarValue::Array(a) => one_value(a),
            });
        if one {
            let first = keys
                .iter()
                .map(|k| match k {
                    ColumnarValue::Scalar(s) => s.to_array_of_size(1),
                    ColumnarValue::Array(a) => Ok(a.slice(0, 1)),
                })
                .collect::<Result<Vec<_>>>()?;
            self.groups.intern(&first, &mut self.ids)?;
            let g = self.ids.first().copied().ok_or_else(|| {
                datafusion::error::DataFusionError::Internal(
                    "interning one group gave no group id".into(),
                )
            })?;
            self.ids.clear();
            self.ids.resize(n, g);
        } else {
            let keys = keys
                .into_iter()
                .map(|k| k.into_array(n))
                .collect::<Result<Vec<_>>>()?;
            if self.skipping {
                return self.pass_on(&keys, batch);
            }
            self.groups.intern(&keys, &mut self.ids)?;
        }
        let total = self.groups.len();
        for i in 0..self.accs.len() {
            let values = self.arguments(i, batch)?;
            let filter = Self::filter(&self.filters[i], batch)?;
            self.accs[i].update_batch(&values, &self.ids, filter.as_ref(), total)?;
        }
        self.rows_seen += n;
        if self.probing && self.rows_seen >= self.probe_rows {
            self.probing = false;
            let ratio = self.groups.len() as f64 / self.rows_seen as f64;
            if self.probe_ratio < 1.0 && ratio >= self.probe_ratio {
                // nearly a group per row: aggregating here only delays the final phase
                self.skipping = true;
                return self.emit();
            }
        }
        let size = self.groups.size() + self.accs.iter().map(|a| a.size()).sum::<usize>();
        if self.reservation.try_resize(size).is_err() {
            // what is held goes on to the final phase now, and the memory is given back
            let out = self.emit()?;
            self.reservation.free();
            return Ok(out);
        }
        Ok(Vec::new())
    }

    /// Each row as its own group's state.
    fn pass_on(&mut self, keys: &[ArrayRef], batch: &RecordBatch) -> Result<Vec<RecordBatch>> {
        let mut cols = keys.to_vec();
        for i in 0..self.accs.len() {
            let values = Self::evaluate(&self.args[i], batch)?;
            let filter = Self::filter(&self.filters[i], batch)?;
            cols.extend(self.accs[i].convert_to_state(&values, filter.as_ref())?);
        }
        Ok(vec![RecordBatch::try_new(self.schema.clone(), cols)?])
    }

    /// Everything held, as state batches of at most `batch_size` rows; starts over empty.
    fn emit(&mut self) -> Result<Vec<RecordBatch>> {
        if self.groups.is_empty() {
            return Ok(Vec::new());
        }
        let mut cols = self.groups.emit(EmitTo::All)?;
        for acc in &mut self.accs {
            cols.extend(acc.state(EmitTo::All)?);
        }
        // fresh accumulators and table: the old ones may keep capacity
        self.accs = accumulators(&self.aggs)?;
        self.groups = new_group_values(self.group_schema.clone(), &GroupOrdering::None)?;
        self.reservation.free();
        let all = RecordBatch::try_new(self.schema.clone(), cols)?;
        let mut out = Vec::new();
        let mut at = 0;
        while at < all.num_rows() {
            let len = self.batch_size.min(all.num_rows() - at);
            out.push(all.slice(at, len));
            at += len;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::traffic::Rng;
    use arrow::array::{Int32Array, Int64Array, StringViewArray};
    use datafusion::common::ScalarValue;
    use datafusion::datasource::MemTable;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use datafusion::execution::session_state::SessionStateBuilder;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// Batches like a lake's: some with one collection and hour (as one file gives), some
    /// mixed, some with null keys; `c` long strings, `h` small ints, `v` values.
    fn table(seed: u64, partitions: usize) -> MemTable {
        let schema = Arc::new(Schema::new(vec![
            Field::new("c", DataType::Utf8View, true),
            Field::new("h", DataType::Int32, true),
            Field::new("v", DataType::Int64, true),
            Field::new("d", DataType::Utf8View, true),
        ]));
        let mut rng = Rng::new(seed);
        let name = |k: u64| format!("app.bsky.feed.collection{k}");
        let parts = (0..partitions)
            .map(|_| {
                (0..8)
                    .map(|b| {
                        let rows = 1 + rng.below(2500) as usize;
                        let (c, h): (StringViewArray, Int32Array) = match b % 4 {
                            // one value, repeated: what a partition column gives
                            0 | 1 => {
                                let c = name(rng.below(5));
                                let h = rng.below(24) as i32;
                                let c = ScalarValue::Utf8View(Some(c))
                                    .to_array_of_size(rows)
                                    .unwrap();
                                (c.as_string_view().clone(), Int32Array::from(vec![h; rows]))
                            }
                            2 => (
                                (0..rows).map(|_| Some(name(rng.below(5)))).collect(),
                                (0..rows).map(|_| Some(rng.below(24) as i32)).collect(),
                            ),
                            _ => (
                                (0..rows)
                                    .map(|_| (rng.below(7) != 0).then(|| name(rng.below(5))))
                                    .collect(),
                                (0..rows)
                                    .map(|_| (rng.below(7) != 0).then(|| rng.below(24) as i32))
                                    .collect(),
                            ),
                        };
                        let v: Int64Array = (0..rows)
                            .map(|_| (rng.below(11) != 0).then(|| rng.below(1000) as i64 - 300))
                            .collect();
                        let d: StringViewArray = (0..rows)
                            .map(|_| Some(format!("did:plc:{:0>24}", rng.below(300))))
                            .collect();
                        RecordBatch::try_new(
                            schema.clone(),
                            vec![Arc::new(c), Arc::new(h), Arc::new(v), Arc::new(d)],
                        )
                        .unwrap()
                    })
                    .collect()
            })
            .collect();
        MemTable::try_new(schema, parts).unwrap()
    }

    fn context(ours: bool, config: SessionConfig) -> SessionContext {
        let mut b = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features();
        if ours {
            b = b.with_physical_optimizer_rule(Arc::new(UseConstantKeyAggregate));
        }
        let mut ctx = SessionContext::new_with_state(b.build());
        // the fast date_part gives one value for a batch within one hour: a key that is a
        // scalar, not an array
        if ours {
            crate::query::datepart::register(&mut ctx).unwrap();
        }
        ctx
    }

    async fn answer(ctx: &SessionContext, sql: &str) -> (String, String) {
        let df = ctx.sql(sql).await.unwrap();
        let plan = df.clone().create_physical_plan().await.unwrap();
        let shown = datafusion::physical_plan::displayable(plan.as_ref())
            .indent(true)
            .to_string();
        let out = arrow::util::pretty::pretty_format_batches(&df.collect().await.unwrap())
            .unwrap()
            .to_string();
        (shown, out)
    }

    const QUERIES: &[&str] = &[
        "SELECT c, count(*) AS n FROM t GROUP BY c ORDER BY c",
        "SELECT c, h, count(*) AS n, sum(v) AS s, min(v) AS lo, max(v) AS hi, avg(v) AS a \
         FROM t GROUP BY c, h ORDER BY c, h",
        "SELECT h, count(DISTINCT d) AS u, count(v) AS n FROM t GROUP BY h ORDER BY h",
        "SELECT c, count(*) FILTER (WHERE v > 100) AS big, count(DISTINCT d) AS u \
         FROM t GROUP BY c ORDER BY c",
        "SELECT d, count(*) AS n FROM t GROUP BY d ORDER BY n DESC, d LIMIT 5",
        "SELECT c, h % 5 AS k, sum(v) AS s FROM t WHERE v IS NOT NULL GROUP BY c, k \
         ORDER BY c, k",
        // within ±1 s of 1970: every batch is in hour 0 (one value), or in hours 23 and 0
        "SELECT c, extract(hour FROM to_timestamp_micros(abs(coalesce(v, 0)) * 1000)) AS hr, \
         count(*) AS n, count(1) AS one, sum(2) AS two FROM t GROUP BY c, hr ORDER BY c, hr",
        "SELECT extract(hour FROM to_timestamp_micros(coalesce(v, 0) * 1000)) AS hr, \
         extract(day FROM to_timestamp_micros(coalesce(v, 0) * 1000)) AS dy, count(*) AS n, \
         sum(v) AS s FROM t GROUP BY hr, dy ORDER BY hr, dy",
        // a batch of one h is one hour, another batch's another: a literal argument and a
        // scalar key that change from batch to batch
        "SELECT extract(hour FROM to_timestamp_micros(CAST(h AS BIGINT) * 3600000000)) AS hr, \
         c, count(*) AS n FROM t GROUP BY hr, c ORDER BY hr, c",
        "SELECT c, sum(extract(hour FROM to_timestamp_micros(CAST(h AS BIGINT) * 3600000000))) \
         AS sh, count(*) AS n FROM t GROUP BY c ORDER BY c",
    ];

    #[tokio::test]
    async fn same_answers_as_datafusions_partial_aggregate() {
        // batches of up to 2,500 rows, read with the default batch size and with 64: a
        // literal argument expanded once must be expanded again for a longer batch
        for (seed, batch_size) in [(1, 8192), (2, 8192), (3, 8192), (4, 64)] {
            let cfg = || {
                SessionConfig::new()
                    .with_target_partitions(3)
                    .with_batch_size(batch_size)
            };
            let (plain, ours) = (context(false, cfg()), context(true, cfg()));
            for ctx in [&plain, &ours] {
                ctx.register_table("t", Arc::new(table(seed, 3))).unwrap();
            }
            for q in QUERIES {
                let (plan_plain, want) = answer(&plain, q).await;
                let (plan_ours, got) = answer(&ours, q).await;
                assert!(!plan_plain.contains("ConstantKey"));
                assert!(
                    plan_ours.contains("ConstantKeyAggregateExec"),
                    "{plan_ours}"
                );
                assert_eq!(got, want, "seed {seed}: {q}");
            }
        }
    }

    #[tokio::test]
    async fn skipping_partial_aggregation_keeps_answers() {
        // every batch's groups are new: after 500 rows the operator passes rows on as states
        let cfg = || {
            let mut c = SessionConfig::new().with_target_partitions(2);
            c.options_mut()
                .execution
                .skip_partial_aggregation_probe_rows_threshold = 500;
            c.options_mut()
                .execution
                .skip_partial_aggregation_probe_ratio_threshold = 0.01;
            c
        };
        let (plain, ours) = (context(false, cfg()), context(true, cfg()));
        for ctx in [&plain, &ours] {
            ctx.register_table("t", Arc::new(table(7, 2))).unwrap();
        }
        for q in QUERIES {
            assert_eq!(answer(&ours, q).await.1, answer(&plain, q).await.1, "{q}");
        }
    }

    #[tokio::test]
    async fn emits_early_when_the_pool_refuses_and_loses_nothing() {
        // the partial phase alone (both partitions), in a 64 KiB pool: groups go on in several
        // early batches
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(64 << 10, 1.0)
            .build_arc()
            .unwrap();
        let state = SessionStateBuilder::new()
            .with_config(SessionConfig::new().with_target_partitions(2))
            .with_runtime_env(runtime)
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(UseConstantKeyAggregate))
            .build();
        let ctx = SessionContext::new_with_state(state);
        ctx.register_table("t", Arc::new(table(5, 2))).unwrap();
        let plan = ctx
            .sql("SELECT d, count(*) AS n FROM t GROUP BY d")
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let mut node = None;
        plan.apply(|p| {
            if p.downcast_ref::<ConstantKeyAggregateExec>().is_some() {
                node = Some(p.clone());
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
        let node = node.expect("the partial aggregate was replaced");
        let batches = datafusion::physical_plan::collect(node, ctx.task_ctx())
            .await
            .unwrap();
        let mut counts = std::collections::HashMap::<String, i64>::new();
        let mut rows = 0;
        for b in &batches {
            rows += b.num_rows();
            let d = b.column(0).as_string_view();
            let n = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
            for i in 0..b.num_rows() {
                *counts.entry(d.value(i).to_string()).or_default() += n.value(i);
            }
        }
        assert!(rows > counts.len(), "some group was emitted twice (early)");
        let total: i64 = counts.values().sum();
        let want = ctx
            .sql("SELECT count(*) FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let want = want[0]
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0);
        assert_eq!(total, want);
    }

    #[test]
    fn one_value_is_conservative() {
        let long = "app.bsky.feed.collection1";
        // a partition column: one value, repeated
        let same = ScalarValue::Utf8View(Some(long.into()))
            .to_array_of_size(50)
            .unwrap();
        assert!(one_value(&same));
        let short = ScalarValue::Utf8View(Some("commit".into()))
            .to_array_of_size(50)
            .unwrap();
        assert!(one_value(&short));
        // equal strings stored apart: not recognised, which is allowed (the slow path)
        let apart: ArrayRef = Arc::new(StringViewArray::from_iter_values([long; 50]));
        assert!(!one_value(&apart));
        let differ: ArrayRef = Arc::new(StringViewArray::from_iter_values([long, "x"]));
        assert!(!one_value(&differ));
        let with_null: ArrayRef = Arc::new(Int32Array::from(vec![Some(1), None]));
        assert!(!one_value(&with_null));
        let ints: ArrayRef = Arc::new(Int32Array::from(vec![7; 9]));
        assert!(one_value(&ints));
        let sliced = Arc::new(Int32Array::from(vec![1, 7, 7, 7, 2])).slice(1, 3);
        assert!(one_value(&(Arc::new(sliced) as ArrayRef)));
        let bools: ArrayRef = Arc::new(arrow::array::BooleanArray::from(vec![true; 4]));
        assert!(!one_value(&bools));
    }
}
