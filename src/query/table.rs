//! A lake table: the Parquet files of some partitions plus the rows still in memory, scanned as
//! one plan.
//!
//! Files are pruned by partition before DataFusion sees them: a filter on `collection` keeps only
//! that collection's directory (and `_other`, which holds the long tail), a filter on `kind`
//! keeps only the matching partitions, and a range on `time`/`time_us` keeps only the hours it
//! touches. Inside the files, DataFusion prunes row groups and pages with their statistics and
//! the page index, using the same filters.

use crate::model::rows::TableKind;
use crate::sink::partition::{HOUR_US, LakeFile, PartitionName};
use arrow::array::{ArrayRef, RecordBatch, new_null_array};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use std::sync::Arc;

/// Which partitions a table reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableDef {
    /// Every event partition (not the quarantine); common columns only.
    Events,
    /// One core collection, with its typed columns.
    Collection(crate::model::lexicon::Lexicon),
    /// `#identity` events.
    Identity,
    /// `#account` events.
    Account,
    /// The quarantine.
    Errors,
}

impl TableDef {
    /// The row shape of its partitions.
    pub fn kind(&self) -> TableKind {
        match self {
            TableDef::Events => TableKind::Events(None),
            TableDef::Collection(l) => TableKind::Events(Some(*l)),
            TableDef::Identity => TableKind::Identity,
            TableDef::Account => TableKind::Account,
            TableDef::Errors => TableKind::Errors,
        }
    }

    /// The table's schema (stored columns, then typed columns derived from `record`).
    pub fn schema(&self) -> SchemaRef {
        crate::model::rows::table_schema(self.kind())
    }

    /// The schema of the stored columns.
    pub fn stored_schema(&self) -> SchemaRef {
        crate::model::rows::schema(self.kind())
    }

    /// Whether a partition belongs to this table.
    pub fn includes(&self, p: &PartitionName) -> bool {
        match self {
            TableDef::Events => *p != PartitionName::Errors,
            TableDef::Collection(l) => matches!(p, PartitionName::Collection(c) if c == l.nsid()),
            TableDef::Identity => *p == PartitionName::Identity,
            TableDef::Account => *p == PartitionName::Account,
            TableDef::Errors => *p == PartitionName::Errors,
        }
    }
}

/// Reshapes a batch to `schema`: columns by name, nulls for missing ones.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let cols: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => c.clone(),
            _ => new_null_array(f.data_type(), batch.num_rows()),
        })
        .collect();
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

/// A table over a snapshot of files and in-memory rows.
#[derive(Debug)]
pub struct LakeTable {
    /// What it reads.
    pub def: TableDef,
    schema: SchemaRef,
    stored: SchemaRef,
    files: Vec<LakeFile>,
    batches: Vec<RecordBatch>,
    store_url: ObjectStoreUrl,
    /// object path prefix of the lake inside the store
    prefix: String,
}

impl LakeTable {
    /// A table reading `files` and `batches` (both already the whole snapshot; this keeps only
    /// what `def` includes).
    pub fn new(
        def: TableDef,
        files: &[LakeFile],
        batches: &[(crate::sink::partition::PartitionKey, RecordBatch)],
        store_url: ObjectStoreUrl,
        prefix: String,
    ) -> Result<Self> {
        let schema = def.schema();
        let stored = def.stored_schema();
        let files = files
            .iter()
            .filter(|f| def.includes(&f.key.name))
            .cloned()
            .collect();
        let batches = batches
            .iter()
            .filter(|(k, b)| def.includes(&k.name) && b.num_rows() > 0)
            .map(|(_, b)| conform(b, &stored))
            .collect::<Result<Vec<_>>>()?;
        Ok(LakeTable {
            def,
            schema,
            stored,
            files,
            batches,
            store_url,
            prefix,
        })
    }

    /// Files that survive partition pruning by `filters`.
    pub fn prune(&self, filters: &[Expr]) -> Vec<&LakeFile> {
        let mut colls: Option<Vec<String>> = None;
        let mut kinds: Option<Vec<String>> = None;
        let (mut lo, mut hi) = (i64::MIN, i64::MAX);
        for f in filters {
            for e in split_and(f) {
                analyze(e, &mut colls, &mut kinds, &mut lo, &mut hi);
            }
        }
        self.files
            .iter()
            .filter(|f| {
                let name = &f.key.name;
                let coll_ok = match &colls {
                    None => true,
                    Some(cs) => match name {
                        PartitionName::Collection(c) => cs.iter().any(|x| x == c),
                        PartitionName::Other => cs.iter().any(|x| !x.starts_with('_')),
                        _ => false,
                    },
                };
                let kind_ok = match &kinds {
                    None => true,
                    Some(ks) => ks.iter().any(|k| match k.as_str() {
                        "commit" => {
                            matches!(name, PartitionName::Collection(_) | PartitionName::Other)
                        }
                        "identity" => *name == PartitionName::Identity,
                        "account" => *name == PartitionName::Account,
                        "sync" => *name == PartitionName::Sync,
                        _ => false,
                    }),
                };
                let start = f.key.hour * HOUR_US;
                let end = start + HOUR_US - 1;
                coll_ok && kind_ok && end >= lo && start <= hi
            })
            .collect()
    }
}

