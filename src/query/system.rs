//! The `system` schema: the lake's own state as tables.
//!
//! - `system.files`: every committed data file: path, partition, date, hour, source, cursor
//!   range, rows and bytes (rows of files written by another process are read from their
//!   footers when the table is queried, once per file).
//! - `system.checkpoint`: the checkpoint per source.
//! - `system.ingest` (daemon only): the live ingest metrics, the same numbers as `/metrics`.
//! - `system.backfill` (daemon with `[backfill] enabled`): the backfill's state, repos per state
//!   (this run's and the lake's), failures by reason, inactive repos by status, totals and the
//!   listing cursor, one `(metric, label, value, text)` row each.

use super::{QueryEngine, QueryError};
use crate::catalog::Snapshot;
use crate::sink::partition::{LakeFile, date_hour};
use crate::sink::store::Lake;
use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{MemTable, SchemaProvider, Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Table names in the `system` schema.
pub const NAMES: &[&str] = &["files", "checkpoint", "ingest", "backfill"];

fn files_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("path", DataType::Utf8, false),
        Field::new("partition", DataType::Utf8, false),
        Field::new("date", DataType::Utf8, false),
        // null for a file that spans more than an hour (a compacted long-tail day, a month of
        // history)
        Field::new("hour", DataType::Int64, true),
        Field::new("source", DataType::Utf8, false),
        Field::new("cursor_first", DataType::Int64, false),
        Field::new("cursor_last", DataType::Int64, false),
        Field::new("rows", DataType::Int64, true),
        Field::new("bytes", DataType::Int64, false),
    ]))
}

/// `system.files`, with row counts filled in lazily.
#[derive(Debug)]
struct FilesTable {
    files: Vec<LakeFile>,
    lake: Lake,
    cache: Arc<Mutex<HashMap<String, u64>>>,
}

/// Rows of a Parquet file, from its footer (two small range reads).
async fn footer_rows(lake: &Lake, path: &str, size: u64) -> Option<u64> {
    use object_store::ObjectStoreExt;
    if size < 12 {
        return None;
    }
    let store = lake.object_store();
    let loc = lake.object_path(path);
    let tail = store.get_range(&loc, size - 8..size).await.ok()?;
    let len = u32::from_le_bytes(tail.get(..4)?.try_into().ok()?) as u64;
    if len + 8 > size || tail.get(4..8)? != b"PAR1" {
        return None;
    }
    let footer = store.get_range(&loc, size - 8 - len..size - 8).await.ok()?;
    let meta = parquet::file::metadata::ParquetMetaDataReader::decode_metadata(&footer).ok()?;
    Some(meta.file_metadata().num_rows().max(0) as u64)
}

#[async_trait]
impl TableProvider for FilesTable {
    fn schema(&self) -> SchemaRef {
        files_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut rows = Vec::with_capacity(self.files.len());
        for f in &self.files {
            let known = f.rows.or_else(|| {
                self.cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&f.path)
                    .copied()
            });
            let n = match known {
                Some(n) => Some(n),
                None => {
                    let n = footer_rows(&self.lake, &f.path, f.size).await;
                    if let Some(n) = n {
                        self.cache
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(f.path.clone(), n);
                    }
                    n
                }
            };
            rows.push(n.map(|n| n as i64));
        }
        let dh: Vec<(String, String)> =
            self.files.iter().map(|f| date_hour(f.key.hour())).collect();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                self.files.iter().map(|f| f.path.clone()),
            )),
            Arc::new(StringArray::from_iter_values(
                self.files.iter().map(|f| f.key.name.value().to_string()),
            )),
            Arc::new(StringArray::from_iter_values(
                dh.iter().map(|(d, _)| d.clone()),
            )),
            Arc::new(Int64Array::from_iter(self.files.iter().map(|f| {
                (f.key.span() == crate::sink::partition::Span::Hour)
                    .then(|| f.key.hour().rem_euclid(24))
            }))),
            Arc::new(StringArray::from_iter_values(
                self.files.iter().map(|f| f.name.source().as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(
                self.files.iter().map(|f| f.name.first().value()),
            )),
            Arc::new(Int64Array::from_iter_values(
                self.files.iter().map(|f| f.name.last().value()),
            )),
            Arc::new(Int64Array::from(rows)),
            Arc::new(Int64Array::from_iter_values(
                self.files.iter().map(|f| f.size as i64),
            )),
        ];
        let batch = RecordBatch::try_new(files_schema(), cols)?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            files_schema(),
            projection.cloned(),
        )?)
    }
}

/// A source's URL as SQL users see it: network URLs without credentials or query, and of a
/// local file (a capture) only its name, never a path on this machine.
fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return file_name(url);
    };
    match scheme {
        "ws" | "wss" | "http" | "https" => {
            let rest = rest.split(['?', '#']).next().unwrap_or_default();
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
        _ => file_name(rest),
    }
}

