//! `count(DISTINCT s)` per group on strings, with most rows answered by comparing 16 bytes.
//!
//! DataFusion counts distinct strings with one set per group: every row hashes its bytes and,
//! when the value was seen before (most rows: a DID repeats across a user's events), compares
//! them with the stored copy. Strings are read from our files as views, and a view is 16 bytes
//! that say the length, the first four bytes, and where the rest lives (buffer and offset);
//! strings of 12 bytes or fewer live in the view itself. The Parquet reader decodes a
//! dictionary-encoded column (every `did`, `collection`, `operation` column of the lake) by
//! copying the dictionary entry's view to each row, so within one batch the rows of one value
//! carry the *same* 16 bytes. Two equal views always mean equal strings (the same bytes of the
//! same buffers, or the same inline bytes); unequal views may still be equal strings, and go on
//! to the exact set. So each batch first drops the rows whose view it has already seen, with a
//! hash of 16 bytes, and only the first row of each view reaches the string set: on the
//! JSONBench lake a batch of 8,192 `did`s holds about 2,000 distinct views.
//!
//! Most strings counted this way are `did:plc` identifiers: `did:plc:` and 24 characters of
//! base32, 120 bits. Those are packed into one number each and counted in a set of numbers
//! (16 bytes a value, hashed and compared as one integer, with no second read of the string's
//! bytes); every other string goes to the string set. Which set a string goes to depends on its
//! bytes alone, so the two sets never hold the same string and the count is their sum. A set
//! of numbers that outgrows the caches is cut into parts that fit them ([`KeySet`]).
//!
//! An optimizer rule puts this aggregate in place of `count(DISTINCT x)` when `x` is a string
//! view and the aggregate has a GROUP BY (without one, DataFusion's own rewrite into a grouped
//! plan spreads the work over every core and can spill). The result keeps the original name.

use arrow::array::{Array, ArrayRef, AsArray, FixedSizeBinaryArray, UInt32Array};
use arrow::buffer::Buffer;
use arrow::compute::take;
use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::tree_node::Transformed;
use datafusion::common::utils::SingleRowListArrayBuilder;
use datafusion::common::{HashSet, Result, ScalarValue};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, Aggregate, AggregateUDF, AggregateUDFImpl, Expr, ExprSchemable, LogicalPlan,
    Signature, Volatility,
};
use datafusion::optimizer::optimizer::ApplyOrder;
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};
use datafusion::physical_expr_common::binary_map::OutputType;
use datafusion::physical_expr_common::binary_view_map::ArrowBytesViewSet;
use datafusion::prelude::SessionContext;
use std::sync::Arc;

/// Adds the rule that uses the view-aware distinct count in grouped aggregates.
pub fn register(ctx: &SessionContext) {
    ctx.add_optimizer_rule(Arc::new(UseViewDistinct {
        udaf: Arc::new(AggregateUDF::new_from_impl(CountDistinctViews::new())),
    }));
}

/// Replaces `count(DISTINCT x)` (string view `x`, no FILTER or ORDER BY) in aggregates that
/// have a GROUP BY.
#[derive(Debug)]
struct UseViewDistinct {
    udaf: Arc<AggregateUDF>,
}

impl OptimizerRule for UseViewDistinct {
    fn name(&self) -> &str {
        "atlake_count_distinct_views"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let LogicalPlan::Aggregate(agg) = plan else {
            return Ok(Transformed::no(plan));
        };
        if agg.group_expr.is_empty() {
            return Ok(Transformed::no(LogicalPlan::Aggregate(agg)));
        }
        let input = agg.input.schema();
        let mut changed = false;
        let mut aggr = Vec::with_capacity(agg.aggr_expr.len());
        for e in &agg.aggr_expr {
            match self.replace(e, input) {
                Some(r) => {
                    changed = true;
                    aggr.push(r);
                }
                None => aggr.push(e.clone()),
            }
        }
        if !changed {
            return Ok(Transformed::no(LogicalPlan::Aggregate(agg)));
        }
        let new = Aggregate::try_new(agg.input.clone(), agg.group_expr.clone(), aggr)?;
        Ok(Transformed::yes(LogicalPlan::Aggregate(new)))
    }
}

impl UseViewDistinct {
    fn replace(&self, e: &Expr, input: &datafusion::common::DFSchema) -> Option<Expr> {
        let inner = match e {
            Expr::Alias(a) => a.expr.as_ref(),
            other => other,
        };
        let Expr::AggregateFunction(f) = inner else {
            return None;
        };
        let p = &f.params;
        let plain = f.func.name() == "count"
            && p.distinct
            && p.args.len() == 1
            && p.filter.is_none()
            && p.order_by.is_empty()
            && p.null_treatment.is_none();
        if !plain || p.args[0].get_type(input).ok()? != DataType::Utf8View {
            return None;
        }
        let name = e.schema_name().to_string();
        let call = Expr::AggregateFunction(AggregateFunction::new_udf(
            self.udaf.clone(),
            p.args.clone(),
            false,
            None,
            vec![],
            None,
        ));
        Some(call.alias(name))
    }
}