fn split_and(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            let mut v = split_and(left);
            v.extend(split_and(right));
            v
        }
        other => vec![other],
    }
}

fn col_name(e: &Expr) -> Option<&str> {
    match e {
        Expr::Column(c) => Some(c.name.as_str()),
        Expr::Cast(c) => col_name(&c.expr),
        Expr::TryCast(c) => col_name(&c.expr),
        _ => None,
    }
}

fn lit_str(e: &Expr) -> Option<String> {
    match e {
        Expr::Literal(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::Utf8View(Some(s))
            | ScalarValue::LargeUtf8(Some(s)),
            _,
        ) => Some(s.clone()),
        Expr::Cast(c) => lit_str(&c.expr),
        _ => None,
    }
}

fn lit_us(e: &Expr) -> Option<i64> {
    match e {
        Expr::Literal(v, _) => match v {
            ScalarValue::Int64(Some(x)) => Some(*x),
            ScalarValue::Int32(Some(x)) => Some(i64::from(*x)),
            ScalarValue::TimestampMicrosecond(Some(x), _) => Some(*x),
            ScalarValue::TimestampMillisecond(Some(x), _) => x.checked_mul(1000),
            ScalarValue::TimestampSecond(Some(x), _) => x.checked_mul(1_000_000),
            ScalarValue::TimestampNanosecond(Some(x), _) => Some(x / 1000),
            ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
                crate::decode::syntax::parse_datetime_us(s).ok()
            }
            _ => None,
        },
        Expr::Cast(c) => lit_us(&c.expr),
        _ => None,
    }
}

