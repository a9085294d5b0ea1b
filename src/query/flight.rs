//! Arrow Flight SQL (`server.flight_listen`): ADBC and JDBC Flight SQL drivers, and any Flight
//! client, read results as Arrow record batches, with no text format in between.
//!
//! Served (arrow-flight's `FlightSqlService` over tonic, HTTP/2 without TLS):
//! - statements: `GetFlightInfo(CommandStatementQuery)` plans the query (for its schema) and
//!   answers one endpoint whose ticket carries the statement; `DoGet` runs it;
//! - prepared statements: `CreatePreparedStatement` (the result's and the parameters'
//!   schemas), `DoPut` of a parameter row, `GetFlightInfo`/`DoGet`, `ClosePreparedStatement`;
//! - `GetCatalogs`, `GetDbSchemas`, `GetTables` (with the columns' schemas when asked),
//!   `GetTableTypes`, `GetSqlInfo`.
//!
//! Writes (`DoPut` of updates and ingest, transactions, Substrait) are refused.
//!
//! Handles are stateless: a statement's or prepared statement's handle holds its SQL and its
//! bound parameters (as Arrow IPC), so a client cannot make the server keep anything, and
//! `DoPut` of parameters answers a new handle (the Flight SQL 15 way). A handle is only a
//! query the client could have sent as text; it is planned and checked again on `DoGet`.
//!
//! Every query runs through the same core as HTTP and Postgres ([`super::frontend::start`]):
//! the snapshot, the text guard, read-only plans, the deadline, the memory pool, admission
//! and the query runtime, the row limit; the batches' bytes count against
//! `max_result_bytes`. Planning for `GetFlightInfo` is admitted and timed the same way.
//!
//! Authentication: with `server.token` set, every call needs `authorization: Bearer <token>`
//! (compared in constant time). The Flight handshake also accepts HTTP Basic credentials
//! whose password is the token (any user name) and answers the bearer header, for drivers
//! that log in with a user name and password.

use super::frontend::{Protocol, Tally, ct_eq, too_many_bytes};
use super::{Dialect, QueryEngine, QueryError};
use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

/// The catalog every table is in.
const CATALOG: &str = "datafusion";
/// The schema of the tables without a schema in their name (`events`, `posts`, …).
const DEFAULT_SCHEMA: &str = "public";
/// Largest message a client may send (a parameter batch, a command).
const MAX_REQUEST: usize = 1 << 20;
/// Largest parameter batch a prepared statement takes, in bytes.
const MAX_PARAMS: usize = 64 << 10;
/// First bytes of every handle this server makes.
const HANDLE_MAGIC: &[u8; 8] = b"atlake1\0";

/// The Flight SQL front end over a [`QueryEngine`].
pub struct FlightFrontEnd {
    engine: Arc<QueryEngine>,
    token: Option<String>,
    info: SqlInfoData,
}

impl std::fmt::Debug for FlightFrontEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightFrontEnd")
            .field("token", &self.token.is_some())
            .finish()
    }
}

impl FlightFrontEnd {
    /// A front end answering with `engine`; with `token`, every call needs it.
    pub fn try_new(engine: Arc<QueryEngine>, token: Option<String>) -> Result<Self, QueryError> {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "atlake");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        // SQL_SUPPORTED_TRANSACTION_NONE
        b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        b.append(SqlInfo::FlightSqlServerCancel, false);
        b.append(SqlInfo::FlightSqlServerStatementTimeout, 0i32);
        let info = b
            .build()
            .map_err(|e| QueryError::Internal(format!("Flight SQL server info: {e}")))?;
        Ok(FlightFrontEnd {
            engine,
            token,
            info,
        })
    }

    /// The token check of every call.
    fn authorize(&self, md: &MetadataMap) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        if given.is_some_and(|t| ct_eq(t.as_bytes(), token.as_bytes())) {
            Ok(())
        } else {
            Err(Status::unauthenticated("a valid bearer token is required"))
        }
    }
}

