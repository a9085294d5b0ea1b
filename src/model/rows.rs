//! The Arrow form of events: table kinds, their schemas, and builders that turn events into
//! record batches.
//!
//! Every event row has the common columns `did, time_us, time, kind, operation, collection,
//! rkey, rev, cid, seq, record, claimed_time_us`. `time_us` is always the row's partition time
//! (it lies within the partition's hour); `claimed_time_us` keeps a source's time that was
//! outside the accepted window (null otherwise). Core lexicons add typed columns ([`super::lexicon`]); identity
//! and account events have their own; errors (the quarantine) have a schema of their own.
//! Schemas only ever gain columns; [`SCHEMA_VERSION`] is written into every file.

use super::lexicon::{Lexicon, Typed, fits};
use super::{Envelope, ErrorEvent, EventData, SourceKind};
use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Int64Builder, ListBuilder, StringBuilder,
    TimestampMicrosecondBuilder, new_null_array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use std::sync::{Arc, OnceLock};

/// Version of the file schema, written into every Parquet file's metadata.
/// Version 2 added `claimed_time_us` after every event kind's columns; version 3 added
/// `origin` after it; version 4 gave every event file one schema ([`lifecycle_fields`] after
/// `origin`, null where a row's kind has no such value), so that the files of the `events`
/// table agree with each other and with its Delta schema.
pub const SCHEMA_VERSION: u32 = 4;

/// Largest raw payload kept in the quarantine (the original length is kept too).
pub const MAX_QUARANTINE_RAW: usize = 1 << 20;

/// The shape of a partition's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TableKind {
    /// Commit and sync events: common columns, plus typed ones for a core lexicon.
    Events(Option<Lexicon>),
    /// `#identity` events.
    Identity,
    /// `#account` events.
    Account,
    /// Quarantined input.
    Errors,
}

impl TableKind {
    /// The SQL table its rows are read from (`events` for collections without a typed table,
    /// `errors` for the quarantine): the `table` label of the write metrics.
    pub fn label(self) -> &'static str {
        match self {
            TableKind::Events(Some(lex)) => lex.table(),
            TableKind::Events(None) => "events",
            TableKind::Identity => "identity",
            TableKind::Account => "account",
            TableKind::Errors => "errors",
        }
    }
}

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn list_of_str() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

