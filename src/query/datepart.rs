//! `date_part` / `extract` without a calendar library for UTC timestamps.
//!
//! Every event has a `time` column (Timestamp µs, UTC), and the most common questions group by
//! its hour, day or month (JSONBench Q3: `extract(hour FROM time)`). DataFusion's `date_part`
//! converts each value through chrono and the time zone, about 30 ns a row; on UTC (or
//! zone-less) timestamps the same fields are integer arithmetic: the hour is
//! `t.div_euclid(1 h).rem_euclid(24)`, the calendar date comes from the day number (the
//! civil-from-days algorithm of the proleptic Gregorian calendar). This wrapper computes
//! `year`, `month`, `day`, `hour` and `minute` that way and hands every other part, type or zone
//! to the original function, so results are the same by construction (a test compares them on
//! random timestamps of every unit).

use arrow::array::{Array, ArrayRef, AsArray, Int32Array, Int64Array};
use arrow::datatypes::{DataType, Int64Type, TimeUnit};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::Transformed;
use datafusion::common::{DFSchema, Result, ScalarValue};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::FunctionRewrite;
use datafusion::logical_expr::{ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl};
use datafusion::prelude::SessionContext;
use std::sync::Arc;

/// Replaces `date_part` (and so `extract`, `datepart`) of `ctx` with the fast one. The SQL
/// planner builds `extract(…)` from DataFusion's own instance rather than the registry, so a
/// function rewrite swaps those calls too.
pub fn register(ctx: &mut SessionContext) -> datafusion::error::Result<()> {
    let inner = ctx.udf("date_part")?;
    let ours = Arc::new(ScalarUDF::new_from_impl(FastDatePart { inner }));
    SessionContext::register_udf(ctx, ours.as_ref().clone());
    ctx.register_function_rewrite(Arc::new(UseFastDatePart { ours }))
}

/// Points every `date_part` call at the fast one.
#[derive(Debug)]
struct UseFastDatePart {
    ours: Arc<ScalarUDF>,
}

