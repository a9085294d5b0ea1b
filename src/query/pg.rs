//! The Postgres wire protocol (`server.pg_listen`): psql, DBeaver, Grafana, Metabase, Superset
//! and drivers such as psycopg and JDBC connect to atlake as to a Postgres server.
//!
//! The protocol is `pgwire`'s; Arrow values become Postgres rows and parameters become
//! DataFusion values through `arrow-pg`; `pg_catalog` and the Postgres-dialect rewrites that
//! catalog queries need come from `datafusion-pg-catalog` (the three crates
//! `datafusion-postgres` is made of; its own handler runs every query on one shared session,
//! without atlake's snapshot, limits or refusals, so atlake has its own handler).
//!
//! Every statement runs through the same core as HTTP ([`QueryEngine::open`]): a fresh
//! snapshot, the text guard, read-only plans, the deadline, the memory pool, admission and
//! the query runtime, the row limit; the encoded rows count against `max_result_bytes`.
//! Both the simple and the extended (Parse/Bind/Execute, parameters) protocols are served.
//!
//! A few statements clients send on connect are answered here without the engine: `SET` of
//! the session settings clients use (`application_name`, `extra_float_digits`, `DateStyle`,
//! …), `SHOW` of them, and `BEGIN`/`COMMIT`/`ROLLBACK` (no-ops: every statement reads its own
//! snapshot of the lake). Any other `SET` is refused like any write.
//!
//! Authentication: with `server.token` set, the token is the password (any user and database
//! name), compared in constant time; without it, no password is asked. TLS is offered when
//! `server.pg_tls_cert` and `server.pg_tls_key` are set.

use super::frontend::{Protocol, Tally, ct_eq, too_many_bytes};
use super::{Dialect, QueryEngine, QueryError};
use arrow::datatypes::{DataType, SchemaRef};
use arrow_pg::datatypes::{arrow_schema_to_pg_fields, df::deserialize_parameters, into_pg_type};
use async_trait::async_trait;
use datafusion::prelude::SessionContext;
use futures::{Sink, SinkExt, Stream};
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, PgWireConnectionState, PgWireServerHandlers, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The `server_version` clients are told: the Postgres whose catalog `pg_catalog` copies.
pub const SERVER_VERSION: &str = "16.6 (atlake)";

/// `pg_catalog`, shared by every Postgres session of an engine, so object ids stay the same
/// from one query to the next (psql's `\d` asks for a table's oid, then for its columns by
/// that oid). It lists the tables of a session over an empty snapshot, which it keeps: the
/// tables and their columns are the same in every snapshot.
pub struct SharedCatalog {
    _ctx: SessionContext,
    schema: Arc<dyn datafusion::catalog::SchemaProvider>,
}

impl std::fmt::Debug for SharedCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedCatalog")
    }
}

impl SharedCatalog {
    /// The catalog of the tables of `ctx`.
    pub fn try_new(ctx: SessionContext) -> Result<Self, QueryError> {
        use datafusion_pg_catalog::pg_catalog::{PgCatalogSchemaProvider, PgCatalogStaticTables};
        let statics = PgCatalogStaticTables::try_new()
            .map_err(|e| QueryError::Internal(format!("cannot load pg_catalog: {e}")))?;
        let schema = PgCatalogSchemaProvider::try_new(
            ctx.state().catalog_list().clone(),
            Arc::new(statics),
            datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
        )
        .map_err(|e| QueryError::Internal(format!("cannot set up pg_catalog: {e}")))?;
        Ok(SharedCatalog {
            _ctx: ctx,
            schema: Arc::new(schema),
        })
    }
}

/// Registers `pg_catalog` (the shared one), the Postgres catalog functions and a Postgres
/// `version()` in a session (the `Postgres` dialect).
pub fn register_catalog(ctx: &SessionContext, shared: &SharedCatalog) -> Result<(), QueryError> {
    // the functions, the oid type names and a pg_catalog of this session's own …
    datafusion_pg_catalog::setup_pg_catalog(
        ctx,
        "datafusion",
        datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
    )
    .map_err(|e| QueryError::Internal(format!("cannot set up pg_catalog: {e}")))?;
    // … replaced by the shared one
    ctx.catalog("datafusion")
        .ok_or_else(|| QueryError::Internal("the session has no datafusion catalog".into()))?
        .register_schema("pg_catalog", shared.schema.clone())
        .map_err(|e| QueryError::Internal(format!("cannot register pg_catalog: {e}")))?;
    // current_setting('server_version_num'), current_setting('search_path'): Grafana
    ctx.register_udf(datafusion::logical_expr::create_udf(
        "current_setting",
        vec![DataType::Utf8],
        DataType::Utf8,
        datafusion::logical_expr::Volatility::Stable,
        Arc::new(current_setting),
    ));
    // Grafana and DBeaver read the server's kind from version()
    let version = format!(
        "PostgreSQL {SERVER_VERSION}, atlake {} on DataFusion",
        env!("CARGO_PKG_VERSION")
    );
    ctx.register_udf(datafusion::logical_expr::create_udf(
        "version",
        vec![],
        DataType::Utf8,
        datafusion::logical_expr::Volatility::Stable,
        Arc::new(move |_args| {
            Ok(datafusion::logical_expr::ColumnarValue::Scalar(
                datafusion::scalar::ScalarValue::Utf8(Some(version.clone())),
            ))
        }),
    ));
    Ok(())
}