/// `count(DISTINCT x)` of string views, as a plain (non-DISTINCT) aggregate.
#[derive(Debug, PartialEq, Eq, Hash)]
struct CountDistinctViews {
    signature: Signature,
}

impl CountDistinctViews {
    fn new() -> Self {
        CountDistinctViews {
            signature: Signature::exact(vec![DataType::Utf8View], Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for CountDistinctViews {
    fn name(&self) -> &str {
        "atlake_count_distinct"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new_list(
                format_state_name(args.name, "count distinct"),
                Field::new_list_field(DataType::Utf8View, true),
                false,
            )),
            Arc::new(Field::new_list(
                format_state_name(args.name, "count distinct plc"),
                Field::new_list_field(DataType::FixedSizeBinary(PLC_BYTES), true),
                false,
            )),
        ])
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(ViewDistinct::default()))
    }

    fn default_value(&self, _data_type: &DataType) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(Some(0)))
    }
}

/// The distinct strings of one group.
#[derive(Debug)]
struct ViewDistinct {
    /// Every distinct non-null string seen that is not a `did:plc` identifier.
    set: ArrowBytesViewSet,
    /// Every distinct `did:plc` identifier seen, packed by [`plc_key`].
    plcs: KeySet,
    /// Views already sent to `set`. A long view means something only with its buffer, so
    /// they are kept across batches only while batches point into one and the same buffer
    /// (`held`: a column chunk's dictionary, decoded once by the reader, serves all its
    /// batches), and forgotten when the buffer changes.
    seen: HashSet<u128>,
    held: Option<Buffer>,
    /// Rows of the current batch whose view is new.
    firsts: Vec<u32>,
    /// Those of `firsts` that are not `did:plc` identifiers.
    others: Vec<u32>,
    /// In the final phase, the first partial state while it is the only one: a partial
    /// state is the two sets' contents (strings and packed identifiers, distinct already
    /// and disjoint), so a group that receives one state (its files were all read by one
    /// partition, `colocate`) is counted by its lengths, without a set. A second state sends
    /// it to the sets.
    lone: Option<(ArrayRef, ArrayRef)>,
    /// The bytes `lone` stands for: its views and the long strings they point to. (Its
    /// buffers are those of the whole batch of states, shared by every group's slice, so
    /// their capacity would count each batch once per group.)
    lone_bytes: usize,
}

impl Default for ViewDistinct {
    fn default() -> Self {
        ViewDistinct {
            set: ArrowBytesViewSet::new(OutputType::Utf8View),
            plcs: KeySet::default(),
            seen: HashSet::default(),
            held: None,
            firsts: Vec::new(),
            others: Vec::new(),
            lone: None,
            lone_bytes: 0,
        }
    }
}

impl ViewDistinct {
    /// The lone state, if any, into the sets.
    fn settle(&mut self) -> Result<()> {
        self.lone_bytes = 0;
        if let Some((strings, keys)) = self.lone.take() {
            self.set.insert(&strings);
            self.insert_keys(&keys)?;
        }
        Ok(())
    }

    /// Packed identifiers of a partial state into `plcs`.
    fn insert_keys(&mut self, keys: &ArrayRef) -> Result<()> {
        let Some(keys) = keys
            .as_fixed_size_binary_opt()
            .filter(|k| k.value_length() == PLC_BYTES)
        else {
            return datafusion::common::internal_err!(
                "atlake_count_distinct state holds {}, not packed identifiers",
                keys.data_type()
            );
        };
        for k in keys.iter().flatten() {
            let Ok(bytes) = <[u8; 16]>::try_from(k) else {
                return datafusion::common::internal_err!("a packed identifier is not 16 bytes");
            };
            self.plcs.insert(i128::from_ne_bytes(bytes));
        }
        Ok(())
    }
}

/// A set of packed identifiers that stays quick when it outgrows the processor's caches.
///
/// A group of a big collection counts hundreds of thousands of identifiers (the like
/// collection of the 10M-event lake: 512,509), and nearly every row of it is new to its
/// column chunk, so it probes the set: one cache miss a row once the set is larger than the
/// cache. Past [`KeySet::SPLIT`] keys the set is cut into [`KeySet::PARTS`] sets by a hash of
/// the key, each a few thousand keys that stay in cache, and keys wait in a short list per part
/// (appended in order, cheap) until the list is full and goes into its part's set in one run.
/// A key goes to the same part every time, so the parts never share a key and the count is
/// the sum of theirs.
#[derive(Debug, Default)]
struct KeySet {
    /// While small: the keys.
    small: HashSet<i128>,
    /// Once split: the parts (empty while small).
    parts: Vec<HashSet<i128>>,
    /// Keys on their way to each part, possibly repeated.
    pending: Vec<Vec<i128>>,
}

