//! Size limits on the scalar functions that can amplify their input.
//!
//! DataFusion's memory pool accounts for what operators buffer (joins, sorts, aggregates), not
//! for the arrays a scalar function returns. `repeat('a', 2000000000)`, `lpad('x', 2147483647)`
//! or `array_repeat(record, 1000000)` each allocate gigabytes in one call, outside the pool and
//! faster than any timeout can fire. These wrappers compute, from the arguments alone, how many
//! bytes a call would produce for the whole batch and refuse the call (a `resources_exhausted`
//! error) when that exceeds the budget; below it they call the original function unchanged.
//!
//! The budget holds for the **sum** of what these functions produce while one batch is
//! computed, not per call: `concat(repeat('a', 250000000), repeat('a', 250000000), …)` passed
//! each call's check and reached 5 GB. A thread-local ledger counts the bytes every wrapped
//! call produces (the estimate before the call, the real size after it); it is reset each time
//! an operator of the plan is polled or yields a batch (`deadline::DeadlineExec`), and while a
//! query is planned (constant folding evaluates these functions too). A batch is computed
//! within one poll, on one thread, so the ledger sees exactly the calls of that batch.
//!
//! Time: a wrapped call over many rows runs in slices of [`SLICE_ROWS`] rows and checks the
//! query's deadline between slices, so a slow function (`regexp_replace` with a thousand
//! back-references, a regex over long strings) stops at the timeout instead of finishing its
//! batch first.

use super::deadline::DeadlineExceeded;
use arrow::array::{Array, ArrayRef, Int64Array, StringArray};
use arrow::datatypes::{DataType, IntervalUnit, TimeUnit};
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::planner::{PlannerResult, RawBinaryExpr};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rows per slice of a wrapped call; the deadline is checked between slices.
pub const SLICE_ROWS: usize = 512;

/// Most character comparisons `levenshtein` may make for one batch (a few hundred ms).
const LEVENSHTEIN_WORK: u128 = 200_000_000;

thread_local! {
    /// Bytes produced by wrapped calls for the batch being computed on this thread.
    static PRODUCED: Cell<u64> = const { Cell::new(0) };
    /// Set while a logical optimizer rule runs on this thread: a call then is constant folding.
    static FOLDING: Cell<bool> = const { Cell::new(false) };
}

/// The most a wrapped call may produce to be folded into a constant while a query is planned.
///
/// A folded constant lives in the plan: the planner copies it and formats it into column
/// names each time it derives a schema, steps the deadline cannot interrupt.
/// `array_to_string(range(1000000), repeat('x', 100))` folded `range` into a list of a million
/// numbers, which the optimizer then printed for seconds, on past the 408. A larger result is
/// left as a call, and computed when the query runs, where the deadline and the batch's budget
/// hold.
pub const FOLD_BYTES: u64 = 64 << 10;

/// Runs `f` (an optimizer rule) with wrapped calls told that they are constant folding.
pub fn folding<T>(f: impl FnOnce() -> T) -> T {
    /// Restores the flag even when `f` unwinds.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FOLDING.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FOLDING.with(|c| c.replace(true)));
    f()
}

fn is_folding() -> bool {
    FOLDING.with(|c| c.get())
}

/// Why a call was not folded into a constant; the planner keeps the call and its error never
/// reaches the user (DataFusion's constant folding leaves an expression whose evaluation fails
/// as it was).
fn not_folded(name: &str, bytes: Option<u128>) -> DataFusionError {
    DataFusionError::Execution(match bytes {
        Some(b) => format!(
            "{name}() would produce {b} bytes, more than a constant may hold ({FOLD_BYTES}); computed when the query runs"
        ),
        None => format!("{name}() of unknown size is computed when the query runs"),
    })
}

/// Starts a new batch's count on this thread (an operator was polled, or yielded a batch).
pub fn reset_ledger() {
    PRODUCED.with(|p| p.set(0));
}

/// Bytes counted for the current batch on this thread.
pub fn ledger() -> u64 {
    PRODUCED.with(|p| p.get())
}

fn charge(bytes: u64) {
    PRODUCED.with(|p| p.set(p.get().saturating_add(bytes)));
}

/// A join's filter, evaluated with a count of its own.
///
/// A nested loop join evaluates its filter over many intermediate batches (every left row
/// against a chunk of the right side) within one poll, and frees each before the next: their
/// sum is no batch anyone holds. Each evaluation counts on its own, and what was counted
/// before it is restored afterwards (its output is a boolean mask).
#[derive(Debug, Eq)]
pub struct LedgerScope {
    inner: Arc<dyn datafusion::physical_expr::PhysicalExpr>,
}

impl PartialEq for LedgerScope {
    fn eq(&self, other: &Self) -> bool {
        self.inner.eq(&other.inner)
    }
}

impl std::hash::Hash for LedgerScope {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.inner.hash(state);
    }
}

impl std::fmt::Display for LedgerScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl datafusion::physical_expr::PhysicalExpr for LedgerScope {
    fn data_type(&self, input_schema: &arrow::datatypes::Schema) -> Result<DataType> {
        self.inner.data_type(input_schema)
    }

    fn nullable(&self, input_schema: &arrow::datatypes::Schema) -> Result<bool> {
        self.inner.nullable(input_schema)
    }

    fn return_field(
        &self,
        input_schema: &arrow::datatypes::Schema,
    ) -> Result<arrow::datatypes::FieldRef> {
        self.inner.return_field(input_schema)
    }

    fn evaluate(&self, batch: &arrow::record_batch::RecordBatch) -> Result<ColumnarValue> {
        let before = ledger();
        reset_ledger();
        let out = self.inner.evaluate(batch);
        PRODUCED.with(|p| p.set(before));
        out
    }

    fn children(&self) -> Vec<&Arc<dyn datafusion::physical_expr::PhysicalExpr>> {
        vec![&self.inner]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn datafusion::physical_expr::PhysicalExpr>>,
    ) -> Result<Arc<dyn datafusion::physical_expr::PhysicalExpr>> {
        let inner = children
            .into_iter()
            .next()
            .ok_or_else(|| DataFusionError::Internal("a ledger scope has one child".into()))?;
        Ok(Arc::new(LedgerScope { inner }))
    }

    fn fmt_sql(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt_sql(f)
    }
}

