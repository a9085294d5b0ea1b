//! The query timeout, enforced inside the plan.
//!
//! A timer around a query only fires when the query's task yields, and an operator that
//! multiplies rows (a cross join, an unnest, a generated series) can run for minutes without
//! yielding: the HTTP response came back "timed out" while the query kept two cores busy until
//! it finished. Every operator of a plan is therefore wrapped in a [`DeadlineExec`] that checks
//! the clock each time its output is polled and ends the stream with [`DeadlineExceeded`] once
//! the deadline has passed, so the work stops within one batch of the limit.
//!
//! Planning is under the same deadline: every logical and physical optimizer rule checks it
//! before it runs (and rules the optimizer applies node by node check it at every node), so
//! a plan whose optimisation grows fast with its depth stops at the timeout.
//!
//! Each poll also starts a new count of what the bounded functions produce (`bounded`'s
//! ledger), before the operator is polled and after it yields: what one operator computes for
//! one batch is counted on its own.

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The error a stream ends with when the query's time is up.
#[derive(Debug, thiserror::Error)]
#[error("query exceeded the {0:?} timeout")]
pub struct DeadlineExceeded(pub Duration);

/// What every operator of a plan is held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// When the query's time is up.
    pub deadline: Instant,
    /// The timeout (for the error message).
    pub timeout: Duration,
    /// Most bytes one batch an operator yields may hold (the bounded functions' budget).
    pub batch_bytes: u64,
}

/// Wraps every node of `plan` so that its output stops at the deadline, and at a batch over
/// the size limit.
pub fn wrap(plan: Arc<dyn ExecutionPlan>, limits: Limits) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|p| {
        let p = super::bounded::scope_join_filter(p)?;
        Ok(Transformed::yes(Arc::new(DeadlineExec {
            props: p.properties().clone(),
            input: p,
            limits,
        }) as Arc<dyn ExecutionPlan>))
    })
    .map(|t| t.data)
}

/// Passes its input through until the deadline, then fails.
#[derive(Debug)]
pub struct DeadlineExec {
    input: Arc<dyn ExecutionPlan>,
    props: Arc<PlanProperties>,
    limits: Limits,
}

impl DisplayAs for DeadlineExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        self.input.fmt_as(t, f)
    }
}

impl ExecutionPlan for DeadlineExec {
    fn name(&self) -> &str {
        self.input.name()
    }

