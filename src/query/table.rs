//! A lake table: the Parquet files of some partitions plus the rows still in memory, scanned as
//! one plan.
//!
//! Files are pruned by partition before DataFusion sees them ([`super::prune`]). Inside the files, DataFusion prunes row groups with their statistics, and pages
//! with the page index and bloom filters when a filter names a column with many values (a
//! lookup), using the same filters.
//!
//! Filters on stored columns are applied by the scan itself, exactly: for a file of a
//! one-collection partition, what the partition says about `kind` and `collection` is
//! substituted into the filter and folded, and only the rest (`operation = 'create'`, say) is
//! evaluated on its rows, inside the Parquet reader. Footers are cached across queries (the
//! files never change).

use super::prune::{Pruning, col_name, lit_us};
use crate::model::rows::TableKind;
use crate::sink::partition::{LakeFile, PartitionName};
use arrow::array::{ArrayRef, RecordBatch, new_null_array};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::parquet::CachedParquetFileReaderFactory;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::expr_rewriter::unnormalize_col;
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::optimizer::simplify_expressions::ExprSimplifier;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::filter::FilterExecBuilder;
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

    /// The table's schema (stored columns, then typed columns derived from `record`). Stored
    /// strings are read as `Utf8View`, which DataFusion filters, groups and joins faster and the
    /// Parquet reader fills without copying.
    pub fn schema(&self) -> SchemaRef {
        let t = crate::model::rows::table_schema(self.kind());
        let stored = crate::model::rows::schema(self.kind());
        Arc::new(arrow::datatypes::Schema::new(
            t.fields()
                .iter()
                .map(|f| {
                    if stored.index_of(f.name()).is_ok() {
                        view_field(f)
                    } else {
                        f.as_ref().clone()
                    }
                })
                .collect::<Vec<_>>(),
        ))
    }

    /// The schema of the stored columns, as scanned.
    pub fn stored_schema(&self) -> SchemaRef {
        let s = crate::model::rows::schema(self.kind());
        Arc::new(arrow::datatypes::Schema::new(
            s.fields().iter().map(|f| view_field(f)).collect::<Vec<_>>(),
        ))
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

fn view_field(f: &arrow::datatypes::Field) -> arrow::datatypes::Field {
    use arrow::datatypes::DataType;
    match f.data_type() {
        DataType::Utf8 => f.clone().with_data_type(DataType::Utf8View),
        _ => f.clone(),
    }
}

/// Rows per batch read from the daemon's buffers (DataFusion's default batch size).
const MEMORY_BATCH_ROWS: usize = 8192;

/// Reshapes a batch to `schema`: columns by name (cast where the type differs), nulls for
/// missing ones.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        cols.push(match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => c.clone(),
            Some(c) => arrow::compute::cast(c, f.data_type())?,
            None => new_null_array(f.data_type(), batch.num_rows()),
        });
    }
    // no column at all (`count(*)`) still has its rows
    let options =
        arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        cols,
        &options,
    )?)
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
        // the buffered rows as the batcher made them (shared, not copied): a scan reshapes only
        // the columns it reads (`scan_stored`)
        let batches = batches
            .iter()
            .filter(|(k, b)| def.includes(&k.name) && b.num_rows() > 0)
            .map(|(_, b)| b.clone())
            .collect();
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
        let p = Pruning::from_filters(filters);
        self.files.iter().filter(|f| p.keeps(f)).collect()
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
        Ok(filters
            .iter()
            .map(|f| {
                if self.applies_exactly(f) {
                    TableProviderFilterPushDown::Exact
                } else {
                    TableProviderFilterPushDown::Inexact
                }
            })
            .collect())
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
        // filters on stored columns only are applied by the scan itself (exactly), right on
        // the files: per file, what its partition says about `kind` and `collection` is
        // substituted first, so those comparisons cost nothing per row
        let (exact, rest): (Vec<&Expr>, Vec<&Expr>) =
            filters.iter().partition(|f| self.applies_exactly(f));
        let exact: Vec<Expr> = exact.into_iter().cloned().map(unnormalize_col).collect();
        let typed_wanted = sources.iter().any(|s| matches!(s, Source::Typed(_)));
        let record_pos = if typed_wanted {
            let si = self.stored.index_of("record")?;
            need(si, &mut stored_proj)
        } else {
            0
        };
        // the scan returns the first `keep` columns; the ones after are read for the filter only
        let keep = stored_proj.len();
        for f in &exact {
            for c in f.column_refs() {
                let si = self.stored.index_of(&c.name)?;
                need(si, &mut stored_proj);
            }
        }
        // filters on derived columns are evaluated above the scan; those on `time`, rewritten
        // to `time_us`, prune files, row groups and pages here too
        let inexact: Vec<Expr> = rest
            .into_iter()
            .filter_map(time_to_time_us)
            .map(unnormalize_col)
            .filter(|f| {
                f.column_refs()
                    .iter()
                    .all(|c| self.stored.index_of(&c.name).is_ok())
            })
            .collect();
        let filter = conjunction(exact.clone());
        // with a filter, a limit would cut rows before it: the Limit above the scan stays
        let limit = if derived || filter.is_some() {
            None
        } else {
            limit
        };
        let mut prune_by = exact;
        prune_by.extend(inexact.iter().cloned());
        let base = self.scan_stored(
            state,
            &stored_proj,
            keep,
            &prune_by,
            &inexact,
            filter,
            limit,
        )?;
        stored_proj.truncate(keep);
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