/// `plan` with its filter counted per evaluation, when it is a join with a filter (nested
/// loop, hash or sort-merge; see [`LedgerScope`]); otherwise `plan` itself.
///
/// A hash join evaluates its filter once per chunk of candidate pairs and goes on to the next
/// chunk within the same poll while the filter passes too few rows to fill an output batch;
/// a sort-merge join evaluates it per buffered group. Either way the evaluations are freed
/// one by one, as in a nested loop join.
pub fn scope_join_filter(
    plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
    use datafusion::physical_plan::joins::utils::JoinFilter;
    use datafusion::physical_plan::joins::{
        HashJoinExec, HashJoinExecBuilder, NestedLoopJoinExec, NestedLoopJoinExecBuilder,
        SortMergeJoinExec,
    };
    let scoped = |filter: Option<&JoinFilter>| -> Option<JoinFilter> {
        let filter = filter?;
        if filter.expression().downcast_ref::<LedgerScope>().is_some() {
            return None;
        }
        Some(JoinFilter::new(
            Arc::new(LedgerScope {
                inner: filter.expression().clone(),
            }),
            filter.column_indices().to_vec(),
            filter.schema().clone(),
        ))
    };
    if let Some(join) = plan.downcast_ref::<NestedLoopJoinExec>() {
        if let Some(f) = scoped(join.filter()) {
            return Ok(Arc::new(
                NestedLoopJoinExecBuilder::from(join)
                    .with_filter(Some(f))
                    .build()?,
            ));
        }
    } else if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
        if let Some(f) = scoped(join.filter()) {
            return Ok(Arc::new(
                HashJoinExecBuilder::from(join)
                    .with_filter(Some(f))
                    .build()?,
            ));
        }
    } else if let Some(join) = plan.downcast_ref::<SortMergeJoinExec>()
        && let Some(f) = scoped(join.filter().as_ref())
    {
        return Ok(Arc::new(SortMergeJoinExec::try_new(
            join.left().clone(),
            join.right().clone(),
            join.on().to_vec(),
            Some(f),
            join.join_type(),
            join.sort_options().to_vec(),
            join.null_equality(),
        )?));
    }
    Ok(plan)
}

/// How a function's output size follows from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(s, n)`: `len(s) * n`.
    Repeat,
    /// `lpad(s, n[, fill])`, `rpad`: `n` characters of up to 4 bytes.
    Pad,
    /// `replace(s, from, to)`: every occurrence of `from` becomes `to`.
    Replace,
    /// `array_repeat(x, n)`: `n` copies of `x`.
    ArrayRepeat,
    /// `array_resize(a, n[, x])`: `n` elements.
    ArrayResize,
    /// `range(start, stop[, step])`, `generate_series`: one element per step, for integers,
    /// dates and timestamps.
    Series,
    /// `concat(a, b, …)`: the sum of its arguments.
    Concat,
    /// `concat_ws(sep, a, b, …)`: the arguments and a separator between each two.
    ConcatWs,
    /// `regexp_replace(s, pattern, replacement[, flags])`: with `g`, one replacement per
    /// position at most, and back-references that copy at most the string once each.
    RegexpReplace,
    /// `overlay(s placing t from p [for n])`: `s` and `t`.
    Overlay,
    /// `translate(s, from, to)`: each character of `s` becomes one of up to 4 bytes.
    Translate,
    /// `levenshtein(a, b)`: small output, `len(a) * len(b)` work.
    Levenshtein,
    /// `array_concat(a, b, …)`, `array_append`, `array_prepend`, `make_array`, and the `||`
    /// operator: the bytes of all their arguments.
    Sum,
    /// `encode(s, format)`: hex doubles `s` (base64 makes it 4/3).
    Encode,
    /// `string_to_array(s, delimiter[, null])`: at worst one element per character, each with
    /// its offset or view.
    Split,
    /// `array_to_string(a, separator[, null])`: the elements printed (up to three times
    /// their width for numbers) and a separator or null string per element.
    Join,
    /// Regex matching: small output, but slow on long strings; wrapped for the deadline.
    Scan,
}

const FUNCTIONS: &[(&str, Growth)] = &[
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("replace", Growth::Replace),
    ("array_repeat", Growth::ArrayRepeat),
    ("array_resize", Growth::ArrayResize),
    ("range", Growth::Series),
    ("generate_series", Growth::Series),
    ("concat", Growth::Concat),
    ("concat_ws", Growth::ConcatWs),
    ("regexp_replace", Growth::RegexpReplace),
    ("overlay", Growth::Overlay),
    ("translate", Growth::Translate),
    ("levenshtein", Growth::Levenshtein),
    ("array_concat", Growth::Sum),
    ("array_append", Growth::Sum),
    ("array_prepend", Growth::Sum),
    ("make_array", Growth::Sum),
    ("encode", Growth::Encode),
    ("string_to_array", Growth::Split),
    ("array_to_string", Growth::Join),
    ("regexp_like", Growth::Scan),
    ("regexp_match", Growth::Scan),
    ("regexp_count", Growth::Scan),
    ("regexp_instr", Growth::Scan),
];

/// The query's deadline, as the wrapped functions see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Deadline {
    /// When the query's time is up.
    pub at: Instant,
    /// The timeout (for the error message).
    pub timeout: Duration,
}

impl Deadline {
    fn check(&self) -> Result<()> {
        if Instant::now() >= self.at {
            return Err(DataFusionError::External(Box::new(DeadlineExceeded(
                self.timeout,
            ))));
        }
        Ok(())
    }
}

/// The bounded functions that SQL syntax is planned with, in place of DataFusion's built-ins.
#[derive(Debug, Clone)]
pub struct Bound {
    /// `OVERLAY(s PLACING t FROM p [FOR n])`.
    pub overlay: Arc<ScalarUDF>,
    /// `a || b` of strings or binaries (from [`register`]).
    pub concat_op: Arc<ScalarUDF>,
    /// `list || list`.
    pub array_concat: Arc<ScalarUDF>,
    /// `list || element`.
    pub array_append: Arc<ScalarUDF>,
    /// `element || list`.
    pub array_prepend: Arc<ScalarUDF>,
}

/// Plans the syntax that DataFusion's own planners would turn into calls of the unbounded
/// built-ins: `OVERLAY … PLACING` (the built-in `overlay`), and `||` (a binary operator that
/// copies both sides for strings, or `array_concat`/`array_append`/`array_prepend` for lists).
/// It goes first among the session's expression planners. Until [`SyntaxPlanner::bind`]
/// gives it the bounded functions, planning the syntax is an error, never the unbounded one.
#[derive(Debug, Default)]
pub struct SyntaxPlanner {
    bound: std::sync::OnceLock<Bound>,
}

impl SyntaxPlanner {
    /// Plans the syntax with `bound` from now on.
    pub fn bind(&self, bound: Bound) {
        if self.bound.set(bound).is_err() {
            // bound once per session, right after the bounded functions are registered
            tracing::error!("the SQL syntax planner was bound twice; the first binding stays");
            metrics::counter!("atlake_broken_invariants_total").increment(1);
        }
    }

    fn bound(&self) -> Result<&Bound> {
        self.bound.get().ok_or_else(|| {
            DataFusionError::Internal("the SQL syntax is not bound to the bounded functions".into())
        })
    }
}

