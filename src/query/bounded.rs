//! Size limits on the scalar functions that can amplify their input.
//!
//! DataFusion's memory pool accounts for what operators buffer (joins, sorts, aggregates), not
//! for the arrays a scalar function returns. `repeat('a', 2000000000)`, `lpad('x', 2147483647)`
//! or `array_repeat(record, 1000000)` each allocate gigabytes in one call, outside the pool and
//! faster than any timeout can fire. These wrappers compute, from the arguments alone, how many
//! bytes a call would produce for the whole batch and refuse the call (a `resources_exhausted`
//! error) when that exceeds the budget; below it they call the original function unchanged.

use arrow::array::{Array, ArrayRef, Int64Array};
use arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl};
use datafusion::prelude::SessionContext;
use std::sync::Arc;

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
    /// `range(start, stop[, step])`, `generate_series`: one element per step.
    Series,
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
];

/// Replaces the amplifying functions of `ctx` with bounded ones: one call may produce at most
/// `budget` bytes for its batch.
///
/// A function that is not in the session is an error: the cap would silently not apply.
pub fn register(ctx: &SessionContext, budget: u64) -> datafusion::error::Result<()> {
    for (name, growth) in FUNCTIONS {
        let inner = ctx.udf(name)?;
        ctx.register_udf(ScalarUDF::new_from_impl(Bounded {
            inner,
            growth: *growth,
            budget,
        }));
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: Arc<ScalarUDF>,
    growth: Growth,
    budget: u64,
}

/// The argument as one Int64 per row (null as 0), if it converts.
fn ints(v: &ColumnarValue, rows: usize) -> Option<Vec<i64>> {
    let a = v.to_array(rows.max(1)).ok()?;
    if !a.data_type().is_integer() && !a.data_type().is_floating() {
        return None;
    }
    let a = arrow::compute::cast(&a, &DataType::Int64).ok()?;
    let a = a.as_any().downcast_ref::<Int64Array>()?;
    Some(
        (0..a.len())
            .map(|i| if a.is_null(i) { 0 } else { a.value(i) })
            .collect(),
    )
}

/// The byte length of each value (strings, binaries, lists: elements × 16); 16 for other types.
fn lens(v: &ColumnarValue, rows: usize) -> Vec<i64> {
    let Ok(a) = v.to_array(rows.max(1)) else {
        return vec![16; rows.max(1)];
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
    match (measured, a.data_type()) {
        (Some(l), DataType::List(_) | DataType::LargeList(_)) => {
            l.into_iter().map(|n| n.saturating_mul(16)).collect()
        }
        (Some(l), _) => l,
        (None, _) => vec![16; a.len()],
    }
}

impl Bounded {
    /// Bytes the call would produce for the batch; `None` when it cannot tell (then it runs).
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
                let v: Vec<Vec<i64>> = a.iter().map(|x| ints(x, rows)).collect::<Option<_>>()?;
                let (start, stop, step) = match v.len() {
                    1 => (None, &v[0], None),
                    2 => (Some(&v[0]), &v[1], None),
                    3 => (Some(&v[0]), &v[1], Some(&v[2])),
                    _ => return None,
                };
                Some(sum((0..stop.len())
                    .map(|i| {
                        // arguments can differ in length (a scalar expands to at least
                        // one row even in an empty batch): missing values count as defaults
                        let at = |v: Option<&Vec<i64>>, d: i64| {
                            v.and_then(|v| v.get(i)).copied().unwrap_or(d) as i128
                        };
                        let (lo, step) = (at(start, 0), at(step, 1));
                        let span = (at(Some(stop), 0) - lo).abs();
                        (span / step.abs().max(1) + 1) * 8
                    })
                    .collect()))
            }
        }
    }
}

impl ScalarUDFImpl for Bounded {
    delegate_to_inner_udf!();

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if let Some(bytes) = self.estimate(&args)
            && bytes > self.budget as u128
        {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "{}() would produce about {} MiB for {} rows, more than the {} MiB one function call may use",
                self.name(),
                bytes >> 20,
                args.number_rows,
                self.budget >> 20
            )));
        }
        self.inner.invoke_with_args(args)
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
        register(&ctx, 16 << 20).unwrap();
        for q in [
            "SELECT repeat('a', 2000000000)",
            "SELECT lpad('x', 2147483647)",
            "SELECT rpad('x', 100000000, 'yz')",
            "SELECT array_repeat('aaaaaaaaaaaaaaaa', 1000000000)",
            "SELECT range(1, 10000000000)",
            "SELECT generate_series(0, 100000000000, 1)",
            "SELECT replace(repeat('a', 1000), 'a', repeat('b', 100000))",
            "SELECT array_resize([1], 1000000000)",
        ] {
            let e = run(&ctx, q).await.unwrap_err();
            assert!(
                e.to_string().contains("one function call may use"),
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
        ] {
            assert_eq!(run(&ctx, q).await.unwrap(), 1, "{q}");
        }
    }
}
