//! SQL over the lake: an embedded DataFusion session with the lake's tables, one query core
//! (`frontend`), and its front ends: the HTTP endpoint (`http`) and the Postgres wire protocol
//! (`pg`).
//!
//! Every query gets a fresh `SessionContext` bound to **one snapshot** of the lake (committed
//! files plus, inside the daemon, the rows still buffered or being flushed), so all tables of a
//! query agree with each other and no row is seen twice or missed while a flush runs.
//!
//! Tables: `events` (every collection, common columns), `posts`, `likes`, `reposts`, `follows`,
//! `blocks`, `listitems`, `profiles` (typed columns), `identity`, `account`, `errors` (the
//! quarantine), and `system.files`, `system.checkpoint`, `system.ingest` (daemon only). JSON
//! functions (`json_get_str(record, 'text')`, `record->>'text'`, …) work on `record`.
//!
//! Queries are read-only: DDL, DML (including `COPY`), `SET` and other statements are refused
//! through DataFusion's `SQLOptions`; files cannot be referenced by path.
//!
//! Hostile queries: the text is measured before it is parsed (`guard`), the parser's recursion
//! is limited, planning and execution run on their own threads with large stacks and a
//! concurrency limit (`pool`), every operator stops at the deadline (`deadline`), functions
//! that amplify their input are bounded by what they produce per batch (`bounded`), and
//! results stream against their byte limit (`http`). `SHOW ALL` and
//! `information_schema.df_settings` leave out `datafusion.runtime.*` (the spill directory).

/// The methods of a `ScalarUDFImpl` that wraps `self.inner: Arc<ScalarUDF>` and changes only
/// `invoke_with_args` (`bounded`, `datepart`): everything else is the original function's.
macro_rules! delegate_to_inner_udf {
    () => {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn aliases(&self) -> &[String] {
            self.inner.aliases()
        }
        fn signature(&self) -> &datafusion::logical_expr::Signature {
            self.inner.signature()
        }
        fn return_type(
            &self,
            arg_types: &[arrow::datatypes::DataType],
        ) -> datafusion::common::Result<arrow::datatypes::DataType> {
            self.inner.return_type(arg_types)
        }
        fn return_field_from_args(
            &self,
            args: datafusion::logical_expr::ReturnFieldArgs,
        ) -> datafusion::common::Result<arrow::datatypes::FieldRef> {
            self.inner.return_field_from_args(args)
        }
        fn coerce_types(
            &self,
            arg_types: &[arrow::datatypes::DataType],
        ) -> datafusion::common::Result<Vec<arrow::datatypes::DataType>> {
            self.inner.coerce_types(arg_types)
        }
        fn preimage(
            &self,
            args: &[datafusion::logical_expr::Expr],
            lit_expr: &datafusion::logical_expr::Expr,
            info: &datafusion::logical_expr::simplify::SimplifyContext,
        ) -> datafusion::common::Result<datafusion::logical_expr::preimage::PreimageResult> {
            self.inner.preimage(args, lit_expr, info)
        }
        fn documentation(&self) -> Option<&datafusion::logical_expr::Documentation> {
            self.inner.documentation()
        }
        fn schema_name(
            &self,
            args: &[datafusion::logical_expr::Expr],
        ) -> datafusion::common::Result<String> {
            self.inner.inner().schema_name(args)
        }
    };
}

pub mod bounded;
pub mod colocate;
pub mod console;
pub mod constagg;
pub mod current;
pub mod datepart;
pub mod deadline;
pub mod distinct;
pub mod flight;
pub mod format;
pub mod frontend;
pub mod guard;
pub mod http;
pub mod pg;
pub mod pool;
pub mod prune;
pub mod rowcount;
pub mod system;
pub mod table;
pub mod typed;

use crate::catalog::{Catalog, Snapshot};
use crate::checkpoint::{Checkpoint, lake_state};

/// What a reader of the lake sees: its committed files and its checkpoint.
type LakeView = (Vec<LakeFile>, Checkpoint);

