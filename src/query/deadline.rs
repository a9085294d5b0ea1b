//! The query timeout, enforced inside the plan.
//!
//! A timer around a query only fires when the query's task yields, and an operator that
//! multiplies rows (a cross join, an unnest, a generated series) can run for minutes without
//! yielding: the HTTP response came back "timed out" while the query kept two cores busy until
//! it finished. Every operator of a plan is therefore wrapped in a [`DeadlineExec`] that checks
//! the clock each time its output is polled and ends the stream with [`DeadlineExceeded`] once
//! the deadline has passed, so the work stops within one batch of the limit.

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The error a stream ends with when the query's time is up.
#[derive(Debug, thiserror::Error)]
#[error("query exceeded the {0:?} timeout")]
pub struct DeadlineExceeded(pub Duration);

/// Wraps every node of `plan` so that its output stops at `deadline`.
pub fn wrap(
    plan: Arc<dyn ExecutionPlan>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|p| {
        Ok(Transformed::yes(Arc::new(DeadlineExec {
            props: p.properties().clone(),
            input: p,
            deadline,
            timeout,
        }) as Arc<dyn ExecutionPlan>))
    })
    .map(|t| t.data)
}

/// Passes its input through until the deadline, then fails.
#[derive(Debug)]
pub struct DeadlineExec {
    input: Arc<dyn ExecutionPlan>,
    props: Arc<PlanProperties>,
    deadline: Instant,
    timeout: Duration,
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
            deadline: self.deadline,
            timeout: self.timeout,
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let (deadline, timeout) = (self.deadline, self.timeout);
        if Instant::now() >= deadline {
            return Err(DataFusionError::External(Box::new(DeadlineExceeded(
                timeout,
            ))));
        }
        let input = self.input.execute(partition, context)?;
        let schema = input.schema();
        let stream = input
            .map(move |b| {
                if Instant::now() >= deadline {
                    return Err(DataFusionError::External(Box::new(DeadlineExceeded(
                        timeout,
                    ))));
                }
                b
            })
            // end the stream after the error: nothing more is computed
            .scan(false, |done, b| {
                if *done {
                    return futures::future::ready(None);
                }
                *done = b.is_err();
                futures::future::ready(Some(b))
            });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}