/// `current_setting(name)`: the server's settings (a session's own `SET` is not seen here).
fn current_setting(
    args: &[datafusion::logical_expr::ColumnarValue],
) -> datafusion::error::Result<datafusion::logical_expr::ColumnarValue> {
    use datafusion::logical_expr::ColumnarValue;
    use datafusion::scalar::ScalarValue;
    let lookup = |name: Option<&str>| -> datafusion::error::Result<Option<String>> {
        match name {
            None => Ok(None),
            Some(n) => default_setting(&n.to_ascii_lowercase())
                .map(Some)
                .ok_or_else(|| {
                    datafusion::error::DataFusionError::Plan(format!(
                        "unrecognized configuration parameter \"{n}\""
                    ))
                }),
        }
    };
    match args {
        [ColumnarValue::Scalar(v)] => {
            let name = match v {
                ScalarValue::Utf8(s) | ScalarValue::LargeUtf8(s) | ScalarValue::Utf8View(s) => {
                    s.as_deref()
                }
                other => {
                    return Err(datafusion::error::DataFusionError::Plan(format!(
                        "current_setting takes a name, not {other}"
                    )));
                }
            };
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(lookup(name)?)))
        }
        [ColumnarValue::Array(a)] => {
            let a = arrow::compute::cast(a, &DataType::Utf8)?;
            let names = arrow::array::AsArray::as_string::<i32>(&a);
            let values = names
                .iter()
                .map(lookup)
                .collect::<datafusion::error::Result<arrow::array::StringArray>>()?;
            Ok(ColumnarValue::Array(Arc::new(values)))
        }
        _ => Err(datafusion::error::DataFusionError::Plan(
            "current_setting takes one name".into(),
        )),
    }
}

/// The SQLSTATE of a query error.
fn sqlstate(e: &QueryError) -> &'static str {
    match e {
        QueryError::Sql(_) => "42000",
        QueryError::Forbidden(_) => "25006",
        QueryError::ResourcesExhausted(_) => "53200",
        QueryError::Timeout(_) => "57014",
        QueryError::TooLarge(_) => "54000",
        QueryError::Internal(_) => "XX000",
        QueryError::Busy(_) => "53300",
    }
}

/// A query error as the client sees it.
fn pg_error(e: &QueryError) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        sqlstate(e).into(),
        e.to_string(),
    )))
}

/// The server's parameters (`server_version`, `TimeZone`, …) sent after authentication.
fn server_parameters() -> DefaultServerParameterProvider {
    let mut p = DefaultServerParameterProvider::default();
    p.server_version = SERVER_VERSION.into();
    p.is_superuser = false;
    p.default_transaction_read_only = true;
    p
}