/// What a file's partition says about columns that are the same on every row: (kind, collection).
fn constants(name: &PartitionName) -> Option<(&'static str, Option<&str>)> {
    match name {
        PartitionName::Collection(c) => Some(("commit", Some(c.as_str()))),
        PartitionName::Identity => Some(("identity", None)),
        PartitionName::Account => Some(("account", None)),
        PartitionName::Sync => Some(("sync", None)),
        PartitionName::Other | PartitionName::Errors => None,
    }
}

/// `plan` with only the rows where `filter` holds (columns by name), and only its first `keep`
/// columns.
fn filtered(
    state: &dyn Session,
    plan: Arc<dyn ExecutionPlan>,
    filter: Option<&Expr>,
    keep: usize,
) -> Result<Arc<dyn ExecutionPlan>> {
    let width = plan.schema().fields().len();
    let Some(filter) = filter else {
        // columns read only for a filter that turned out to hold on every row
        if keep < width {
            use datafusion::physical_expr::PhysicalExpr;
            use datafusion::physical_expr::expressions::Column;
            let schema = plan.schema();
            let exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = (0..keep)
                .map(|i| {
                    let f = schema.field(i);
                    (
                        Arc::new(Column::new(f.name(), i)) as Arc<dyn PhysicalExpr>,
                        f.name().clone(),
                    )
                })
                .collect();
            return Ok(Arc::new(
                datafusion::physical_plan::projection::ProjectionExec::try_new(exprs, plan)?,
            ));
        }
        return Ok(plan);
    };
    let schema = DFSchema::try_from(plan.schema().as_ref().clone())?;
    let predicate = state.create_physical_expr(filter.clone(), &schema)?;
    let projection = (keep < width).then(|| (0..keep).collect());
    Ok(Arc::new(
        FilterExecBuilder::new(predicate, plan)
            .apply_projection(projection)?
            .build()?,
    ))
}

/// `filter` on the rows of a file from `source`, whose `origin` is that source: `None` when no
/// row can match, `Some(None)` when every row does.
fn with_origin(
    filter: &Expr,
    source: crate::model::SourceKind,
    stored: &SchemaRef,
) -> Option<Option<Expr>> {
    if !filter.column_refs().iter().any(|c| c.name == "origin") {
        return Some(Some(filter.clone()));
    }
    let Some(value) = stored
        .field_with_name("origin")
        .ok()
        .and_then(|f| {
            ScalarValue::Utf8(Some(source.as_str().to_string()))
                .cast_to(f.data_type())
                .ok()
        })
        .map(|v| Expr::Literal(v, None))
    else {
        return Some(Some(filter.clone()));
    };
    simplified(filter, stored, |name| {
        (name == "origin").then(|| value.clone())
    })
}