fn call(udf: &Arc<ScalarUDF>, args: Vec<Expr>) -> Expr {
    Expr::ScalarFunction(datafusion::logical_expr::expr::ScalarFunction::new_udf(
        udf.clone(),
        args,
    ))
}

/// How many list levels a type has (`List<List<Int64>>`: 2).
fn list_depth(t: &DataType) -> usize {
    match t {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            1 + list_depth(f.data_type())
        }
        _ => 0,
    }
}

/// The type both sides of a `||` of strings or binaries are cast to, or `None` when neither
/// side is a string or a binary (DataFusion plans those itself, or refuses them).
fn concat_type(l: &DataType, r: &DataType) -> Option<DataType> {
    let value = |t: &DataType| match t {
        DataType::Dictionary(_, v) => v.as_ref().clone(),
        t => t.clone(),
    };
    let (l, r) = (value(l), value(r));
    let is_str =
        |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
    let is_bin = |t: &DataType| {
        matches!(
            t,
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView
        )
    };
    let null = |t: &DataType| t == &DataType::Null;
    let pick = |large: DataType, view: DataType, plain: DataType| {
        if l == large || r == large {
            large
        } else if l == view || r == view {
            view
        } else {
            plain
        }
    };
    if (is_str(&l) || null(&l)) && (is_str(&r) || null(&r)) {
        Some(pick(
            DataType::LargeUtf8,
            DataType::Utf8View,
            DataType::Utf8,
        ))
    } else if (is_bin(&l) || null(&l)) && (is_bin(&r) || null(&r)) && !(null(&l) && null(&r)) {
        Some(pick(
            DataType::LargeBinary,
            DataType::BinaryView,
            DataType::Binary,
        ))
    } else if (is_str(&l) && !is_bin(&r)) || (is_str(&r) && !is_bin(&l)) {
        // a string and a value of another type: the value is printed, as DataFusion does
        Some(if l == DataType::LargeUtf8 || r == DataType::LargeUtf8 {
            DataType::LargeUtf8
        } else {
            DataType::Utf8
        })
    } else {
        None
    }
}

fn cast_to(e: Expr, from: &DataType, to: &DataType) -> Expr {
    if from == to {
        e
    } else {
        Expr::Cast(datafusion::logical_expr::Cast::new(Box::new(e), to.clone()))
    }
}

impl datafusion::logical_expr::planner::ExprPlanner for SyntaxPlanner {
    fn plan_overlay(&self, args: Vec<Expr>) -> Result<PlannerResult<Vec<Expr>>> {
        Ok(PlannerResult::Planned(call(&self.bound()?.overlay, args)))
    }

    fn plan_binary_op(
        &self,
        expr: RawBinaryExpr,
        schema: &datafusion::common::DFSchema,
    ) -> Result<PlannerResult<RawBinaryExpr>> {
        use datafusion::logical_expr::ExprSchemable;
        if expr.op != datafusion::sql::sqlparser::ast::BinaryOperator::StringConcat {
            return Ok(PlannerResult::Original(expr));
        }
        let b = self.bound()?;
        let (lt, rt) = (expr.left.get_type(schema)?, expr.right.get_type(schema)?);
        let (ld, rd) = (list_depth(&lt), list_depth(&rt));
        let planned = if ld + rd == 0 {
            let Some(t) = concat_type(&lt, &rt) else {
                return Ok(PlannerResult::Original(expr));
            };
            call(
                &b.concat_op,
                vec![cast_to(expr.left, &lt, &t), cast_to(expr.right, &rt, &t)],
            )
        } else if ld == rd {
            call(&b.array_concat, vec![expr.left, expr.right])
        } else if ld > rd {
            call(&b.array_append, vec![expr.left, expr.right])
        } else {
            call(&b.array_prepend, vec![expr.left, expr.right])
        };
        Ok(PlannerResult::Planned(planned))
    }
}

/// `a || b` for two strings or two binaries of one type (the planner casts them): null when
/// either side is null, as the operator is.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ConcatOp {
    signature: Signature,
}

