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
    /// The table's schema.
    pub fn schema(&self) -> SchemaRef {
        use crate::model::rows::{common_fields, schema};
        match self {
            TableDef::Events => Arc::new(arrow::datatypes::Schema::new(common_fields())),
            TableDef::Collection(l) => schema(TableKind::Events(Some(*l))),
            TableDef::Identity => schema(TableKind::Identity),
            TableDef::Account => schema(TableKind::Account),
            TableDef::Errors => schema(TableKind::Errors),
        }
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
        let files = files
            .iter()
            .filter(|f| def.includes(&f.key.name))
            .cloned()
            .collect();
        let batches = batches
            .iter()
            .filter(|(k, b)| def.includes(&k.name) && b.num_rows() > 0)
            .map(|(_, b)| conform(b, &schema))
            .collect::<Result<Vec<_>>>()?;
        Ok(LakeTable {
            def,
            schema,
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
            if matches!(col_name(&b.expr), Some("time" | "time_us")) {
                if let (Some(l), Some(h)) = (lit_us(&b.low), lit_us(&b.high)) {
                    *lo = (*lo).max(l);
                    *hi = (*hi).min(h);
                }
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
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        let files = self.prune(filters);
        if !files.is_empty() {
            let mut source = ParquetSource::new(self.schema.clone())
                .with_table_parquet_options(state.table_options().parquet.clone());
            if let Some(pred) = conjunction(filters.iter().cloned()) {
                let df_schema = DFSchema::try_from(self.schema.as_ref().clone())?;
                if let Ok(p) = state.create_physical_expr(pred, &df_schema) {
                    source = source.with_predicate(p);
                }
            }
            let n = state.config().target_partitions().max(1);
            let mut groups: Vec<Vec<PartitionedFile>> = vec![Vec::new(); n.min(files.len())];
            // largest first, round robin, for even groups
            let mut sorted = files.clone();
            sorted.sort_by(|a, b| b.size.cmp(&a.size));
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
                .with_projection_indices(projection.cloned())?
                .with_limit(limit)
                .build();
            inputs.push(DataSourceExec::from_data_source(config));
        }
        if !self.batches.is_empty() {
            inputs.push(MemorySourceConfig::try_new_exec(
                std::slice::from_ref(&self.batches),
                self.schema.clone(),
                projection.cloned(),
            )?);
        }
        if inputs.is_empty() {
            let projected = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => self.schema.clone(),
            };
            return Ok(Arc::new(EmptyExec::new(projected)));
        }
        UnionExec::try_new(inputs)
    }
}