/// `plan` with its column `pos` replaced by the text `value` (same name and type).
fn constant_column(
    plan: Arc<dyn ExecutionPlan>,
    pos: usize,
    value: &str,
) -> Result<Arc<dyn ExecutionPlan>> {
    use datafusion::physical_expr::PhysicalExpr;
    use datafusion::physical_expr::expressions::{Column, Literal};
    let schema = plan.schema();
    let exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let e: Arc<dyn PhysicalExpr> = if i == pos {
                let v = ScalarValue::Utf8(Some(value.to_string())).cast_to(f.data_type())?;
                Arc::new(Literal::new(v))
            } else {
                Arc::new(Column::new(f.name(), i))
            };
            Ok((e, f.name().clone()))
        })
        .collect::<Result<_>>()?;
    Ok(Arc::new(
        datafusion::physical_plan::projection::ProjectionExec::try_new(exprs, plan)?,
    ))
}

/// `filter` with the columns `value_of` names replaced by values and simplified: `None` when
/// no row can match, `Some(None)` when every row does.
fn simplified(
    filter: &Expr,
    stored: &SchemaRef,
    value_of: impl Fn(&str) -> Option<Expr>,
) -> Option<Option<Expr>> {
    let substituted = filter
        .clone()
        .transform(|e| {
            Ok(match &e {
                Expr::Column(c) => match value_of(&c.name) {
                    Some(v) => Transformed::yes(v),
                    None => Transformed::no(e),
                },
                _ => Transformed::no(e),
            })
        })
        .map(|t| t.data);
    let simplified = substituted.and_then(|e| {
        let schema = Arc::new(DFSchema::try_from(stored.as_ref().clone())?);
        ExprSimplifier::new(SimplifyContext::builder().with_schema(schema).build()).simplify(e)
    });
    match simplified {
        Ok(Expr::Literal(ScalarValue::Boolean(Some(true)), _)) => Some(None),
        Ok(Expr::Literal(ScalarValue::Boolean(_) | ScalarValue::Null, _)) => None,
        Ok(e) => Some(Some(e)),
        // not simplified: the whole filter, row by row
        Err(_) => Some(Some(filter.clone())),
    }
}

/// What is left of `filter` on the rows of a partition, given what the partition says about
/// `kind` and `collection`: `None` when no row can match, `Some(None)` when every row does.
fn residual(filter: &Expr, name: &PartitionName, stored: &SchemaRef) -> Option<Option<Expr>> {
    let Some((kind, coll)) = constants(name) else {
        return Some(Some(filter.clone()));
    };
    let value = |col: &str, v: Option<&str>| -> Option<Expr> {
        let dt = stored.field_with_name(col).ok()?.data_type().clone();
        let s = ScalarValue::Utf8(v.map(str::to_string)).cast_to(&dt).ok()?;
        Some(Expr::Literal(s, None))
    };
    let (Some(kind), Some(coll)) = (value("kind", Some(kind)), value("collection", coll)) else {
        return Some(Some(filter.clone()));
    };
    simplified(filter, stored, |name| match name {
        "kind" => Some(kind.clone()),
        "collection" => Some(coll.clone()),
        _ => None,
    })
}

impl LakeTable {
    /// Whether the scan applies `filter` itself, exactly: it reads stored columns only (so the
    /// files, row groups and rows in memory can all evaluate it) and holds nothing the scan
    /// cannot evaluate (subqueries, placeholders, outer references, volatile functions).
    fn applies_exactly(&self, filter: &Expr) -> bool {
        let refs = filter.column_refs();
        !refs.is_empty()
            && refs.iter().all(|c| self.stored.index_of(&c.name).is_ok())
            && !filter.is_volatile()
            && !filter
                .exists(|e| {
                    Ok(matches!(
                        e,
                        Expr::ScalarSubquery(_)
                            | Expr::Exists(_)
                            | Expr::InSubquery(_)
                            | Expr::OuterReferenceColumn(..)
                            | Expr::Placeholder(_)
                    ))
                })
                .unwrap_or(true)
    }