impl ConcatOp {
    fn new() -> Self {
        ConcatOp {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for ConcatOp {
    fn name(&self) -> &str {
        "||"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        match args {
            [l, r] if l == r => Ok(l.clone()),
            _ => Err(DataFusionError::Internal(format!(
                "|| was planned over {args:?}, not two values of one type"
            ))),
        }
    }

    /// The column is named as the operator's would be: `a || b`.
    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        match args {
            [l, r] => Ok(format!("{} || {}", l.schema_name(), r.schema_name())),
            _ => Err(DataFusionError::Internal("|| takes two arguments".into())),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let scalar = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let [l, r] = arrays.as_slice() else {
            return Err(DataFusionError::Internal("|| takes two arguments".into()));
        };
        let out = arrow::compute::kernels::concat_elements::concat_elements_dyn(l, r)?;
        if scalar {
            Ok(ColumnarValue::Scalar(
                datafusion::common::ScalarValue::try_from_array(&out, 0)?,
            ))
        } else {
            Ok(ColumnarValue::Array(out))
        }
    }
}

/// Replaces the amplifying functions of `ctx` with bounded ones: the calls computing one batch
/// may produce at most `budget` bytes together, and stop at `deadline`.
///
/// A function that is not in the session is an error: the cap would silently not apply.
///
/// Returns the bounded `||` of strings and binaries, which is not a function of the registry:
/// [`SyntaxPlanner`] plans the operator with it.
pub fn register(
    ctx: &SessionContext,
    budget: u64,
    deadline: Option<Deadline>,
) -> datafusion::error::Result<Arc<ScalarUDF>> {
    for (name, growth) in FUNCTIONS {
        let inner = ctx.udf(name)?;
        ctx.register_udf(ScalarUDF::new_from_impl(Bounded {
            inner,
            growth: *growth,
            budget,
            deadline,
        }));
    }
    Ok(Arc::new(ScalarUDF::new_from_impl(Bounded {
        inner: Arc::new(ScalarUDF::new_from_impl(ConcatOp::new())),
        growth: Growth::Sum,
        budget,
        deadline,
    })))
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: Arc<ScalarUDF>,
    growth: Growth,
    budget: u64,
    deadline: Option<Deadline>,
}

/// Rows an argument stands for: a scalar is one value for every row.
fn expand<T: Clone>(v: Vec<T>, scalar: bool, rows: usize) -> Vec<T> {
    match (scalar, v.first()) {
        (true, Some(x)) => vec![x.clone(); rows.max(1)],
        _ => v,
    }
}

/// The argument as one Int64 per row (null as 0), if it converts.
fn ints(v: &ColumnarValue, rows: usize) -> Option<Vec<i64>> {
    let (a, scalar) = match v {
        ColumnarValue::Array(a) => (a.clone(), false),
        ColumnarValue::Scalar(s) => (s.to_array_of_size(1).ok()?, true),
    };
    if a.data_type() == &DataType::Null {
        return Some(vec![0; if scalar { rows.max(1) } else { a.len() }]);
    }
    if !a.data_type().is_integer() && !a.data_type().is_floating() {
        return None;
    }
    let a = arrow::compute::cast(&a, &DataType::Int64).ok()?;
    let a = a.as_any().downcast_ref::<Int64Array>()?;
    let v = (0..a.len())
        .map(|i| if a.is_null(i) { 0 } else { a.value(i) })
        .collect();
    Some(expand(v, scalar, rows))
}

/// The argument as instants (nanoseconds for dates and timestamps, the value for integers),
/// and whether they are times.
fn points(v: &ColumnarValue, rows: usize) -> Option<(Vec<i128>, bool)> {
    let dt = v.data_type();
    let per = match &dt {
        DataType::Date32 => 86_400_000_000_000i128,
        DataType::Date64 | DataType::Timestamp(TimeUnit::Millisecond, _) => 1_000_000,
        DataType::Timestamp(TimeUnit::Second, _) => 1_000_000_000,
        DataType::Timestamp(TimeUnit::Microsecond, _) => 1_000,
        DataType::Timestamp(TimeUnit::Nanosecond, _) => 1,
        _ => return Some((ints(v, rows)?.into_iter().map(i128::from).collect(), false)),
    };
    let (a, scalar) = match v {
        ColumnarValue::Array(a) => (a.clone(), false),
        ColumnarValue::Scalar(s) => (s.to_array_of_size(1).ok()?, true),
    };
    let a = arrow::compute::cast(&a, &DataType::Int64).ok()?;
    let a = a.as_any().downcast_ref::<Int64Array>()?;
    let v = (0..a.len())
        .map(|i| {
            if a.is_null(i) {
                0
            } else {
                a.value(i) as i128 * per
            }
        })
        .collect();
    Some((expand(v, scalar, rows), true))
}

/// The smallest length, in nanoseconds, of an interval step (months of 28 to 31 days, days of
/// 23 to 25 hours), one per row; integers for integer series.
fn steps(v: &ColumnarValue, rows: usize) -> Option<Vec<i128>> {
    const H: i128 = 3_600_000_000_000;
    let least = |months: i128, days: i128, nanos: i128| -> i128 {
        let mut m = i128::MAX;
        for month_days in 28..=31 {
            for day_h in 23..=25 {
                let t = months * month_days * day_h * H + days * day_h * H + nanos;
                m = m.min(t.abs());
            }
        }
        m
    };
    let (a, scalar) = match v {
        ColumnarValue::Array(a) => (a.clone(), false),
        ColumnarValue::Scalar(s) => (s.to_array_of_size(1).ok()?, true),
    };
    let out: Vec<i128> = match a.data_type() {
        DataType::Interval(IntervalUnit::MonthDayNano) => {
            let a = a
                .as_any()
                .downcast_ref::<arrow::array::IntervalMonthDayNanoArray>()?;
            a.iter()
                .map(|x| {
                    x.map_or(1, |x| {
                        least(x.months.into(), x.days.into(), x.nanoseconds.into())
                    })
                })
                .collect()
        }
        DataType::Interval(IntervalUnit::DayTime) => {
            let a = a
                .as_any()
                .downcast_ref::<arrow::array::IntervalDayTimeArray>()?;
            a.iter()
                .map(|x| {
                    x.map_or(1, |x| {
                        least(0, x.days.into(), i128::from(x.milliseconds) * 1_000_000)
                    })
                })
                .collect()
        }
        DataType::Interval(IntervalUnit::YearMonth) => {
            let a = a
                .as_any()
                .downcast_ref::<arrow::array::IntervalYearMonthArray>()?;
            a.iter()
                .map(|x| x.map_or(1, |m| least(m.into(), 0, 0)))
                .collect()
        }
        _ => return Some(ints(v, rows)?.into_iter().map(i128::from).collect()),
    };
    Some(expand(out, scalar, rows))
}

/// The argument as strings, one per row (for back-references in replacements).
fn strs(v: &ColumnarValue, rows: usize) -> Option<Vec<Option<String>>> {
    let (a, scalar) = match v {
        ColumnarValue::Array(a) => (a.clone(), false),
        ColumnarValue::Scalar(s) => (s.to_array_of_size(1).ok()?, true),
    };
    let a = arrow::compute::cast(&a, &DataType::Utf8).ok()?;
    let a = a.as_any().downcast_ref::<StringArray>()?;
    Some(expand(
        a.iter().map(|x| x.map(String::from)).collect(),
        scalar,
        rows,
    ))
}

/// The byte length of each value (strings, binaries, lists: elements × 16); 16 for other types.
fn lens(v: &ColumnarValue, rows: usize) -> Vec<i64> {
    // a scalar is measured once, not expanded to every row first
    let (a, scalar) = match v {
        ColumnarValue::Array(a) => (a.clone(), false),
        ColumnarValue::Scalar(s) => match s.to_array_of_size(1) {
            Ok(a) => (a, true),
            Err(_) => return vec![16; rows.max(1)],
        },
    };
    let as_utf8 = |a: &ArrayRef| -> Option<ArrayRef> {
        match a.data_type() {
            DataType::Utf8View | DataType::LargeUtf8 => {
                arrow::compute::cast(a, &DataType::Utf8).ok()
            }
            DataType::BinaryView => arrow::compute::cast(a, &DataType::Binary).ok(),
            _ => Some(a.clone()),
        }
    };
    let measured = as_utf8(&a)
        .and_then(|a| arrow::compute::kernels::length::length(&a).ok())
        .and_then(|l| ints(&ColumnarValue::Array(l), rows));
    let v = match (measured, a.data_type()) {
        (Some(l), DataType::List(_) | DataType::LargeList(_)) => {
            l.into_iter().map(|n| n.saturating_mul(16)).collect()
        }
        (Some(l), _) => l,
        (None, _) => vec![16; a.len()],
    };
    expand(v, scalar, rows)
}

/// Bytes a value holds (a slice counts only its rows).
fn out_bytes(v: &ColumnarValue) -> u64 {
    match v {
        ColumnarValue::Array(a) => logical_bytes(&a.to_data()),
        ColumnarValue::Scalar(s) => s.size() as u64,
    }
}

/// Bytes an argument stands for in a batch of `rows` rows (a scalar once per row).
fn arg_bytes(v: &ColumnarValue, rows: usize) -> u128 {
    match v {
        ColumnarValue::Array(a) => logical_bytes(&a.to_data()) as u128,
        ColumnarValue::Scalar(s) => s.size() as u128 * rows.max(1) as u128,
    }
}

/// The bytes an array's rows hold as values: its slice of offsets, validity and data, with the
/// strings a view array points to counted once per view (Arrow's slice size counts only the
/// 16-byte views, so a 60 MB string in a view array would count as 16 bytes).
pub fn logical_bytes(d: &arrow::array::ArrayData) -> u64 {
    let size = |d: &arrow::array::ArrayData| {
        d.get_slice_memory_size()
            .unwrap_or_else(|_| d.get_array_memory_size()) as u64
    };
    let children = d.child_data();
    let own = size(d).saturating_sub(children.iter().map(size).sum());
    let nested: u64 = children.iter().map(logical_bytes).sum();
    let viewed = match d.data_type() {
        DataType::Utf8View | DataType::BinaryView if !d.buffers().is_empty() => {
            let views = arrow::buffer::ScalarBuffer::<u128>::new(
                d.buffers()[0].clone(),
                d.offset(),
                d.len(),
            );
            // a view's low 32 bits are its length; up to 12 bytes are inline in the view
            views
                .iter()
                .map(|v| u64::from(*v as u32))
                .filter(|l| *l > 12)
                .sum()
        }
        _ => 0,
    };
    own.saturating_add(nested).saturating_add(viewed)
}

/// The bytes of every column of a batch (see [`logical_bytes`]).
pub fn batch_bytes(b: &arrow::record_batch::RecordBatch) -> u64 {
    b.columns()
        .iter()
        .map(|c| logical_bytes(&c.to_data()))
        .fold(0u64, u64::saturating_add)
}

/// The number of back-references (`\1`, `$1`, `${name}`) in a replacement.
fn backrefs(rep: &str) -> i128 {
    let b = rep.as_bytes();
    (0..b.len())
        .filter(|&i| {
            (b[i] == b'\\' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) || b[i] == b'$'
        })
        .count() as i128
}

impl Bounded {
    /// Bytes the call would produce for the batch; `None` when it cannot tell.
    fn estimate(&self, args: &ScalarFunctionArgs) -> Option<u128> {
        let rows = args.number_rows;
        let a = &args.args;
        let sum = |xs: Vec<i128>| xs.into_iter().map(|x| x.max(0) as u128).sum::<u128>();
        match self.growth {
            Growth::Repeat => {
                let (s, n) = (lens(a.first()?, rows), ints(a.get(1)?, rows)?);
                Some(sum(s
                    .iter()
                    .zip(&n)
                    .map(|(s, n)| *s as i128 * *n as i128)
                    .collect()))
            }
            Growth::Pad => {
                let n = ints(a.get(1)?, rows)?;
                Some(sum(n.iter().map(|n| *n as i128 * 4).collect()))
            }
            Growth::Replace => {
                let (s, from, to) = (
                    lens(a.first()?, rows),
                    lens(a.get(1)?, rows),
                    lens(a.get(2)?, rows),
                );
                Some(sum(s
                    .iter()
                    .zip(from.iter().zip(&to))
                    .map(|(s, (f, t))| {
                        let (s, f, t) = (*s as i128, *f as i128, *t as i128);
                        if f == 0 {
                            (s + 1) * (t + 1)
                        } else {
                            s + (s / f) * t
                        }
                    })
                    .collect()))
            }
            Growth::ArrayRepeat => {
                let (x, n) = (lens(a.first()?, rows), ints(a.get(1)?, rows)?);
                Some(sum(x
                    .iter()
                    .zip(&n)
                    .map(|(x, n)| (*x).max(16) as i128 * *n as i128)
                    .collect()))
            }
            Growth::ArrayResize => {
                let n = ints(a.get(1)?, rows)?;
                Some(sum(n.iter().map(|n| *n as i128 * 16).collect()))
            }
            Growth::Series => {
                let (start, stop, step) = match a.len() {
                    1 => (None, points(&a[0], rows)?.0, None),
                    2 => (Some(points(&a[0], rows)?.0), points(&a[1], rows)?.0, None),
                    3 => (
                        Some(points(&a[0], rows)?.0),
                        points(&a[1], rows)?.0,
                        Some(steps(&a[2], rows)?),
                    ),
                    _ => return None,
                };
                Some(sum((0..stop.len())
                    .map(|i| {
                        // arguments can differ in length (a scalar expands to at least
                        // one row even in an empty batch): missing values count as defaults
                        let at = |v: Option<&Vec<i128>>, d: i128| {
                            v.and_then(|v| v.get(i)).copied().unwrap_or(d)
                        };
                        let (lo, step) = (at(start.as_ref(), 0), at(step.as_ref(), 1));
                        let span = (at(Some(&stop), 0) - lo).abs();
                        (span / step.abs().max(1) + 1).saturating_mul(8)
                    })
                    .collect()))
            }
            Growth::Concat => Some(
                a.iter()
                    .map(|v| sum(lens(v, rows).into_iter().map(i128::from).collect()))
                    .sum(),
            ),
            Growth::ConcatWs => {
                let sep = sum(lens(a.first()?, rows).into_iter().map(i128::from).collect());
                let rest: u128 = a[1..]
                    .iter()
                    .map(|v| sum(lens(v, rows).into_iter().map(i128::from).collect()))
                    .sum();
                Some(rest + sep * a.len().saturating_sub(2) as u128)
            }
            Growth::RegexpReplace => {
                let s = lens(a.first()?, rows);
                let rep = strs(a.get(2)?, rows)?;
                let global = match a.get(3) {
                    None => vec![false; s.len()],
                    Some(f) => strs(f, rows)?
                        .into_iter()
                        .map(|f| f.is_none_or(|f| f.contains('g')))
                        .collect(),
                };
                Some(sum(s
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let s = *s as i128;
                        // a null replacement makes the row null: nothing produced
                        let Some(Some(r)) = rep.get(i).cloned() else {
                            return 0;
                        };
                        let k = backrefs(&r);
                        let lit = r.len() as i128;
                        let g = global.get(i).copied().unwrap_or(true);
                        if g {
                            s + (s + 1) * lit + k * s
                        } else {
                            s + lit + k * s
                        }
                    })
                    .collect()))
            }
            Growth::Overlay => {
                let (s, t) = (lens(a.first()?, rows), lens(a.get(1)?, rows));
                Some(sum(s
                    .iter()
                    .zip(&t)
                    .map(|(s, t)| *s as i128 + *t as i128)
                    .collect()))
            }
            Growth::Translate => Some(sum(lens(a.first()?, rows)
                .into_iter()
                .map(|s| s as i128 * 4)
                .collect())),
            Growth::Levenshtein => {
                let (x, y) = (lens(a.first()?, rows), lens(a.get(1)?, rows));
                let work = sum(x
                    .iter()
                    .zip(&y)
                    .map(|(x, y)| *x as i128 * *y as i128)
                    .collect());
                // work, not bytes: refused above its own limit, counted as its output
                if work > LEVENSHTEIN_WORK {
                    return Some(u128::MAX);
                }
                Some(rows as u128 * 8)
            }
            Growth::Sum => Some(a.iter().map(|v| arg_bytes(v, rows)).sum()),
            Growth::Encode => Some(sum(lens(a.first()?, rows)
                .into_iter()
                .map(|s| s as i128 * 2 + 4)
                .collect())),
            Growth::Split => Some(sum(lens(a.first()?, rows)
                .into_iter()
                .map(|s| (s as i128 + 1) * 20)
                .collect())),
            Growth::Join => {
                let arr = a.first()?;
                // lens() gives a list's elements × 16
                let elements: Vec<i64> = lens(arr, rows).into_iter().map(|n| n / 16).collect();
                let per = |v: Option<&ColumnarValue>| match v {
                    Some(v) => lens(v, rows),
                    None => vec![0; elements.len()],
                };
                let (sep, null) = (per(a.get(1)), per(a.get(2)));
                // every argument has a value per row; one that does not cannot be bounded
                // (the call is refused, see `invoke_with_args`)
                let glue = elements
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        let extra = sep.get(i)?.max(&0) + null.get(i)?.max(&0);
                        Some(*n as i128 * extra as i128)
                    })
                    .collect::<Option<Vec<i128>>>()?;
                let glue = sum(glue);
                Some(arg_bytes(arr, rows).saturating_mul(3).saturating_add(glue))
            }
            Growth::Scan => Some(0),
        }
    }

    fn refuse(&self, what: String) -> DataFusionError {
        metrics::counter!("atlake_query_functions_refused_total", "function" => self.name().to_string())
            .increment(1);
        DataFusionError::ResourcesExhausted(what)
    }

    /// Calls the function on slices of rows, checking the deadline and the ledger between them.
    fn call_in_slices(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let sliced = rows > SLICE_ROWS
            && args
                .args
                .iter()
                .any(|a| matches!(a, ColumnarValue::Array(_)));
        if !sliced {
            let out = self.inner.invoke_with_args(args)?;
            self.count(&out, rows)?;
            return Ok(out);
        }
        let mut parts: Vec<ArrayRef> = Vec::with_capacity(rows.div_ceil(SLICE_ROWS));
        for offset in (0..rows).step_by(SLICE_ROWS) {
            if let Some(d) = &self.deadline {
                d.check()?;
            }
            let len = SLICE_ROWS.min(rows - offset);
            let part = ScalarFunctionArgs {
                args: args
                    .args
                    .iter()
                    .map(|a| match a {
                        ColumnarValue::Array(a) => ColumnarValue::Array(a.slice(offset, len)),
                        s => s.clone(),
                    })
                    .collect(),
                arg_fields: args.arg_fields.clone(),
                number_rows: len,
                return_field: args.return_field.clone(),
                config_options: args.config_options.clone(),
            };
            let out = self.inner.invoke_with_args(part)?;
            self.count(&out, len)?;
            parts.push(out.into_array(len)?);
        }
        let refs: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
        Ok(ColumnarValue::Array(arrow::compute::concat(&refs)?))
    }

    /// Counts what a call produced; over the budget, the batch fails.
    fn count(&self, out: &ColumnarValue, rows: usize) -> Result<()> {
        charge(out_bytes(out));
        let total = ledger();
        if total > self.budget {
            return Err(self.refuse(format!(
                "{}() and the functions before it produced {} MiB for {rows} rows, more than the {} MiB the functions of one batch may use",
                self.name(),
                total >> 20,
                self.budget >> 20
            )));
        }
        Ok(())
    }
}

