//! Arrow Flight SQL with a real client: the ADBC Flight SQL driver (`adbc-driver-flightsql`,
//! from Python) against `atlake serve --flight-listen` started as its own process. It reads
//! the same Arrow tables as HTTP's Arrow format, lists the catalogs, schemas and tables,
//! runs prepared statements with parameters, authenticates with the token as a bearer
//! header, is refused writes, and the abuse test's hostile queries get the same verdicts as
//! over HTTP.

use crate::abuse::{HOSTILE_LIMITS, TOKEN, healthy, post_sql, replayed_queries, start_serve};
use crate::common::{free_port, rss_kb};
use crate::sql::fixture_lake;
use crate::tools::{missing, python_with, run_python};
use std::time::Duration;

const MODULES: &[&str] = &["adbc_driver_flightsql", "adbc_driver_manager", "pyarrow"];

const READ: &str = r#"
import json, sys, urllib.request
import pyarrow as pa, pyarrow.compute as pc
import adbc_driver_flightsql as fs
import adbc_driver_flightsql.dbapi as flight
import adbc_driver_manager

port, http, token, did = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
uri = f"grpc://127.0.0.1:{port}"

def connect(tok):
    kw = {} if tok is None else {fs.DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {tok}"}
    return flight.connect(uri, db_kwargs=kw)

def plain(t):
    # dictionaries decoded, so both sides compare as values of the same types
    cols = []
    for c in t.columns:
        c = c.combine_chunks()
        if pa.types.is_dictionary(c.type):
            c = c.dictionary_decode()
        # HTTP sends string views as they are; Flight sends them as plain strings
        if pa.types.is_string_view(c.type):
            c = c.cast(pa.string())
        if pa.types.is_list(c.type) and pa.types.is_string_view(c.type.value_type):
            c = c.cast(pa.list_(pa.field(c.type.value_field.name, pa.string())))
        cols.append(c)
    return pa.table(cols, names=t.column_names)

def over_http(sql):
    req = urllib.request.Request(f"{http}/sql?format=arrow", data=sql.encode(),
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req) as r:
        return pa.ipc.open_stream(r.read()).read_all()

out = {"same": {}, "errors": {}}
queries = [
    "SELECT collection, count(*) AS n FROM events GROUP BY 1 ORDER BY 1",
    "SELECT did, rkey, cid, time, time_us, langs, reply_parent_uri, text FROM posts ORDER BY time_us, rkey LIMIT 50",
    "SELECT kind, count(DISTINCT did) AS n FROM events GROUP BY 1 ORDER BY 1",
    "SELECT * FROM events ORDER BY time_us, did, rkey LIMIT 300",
]
with connect(token) as conn:
    for q in queries:
        with conn.cursor() as cur:
            cur.execute(q)
            got = plain(cur.fetch_arrow_table())
        want = plain(over_http(q))
        out["same"][q] = got.equals(want)
        if not got.equals(want):
            out.setdefault("diff", {})[q] = [str(got.schema), str(want.schema), got.num_rows, want.num_rows]
        out.setdefault("rows", {})[q] = got.num_rows
    # a prepared statement with parameters: the same rows as the query with literals
    with conn.cursor() as cur:
        cur.execute("SELECT did, rkey, time_us FROM posts WHERE did = $1 AND time_us >= $2 ORDER BY time_us, rkey", (did, 0))
        got = plain(cur.fetch_arrow_table())
        cur.execute("SELECT did, rkey, time_us FROM posts WHERE did = $1 AND time_us >= $2 ORDER BY time_us, rkey", (did, 10**18))
        none = cur.fetch_arrow_table().num_rows
    want = plain(over_http(f"SELECT did, rkey, time_us FROM posts WHERE did = '{did}' AND time_us >= 0 ORDER BY time_us, rkey"))
    out["prepared_same"] = got.equals(want)
    out["prepared_rows"] = got.num_rows
    out["prepared_none"] = none
    # typed values: a timestamp with its zone, a list, a null
    with conn.cursor() as cur:
        cur.execute("SELECT time, langs, reply_parent_uri FROM posts ORDER BY time_us LIMIT 1")
        t = cur.fetch_arrow_table()
        out["types"] = [str(f.type) for f in t.schema]
    # the catalog: catalogs, schemas, tables and their columns
    objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
    listed = {}
    for cat in objects:
        for sch in cat["catalog_db_schemas"] or []:
            for tab in sch["db_schema_tables"] or []:
                listed[f'{cat["catalog_name"]}.{sch["db_schema_name"]}.{tab["table_name"]}'] = [
                    c["column_name"] for c in (tab["table_columns"] or [])]
    out["tables"] = listed
    out["posts_schema"] = [f.name for f in conn.adbc_get_table_schema("posts", db_schema_filter="public")]
    out["table_types"] = conn.adbc_get_table_types()
    info = conn.adbc_get_info()
    out["vendor"] = info.get("vendor_name")
    # writes are refused
    for w in ["DROP TABLE events", "CREATE TABLE t AS SELECT 1", "INSERT INTO events SELECT * FROM events"]:
        try:
            with conn.cursor() as cur:
                cur.execute(w)
                cur.fetchall()
            out["errors"][w] = "ran"
        except adbc_driver_manager.Error as e:
            out["errors"][w] = str(e)
# the token as the bearer header, nothing else
for name, tok in [("wrong", "wrong"), ("none", None)]:
    try:
        with connect(tok) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchall()
        out["errors"][name] = "ran"
    except adbc_driver_manager.Error as e:
        out["errors"][name] = str(e)
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adbc_reads_the_same_arrow_tables_as_http_and_lists_the_catalog() {
    let Some(py) = python_with(MODULES) else {
        return missing("python with adbc-driver-flightsql and pyarrow");
    };
    let (dir, lake, _) = fixture_lake(1500, 31).await;
    let port = free_port();
    let (_child, base, log) = start_serve(
        dir.path(),
        &lake,
        &[("ATLAKE_SERVER_FLIGHT_LISTEN", &format!("127.0.0.1:{port}"))],
    )
    .await;
    let c = reqwest::Client::new();
    let rows: Vec<serde_json::Value> = c
        .post(format!("{base}/sql"))
        .bearer_auth(TOKEN)
        .body("SELECT did FROM posts GROUP BY did ORDER BY count(*) DESC, did LIMIT 1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let did = rows[0]["did"].as_str().unwrap().to_string();
    let out: serde_json::Value = serde_json::from_str(&run_python(
        &py,
        READ,
        &[&port.to_string(), &base, TOKEN, &did],
    ))
    .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap()));

    for (q, same) in out["same"].as_object().unwrap() {
        assert_eq!(same, true, "{q}: {}", out["diff"]);
        assert!(out["rows"][q].as_u64().unwrap() > 0, "{q}: no rows");
    }
    assert_eq!(out["same"].as_object().unwrap().len(), 4);
    assert_eq!(out["prepared_same"], true, "{out}");
    assert!(out["prepared_rows"].as_u64().unwrap() > 0, "{out}");
    assert_eq!(out["prepared_none"], 0, "{out}");
    let types = out["types"].to_string();
    assert!(
        types.contains("timestamp[us, tz=UTC]") && types.contains("list<"),
        "{types}"
    );

    let tables = out["tables"].as_object().unwrap();
    for t in [
        "datafusion.public.events",
        "datafusion.public.posts",
        "datafusion.public.follows",
        "datafusion.system.checkpoint",
        "datafusion.current.records",
    ] {
        assert!(
            tables.contains_key(t),
            "{t} not listed: {:?}",
            tables.keys()
        );
    }
    let events: Vec<&str> = tables["datafusion.public.events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for col in ["did", "time_us", "kind", "collection", "rkey", "record"] {
        assert!(events.contains(&col), "{col} not among {events:?}");
    }
    let posts = out["posts_schema"].to_string();
    assert!(
        posts.contains("\"text\"") && posts.contains("\"langs\""),
        "{posts}"
    );
    assert_eq!(out["table_types"], serde_json::json!(["TABLE"]));
    assert_eq!(out["vendor"], "atlake");

    let errors = out["errors"].as_object().unwrap();
    for w in [
        "DROP TABLE events",
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO events SELECT * FROM events",
    ] {
        let e = errors[w].as_str().unwrap();
        assert!(e.contains("read_only"), "{w}: {e}");
    }
    for who in ["wrong", "none"] {
        let e = errors[who].as_str().unwrap().to_lowercase();
        assert!(e.contains("unauthenticated"), "{who}: {e}");
    }

    // each query counted under its protocol
    let metrics = c
        .get(format!("{base}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("atlake_queries_total{protocol=\"flight_sql\"}")
            && metrics.contains("atlake_query_seconds_count{protocol=\"flight_sql\"}"),
        "flight_sql not in /metrics"
    );
    assert!(
        metrics.contains("atlake_query_errors_total{protocol=\"flight_sql\",error=\"read_only\"}"),
        "{metrics}"
    );
}

const REPLAY: &str = r#"
import json, re, sys, time
import adbc_driver_flightsql as fs
import adbc_driver_flightsql.dbapi as flight
import adbc_driver_manager
port, token, path = sys.argv[1], sys.argv[2], sys.argv[3]
codes = ["bad_sql", "read_only", "resources_exhausted", "timeout", "result_too_large", "busy", "internal"]
out = []
kw = {fs.DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}"}
for q in json.load(open(path)):
    t = time.monotonic()
    try:
        with flight.connect(f"grpc://127.0.0.1:{port}", db_kwargs=kw) as conn, conn.cursor() as cur:
            cur.execute(q)
            cur.fetch_arrow_table()
        out.append(["", time.monotonic() - t])
    except adbc_driver_manager.Error as e:
        m = re.search(r"\b(" + "|".join(codes) + r"): ", str(e))
        out.append([m.group(1) if m else "unknown: " + str(e)[:200], time.monotonic() - t])
print(json.dumps(out))
"#;

/// The hostile queries of the abuse test, replayed through ADBC: the same verdict as over
/// HTTP (a timeout may stand for another verdict: the machine's load decides who gets there
/// first), within the timeout, and the server stays up under its memory cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_queries_get_the_same_verdicts_over_flight_sql_as_over_http() {
    let Some(py) = python_with(MODULES) else {
        return missing("python with adbc-driver-flightsql");
    };
    let _heavy = crate::common::HEAVY.lock().await;
    let (dir, lake, _) = fixture_lake(2000, 17).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut env = HOSTILE_LIMITS.to_vec();
    env.push(("ATLAKE_SERVER_FLIGHT_LISTEN", &addr));
    let (child, base, log) = start_serve(dir.path(), &lake, &env).await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let queries = replayed_queries();
    let mut http = Vec::new();
    for q in &queries {
        let (status, error, _) = post_sql(&c, &base, q).await;
        // a transfer cut off after its start is the byte limit's verdict
        http.push(if status == 200 && error == "aborted" {
            "result_too_large".to_string()
        } else {
            error
        });
    }
    let list = dir.path().join("queries.json");
    std::fs::write(&list, serde_json::to_vec(&queries).unwrap()).unwrap();
    let rss_before = rss_kb(child.id()) / 1024;
    let out: Vec<(String, f64)> = serde_json::from_str(&run_python(
        &py,
        REPLAY,
        &[&port.to_string(), TOKEN, list.to_str().unwrap()],
    ))
    .unwrap();
    assert_eq!(out.len(), queries.len());
    let mut failures = Vec::new();
    for ((q, want), (got, secs)) in queries.iter().zip(&http).zip(&out) {
        let same = got == want || got == "timeout" || want == "timeout";
        if !same || *secs > 6.0 {
            failures.push(format!(
                "{q:.80}: http {want:?}, flight sql {got:?} after {secs:.1}s"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} differ:\n{}\nlog: {}",
        failures.len(),
        queries.len(),
        failures.join("\n"),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // the deep ones were refused, the plain one answered
    assert!(out.iter().any(|(s, _)| s == "bad_sql") && out.iter().any(|(s, _)| s.is_empty()));
    healthy(&c, &base, Duration::from_secs(2)).await.unwrap();
    let rss_after = rss_kb(child.id()) / 1024;
    assert!(
        rss_after < 128 + 512,
        "RSS {rss_after} MiB after the replay (before: {rss_before} MiB)"
    );
}

/// A connection that sends nothing, or stops after a part of the HTTP/2 preface, is closed
/// after `header_timeout`; its slot is free again (one connection allowed, and a client gets
/// in after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(py) = python_with(MODULES) else {
        return missing("python with adbc-driver-flightsql");
    };
    let (dir, lake, _) = fixture_lake(100, 3).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (_child, _base, log) = start_serve(
        dir.path(),
        &lake,
        &[
            ("ATLAKE_SERVER_FLIGHT_LISTEN", &addr),
            ("ATLAKE_SERVER_HEADER_TIMEOUT", "1s"),
            ("ATLAKE_SERVER_MAX_CONNECTIONS", "1"),
        ],
    )
    .await;
    for sent in [&b""[..], &b"PRI * HTTP/2.0\r\n"[..]] {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(sent).await.unwrap();
        let t = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "a connection that sent {sent:?} stayed open 10 s: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "closed after {took:?}"
        );
    }
    // the only slot is free again: a real client gets its answer
    let out = run_python(
        &py,
        "import sys, adbc_driver_flightsql as fs, adbc_driver_flightsql.dbapi as f\n\
         kw = {fs.DatabaseOptions.AUTHORIZATION_HEADER.value: 'Bearer ' + sys.argv[2]}\n\
         with f.connect(sys.argv[1], db_kwargs=kw) as c, c.cursor() as cur:\n\
         \x20   cur.execute('SELECT 41 + 1'); print(cur.fetchone()[0])\n",
        &[&format!("grpc://{addr}"), TOKEN],
    );
    assert_eq!(out.trim(), "42");
}