impl KeySet {
    /// Keys the set holds before it is split.
    const SPLIT: usize = 1 << 15;
    /// Parts of a split set.
    const PARTS: usize = 256;
    /// Keys that wait for a part before they go in.
    const PENDING: usize = 256;

    /// The part of `k`: the top byte of a multiplicative hash of both halves.
    fn part(k: i128) -> usize {
        let mixed = (k as u64 ^ (k >> 64) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (mixed >> 56) as usize
    }

    fn insert(&mut self, k: i128) {
        if self.parts.is_empty() {
            self.small.insert(k);
            if self.small.len() > Self::SPLIT {
                self.split();
            }
            return;
        }
        let p = Self::part(k);
        self.pending[p].push(k);
        if self.pending[p].len() >= Self::PENDING {
            self.flush(p);
        }
    }

    fn split(&mut self) {
        self.parts = (0..Self::PARTS).map(|_| HashSet::default()).collect();
        self.pending = (0..Self::PARTS)
            .map(|_| Vec::with_capacity(Self::PENDING))
            .collect();
        for k in std::mem::take(&mut self.small) {
            self.parts[Self::part(k)].insert(k);
        }
    }

    fn flush(&mut self, p: usize) {
        let part = &mut self.parts[p];
        for k in self.pending[p].drain(..) {
            part.insert(k);
        }
    }

    fn flush_all(&mut self) {
        for p in 0..self.pending.len() {
            self.flush(p);
        }
    }

    /// Distinct keys inserted.
    fn len(&mut self) -> usize {
        self.flush_all();
        self.small.len() + self.parts.iter().map(HashSet::len).sum::<usize>()
    }

    fn is_empty(&self) -> bool {
        self.small.is_empty() && self.parts.is_empty()
    }

    /// The distinct keys, each once (`len` sends the waiting ones to their parts first).
    fn into_keys(mut self) -> Vec<i128> {
        let mut keys = Vec::with_capacity(self.len());
        keys.extend(self.small);
        for part in self.parts {
            keys.extend(part);
        }
        keys
    }

    /// Bytes held.
    fn size(&self) -> usize {
        let entry = std::mem::size_of::<i128>() + 1;
        self.small.capacity() * entry
            + self
                .parts
                .iter()
                .map(|p| p.capacity() * entry)
                .sum::<usize>()
            + self.parts.capacity() * std::mem::size_of::<HashSet<i128>>()
            + self
                .pending
                .iter()
                .map(|v| v.capacity() * std::mem::size_of::<i128>())
                .sum::<usize>()
            + self.pending.capacity() * std::mem::size_of::<Vec<i128>>()
    }
}

/// Bytes of a packed `did:plc` identifier in a partial state.
const PLC_BYTES: i32 = 16;

/// A `did:plc` identifier as a number ([`crate::syntax::plc_value`]: 120 bits, one to one);
/// any other string: `None`. (Below 2^120, so the cast keeps every bit.)
fn plc_key(s: &[u8]) -> Option<i128> {
    crate::syntax::plc_value(s).map(|v| v as i128)
}

/// Packed identifiers as a partial state's array.
fn keys_array(keys: Vec<i128>) -> Result<ArrayRef> {
    Ok(Arc::new(FixedSizeBinaryArray::try_new(
        PLC_BYTES,
        Buffer::from_vec(keys),
        None,
    )?))
}

impl Accumulator for ViewDistinct {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let Some(array) = values.first() else {
            return Ok(());
        };
        self.settle()?;
        let Some(views) = array.as_string_view_opt() else {
            return datafusion::common::internal_err!(
                "atlake_count_distinct expects Utf8View, got {}",
                array.data_type()
            );
        };
        if views.len() > u32::MAX as usize {
            // row numbers are u32: in slices (which share the buffers, so views stay good)
            let step = u32::MAX as usize;
            for start in (0..views.len()).step_by(step) {
                let part = array.slice(start, step.min(views.len() - start));
                self.update_batch(&[part])?;
            }
            return Ok(());
        }
        // the views of the previous batches still mean the same bytes only if this batch
        // points into the same single buffer
        let same = match (views.data_buffers(), &self.held) {
            ([b], Some(h)) => b.as_ptr() == h.as_ptr() && b.len() == h.len(),
            ([], _) => true,
            _ => false,
        };
        if !same {
            self.seen.clear();
            self.held = match views.data_buffers() {
                [b] => Some(b.clone()),
                _ => None,
            };
            if self.seen.capacity() > 1 << 16 {
                self.seen = HashSet::default();
            }
        }
        self.firsts.clear();
        let nulls = views.nulls();
        for (i, &v) in views.views().iter().enumerate() {
            if nulls.is_some_and(|n| n.is_null(i)) {
                continue;
            }
            if self.seen.insert(v) {
                self.firsts.push(i as u32);
            }
        }
        if self.held.is_none() && views.data_buffers().len() > 1 {
            // several buffers: the keys were good for this batch only
            self.seen.clear();
        }
        self.others.clear();
        for &i in &self.firsts {
            match plc_key(views.value(i as usize).as_bytes()) {
                Some(k) => {
                    self.plcs.insert(k);
                }
                None => self.others.push(i),
            }
        }
        if self.others.len() == views.len() {
            self.set.insert(array);
        } else if !self.others.is_empty() {
            let rows = UInt32Array::from_iter_values(self.others.iter().copied());
            self.set.insert(&take(array.as_ref(), &rows, None)?);
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        // a lone state is distinct and the sets empty (`merge_batch` keeps one only then);
        // its strings and keys are disjoint, as the sets are
        let lone = self.lone.as_ref().map_or(0, |(s, k)| {
            s.len() - s.null_count() + k.len() - k.null_count()
        });
        Ok(ScalarValue::Int64(Some(
            (self.set.non_null_len() + self.plcs.len() + lone) as i64,
        )))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self)
            + self.set.size()
            + self.plcs.size()
            + self.seen.capacity() * (std::mem::size_of::<u128>() + 1)
            + self.held.as_ref().map_or(0, |b| b.capacity())
            + (self.firsts.capacity() + self.others.capacity()) * std::mem::size_of::<u32>()
            + self.lone_bytes
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.settle()?;
        let strings = self.set.take().into_state();
        let keys = keys_array(std::mem::take(&mut self.plcs).into_keys())?;
        Ok(vec![
            ScalarValue::List(Arc::new(
                SingleRowListArrayBuilder::new(strings).build_list_array(),
            )),
            ScalarValue::List(Arc::new(
                SingleRowListArrayBuilder::new(keys).build_list_array(),
            )),
        ])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let lists = |i: usize| states.get(i).and_then(|s| s.as_list_opt::<i32>());
        let (Some(strings), Some(keys)) = (lists(0), lists(1)) else {
            return datafusion::common::internal_err!(
                "atlake_count_distinct state is not two lists"
            );
        };
        if strings.len() != keys.len() {
            return datafusion::common::internal_err!(
                "atlake_count_distinct state lists of {} and {} rows",
                strings.len(),
                keys.len()
            );
        }
        // the states are sets already: straight in, or kept as they are while one alone
        for i in 0..strings.len() {
            match (strings.is_null(i), keys.is_null(i)) {
                (true, true) => continue,
                (false, false) => {}
                _ => {
                    return datafusion::common::internal_err!(
                        "atlake_count_distinct state has one list of two"
                    );
                }
            }
            let (s, k) = (strings.value(i), keys.value(i));
            if k.data_type() != &DataType::FixedSizeBinary(PLC_BYTES) {
                return datafusion::common::internal_err!(
                    "atlake_count_distinct state holds {}, not packed identifiers",
                    k.data_type()
                );
            }
            if self.lone.is_none() && self.set.is_empty() && self.plcs.is_empty() {
                self.lone_bytes = referenced_bytes(&s) + k.len() * std::mem::size_of::<i128>();
                self.lone = Some((s, k));
                continue;
            }
            self.settle()?;
            self.set.insert(&s);
            self.insert_keys(&k)?;
        }
        Ok(())
    }
}