/// The common columns of every event table.
pub fn common_fields() -> Vec<Field> {
    vec![
        Field::new("did", DataType::Utf8, false),
        Field::new("time_us", DataType::Int64, false),
        Field::new("time", ts_type(), false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("operation", DataType::Utf8, true),
        Field::new("collection", DataType::Utf8, true),
        Field::new("rkey", DataType::Utf8, true),
        Field::new("rev", DataType::Utf8, true),
        Field::new("cid", DataType::Utf8, true),
        Field::new("seq", DataType::Int64, true),
        Field::new("record", DataType::Utf8, true),
    ]
}

/// The column added in schema version 2 after every kind's other columns (schemas only gain
/// columns at their end): a source's time that was outside the accepted window.
fn claimed_time_field() -> Field {
    Field::new("claimed_time_us", DataType::Int64, true)
}

/// The column added in schema version 3 after `claimed_time_us`: where the row came from
/// (`firehose`, `jetstream` or `repo`). Files written before it have no such column; a query
/// takes the origin of their rows from the file name, which names the source.
fn origin_field() -> Field {
    Field::new("origin", DataType::Utf8, true)
}

/// The columns of `#identity` and `#account` events, stored in every event file since schema
/// version 4 (null in the rows of other kinds), so that every file of the `events` table has
/// one schema.
pub fn lifecycle_fields() -> Vec<Field> {
    vec![
        Field::new("handle", DataType::Utf8, true),
        Field::new("active", DataType::Boolean, true),
        Field::new("status", DataType::Utf8, true),
        Field::new("event_seq", DataType::Int64, true),
        Field::new("event_time", ts_type(), true),
    ]
}

/// The columns a kind adds to the common ones.
pub fn typed_fields(kind: TableKind) -> Vec<Field> {
    let s = |n: &str| Field::new(n, DataType::Utf8, true);
    let created = || Field::new("created_at", ts_type(), true);
    match kind {
        TableKind::Events(None) | TableKind::Errors => vec![],
        TableKind::Events(Some(Lexicon::Post)) => vec![
            s("text"),
            Field::new("langs", list_of_str(), true),
            s("reply_root_uri"),
            s("reply_parent_uri"),
            s("quote_uri"),
            s("embed_type"),
            Field::new("facet_tags", list_of_str(), true),
            Field::new("facet_links", list_of_str(), true),
            Field::new("facet_mentions", list_of_str(), true),
            created(),
        ],
        TableKind::Events(Some(Lexicon::Like | Lexicon::Repost)) => {
            vec![s("subject_uri"), s("subject_cid"), created()]
        }
        TableKind::Events(Some(Lexicon::Follow | Lexicon::Block)) => {
            vec![s("subject_did"), created()]
        }
        TableKind::Events(Some(Lexicon::ListItem)) => {
            vec![s("subject_did"), s("list_uri"), created()]
        }
        TableKind::Events(Some(Lexicon::Profile)) => {
            vec![s("display_name"), s("description"), created()]
        }
        TableKind::Identity => vec![
            s("handle"),
            Field::new("event_seq", DataType::Int64, true),
            Field::new("event_time", ts_type(), true),
        ],
        TableKind::Account => vec![
            Field::new("active", DataType::Boolean, true),
            s("status"),
            Field::new("event_seq", DataType::Int64, true),
            Field::new("event_time", ts_type(), true),
        ],
    }
}

fn errors_fields() -> Vec<Field> {
    vec![
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("cursor", DataType::Int64, true),
        Field::new("seq", DataType::Int64, true),
        Field::new("time_us", DataType::Int64, false),
        Field::new("time", ts_type(), false),
        Field::new("did", DataType::Utf8, true),
        Field::new("path", DataType::Utf8, true),
        Field::new("raw_len", DataType::Int64, false),
        Field::new("raw", DataType::Binary, false),
    ]
}

/// The common columns as stored: all but `time`, which is `time_us` as a timestamp and is
/// derived when queried (storing it twice cost 4 bytes per event).
pub fn stored_common_fields() -> Vec<Field> {
    common_fields()
        .into_iter()
        .filter(|f| f.name() != "time")
        .collect()
}

fn build_schema(kind: TableKind, physical: bool) -> SchemaRef {
    if kind == TableKind::Errors {
        return Arc::new(Schema::new(errors_fields()));
    }
    if physical {
        // one schema for every event file: the stored common columns, the two added in
        // versions 2 and 3, then the lifecycle columns (version 4)
        let mut f = stored_common_fields();
        f.push(claimed_time_field());
        f.push(origin_field());
        f.extend(lifecycle_fields());
        return Arc::new(Schema::new(f));
    }
    let mut f = common_fields();
    match kind {
        // the stored columns, then (in SQL) the typed ones derived from `record`
        TableKind::Events(_) | TableKind::Errors => {
            f.push(claimed_time_field());
            f.push(origin_field());
            f.extend(typed_fields(kind));
        }
        // the SQL tables of identity and account events keep their column order
        TableKind::Identity | TableKind::Account => {
            f.extend(typed_fields(kind));
            f.push(claimed_time_field());
            f.push(origin_field());
        }
    }
    Arc::new(Schema::new(f))
}

/// Every table kind: the event table, identity, account, the quarantine, and each core lexicon.
pub fn all_kinds() -> Vec<TableKind> {
    let mut kinds = vec![
        TableKind::Events(None),
        TableKind::Identity,
        TableKind::Account,
        TableKind::Errors,
    ];
    kinds.extend(Lexicon::ALL.iter().map(|l| TableKind::Events(Some(*l))));
    kinds
}

/// The schema rows of a kind have in files and in memory. Commit events of every collection
/// share the common columns: the typed columns of the core lexicons are derived from `record`
/// when queried ([`table_schema`]), so the lake stores each value once.
pub fn schema(kind: TableKind) -> SchemaRef {
    static CACHE: OnceLock<Vec<(TableKind, SchemaRef)>> = OnceLock::new();
    let all = CACHE.get_or_init(|| {
        all_kinds()
            .into_iter()
            .map(|k| (k, build_schema(k, true)))
            .collect()
    });
    all.iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, s)| s.clone())
        .unwrap_or_else(|| build_schema(kind, true))
}