impl ScalarUDFImpl for Bounded {
    delegate_to_inner_udf!();

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if let Some(d) = &self.deadline {
            d.check()?;
        }
        let before = ledger() as u128;
        let estimate = self.estimate(&args);
        match estimate {
            Some(bytes) if before.saturating_add(bytes) > self.budget as u128 => {
                return Err(self.refuse(if self.growth == Growth::Levenshtein {
                    format!(
                        "levenshtein() would compare more than {LEVENSHTEIN_WORK} character pairs for {} rows",
                        args.number_rows
                    )
                } else {
                    format!(
                        "{}() would produce about {} MiB for {} rows ({} MiB already produced for this batch), more than the {} MiB the functions of one batch may use",
                        self.name(),
                        bytes >> 20,
                        args.number_rows,
                        before >> 20,
                        self.budget >> 20
                    )
                }));
            }
            Some(_) => {}
            // a series or a join whose size cannot be told is not run: a series can produce
            // billions of elements from three small arguments, a join a separator per element
            None if matches!(self.growth, Growth::Series | Growth::Join) => {
                let hint = if self.growth == Growth::Series {
                    "; cast them to integers, dates or timestamps"
                } else {
                    ""
                };
                return Err(self.refuse(format!(
                    "{}() over these arguments cannot be bounded{hint}",
                    self.name()
                )));
            }
            None => {}
        }
        if is_folding() {
            if estimate.is_none_or(|b| b > FOLD_BYTES as u128) {
                return Err(not_folded(self.name(), estimate));
            }
            let out = self.call_in_slices(args)?;
            let bytes = out_bytes(&out);
            if bytes > FOLD_BYTES {
                return Err(not_folded(self.name(), Some(bytes as u128)));
            }
            return Ok(out);
        }
        self.call_in_slices(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(ctx: &SessionContext, q: &str) -> Result<usize> {
        let b = ctx.sql(q).await?.collect().await?;
        Ok(b.iter().map(|b| b.num_rows()).sum())
    }

    #[test]
    fn an_empty_batch_with_scalar_and_array_arguments_is_estimated_without_panicking() {
        let b = Bounded {
            inner: Arc::new(ScalarUDF::new_from_impl(
                datafusion::functions_nested::range::Range::new(),
            )),
            growth: Growth::Series,
            budget: 1 << 20,
            deadline: None,
        };
        let empty: ArrayRef = Arc::new(Int64Array::from(Vec::<i64>::new()));
        for args in [
            vec![
                ColumnarValue::Array(empty.clone()),
                ColumnarValue::Scalar(datafusion::common::ScalarValue::Int64(Some(10))),
            ],
            vec![
                ColumnarValue::Scalar(datafusion::common::ScalarValue::Int64(Some(0))),
                ColumnarValue::Array(empty.clone()),
                ColumnarValue::Scalar(datafusion::common::ScalarValue::Int64(Some(2))),
            ],
        ] {
            let fields = args
                .iter()
                .map(|_| Arc::new(arrow::datatypes::Field::new("a", DataType::Int64, true)))
                .collect();
            let est = b.estimate(&ScalarFunctionArgs {
                args,
                arg_fields: fields,
                number_rows: 0,
                return_field: Arc::new(arrow::datatypes::Field::new("r", DataType::Int64, true)),
                config_options: Arc::new(Default::default()),
            });
            assert!(est.is_some_and(|bytes| bytes < 1 << 20), "{est:?}");
        }
    }

    #[tokio::test]
    async fn amplifying_calls_over_the_budget_are_refused_and_small_ones_run() {
        let ctx = SessionContext::new();
        register(&ctx, 16 << 20, None).unwrap();
        for q in [
            "SELECT repeat('a', 2000000000)",
            "SELECT lpad('x', 2147483647)",
            "SELECT rpad('x', 100000000, 'yz')",
            "SELECT array_repeat('aaaaaaaaaaaaaaaa', 1000000000)",
            "SELECT range(1, 10000000000)",
            "SELECT generate_series(0, 100000000000, 1)",
            "SELECT replace(repeat('a', 1000), 'a', repeat('b', 100000))",
            "SELECT array_resize([1], 1000000000)",
            // the sum of calls, not each call
            "SELECT concat(repeat('a', 6000000), repeat('a', 6000000), repeat('a', 6000000))",
            "SELECT repeat('a', 6000000) || repeat('a', 6000000) || repeat('a', 6000000)",
            "SELECT regexp_replace(repeat('a', 100000), '', repeat('b', 1000), 'g')",
            "SELECT regexp_replace(repeat('a', 100000), '(a+)', repeat('\\1', 1000))",
            "SELECT concat_ws(repeat('-', 1000000), 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17)",
            "SELECT overlay(repeat('a', 9000000) placing repeat('b', 9000000) from 2)",
            "SELECT translate(repeat('a', 5000000), 'a', 'é')",
            "SELECT levenshtein(repeat('a', 100000), repeat('b', 100000))",
            // timestamps and dates with a tiny step
            "SELECT range(TIMESTAMP '2020-01-01', TIMESTAMP '2020-01-02', INTERVAL '1 nanosecond')",
            "SELECT generate_series(TIMESTAMP '2020-01-01', TIMESTAMP '2020-01-01 00:00:10', INTERVAL '1 microsecond')",
            "SELECT range(DATE '1000-01-01', DATE '9000-01-01', INTERVAL '1 day')",
            "SELECT range(TIMESTAMP '2020-01-01', TIMESTAMP '2020-02-01', INTERVAL '1 month' - INTERVAL '30 days' - INTERVAL '23 hours')",
        ] {
            reset_ledger();
            let e = run(&ctx, q).await.unwrap_err();
            assert!(
                e.to_string().contains("the functions of one batch may use")
                    || e.to_string().contains("character pairs"),
                "{q}: {e}"
            );
        }
        for q in [
            "SELECT repeat('ab', 1000)",
            "SELECT lpad('x', 10, '-')",
            "SELECT replace('hello', 'l', 'L')",
            "SELECT array_repeat(1, 5)",
            "SELECT range(1, 10)",
            "SELECT array_resize([1, 2], 4)",
            "SELECT repeat(CAST(NULL AS VARCHAR), 3)",
            "SELECT concat(repeat('a', 6000000), 'b')",
            "SELECT regexp_replace('hello world', '(\\w+)', '\\1\\1', 'g')",
            "SELECT range(TIMESTAMP '2020-01-01', TIMESTAMP '2020-01-02', INTERVAL '1 hour')",
            "SELECT range(DATE '2020-01-01', DATE '2021-01-01', INTERVAL '1 day')",
            "SELECT translate('abc', 'a', 'x')",
            "SELECT levenshtein('kitten', 'sitting')",
        ] {
            reset_ledger();
            assert_eq!(run(&ctx, q).await.unwrap(), 1, "{q}");
        }
    }

    /// A session planned as the endpoint's: bounded functions, and `||` and `OVERLAY`
    /// planned with them.
    fn bounded_session(budget: u64) -> SessionContext {
        let mut builder = datafusion::execution::SessionStateBuilder::new().with_default_features();
        let syntax = Arc::new(SyntaxPlanner::default());
        builder
            .expr_planners()
            .as_mut()
            .unwrap()
            .insert(0, syntax.clone());
        let ctx = SessionContext::new_with_state(builder.build());
        let concat_op = register(&ctx, budget, None).unwrap();
        syntax.bind(Bound {
            overlay: ctx.udf("overlay").unwrap(),
            concat_op,
            array_concat: ctx.udf("array_concat").unwrap(),
            array_append: ctx.udf("array_append").unwrap(),
            array_prepend: ctx.udf("array_prepend").unwrap(),
        });
        ctx
    }

    #[tokio::test]
    async fn the_concat_operator_and_list_functions_are_bounded() {
        let ctx = bounded_session(16 << 20);
        for q in [
            "WITH t AS (SELECT repeat('a', 6000000) s) SELECT s || s || s FROM t",
            "WITH t AS (SELECT arrow_cast(repeat('a', 6000000), 'Utf8View') s) SELECT s || s || s FROM t",
            "WITH t AS (SELECT arrow_cast(repeat('a', 6000000), 'LargeUtf8') s) SELECT s || 'x' || s || s FROM t",
            "WITH t AS (SELECT [repeat('a', 6000000)] s) SELECT s || s || s FROM t",
            "WITH t AS (SELECT [repeat('a', 6000000)] s) SELECT s || repeat('b', 6000000) || repeat('c', 6000000) FROM t",
            "WITH t AS (SELECT repeat('a', 6000000) s) SELECT make_array(s, s, s) FROM t",
            "WITH t AS (SELECT [repeat('a', 6000000)] s) SELECT array_concat(s, s, s) FROM t",
            "WITH t AS (SELECT [repeat('a', 6000000)] s) SELECT list_cat(s, s, s) FROM t",
            "SELECT array_to_string(range(1000000), repeat('x', 100))",
            "SELECT encode(repeat('a', 9000000), 'hex')",
            "SELECT string_to_array(repeat('a', 1000000), NULL)",
            "SELECT overlay(repeat('a', 9000000) placing repeat('b', 9000000) from 2)",
        ] {
            reset_ledger();
            let e = run(&ctx, q).await.unwrap_err();
            assert!(
                e.to_string().contains("the functions of one batch may use"),
                "{q}: {e}"
            );
        }
        // the operator means what it meant: null when either side is null, values printed
        // next to strings, lists joined, appended and prepended; columns keep their names
        reset_ledger();
        let b = ctx
            .sql(
                "SELECT 'a' || 'b', 'a' || NULL IS NULL AS l, NULL || 'b' IS NULL AS r, 1 || 'x', \
                 arrow_typeof(arrow_cast('a', 'Utf8View') || 'b') AS view, \
                 arrow_typeof(arrow_cast('a', 'LargeUtf8') || 'b') AS large, \
                 [1, 2] || [3], [1] || 2, 0 || [1], X'00' || X'01', \
                 s || '!' FROM (VALUES ('x'), (NULL)) AS v(s)",
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&b)
            .unwrap()
            .to_string();
        for want in [
            "Utf8(\"a\") || Utf8(\"b\")",
            "| ab ",
            "| 1x ",
            "Utf8View",
            "LargeUtf8",
            "[1, 2, 3]",
            "[1, 2]",
            "[0, 1]",
            "0001",
            "v.s || Utf8(\"!\")",
            "| x! ",
        ] {
            assert!(text.contains(want), "{want} not in\n{text}");
        }
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("| ab")).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines.iter().all(|l| l.matches("| true ").count() == 2),
            "{text}"
        );
        // the null row of s: its || is null, not "!"
        assert!(!text.contains("| ! "), "{text}");
        let e = run(&ctx, "SELECT 1 || 2").await.unwrap_err();
        assert!(e.to_string().contains("string concat"), "{e}");
    }

    /// A join whose filter computes with bounded functions counts each evaluation on its
    /// own, whatever the join: the hash join goes through every chunk of candidate pairs of a
    /// probe batch in one poll when its filter passes nothing, and each chunk is far under
    /// the budget while their sum is far over it.
    #[tokio::test]
    async fn every_join_counts_its_filter_per_evaluation() {
        use arrow::array::Int64Array;
        use datafusion::datasource::MemTable;
        let budget = 1 << 20;
        let ctx = bounded_session(budget);
        let table = |rows: usize| {
            let k: ArrayRef = Arc::new(Int64Array::from(vec![1; rows]));
            let s: ArrayRef = Arc::new(StringArray::from(vec!["x".repeat(40); rows]));
            let b = arrow::record_batch::RecordBatch::try_from_iter([("k", k), ("s", s)]).unwrap();
            Arc::new(MemTable::try_new(b.schema(), vec![vec![b]]).unwrap())
        };
        ctx.register_table("a", table(64)).unwrap();
        ctx.register_table("b", table(2048)).unwrap();
        let q = "SELECT count(*) FROM a JOIN b ON a.k = b.k AND length(a.s || b.s) < 0";
        for (prefer_hash, join) in [("true", "HashJoinExec"), ("false", "SortMergeJoinExec")] {
            ctx.sql(&format!(
                "SET datafusion.optimizer.prefer_hash_join = {prefer_hash}"
            ))
            .await
            .unwrap();
            let plan = ctx
                .sql(q)
                .await
                .unwrap()
                .create_physical_plan()
                .await
                .unwrap();
            let shown = datafusion::physical_plan::displayable(plan.as_ref())
                .indent(false)
                .to_string();
            assert!(shown.contains(join), "{shown}");
            let plan = crate::query::deadline::wrap(
                plan,
                crate::query::deadline::Limits {
                    deadline: Instant::now() + Duration::from_secs(60),
                    timeout: Duration::from_secs(60),
                    batch_bytes: budget,
                },
            )
            .unwrap();
            reset_ledger();
            let out = datafusion::physical_plan::collect(plan, ctx.task_ctx())
                .await
                .unwrap_or_else(|e| panic!("{join}: {e}"));
            let n = out[0]
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0);
            assert_eq!(n, 0, "{join}");
        }
        // one evaluation over the budget is still refused
        reset_ledger();
        let e = run(
            &ctx,
            "SELECT count(*) FROM a JOIN b ON a.k = b.k AND length(repeat(a.s, 20000) || b.s) < 0",
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().contains("the functions of one batch may use"),
            "{e}"
        );
    }

    #[test]
    fn a_view_array_counts_the_strings_it_points_to() {
        let big = "a".repeat(1 << 20);
        let views = arrow::array::StringViewArray::from(vec![big.as_str(), "short"]);
        let bytes = logical_bytes(&views.to_data());
        assert!(((1 << 20) + 32..(1 << 20) + 64).contains(&bytes), "{bytes}");
        // a slice counts only its own rows
        let tail = views.slice(1, 1);
        assert!(logical_bytes(&tail.to_data()) < 64);
        let plain = StringArray::from(vec![big.as_str(), "short"]);
        let list = arrow::array::ListArray::from_iter_primitive::<arrow::datatypes::Int64Type, _, _>(
            vec![Some(vec![Some(1); 1000])],
        );
        assert!(logical_bytes(&plain.to_data()) >= (1 << 20) + 5);
        assert!(logical_bytes(&list.to_data()) >= 8000);
    }

    /// While a query is planned, a call is folded into a constant only when its result is
    /// small; a larger one stays a call and is computed when the query runs (the planner
    /// prints constants into column names: a folded `range(1000000)` took seconds to print,
    /// on past the timeout).
    #[tokio::test]
    async fn only_small_results_are_folded_into_constants() {
        let state = datafusion::execution::SessionStateBuilder::new()
            .with_default_features()
            .with_optimizer_rules(crate::query::deadline::logical_rules(
                None,
                Duration::from_secs(60),
            ))
            .build();
        let ctx = SessionContext::new_with_state(state);
        register(&ctx, 1 << 30, None).unwrap();
        let plan = |q: &'static str| {
            let ctx = ctx.clone();
            async move {
                let df = ctx.sql(q).await.unwrap();
                df.into_optimized_plan()
                    .unwrap()
                    .display_indent()
                    .to_string()
            }
        };
        // FOLD_BYTES is 64 KiB: 2 × 32,000 bytes fold, 2 × 33,000 do not
        let small = plan("SELECT length(repeat('ab', 16000)) AS n").await;
        assert!(!small.contains("repeat("), "{small}");
        assert!(small.contains("32000"), "{small}");
        let big = plan("SELECT length(repeat('ab', 33000)) AS n").await;
        assert!(big.contains("repeat("), "{big}");
        let list = plan("SELECT cardinality(range(100)) AS n").await;
        assert!(!list.contains("range("), "{list}");
        let list = plan("SELECT cardinality(range(100000)) AS n").await;
        assert!(list.contains("range("), "{list}");
        // the call left in the plan gives the same answer when the query runs
        let b = ctx
            .sql("SELECT length(repeat('ab', 33000)) AS n, cardinality(range(100000)) AS c")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let n = |i: usize| {
            arrow::compute::cast(b[0].column(i), &DataType::Int64)
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0)
        };
        assert_eq!((n(0), n(1)), (66000, 100000));
        // outside an optimizer rule a call is not folding, and the flag is restored after one
        assert!(!is_folding());
        assert!(folding(is_folding));
        assert!(!is_folding());
        let unwound = std::panic::catch_unwind(|| folding(|| panic!("a rule panicked")));
        assert!(unwound.is_err());
        assert!(!is_folding());
    }

    #[tokio::test]
    async fn a_slow_call_stops_at_the_deadline_between_slices() {
        let ctx = SessionContext::new();
        let d = Deadline {
            at: Instant::now(),
            timeout: Duration::from_millis(1),
        };
        register(&ctx, 1 << 30, Some(d)).unwrap();
        let e = run(
            &ctx,
            "SELECT regexp_like(x, 'a+b') FROM (SELECT repeat('a', 100) AS x FROM range(10000))",
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("timeout"), "{e}");
    }
}