/// Authentication: the token as a cleartext password, or none without a token.
#[derive(Debug)]
pub struct Startup {
    token: Option<String>,
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if self.token.is_none() {
                    return finish_authentication(client, &server_parameters()).await;
                }
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(pwd) => {
                let given = pwd.into_password()?;
                let ok = self
                    .token
                    .as_deref()
                    .is_some_and(|t| ct_eq(t.as_bytes(), given.password.as_bytes()));
                if !ok {
                    metrics::counter!("atlake_pg_auth_failures_total").increment(1);
                    // the start-up message always names a user (pgwire refuses one without)
                    let user = client
                        .metadata()
                        .get("user")
                        .cloned()
                        .unwrap_or_else(|| "(no user given)".into());
                    return Err(PgWireError::InvalidPassword(user));
                }
                finish_authentication(client, &server_parameters()).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// What a statement is, once parsed.
#[derive(Debug, Clone)]
enum Kind {
    /// A query for the engine: the rewritten text.
    Query(String),
    /// `SET name = value` of a session setting.
    Set(String, String),
    /// `SHOW name`.
    Show(String),
    /// `BEGIN`, `START TRANSACTION`.
    Begin,
    /// `COMMIT`, `END`.
    Commit,
    /// `ROLLBACK`, `ABORT`.
    Rollback,
    /// `DISCARD …`, `DEALLOCATE …`, `RESET …`, `CLOSE …`: nothing to do.
    Nothing(&'static str),
}

/// Settings a client may set for its session: clients send them on connect. Their values
/// are kept for `SHOW`; they change nothing in how atlake answers (text output is ISO, UTC).
const SESSION_SETTINGS: &[&str] = &[
    "application_name",
    "extra_float_digits",
    "client_min_messages",
    "datestyle",
    "intervalstyle",
    "timezone",
    "search_path",
    "client_encoding",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "bytea_output",
    "standard_conforming_strings",
    "session characteristics",
];

/// Answers for `SHOW` of the settings clients read, before the client's own `SET`.
fn default_setting(name: &str) -> Option<String> {
    Some(
        match name {
            "server_version" => SERVER_VERSION,
            "server_version_num" => "160006",
            "server_encoding" | "client_encoding" => "UTF8",
            "timezone" => "Etc/UTC",
            "datestyle" => "ISO, YMD",
            "intervalstyle" => "postgres",
            "search_path" => "public",
            "standard_conforming_strings" => "on",
            "integer_datetimes" => "on",
            "transaction isolation level" | "transaction_isolation" => "repeatable read",
            "transaction_read_only" | "default_transaction_read_only" => "on",
            "max_identifier_length" => "63",
            "application_name" => "",
            "extra_float_digits" => "1",
            "statement_timeout" | "lock_timeout" => "0",
            "bytea_output" => "hex",
            _ => return None,
        }
        .to_string(),
    )
}

/// Classifies a parsed statement by its leading words.
fn classify(stmt: &str) -> Result<Kind, QueryError> {
    let words: Vec<String> = stmt
        .split(|c: char| c.is_whitespace() || c == '=' || c == ';')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_string())
        .collect();
    let first = words.first().map(|w| w.to_ascii_uppercase());
    let rest = |from: usize| {
        words
            .get(from..)
            .filter(|w| !w.is_empty())
            .map(|w| w.join(" ").to_ascii_lowercase())
    };
    Ok(match first.as_deref() {
        Some("SET") => {
            // SET [SESSION|LOCAL] name { = | TO } value
            let mut i = 1;
            if words.get(i).is_some_and(|w| {
                w.eq_ignore_ascii_case("session") || w.eq_ignore_ascii_case("local")
            }) && words.len() > 2
                && !words[2].eq_ignore_ascii_case("as")
            {
                i += 1;
            }
            let Some(name) = words.get(i).map(|w| w.to_ascii_lowercase()) else {
                return Err(QueryError::Sql("SET needs a name".into()));
            };
            let name = if name == "characteristics" {
                "session characteristics".to_string()
            } else if name == "time"
                && words
                    .get(i + 1)
                    .is_some_and(|w| w.eq_ignore_ascii_case("zone"))
            {
                i += 1;
                "timezone".to_string()
            } else {
                name.trim_matches('"').to_string()
            };
            let mut value_at = i + 1;
            if words
                .get(value_at)
                .is_some_and(|w| w.eq_ignore_ascii_case("to"))
            {
                value_at += 1;
            }
            let Some(value) = words
                .get(value_at..)
                .filter(|w| !w.is_empty())
                .map(|w| w.join(" ").trim_matches('\'').to_string())
            else {
                return Err(QueryError::Sql(format!("SET {name} needs a value")));
            };
            if !SESSION_SETTINGS.contains(&name.as_str()) {
                return Err(QueryError::Forbidden(format!(
                    "this endpoint is read-only: SET {name} is not supported"
                )));
            }
            Kind::Set(name, value)
        }
        Some("SHOW") => {
            let Some(name) = rest(1) else {
                return Err(QueryError::Sql("SHOW needs a name".into()));
            };
            if name == "all" || name.starts_with("datafusion.") {
                Kind::Query(stmt.to_string())
            } else {
                Kind::Show(name)
            }
        }
        Some("BEGIN") | Some("START") => Kind::Begin,
        Some("COMMIT") | Some("END") => Kind::Commit,
        Some("ROLLBACK") | Some("ABORT") => Kind::Rollback,
        Some("DISCARD") => Kind::Nothing("DISCARD ALL"),
        Some("DEALLOCATE") => Kind::Nothing("DEALLOCATE"),
        Some("RESET") => Kind::Nothing("RESET"),
        Some("CLOSE") => Kind::Nothing("CLOSE CURSOR"),
        _ => Kind::Query(stmt.to_string()),
    })
}

/// The response to a statement answered without the engine.
fn local<C: ClientInfo>(client: &mut C, kind: &Kind) -> PgWireResult<Response> {
    Ok(match kind {
        Kind::Set(name, value) => {
            client
                .metadata_mut()
                .insert(format!("atlake.set.{name}"), value.clone());
            Response::Execution(Tag::new("SET"))
        }
        Kind::Show(name) => {
            let value = client
                .metadata()
                .get(&format!("atlake.set.{name}"))
                .cloned()
                .or_else(|| default_setting(name))
                .ok_or_else(|| {
                    pg_error(&QueryError::Sql(format!(
                        "unrecognized configuration parameter \"{name}\""
                    )))
                })?;
            let column = name.rsplit(' ').next().unwrap_or(name).to_string();
            let fields = Arc::new(vec![FieldInfo::new(
                column,
                None,
                None,
                Type::TEXT,
                pgwire::api::results::FieldFormat::Text,
            )]);
            let mut enc = pgwire::api::results::DataRowEncoder::new(fields.clone());
            enc.encode_field(&Some(value))?;
            let row = enc.take_row();
            Response::Query(QueryResponse::new(
                fields,
                futures::stream::iter(vec![Ok(row)]),
            ))
        }
        Kind::Begin => Response::TransactionStart(Tag::new("BEGIN")),
        Kind::Commit => Response::TransactionEnd(Tag::new("COMMIT")),
        Kind::Rollback => Response::TransactionEnd(Tag::new("ROLLBACK")),
        Kind::Nothing(tag) => Response::Execution(Tag::new(tag)),
        Kind::Query(_) => {
            return Err(pg_error(&QueryError::Internal(
                "a query reached the local statements".into(),
            )));
        }
    })
}

/// The Postgres front end: the handlers `pgwire` calls for each connection.
pub struct PgFrontEnd {
    queries: Arc<Queries>,
    startup: Arc<Startup>,
}

impl PgFrontEnd {
    /// A front end over `engine`, asking for `token` as the password when it is set.
    pub fn new(engine: Arc<QueryEngine>, token: Option<String>) -> Self {
        let parser = Arc::new(Parser {
            engine: engine.clone(),
            sql: Arc::new(datafusion_pg_catalog::sql::PostgresCompatibilityParser::new()),
        });
        PgFrontEnd {
            queries: Arc::new(Queries { engine, parser }),
            startup: Arc::new(Startup { token }),
        }
    }
}

impl PgWireServerHandlers for PgFrontEnd {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.queries.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.queries.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }
}

/// Parses Postgres text into statements: the guard first (the parser recurses), then the
/// Postgres rewrites, on the query runtime's large stacks.
#[derive(Clone)]
pub struct Parser {
    engine: Arc<QueryEngine>,
    sql: Arc<datafusion_pg_catalog::sql::PostgresCompatibilityParser>,
}

/// Deepest nesting of parentheses and brackets in SQL text that the Postgres dialect's parser
/// is given: its time doubles with each level (sqlparser 0.59: 1.3 s at 18 nested calls, 64 ms
/// at 14, where the generic dialect takes 0.3 ms), and client catalog queries nest far less.
const PG_PARSER_MAX_DEPTH: usize = 10;

/// The generic parser's recursion limit: DataFusion's default, which the engine parses with.
const PARSER_RECURSION_LIMIT: usize = 50;

/// The deepest nesting of `(` and `[` in `text` outside strings, quoted names and comments;
/// `usize::MAX` when the text has a dollar-quoted string (not measured: the generic parser
/// takes it).
fn nesting_depth(text: &str) -> usize {
    let b = text.as_bytes();
    let (mut i, mut depth, mut max) = (0, 0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'(' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b')' | b']' => depth = depth.saturating_sub(1),
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'$' if b
                .get(i + 1)
                .is_some_and(|c| *c == b'$' || c.is_ascii_alphabetic()) =>
            {
                return usize::MAX;
            }
            _ => {}
        }
        i += 1;
    }
    max
}