/// The schema of the SQL table of a kind: the stored columns plus, for core lexicons, the typed
/// columns derived from `record`.
pub fn table_schema(kind: TableKind) -> SchemaRef {
    static CACHE: OnceLock<Vec<(TableKind, SchemaRef)>> = OnceLock::new();
    let all = CACHE.get_or_init(|| {
        all_kinds()
            .into_iter()
            .map(|k| (k, build_schema(k, false)))
            .collect()
    });
    all.iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, s)| s.clone())
        .unwrap_or_else(|| build_schema(kind, false))
}

/// How many records of `batch` (rows of `lex`'s collection) do not fit the lexicon's types.
/// The writer counts these when it encodes a flush, off the decode thread.
pub fn count_invalid_records(lex: Lexicon, batch: &RecordBatch) -> u64 {
    use arrow::array::{Array, AsArray};
    let Some(rec) = batch
        .column_by_name("record")
        .and_then(|c| c.as_string_opt::<i32>())
    else {
        return 0;
    };
    (0..rec.len())
        .filter(|&i| rec.is_valid(i) && !fits(lex, rec.value(i)))
        .count() as u64
}

/// Builders for the common columns.
struct Common {
    did: StringBuilder,
    time_us: Int64Builder,
    kind: StringBuilder,
    operation: StringBuilder,
    collection: StringBuilder,
    rkey: StringBuilder,
    rev: StringBuilder,
    cid: StringBuilder,
    seq: Int64Builder,
    record: StringBuilder,
    claimed_time_us: Int64Builder,
    origin: StringBuilder,
}

impl Common {
    fn new() -> Self {
        Common {
            did: StringBuilder::new(),
            time_us: Int64Builder::new(),
            kind: StringBuilder::new(),
            operation: StringBuilder::new(),
            collection: StringBuilder::new(),
            rkey: StringBuilder::new(),
            rev: StringBuilder::new(),
            cid: StringBuilder::new(),
            seq: Int64Builder::new(),
            record: StringBuilder::new(),
            claimed_time_us: Int64Builder::new(),
            origin: StringBuilder::new(),
        }
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.did.finish()),
            Arc::new(self.time_us.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.operation.finish()),
            Arc::new(self.collection.finish()),
            Arc::new(self.rkey.finish()),
            Arc::new(self.rev.finish()),
            Arc::new(self.cid.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.record.finish()),
        ]
    }
}

fn str_list() -> ListBuilder<StringBuilder> {
    ListBuilder::new(StringBuilder::new())
}

fn ts_builder() -> TimestampMicrosecondBuilder {
    TimestampMicrosecondBuilder::new().with_timezone("UTC")
}

/// Builders for the typed columns of a core lexicon, filled from records (see
/// [`super::lexicon::extract`]).
#[allow(missing_docs, clippy::large_enum_variant)] // one per partition, never moved around
pub enum TypedColumns {
    /// No typed columns.
    None,
    /// Posts.
    Post {
        text: StringBuilder,
        langs: ListBuilder<StringBuilder>,
        root: StringBuilder,
        parent: StringBuilder,
        quote: StringBuilder,
        embed: StringBuilder,
        tags: ListBuilder<StringBuilder>,
        links: ListBuilder<StringBuilder>,
        mentions: ListBuilder<StringBuilder>,
        created: TimestampMicrosecondBuilder,
    },
    SubjectRef {
        uri: StringBuilder,
        cid: StringBuilder,
        created: TimestampMicrosecondBuilder,
    },
    SubjectDid {
        did: StringBuilder,
        created: TimestampMicrosecondBuilder,
    },
    ListItem {
        did: StringBuilder,
        list: StringBuilder,
        created: TimestampMicrosecondBuilder,
    },
    Profile {
        name: StringBuilder,
        description: StringBuilder,
        created: TimestampMicrosecondBuilder,
    },
    Identity {
        handle: StringBuilder,
        seq: Int64Builder,
        time: TimestampMicrosecondBuilder,
    },
    Account {
        active: BooleanBuilder,
        status: StringBuilder,
        seq: Int64Builder,
        time: TimestampMicrosecondBuilder,
    },
}

