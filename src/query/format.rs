//! Result encodings: JSON (an array of objects), NDJSON, CSV, Arrow IPC stream and Parquet.
//!
//! Each encoder turns batches into bytes as they come, so large results stream; Parquet is the
//! exception (its footer needs every row group) and is built in memory within the byte limit.

use arrow::array::Array;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

/// An output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `[{...},{...}]`.
    Json,
    /// One JSON object per line.
    Ndjson,
    /// CSV with a header row.
    Csv,
    /// Arrow IPC stream.
    Arrow,
    /// A Parquet file.
    Parquet,
}

impl Format {
    /// From a `format=` value.
    pub fn parse(s: &str) -> Option<Format> {
        Some(match s.to_ascii_lowercase().as_str() {
            "json" => Format::Json,
            "ndjson" | "jsonl" | "jsonlines" => Format::Ndjson,
            "csv" => Format::Csv,
            "arrow" | "ipc" | "arrows" => Format::Arrow,
            "parquet" => Format::Parquet,
            _ => return None,
        })
    }

    /// From an `Accept` header (first known type wins).
    pub fn from_accept(accept: &str) -> Option<Format> {
        accept.split(',').find_map(|part| {
            let mime = part.split(';').next().unwrap_or("").trim();
            Some(match mime {
                "application/json" => Format::Json,
                "application/x-ndjson" | "application/jsonl" | "application/ndjson" => {
                    Format::Ndjson
                }
                "text/csv" => Format::Csv,
                "application/vnd.apache.arrow.stream" => Format::Arrow,
                "application/vnd.apache.parquet" | "application/x-parquet" => Format::Parquet,
                _ => return None,
            })
        })
    }

    /// The `Content-Type` of the response.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Ndjson => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Arrow => "application/vnd.apache.arrow.stream",
            Format::Parquet => "application/vnd.apache.parquet",
        }
    }
}

/// Encodes a stream of batches.
pub struct Encoder {
    format: Format,
    first: bool,
    ipc: Option<arrow::ipc::writer::StreamWriter<Vec<u8>>>,
    parquet: Option<parquet::arrow::ArrowWriter<Vec<u8>>>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("format", &self.format)
            .finish()
    }
}

fn perr(e: parquet::errors::ParquetError) -> ArrowError {
    ArrowError::ExternalError(Box::new(e))
}