/// Grafana's Postgres data source finds "the schemas on the search path" with a subquery that
/// calls `string_to_array` in `FROM` (a table function DataFusion does not have), in its table
/// list and its column list: `IN (SELECT CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE
/// trim(s[i]) END FROM generate_series(…) as i, string_to_array(current_setting('search_path'),
/// ',') s)`. Every table lives in `public` and `SET search_path` changes nothing, so that
/// subquery is `('public')`.
const GRAFANA_SEARCH_PATH: &str = "( SELECT CASE WHEN trim(s[i]) = '\"$user\"' THEN user ELSE trim(s[i]) END FROM generate_series( array_lower(string_to_array(current_setting('search_path'),','),1), array_upper(string_to_array(current_setting('search_path'),','),1) ) as i, string_to_array(current_setting('search_path'),',') s )";

/// SQL text as tokens with their byte ranges: words, quoted strings and names (whole), and
/// single punctuation characters; whitespace and `--` comments separate them. Enough to match a
/// client's known text whatever its layout.
fn tokens(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        match b[i] {
            c if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() {
                    if b[i] == q {
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i = (i + 1).min(b.len());
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'$' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$')
                {
                    i += 1;
                }
            }
            _ => {
                // one character, whole (a multi-byte one too)
                i += text[i..].chars().next().map_or(1, char::len_utf8);
            }
        }
        out.push((start, i));
    }
    out
}