impl FunctionRewrite for UseFastDatePart {
    fn name(&self) -> &str {
        "atlake_fast_date_part"
    }
    fn rewrite(
        &self,
        expr: Expr,
        _schema: &DFSchema,
        _config: &ConfigOptions,
    ) -> Result<Transformed<Expr>> {
        match expr {
            Expr::ScalarFunction(f)
                if f.func.name() == "date_part" && !Arc::ptr_eq(&f.func, &self.ours) =>
            {
                Ok(Transformed::yes(Expr::ScalarFunction(
                    ScalarFunction::new_udf(self.ours.clone(), f.args),
                )))
            }
            e => Ok(Transformed::no(e)),
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct FastDatePart {
    inner: Arc<ScalarUDF>,
}

/// The fields computed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Year,
    Month,
    Day,
    Hour,
    Minute,
}

impl Part {
    fn parse(s: &str) -> Option<Part> {
        let s = s
            .strip_prefix(['\'', '"'])
            .and_then(|x| x.strip_suffix(['\'', '"']))
            .unwrap_or(s);
        Some(match s.to_ascii_lowercase().as_str() {
            "year" | "years" => Part::Year,
            "month" | "months" => Part::Month,
            "day" | "days" => Part::Day,
            "hour" | "hours" => Part::Hour,
            "minute" | "minutes" => Part::Minute,
            _ => return None,
        })
    }
}

/// Whether a zone name is UTC (no offset, no daylight saving), spelled as Arrow accepts it.
fn is_utc(tz: Option<&str>) -> bool {
    matches!(
        tz,
        None | Some("UTC" | "+00:00" | "Etc/UTC" | "GMT" | "Etc/GMT")
    )
}

const SECS_PER_DAY: i64 = 86_400;

/// (year, month, day) of a day number counted from 1970-01-01, proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The field of a timestamp `v` in units of `PER_SEC` per second; `None` when the year does
/// not fit an Int32 (the original function then decides).
#[inline]
fn field<const PER_SEC: i64>(part: Part, v: i64) -> Option<i32> {
    let secs = v.div_euclid(PER_SEC);
    let days = secs.div_euclid(SECS_PER_DAY);
    let in_day = secs.rem_euclid(SECS_PER_DAY);
    Some(match part {
        Part::Hour => (in_day / 3_600) as i32,
        Part::Minute => (in_day / 60 % 60) as i32,
        Part::Year => i32::try_from(civil_from_days(days).0).ok()?,
        Part::Month => civil_from_days(days).1 as i32,
        Part::Day => civil_from_days(days).2 as i32,
    })
}

/// The part of every value, with the unit a constant so that each division is a
/// multiplication. The hour and the minute never fail and need no calendar: one division
/// of the raw value each (`⌊v / unit-per-hour⌋ mod 24` is the hour of the day), computed on
/// every slot, nulls included, with the nulls copied over (JSONBench Q3 groups 6M rows by it).
fn fields<const PER_SEC: i64>(part: Part, ints: &Int64Array) -> Option<Int32Array> {
    Some(match part {
        Part::Hour => ints.unary(|v| v.div_euclid(PER_SEC * 3_600).rem_euclid(24) as i32),
        Part::Minute => ints.unary(|v| v.div_euclid(PER_SEC * 60).rem_euclid(60) as i32),
        _ => {
            let out: Vec<i32> = (0..ints.len())
                .map(|i| {
                    if ints.is_null(i) {
                        Some(0)
                    } else {
                        field::<PER_SEC>(part, ints.value(i))
                    }
                })
                .collect::<Option<_>>()?;
            Int32Array::new(out.into(), ints.nulls().cloned())
        }
    })
}

/// The part as one value when every value of the array lies in the same unit of it (the same
/// hour for `hour`, the same day for `day`, `month` and `year`): a file of the lake lies within
/// one hour, so its batches give one hour, and a GROUP BY on it needs no array of the batch's
/// length. `None` when a value is null, the array is empty or the values span two units.
fn constant<const PER_SEC: i64>(part: Part, ints: &Int64Array) -> Option<i32> {
    if ints.is_empty() || ints.null_count() != 0 {
        return None;
    }
    let (lo, hi) = (arrow::compute::min(ints)?, arrow::compute::max(ints)?);
    let unit = match part {
        Part::Minute => PER_SEC * 60,
        Part::Hour => PER_SEC * 3_600,
        Part::Day | Part::Month | Part::Year => PER_SEC * SECS_PER_DAY,
    };
    if lo.div_euclid(unit) != hi.div_euclid(unit) {
        return None;
    }
    field::<PER_SEC>(part, lo)
}

/// The part of every value, or of all of them at once ([`constant`]).
fn part_of<const PER_SEC: i64>(part: Part, ints: &Int64Array) -> Option<ColumnarValue> {
    if let Some(v) = constant::<PER_SEC>(part, ints) {
        return Some(ColumnarValue::Scalar(ScalarValue::Int32(Some(v))));
    }
    let out: ArrayRef = Arc::new(fields::<PER_SEC>(part, ints)?);
    Some(ColumnarValue::Array(out))
}

/// The part for every value of a UTC timestamp array; `None` to fall back.
fn fast(part: Part, a: &dyn Array) -> Option<ColumnarValue> {
    let DataType::Timestamp(unit, tz) = a.data_type() else {
        return None;
    };
    if !is_utc(tz.as_deref()) {
        return None;
    }
    // timestamps are Int64 underneath: the cast reinterprets the buffer without copying
    let ints = arrow::compute::cast(a, &DataType::Int64).ok()?;
    let ints = ints.as_primitive::<Int64Type>();
    match unit {
        TimeUnit::Second => part_of::<1>(part, ints),
        TimeUnit::Millisecond => part_of::<1_000>(part, ints),
        TimeUnit::Microsecond => part_of::<1_000_000>(part, ints),
        TimeUnit::Nanosecond => part_of::<1_000_000_000>(part, ints),
    }
}

impl ScalarUDFImpl for FastDatePart {
    delegate_to_inner_udf!();

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let part = match args.args.first() {
            Some(ColumnarValue::Scalar(ScalarValue::Utf8(Some(p))))
            | Some(ColumnarValue::Scalar(ScalarValue::Utf8View(Some(p)))) => Part::parse(p),
            _ => None,
        };
        if let (Some(part), Some(ColumnarValue::Array(a))) = (part, args.args.get(1))
            && let Some(out) = fast(part, a.as_ref())
        {
            return Ok(out);
        }
        self.inner.invoke_with_args(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        Int32Array, TimestampMicrosecondArray, TimestampMillisecondArray, TimestampNanosecondArray,
        TimestampSecondArray,
    };

    fn random_values(n: usize, range: i64) -> Vec<Option<i64>> {
        // the simulator's deterministic generator: reproducible without a dependency
        let mut rng = crate::simulate::traffic::Rng::new(0x9e37_79b9_7f4a_7c15);
        (0..n)
            .map(|i| (i % 17 != 0).then(|| ((rng.next_u64() >> 1) as i64) % range))
            .collect()
    }

    #[test]
    fn same_answers_as_datafusion_on_random_utc_timestamps() {
        let ctx = SessionContext::new();
        let original = ctx.udf("date_part").unwrap();
        // ±3000 years in µs and ns (ns only reach 1677-2262)
        let us = random_values(20_000, 95_000_000_000_000_000);
        let ns = random_values(20_000, 9_000_000_000_000_000_000);
        let arrays: Vec<ArrayRef> = vec![
            Arc::new(TimestampMicrosecondArray::from(us.clone()).with_timezone("UTC")),
            Arc::new(TimestampMicrosecondArray::from(us.clone())),
            Arc::new(TimestampMicrosecondArray::from(us).with_timezone("+00:00")),
            Arc::new(TimestampNanosecondArray::from(ns).with_timezone("UTC")),
            Arc::new(TimestampSecondArray::from(random_values(
                20_000,
                95_000_000_000,
            ))),
            Arc::new(
                TimestampMillisecondArray::from(random_values(20_000, 95_000_000_000_000))
                    .with_timezone("Etc/UTC"),
            ),
        ];
        for a in arrays {
            for p in ["year", "month", "day", "hour", "minute", "'hour'", "HOURS"] {
                let part = Part::parse(p).unwrap();
                let ours = fast(part, a.as_ref()).unwrap().into_array(a.len()).unwrap();
                let theirs = datafusion_s(&original, p, &a);
                let ours = ours.as_any().downcast_ref::<Int32Array>().unwrap();
                let theirs = theirs.as_any().downcast_ref::<Int32Array>().unwrap();
                assert_eq!(ours, theirs, "{p} on {}", a.data_type());
            }
        }
    }

    /// DataFusion's own `date_part` of every value of `a`.
    fn datafusion_s(original: &Arc<ScalarUDF>, p: &str, a: &ArrayRef) -> ArrayRef {
        let arg_fields = vec![
            Arc::new(arrow::datatypes::Field::new("p", DataType::Utf8, false)),
            Arc::new(arrow::datatypes::Field::new(
                "t",
                a.data_type().clone(),
                true,
            )),
        ];
        original
            .invoke_with_args(ScalarFunctionArgs {
                args: vec![
                    ColumnarValue::Scalar(ScalarValue::Utf8(Some(p.into()))),
                    ColumnarValue::Array(a.clone()),
                ],
                arg_fields,
                number_rows: a.len(),
                return_field: Arc::new(arrow::datatypes::Field::new("r", DataType::Int32, true)),
                config_options: Arc::new(Default::default()),
            })
            .unwrap()
            .into_array(a.len())
            .unwrap()
    }

    #[test]
    fn values_within_one_unit_give_one_value_and_the_same_answer() {
        const HOUR: i64 = 3_600_000_000;
        let ctx = SessionContext::new();
        let original = ctx.udf("date_part").unwrap();
        let mut rng = crate::simulate::traffic::Rng::new(7);
        // hours after and before 1970 (a negative hour is where a truncating division errs)
        for h in [494_215_i64, 0, -1, -493_000, 17] {
            let start = h * HOUR;
            let within: Vec<i64> = (0..500)
                .map(|_| start + (rng.next_u64() % HOUR as u64) as i64)
                .chain([start, start + HOUR - 1])
                .collect();
            let one: ArrayRef =
                Arc::new(TimestampMicrosecondArray::from(within.clone()).with_timezone("UTC"));
            for p in ["hour", "day", "month", "year"] {
                let ours = fast(Part::parse(p).unwrap(), one.as_ref()).unwrap();
                assert!(
                    matches!(ours, ColumnarValue::Scalar(ScalarValue::Int32(Some(_)))),
                    "{p} of one hour {h} is one value"
                );
                assert_eq!(
                    ours.into_array(one.len()).unwrap().as_ref(),
                    datafusion_s(&original, p, &one).as_ref(),
                    "{p} of hour {h}"
                );
            }
            // one µs into the next hour, or a null: an array, with the same answers
            let mut across = within.clone();
            across.push(start + HOUR);
            let with_null: Vec<Option<i64>> =
                within.iter().map(|&v| Some(v)).chain([None]).collect();
            let others: [ArrayRef; 2] = [
                Arc::new(TimestampMicrosecondArray::from(across).with_timezone("UTC")),
                Arc::new(TimestampMicrosecondArray::from(with_null)),
            ];
            for a in others {
                let ours = fast(Part::Hour, a.as_ref()).unwrap();
                let ColumnarValue::Array(ours) = ours else {
                    panic!("hour {h}: values across two hours, or with a null, are not one value");
                };
                assert_eq!(ours.as_ref(), datafusion_s(&original, "hour", &a).as_ref());
            }
            // the minute of values within one hour still differs
            let ours = fast(Part::Minute, one.as_ref()).unwrap();
            assert!(
                matches!(ours, ColumnarValue::Array(_)),
                "minutes of hour {h}"
            );
        }
        // within one minute: one minute
        let m: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![
            60_000_000 * 5,
            60_000_000 * 6 - 1,
        ]));
        assert!(matches!(
            fast(Part::Minute, m.as_ref()),
            Some(ColumnarValue::Scalar(ScalarValue::Int32(Some(5))))
        ));
    }