/// The token of an `authorization: Bearer <token>` value.
fn bearer(v: &str) -> Option<&str> {
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// The password of an `authorization: Basic <base64(user:password)>` value.
fn basic_password(v: &str) -> Option<String> {
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = data_encoding::BASE64.decode(rest.trim().as_bytes()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    text.split_once(':').map(|(_, p)| p.to_string())
}

/// A query error as a gRPC status, with its [`QueryError::code`] in the message.
fn status(e: &QueryError) -> Status {
    let msg = format!("{}: {e}", e.code());
    match e {
        QueryError::Sql(_) => Status::invalid_argument(msg),
        QueryError::Forbidden(_) => Status::permission_denied(msg),
        QueryError::Timeout(_) => Status::deadline_exceeded(msg),
        QueryError::TooLarge(_) | QueryError::ResourcesExhausted(_) | QueryError::Busy(_) => {
            Status::resource_exhausted(msg)
        }
        QueryError::Internal(_) => Status::internal(msg),
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

/// A statement and its bound parameters, as a handle.
#[derive(Debug, Clone, PartialEq)]
struct Handle {
    sql: String,
    /// One row of parameters, as an Arrow IPC stream.
    params: Option<Vec<u8>>,
}

impl Handle {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.sql.len());
        out.extend_from_slice(HANDLE_MAGIC);
        out.extend_from_slice(&(self.sql.len() as u32).to_le_bytes());
        out.extend_from_slice(self.sql.as_bytes());
        if let Some(p) = &self.params {
            out.extend_from_slice(p);
        }
        out
    }

    fn decode(b: &[u8]) -> Result<Handle, Status> {
        let bad = || Status::invalid_argument("not a statement handle of this server");
        let rest = b.strip_prefix(HANDLE_MAGIC.as_slice()).ok_or_else(bad)?;
        let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err(bad());
        }
        let (sql, params) = rest.split_at(len);
        let sql = std::str::from_utf8(sql).map_err(|_| bad())?.to_string();
        Ok(Handle {
            sql,
            params: (!params.is_empty()).then(|| params.to_vec()),
        })
    }

    /// The bound parameters as DataFusion values.
    fn param_values(&self) -> Result<Option<datafusion::common::ParamValues>, Status> {
        let Some(ipc) = &self.params else {
            return Ok(None);
        };
        let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
            .map_err(|e| Status::invalid_argument(format!("bad parameters: {e}")))?;
        let mut row: Option<Vec<datafusion::scalar::ScalarValue>> = None;
        for b in reader {
            let b = b.map_err(|e| Status::invalid_argument(format!("bad parameters: {e}")))?;
            if b.num_rows() == 0 {
                continue;
            }
            if b.num_rows() > 1 || row.is_some() {
                return Err(Status::invalid_argument(
                    "a query takes one row of parameters",
                ));
            }
            let mut values = Vec::with_capacity(b.num_columns());
            for c in b.columns() {
                values.push(
                    datafusion::scalar::ScalarValue::try_from_array(c, 0)
                        .map_err(|e| Status::invalid_argument(format!("bad parameter: {e}")))?,
                );
            }
            row = Some(values);
        }
        Ok(row.map(datafusion::common::ParamValues::from))
    }
}

/// The type a column goes out as: string and binary views become plain strings and binaries.
/// A slice of a view array carries all of its data buffers into each IPC message (a 2 MiB
/// slice of a 100 MB batch would send 100 MB), and not every Flight client reads views.
fn wire_type(t: &DataType) -> DataType {
    let field =
        |f: &Arc<Field>| Arc::new(f.as_ref().clone().with_data_type(wire_type(f.data_type())));
    match t {
        DataType::Utf8View => DataType::Utf8,
        DataType::BinaryView => DataType::Binary,
        DataType::List(f) => DataType::List(field(f)),
        DataType::LargeList(f) => DataType::LargeList(field(f)),
        DataType::FixedSizeList(f, n) => DataType::FixedSizeList(field(f), *n),
        DataType::Struct(fs) => DataType::Struct(fs.iter().map(field).collect()),
        DataType::Map(f, sorted) => DataType::Map(field(f), *sorted),
        other => other.clone(),
    }
}

/// The schema results go out with (see [`wire_type`]).
fn wire_schema(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new_with_metadata(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_data_type(wire_type(f.data_type())))
            .collect::<Vec<_>>(),
        schema.metadata().clone(),
    ))
}

/// A batch in the wire schema.
fn to_wire(b: RecordBatch, wire: &SchemaRef) -> Result<RecordBatch, QueryError> {
    if b.schema().fields() == wire.fields() {
        return Ok(b);
    }
    let mut cols = Vec::with_capacity(b.num_columns());
    for (c, f) in b.columns().iter().zip(wire.fields()) {
        if c.data_type() == f.data_type() {
            cols.push(c.clone());
        } else {
            cols.push(
                arrow::compute::cast(c, f.data_type())
                    .map_err(|e| QueryError::Internal(format!("preparing a column: {e}")))?,
            );
        }
    }
    RecordBatch::try_new(wire.clone(), cols)
        .map_err(|e| QueryError::Internal(format!("preparing a batch: {e}")))
}