fn file_name(path: &str) -> String {
    let name = path
        .rsplit(['/', '\\'])
        .find(|s| !s.is_empty())
        .unwrap_or("");
    format!("file:{name}")
}

fn checkpoint_table(snap: &Snapshot) -> Result<MemTable> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("cursor", DataType::Int64, false),
        Field::new("url", DataType::Utf8, false),
        Field::new("updated_at", DataType::Utf8, false),
    ]));
    let mut src = Vec::new();
    let mut cur = Vec::new();
    let mut url = Vec::new();
    let mut at = Vec::new();
    for (name, p) in [
        ("firehose", &snap.checkpoint.firehose),
        ("jetstream", &snap.checkpoint.jetstream),
    ] {
        if let Some(p) = p {
            src.push(name.to_string());
            cur.push(p.cursor);
            url.push(shown_url(&p.url));
            at.push(p.updated_at.clone());
        }
    }
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(src)),
            Arc::new(Int64Array::from(cur)),
            Arc::new(StringArray::from(url)),
            Arc::new(StringArray::from(at)),
        ],
    )?;
    MemTable::try_new(schema, vec![vec![batch]])
}

fn ingest_table() -> Result<MemTable> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("metric", DataType::Utf8, false),
        Field::new("labels", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
    ]));
    let samples = crate::telemetry::samples(&crate::telemetry::metrics().render());
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(
                samples.iter().map(|s| s.name.clone()),
            )),
            Arc::new(StringArray::from_iter_values(
                samples.iter().map(|s| s.labels.clone()),
            )),
            Arc::new(Float64Array::from_iter_values(
                samples.iter().map(|s| s.value),
            )),
        ],
    )?;
    MemTable::try_new(schema, vec![vec![batch]])
}

/// A row of `system.backfill`: metric, label, value, text.
type BackfillRow = (String, Option<String>, Option<i64>, Option<String>);

fn backfill_table(b: &crate::catalog::BackfillStatus) -> Result<MemTable> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("metric", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("value", DataType::Int64, true),
        Field::new("text", DataType::Utf8, true),
    ]));
    let mut rows: Vec<BackfillRow> = vec![
        ("state".into(), None, None, Some(b.state.clone())),
        ("error".into(), None, None, b.error.clone()),
        ("cursor".into(), None, None, b.cursor.clone()),
    ];
    for (metric, map) in [
        ("repos", &b.repos),
        ("lake_repos", &b.lake),
        ("failures", &b.failures),
        ("inactive", &b.inactive),
        ("totals", &b.totals),
    ] {
        for (k, v) in map {
            rows.push((
                metric.into(),
                Some(k.clone()),
                Some(i64::try_from(*v).unwrap_or(i64::MAX)),
                None,
            ));
        }
    }
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.0.clone()),
            )),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1.clone()))),
            Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.2))),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.3.clone()))),
        ],
    )?;
    MemTable::try_new(schema, vec![vec![batch]])
}

/// Registers the system tables of a snapshot.
pub async fn register(
    engine: &QueryEngine,
    snap: &Snapshot,
    schema: &dyn SchemaProvider,
) -> Result<(), QueryError> {
    let err = |e: datafusion::error::DataFusionError| QueryError::Internal(e.to_string());
    schema
        .register_table(
            "files".into(),
            Arc::new(FilesTable {
                files: snap.files.clone(),
                lake: engine.lake().clone(),
                cache: engine.row_cache.clone(),
            }),
        )
        .map_err(err)?;
    schema
        .register_table(
            "checkpoint".into(),
            Arc::new(checkpoint_table(snap).map_err(err)?),
        )
        .map_err(err)?;
    if engine.is_live() {
        schema
            .register_table("ingest".into(), Arc::new(ingest_table().map_err(err)?))
            .map_err(err)?;
    }
    if let Some(b) = &snap.backfill {
        schema
            .register_table("backfill".into(), Arc::new(backfill_table(b).map_err(err)?))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod url_tests {
    use super::shown_url;

    #[test]
    fn checkpoint_urls_show_no_local_path_and_no_credentials() {
        assert_eq!(
            shown_url("/home/me/captures/day1.jsonl.zst"),
            "file:day1.jsonl.zst"
        );
        assert_eq!(shown_url("file:///srv/x/cap.car"), "file:cap.car");
        assert_eq!(
            shown_url("wss://user:pw@jetstream.example/subscribe?wantedCollections=a"),
            "wss://jetstream.example/subscribe"
        );
        assert_eq!(shown_url("wss://relay"), "wss://relay");
    }
}