/// `text` with Grafana's search-path subquery ([`GRAFANA_SEARCH_PATH`]) replaced by
/// `('public')`, wherever it occurs and however it is laid out; the text itself when it has none.
fn rewrite_grafana_search_path(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("current_setting('search_path')") {
        return std::borrow::Cow::Borrowed(text);
    }
    let want: Vec<&str> = tokens(GRAFANA_SEARCH_PATH)
        .into_iter()
        .map(|(a, z)| &GRAFANA_SEARCH_PATH[a..z])
        .collect();
    let have = tokens(text);
    let same = |t: (usize, usize), w: &str| {
        let t = &text[t.0..t.1];
        if w.starts_with('\'') {
            t == w
        } else {
            t.eq_ignore_ascii_case(w)
        }
    };
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut i) = (0, 0);
    while i + want.len() <= have.len() {
        if have[i..i + want.len()]
            .iter()
            .zip(&want)
            .all(|(t, w)| same(*t, w))
        {
            out.push_str(&text[copied..have[i].0]);
            out.push_str("('public')");
            copied = have[i + want.len() - 1].1;
            i += want.len();
        } else {
            i += 1;
        }
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

impl Parser {
    /// The statements of `text`, classified. Text that nests little goes through the Postgres
    /// rewrites whole (the Postgres dialect, the replacements of known client queries, the
    /// rewrite rules); deeper text, and text the Postgres dialect cannot parse
    /// (`SELECT - - 1`), is parsed by the generic dialect, as HTTP's is, then rewritten.
    fn statements(&self, text: &str) -> Result<Vec<Kind>, QueryError> {
        super::guard::check(text, super::guard::MAX_OPERATORS)
            .map_err(|e| QueryError::Sql(e.to_string()))?;
        let text = &*rewrite_grafana_search_path(text);
        let dialect = datafusion::sql::sqlparser::dialect::GenericDialect {};
        let generic = datafusion::sql::sqlparser::parser::Parser::new(&dialect)
            .with_recursion_limit(PARSER_RECURSION_LIMIT)
            .try_with_sql(text)
            .and_then(|mut p| p.parse_statements());
        let pg = (nesting_depth(text) <= PG_PARSER_MAX_DEPTH)
            .then(|| self.sql.parse(text).ok())
            .flatten();
        let rewritten = match (pg, &generic) {
            (Some(s), _) => s,
            (None, Ok(g)) => g.iter().map(|s| self.sql.rewrite(s.clone())).collect(),
            (None, Err(e)) => return Err(QueryError::Sql(e.to_string())),
        };
        // one statement the rewrites left as it was goes to the engine as the client wrote it:
        // printing a statement is not always faithful (`- - 1` prints as `--1`, a comment)
        if let Ok(g) = &generic
            && g.len() == 1
            && rewritten.len() == 1
            && g[0] == rewritten[0]
        {
            return Ok(vec![classify(text)?]);
        }
        rewritten.iter().map(|s| classify(&s.to_string())).collect()
    }

    /// [`Parser::statements`] on the query runtime.
    async fn parse(self: &Arc<Self>, text: &str) -> Result<Vec<Kind>, QueryError> {
        let me = self.clone();
        let text = text.to_string();
        let mut task = super::pool::spawn(async move { me.statements(&text) })?;
        task.join().await?
    }
}

/// A prepared statement: what it is, its parameters' types and its result's columns.
#[derive(Debug, Clone)]
pub struct Prepared {
    kind: Kind,
    /// Types DataFusion infers for `$1`, `$2`, … (`None`: unknown).
    inferred: Vec<Option<DataType>>,
    /// The result's columns (empty for statements without rows).
    schema: Option<SchemaRef>,
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        // counted when it runs; a statement that fails here counts as a failed query
        describe(&self.engine, self, sql).await.map_err(|e| {
            Tally::start(Protocol::Postgres).failed(&e);
            pg_error(&e)
        })
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        stmt.inferred
            .iter()
            .map(|t| match t {
                Some(t) => into_pg_type(t),
                None => Ok(Type::UNKNOWN),
            })
            .collect()
    }

    fn get_result_schema(
        &self,
        stmt: &Prepared,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        match (&stmt.kind, &stmt.schema) {
            (Kind::Show(name), _) => Ok(vec![FieldInfo::new(
                name.rsplit(' ').next().unwrap_or(name).to_string(),
                None,
                None,
                Type::TEXT,
                column_format
                    .map(|f| f.format_for(0))
                    .unwrap_or(pgwire::api::results::FieldFormat::Text),
            )]),
            (_, Some(schema)) => arrow_schema_to_pg_fields(
                schema,
                column_format.unwrap_or(&Format::UnifiedText),
                None,
            ),
            _ => Ok(vec![]),
        }
    }
}

/// Parses one statement and, for a query, plans it (without running it) for its result's
/// columns and its parameters' types, on the query runtime within the timeout.
async fn describe(
    engine: &Arc<QueryEngine>,
    parser: &Parser,
    sql: &str,
) -> Result<Option<Prepared>, QueryError> {
    let ticket = engine.admit()?;
    let deadline = Instant::now() + engine.limits.timeout;
    let e = engine.clone();
    let text = sql.to_string();
    let parser = parser.clone();
    let work = async move {
        let _slot = ticket.slot().await?;
        let mut kinds = parser.statements(&text)?;
        if kinds.len() > 1 {
            return Err(QueryError::Sql(
                "cannot insert multiple commands into a prepared statement".into(),
            ));
        }
        let Some(kind) = kinds.pop() else {
            return Ok(None);
        };
        describe_kind(&e, kind, deadline).await.map(Some)
    };
    let mut task = super::pool::spawn(async move {
        tokio::time::timeout_at(deadline.into(), work)
            .await
            .unwrap_or(Err(QueryError::Timeout(Duration::ZERO)))
    })?;
    task.join().await?.map_err(|e| match e {
        QueryError::Timeout(_) => QueryError::Timeout(engine.limits.timeout),
        other => other,
    })
}

/// A statement's parameters and result columns, planned without running it.
async fn describe_kind(
    e: &QueryEngine,
    kind: Kind,
    deadline: Instant,
) -> Result<Prepared, QueryError> {
    let Kind::Query(q) = &kind else {
        return Ok(Prepared {
            kind,
            inferred: vec![],
            schema: None,
        });
    };
    let (_ctx, plan) = e.logical_plan(q, Some(deadline), Dialect::Postgres).await?;
    let types = plan
        .get_parameter_types()
        .map_err(QueryError::from_datafusion)?;
    // $1, $2, …: in their numeric order, up to the highest one used
    let mut numbered: Vec<(usize, Option<DataType>)> = types
        .into_iter()
        .filter_map(|(k, t)| {
            k.trim_start_matches('$')
                .parse::<usize>()
                .ok()
                .map(|n| (n, t))
        })
        .collect();
    numbered.sort_by_key(|(n, _)| *n);
    let count = numbered.last().map_or(0, |(n, _)| *n);
    let mut inferred = vec![None; count];
    for (n, t) in numbered {
        if let Some(slot) = n.checked_sub(1).and_then(|i| inferred.get_mut(i)) {
            *slot = t;
        }
    }
    Ok(Prepared {
        kind,
        inferred,
        schema: Some(wire_schema(plan.schema().as_arrow()).0),
    })
}