/// A schema as the IPC message Flight SQL puts in `FlightInfo` and prepared statements.
fn schema_bytes(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let IpcMessage(b) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e| internal("encoding a schema", e))?;
    Ok(b)
}

/// One endpoint whose ticket is `cmd`, with the result's schema.
fn info_for(
    schema: &Schema,
    cmd: Any,
    descriptor: FlightDescriptor,
) -> Result<Response<FlightInfo>, Status> {
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| internal("encoding a schema", e))?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(cmd.encode_to_vec())))
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

type DoGetStream = Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send>>;

/// A batch's rows as a `DoGet` answer.
fn batch_stream(batch: RecordBatch) -> Response<DoGetStream> {
    let schema = batch.schema();
    let s = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::once(async move { Ok(batch) }))
        .map_err(Status::from);
    Response::new(Box::pin(s))
}

impl FlightFrontEnd {
    /// Plans `handle`'s query (without running it) for its result's schema and its
    /// parameters' types, admitted and within the timeout, on the query runtime.
    async fn describe(&self, handle: &Handle) -> Result<(SchemaRef, Schema), QueryError> {
        let engine = self.engine.clone();
        let ticket = engine.admit()?;
        let timeout = engine.limits.timeout;
        let deadline = std::time::Instant::now() + timeout;
        let sql = handle.sql.clone();
        let params = handle
            .param_values()
            .map_err(|s| QueryError::Sql(s.message().to_string()))?;
        let work = async move {
            let _slot = ticket.slot().await?;
            let (_ctx, plan) = engine
                .logical_plan(&sql, Some(deadline), Dialect::DataFusion)
                .await?;
            let types = plan
                .get_parameter_types()
                .map_err(QueryError::from_datafusion)?;
            let mut numbered: Vec<(usize, DataType)> = types
                .into_iter()
                .filter_map(|(k, t)| {
                    let n = k.trim_start_matches('$').parse::<usize>().ok()?;
                    Some((n, t.unwrap_or(DataType::Null)))
                })
                .collect();
            numbered.sort_by_key(|(n, _)| *n);
            let param_schema = Schema::new(
                numbered
                    .into_iter()
                    .map(|(n, t)| Field::new(format!("${n}"), t, true))
                    .collect::<Vec<_>>(),
            );
            let plan = match params {
                Some(p) => plan
                    .with_param_values(p)
                    .map_err(QueryError::from_datafusion)?,
                None => plan,
            };
            Ok::<_, QueryError>((wire_schema(plan.schema().as_arrow()), param_schema))
        };
        let mut task = super::pool::spawn(async move {
            tokio::time::timeout_at(deadline.into(), work)
                .await
                .unwrap_or(Err(QueryError::Timeout(timeout)))
        })?;
        task.join().await?
    }

    /// [`FlightFrontEnd::describe`], its failure counted as a Flight SQL query's.
    async fn describe_counted(&self, handle: &Handle) -> Result<(SchemaRef, Schema), Status> {
        self.describe(handle).await.map_err(|e| {
            Tally::start(Protocol::FlightSql).failed(&e);
            status(&e)
        })
    }

    /// Runs `handle`'s query through the core; its batches as Flight data.
    async fn run(&self, handle: Handle) -> Result<Response<DoGetStream>, Status> {
        let mut tally = Tally::start(Protocol::FlightSql);
        let params = match handle.param_values() {
            Ok(p) => p,
            Err(s) => {
                tally.failed(&QueryError::Sql(s.message().to_string()));
                return Err(s);
            }
        };
        let max_bytes = self.engine.limits.max_bytes;
        let head = |schema: &SchemaRef| {
            let wire = wire_schema(schema);
            Ok((wire.clone(), (wire, 0u64)))
        };
        let encode = move |(wire, total): &mut (SchemaRef, u64), b: RecordBatch| {
            let b = to_wire(b, wire)?;
            *total += super::frontend::batch_bytes(&b) as u64;
            if *total > max_bytes {
                return Err(too_many_bytes(max_bytes));
            }
            Ok(b)
        };
        let started = super::frontend::start(
            &self.engine,
            handle.sql,
            params,
            Dialect::DataFusion,
            head,
            encode,
        )
        .await;
        let (schema, batches) = match started {
            Ok(x) => x,
            Err(e) => {
                tally.failed(&e);
                return Err(status(&e));
            }
        };
        // the query's tally ends with its stream: at the last batch, an error, or the client
        // leaving
        let batches = Box::pin(batches);
        let batches = futures::stream::unfold((batches, tally), |(mut s, mut tally)| async move {
            match s.next().await {
                Some(Ok(b)) => Some((Ok(b), (s, tally))),
                Some(Err(e)) => {
                    tally.failed(&e);
                    Some((Err(FlightError::Tonic(Box::new(status(&e)))), (s, tally)))
                }
                None => None,
            }
        });
        let data = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(Status::from);
        Ok(Response::new(Box::pin(data)))
    }