/// The bytes a slice of string views stands for: 16 a view, and the strings longer than 12
/// bytes, which live in the buffers. Other arrays: their buffers' size.
fn referenced_bytes(a: &ArrayRef) -> usize {
    match a.as_string_view_opt() {
        Some(v) => v
            .views()
            .iter()
            .map(|&view| {
                let len = view as u32 as usize;
                16 + if len > 12 { len } else { 0 }
            })
            .sum(),
        None => a.get_array_memory_size(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::traffic::Rng;
    use arrow::array::{DictionaryArray, Int32Array, RecordBatch, StringViewArray};
    use arrow::datatypes::{Int32Type, Schema};
    use datafusion::datasource::MemTable;

    /// A value: short ones live in the view, long ones in a buffer; of the long ones, some
    /// are `did:plc` identifiers (packed) and some only look like them (decimal digits are
    /// not base32: strings).
    fn value(k: u64) -> String {
        match k % 3 {
            0 => format!("s{k}"),
            1 => plc(k),
            _ => format!("did:plc:{k:0>24}"),
        }
    }

    /// A `did:plc` identifier for `k`, one to one, with all 120 bits in use.
    fn plc(k: u64) -> String {
        const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
        // an odd factor is invertible modulo 2^120: distinct k, distinct bits
        let bits = u128::from(k).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        let id: String = (0..24)
            .rev()
            .map(|j| ALPHABET[(bits >> (5 * j)) as usize & 31] as char)
            .collect();
        format!("did:plc:{id}")
    }

    /// Strings as the Parquet reader gives dictionary pages (rows of one value share a view)
    /// or as plain arrays (each row its own copy), with nulls.
    fn strings(rng: &mut Rng, rows: usize, dictionary: bool) -> ArrayRef {
        let keys: Vec<Option<u64>> = (0..rows)
            .map(|_| (rng.below(23) != 0).then(|| rng.below(500)))
            .collect();
        if dictionary {
            let dict: Vec<String> = (0..500).map(value).collect();
            let d = DictionaryArray::<Int32Type>::try_new(
                Int32Array::from(keys.iter().map(|k| k.map(|k| k as i32)).collect::<Vec<_>>()),
                Arc::new(arrow::array::StringArray::from(dict)),
            )
            .unwrap();
            arrow::compute::cast(&d, &DataType::Utf8View).unwrap()
        } else {
            Arc::new(StringViewArray::from(
                keys.iter().map(|k| k.map(value)).collect::<Vec<_>>(),
            ))
        }
    }

    fn table(seed: u64) -> MemTable {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Int32, false),
            Field::new("s", DataType::Utf8View, true),
        ]));
        let mut rng = Rng::new(seed);
        let partitions: Vec<Vec<RecordBatch>> = (0..3)
            .map(|p| {
                (0..6)
                    .map(|b| {
                        let rows = 1 + rng.below(3000) as usize;
                        // some batches hold one group (as a file of one collection does)
                        let groups = if b % 2 == 0 { 1 } else { 7 };
                        let g: Int32Array =
                            (0..rows).map(|_| rng.below(groups) as i32 + p).collect();
                        let s = strings(&mut rng, rows, !(b + p as usize).is_multiple_of(3));
                        RecordBatch::try_new(schema.clone(), vec![Arc::new(g), s]).unwrap()
                    })
                    .collect()
            })
            .collect();
        MemTable::try_new(schema, partitions).unwrap()
    }

    async fn run(ctx: &SessionContext, sql: &str) -> (String, String) {
        let df = ctx.sql(sql).await.unwrap();
        let plan = format!(
            "{}",
            df.clone()
                .into_optimized_plan()
                .unwrap()
                .display_indent_schema()
        );
        let out = arrow::util::pretty::pretty_format_batches(&df.collect().await.unwrap())
            .unwrap()
            .to_string();
        (plan, out)
    }

    #[tokio::test]
    async fn grouped_counts_equal_datafusions_own() {
        for seed in 1..=4 {
            let plain = SessionContext::new();
            let ours = SessionContext::new();
            register(&ours);
            for ctx in [&plain, &ours] {
                ctx.register_table("t", Arc::new(table(seed))).unwrap();
            }
            let q = "SELECT g, count(*) AS n, count(DISTINCT s) AS u FROM t GROUP BY g ORDER BY g";
            let (plan_plain, want) = run(&plain, q).await;
            let (plan_ours, got) = run(&ours, q).await;
            assert!(!plan_plain.contains("atlake_count_distinct"));
            assert!(plan_ours.contains("atlake_count_distinct"), "{plan_ours}");
            assert_eq!(got, want, "seed {seed}");
            // the column keeps its name and type
            let df = ours.sql(q).await.unwrap();
            let f = df.schema().field(2);
            assert_eq!((f.name().as_str(), f.data_type()), ("u", &DataType::Int64));
            assert!(!f.is_nullable());
            // without GROUP BY, DataFusion's own plan stays
            let q = "SELECT count(DISTINCT s) AS u FROM t";
            let (plan_ours, got) = run(&ours, q).await;
            assert!(!plan_ours.contains("atlake_count_distinct"));
            assert_eq!(got, run(&plain, q).await.1);
        }
    }

    fn count_of(arrays: &[ArrayRef]) -> usize {
        let mut all = std::collections::HashSet::new();
        for a in arrays {
            all.extend(a.as_string_view().iter().flatten().map(str::to_string));
        }
        all.len()
    }

    #[test]
    fn shared_views_are_sent_to_the_set_once() {
        let mut rng = Rng::new(9);
        // one column chunk read in batches: slices of one array share its buffer
        let whole = strings(&mut rng, 16_000, true);
        let arrays: Vec<ArrayRef> = (0..4).map(|i| whole.slice(i * 4000, 4000)).collect();
        let mut acc = ViewDistinct::default();
        let mut sent = 0;
        for a in &arrays {
            acc.update_batch(std::slice::from_ref(a)).unwrap();
            sent += acc.firsts.len();
        }
        // at most one row per dictionary value reached the set, over all four batches
        assert!(sent <= 500, "{sent} rows sent");
        assert_eq!(
            acc.evaluate().unwrap(),
            ScalarValue::Int64(Some(count_of(&arrays) as i64))
        );
        // another buffer: the keys start over, and the count stays exact
        let other = strings(&mut rng, 3000, true);
        acc.update_batch(std::slice::from_ref(&other)).unwrap();
        let mut all = arrays.clone();
        all.push(other);
        assert_eq!(
            acc.evaluate().unwrap(),
            ScalarValue::Int64(Some(count_of(&all) as i64))
        );
    }

    /// Two dictionaries of same-length values with the same first four bytes: value `k` of
    /// each has the very same 16-byte view (length, prefix, buffer 0, offset) but other bytes.
    #[test]
    fn equal_views_over_another_buffer_are_not_taken_for_seen_strings() {
        // identifiers that only look like `did:plc` (strings) and real ones (packed)
        let forms: [fn(u64) -> String; 2] = [|k| format!("did:plc:{k:0>24}"), plc];
        for form in forms {
            let column = |base: u64| -> ArrayRef {
                let values: Vec<String> = (0..200).map(|k| form(base + k)).collect();
                let keys = Int32Array::from((0..2000).map(|i| i % 200).collect::<Vec<i32>>());
                let d = DictionaryArray::<Int32Type>::try_new(
                    keys,
                    Arc::new(arrow::array::StringArray::from(values)),
                )
                .unwrap();
                arrow::compute::cast(&d, &DataType::Utf8View).unwrap()
            };
            let (a, b) = (column(0), column(1_000_000));
            assert_eq!(
                a.as_string_view().views()[7],
                b.as_string_view().views()[7],
                "the two columns share views"
            );
            let mut acc = ViewDistinct::default();
            acc.update_batch(std::slice::from_ref(&a)).unwrap();
            acc.update_batch(std::slice::from_ref(&b)).unwrap();
            assert_eq!(acc.evaluate().unwrap(), ScalarValue::Int64(Some(400)));
        }
    }

    #[test]
    fn state_merges_and_buffer_changes_keep_counts_exact() {
        let mut rng = Rng::new(3);
        // plain arrays (several buffers each), then dictionary-like ones (one buffer each)
        let big: Vec<ArrayRef> = (0..4)
            .map(|b| {
                let v: Vec<Option<String>> = (0..160_000)
                    .map(|i| Some(format!("{:0>36}", (i * 7 + b * 13) % 200_000)))
                    .collect();
                Arc::new(StringViewArray::from(v)) as ArrayRef
            })
            .chain((0..3).map(|_| strings(&mut rng, 5000, true)))
            .collect();
        let (mut a, mut b, mut merged) = (
            ViewDistinct::default(),
            ViewDistinct::default(),
            ViewDistinct::default(),
        );
        for (i, arr) in big.iter().enumerate() {
            let acc = if i % 2 == 0 { &mut a } else { &mut b };
            acc.update_batch(std::slice::from_ref(arr)).unwrap();
        }
        for acc in [&mut a, &mut b] {
            merged.merge_batch(&state_arrays(acc)).unwrap();
        }
        assert_eq!(
            merged.evaluate().unwrap(),
            ScalarValue::Int64(Some(count_of(&big) as i64))
        );
    }

    /// An accumulator's state as the arrays a merge receives.
    fn state_arrays(acc: &mut ViewDistinct) -> Vec<ArrayRef> {
        acc.state()
            .unwrap()
            .into_iter()
            .map(|s| match s {
                ScalarValue::List(l) => l as ArrayRef,
                other => panic!("state is lists, not {other:?}"),
            })
            .collect()
    }

    /// The state a partial accumulator sends for `arrays`.
    fn state_of(arrays: &[ArrayRef]) -> Vec<ArrayRef> {
        let mut acc = ViewDistinct::default();
        for a in arrays {
            acc.update_batch(std::slice::from_ref(a)).unwrap();
        }
        state_arrays(&mut acc)
    }

    #[test]
    fn a_lone_state_is_counted_without_a_set_and_a_second_joins_it() {
        let mut rng = Rng::new(12);
        // with nulls: a state holds the null once, which is not counted
        let first = vec![
            strings(&mut rng, 4000, true),
            strings(&mut rng, 3000, false),
        ];
        let second = vec![strings(&mut rng, 4000, true)];
        let mut acc = ViewDistinct::default();
        acc.merge_batch(&state_of(&first)).unwrap();
        assert!(
            acc.lone.is_some() && acc.set.is_empty() && acc.plcs.is_empty(),
            "one state is kept as it is"
        );
        assert_eq!(
            acc.evaluate().unwrap(),
            ScalarValue::Int64(Some(count_of(&first) as i64))
        );
        // a second state: both go to the set, overlaps counted once
        acc.merge_batch(&state_of(&second)).unwrap();
        assert!(acc.lone.is_none());
        let all: Vec<ArrayRef> = first.iter().chain(&second).cloned().collect();
        assert_eq!(
            acc.evaluate().unwrap(),
            ScalarValue::Int64(Some(count_of(&all) as i64))
        );
        // two states in one batch of states
        let mut acc = ViewDistinct::default();
        let (a, b) = (state_of(&first), state_of(&second));
        let both: Vec<ArrayRef> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| arrow::compute::concat(&[x.as_ref(), y.as_ref()]).unwrap())
            .collect();
        acc.merge_batch(&both).unwrap();
        assert_eq!(
            acc.evaluate().unwrap(),
            ScalarValue::Int64(Some(count_of(&all) as i64))
        );
        // rows after a lone state, and a state taken from it, lose nothing
        let mut acc = ViewDistinct::default();
        acc.merge_batch(&state_of(&first)).unwrap();
        acc.update_batch(std::slice::from_ref(&second[0])).unwrap();
        assert_eq!(
            acc.evaluate().unwrap(),
            ScalarValue::Int64(Some(count_of(&all) as i64))
        );
        let mut acc = ViewDistinct::default();
        acc.merge_batch(&state_of(&first)).unwrap();
        let mut again = ViewDistinct::default();
        again.merge_batch(&state_arrays(&mut acc)).unwrap();
        again.merge_batch(&state_of(&second)).unwrap();
        assert_eq!(
            again.evaluate().unwrap(),
            ScalarValue::Int64(Some(count_of(&all) as i64))
        );
    }

    #[test]
    fn a_lone_state_counts_its_own_bytes_not_its_batchs() {
        // one batch of states: a big group and a small one, sharing buffers
        let big: Vec<Option<String>> = (0..50_000)
            .map(|i| Some(format!("did:plc:{i:0>24}")))
            .collect();
        let small: Vec<Option<String>> =
            (0..10).map(|i| Some(format!("did:web:{i:0>30}"))).collect();
        let values: ArrayRef = Arc::new(StringViewArray::from(
            big.into_iter().chain(small).collect::<Vec<_>>(),
        ));
        let offsets = arrow::buffer::OffsetBuffer::new(vec![0i32, 50_000, 50_010].into());
        let states = arrow::array::ListArray::new(
            Arc::new(Field::new_list_field(DataType::Utf8View, true)),
            offsets,
            values,
            None,
        );
        // and packed identifiers: 30,000 for the big group, 2 for the small
        let keys = keys_array((0..30_002).collect()).unwrap();
        let keys = arrow::array::ListArray::new(
            Arc::new(Field::new_list_field(
                DataType::FixedSizeBinary(PLC_BYTES),
                true,
            )),
            arrow::buffer::OffsetBuffer::new(vec![0i32, 30_000, 30_002].into()),
            keys,
            None,
        );
        let mut acc = ViewDistinct::default();
        acc.merge_batch(&[
            Arc::new(states.slice(1, 1)) as ArrayRef,
            Arc::new(keys.slice(1, 1)) as ArrayRef,
        ])
        .unwrap();
        assert_eq!(acc.evaluate().unwrap(), ScalarValue::Int64(Some(12)));
        // ten views and ten 38-byte strings and two keys, not the batch's 2.5 MB
        assert_eq!(acc.lone_bytes, 10 * (16 + 38) + 2 * 16);
        assert!(acc.size() < 64 << 10, "{}", acc.size());
    }

    #[test]
    fn plc_identifiers_are_packed_one_to_one_and_nothing_else_is() {
        // the alphabet's ends
        let ends = |c: char| format!("did:plc:{}", c.to_string().repeat(24));
        assert_eq!(plc_key(ends('2').as_bytes()), Some(0));
        assert_eq!(plc_key(ends('z').as_bytes()), Some((1i128 << 120) - 1));
        assert_eq!(
            plc_key(b"did:plc:222222222222222222222223"),
            Some(1),
            "the last character is the lowest 5 bits"
        );
        assert_eq!(plc_key(b"did:plc:322222222222222222222222"), Some(1 << 115));
        // distinct identifiers, distinct keys
        let mut keys = std::collections::HashMap::new();
        for k in 0..20_000u64 {
            let id = plc(k);
            let key = plc_key(id.as_bytes()).expect(&id);
            assert!((0..1 << 120).contains(&key));
            assert_eq!(keys.insert(key, id.clone()), None, "{id} shares a key");
        }
        // anything else stays a string
        let good = plc(7);
        for bad in [
            good[..31].to_string(),
            format!("{good}a"),
            good.to_uppercase(),
            good.replacen("did:plc:", "did:web:", 1),
            good.replacen("did:plc:", "did:plc-", 1),
            "did:plc:".to_string(),
            String::new(),
        ]
        .into_iter()
        .chain(['0', '1', '8', '9', 'A', '_', '\u{e9}'].map(|c| {
            let mut s = good[..31].to_string();
            s.push(c);
            s
        })) {
            assert_eq!(plc_key(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn identifiers_go_to_the_packed_set_and_other_strings_to_the_string_set() {
        let mut rng = Rng::new(21);
        // the same values plain and as dictionary pages, and a state merged in
        let arrays = [
            strings(&mut rng, 6000, true),
            strings(&mut rng, 6000, false),
        ];
        let mut acc = ViewDistinct::default();
        for a in &arrays {
            acc.update_batch(std::slice::from_ref(a)).unwrap();
        }
        let distinct: std::collections::HashSet<String> = arrays
            .iter()
            .flat_map(|a| a.as_string_view().iter().flatten().map(str::to_string))
            .collect();
        let packed = distinct
            .iter()
            .filter(|s| plc_key(s.as_bytes()).is_some())
            .count();
        assert!(packed > 100 && packed < distinct.len(), "{packed}");
        assert_eq!(acc.plcs.len(), packed);
        assert_eq!(acc.set.non_null_len(), distinct.len() - packed);
        // a state of the same values adds nothing
        let mut merged = ViewDistinct::default();
        merged.merge_batch(&state_arrays(&mut acc)).unwrap();
        merged.merge_batch(&state_of(&arrays)).unwrap();
        assert_eq!(merged.plcs.len(), packed);
        assert_eq!(
            merged.evaluate().unwrap(),
            ScalarValue::Int64(Some(distinct.len() as i64))
        );
    }

    #[test]
    fn a_key_set_split_into_parts_counts_and_lists_each_key_once() {
        let mut rng = Rng::new(5);
        let mut keys = KeySet::default();
        let mut want = std::collections::HashSet::new();
        // repeats, and keys that differ in one half only
        for i in 0..3 * KeySet::SPLIT as u64 {
            let k = if i % 4 == 3 {
                i128::from(rng.below(1000)) << 64
            } else {
                i128::from(rng.below(2 * KeySet::SPLIT as u64)) * 0x1_0000_0001
            };
            keys.insert(k);
            want.insert(k);
            if i == KeySet::SPLIT as u64 / 2 {
                assert!(keys.parts.is_empty(), "small sets stay whole");
                assert_eq!(keys.len(), want.len());
            }
        }
        assert_eq!(keys.parts.len(), KeySet::PARTS, "a large set is split");
        assert!(keys.small.is_empty());
        // keys still waiting in the lists are counted
        assert!(keys.pending.iter().any(|p| !p.is_empty()));
        assert_eq!(keys.len(), want.len());
        // and no part holds another part's key
        for (p, part) in keys.parts.iter().enumerate() {
            assert!(part.iter().all(|&k| KeySet::part(k) == p));
        }
        assert!(keys.size() >= want.len() * 16, "{}", keys.size());
        let mut listed = keys.into_keys();
        listed.sort_unstable();
        let mut want: Vec<i128> = want.into_iter().collect();
        want.sort_unstable();
        assert_eq!(listed, want);
    }

    #[test]
    fn counts_past_the_split_stay_exact_through_states() {
        // more distinct identifiers than a set holds before it splits, in batches that
        // repeat some, over two partial accumulators that share some
        let n = 3 * KeySet::SPLIT as u64;
        let batch = |from: u64| -> ArrayRef {
            Arc::new(StringViewArray::from(
                (from..from + 10_000)
                    .map(|k| plc(k % n))
                    .collect::<Vec<_>>(),
            ))
        };
        let (mut a, mut b) = (ViewDistinct::default(), ViewDistinct::default());
        for from in (0..n).step_by(7_000) {
            a.update_batch(&[batch(from)]).unwrap();
            b.update_batch(&[batch(from + n / 2)]).unwrap();
        }
        assert_eq!(a.evaluate().unwrap(), ScalarValue::Int64(Some(n as i64)));
        let mut merged = ViewDistinct::default();
        merged.merge_batch(&state_arrays(&mut a)).unwrap();
        merged.merge_batch(&state_arrays(&mut b)).unwrap();
        assert_eq!(
            merged.evaluate().unwrap(),
            ScalarValue::Int64(Some(n as i64))
        );
        assert!(!merged.plcs.parts.is_empty());
    }
}
