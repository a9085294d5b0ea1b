//! The Postgres wire protocol with real clients: `psql` (Debian's postgresql-client) and
//! `psycopg` (Python), against `atlake serve --pg-listen` started as its own process. They
//! read the same answers as HTTP, see the tables in `\dt`, authenticate with the token, are
//! refused writes, and the abuse test's hostile queries get the same verdicts as over HTTP.

use crate::abuse::{HOSTILE_LIMITS, TOKEN, healthy, post_sql, replayed_queries, start_serve};
use crate::common::{free_port, rss_kb};
use crate::sql::fixture_lake;
use crate::tools::{missing, python_with, run_python};
use std::process::Command;
use std::time::Duration;

/// `atlake serve` (with the token) of a fixture lake of `messages` simulated messages, with
/// the Postgres front end on a free port: the lake's directory, the child, the HTTP base URL,
/// the log and the Postgres port.
async fn serve_with_pg(
    messages: u64,
    seed: u64,
) -> (
    tempfile::TempDir,
    crate::common::ChildGuard,
    String,
    std::path::PathBuf,
    u16,
) {
    let (dir, lake, _) = fixture_lake(messages, seed).await;
    let port = free_port();
    let (child, base, log) = start_serve(
        dir.path(),
        &lake,
        &[("ATLAKE_SERVER_PG_LISTEN", &format!("127.0.0.1:{port}"))],
    )
    .await;
    (dir, child, base, log, port)
}

/// `psql` runs `sql` (a query or a backslash command) unaligned, `|`-separated, without
/// headers; returns (success, stdout, stderr).
pub(crate) fn psql(port: u16, password: &str, sql: &str) -> (bool, String, String) {
    psql_with(port, password, sql, "prefer")
}