    /// The tables of a fresh snapshot: (schema, table, its columns), admitted and timed.
    async fn tables(&self) -> Result<Vec<(String, String, SchemaRef)>, Status> {
        let ticket = self.engine.admit().map_err(|e| status(&e))?;
        let timeout = self.engine.limits.timeout;
        let engine = self.engine.clone();
        let listed = tokio::time::timeout(timeout, async move {
            let _slot = ticket.slot().await?;
            engine.tables().await
        })
        .await
        .unwrap_or(Err(QueryError::Timeout(timeout)))
        .map_err(|e| status(&e))?;
        Ok(listed
            .into_iter()
            .map(|(name, schema)| match name.split_once('.') {
                Some((s, t)) => (s.to_string(), t.to_string(), schema),
                None => (DEFAULT_SCHEMA.to_string(), name, schema),
            })
            .collect())
    }
}

/// Decodes a `DoPut` of parameters into one IPC stream, at most [`MAX_PARAMS`] bytes.
async fn read_params(request: Request<PeekableFlightDataStream>) -> Result<Vec<u8>, Status> {
    let data = request.into_inner().map_err(FlightError::from);
    let mut batches = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(data);
    let mut out: Option<arrow::ipc::writer::StreamWriter<Vec<u8>>> = None;
    while let Some(b) = batches.next().await {
        let b = b.map_err(|e| Status::invalid_argument(format!("bad parameters: {e}")))?;
        if out.is_none() {
            out = Some(
                arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &b.schema())
                    .map_err(|e| internal("encoding parameters", e))?,
            );
        }
        if let Some(w) = out.as_mut() {
            w.write(&b)
                .map_err(|e| internal("encoding parameters", e))?;
            if w.get_ref().len() > MAX_PARAMS {
                return Err(Status::resource_exhausted(format!(
                    "parameters larger than {MAX_PARAMS} bytes"
                )));
            }
        }
    }
    match out {
        Some(w) => w
            .into_inner()
            .map_err(|e| internal("encoding parameters", e)),
        None => Ok(Vec::new()),
    }
}