fn push_list(b: &mut ListBuilder<StringBuilder>, items: Option<&[String]>) {
    match items {
        Some(items) => {
            for i in items {
                b.values().append_value(i);
            }
            b.append(true);
        }
        None => b.append(false),
    }
}

impl TypedColumns {
    /// Empty builders for the typed columns of `kind`.
    pub fn new(kind: TableKind) -> Self {
        let s = StringBuilder::new;
        match kind {
            TableKind::Events(None) | TableKind::Errors => TypedColumns::None,
            TableKind::Events(Some(Lexicon::Post)) => TypedColumns::Post {
                text: s(),
                langs: str_list(),
                root: s(),
                parent: s(),
                quote: s(),
                embed: s(),
                tags: str_list(),
                links: str_list(),
                mentions: str_list(),
                created: ts_builder(),
            },
            TableKind::Events(Some(Lexicon::Like | Lexicon::Repost)) => TypedColumns::SubjectRef {
                uri: s(),
                cid: s(),
                created: ts_builder(),
            },
            TableKind::Events(Some(Lexicon::Follow | Lexicon::Block)) => TypedColumns::SubjectDid {
                did: s(),
                created: ts_builder(),
            },
            TableKind::Events(Some(Lexicon::ListItem)) => TypedColumns::ListItem {
                did: s(),
                list: s(),
                created: ts_builder(),
            },
            TableKind::Events(Some(Lexicon::Profile)) => TypedColumns::Profile {
                name: s(),
                description: s(),
                created: ts_builder(),
            },
            TableKind::Identity => TypedColumns::Identity {
                handle: s(),
                seq: Int64Builder::new(),
                time: ts_builder(),
            },
            TableKind::Account => TypedColumns::Account {
                active: BooleanBuilder::new(),
                status: s(),
                seq: Int64Builder::new(),
                time: ts_builder(),
            },
        }
    }

    /// Appends the typed values, or nulls when `t` is `None`.
    pub fn push(&mut self, t: Option<&Typed>) {
        match self {
            TypedColumns::None | TypedColumns::Identity { .. } | TypedColumns::Account { .. } => {}
            TypedColumns::Post {
                text,
                langs,
                root,
                parent,
                quote,
                embed,
                tags,
                links,
                mentions,
                created,
            } => match t {
                Some(Typed::Post(p)) => {
                    text.append_value(&p.text);
                    push_list(langs, Some(&p.langs));
                    root.append_option(p.reply_root_uri.as_deref());
                    parent.append_option(p.reply_parent_uri.as_deref());
                    quote.append_option(p.quote_uri.as_deref());
                    embed.append_option(p.embed_type.as_deref());
                    push_list(tags, Some(&p.facet_tags));
                    push_list(links, Some(&p.facet_links));
                    push_list(mentions, Some(&p.facet_mentions));
                    created.append_option(p.created_at);
                }
                _ => {
                    text.append_null();
                    push_list(langs, None);
                    root.append_null();
                    parent.append_null();
                    quote.append_null();
                    embed.append_null();
                    push_list(tags, None);
                    push_list(links, None);
                    push_list(mentions, None);
                    created.append_null();
                }
            },
            TypedColumns::SubjectRef { uri, cid, created } => match t {
                Some(Typed::SubjectRef {
                    uri: u,
                    cid: c,
                    created_at,
                }) => {
                    uri.append_value(u);
                    cid.append_value(c);
                    created.append_option(*created_at);
                }
                _ => {
                    uri.append_null();
                    cid.append_null();
                    created.append_null();
                }
            },
            TypedColumns::SubjectDid { did, created } => match t {
                Some(Typed::SubjectDid { did: d, created_at }) => {
                    did.append_value(d);
                    created.append_option(*created_at);
                }
                _ => {
                    did.append_null();
                    created.append_null();
                }
            },
            TypedColumns::ListItem { did, list, created } => match t {
                Some(Typed::ListItem {
                    did: d,
                    list: l,
                    created_at,
                }) => {
                    did.append_value(d);
                    list.append_value(l);
                    created.append_option(*created_at);
                }
                _ => {
                    did.append_null();
                    list.append_null();
                    created.append_null();
                }
            },
            TypedColumns::Profile {
                name,
                description,
                created,
            } => match t {
                Some(Typed::Profile {
                    display_name,
                    description: d,
                    created_at,
                }) => {
                    name.append_option(display_name.as_deref());
                    description.append_option(d.as_deref());
                    created.append_option(*created_at);
                }
                _ => {
                    name.append_null();
                    description.append_null();
                    created.append_null();
                }
            },
        }
    }