/// The SQL a front end speaks. Postgres clients (psql, DBeaver, Grafana, psycopg) send their
/// own catalog queries: their sessions also have `pg_catalog`, the Postgres catalog functions
/// and a Postgres `version()`, and their text goes through the Postgres rewrites first
/// (`pg`). The tables, limits and refusals are the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// DataFusion's SQL (HTTP, Flight SQL, the command line).
    DataFusion,
    /// DataFusion's SQL plus what Postgres clients expect of a server.
    Postgres,
}
use crate::model::lexicon::Lexicon;
use crate::sink::partition::LakeFile;
use crate::sink::store::Lake;
use datafusion::catalog::MemorySchemaProvider;
use datafusion::dataframe::DataFrame;
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use table::{LakeTable, TableDef};

/// Why a query failed, by who is to blame.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The SQL does not parse or plan (the caller's mistake).
    #[error("{0}")]
    Sql(String),
    /// The statement writes or changes state; this endpoint is read-only.
    #[error("{0}")]
    Forbidden(String),
    /// The query ran out of its memory budget.
    #[error("{0}")]
    ResourcesExhausted(String),
    /// The query ran longer than the timeout.
    #[error("query exceeded the {0:?} timeout")]
    Timeout(Duration),
    /// The result is larger than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// The lake could not be read.
    #[error("{0}")]
    Internal(String),
    /// Too many queries are running and waiting; try again later.
    #[error("{0}")]
    Busy(String),
}

impl QueryError {
    /// The `error` field of the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            QueryError::Sql(_) => "bad_sql",
            QueryError::Forbidden(_) => "read_only",
            QueryError::ResourcesExhausted(_) => "resources_exhausted",
            QueryError::Timeout(_) => "timeout",
            QueryError::TooLarge(_) => "result_too_large",
            QueryError::Internal(_) => "internal",
            QueryError::Busy(_) => "busy",
        }
    }

    /// Classifies a DataFusion error.
    pub fn from_datafusion(e: DataFusionError) -> QueryError {
        let msg = e.to_string();
        if let DataFusionError::External(x) = e.find_root()
            && let Some(d) = x.downcast_ref::<deadline::DeadlineExceeded>()
        {
            return QueryError::Timeout(d.0);
        }
        match e.find_root() {
            DataFusionError::ResourcesExhausted(_) => QueryError::ResourcesExhausted(msg),
            DataFusionError::SQL(..)
            | DataFusionError::Plan(_)
            | DataFusionError::SchemaError(..) => {
                if msg.contains("not supported")
                    && (msg.contains("DDL") || msg.contains("DML") || msg.contains("Statement"))
                {
                    QueryError::Forbidden(msg)
                } else if let Some(better) = unknown_table(&msg) {
                    QueryError::Sql(better)
                } else {
                    QueryError::Sql(msg)
                }
            }
            DataFusionError::NotImplemented(_) => QueryError::Sql(msg),
            DataFusionError::ObjectStore(_) | DataFusionError::IoError(_) => {
                QueryError::Internal(msg)
            }
            _ if msg.contains("Resources exhausted") => QueryError::ResourcesExhausted(msg),
            _ => QueryError::Sql(msg),
        }
    }
}

/// DataFusion's "table 'datafusion.public.post' not found", said with the name the user wrote
/// and the nearest table there is.
fn unknown_table(msg: &str) -> Option<String> {
    let start = msg.find("table '")? + "table '".len();
    let rest = msg.get(start..)?;
    let end = rest.find("' not found")?;
    let full = rest.get(..end)?;
    let name = full
        .strip_prefix("datafusion.public.")
        .or_else(|| full.strip_prefix("datafusion."))
        .unwrap_or(full);
    let mut known: Vec<String> = table_names().into_iter().map(String::from).collect();
    known.extend(system::NAMES.iter().map(|n| format!("system.{n}")));
    known.extend(
        current::views()
            .into_iter()
            .map(|(n, _)| format!("current.{n}")),
    );
    let nearest = known
        .iter()
        .map(|k| (edit_distance(&name.to_lowercase(), k), k))
        .min_by_key(|(d, _)| *d)
        .filter(|(d, _)| *d <= 3 && *d * 3 <= name.len().max(1))
        .map(|(_, k)| k.clone());
    Some(match nearest {
        Some(k) => format!("no table named {name:?}; did you mean {k:?}? (GET /tables lists them)"),
        None => format!("no table named {name:?} (GET /tables lists them)"),
    })
}

