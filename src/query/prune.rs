//! Partition pruning: which of a table's files a query's filters can possibly match, decided
//! from the partition alone (collection, kind, hour), before any file is opened.
//!
//! A filter on `collection` keeps only that collection's directory (and `_other`, which holds
//! the long tail), a filter on `kind` keeps only the matching partitions, and a range on
//! `time`/`time_us` keeps only the hours it touches (every row's `time_us` lies within its
//! partition's hour). Filters it does not understand keep everything: pruning only ever
//! removes files that cannot match.

use crate::sink::partition::{LakeFile, PartitionName};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};

/// What a query's filters say about partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruning {
    /// Collections a row may have (`None`: any).
    collections: Option<Vec<String>>,
    /// Kinds a row may have (`None`: any).
    kinds: Option<Vec<String>>,
    /// The time range a row may be in, µs, inclusive.
    lo: i64,
    hi: i64,
}

impl Pruning {
    /// The pruning the conjunction of `filters` allows.
    pub fn from_filters(filters: &[Expr]) -> Pruning {
        let (mut colls, mut kinds) = (None, None);
        let (mut lo, mut hi) = (i64::MIN, i64::MAX);
        for f in filters {
            for e in split_and(f) {
                analyze(e, &mut colls, &mut kinds, &mut lo, &mut hi);
            }
        }
        Pruning {
            collections: colls,
            kinds,
            lo,
            hi,
        }
    }

    /// Whether file `f` may hold a matching row.
    pub fn keeps(&self, f: &LakeFile) -> bool {
        let name = &f.key.name;
        let coll_ok = match &self.collections {
            None => true,
            Some(cs) => match name {
                PartitionName::Collection(c) => cs.iter().any(|x| x == c),
                PartitionName::Other => cs.iter().any(|x| !x.starts_with('_')),
                _ => false,
            },
        };
        let kind_ok = match &self.kinds {
            None => true,
            Some(ks) => ks.iter().any(|k| match k.as_str() {
                "commit" => matches!(name, PartitionName::Collection(_) | PartitionName::Other),
                "identity" => *name == PartitionName::Identity,
                "account" => *name == PartitionName::Account,
                "sync" => *name == PartitionName::Sync,
                _ => false,
            }),
        };
        let (start, end) = (f.key.start_us(), f.key.end_us() - 1);
        coll_ok && kind_ok && end >= self.lo && start <= self.hi
    }
}