    /// The built columns, in [`typed_fields`] order.
    pub fn finish(&mut self) -> Vec<ArrayRef> {
        match self {
            TypedColumns::None => vec![],
            TypedColumns::Post {
                text,
                langs,
                root,
                parent,
                quote,
                embed,
                tags,
                links,
                mentions,
                created,
            } => vec![
                Arc::new(text.finish()),
                Arc::new(langs.finish()),
                Arc::new(root.finish()),
                Arc::new(parent.finish()),
                Arc::new(quote.finish()),
                Arc::new(embed.finish()),
                Arc::new(tags.finish()),
                Arc::new(links.finish()),
                Arc::new(mentions.finish()),
                Arc::new(created.finish()),
            ],
            TypedColumns::SubjectRef { uri, cid, created } => vec![
                Arc::new(uri.finish()),
                Arc::new(cid.finish()),
                Arc::new(created.finish()),
            ],
            TypedColumns::SubjectDid { did, created } => {
                vec![Arc::new(did.finish()), Arc::new(created.finish())]
            }
            TypedColumns::ListItem { did, list, created } => vec![
                Arc::new(did.finish()),
                Arc::new(list.finish()),
                Arc::new(created.finish()),
            ],
            TypedColumns::Profile {
                name,
                description,
                created,
            } => vec![
                Arc::new(name.finish()),
                Arc::new(description.finish()),
                Arc::new(created.finish()),
            ],
            TypedColumns::Identity { handle, seq, time } => vec![
                Arc::new(handle.finish()),
                Arc::new(seq.finish()),
                Arc::new(time.finish()),
            ],
            TypedColumns::Account {
                active,
                status,
                seq,
                time,
            } => vec![
                Arc::new(active.finish()),
                Arc::new(status.finish()),
                Arc::new(seq.finish()),
                Arc::new(time.finish()),
            ],
        }
    }
}

/// Builders for the quarantine.
struct ErrorCols {
    reason: StringBuilder,
    detail: StringBuilder,
    source: StringBuilder,
    cursor: Int64Builder,
    seq: Int64Builder,
    time_us: Int64Builder,
    time: TimestampMicrosecondBuilder,
    did: StringBuilder,
    path: StringBuilder,
    raw_len: Int64Builder,
    raw: BinaryBuilder,
}

/// One record of a repository snapshot, as a backfill row.
#[derive(Debug, Clone, Copy)]
pub struct RepoRecord<'a> {
    /// The account.
    pub did: &'a str,
    /// When it was made (bounded): the row's partition time.
    pub time_us: i64,
    /// Its collection.
    pub collection: &'a str,
    /// Its record key.
    pub rkey: &'a str,
    /// The repo's revision (`None` for a version-2 repo, which has none).
    pub rev: Option<&'a str>,
    /// Its CID.
    pub cid: &'a str,
    /// The record as atproto JSON.
    pub record: &'a str,
}

/// Accumulates rows of one table kind and turns them into record batches.
pub struct RowBuilder {
    kind: TableKind,
    origin: SourceKind,
    common: Option<Common>,
    typed: TypedColumns,
    errors: Option<ErrorCols>,
    rows: usize,
    bytes: usize,
}

impl std::fmt::Debug for RowBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowBuilder")
            .field("kind", &self.kind)
            .field("rows", &self.rows)
            .finish()
    }
}

/// Fixed per-row cost in the memory estimate (offsets, validity, fixed-width columns).
const ROW_OVERHEAD: usize = 160;