    fn downcast_delegate(&self) -> Option<&dyn ExecutionPlan> {
        Some(self.input.as_ref())
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let input = children
            .into_iter()
            .next()
            .ok_or_else(|| DataFusionError::Internal("DeadlineExec needs one child".into()))?;
        Ok(Arc::new(DeadlineExec {
            props: input.properties().clone(),
            input,
            limits: self.limits,
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let Limits {
            deadline, timeout, ..
        } = self.limits;
        if Instant::now() >= deadline {
            return Err(DataFusionError::External(Box::new(DeadlineExceeded(
                timeout,
            ))));
        }
        let input = self.input.execute(partition, context)?;
        Ok(Box::pin(DeadlineStream {
            input,
            measure: makes_new_batches(self.input.as_ref()),
            operator: self.input.name().to_string(),
            limits: self.limits,
            done: false,
        }))
    }
}

/// Whether an operator's batches can hold more than the batches it read: false only for
/// those that hand on their input's batches as they are (a union, a merge of partitions
/// into one stream) or a selection of their columns (a projection of distinct columns). Their
/// input's own wrapper has measured those batches; measuring again costs a pass over every
/// string view of every batch (2 % of JSONBench Q3's time) and can never refuse anything.
fn makes_new_batches(op: &dyn ExecutionPlan) -> bool {
    use datafusion::physical_expr::expressions::Column;
    use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
    use datafusion::physical_plan::projection::ProjectionExec;
    use datafusion::physical_plan::union::UnionExec;
    if op.downcast_ref::<UnionExec>().is_some()
        || op.downcast_ref::<CoalescePartitionsExec>().is_some()
    {
        return false;
    }
    let Some(p) = op.downcast_ref::<ProjectionExec>() else {
        return true;
    };
    // each input column at most once: `SELECT s AS a, s AS b` doubles what a batch stands for
    let mut seen = std::collections::HashSet::new();
    !p.expr().iter().all(|e| {
        e.expr
            .downcast_ref::<Column>()
            .is_some_and(|c| seen.insert(c.index()))
    })
}

/// An operator's output, up to the deadline.
struct DeadlineStream {
    input: SendableRecordBatchStream,
    /// Whether its batches are measured against the limit (not when they are its input's,
    /// already measured below it).
    measure: bool,
    /// The operator's name, for the error of a batch over the limit.
    operator: String,
    limits: Limits,
    /// The stream ended (with its last batch or an error): nothing more is computed.
    done: bool,
}

impl futures::Stream for DeadlineStream {
    type Item = Result<arrow::record_batch::RecordBatch>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if Instant::now() >= self.limits.deadline {
            self.done = true;
            return Poll::Ready(Some(Err(DataFusionError::External(Box::new(
                DeadlineExceeded(self.limits.timeout),
            )))));
        }
        super::bounded::reset_ledger();
        let r = self.input.poll_next_unpin(cx);
        super::bounded::reset_ledger();
        match r {
            Poll::Ready(Some(Ok(_))) if Instant::now() >= self.limits.deadline => {
                self.done = true;
                Poll::Ready(Some(Err(DataFusionError::External(Box::new(
                    DeadlineExceeded(self.limits.timeout),
                )))))
            }
            Poll::Ready(Some(Ok(b))) if !self.measure => Poll::Ready(Some(Ok(b))),
            Poll::Ready(Some(Ok(b))) => {
                // what one operator computed for one batch: an expression the bounded
                // functions do not cover (sixteen copies of a column, a chain of CTEs each
                // doubling the last) stops here, one batch past the limit at most
                let bytes = super::bounded::batch_bytes(&b);
                if bytes > self.limits.batch_bytes {
                    self.done = true;
                    metrics::counter!("atlake_query_batches_refused_total").increment(1);
                    return Poll::Ready(Some(Err(DataFusionError::ResourcesExhausted(format!(
                        "{} produced a batch of {} MiB ({} rows), more than the {} MiB one batch may hold",
                        self.operator,
                        bytes >> 20,
                        b.num_rows(),
                        self.limits.batch_bytes >> 20
                    )))));
                }
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

impl datafusion::physical_plan::RecordBatchStream for DeadlineStream {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.input.schema()
    }
}

fn exceeded(deadline: Instant, timeout: Duration) -> Result<()> {
    if Instant::now() >= deadline {
        return Err(DataFusionError::External(Box::new(DeadlineExceeded(
            timeout,
        ))));
    }
    Ok(())
}

/// A logical optimizer rule that first checks the deadline (when the query has one), and
/// runs with the bounded functions told that their calls are constant folding
/// ([`super::bounded::folding`]).
#[derive(Debug)]
struct TimedRule {
    inner: Arc<dyn datafusion::optimizer::OptimizerRule + Send + Sync>,
    deadline: Option<Instant>,
    timeout: Duration,
}

impl datafusion::optimizer::OptimizerRule for TimedRule {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn apply_order(&self) -> Option<datafusion::optimizer::ApplyOrder> {
        self.inner.apply_order()
    }

    fn rewrite(
        &self,
        plan: datafusion::logical_expr::LogicalPlan,
        config: &dyn datafusion::optimizer::OptimizerConfig,
    ) -> Result<Transformed<datafusion::logical_expr::LogicalPlan>> {
        if let Some(at) = self.deadline {
            exceeded(at, self.timeout)?;
        }
        super::bounded::folding(|| self.inner.rewrite(plan, config))
    }
}

/// A physical optimizer rule that first checks the deadline.
#[derive(Debug)]
struct TimedPhysicalRule {
    inner: Arc<dyn datafusion::physical_optimizer::PhysicalOptimizerRule + Send + Sync>,
    deadline: Instant,
    timeout: Duration,
}

impl datafusion::physical_optimizer::PhysicalOptimizerRule for TimedPhysicalRule {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &datafusion::config::ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        exceeded(self.deadline, self.timeout)?;
        self.inner.optimize(plan, config)
    }

    fn optimize_with_context(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        context: &dyn datafusion::physical_optimizer::PhysicalOptimizerContext,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        exceeded(self.deadline, self.timeout)?;
        self.inner.optimize_with_context(plan, context)
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn schema_check(&self) -> bool {
        self.inner.schema_check()
    }
}

/// DataFusion's logical optimizer rules, each checking `deadline` first (when there is one)
/// and folding constants only up to [`super::bounded::FOLD_BYTES`].
pub fn logical_rules(
    deadline: Option<Instant>,
    timeout: Duration,
) -> Vec<Arc<dyn datafusion::optimizer::OptimizerRule + Send + Sync>> {
    datafusion::optimizer::Optimizer::new()
        .rules
        .into_iter()
        .map(|inner| {
            Arc::new(TimedRule {
                inner,
                deadline,
                timeout,
            }) as Arc<dyn datafusion::optimizer::OptimizerRule + Send + Sync>
        })
        .collect()
}

/// DataFusion's physical optimizer rules, each checking `deadline` first.
pub fn physical_rules(
    deadline: Instant,
    timeout: Duration,
) -> Vec<Arc<dyn datafusion::physical_optimizer::PhysicalOptimizerRule + Send + Sync>> {
    datafusion::physical_optimizer::optimizer::PhysicalOptimizer::new()
        .rules
        .into_iter()
        .map(|inner| {
            Arc::new(TimedPhysicalRule {
                inner,
                deadline,
                timeout,
            })
                as Arc<dyn datafusion::physical_optimizer::PhysicalOptimizerRule + Send + Sync>
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, StringArray};
    use arrow::record_batch::RecordBatch;
    use datafusion::datasource::memory::MemorySourceConfig;

    async fn run(batch: RecordBatch, batch_bytes: u64) -> Result<usize> {
        let plan = MemorySourceConfig::try_new_exec(&[vec![batch.clone()]], batch.schema(), None)?;
        let plan = wrap(
            plan,
            Limits {
                deadline: Instant::now() + Duration::from_secs(60),
                timeout: Duration::from_secs(60),
                batch_bytes,
            },
        )?;
        let task = Arc::new(TaskContext::default());
        let out = datafusion::physical_plan::collect(plan, task).await?;
        Ok(out.iter().map(|b| b.num_rows()).sum())
    }

    #[tokio::test]
    async fn a_batch_over_the_limit_ends_the_stream_and_one_at_it_passes() {
        let col: ArrayRef = Arc::new(StringArray::from(vec!["a".repeat(1 << 20)]));
        let batch = RecordBatch::try_from_iter([("s", col)]).unwrap();
        let bytes = crate::query::bounded::batch_bytes(&batch);
        assert!(bytes > 1 << 20, "{bytes}");
        assert_eq!(run(batch.clone(), bytes).await.unwrap(), 1);
        let e = run(batch, bytes - 1).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("DataSourceExec produced a batch of 1 MiB (1 rows)"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn operators_stop_at_the_deadline() {
        let col: ArrayRef = Arc::new(StringArray::from(vec!["a"]));
        let batch = RecordBatch::try_from_iter([("s", col)]).unwrap();
        let plan =
            MemorySourceConfig::try_new_exec(&[vec![batch.clone()]], batch.schema(), None).unwrap();
        let plan = wrap(
            plan,
            Limits {
                deadline: Instant::now(),
                timeout: Duration::from_millis(5),
                batch_bytes: u64::MAX,
            },
        )
        .unwrap();
        let e = datafusion::physical_plan::collect(plan, Arc::new(TaskContext::default()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("timeout"), "{e}");
    }

    #[tokio::test]
    async fn batches_handed_on_are_not_measured_again_and_computed_ones_are() {
        use datafusion::physical_expr::expressions::{BinaryExpr, Column};
        use datafusion::physical_plan::projection::ProjectionExec;
        use datafusion::physical_plan::union::UnionExec;
        let col: ArrayRef = Arc::new(StringArray::from(vec!["a".repeat(1 << 20)]));
        let batch = RecordBatch::try_from_iter([("s", col)]).unwrap();
        let bytes = crate::query::bounded::batch_bytes(&batch);
        let source = || {
            MemorySourceConfig::try_new_exec(&[vec![batch.clone()]], batch.schema(), None).unwrap()
        };
        let limits = Limits {
            deadline: Instant::now() + Duration::from_secs(60),
            timeout: Duration::from_secs(60),
            batch_bytes: bytes,
        };
        let column = |p: Arc<dyn ExecutionPlan>| {
            let e: Arc<dyn PhysicalExpr> = Arc::new(Column::new("s", 0));
            Arc::new(ProjectionExec::try_new(vec![(e, "s".to_string())], p).unwrap())
                as Arc<dyn ExecutionPlan>
        };
        let union = UnionExec::try_new(vec![column(source()), column(source())]).unwrap();
        assert!(!makes_new_batches(union.as_ref()));
        assert!(!makes_new_batches(column(source()).as_ref()));
        let twice: Vec<(Arc<dyn PhysicalExpr>, String)> = ["a", "b"]
            .iter()
            .map(|n| {
                (
                    Arc::new(Column::new("s", 0)) as Arc<dyn PhysicalExpr>,
                    n.to_string(),
                )
            })
            .collect();
        let twice = Arc::new(ProjectionExec::try_new(twice, source()).unwrap());
        assert!(makes_new_batches(twice.as_ref()));
        assert!(makes_new_batches(source().as_ref()));
        let task = Arc::new(TaskContext::default());
        let out = datafusion::physical_plan::collect(wrap(union, limits).unwrap(), task.clone())
            .await
            .unwrap();
        assert_eq!(out.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
        // `s || s` makes a batch twice the size of the one it read: measured and refused
        let s: Arc<dyn PhysicalExpr> = Arc::new(Column::new("s", 0));
        let doubled: Arc<dyn PhysicalExpr> = Arc::new(BinaryExpr::new(
            s.clone(),
            datafusion::logical_expr::Operator::StringConcat,
            s,
        ));
        let plan =
            Arc::new(ProjectionExec::try_new(vec![(doubled, "d".to_string())], source()).unwrap());
        assert!(makes_new_batches(plan.as_ref()));
        let e = datafusion::physical_plan::collect(wrap(plan, limits).unwrap(), task)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("ProjectionExec produced a batch of 2 MiB"),
            "{e}"
        );
    }
}