impl Encoder {
    /// Starts encoding results with this schema; returns the encoder and any leading bytes.
    pub fn try_new(format: Format, schema: &SchemaRef) -> Result<(Encoder, Vec<u8>), ArrowError> {
        let mut e = Encoder {
            format,
            first: true,
            ipc: None,
            parquet: None,
        };
        let head = match format {
            Format::Json => b"[".to_vec(),
            Format::Arrow => {
                let mut w = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema)?;
                let head = std::mem::take(w.get_mut());
                e.ipc = Some(w);
                head
            }
            Format::Parquet => {
                let props = parquet::file::properties::WriterProperties::builder()
                    .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
                    .build();
                e.parquet = Some(
                    parquet::arrow::ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))
                        .map_err(perr)?,
                );
                Vec::new()
            }
            Format::Ndjson | Format::Csv => Vec::new(),
        };
        Ok((e, head))
    }

    /// Encodes one batch.
    pub fn batch(&mut self, b: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
        let converted;
        let b = match self.format {
            Format::Json | Format::Ndjson => {
                converted = as_text(b, |t| matches!(t, DataType::Union(..)))?;
                &converted
            }
            Format::Csv => {
                converted = as_text(b, |t| t.is_nested() || matches!(t, DataType::Union(..)))?;
                &converted
            }
            Format::Arrow | Format::Parquet => b,
        };
        let out = match self.format {
            Format::Json => {
                let mut w = arrow::json::LineDelimitedWriter::new(Vec::new());
                w.write(b)?;
                w.finish()?;
                let lines = w.into_inner();
                let mut out = Vec::with_capacity(lines.len() + 1);
                for line in lines.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
                    if !self.first {
                        out.push(b',');
                    }
                    self.first = false;
                    out.extend_from_slice(line);
                }
                out
            }
            Format::Ndjson => {
                let mut w = arrow::json::LineDelimitedWriter::new(Vec::new());
                w.write(b)?;
                w.finish()?;
                w.into_inner()
            }
            Format::Csv => {
                let mut out = Vec::new();
                {
                    let mut w = arrow::csv::WriterBuilder::new()
                        .with_header(self.first)
                        .build(&mut out);
                    w.write(b)?;
                }
                self.first = false;
                out
            }
            Format::Arrow => match self.ipc.as_mut() {
                Some(w) => {
                    w.write(b)?;
                    std::mem::take(w.get_mut())
                }
                None => Vec::new(),
            },
            Format::Parquet => {
                if let Some(w) = self.parquet.as_mut() {
                    w.write(b).map_err(perr)?;
                }
                Vec::new()
            }
        };
        Ok(out)
    }

    /// Bytes held back for the end (Parquet holds everything).
    pub fn buffered(&self) -> usize {
        self.parquet
            .as_ref()
            .map_or(0, |w| w.in_progress_size() + w.bytes_written())
    }

    /// Ends the output.
    pub fn finish(&mut self, schema: &SchemaRef) -> Result<Vec<u8>, ArrowError> {
        Ok(match self.format {
            Format::Json => b"]".to_vec(),
            Format::Csv if self.first => {
                // no rows: still write the header
                let mut out = Vec::new();
                {
                    let mut w = arrow::csv::WriterBuilder::new()
                        .with_header(true)
                        .build(&mut out);
                    w.write(&as_text(&RecordBatch::new_empty(schema.clone()), |t| {
                        t.is_nested() || matches!(t, DataType::Union(..))
                    })?)?;
                }
                out
            }
            Format::Ndjson | Format::Csv => Vec::new(),
            Format::Arrow => match self.ipc.as_mut() {
                Some(w) => {
                    w.finish()?;
                    std::mem::take(w.get_mut())
                }
                None => Vec::new(),
            },
            Format::Parquet => match self.parquet.take() {
                Some(w) => w.into_inner().map_err(perr)?,
                None => Vec::new(),
            },
        })
    }
}

/// `b` with the columns whose type `unsupported` names rendered as text (JSON writers cannot
/// encode unions, such as `json_get`'s result; CSV cannot encode lists or structs).
fn as_text(
    b: &RecordBatch,
    unsupported: impl Fn(&DataType) -> bool,
) -> Result<RecordBatch, ArrowError> {
    if !b
        .schema()
        .fields()
        .iter()
        .any(|f| unsupported(f.data_type()))
    {
        return Ok(b.clone());
    }
    let opts = arrow::util::display::FormatOptions::default().with_null("");
    let mut fields = Vec::with_capacity(b.num_columns());
    let mut columns: Vec<arrow::array::ArrayRef> = Vec::with_capacity(b.num_columns());
    for (f, c) in b.schema().fields().iter().zip(b.columns()) {
        if unsupported(f.data_type()) {
            let fmt = arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &opts)?;
            let mut out = arrow::array::StringBuilder::with_capacity(c.len(), c.len() * 16);
            for i in 0..c.len() {
                if c.is_null(i) {
                    out.append_null();
                } else {
                    out.append_value(fmt.value(i).to_string());
                }
            }
            fields.push(arrow::datatypes::Field::new(f.name(), DataType::Utf8, true));
            columns.push(std::sync::Arc::new(out.finish()));
        } else {
            fields.push(f.as_ref().clone());
            columns.push(c.clone());
        }
    }
    RecordBatch::try_new(
        std::sync::Arc::new(arrow::datatypes::Schema::new(fields)),
        columns,
    )
}