/// The columns as they go on the wire: a type Postgres clients cannot be sent as it is (a
/// list of lists, a map, a union) goes as text, written as atlake's text formats write it.
/// Returns the schema and which columns became text.
fn wire_schema(schema: &arrow::datatypes::Schema) -> (SchemaRef, Vec<bool>) {
    let text: Vec<bool> = schema
        .fields()
        .iter()
        .map(|f| arrow_pg::datatypes::field_into_pg_type(f).is_err())
        .collect();
    let fields: Vec<arrow::datatypes::FieldRef> = schema
        .fields()
        .iter()
        .zip(&text)
        .map(|(f, &t)| {
            if t {
                Arc::new(arrow::datatypes::Field::new(f.name(), DataType::Utf8, true))
            } else {
                f.clone()
            }
        })
        .collect();
    (Arc::new(arrow::datatypes::Schema::new(fields)), text)
}

/// `batch` with the columns marked in `text` written as text.
fn to_wire(
    batch: arrow::record_batch::RecordBatch,
    schema: &SchemaRef,
    text: &[bool],
) -> Result<arrow::record_batch::RecordBatch, QueryError> {
    if !text.contains(&true) {
        return Ok(batch);
    }
    let opts = arrow::util::display::FormatOptions::default();
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (col, &t) in batch.columns().iter().zip(text) {
        if !t {
            columns.push(col.clone());
            continue;
        }
        let f = arrow::util::display::ArrayFormatter::try_new(col.as_ref(), &opts)
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        let values: arrow::array::StringArray = (0..col.len())
            .map(|i| (!col.is_null(i)).then(|| f.value(i).to_string()))
            .collect();
        columns.push(Arc::new(values) as arrow::array::ArrayRef);
    }
    arrow::record_batch::RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| QueryError::Internal(e.to_string()))
}

/// The query handlers.
pub struct Queries {
    engine: Arc<QueryEngine>,
    parser: Arc<Parser>,
}

/// Runs a query through the core on the query runtime; the rows are encoded there, a batch
/// at a time, and counted against the byte limit. Planning errors come back before any row.
async fn run(
    engine: &Arc<QueryEngine>,
    sql: String,
    params: Option<datafusion::common::ParamValues>,
    format: Format,
) -> Result<QueryResponse, QueryError> {
    let mut tally = Tally::start(Protocol::Postgres);
    match start(engine, sql, params, format).await {
        Ok((fields, rows)) => Ok(QueryResponse::new(fields, with_tally(rows, tally))),
        Err(e) => {
            tally.failed(&e);
            Err(e)
        }
    }
}

/// The row stream, closing the query's tally at its end.
fn with_tally(
    rows: impl Stream<Item = Result<DataRow, QueryError>> + Send + 'static,
    tally: Tally,
) -> impl Stream<Item = PgWireResult<DataRow>> + Send + 'static {
    use futures::StreamExt;
    let rows = Box::pin(rows);
    futures::stream::unfold((rows, tally), |(mut rows, mut tally)| async move {
        match rows.next().await {
            Some(Ok(r)) => Some((Ok(r), (rows, tally))),
            Some(Err(e)) => {
                tally.failed(&e);
                Some((Err(pg_error(&e)), (rows, tally)))
            }
            None => None,
        }
    })
}

/// Encodes a batch as rows, counting their bytes (`total`) against `max_bytes`. A batch
/// whose strings alone pass the limit is refused before any row is encoded.
fn encode_batch(
    fields: &Arc<Vec<FieldInfo>>,
    batch: arrow::record_batch::RecordBatch,
    total: &mut u64,
    max_bytes: u64,
) -> Result<Vec<DataRow>, QueryError> {
    if *total + super::frontend::text_bytes(&batch) as u64 > max_bytes {
        return Err(too_many_bytes(max_bytes));
    }
    let mut out = Vec::with_capacity(batch.num_rows());
    for row in arrow_pg::datatypes::encode_recordbatch(fields.clone(), batch) {
        let row = row.map_err(|e| QueryError::Internal(format!("encoding a row: {e}")))?;
        // the message: its type byte, its length, the field count, the fields
        *total += row.data.len() as u64 + 7;
        if *total > max_bytes {
            return Err(too_many_bytes(max_bytes));
        }
        out.push(row);
    }
    Ok(out)
}

/// Starts the query through the core ([`super::frontend::start`]): its columns as Postgres
/// fields, then its rows, encoded a batch at a time on the query runtime.
async fn start(
    engine: &Arc<QueryEngine>,
    sql: String,
    params: Option<datafusion::common::ParamValues>,
    format: Format,
) -> Result<
    (
        Arc<Vec<FieldInfo>>,
        impl Stream<Item = Result<DataRow, QueryError>> + Send + 'static,
    ),
    QueryError,