#[tonic::async_trait]
impl FlightSqlService for FlightFrontEnd {
    type FlightService = FlightFrontEnd;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: Default::default(),
        };
        let ok = |header: Option<String>| -> Result<Response<_>, Status> {
            let out: Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>> =
                Box::pin(futures::stream::iter([Ok(reply.clone())]));
            let mut r = Response::new(out);
            if let Some(h) = header {
                let v = h.parse().map_err(|_| Status::internal("token header"))?;
                r.metadata_mut().insert("authorization", v);
            }
            Ok(r)
        };
        let Some(token) = &self.token else {
            return ok(None);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let accepted = match given {
            Some(v) => bearer(v)
                .map(str::to_string)
                .or_else(|| basic_password(v))
                .is_some_and(|t| ct_eq(t.as_bytes(), token.as_bytes())),
            None => false,
        };
        if accepted {
            ok(Some(format!("Bearer {token}")))
        } else {
            Err(Status::unauthenticated(
                "a valid bearer token (or the token as the password) is required",
            ))
        }
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let handle = Handle {
            sql: query.query,
            params: None,
        };
        let (schema, _) = self.describe_counted(&handle).await?;
        let ticket = TicketStatementQuery {
            statement_handle: handle.encode().into(),
        };
        info_for(&schema, ticket.as_any(), request.into_inner())
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let handle = Handle::decode(&cmd.prepared_statement_handle)?;
        let (schema, _) = self.describe_counted(&handle).await?;
        info_for(&schema, cmd.as_any(), request.into_inner())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let schema = query.into_builder().schema();
        info_for(
            &schema,
            CommandGetCatalogs {}.as_any(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let schema = query.clone().into_builder().schema();
        info_for(&schema, query.as_any(), request.into_inner())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let schema = query.clone().into_builder().schema();
        info_for(&schema, query.as_any(), request.into_inner())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let schema = query.into_builder().schema();
        info_for(
            &schema,
            CommandGetTableTypes {}.as_any(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let schema = query.clone().into_builder(&self.info).schema();
        info_for(&schema, query.as_any(), request.into_inner())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(request.metadata())?;
        self.run(Handle::decode(&ticket.statement_handle)?).await
    }

    async fn do_get_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(request.metadata())?;
        self.run(Handle::decode(&cmd.prepared_statement_handle)?)
            .await
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(request.metadata())?;
        let mut b = query.into_builder();
        b.append(CATALOG);
        Ok(batch_stream(
            b.build().map_err(|e| internal("listing catalogs", e))?,
        ))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(request.metadata())?;
        let mut names: Vec<String> = self.tables().await?.into_iter().map(|t| t.0).collect();
        names.push("information_schema".into());
        names.sort();
        names.dedup();
        let mut b = query.into_builder();
        for n in names {
            b.append(CATALOG, n);
        }
        Ok(batch_stream(
            b.build().map_err(|e| internal("listing schemas", e))?,
        ))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(request.metadata())?;
        let mut b = query.into_builder();
        for (schema, table, columns) in self.tables().await? {
            b.append(CATALOG, schema, table, "TABLE", &columns)
                .map_err(|e| internal("listing tables", e))?;
        }
        Ok(batch_stream(
            b.build().map_err(|e| internal("listing tables", e))?,
        ))
    }

    async fn do_get_table_types(
        &self,
        _query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(request.metadata())?;
        let schema = Arc::new(Schema::new(vec![Field::new(
            "table_type",
            DataType::Utf8,
            false,
        )]));
        let types = arrow::array::StringArray::from(vec!["TABLE"]);
        let batch = RecordBatch::try_new(schema, vec![Arc::new(types)])
            .map_err(|e| internal("listing table types", e))?;
        Ok(batch_stream(batch))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(request.metadata())?;
        let batch = query
            .into_builder(&self.info)
            .build()
            .map_err(|e| internal("server info", e))?;
        Ok(batch_stream(batch))
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        self.authorize(request.metadata())?;
        let mut handle = Handle::decode(&query.prepared_statement_handle)?;
        let params = read_params(request).await?;
        handle.params = (!params.is_empty()).then_some(params);
        // the parameters are checked now: one row, values DataFusion takes
        handle.param_values()?;
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(handle.encode().into()),
        })
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        self.authorize(request.metadata())?;
        let handle = Handle {
            sql: query.query,
            params: None,
        };
        let (schema, params) = self.describe_counted(&handle).await?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.encode().into(),
            dataset_schema: schema_bytes(&schema)?,
            parameter_schema: schema_bytes(&params)?,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        self.authorize(request.metadata())?;
        // handles hold their statement: nothing is kept to release
        Handle::decode(&query.prepared_statement_handle).map(|_| ())
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// Serves Flight SQL on `listener` until `shutdown` resolves; then calls get
/// [`super::http::SHUTDOWN_GRACE`] to end. At most `max_connections` connections at once;
/// more wait in the listen backlog. A connection is closed when its HTTP/2 preface does not
/// arrive within `header_timeout`, when nothing moves on it for `idle_timeout`, or when its
/// HTTP/2 pings go unanswered for 20 s.
pub async fn serve(
    listener: tokio::net::TcpListener,
    front: Arc<FlightFrontEnd>,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    use futures::FutureExt;
    let shutdown = shutdown.shared();
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let stop = shutdown.clone();
    let limits = front.engine.limits.conn.clone();
    let incoming = futures::stream::unfold(
        (listener, slots, Box::pin(stop)),
        move |(listener, slots, mut stop)| {
            let limits = limits.clone();
            async move {
                match super::frontend::next_connection(
                    &listener,
                    &slots,
                    stop.as_mut(),
                    Protocol::FlightSql,
                )
                .await
                {
                    Ok(Some((sock, slot))) => {
                        if let Err(e) = sock.set_nodelay(true) {
                            tracing::debug!(error = %e, "TCP_NODELAY on a Flight SQL connection");
                        }
                        let conn = Conn::new(sock, slot, &limits);
                        Some((Ok::<_, std::io::Error>(conn), (listener, slots, stop)))
                    }
                    Ok(None) => None,
                    Err(e) => Some((Err(e), (listener, slots, stop))),
                }
            }
        },
    );
    let service = FlightServiceServer::from_arc(front)
        .max_decoding_message_size(MAX_REQUEST)
        .max_encoding_message_size(usize::MAX);
    let grace = async move {
        shutdown.await;
        tokio::time::sleep(super::http::SHUTDOWN_GRACE).await;
    };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, grace)
        .await
}

/// A client connection, holding one of the connection slots while it is open. It is closed
/// when its first bytes (the HTTP/2 preface) do not arrive within `header_timeout`, or when
/// nothing is read or written for `idle_timeout` (a running query keeps its connection busy
/// with HTTP/2 pings, and `idle_timeout` is longer than the query timeout).
struct Conn {
    sock: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    timer: Pin<Box<tokio::time::Sleep>>,
    started: bool,
    /// Bytes read before the preface was complete.
    early: usize,
    idle: Duration,
}

/// Length of the HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const PREFACE_LEN: usize = 24;

impl Conn {
    fn new(
        sock: tokio::net::TcpStream,
        slot: tokio::sync::OwnedSemaphorePermit,
        limits: &super::ConnLimits,
    ) -> Conn {
        metrics::gauge!("atlake_flight_connections").increment(1.0);
        Conn {
            sock,
            _slot: slot,
            timer: Box::pin(tokio::time::sleep(limits.header_timeout)),
            started: false,
            early: 0,
            idle: limits.idle_timeout,
        }
    }

    fn active(&mut self) {
        self.started = true;
        let at = tokio::time::Instant::now() + self.idle;
        self.timer.as_mut().reset(at);
    }

    /// Whether the connection's time is up (registers the timer's wake-up otherwise).
    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> Option<std::io::Error> {
        if self.timer.as_mut().poll(cx).is_pending() {
            return None;
        }
        let why = if self.started {
            metrics::counter!("atlake_flight_idle_timeouts_total").increment(1);
            "nothing read or written within the idle timeout"
        } else {
            metrics::counter!("atlake_flight_header_timeouts_total").increment(1);
            "the HTTP/2 preface did not arrive within the header timeout"
        };
        Some(std::io::Error::new(std::io::ErrorKind::TimedOut, why))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        metrics::gauge!("atlake_flight_connections").decrement(1.0);
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.sock.connect_info()
    }
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        match Pin::new(&mut self.sock).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if self.started {
                    if n > 0 {
                        self.active();
                    }
                } else {
                    // the header deadline holds until the whole preface is in
                    self.early += n;
                    if self.early >= PREFACE_LEN {
                        self.active();
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.expired(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.sock).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r
            && n > 0
            && self.started
        {
            self.active();
        }
        r
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_carry_their_statement_and_parameters_and_refuse_anything_else() {
        let h = Handle {
            sql: "SELECT $1".into(),
            params: Some(vec![1, 2, 3]),
        };
        assert_eq!(Handle::decode(&h.encode()).ok(), Some(h));
        let bare = Handle {
            sql: "SELECT 1".into(),
            params: None,
        };
        assert_eq!(Handle::decode(&bare.encode()).ok(), Some(bare.clone()));
        let enc = bare.encode();
        for bad in [
            &b""[..],
            &b"atlake1"[..],
            &enc[..enc.len() - 1],
            &b"atlake2\0\x01\0\0\0x"[..],
            &b"atlake1\0\xff\xff\xff\xffx"[..],
        ] {
            assert!(Handle::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_come_as_bearer_or_as_the_basic_password() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
        let b = data_encoding::BASE64.encode(b"anyone:s3cret:x");
        assert_eq!(
            basic_password(&format!("Basic {b}")).as_deref(),
            Some("s3cret:x")
        );
        assert_eq!(basic_password(&format!("Bearer {b}")), None);
        assert_eq!(basic_password("Basic !!!"), None);
    }

    #[test]
    fn query_errors_keep_their_kind_as_a_status() {
        use tonic::Code;
        for (e, code) in [
            (QueryError::Sql("x".into()), Code::InvalidArgument),
            (QueryError::Forbidden("x".into()), Code::PermissionDenied),
            (
                QueryError::Timeout(Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
            (QueryError::TooLarge("x".into()), Code::ResourceExhausted),
            (QueryError::Busy("x".into()), Code::ResourceExhausted),
            (QueryError::Internal("x".into()), Code::Internal),
        ] {
            let s = status(&e);
            assert_eq!(s.code(), code, "{e}");
            assert!(s.message().starts_with(e.code()), "{}", s.message());
        }
    }
}