fn analyze(
    e: &Expr,
    colls: &mut Option<Vec<String>>,
    kinds: &mut Option<Vec<String>>,
    lo: &mut i64,
    hi: &mut i64,
) {
    let set = |slot: &mut Option<Vec<String>>, vals: Vec<String>| {
        *slot = Some(match slot.take() {
            None => vals,
            Some(prev) => prev.into_iter().filter(|p| vals.contains(p)).collect(),
        });
    };
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (c, v, op) = match (col_name(left), col_name(right)) {
                (Some(c), None) => (c, right.as_ref(), *op),
                (None, Some(c)) => (
                    c,
                    left.as_ref(),
                    match op {
                        Operator::Lt => Operator::Gt,
                        Operator::LtEq => Operator::GtEq,
                        Operator::Gt => Operator::Lt,
                        Operator::GtEq => Operator::LtEq,
                        o => *o,
                    },
                ),
                _ => return,
            };
            match (c, op) {
                ("collection", Operator::Eq) => {
                    if let Some(s) = lit_str(v) {
                        set(colls, vec![s]);
                    }
                }
                ("kind", Operator::Eq) => {
                    if let Some(s) = lit_str(v) {
                        set(kinds, vec![s]);
                    }
                }
                ("time" | "time_us", op) => {
                    if let Some(t) = lit_us(v) {
                        match op {
                            Operator::Gt | Operator::GtEq => *lo = (*lo).max(t),
                            Operator::Lt | Operator::LtEq => *hi = (*hi).min(t),
                            Operator::Eq => {
                                *lo = (*lo).max(t);
                                *hi = (*hi).min(t);
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Expr::InList(l) if !l.negated => {
            let Some(c) = col_name(&l.expr) else { return };
            let vals: Option<Vec<String>> = l.list.iter().map(lit_str).collect();
            match (c, vals) {
                ("collection", Some(v)) => set(colls, v),
                ("kind", Some(v)) => set(kinds, v),
                _ => {}
            }
        }
        Expr::Between(b) if !b.negated => {
            if matches!(col_name(&b.expr), Some("time" | "time_us"))
                && let (Some(l), Some(h)) = (lit_us(&b.low), lit_us(&b.high))
            {
                *lo = (*lo).max(l);
                *hi = (*hi).min(h);
            }
        }
        _ => {}
    }
}

#[async_trait]
impl TableProvider for LakeTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        use crate::query::typed::Source;
        let wanted: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        // where each wanted column comes from; the stored columns to read
        let mut stored_proj: Vec<usize> = Vec::new();
        let need = |i: usize, proj: &mut Vec<usize>| -> usize {
            match proj.iter().position(|&x| x == i) {
                Some(p) => p,
                None => {
                    proj.push(i);
                    proj.len() - 1
                }
            }
        };
        let n_common_typed_start =
            self.schema.fields().len() - crate::model::rows::typed_fields(self.def.kind()).len();
        let mut sources = Vec::with_capacity(wanted.len());
        let mut derived = false;
        for &i in &wanted {
            let name = self.schema.field(i).name();
            if let Ok(si) = self.stored.index_of(name) {
                sources.push(Source::Input(need(si, &mut stored_proj)));
            } else if name == "time" {
                derived = true;
                let si = self.stored.index_of("time_us")?;
                sources.push(Source::Time(need(si, &mut stored_proj)));
            } else {
                derived = true;
                sources.push(Source::Typed(i - n_common_typed_start));
            }
        }
        let typed_wanted = sources.iter().any(|s| matches!(s, Source::Typed(_)));
        let record_pos = if typed_wanted {
            let si = self.stored.index_of("record")?;
            need(si, &mut stored_proj)
        } else {
            0
        };
        // filters on derived columns are evaluated above the scan; the others, and `time`
        // rewritten to `time_us`, prune files, row groups and pages
        let stored_filters: Vec<Expr> = filters
            .iter()
            .filter_map(time_to_time_us)
            .filter(|f| {
                f.column_refs()
                    .iter()
                    .all(|c| self.stored.index_of(&c.name).is_ok())
            })
            .collect();
        let base = self.scan_stored(
            state,
            &stored_proj,
            &stored_filters,
            if derived { None } else { limit },
        )?;
        let identity = !derived
            && sources
                .iter()
                .enumerate()
                .all(|(k, s)| matches!(s, Source::Input(p) if *p == k));
        if identity && stored_proj.len() == wanted.len() {
            return Ok(base);
        }
        let lexicon = match &self.def {
            TableDef::Collection(l) => Some(*l),
            _ => None,
        };
        let out_schema = Arc::new(self.schema.project(&wanted)?);
        Ok(Arc::new(crate::query::typed::TypedExec::new(
            base, lexicon, record_pos, sources, out_schema,
        )))
    }
}

/// Rewrites comparisons of `time` with a timestamp into comparisons of `time_us` (the stored
/// column), so they prune. Returns the filter unchanged when it does not mention `time`, and
/// `None` when it mentions `time` in a way that cannot be rewritten.
fn time_to_time_us(e: &Expr) -> Option<Expr> {
    let mentions_time = e.column_refs().iter().any(|c| c.name == "time");
    if !mentions_time {
        return Some(e.clone());
    }
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) if *op == Operator::And => {
            let l = time_to_time_us(left);
            let r = time_to_time_us(right);
            match (l, r) {
                (Some(l), Some(r)) => Some(l.and(r)),
                (Some(x), None) | (None, Some(x)) => Some(x),
                (None, None) => None,
            }
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if matches!(
                op,
                Operator::Eq | Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq
            ) =>
        {
            let us = |x: &Expr| lit_us(x).map(|v| Expr::Literal(ScalarValue::Int64(Some(v)), None));
            let col = || Expr::Column(datafusion::common::Column::from_name("time_us"));
            match (col_name(left), col_name(right)) {
                (Some("time"), None) => us(right)
                    .map(|v| Expr::BinaryExpr(BinaryExpr::new(Box::new(col()), *op, Box::new(v)))),
                (None, Some("time")) => us(left)
                    .map(|v| Expr::BinaryExpr(BinaryExpr::new(Box::new(v), *op, Box::new(col())))),
                _ => None,
            }
        }
        _ => None,
    }
}

impl LakeTable {
    /// Files and in-memory rows of the stored columns `proj`.
    fn scan_stored(
        &self,
        state: &dyn Session,
        proj: &[usize],
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        let files = self.prune(filters);
        if !files.is_empty() {
            let mut source = ParquetSource::new(self.stored.clone())
                .with_table_parquet_options(state.table_options().parquet.clone());
            if let Some(pred) = conjunction(filters.iter().cloned()) {
                let df_schema = DFSchema::try_from(self.stored.as_ref().clone())?;
                if let Ok(p) = state.create_physical_expr(pred, &df_schema) {
                    source = source.with_predicate(p);
                }
            }
            let n = state.config().target_partitions().max(1);
            let mut groups: Vec<Vec<PartitionedFile>> = vec![Vec::new(); n.min(files.len())];
            // largest first, round robin, for even groups
            let mut sorted = files.clone();
            sorted.sort_by_key(|f| std::cmp::Reverse(f.size));
            let len = groups.len();
            for (i, f) in sorted.into_iter().enumerate() {
                let path = if self.prefix.is_empty() {
                    f.path.clone()
                } else {
                    format!("{}/{}", self.prefix, f.path)
                };
                groups[i % len].push(PartitionedFile::new(path, f.size));
            }
            let config = FileScanConfigBuilder::new(self.store_url.clone(), Arc::new(source))
                .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
                .with_projection_indices(Some(proj.to_vec()))?
                .with_limit(limit)
                .build();
            inputs.push(DataSourceExec::from_data_source(config));
        }
        if !self.batches.is_empty() {
            inputs.push(MemorySourceConfig::try_new_exec(
                std::slice::from_ref(&self.batches),
                self.stored.clone(),
                Some(proj.to_vec()),
            )?);
        }
        if inputs.is_empty() {
            return Ok(Arc::new(EmptyExec::new(Arc::new(
                self.stored.project(proj)?,
            ))));
        }
        UnionExec::try_new(inputs)
    }
}