impl RowBuilder {
    /// An empty builder for `kind`, of rows that came from `origin`.
    pub fn new(kind: TableKind, origin: SourceKind) -> Self {
        let (common, errors) = if kind == TableKind::Errors {
            (
                None,
                Some(ErrorCols {
                    reason: StringBuilder::new(),
                    detail: StringBuilder::new(),
                    source: StringBuilder::new(),
                    cursor: Int64Builder::new(),
                    seq: Int64Builder::new(),
                    time_us: Int64Builder::new(),
                    time: ts_builder(),
                    did: StringBuilder::new(),
                    path: StringBuilder::new(),
                    raw_len: Int64Builder::new(),
                    raw: BinaryBuilder::new(),
                }),
            )
        } else {
            (Some(Common::new()), None)
        };
        RowBuilder {
            kind,
            origin,
            common,
            // commit rows store the common columns only; typed columns are derived when queried
            typed: TypedColumns::new(match kind {
                TableKind::Events(_) => TableKind::Events(None),
                k => k,
            }),
            errors,
            rows: 0,
            bytes: 0,
        }
    }

    /// The kind of rows built.
    pub fn kind(&self) -> TableKind {
        self.kind
    }

    /// Rows not yet finished.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no rows are pending.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Estimated bytes of the pending rows.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends an event. The caller routes events to a builder of the matching kind.
    pub fn push_event(&mut self, env: &Envelope) {
        let Some(c) = self.common.as_mut() else {
            return;
        };
        let e = &env.event;
        let mut size = ROW_OVERHEAD + e.did.len();
        c.did.append_value(&e.did);
        c.time_us.append_value(env.time_us);
        c.kind.append_value(e.kind().as_str());
        c.seq.append_option(env.seq);
        c.claimed_time_us.append_option(env.claimed_time_us);
        c.origin.append_value(self.origin.as_str());
        match &e.data {
            EventData::Commit(op) => {
                c.operation.append_value(op.operation.as_str());
                c.collection.append_value(&op.collection);
                c.rkey.append_value(&op.rkey);
                c.rev.append_value(&op.rev);
                c.cid.append_option(op.cid.as_deref());
                c.record.append_option(op.record.as_deref());
                size += op.collection.len()
                    + op.rkey.len()
                    + op.rev.len()
                    + op.cid.as_ref().map_or(0, |s| s.len())
                    + op.record.as_ref().map_or(0, |s| s.len());
            }
            EventData::Identity(i) => {
                for b in [
                    &mut c.operation,
                    &mut c.collection,
                    &mut c.rkey,
                    &mut c.rev,
                    &mut c.cid,
                    &mut c.record,
                ] {
                    b.append_null();
                }
                if let TypedColumns::Identity { handle, seq, time } = &mut self.typed {
                    handle.append_option(i.handle.as_deref());
                    seq.append_value(i.seq);
                    time.append_option(crate::syntax::parse_datetime_us(&i.time).ok());
                }
                size += i.handle.as_ref().map_or(0, |s| s.len());
            }
            EventData::Account(a) => {
                for b in [
                    &mut c.operation,
                    &mut c.collection,
                    &mut c.rkey,
                    &mut c.rev,
                    &mut c.cid,
                    &mut c.record,
                ] {
                    b.append_null();
                }
                if let TypedColumns::Account {
                    active,
                    status,
                    seq,
                    time,
                } = &mut self.typed
                {
                    active.append_value(a.active);
                    status.append_option(a.status.as_deref());
                    seq.append_value(a.seq);
                    time.append_option(crate::syntax::parse_datetime_us(&a.time).ok());
                }
            }
            EventData::Sync(s) => {
                c.operation.append_null();
                c.collection.append_null();
                c.rkey.append_null();
                c.rev.append_value(&s.rev);
                c.cid.append_null();
                match &s.snapshot {
                    Some(snap) => {
                        c.record
                            .append_value(format!("{{\"snapshot_rev\":\"{snap}\"}}"));
                    }
                    None => c.record.append_null(),
                }
            }
        }
        self.rows += 1;
        self.bytes += size;
    }