    /// Constant-partition files grouped by what `filter` leaves for their rows (files whose
    /// rows cannot match are left out).
    fn residuals<'a>(
        &self,
        filter: Option<&Expr>,
        files: Vec<&'a LakeFile>,
    ) -> Vec<(Option<Expr>, Vec<&'a LakeFile>)> {
        let Some(filter) = filter else {
            return if files.is_empty() {
                Vec::new()
            } else {
                vec![(None, files)]
            };
        };
        let mut by_name: std::collections::HashMap<&PartitionName, Option<Option<Expr>>> =
            std::collections::HashMap::new();
        let mut groups: Vec<(Option<Expr>, Vec<&LakeFile>)> = Vec::new();
        for f in files {
            let r = by_name
                .entry(&f.key.name)
                .or_insert_with(|| residual(filter, &f.key.name, &self.stored));
            let Some(r) = r else { continue };
            match groups.iter_mut().find(|(g, _)| g == r) {
                Some((_, v)) => v.push(f),
                None => groups.push((r.clone(), vec![f])),
            }
        }
        groups
    }
    fn partitioned(&self, files: &[&LakeFile]) -> Vec<PartitionedFile> {
        files
            .iter()
            .map(|f| {
                let path = if self.prefix.is_empty() {
                    f.path.clone()
                } else {
                    format!("{}/{}", self.prefix, f.path)
                };
                let pf = PartitionedFile::new(path, f.size);
                match f.rows {
                    Some(n) => pf.with_extension(super::rowcount::LoggedRows(n)),
                    None => pf,
                }
            })
            .collect()
    }

    fn groups(state: &dyn Session, mut files: Vec<PartitionedFile>) -> Vec<FileGroup> {
        let n = state
            .config()
            .target_partitions()
            .max(1)
            .min(files.len())
            .max(1);
        // largest first, round robin, for even groups
        files.sort_by_key(|f| std::cmp::Reverse(f.object_meta.size));
        let mut groups: Vec<Vec<PartitionedFile>> = vec![Vec::new(); n];
        for (i, f) in files.into_iter().enumerate() {
            groups[i % n].push(f);
        }
        groups
            .into_iter()
            .filter(|g| !g.is_empty())
            .map(FileGroup::new)
            .collect()
    }

    fn parquet_source(
        &self,
        state: &dyn Session,
        table: datafusion::datasource::table_schema::TableSchema,
        schema: SchemaRef,
        filters: &[Expr],
        lookup: bool,
    ) -> Result<ParquetSource> {
        // lake files are immutable (a name is never reused for other bytes), so their footers
        // and page indexes are cached across queries, within the runtime's metadata cache
        // limit (least recently used first out)
        let runtime = state.runtime_env();
        let reader = CachedParquetFileReaderFactory::new(
            runtime.object_store(&self.store_url)?,
            runtime.cache_manager.get_file_metadata_cache(),
        );
        let mut options = state.table_options().parquet.clone();
        if !lookup {
            // page indexes and bloom filters only help a filter on a column with many values;
            // reading them costs about a quarter of a broad scan's time (JSONBench Q2, Q3)
            options.global.enable_page_index = false;
            options.global.bloom_filter_on_read = false;
        }
        let mut source = ParquetSource::new(table)
            .with_table_parquet_options(options)
            .with_parquet_file_reader_factory(Arc::new(reader));
        let usable: Vec<Expr> = filters
            .iter()
            .filter(|f| {
                f.column_refs()
                    .iter()
                    .all(|c| schema.index_of(&c.name).is_ok())
            })
            .cloned()
            .collect();
        if let Some(pred) = conjunction(usable)
            && let Ok(df_schema) = DFSchema::try_from(schema.as_ref().clone())
            && let Ok(p) = state.create_physical_expr(pred, &df_schema)
        {
            source = source.with_predicate(p);
        }
        Ok(source)
    }

    /// Files of one-collection partitions: `kind` and `collection` come from the partition
    /// (the same on every row) instead of being decoded from each file.
    ///
    /// `residual` is what is left of the scan's exact filter once these files' constants are
    /// substituted (the caller groups files by it); `predicate` only prunes. Returns the
    /// columns `proj[..keep]`.
    #[allow(clippy::too_many_arguments)]
    fn scan_constant(
        &self,
        state: &dyn Session,
        proj: &[usize],
        keep: usize,
        predicate: &[Expr],
        residual: Option<&Expr>,
        lookup: bool,
        limit: Option<usize>,
        files: &[&LakeFile],
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        use datafusion::physical_expr::expressions::Column;
        let consts = ["kind", "collection"];
        let (Ok(ki), Ok(ci)) = (
            self.stored.index_of("kind"),
            self.stored.index_of("collection"),
        ) else {
            return Ok(None);
        };
        if !proj.contains(&ki) && !proj.contains(&ci) {
            return Ok(None);
        }
        let file_fields: Vec<arrow::datatypes::FieldRef> = self
            .stored
            .fields()
            .iter()
            .filter(|f| !consts.contains(&f.name().as_str()))
            .cloned()
            .collect();
        let file_schema = Arc::new(arrow::datatypes::Schema::new(file_fields));
        let part_fields: Vec<arrow::datatypes::FieldRef> = vec![
            Arc::new(self.stored.field(ki).clone()),
            Arc::new(self.stored.field(ci).clone()),
        ];
        let table_schema =
            datafusion::datasource::table_schema::TableSchema::builder(file_schema.clone())
                .with_table_partition_cols(part_fields)
                .build();
        let combined: Vec<String> = file_schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .chain(consts.iter().map(|c| c.to_string()))
            .collect();
        // a column missing here is a broken invariant of this function, never a column 0
        let position = |name: &str| {
            combined.iter().position(|c| c == name).ok_or_else(|| {
                DataFusionError::Internal(format!("column {name} is not in the lake scan"))
            })
        };
        // the combined column of each wanted stored column
        let picks: Vec<usize> = proj[..keep]
            .iter()
            .map(|&i| position(self.stored.field(i).name()))
            .collect::<Result<_>>()?;
        // and of each column the residual filter reads (never `kind` or `collection`)
        let mut read: Vec<usize> = picks.clone();
        if let Some(r) = residual {
            for c in r.column_refs() {
                read.push(position(&c.name)?);
            }
        }
        read.sort_unstable();
        read.dedup();
        let pfiles: Vec<PartitionedFile> = files
            .iter()
            .zip(self.partitioned(files))
            .map(|(f, pf)| {
                let (kind, coll) = constants(&f.key.name).ok_or_else(|| {
                    DataFusionError::Internal(format!(
                        "{} is not a one-collection partition",
                        f.path
                    ))
                })?;
                Ok(pf.with_partition_values(vec![
                    ScalarValue::Utf8View(Some(kind.to_string())),
                    ScalarValue::Utf8View(coll.map(|c| c.to_string())),
                ]))
            })
            .collect::<Result<_>>()?;
        let source =
            self.parquet_source(state, table_schema, file_schema.clone(), predicate, lookup)?;
        let config = FileScanConfigBuilder::new(self.store_url.clone(), Arc::new(source))
            .with_file_groups(Self::groups(state, pfiles))
            .with_projection_indices(Some(read.clone()))?
            .with_limit(limit)
            .build();
        let scan = DataSourceExec::from_data_source(config);
        let scan = filtered(state, scan, residual, read.len())?;
        // back to the stored column order
        let scan_schema = scan.schema();
        let exprs: Vec<(Arc<dyn datafusion::physical_expr::PhysicalExpr>, String)> = picks
            .iter()
            .zip(&proj[..keep])
            .map(|(&c, &i)| {
                let pos = read.iter().position(|&r| r == c).ok_or_else(|| {
                    DataFusionError::Internal(format!("scan column {c} was not read"))
                })?;
                let name = self.stored.field(i).name().clone();
                Ok((
                    Arc::new(Column::new(scan_schema.field(pos).name(), pos))
                        as Arc<dyn datafusion::physical_expr::PhysicalExpr>,
                    name,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Some(Arc::new(
            datafusion::physical_plan::projection::ProjectionExec::try_new(exprs, scan)?,
        )))
    }

    /// Plans for `files` (of the stored columns `proj[..keep]`), pushed onto `inputs`.
    #[allow(clippy::too_many_arguments)]
    fn scan_files(
        &self,
        state: &dyn Session,
        proj: &[usize],
        keep: usize,
        predicate: &[Expr],
        filter: Option<Expr>,
        lookup: bool,
        limit: Option<usize>,
        files: Vec<&LakeFile>,
        inputs: &mut Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<()> {
        let (constant, varying): (Vec<&LakeFile>, Vec<&LakeFile>) = files
            .into_iter()
            .partition(|f| constants(&f.key.name).is_some());
        let mut plain = varying;
        for (residual, group) in self.residuals(filter.as_ref(), constant) {
            match self.scan_constant(
                state,
                proj,
                keep,
                predicate,
                residual.as_ref(),
                lookup,
                limit,
                &group,
            )? {
                Some(p) => inputs.push(p),
                // the filter did not mention `kind` or `collection`: its residual is itself
                None => plain.extend(group),
            }
        }
        if !plain.is_empty() {
            let source = self.parquet_source(
                state,
                self.stored.clone().into(),
                self.stored.clone(),
                predicate,
                lookup,
            )?;
            let config = FileScanConfigBuilder::new(self.store_url.clone(), Arc::new(source))
                .with_file_groups(Self::groups(state, self.partitioned(&plain)))
                .with_projection_indices(Some(proj.to_vec()))?
                .with_limit(limit)
                .build();
            inputs.push(filtered(
                state,
                DataSourceExec::from_data_source(config),
                filter.as_ref(),
                keep,
            )?);
        }
        Ok(())
    }

    /// Files and in-memory rows of the stored columns `proj[..keep]`: files pruned by
    /// `prune_by`, row groups and pages by `predicate`, and rows kept only where `filter` holds
    /// (it may read the columns of `proj[keep..]` too).
    #[allow(clippy::too_many_arguments)]
    fn scan_stored(
        &self,
        state: &dyn Session,
        proj: &[usize],
        keep: usize,
        prune_by: &[Expr],
        predicate: &[Expr],
        filter: Option<Expr>,
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        // a lookup filters on a column with many values (a DID, a time range, a record key),
        // not only on the two or three of `kind`, `operation` or `collection`
        let lookup = filter.iter().chain(predicate).any(|f| {
            f.column_refs()
                .iter()
                .any(|c| !matches!(c.name.as_str(), "kind" | "operation" | "collection"))
        });
        let origin = self.stored.index_of("origin").ok();
        let mut by_source: Vec<(crate::model::SourceKind, Vec<&LakeFile>)> = Vec::new();
        for f in self.prune(prune_by) {
            let s = f.name.source();
            match by_source.iter_mut().find(|(k, _)| *k == s) {
                Some((_, v)) => v.push(f),
                None => by_source.push((s, vec![f])),
            }
        }
        for (source, files) in by_source {
            // a file's rows all came from the source its name says: `origin` is a constant of
            // the file (files written before schema version 3 do not store it)
            let (filter, predicate) = if origin.is_some() {
                let f = match &filter {
                    Some(f) => with_origin(f, source, &self.stored),
                    None => Some(None),
                };
                // no row of these files can match
                let Some(f) = f else { continue };
                let p: Vec<Expr> = predicate
                    .iter()
                    .filter_map(|e| with_origin(e, source, &self.stored).flatten())
                    .collect();
                (f, p)
            } else {
                (filter.clone(), predicate.to_vec())
            };
            let first = inputs.len();
            self.scan_files(
                state,
                proj,
                keep,
                &predicate,
                filter,
                lookup,
                limit,
                files,
                &mut inputs,
            )?;
            if let Some(oi) = origin
                && let Some(pos) = proj[..keep].iter().position(|&i| i == oi)
            {
                for plan in &mut inputs[first..] {
                    *plan = constant_column(plan.clone(), pos, source.as_str())?;
                }
            }
        }
        if !self.batches.is_empty() {
            // buffered rows: only the columns this scan reads are reshaped to the table's types
            // (string columns become views, which allocates), none for `count(*)`; each batch
            // is read in slices of a scan's batch size, so that no batch of it is larger than
            // one the query may compute (`deadline::Limits`)
            let schema = Arc::new(self.stored.project(proj)?);
            let mut sliced = Vec::new();
            for b in &self.batches {
                let b = conform(b, &schema)?;
                for at in (0..b.num_rows()).step_by(MEMORY_BATCH_ROWS) {
                    sliced.push(b.slice(at, MEMORY_BATCH_ROWS.min(b.num_rows() - at)));
                }
            }
            let memory =
                MemorySourceConfig::try_new_exec(std::slice::from_ref(&sliced), schema, None)?;
            inputs.push(filtered(state, memory, filter.as_ref(), keep)?);
        }
        if inputs.is_empty() {
            return Ok(Arc::new(EmptyExec::new(Arc::new(
                self.stored.project(&proj[..keep])?,
            ))));
        }
        UnionExec::try_new(inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::partition::{PartitionKey, PartitionName};
    use arrow::array::{FixedSizeBinaryArray, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::prelude::SessionContext;

    /// Buffered rows are kept as the batcher made them: a scan reshapes (casts) only the
    /// columns it reads. A column that cannot be cast to the table's type (here a `record` of
    /// fixed-size binary) fails only the queries that read it; `count(*)` and the other
    /// columns never touch it.
    #[tokio::test]
    async fn a_scan_of_buffered_rows_reshapes_only_the_columns_it_reads() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("did", DataType::Utf8, false),
            Field::new("record", DataType::FixedSizeBinary(2), true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![
                    "did:plc:a",
                    "did:plc:b",
                    "did:plc:a",
                ])),
                Arc::new(
                    FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                        vec![Some(b"{}"), Some(b"[]"), None].into_iter(),
                        2,
                    )
                    .unwrap(),
                ),
            ],
        )
        .unwrap();
        let key = PartitionKey::at_hour(PartitionName::Identity, 490_000).unwrap();
        let table = LakeTable::new(
            TableDef::Events,
            &[],
            &[(key, batch)],
            ObjectStoreUrl::parse("atlake://lake").unwrap(),
            String::new(),
        )
        .unwrap();
        let ctx = SessionContext::new();
        ctx.register_table("events", Arc::new(table)).unwrap();
        let one = |sql: &'static str| {
            let ctx = ctx.clone();
            async move {
                let batches = ctx.sql(sql).await?.collect().await?;
                Ok::<_, DataFusionError>(
                    arrow::util::pretty::pretty_format_batches(&batches)?.to_string(),
                )
            }
        };
        let n = one("SELECT count(*) AS n FROM events").await.unwrap();
        assert!(n.contains("| 3 "), "{n}");
        let dids = one("SELECT count(DISTINCT did) AS n FROM events")
            .await
            .unwrap();
        assert!(dids.contains("| 2 "), "{dids}");
        let e = one("SELECT record FROM events").await.unwrap_err();
        assert!(e.to_string().contains("FixedSizeBinary"), "{e}");
    }
}