/// Levenshtein distance of two short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Query limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Per-query timeout.
    pub timeout: Duration,
    /// Memory pool for execution.
    pub memory: usize,
    /// Most rows in a result.
    pub max_rows: u64,
    /// Most bytes in an encoded result.
    pub max_bytes: u64,
    /// Queries running at once.
    pub max_concurrent: usize,
    /// Queries waiting for a slot; beyond this, [`QueryError::Busy`].
    pub queue: usize,
    /// Where queries spill (`None`: the system's temporary directory).
    pub spill_dir: Option<std::path::PathBuf>,
    /// Most bytes spilled at once, by all queries together.
    pub spill_limit: u64,
    /// Connection limits of the HTTP endpoint.
    pub conn: ConnLimits,
}

/// Connection limits of a front end.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Time to receive a request's header, from when the connection waits for one.
    pub header_timeout: Duration,
    /// Time to receive a request's body.
    pub body_timeout: Duration,
    /// A connection without any byte read or written for this long is closed.
    pub idle_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

impl Limits {
    /// From the `[server]` section.
    pub fn from_config(c: &crate::config::ServerConfig) -> Self {
        Limits {
            timeout: c.query_timeout.0,
            memory: c.memory_limit.0.try_into().unwrap_or(usize::MAX),
            max_rows: c.max_result_rows,
            max_bytes: c.max_result_bytes.0,
            max_concurrent: c.max_concurrent_queries,
            queue: c.query_queue,
            spill_dir: (!c.spill_dir.is_empty()).then(|| c.spill_dir.clone().into()),
            spill_limit: c.spill_limit.0,
            conn: ConnLimits {
                header_timeout: c.header_timeout.0,
                body_timeout: c.body_timeout.0,
                idle_timeout: c.idle_timeout.0,
                max_connections: c.max_connections,
            },
        }
    }

    /// What the bounded functions computing one batch may produce together: a quarter of the
    /// memory pool (at least 16 MiB).
    pub fn function_budget(&self) -> u64 {
        (self.memory as u64 / 4).max(16 << 20)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::from_config(&crate::config::ServerConfig::default())
    }
}

/// The URL under which the lake's object store is registered in every session.
pub fn lake_store_url() -> Result<ObjectStoreUrl, QueryError> {
    ObjectStoreUrl::parse("atlake://lake").map_err(|e| QueryError::Internal(e.to_string()))
}

/// The query engine: the lake, optionally the daemon's live state, and limits.
pub struct QueryEngine {
    lake: Lake,
    live: Option<Arc<Catalog>>,
    /// Limits applied by the HTTP endpoint.
    pub limits: Limits,
    runtime: Arc<RuntimeEnv>,
    listing: Mutex<Option<(Instant, Arc<LakeView>)>>,
    listing_ttl: Duration,
    /// Row counts of files read from their footers (files never change).
    pub(crate) row_cache: Arc<Mutex<HashMap<String, u64>>>,
    admission: pool::Admission,
    /// `pg_catalog` of the Postgres sessions, made on first use.
    pg_catalog: tokio::sync::OnceCell<Arc<pg::SharedCatalog>>,
}

impl std::fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine")
            .field("lake", &self.lake.url())
            .finish()
    }
}

/// Names of the user tables (not `system.*`).
pub fn table_names() -> Vec<&'static str> {
    let mut v = vec!["events"];
    v.extend(Lexicon::ALL.iter().map(|l| l.table()));
    v.extend(["identity", "account", "errors"]);
    v
}

fn table_def(name: &str) -> Option<TableDef> {
    Some(match name {
        "events" => TableDef::Events,
        "identity" => TableDef::Identity,
        "account" => TableDef::Account,
        "errors" => TableDef::Errors,
        other => TableDef::Collection(Lexicon::ALL.into_iter().find(|l| l.table() == other)?),
    })
}

