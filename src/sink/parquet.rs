//! Parquet encoding of one partition flush.
//!
//! Rows are sorted by `(did, time)` within a file (so `did` pages compress and prune well, and a
//! user's activity is contiguous). Pages are zstd-compressed with dictionary encoding, page-level
//! statistics and the page index, and an optional bloom filter on `did`. Key-value metadata
//! records the source, cursor range, row count and schema version, so the lake can be rebuilt
//! from its files alone.

use crate::config::WriterConfig;
use crate::model::SourceKind;
use crate::model::rows::{SCHEMA_VERSION, TableKind};
use arrow::compute::{SortColumn, SortOptions, lexsort_to_indices, take_record_batch};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

/// Metadata keys written into every file.
pub mod meta {
    /// `firehose` or `jetstream`.
    pub const SOURCE: &str = "atlake.source";
    /// Lowest cursor in the file.
    pub const CURSOR_FIRST: &str = "atlake.cursor_first";
    /// Highest cursor in the file.
    pub const CURSOR_LAST: &str = "atlake.cursor_last";
    /// File schema version.
    pub const SCHEMA_VERSION: &str = "atlake.schema_version";
    /// Partition directory.
    pub const PARTITION: &str = "atlake.partition";
    /// Rows in the file.
    pub const ROWS: &str = "atlake.rows";
}

/// Why a flush could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// Arrow refused the batches.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// Parquet refused them.
    #[error("parquet: {0}")]
    Parquet(#[from] ParquetError),
}

/// What goes into one file besides the rows.
#[derive(Debug, Clone)]
pub struct FileMeta {
    /// Source kind.
    pub source: SourceKind,
    /// Lowest cursor.
    pub first: i64,
    /// Highest cursor.
    pub last: i64,
    /// Partition directory.
    pub partition: String,
}

/// Sorts rows by `(did, time)` (errors: by `time`).
pub fn sort_batch(kind: TableKind, batch: &RecordBatch) -> Result<RecordBatch, EncodeError> {
    if batch.num_rows() < 2 {
        return Ok(batch.clone());
    }
    let cols: Vec<&str> = if kind == TableKind::Errors {
        vec!["time_us"]
    } else {
        vec!["did", "time_us"]
    };
    let sort_cols: Vec<SortColumn> = cols
        .iter()
        .filter_map(|c| batch.column_by_name(c))
        .map(|a| SortColumn {
            values: a.clone(),
            options: Some(SortOptions::default()),
        })
        .collect();
    let idx = lexsort_to_indices(&sort_cols, None)?;
    Ok(take_record_batch(batch, &idx)?)
}

/// Writer properties for a kind.
pub fn properties(
    cfg: &WriterConfig,
    kind: TableKind,
    meta: &FileMeta,
    rows: usize,
) -> WriterProperties {
    let level = ZstdLevel::try_new(cfg.zstd_level).unwrap_or_default();
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_dictionary_enabled(true)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(cfg.row_group_rows))
        .set_created_by(format!("atlake {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(vec![
            KeyValue::new(meta::SOURCE.into(), meta.source.as_str().to_string()),
            KeyValue::new(meta::CURSOR_FIRST.into(), meta.first.to_string()),
            KeyValue::new(meta::CURSOR_LAST.into(), meta.last.to_string()),
            KeyValue::new(meta::SCHEMA_VERSION.into(), SCHEMA_VERSION.to_string()),
            KeyValue::new(meta::PARTITION.into(), meta.partition.clone()),
            KeyValue::new(meta::ROWS.into(), rows.to_string()),
        ]));
    // raw payloads and record JSON are unique per row: dictionary pages would only be discarded
    for col in ["record", "raw", "rkey", "cid"] {
        b = b.set_column_dictionary_enabled(ColumnPath::from(col), false);
    }
    if cfg.bloom_filter_did && kind != TableKind::Errors {
        b = b
            .set_column_bloom_filter_enabled(ColumnPath::from("did"), true)
            .set_column_bloom_filter_max_ndv(ColumnPath::from("did"), (rows as u64).max(16))
            .set_column_bloom_filter_fpp(ColumnPath::from("did"), 0.01);
    }
    b.build()
}

/// Encodes batches (already sorted) as one Parquet file in memory.
pub fn encode(
    cfg: &WriterConfig,
    kind: TableKind,
    meta: &FileMeta,
    batch: &RecordBatch,
) -> Result<Vec<u8>, EncodeError> {
    let props = properties(cfg, kind, meta, batch.num_rows());
    let mut out = Vec::with_capacity(batch.get_array_memory_size() / 4 + 4096);
    let mut w = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
    w.write(batch)?;
    w.close()?;
    Ok(out)
}