pub(crate) fn split_and(e: &Expr) -> Vec<&Expr> {
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

pub(crate) fn col_name(e: &Expr) -> Option<&str> {
    match e {
        Expr::Column(c) => Some(c.name.as_str()),
        Expr::Cast(c) => col_name(&c.expr),
        Expr::TryCast(c) => col_name(&c.expr),
        _ => None,
    }
}

pub(crate) fn lit_str(e: &Expr) -> Option<String> {
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

pub(crate) fn lit_us(e: &Expr) -> Option<i64> {
    match e {
        Expr::Literal(v, _) => match v {
            ScalarValue::Int64(Some(x)) => Some(*x),
            ScalarValue::Int32(Some(x)) => Some(i64::from(*x)),
            ScalarValue::TimestampMicrosecond(Some(x), _) => Some(*x),
            ScalarValue::TimestampMillisecond(Some(x), _) => x.checked_mul(1000),
            ScalarValue::TimestampSecond(Some(x), _) => x.checked_mul(1_000_000),
            ScalarValue::TimestampNanosecond(Some(x), _) => Some(x / 1000),
            ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
                crate::syntax::parse_datetime_us(s).ok()
            }
            _ => None,
        },
        Expr::Cast(c) => lit_us(&c.expr),
        _ => None,
    }
}

/// `col = 'a' OR col = 'b' OR …` on one column: the column and the values.
fn or_of_equalities(e: &Expr) -> Option<(String, Vec<String>)> {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Or,
            right,
        }) => {
            let (c1, mut v1) = or_of_equalities(left)?;
            let (c2, v2) = or_of_equalities(right)?;
            if c1 != c2 {
                return None;
            }
            v1.extend(v2);
            Some((c1, v1))
        }
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => match (col_name(left), col_name(right)) {
            (Some(c), None) => Some((c.to_string(), vec![lit_str(right)?])),
            (None, Some(c)) => Some((c.to_string(), vec![lit_str(left)?])),
            _ => None,
        },
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
        // `c = 'a' OR c = 'b' …` (how IN lists often arrive)
        Expr::BinaryExpr(BinaryExpr {
            op: Operator::Or, ..
        }) => {
            if let Some((c, vals)) = or_of_equalities(e) {
                match c.as_str() {
                    "collection" => set(colls, vals),
                    "kind" => set(kinds, vals),
                    _ => {}
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Cursor;
    use crate::sink::partition::{FileName, HOUR_US, PartitionKey};
    use datafusion::prelude::{col, lit};

    const H: i64 = 495_326; // 2026-07-04T14

    fn file(name: PartitionName, hour: i64) -> LakeFile {
        let key = PartitionKey::at_hour(name, hour).unwrap();
        let c = Cursor::seq(1).unwrap();
        let n = FileName::try_new(c, c, 0).unwrap();
        LakeFile {
            path: format!("{}/{}", key.dir(), n.render()),
            key,
            name: n,
            size: 1,
            rows: None,
        }
    }

    fn lake() -> Vec<LakeFile> {
        vec![
            file(PartitionName::Collection("app.bsky.feed.post".into()), H),
            file(
                PartitionName::Collection("app.bsky.feed.like".into()),
                H + 1,
            ),
            file(PartitionName::Other, H),
            file(PartitionName::Identity, H),
            file(PartitionName::Account, H + 1),
        ]
    }

    /// The partitions (value, hour offset) `filters` keep.
    fn kept(filters: &[Expr]) -> Vec<(String, i64)> {
        let p = Pruning::from_filters(filters);
        lake()
            .iter()
            .filter(|f| p.keeps(f))
            .map(|f| (f.key.name.value().to_string(), f.key.hour() - H))
            .collect()
    }

    fn names(v: &[(&str, i64)]) -> Vec<(String, i64)> {
        v.iter().map(|(n, h)| (n.to_string(), *h)).collect()
    }

    #[test]
    fn a_collection_keeps_its_directory_and_the_long_tail() {
        let f = col("collection").eq(lit("app.bsky.feed.post"));
        assert_eq!(
            kept(&[f]),
            names(&[("app.bsky.feed.post", 0), ("_other", 0)])
        );
        let f = col("collection").in_list(vec![lit("app.bsky.feed.like"), lit("x.y.z")], false);
        assert_eq!(
            kept(&[f]),
            names(&[("app.bsky.feed.like", 1), ("_other", 0)])
        );
        // two filters intersect: no row is in both collections
        let both = [
            col("collection").eq(lit("app.bsky.feed.post")),
            col("collection").eq(lit("app.bsky.feed.like")),
        ];
        assert_eq!(kept(&both), names(&[]));
    }

    #[test]
    fn a_kind_keeps_its_partitions() {
        assert_eq!(
            kept(&[col("kind").eq(lit("identity"))]),
            names(&[("_identity", 0)])
        );
        let or = col("kind")
            .eq(lit("account"))
            .or(col("kind").eq(lit("identity")));
        assert_eq!(kept(&[or]), names(&[("_identity", 0), ("_account", 1)]));
        assert_eq!(kept(&[col("kind").eq(lit("commit"))]).len(), 3);
    }

    #[test]
    fn a_time_range_keeps_the_hours_it_touches() {
        let next = (H + 1) * HOUR_US;
        assert_eq!(
            kept(&[col("time_us").gt_eq(lit(next))]),
            names(&[("app.bsky.feed.like", 1), ("_account", 1)])
        );
        // literal on the left: the operator turns around (bounds are inclusive: a strict
        // bound keeps its boundary hour, which can only keep more, never less)
        assert_eq!(kept(&[lit(next - 1).gt_eq(col("time_us"))]).len(), 3);
        assert_eq!(kept(&[lit(next).gt(col("time_us"))]).len(), 5);
        assert_eq!(
            kept(&[col("time_us").between(lit(next), lit(next + 5))]).len(),
            2
        );
        assert_eq!(kept(&[col("time_us").eq(lit(next - 1))]).len(), 3);
        assert_eq!(
            kept(&[col("time").gt_eq(lit("2026-07-04T15:00:00Z"))]).len(),
            2
        );
    }

    #[test]
    fn filters_it_does_not_understand_keep_everything() {
        let all = lake().len();
        assert_eq!(kept(&[]).len(), all);
        assert_eq!(kept(&[col("did").eq(lit("did:plc:x"))]).len(), all);
        assert_eq!(kept(&[!col("collection").eq(lit("a.b.c"))]).len(), all);
        let mixed = col("collection")
            .eq(lit("app.bsky.feed.post"))
            .or(col("kind").eq(lit("identity")));
        assert_eq!(kept(&[mixed]).len(), all);
    }
}