impl QueryEngine {
    /// An engine over `lake`; with `live`, queries also see the daemon's in-memory rows.
    pub fn try_new(
        lake: Lake,
        live: Option<Arc<Catalog>>,
        limits: Limits,
    ) -> Result<Self, QueryError> {
        let mode = match &limits.spill_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    QueryError::Internal(format!(
                        "cannot create the spill directory {}: {e}",
                        dir.display()
                    ))
                })?;
                DiskManagerMode::Directories(vec![dir.clone()])
            }
            None => DiskManagerMode::OsTmpDirectory,
        };
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(limits.memory, 1.0)
            .with_disk_manager_builder(
                DiskManagerBuilder::default()
                    .with_mode(mode)
                    .with_max_temp_directory_size(limits.spill_limit),
            )
            .build_arc()
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        let admission = pool::Admission::new(limits.max_concurrent, limits.queue);
        Ok(QueryEngine {
            admission,
            lake,
            live,
            limits,
            runtime,
            listing: Mutex::new(None),
            listing_ttl: Duration::from_secs(1),
            row_cache: Arc::new(Mutex::new(HashMap::new())),
            pg_catalog: tokio::sync::OnceCell::new(),
        })
    }

    /// The lake.
    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    /// Whether this engine serves a running daemon.
    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// One consistent view of the lake.
    pub async fn snapshot(&self) -> Result<Snapshot, QueryError> {
        if let Some(live) = &self.live {
            return Ok(live.snapshot());
        }
        let cached = self
            .listing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|(t, _)| t.elapsed() < self.listing_ttl)
            .map(|(_, f)| f.clone());
        let state = match cached {
            Some(f) => f,
            None => {
                let f = Arc::new(
                    lake_state(&self.lake)
                        .await
                        .map_err(|e| QueryError::Internal(e.to_string()))?,
                );
                *self.listing.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Instant::now(), f.clone()));
                f
            }
        };
        let (files, checkpoint) = (&state.0, state.1.clone());
        Ok(Snapshot {
            files: files.clone(),
            batches: Vec::new(),
            checkpoint,
            generation: 0,
            backfill: None,
        })
    }

    /// A place for one query in this engine's slots or queue.
    pub fn admit(&self) -> Result<pool::Ticket, QueryError> {
        self.admission.admit()
    }

    /// A session over one snapshot, with every table registered.
    pub async fn context(&self) -> Result<SessionContext, QueryError> {
        self.context_until(None, Dialect::DataFusion).await
    }

    /// A session whose bounded functions stop at `deadline`.
    pub async fn context_until(
        &self,
        deadline: Option<Instant>,
        dialect: Dialect,
    ) -> Result<SessionContext, QueryError> {
        let snap = self.snapshot().await?;
        self.context_over(&snap, deadline, dialect).await
    }

    /// A session over `snap`.
    async fn context_over(
        &self,
        snap: &Snapshot,
        deadline: Option<Instant>,
        dialect: Dialect,
    ) -> Result<SessionContext, QueryError> {
        let cfg = SessionConfig::new()
            .with_information_schema(true)
            .with_target_partitions(std::thread::available_parallelism().map_or(2, |n| n.get()))
            // row filters inside the Parquet reader: lookups (one DID, a few posts) decode 1.3-5x
            // less, and JSONBench Q2 runs 6 % faster with them (docs/performance.md)
            .set_bool("datafusion.execution.parquet.pushdown_filters", true)
            .set_bool("datafusion.execution.parquet.reorder_filters", true);
        // the partial phase of GROUP BY looks a batch's group up once when the batch has one
        // group, as batches of one file (one collection, one hour) do
        let mut builder = SessionStateBuilder::new()
            .with_config(cfg)
            .with_runtime_env(self.runtime.clone())
            .with_default_features();
        // OVERLAY … PLACING and || are planned with bounded functions (bound below)
        let syntax = Arc::new(bounded::SyntaxPlanner::default());
        match builder.expr_planners() {
            Some(p) => p.insert(0, syntax.clone()),
            None => {
                return Err(QueryError::Internal(
                    "the session has no expression planners".into(),
                ));
            }
        }
        // planning stops at the deadline too (rules check it before they run), and folds
        // no large constants, with or without a deadline
        builder =
            builder.with_optimizer_rules(deadline::logical_rules(deadline, self.limits.timeout));
        if let Some(at) = deadline {
            builder = builder
                .with_physical_optimizer_rules(deadline::physical_rules(at, self.limits.timeout));
        }
        let state = builder
            .with_physical_optimizer_rule(Arc::new(rowcount::CountFromLog))
            .with_physical_optimizer_rule(Arc::new(colocate::ColocateGroups))
            .with_physical_optimizer_rule(Arc::new(constagg::UseConstantKeyAggregate))
            .build();
        let mut ctx = SessionContext::new_with_state(state);
        ctx.register_object_store(lake_store_url()?.as_ref(), self.lake.object_store());
        datafusion_functions_json::register_all(&mut ctx)
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        // a quarter of the query's memory pool for what repeat(), lpad()… produce per batch
        let deadline = deadline.map(|at| bounded::Deadline {
            at,
            timeout: self.limits.timeout,
        });
        let concat_op = bounded::register(&ctx, self.limits.function_budget(), deadline)
            .map_err(QueryError::from_datafusion)?;
        let udf = |name: &str| {
            datafusion::execution::FunctionRegistry::udf(&ctx, name)
                .map_err(QueryError::from_datafusion)
        };
        syntax.bind(bounded::Bound {
            overlay: udf("overlay")?,
            concat_op,
            array_concat: udf("array_concat")?,
            array_append: udf("array_append")?,
            array_prepend: udf("array_prepend")?,
        });
        datepart::register(&mut ctx).map_err(QueryError::from_datafusion)?;
        distinct::register(&ctx);
        let prefix = self
            .lake
            .object_path("")
            .to_string()
            .trim_end_matches('/')
            .to_string();
        for name in table_names() {
            let Some(def) = table_def(name) else { continue };
            let t = LakeTable::new(
                def,
                &snap.files,
                &snap.batches,
                lake_store_url()?,
                prefix.clone(),
            )
            .map_err(|e| QueryError::Internal(e.to_string()))?;
            ctx.register_table(name, Arc::new(t))
                .map_err(|e| QueryError::Internal(e.to_string()))?;
        }
        let sys = Arc::new(MemorySchemaProvider::new());
        system::register(self, snap, sys.as_ref()).await?;
        if let Some(cat) = ctx.catalog("datafusion") {
            cat.register_schema("system", sys)
                .map_err(|e| QueryError::Internal(e.to_string()))?;
        }
        current::register(&ctx).map_err(|e| QueryError::Internal(e.to_string()))?;
        if dialect == Dialect::Postgres {
            let shared = self
                .pg_catalog
                .get_or_try_init(|| async {
                    let empty = Snapshot {
                        files: Vec::new(),
                        batches: Vec::new(),
                        checkpoint: Checkpoint::default(),
                        generation: 0,
                        backfill: None,
                    };
                    let ctx =
                        Box::pin(self.context_over(&empty, None, Dialect::DataFusion)).await?;
                    pg::SharedCatalog::try_new(ctx).map(Arc::new)
                })
                .await?;
            pg::register_catalog(&ctx, shared)?;
        }
        Ok(ctx)
    }

    /// Plans a read-only query.
    pub async fn sql(&self, sql: &str) -> Result<DataFrame, QueryError> {
        self.sql_until(sql, None).await
    }

    /// Plans a read-only query whose functions stop at `deadline`.
    pub async fn sql_until(
        &self,
        sql: &str,
        deadline: Option<Instant>,
    ) -> Result<DataFrame, QueryError> {
        self.plan(sql, None, deadline, Dialect::DataFusion).await
    }

    /// Plans a read-only query in `dialect`, with `params` in place of its placeholders
    /// (`$1`, …); its functions stop at `deadline`. Every front end plans here.
    pub async fn plan(
        &self,
        sql: &str,
        params: Option<datafusion::common::ParamValues>,
        deadline: Option<Instant>,
        dialect: Dialect,
    ) -> Result<DataFrame, QueryError> {
        Ok(self.plan_in(sql, params, deadline, dialect).await?.1)
    }

    /// [`QueryEngine::plan`], with the session: catalog tables (`information_schema`,
    /// `pg_catalog`) list the session's tables while they run, so it must outlive the plan.
    async fn plan_in(
        &self,
        sql: &str,
        params: Option<datafusion::common::ParamValues>,
        deadline: Option<Instant>,
        dialect: Dialect,
    ) -> Result<(SessionContext, DataFrame), QueryError> {
        let (ctx, plan) = self.logical_plan(sql, deadline, dialect).await?;
        let plan = match params {
            Some(p) => plan
                .with_param_values(p)
                .map_err(QueryError::from_datafusion)?,
            None => plan,
        };
        let df = ctx
            .execute_logical_plan(plan)
            .await
            .map_err(QueryError::from_datafusion);
        bounded::reset_ledger();
        Ok((ctx, df?))
    }

    /// The checked, read-only logical plan of `sql` (its placeholders still in place: the
    /// result's columns and the parameters' types can be read from it) and its session.
    pub async fn logical_plan(
        &self,
        sql: &str,
        deadline: Option<Instant>,
        dialect: Dialect,
    ) -> Result<(SessionContext, datafusion::logical_expr::LogicalPlan), QueryError> {
        guard::check(sql, guard::MAX_OPERATORS).map_err(|e| QueryError::Sql(e.to_string()))?;
        let ctx = self.context_until(deadline, dialect).await?;
        let opts = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        // constant folding runs the bounded functions: their count starts here
        bounded::reset_ledger();
        let plan = ctx
            .state()
            .create_logical_plan(sql)
            .await
            .map_err(QueryError::from_datafusion)?;
        if let Err(e) = opts.verify_plan(&plan) {
            return Err(QueryError::Forbidden(format!(
                "this endpoint is read-only: {e}"
            )));
        }
        let plan = hide_runtime_settings(plan).map_err(QueryError::from_datafusion)?;
        Ok((ctx, plan))
    }

    /// Plans `sql` and starts executing it; planning and every operator stop at `deadline`.
    /// What every front end runs on the query runtime once it has a slot.
    pub async fn open(
        &self,
        sql: &str,
        params: Option<datafusion::common::ParamValues>,
        deadline: Instant,
        dialect: Dialect,
    ) -> Result<
        (
            arrow::datatypes::SchemaRef,
            datafusion::execution::SendableRecordBatchStream,
        ),
        QueryError,
    > {
        let (ctx, df) = self.plan_in(sql, params, Some(deadline), dialect).await?;
        let schema: arrow::datatypes::SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let stream = self.execute_until(df, deadline).await?;
        Ok((schema, Box::pin(WithSession { stream, _ctx: ctx })))
    }

    /// Starts executing a planned query; its operators stop at the query timeout (counted
    /// from now) even when they never yield.
    pub async fn execute(
        &self,
        df: DataFrame,
    ) -> Result<datafusion::execution::SendableRecordBatchStream, QueryError> {
        self.execute_until(df, Instant::now() + self.limits.timeout)
            .await
    }

    /// Starts executing a planned query whose operators stop at `deadline`.
    pub async fn execute_until(
        &self,
        df: DataFrame,
        deadline: Instant,
    ) -> Result<datafusion::execution::SendableRecordBatchStream, QueryError> {
        let task = Arc::new(df.task_ctx());
        bounded::reset_ledger();
        let plan = df
            .create_physical_plan()
            .await
            .map_err(QueryError::from_datafusion)?;
        bounded::reset_ledger();
        let plan = deadline::wrap(
            plan,
            deadline::Limits {
                deadline,
                timeout: self.limits.timeout,
                batch_bytes: self.limits.function_budget(),
            },
        )
        .map_err(QueryError::from_datafusion)?;
        datafusion::physical_plan::execute_stream(plan, task).map_err(QueryError::from_datafusion)
    }

    /// Runs a query to completion within the timeout and row limit.
    pub async fn collect(
        &self,
        sql: &str,
    ) -> Result<Vec<arrow::record_batch::RecordBatch>, QueryError> {
        use futures::StreamExt;
        let timeout = self.limits.timeout;
        let deadline = Instant::now() + timeout;
        let work = async {
            let (_ctx, df) = self
                .plan_in(sql, None, Some(deadline), Dialect::DataFusion)
                .await?;
            let mut stream = self.execute_until(df, deadline).await?;
            let mut out = Vec::new();
            let mut rows = 0u64;
            while let Some(b) = stream.next().await {
                let b = b.map_err(QueryError::from_datafusion)?;
                rows += b.num_rows() as u64;
                if rows > self.limits.max_rows {
                    return Err(QueryError::TooLarge(format!(
                        "result has more than {} rows; add a LIMIT",
                        self.limits.max_rows
                    )));
                }
                out.push(b);
            }
            Ok(out)
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or(Err(QueryError::Timeout(timeout)))
    }

    /// Table names and schemas.
    pub async fn tables(&self) -> Result<Vec<(String, arrow::datatypes::SchemaRef)>, QueryError> {
        let ctx = self.context().await?;
        let mut out = Vec::new();
        for name in table_names() {
            if let Ok(t) = ctx.table_provider(name).await {
                out.push((name.to_string(), t.schema()));
            }
        }
        for name in system::NAMES {
            if !self.is_live() && *name == "ingest" {
                continue;
            }
            if let Ok(t) = ctx.table_provider(format!("system.{name}").as_str()).await {
                out.push((format!("system.{name}"), t.schema()));
            }
        }
        for (name, _) in current::views() {
            if let Ok(t) = ctx.table_provider(format!("current.{name}").as_str()).await {
                out.push((format!("current.{name}"), t.schema()));
            }
        }
        Ok(out)
    }
}

