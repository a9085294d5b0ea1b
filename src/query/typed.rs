//! Derived columns: `time` (from `time_us`) and the typed columns of the core lexicons (from
//! `record`), computed while scanning.
//!
//! The lake stores each commit's record once, as atproto JSON text. The typed columns of
//! `posts`, `likes`, … (text, langs, subject_uri, …) are computed from it by [`TypedExec`] only
//! when a query asks for them, with the same extractor the ingest uses to validate records. This
//! keeps the files smaller than DuckDB's own Parquet of the same events (see the README's
//! figures) and means a typed column can never disagree with its record.

use crate::model::lexicon::{Lexicon, extract};
use crate::model::rows::{TableKind, TypedColumns};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;
use std::sync::Arc;

/// Where an output column comes from.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A column of the input, by position.
    Input(usize),
    /// A typed column, by position among the lexicon's typed fields.
    Typed(usize),
    /// `time`: the input column at this position (`time_us`) as a UTC timestamp.
    Time(usize),
}

/// Maps input batches (stored columns, including `record`) to output batches with typed columns.
#[derive(Debug)]
pub struct TypedExec {
    input: Arc<dyn ExecutionPlan>,
    lexicon: Option<Lexicon>,
    record: usize,
    sources: Vec<Source>,
    schema: SchemaRef,
    props: Arc<PlanProperties>,
}

impl TypedExec {
    /// Output `schema` built from `input` by `sources`; `record` is the input position of the
    /// record column.
    pub fn new(
        input: Arc<dyn ExecutionPlan>,
        lexicon: Option<Lexicon>,
        record: usize,
        sources: Vec<Source>,
        schema: SchemaRef,
    ) -> Self {
        let ip = input.properties();
        let props = PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            ip.output_partitioning().clone(),
            ip.emission_type,
            ip.boundedness,
        );
        TypedExec {
            input,
            lexicon,
            record,
            sources,
            schema,
            props: Arc::new(props),
        }
    }
}

/// Computes the output batch for one input batch.
fn map_batch(
    b: &RecordBatch,
    lexicon: Option<Lexicon>,
    record: usize,
    sources: &[Source],
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let need_typed = sources.iter().any(|s| matches!(s, Source::Typed(_)));
    let typed: Vec<ArrayRef> = if let (true, Some(lexicon)) = (need_typed, lexicon) {
        let mut cols = TypedColumns::new(TableKind::Events(Some(lexicon)));
        let rec = b.column(record);
        let push = |cols: &mut TypedColumns, v: Option<&str>| {
            let t = v.and_then(|r| extract(lexicon, r));
            cols.push(t.as_ref());
        };
        if let Some(a) = rec.as_string_opt::<i32>() {
            for i in 0..a.len() {
                push(&mut cols, a.is_valid(i).then(|| a.value(i)));
            }
        } else if let Some(a) = rec.as_string_view_opt() {
            for i in 0..a.len() {
                push(&mut cols, a.is_valid(i).then(|| a.value(i)));
            }
        } else if let Some(a) = rec.as_string_opt::<i64>() {
            for i in 0..a.len() {
                push(&mut cols, a.is_valid(i).then(|| a.value(i)));
            }
        } else {
            for _ in 0..b.num_rows() {
                cols.push(None);
            }
        }
        cols.finish()
    } else {
        Vec::new()
    };
    let ts = arrow::datatypes::DataType::Timestamp(
        arrow::datatypes::TimeUnit::Microsecond,
        Some("UTC".into()),
    );
    let mut out: Vec<ArrayRef> = Vec::with_capacity(sources.len());
    for (k, s) in sources.iter().enumerate() {
        out.push(match s {
            Source::Input(i) => b.column(*i).clone(),
            Source::Typed(i) => match typed.get(*i) {
                Some(a) => a.clone(),
                None => arrow::array::new_null_array(schema.field(k).data_type(), b.num_rows()),
            },
            Source::Time(i) => arrow::compute::cast(b.column(*i), &ts)?,
        });
    }
    let opts = arrow::array::RecordBatchOptions::new().with_row_count(Some(b.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        out,
        &opts,
    )?)
}

impl DisplayAs for TypedExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "TypedExec: lexicon={}",
            self.lexicon.map_or("-", |l| l.nsid())
        )
    }
}

impl ExecutionPlan for TypedExec {
    fn name(&self) -> &str {
        "TypedExec"
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
        let input = children.into_iter().next().ok_or_else(|| {
            datafusion::error::DataFusionError::Internal("TypedExec needs one child".into())
        })?;
        Ok(Arc::new(TypedExec::new(
            input,
            self.lexicon,
            self.record,
            self.sources.clone(),
            self.schema.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let (lexicon, record, sources, schema) = (
            self.lexicon,
            self.record,
            self.sources.clone(),
            self.schema.clone(),
        );
        let s2 = schema.clone();
        let stream =
            input.map(move |b| b.and_then(|b| map_batch(&b, lexicon, record, &sources, &s2)));
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}