/// [`psql`] with an `sslmode` (`disable`, `prefer`, `require`).
fn psql_with(port: u16, password: &str, sql: &str, sslmode: &str) -> (bool, String, String) {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "reader",
            "-d",
            "lake",
            "-X",
            "-A",
            "-t",
            "-F",
            "|",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", password)
        .env("PGSSLMODE", sslmode)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub(crate) fn have_psql() -> bool {
    Command::new("psql")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// HTTP's rows of `sql`, as JSON objects.
async fn http_rows(c: &reqwest::Client, base: &str, sql: &str) -> Vec<serde_json::Value> {
    let r = c
        .post(format!("{base}/sql"))
        .bearer_auth(TOKEN)
        .body(sql.to_string())
        .send()
        .await
        .unwrap();
    r.json().await.unwrap()
}

/// HTTP's rows of `sql` as `|`-separated lines of the columns `cols`, as psql prints them
/// (a null is empty; the JSON leaves its key out).
async fn http_lines(c: &reqwest::Client, base: &str, sql: &str, cols: &[&str]) -> Vec<String> {
    http_rows(c, base, sql)
        .await
        .iter()
        .map(|r| {
            cols.iter()
                .map(|c| match &r[*c] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => String::new(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

const PSYCOPG: &str = r#"
import json, sys, datetime, psycopg
port, token, did = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
with psycopg.connect(host="127.0.0.1", port=port, user="anyone", dbname="whatever", password=token) as conn:
    rows = conn.execute(
        "SELECT did, rkey, time, time_us, langs, reply_parent_uri FROM posts WHERE did = %s AND time_us >= %s ORDER BY time_us, rkey",
        (did, 0),
    ).fetchall()
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    out["rows"] = [
        [r[0], r[1], (r[2] - epoch) // datetime.timedelta(microseconds=1), r[3], r[4], r[5]]
        for r in rows
    ]
    # the same rows in the binary format
    with conn.cursor(binary=True) as cur:
        binary = cur.execute(
            "SELECT did, rkey, time, time_us, langs, reply_parent_uri FROM posts WHERE did = %s AND time_us >= %s ORDER BY time_us, rkey",
            (did, 0),
        ).fetchall()
    out["binary_same"] = binary == rows
    out["types"] = sorted({f"{i}:{type(v).__name__}" for r in rows for i, v in enumerate(r)})
    out["tz"] = sorted({str(r[2].tzinfo) for r in rows})
    out["count"] = conn.execute("SELECT count(*) FROM events WHERE collection = %s", ("app.bsky.feed.like",)).fetchone()[0]
    try:
        conn.execute("DROP TABLE events")
        out["drop"] = "ran"
    except psycopg.Error as e:
        out["drop"] = e.sqlstate
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_psycopg_read_what_http_reads() {
    if !have_psql() {
        return missing("psql (postgresql-client)");
    }
    let Some(py) = python_with(&["psycopg"]) else {
        return missing("python with psycopg");
    };
    let (_dir, _child, base, log, port) = serve_with_pg(1500, 31).await;
    let c = reqwest::Client::new();

    // the same answer as HTTP, row for row
    for (q, cols) in [
        (
            "SELECT collection, count(*) AS n FROM events GROUP BY 1 ORDER BY 1",
            &["collection", "n"][..],
        ),
        (
            "SELECT did, rkey, cid, replace(text, chr(10), '/') AS t FROM posts ORDER BY time_us, rkey LIMIT 20",
            &["did", "rkey", "cid", "t"][..],
        ),
        (
            "SELECT kind, count(DISTINCT did) AS n FROM events GROUP BY 1 ORDER BY 1",
            &["kind", "n"][..],
        ),
    ] {
        let (ok, got, err) = psql(port, TOKEN, q);
        assert!(ok, "{q}: {err}\n{}", std::fs::read_to_string(&log).unwrap());
        let want = http_lines(&c, &base, q, cols).await;
        assert!(!want.is_empty());
        assert_eq!(got.lines().collect::<Vec<_>>(), want, "{q}");
    }

    // psql's \dt lists the tables, \d a table's columns
    let (ok, tables, err) = psql(port, TOKEN, "\\dt");
    assert!(ok, "{err}");
    for t in ["events", "posts", "likes", "follows", "errors"] {
        assert!(
            tables
                .lines()
                .any(|l| l.starts_with(&format!("public|{t}|table"))),
            "{t} missing from \\dt:\n{tables}"
        );
    }
    let (ok, columns, err) = psql(port, TOKEN, "\\d public.posts");
    assert!(ok, "{err}");
    assert!(
        columns.contains("time|timestamp with time zone") && columns.contains("langs|text[]"),
        "{columns}"
    );
    let (ok, version, _) = psql(port, TOKEN, "SELECT version()");
    assert!(ok && version.starts_with("PostgreSQL "), "{version}");
    // what Grafana asks on connect
    let (ok, num, err) = psql(
        port,
        TOKEN,
        "SELECT current_setting('server_version_num')::int / 100 AS version",
    );
    assert!(ok && num.trim() == "1600", "{num} {err}");
    let (ok, _, err) = psql(port, TOKEN, "SELECT current_setting('no_such_setting')");
    assert!(
        !ok && err.contains("unrecognized configuration parameter"),
        "{err}"
    );
    let (ok, set, err) = psql(port, TOKEN, "SET application_name = 'grafana'");
    assert!(ok && set.trim() == "SET", "{set} {err}");

    // the token is the password; writes and other settings are refused
    let (ok, _, err) = psql(port, "wrong", "SELECT 1");
    assert!(
        !ok && err
            .to_lowercase()
            .contains("password authentication failed"),
        "{err}"
    );
    let (ok, _, err) = psql(port, "", "SELECT 1");
    assert!(!ok, "{err}");
    for w in [
        "DROP TABLE events",
        "CREATE TABLE t (a int)",
        "INSERT INTO events SELECT * FROM events",
        "COPY events TO '/tmp/x.csv'",
        "SET datafusion.execution.batch_size = 1",
    ] {
        let (ok, _, err) = psql(port, TOKEN, w);
        assert!(!ok && err.contains("read-only"), "{w}: {err}");
    }

    // psycopg: a parameterised query (the extended protocol), typed values and nulls
    let did = http_lines(
        &c,
        &base,
        "SELECT did FROM posts GROUP BY did ORDER BY count(*) DESC, did LIMIT 1",
        &["did"],
    )
    .await
    .remove(0);
    let out: serde_json::Value =
        serde_json::from_str(&run_python(&py, PSYCOPG, &[&port.to_string(), TOKEN, &did])).unwrap();
    let want: Vec<serde_json::Value> = http_rows(
        &c,
        &base,
        &format!(
            "SELECT did, rkey, time_us, time_us AS t2, langs, reply_parent_uri FROM posts WHERE did = '{did}' ORDER BY time_us, rkey"
        ),
    )
    .await
        .iter()
        .map(|r| {
            serde_json::json!([
                r["did"],
                r["rkey"],
                r["time_us"],
                r["t2"],
                r["langs"],
                r["reply_parent_uri"]
            ])
        })
        .collect();
    assert!(!want.is_empty());
    assert_eq!(out["rows"].as_array().unwrap(), &want, "{out}");
    let types = out["types"].to_string();
    for t in ["0:str", "2:datetime", "3:int", "4:list", "5:NoneType"] {
        assert!(types.contains(t), "{t} not among {types}");
    }
    assert_eq!(out["tz"], serde_json::json!(["Etc/UTC"]));
    assert_eq!(out["binary_same"], true, "{out}");
    let likes = http_lines(
        &c,
        &base,
        "SELECT count(*) AS n FROM events WHERE collection = 'app.bsky.feed.like'",
        &["n"],
    )
    .await;
    assert_eq!(out["count"].to_string(), likes[0]);
    assert_eq!(out["drop"], "25006");

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
    for p in ["http", "postgres"] {
        assert!(
            metrics.contains(&format!("atlake_queries_total{{protocol=\"{p}\"}}"))
                && metrics.contains(&format!("atlake_query_seconds_count{{protocol=\"{p}\"}}")),
            "{p} not in /metrics"
        );
    }
    assert!(
        metrics.contains("atlake_query_errors_total{protocol=\"postgres\",error=\"read_only\"}"),
        "{metrics}"
    );
}

/// The SQLSTATE a Postgres client gets for an HTTP error code.
fn sqlstate_of(code: &str) -> &'static str {
    match code {
        "" => "ok",
        "bad_sql" => "42000",
        "read_only" => "25006",
        "resources_exhausted" => "53200",
        "timeout" => "57014",
        "result_too_large" => "54000",
        "busy" => "53300",
        _ => "XX000",
    }
}

const REPLAY: &str = r#"
import json, sys, time, psycopg
port, token, path = sys.argv[1], sys.argv[2], sys.argv[3]
out = []
for q in json.load(open(path)):
    t = time.monotonic()
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="u", dbname="d", password=token, connect_timeout=10) as conn:
            conn.execute(q).fetchall()
        out.append(["ok", time.monotonic() - t])
    except psycopg.Error as e:
        out.append([e.sqlstate or "none", time.monotonic() - t])
print(json.dumps(out))
"#;

/// The hostile queries of the abuse test, replayed through psycopg: the same verdict as over
/// HTTP (a timeout may stand for another verdict: the machine's load decides who gets there
/// first), within the timeout, and the server stays up under its memory cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_queries_get_the_same_verdicts_over_postgres_as_over_http() {
    let Some(py) = python_with(&["psycopg"]) else {
        return missing("python with psycopg");
    };
    let _heavy = crate::common::HEAVY.lock().await;
    let (dir, lake, _) = fixture_lake(2000, 17).await;
    let port = free_port();
    let pg = format!("127.0.0.1:{port}");
    let mut env = HOSTILE_LIMITS.to_vec();
    env.push(("ATLAKE_SERVER_PG_LISTEN", &pg));
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
        let code = if status == 200 && error == "aborted" {
            "result_too_large".to_string()
        } else {
            error
        };
        http.push(sqlstate_of(&code));
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
        let same = got == want || got == "57014" || *want == "57014";
        if !same || *secs > 6.0 {
            failures.push(format!(
                "{q:.80}: http {want}, postgres {got} after {secs:.1}s"
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
    assert!(out.iter().any(|(s, _)| s == "42000") && out.iter().any(|(s, _)| s == "ok"));
    healthy(&c, &base, Duration::from_secs(2)).await.unwrap();
    let rss_after = rss_kb(child.id()) / 1024;
    assert!(
        rss_after < 128 + 512,
        "RSS {rss_after} MiB after the replay (before: {rss_before} MiB)"
    );
}

/// With a certificate and key in the config, clients may ask for TLS (and must, with
/// `sslmode=require`); without TLS they still connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_offered_with_the_configured_certificate() {
    if !have_psql() {
        return missing("psql (postgresql-client)");
    }
    let (dir, lake, _) = fixture_lake(300, 5).await;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output();
    if !made.as_ref().is_ok_and(|o| o.status.success()) {
        return missing("openssl");
    }
    let port = free_port();
    let (_child, _base, log) = start_serve(
        dir.path(),
        &lake,
        &[
            ("ATLAKE_SERVER_PG_LISTEN", &format!("127.0.0.1:{port}")),
            ("ATLAKE_SERVER_PG_TLS_CERT", cert.to_str().unwrap()),
            ("ATLAKE_SERVER_PG_TLS_KEY", key.to_str().unwrap()),
        ],
    )
    .await;
    let (ok, info, err) = psql_with(port, TOKEN, "\\conninfo", "require");
    assert!(
        ok && info.contains("SSL connection"),
        "{info} {err}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let (ok, n, err) = psql_with(port, TOKEN, "SELECT count(*) FROM events", "require");
    assert!(ok && n.trim().parse::<u64>().unwrap() > 0, "{n} {err}");
    let (ok, info, err) = psql_with(port, TOKEN, "\\conninfo", "disable");
    assert!(ok && !info.contains("SSL connection"), "{info} {err}");

    // a key that does not load stops the server at start, with the reason
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a key").unwrap();
    let out = Command::new(crate::common::atlake_bin())
        .args([
            "serve",
            "--lake",
            &lake,
            "--listen",
            "127.0.0.1:0",
            "--pg-listen",
            "127.0.0.1:0",
        ])
        .env("ATLAKE_SERVER_PG_TLS_CERT", &cert)
        .env("ATLAKE_SERVER_PG_TLS_KEY", &bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("TLS") && stderr.contains("bad.pem"),
        "{stderr}"
    );
}

/// PostgreSQL's JDBC driver (pgjdbc: what DBeaver, IntelliJ and most Java tools connect with),
/// from Debian's `libpostgresql-jdbc-java`, or the jar `ATLAKE_PGJDBC` names.
fn pgjdbc() -> Option<String> {
    let jar = std::env::var("ATLAKE_PGJDBC")
        .unwrap_or_else(|_| "/usr/share/java/postgresql.jar".to_string());
    let java = Command::new("java")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    (java && std::path::Path::new(&jar).is_file()).then_some(jar)
}

/// A Java program over pgjdbc reads the database's metadata (schemas, tables, a table's columns
/// with Postgres type names), a plain query and a prepared one with typed values (timestamps,
/// arrays, NULLs), and gets what HTTP gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_reads_the_catalog_and_typed_rows() {
    let Some(jar) = pgjdbc() else {
        return missing("java and PostgreSQL's JDBC driver (libpostgresql-jdbc-java)");
    };
    let (_dir, _child, base, log, port) = serve_with_pg(1500, 37).await;
    let probe = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/jdbc/JdbcProbe.java");
    let out = Command::new("java")
        .arg("-cp")
        .arg(&jar)
        .arg(&probe)
        .arg(format!("jdbc:postgresql://127.0.0.1:{port}/atlake"))
        .arg(TOKEN)
        .output()
        .expect("run java");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let lines = |tag: &str| -> Vec<Vec<String>> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{tag}\t")))
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect()
    };
    assert!(
        lines("product")[0][0].starts_with("PostgreSQL 16"),
        "{text}"
    );
    let schemas: Vec<String> = lines("schema").into_iter().map(|l| l[0].clone()).collect();
    assert!(schemas.contains(&"public".to_string()), "{schemas:?}");
    let tables: Vec<String> = lines("table").into_iter().map(|l| l[0].clone()).collect();
    for t in [
        "public.events",
        "public.posts",
        "public.likes",
        "public.errors",
    ] {
        assert!(tables.contains(&t.to_string()), "{t} not in {tables:?}");
    }
    let columns: Vec<String> = lines("column").into_iter().map(|l| l.join(" ")).collect();
    for c in [
        "posts.time timestamptz",
        "posts.langs _text",
        "posts.did text",
        "posts.seq int8",
    ] {
        assert!(columns.contains(&c.to_string()), "{c} not in {columns:?}");
    }
    // DBeaver's navigator queries answer (the schema by name: public)
    let navigator = lines("navigator");
    assert_eq!(navigator.len(), 4, "{text}");
    for n in &navigator {
        assert_eq!(n[1], "ok", "navigator query {}: {n:?}", n[0]);
    }
    assert_eq!(
        navigator[0][3], "public",
        "current_schema(): {:?}",
        navigator[0]
    );
    assert_eq!(navigator[2][2..], ["1", "public"], "{:?}", navigator[2]);
    // a plain query: HTTP's answer
    let c = reqwest::Client::new();
    let want = http_rows(
        &c,
        &base,
        "SELECT collection, count(*) AS n FROM events GROUP BY 1 ORDER BY n DESC, collection LIMIT 3",
    )
    .await;
    let got = lines("count");
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g[0], w["collection"].as_str().unwrap());
        assert_eq!(g[1], w["n"].to_string());
    }
    // the prepared statement: the same rows as HTTP, with typed values
    let posts = lines("post");
    assert_eq!(posts.len(), 3, "{text}");
    let did = &posts[0][0];
    let want = http_rows(
        &c,
        &base,
        &format!(
            "SELECT did, time_us, langs, reply_root_uri FROM posts WHERE did = '{did}' ORDER BY time_us, rkey LIMIT 3"
        ),
    )
    .await;
    for (g, w) in posts.iter().zip(&want) {
        assert_eq!(&g[0], did);
        let us = atlake::syntax::parse_datetime_us(&g[1]).expect("an ISO instant");
        assert_eq!(us, w["time_us"].as_i64().unwrap(), "{g:?}");
        let langs: Vec<&str> = w["langs"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let langs = if w.get("langs").is_none() {
            "NULL".to_string()
        } else {
            langs.join(",")
        };
        assert_eq!(g[2], langs, "{g:?} {w}");
        assert_eq!(
            g[3],
            w["reply_root_uri"].as_str().unwrap_or("NULL"),
            "{g:?}"
        );
    }
}