    #[test]
    fn other_zones_and_parts_fall_back() {
        let a = TimestampMicrosecondArray::from(vec![Some(0)]).with_timezone("Europe/Paris");
        assert!(fast(Part::Hour, &a).is_none());
        assert!(Part::parse("dow").is_none());
        assert!(Part::parse("epoch").is_none());
    }

    #[tokio::test]
    async fn sql_answers_equal_datafusion_s_own() {
        let q = "SELECT extract(hour FROM t) AS h, date_part('day', t) AS d, \
                 extract(month FROM t) AS m, extract(year FROM t) AS y, extract(minute FROM t) AS mi, \
                 extract(hour FROM t AT TIME ZONE 'Asia/Kolkata') AS kolkata_h, \
                 extract(dow FROM t) AS dow, extract(second FROM t) AS s \
                 FROM (SELECT arrow_cast(column1, 'Timestamp(Microsecond, Some(\"UTC\"))') AS t \
                       FROM (VALUES (TIMESTAMP '2026-11-29 23:59:59.5'), (TIMESTAMP '1969-12-31 23:30:00'), \
                                    (TIMESTAMP '2024-02-29 05:06:07'), (NULL)))";
        let mut out = Vec::new();
        for fast in [true, false] {
            let mut ctx = SessionContext::new();
            if fast {
                register(&mut ctx).unwrap();
            }
            let b = ctx.sql(q).await.unwrap().collect().await.unwrap();
            out.push(
                arrow::util::pretty::pretty_format_batches(&b)
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(out[0], out[1]);
        // `extract` is planned from DataFusion's own instance: the rewrite must swap it
        use datafusion::common::tree_node::TreeNode;
        let mut ctx = SessionContext::new();
        register(&mut ctx).unwrap();
        let plan = ctx
            .sql("SELECT extract(hour FROM t) FROM (VALUES (TIMESTAMP '2026-01-01 10:00:00')) AS v(t)")
            .await
            .unwrap()
            .into_optimized_plan()
            .unwrap();
        let mut found = false;
        plan.apply_expressions(|e| {
            e.apply(|e| {
                if let Expr::ScalarFunction(f) = e {
                    found |= (f.func.inner().as_ref() as &dyn std::any::Any).is::<FastDatePart>();
                }
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            })
        })
        .unwrap();
        assert!(found, "{plan}");
        assert!(
            out[0].contains("| 23 | 29 | 11 | 2026 | 59 | 5         |"),
            "{}",
            out[0]
        );
    }
}