/// A result's stream with its session, kept until the stream is dropped.
struct WithSession {
    stream: datafusion::execution::SendableRecordBatchStream,
    _ctx: SessionContext,
}

impl futures::Stream for WithSession {
    type Item = datafusion::error::Result<arrow::record_batch::RecordBatch>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.stream.as_mut().poll_next(cx)
    }
}

impl datafusion::physical_plan::RecordBatchStream for WithSession {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.stream.schema()
    }
}

/// The settings under `datafusion.runtime.` (the spill directory among them) say where this
/// process keeps its files: `SHOW ALL` and `information_schema.df_settings` leave them out.
fn hide_runtime_settings(
    plan: datafusion::logical_expr::LogicalPlan,
) -> datafusion::error::Result<datafusion::logical_expr::LogicalPlan> {
    use datafusion::common::Column;
    use datafusion::common::tree_node::Transformed;
    use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, lit};
    plan.transform_up_with_subqueries(|p| match &p {
        LogicalPlan::TableScan(scan) if scan.table_name.table() == "df_settings" => {
            let name = Expr::Column(Column::new(Some(scan.table_name.clone()), "name"));
            let filtered = LogicalPlanBuilder::from(p)
                .filter(name.not_like(lit("datafusion.runtime.%")))?
                .build()?;
            Ok(Transformed::yes(filtered))
        }
        _ => Ok(Transformed::no(p)),
    })
    .map(|t| t.data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_table_is_named_as_written_with_the_nearest_one() {
        let e = QueryError::from_datafusion(DataFusionError::Plan(
            "table 'datafusion.public.post' not found".into(),
        ));
        assert_eq!(e.code(), "bad_sql");
        assert_eq!(
            e.to_string(),
            "no table named \"post\"; did you mean \"posts\"? (GET /tables lists them)"
        );
        let e = unknown_table("table 'datafusion.system.chekpoint' not found");
        assert_eq!(
            e.as_deref(),
            Some(
                "no table named \"system.chekpoint\"; did you mean \"system.checkpoint\"? (GET /tables lists them)"
            )
        );
        // nothing near: no guess
        assert_eq!(
            unknown_table("table 'datafusion.public.zzzzzzzz' not found").as_deref(),
            Some("no table named \"zzzzzzzz\" (GET /tables lists them)")
        );
        assert_eq!(unknown_table("column 'x' not found"), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("likes", "likes"), 0);
    }
}