> {
    let max_bytes = engine.limits.max_bytes;
    let head = move |schema: &SchemaRef| {
        let (wire, text) = wire_schema(schema);
        let fields = Arc::new(
            arrow_schema_to_pg_fields(&wire, &format, None)
                .map_err(|x| QueryError::Sql(x.to_string()))?,
        );
        Ok((fields.clone(), (fields, wire, text, 0u64)))
    };
    let encode = move |(fields, wire, text, total): &mut (
        Arc<Vec<FieldInfo>>,
        SchemaRef,
        Vec<bool>,
        u64,
    ),
                       b| {
        to_wire(b, wire, text).and_then(|b| encode_batch(fields, b, total, max_bytes))
    };
    let (fields, rows) =
        super::frontend::start(engine, sql, params, Dialect::Postgres, head, encode).await?;
    let rows = futures::StreamExt::flat_map(rows, |chunk| {
        futures::stream::iter(match chunk {
            Ok(rows) => rows.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(err) => vec![Err(err)],
        })
    });
    Ok((fields, rows))
}

#[async_trait]
impl SimpleQueryHandler for Queries {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let kinds = match self.parser.parse(query).await {
            Ok(k) => k,
            Err(e) => {
                let mut tally = Tally::start(Protocol::Postgres);
                tally.failed(&e);
                return Err(pg_error(&e));
            }
        };
        if kinds.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        let mut out = Vec::with_capacity(kinds.len());
        for kind in kinds {
            match &kind {
                Kind::Query(q) => {
                    let r = run(&self.engine, q.clone(), None, Format::UnifiedText)
                        .await
                        .map_err(|e| pg_error(&e))?;
                    out.push(Response::Query(r));
                }
                other => out.push(local(client, other)?),
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl ExtendedQueryHandler for Queries {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Prepared>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let stmt = &portal.statement.statement;
        let Kind::Query(q) = &stmt.kind else {
            return local(client, &stmt.kind);
        };
        let inferred: Vec<Option<&DataType>> = stmt.inferred.iter().map(|t| t.as_ref()).collect();
        let params = if portal.parameter_len() == 0 {
            None
        } else {
            Some(deserialize_parameters(portal, &inferred)?)
        };
        let r = run(
            &self.engine,
            q.clone(),
            params,
            portal.result_column_format.clone(),
        )
        .await
        .map_err(|e| pg_error(&e))?;
        Ok(Response::Query(r))
    }
}

/// A TLS acceptor from a PEM certificate chain and its private key.
pub fn tls_acceptor(cert: &str, key: &str) -> std::io::Result<pgwire::tokio::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}: {e}"))
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    if certs.is_empty() {
        return Err(bad(cert, &"no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad("TLS", &e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| bad("TLS certificate and key", &e))?;
    Ok(pgwire::tokio::TlsAcceptor::from(Arc::new(config)))
}

/// Serves the Postgres protocol on `listener` until `shutdown` resolves; then sessions get
/// [`super::http::SHUTDOWN_GRACE`] to end by themselves before they are closed. At most
/// `max_connections` sessions at once; more wait in the listen backlog. A connection that
/// has not finished its start-up (and authentication) within a minute is closed (pgwire's
/// limit); an open session may stay idle, as with Postgres itself.
pub async fn serve(
    listener: tokio::net::TcpListener,
    front: Arc<PgFrontEnd>,
    tls: Option<pgwire::tokio::TlsAcceptor>,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    while let Some((sock, slot)) =
        super::frontend::next_connection(&listener, &slots, shutdown.as_mut(), Protocol::Postgres)
            .await?
    {
        while conns.try_join_next().is_some() {}
        let _ = sock.set_nodelay(true);
        let (front, tls) = (front.clone(), tls.clone());
        conns.spawn(async move {
            let _slot = slot;
            metrics::gauge!("atlake_pg_connections").increment(1.0);
            if let Err(e) = pgwire::tokio::process_socket(sock, tls, front).await {
                tracing::debug!(error = %e, "a Postgres connection ended with an error");
            }
            metrics::gauge!("atlake_pg_connections").decrement(1.0);
        });
    }
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(super::http::SHUTDOWN_GRACE, drain)
        .await
        .is_err()
    {
        conns.abort_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn grafanas_search_path_subquery_becomes_public_however_it_is_laid_out() {
        let grafana = "SELECT CASE WHEN \n  quote_ident(table_schema) IN (\n  SELECT\n    CASE WHEN trim(s[i]) = '\"$user\"' THEN user ELSE trim(s[i]) END\n  FROM\n    generate_series(\n      array_lower(string_to_array(current_setting('search_path'),','),1),\n      array_upper(string_to_array(current_setting('search_path'),','),1)\n    ) as i,\n    string_to_array(current_setting('search_path'),',') s\n  ) THEN 0 ELSE 1 END";
        assert_eq!(
            super::rewrite_grafana_search_path(grafana),
            "SELECT CASE WHEN \n  quote_ident(table_schema) IN ('public') THEN 0 ELSE 1 END"
        );
        let twice = format!("{grafana} UNION ALL {grafana}");
        assert_eq!(
            super::rewrite_grafana_search_path(&twice)
                .matches("('public')")
                .count(),
            2
        );
        // the same words in another string, or another function, are left alone
        for other in [
            "SELECT current_setting('search_path')",
            "SELECT 'x' FROM t WHERE a IN ( SELECT CASE WHEN trim(s[i]) = '\"$admin\"' THEN user ELSE trim(s[i]) END FROM generate_series( array_lower(string_to_array(current_setting('search_path'),','),1), array_upper(string_to_array(current_setting('search_path'),','),1) ) as i, string_to_array(current_setting('search_path'),',') s )",
        ] {
            assert_eq!(super::rewrite_grafana_search_path(other), other);
        }
        // tokens: quoted text whole, comments skipped, multi-byte characters whole
        let t = "a.'it''s' -- no\n\"q\"é";
        let toks: Vec<&str> = super::tokens(t)
            .into_iter()
            .map(|(a, z)| &t[a..z])
            .collect();
        assert_eq!(toks, ["a", ".", "'it''s'", "\"q\"", "é"]);
    }

    use super::*;

    #[test]
    fn nesting_is_measured_outside_strings_names_and_comments() {
        assert_eq!(nesting_depth("SELECT 1"), 0);
        assert_eq!(nesting_depth("SELECT abs(abs([1]))"), 3);
        assert_eq!(nesting_depth("SELECT '((((' , \"((\" -- ((((\n, (1)"), 1);
        assert_eq!(nesting_depth("SELECT /* (((( */ (1)"), 1);
        assert_eq!(nesting_depth("SELECT $$)$$"), usize::MAX);
        // unbalanced closers cannot hide depth that follows
        assert_eq!(nesting_depth("SELECT ))) ((1))"), 2);
        let deep = format!("SELECT {}1{}", "abs(".repeat(20), ")".repeat(20));
        assert_eq!(nesting_depth(&deep), 20);
    }

    #[test]
    fn session_statements_are_answered_here_and_other_sets_refused() {
        let set = |s: &str| match classify(s) {
            Ok(Kind::Set(n, v)) => Ok((n, v)),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.code().to_string()),
        };
        assert_eq!(
            set("SET application_name = 'psql'"),
            Ok(("application_name".into(), "psql".into()))
        );
        assert_eq!(
            set("SET SESSION extra_float_digits TO 3"),
            Ok(("extra_float_digits".into(), "3".into()))
        );
        assert_eq!(
            set("SET TIME ZONE 'UTC'"),
            Ok(("timezone".into(), "UTC".into()))
        );
        assert_eq!(
            set("SET datafusion.execution.batch_size = 1"),
            Err("read_only".into())
        );
        assert_eq!(set("SET work_mem = '1GB'"), Err("read_only".into()));
        assert_eq!(set("SET application_name"), Err("bad_sql".into()));
        assert_eq!(set("SET"), Err("bad_sql".into()));
        assert!(matches!(classify("SHOW search_path"), Ok(Kind::Show(n)) if n == "search_path"));
        assert!(matches!(classify("SHOW ALL"), Ok(Kind::Query(_))));
        assert!(matches!(classify("SHOW"), Err(QueryError::Sql(_))));
        assert!(matches!(classify("BEGIN READ ONLY"), Ok(Kind::Begin)));
        assert!(matches!(classify("COMMIT"), Ok(Kind::Commit)));
        assert!(matches!(classify("ROLLBACK"), Ok(Kind::Rollback)));
        assert!(matches!(classify("select 1"), Ok(Kind::Query(q)) if q == "select 1"));
        assert_eq!(
            default_setting("server_version").as_deref(),
            Some(SERVER_VERSION)
        );
        assert_eq!(default_setting("nonsense"), None);
    }

    #[test]
    fn errors_carry_their_sqlstate_and_the_token_compares_whole() {
        assert_eq!(sqlstate(&QueryError::Forbidden(String::new())), "25006");
        assert_eq!(sqlstate(&QueryError::Timeout(Duration::ZERO)), "57014");
        assert_eq!(sqlstate(&QueryError::TooLarge(String::new())), "54000");
        assert!(ct_eq(b"token", b"token"));
        assert!(!ct_eq(b"token", b"tokeN"));
        assert!(!ct_eq(b"token", b"token2"));
        assert!(!ct_eq(b"", b"x"));
    }

    #[test]
    fn columns_clients_cannot_take_go_as_text() {
        use arrow::array::{Array, Int64Array, ListArray};
        use arrow::datatypes::{Field, Int64Type, Schema};
        let nested = ListArray::from_iter_primitive::<Int64Type, _, _>(vec![Some(vec![Some(1)])]);
        let outer = ListArray::new(
            Arc::new(Field::new_list_field(nested.data_type().clone(), true)),
            arrow::buffer::OffsetBuffer::from_lengths([1]),
            Arc::new(nested),
            None,
        );
        let schema = Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("l", outer.data_type().clone(), true),
        ]);
        let (wire, text) = wire_schema(&schema);
        assert_eq!(text, vec![false, true]);
        assert_eq!(wire.field(1).data_type(), &DataType::Utf8);
        let batch = arrow::record_batch::RecordBatch::try_new(
            Arc::new(schema),
            vec![Arc::new(Int64Array::from(vec![7])), Arc::new(outer)],
        )
        .unwrap();
        let out = to_wire(batch, &wire, &text).unwrap();
        let l = arrow::array::AsArray::as_string::<i32>(out.column(1));
        assert_eq!(l.value(0), "[[1]]");
    }
}