    /// Appends a record of a repository snapshot (a backfill): a `commit` row, operation
    /// `create`, no `seq`.
    pub fn push_record(&mut self, r: &RepoRecord<'_>) {
        let RepoRecord {
            did,
            time_us,
            collection,
            rkey,
            rev,
            cid,
            record,
        } = *r;
        let Some(c) = self.common.as_mut() else {
            return;
        };
        c.did.append_value(did);
        c.time_us.append_value(time_us);
        c.kind.append_value("commit");
        c.operation.append_value("create");
        c.collection.append_value(collection);
        c.rkey.append_value(rkey);
        c.rev.append_option(rev);
        c.cid.append_value(cid);
        c.seq.append_null();
        c.record.append_value(record);
        c.claimed_time_us.append_null();
        c.origin.append_value(self.origin.as_str());
        self.rows += 1;
        self.bytes += ROW_OVERHEAD
            + did.len()
            + collection.len()
            + rkey.len()
            + rev.map_or(0, str::len)
            + cid.len()
            + record.len();
    }

    /// Appends a quarantined input.
    pub fn push_error(
        &mut self,
        err: &ErrorEvent,
        source: SourceKind,
        cursor: Option<crate::model::Cursor>,
        time_us: i64,
    ) {
        let Some(c) = self.errors.as_mut() else {
            return;
        };
        c.reason.append_value(err.reason.as_str());
        c.detail.append_value(&err.detail);
        c.source.append_value(source.as_str());
        c.cursor.append_option(cursor.map(|c| c.value()));
        c.seq.append_option(err.seq);
        c.time_us.append_value(time_us);
        c.time.append_value(time_us);
        c.did
            .append_option(err.did.as_deref().map(|d| truncate_str(d, 4096)));
        c.path
            .append_option(err.path.as_deref().map(|p| truncate_str(p, 4096)));
        c.raw_len.append_value(err.raw.len() as i64);
        let raw = &err.raw[..err.raw.len().min(MAX_QUARANTINE_RAW)];
        c.raw.append_value(raw);
        self.rows += 1;
        self.bytes += ROW_OVERHEAD + err.detail.len() + raw.len();
    }

    /// The lifecycle columns of the pending rows (every event file has them): the identity or
    /// account columns of those kinds, nulls for the others.
    fn lifecycle_columns(&mut self) -> Result<Vec<ArrayRef>, ArrowError> {
        let rows = self.rows;
        let f = lifecycle_fields();
        let null = |i: usize| new_null_array(f[i].data_type(), rows);
        let typed = self.typed.finish();
        let broken = |n: usize| {
            ArrowError::InvalidArgumentError(format!(
                "{:?} rows built {} typed columns, not {n}",
                self.kind,
                typed.len()
            ))
        };
        Ok(match self.kind {
            // handle, event_seq, event_time
            TableKind::Identity => match <[ArrayRef; 3]>::try_from(typed.clone()) {
                Ok([handle, seq, time]) => vec![handle, null(1), null(2), seq, time],
                Err(_) => return Err(broken(3)),
            },
            // active, status, event_seq, event_time
            TableKind::Account => match <[ArrayRef; 4]>::try_from(typed.clone()) {
                Ok([active, status, seq, time]) => vec![null(0), active, status, seq, time],
                Err(_) => return Err(broken(4)),
            },
            _ if typed.is_empty() => (0..f.len()).map(null).collect(),
            _ => return Err(broken(0)),
        })
    }

    /// Finishes the pending rows into a batch and resets the builder.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        let mut claimed = Vec::new();
        let mut cols = match (&mut self.common, &mut self.errors) {
            (Some(c), _) => {
                claimed = vec![
                    Arc::new(c.claimed_time_us.finish()) as ArrayRef,
                    Arc::new(c.origin.finish()),
                ];
                c.finish()
            }
            (None, Some(e)) => vec![
                Arc::new(e.reason.finish()) as ArrayRef,
                Arc::new(e.detail.finish()),
                Arc::new(e.source.finish()),
                Arc::new(e.cursor.finish()),
                Arc::new(e.seq.finish()),
                Arc::new(e.time_us.finish()),
                Arc::new(e.time.finish()),
                Arc::new(e.did.finish()),
                Arc::new(e.path.finish()),
                Arc::new(e.raw_len.finish()),
                Arc::new(e.raw.finish()),
            ],
            (None, None) => vec![],
        };
        if self.common.is_some() {
            cols.extend(claimed);
            cols.extend(self.lifecycle_columns()?);
        }
        self.rows = 0;
        self.bytes = 0;
        RecordBatch::try_new(schema(self.kind), cols)
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
