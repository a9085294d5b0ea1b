//! SQL: the HTTP endpoint through a real client on port 0 (every format, errors, read-only,
//! limits, token), and freshness of buffered rows in the daemon.

use crate::common::{seeded, start_sim, wait_until};
use crate::ingest::test_config;
use atlake::ingest::{self, Input};
use atlake::query::http::{AppState, serve};
use atlake::query::{Limits, QueryEngine};
use atlake::simulate::server::SimConfig;
use atlake::simulate::traffic::{Traffic, TrafficConfig};
use atlake::sink::store::Lake;
use atlake::source::capture::{CaptureFormat, CaptureWriter, Compression};
use std::sync::Arc;
use std::time::Duration;

/// A small lake built from a simulator capture; returns (tempdir, lake path, events).
pub async fn fixture_lake(messages: u64, seed: u64) -> (tempfile::TempDir, String, u64) {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("cap");
    let mut t = Traffic::new(TrafficConfig {
        seed,
        step_us: 60_000,
        ..Default::default()
    });
    let mut w = CaptureWriter::create(&cap, CaptureFormat::Frames, Compression::None).unwrap();
    let mut events = 0;
    for _ in 0..messages {
        let m = t.next_message();
        events += m.events.len() as u64;
        w.write(&m.frame).unwrap();
    }
    w.finish().unwrap();
    let lake = dir.path().join("lake").to_str().unwrap().to_string();
    let h = ingest::start(test_config(&lake), Input::File(cap))
        .await
        .unwrap();
    h.wait().await.unwrap();
    (dir, lake, events)
}

struct Server {
    base: String,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn server(lake: &str, limits: Limits, token: Option<&str>) -> Server {
    let engine = Arc::new(QueryEngine::try_new(Lake::open(lake).unwrap(), None, limits).unwrap());
    let state = Arc::new(AppState {
        engine,
        token: token.map(String::from),
        storage: None,
        filters: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    tokio::spawn(serve(listener, state, async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    Server {
        base: format!("http://{addr}"),
        stop: tx,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_through_a_real_client() {
    let (_dir, lake, events) = fixture_lake(3000, 3).await;
    let s = server(&lake, Limits::default(), None).await;
    let c = reqwest::Client::new();
    let q =
        "SELECT did, collection, time_us, seq FROM events ORDER BY seq, did, collection LIMIT 100";
    // json
    let r = c
        .post(format!("{}/sql", s.base))
        .body(q)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Vec<serde_json::Value> = r.json().await.unwrap();
    assert_eq!(v.len(), 100);
    assert!(v[0]["did"].as_str().unwrap().starts_with("did:plc:"));
    // ndjson via format=
    let r = c
        .get(format!("{}/sql", s.base))
        .query(&[("q", q), ("format", "ndjson")])
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert_eq!(text.lines().count(), 100);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first, v[0]);
    // csv via Accept
    let r = c
        .post(format!("{}/sql", s.base))
        .header("accept", "text/csv")
        .body(q)
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = r.text().await.unwrap();
    assert_eq!(text.lines().next().unwrap(), "did,collection,time_us,seq");
    assert_eq!(text.lines().count(), 101);
    // arrow IPC stream
    let r = c
        .post(format!("{}/sql?format=arrow", s.base))
        .body(q)
        .send()
        .await
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes.to_vec()), None)
            .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 100);
    // parquet
    let r = c
        .post(format!("{}/sql", s.base))
        .header("accept", "application/vnd.apache.parquet")
        .body(q)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.apache.parquet"
    );
    let bytes = r.bytes().await.unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .unwrap()
        .build()
        .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 100);
    // a count agrees with what was ingested
    let r = c
        .post(format!("{}/sql", s.base))
        .body("SELECT count(*) AS n FROM events")
        .send()
        .await
        .unwrap();
    let v: Vec<serde_json::Value> = r.json().await.unwrap();
    assert_eq!(v[0]["n"].as_u64(), Some(events));
    // a large result streams (more than the 1 MiB held back) and is complete
    let r = c
        .post(format!("{}/sql?format=ndjson", s.base))
        .body("SELECT * FROM events")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.len() > 1 << 20, "{} bytes", text.len());
    assert_eq!(text.lines().count() as u64, events);
    // tables, health, metrics
    let t: Vec<serde_json::Value> = c
        .get(format!("{}/tables", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = t.iter().filter_map(|x| x["name"].as_str()).collect();
    for want in [
        "events",
        "posts",
        "likes",
        "reposts",
        "follows",
        "blocks",
        "listitems",
        "profiles",
        "identity",
        "account",
        "errors",
        "system.files",
        "system.checkpoint",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    let posts = t.iter().find(|x| x["name"] == "posts").unwrap();
    let cols: Vec<&str> = posts["columns"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for want in [
        "did",
        "time_us",
        "time",
        "kind",
        "operation",
        "collection",
        "rkey",
        "rev",
        "cid",
        "seq",
        "record",
        "text",
        "langs",
        "reply_root_uri",
        "reply_parent_uri",
        "quote_uri",
        "embed_type",
        "facet_tags",
        "facet_links",
        "facet_mentions",
        "created_at",
    ] {
        assert!(cols.contains(&want), "posts.{want}");
    }
    let h: serde_json::Value = c
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");
    let m = c.get(format!("{}/metrics", s.base)).send().await.unwrap();
    assert_eq!(m.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sql_and_every_write_kind_are_refused_with_json_errors() {
    let (_dir, lake, _) = fixture_lake(300, 4).await;
    let s = server(&lake, Limits::default(), None).await;
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{}/sql", s.base))
        .body("SELEC nonsense")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "bad_sql");
    assert!(v["message"].as_str().unwrap().len() > 3);
    let r = c
        .post(format!("{}/sql", s.base))
        .body("SELECT nope FROM events")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    for stmt in [
        "CREATE TABLE t AS SELECT 1",
        "CREATE VIEW v AS SELECT 1",
        "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/tmp'",
        "DROP TABLE events",
        "INSERT INTO events SELECT * FROM events",
        "DELETE FROM events",
        "UPDATE events SET did = 'x'",
        "COPY (SELECT 1) TO '/tmp/atlake-copy-test.csv'",
        "SET datafusion.execution.batch_size = 1",
        "CREATE SCHEMA s",
        "TRUNCATE events",
    ] {
        let r = c
            .post(format!("{}/sql", s.base))
            .body(stmt)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(status == 403 || status == 400, "{stmt}: {status}");
        assert!(
            v["error"] == "read_only" || v["error"] == "bad_sql",
            "{stmt}: {v}"
        );
        assert_ne!(status, 200, "{stmt}");
    }
    assert!(!std::path::Path::new("/tmp/atlake-copy-test.csv").exists());
    // files by path are not tables
    let r = c
        .post(format!("{}/sql", s.base))
        .body(format!("SELECT * FROM '{lake}/_atlake/checkpoint.json'"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_memory_cap_row_limit_and_token() {
    let (_dir, lake, _) = fixture_lake(1500, 5).await;
    let limits = Limits {
        timeout: Duration::from_secs(1),
        memory: 4 << 20,
        max_rows: 1000,
        max_bytes: 64 << 20,
        ..Limits::default()
    };
    let s = server(&lake, limits, Some("s3cret")).await;
    let c = reqwest::Client::new();
    let post = |q: &'static str| {
        c.post(format!("{}/sql", s.base))
            .bearer_auth("s3cret")
            .body(q)
            .send()
    };
    // timeout: a huge cross join
    let r = post("SELECT count(*) FROM events a, events b, events c WHERE a.rkey < b.rkey")
        .await
        .unwrap();
    assert_eq!(r.status(), 408);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "timeout");
    // memory cap: a join whose build side does not fit 4 MiB
    let r = post("SELECT a.did, count(*) FROM events a JOIN events b ON a.record = b.record GROUP BY 1 ORDER BY 2 DESC").await.unwrap();
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "resources_exhausted", "{v}");
    // row limit
    let r = post("SELECT * FROM events").await.unwrap();
    assert_eq!(r.status(), 413);
    let r = post("SELECT did FROM events LIMIT 10").await.unwrap();
    assert_eq!(r.status(), 200);
    // token: required everywhere but /health
    for path in ["/sql?q=SELECT%201", "/tables", "/metrics"] {
        let r = c.get(format!("{}{path}", s.base)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let r = c
            .get(format!("{}{path}", s.base))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let r = c
            .get(format!("{}{path}", s.base))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    assert_eq!(
        c.get(format!("{}/health", s.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // the server is still up after all that
    assert_eq!(post("SELECT 1").await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_rows_are_visible_within_a_second() {
    let sim = start_sim(SimConfig {
        messages: Some(600),
        rate: Some(400.0),
        retention: 100_000,
        ..seeded(8)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().to_str().unwrap().to_string();
    let mut cfg = test_config(&lake);
    cfg.source.kind = atlake::config::SourceKind::Firehose;
    cfg.source.url = sim.url();
    cfg.source.start_cursor = Some(0);
    // nothing is flushed during the test: every row is read from memory
    cfg.flush.max_rows = 1_000_000;
    cfg.flush.max_age.0 = Duration::from_secs(600);
    cfg.flush.hour_close_grace.0 = Duration::from_secs(36_000);
    let h = ingest::start(cfg, Input::Network).await.unwrap();
    let engine = QueryEngine::try_new(
        Lake::open(&lake).unwrap(),
        Some(h.catalog.clone()),
        Limits::default(),
    )
    .unwrap();
    sim.wait_for_messages(600).await;
    let total = sim.truth().events();
    let done = std::time::Instant::now();
    let mut n = 0;
    while done.elapsed() < Duration::from_secs(10) {
        let b = engine
            .collect("SELECT count(*) AS n FROM events")
            .await
            .unwrap();
        n = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b[0].column(0))
            .value(0) as u64;
        if n == total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen_after = done.elapsed();
    assert_eq!(n, total);
    assert!(
        seen_after < Duration::from_secs(1),
        "buffered rows visible after {seen_after:?}"
    );
    // the scan filters rows in memory as it filters files
    filters_match_row_by_row_evaluation(&engine).await;
    assert!(
        atlake::checkpoint::list_files(&Lake::open(&lake).unwrap())
            .await
            .unwrap()
            .is_empty(),
        "nothing was flushed"
    );
    h.stop(Duration::from_secs(10)).await.unwrap();
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_never_go_backwards_or_beyond_the_source_while_flushing() {
    let sim = start_sim(SimConfig {
        messages: Some(4000),
        rate: Some(800.0),
        retention: 100_000,
        ..seeded(9)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().to_str().unwrap().to_string();
    let mut cfg = test_config(&lake);
    cfg.source.kind = atlake::config::SourceKind::Firehose;
    cfg.source.url = sim.url();
    cfg.source.start_cursor = Some(0);
    cfg.flush.max_rows = 50;
    cfg.flush.max_age.0 = Duration::from_millis(50);
    let h = ingest::start(cfg, Input::Network).await.unwrap();
    let engine = QueryEngine::try_new(
        Lake::open(&lake).unwrap(),
        Some(h.catalog.clone()),
        Limits::default(),
    )
    .unwrap();
    let mut last = 0u64;
    let mut queries = 0;
    let mut files_seen: usize;
    loop {
        let b = engine
            .collect("SELECT (SELECT count(*) FROM events) AS n, (SELECT count(*) FROM (SELECT DISTINCT kind, did, collection, rkey, rev, operation, seq FROM events)) AS k")
            .await
            .unwrap();
        let col = |i: usize| {
            arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b[0].column(i))
                .value(0) as u64
        };
        let (n, k) = (col(0), col(1));
        let sent = sim.truth().events();
        assert!(n >= last, "count went backwards: {last} -> {n}");
        assert!(n <= sent, "count {n} exceeds events sent {sent}");
        assert_eq!(n, k, "a row was seen twice");
        last = n;
        queries += 1;
        files_seen = h.catalog.snapshot().files.len();
        if sim.finished() && n == sent {
            break;
        }
        assert!(queries < 20_000);
    }
    assert!(
        files_seen > 20,
        "flushes ran during the test ({files_seen} files)"
    );
    assert!(queries > 10, "{queries} queries");
    h.stop(Duration::from_secs(10)).await.unwrap();
    sim.stop();
    let _ = wait_until(Duration::from_millis(1), || true).await;
}

/// Rewrites `path` without `drop` columns, as a writer of an older schema version would have.
/// Returns the file's rows and, per dropped column, how many of them were not null.
pub fn rewrite_as_older_schema(
    path: &std::path::Path,
    drop: &[&str],
) -> (u64, std::collections::HashMap<String, u64>) {
    use parquet::arrow::ArrowWriter;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    let b = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap()).unwrap();
    let kv: Vec<KeyValue> = b
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|k| k.key.starts_with("atlake."))
        .map(|k| {
            if k.key == "atlake.schema_version" {
                KeyValue::new(k.key, "0".to_string())
            } else {
                k
            }
        })
        .collect();
    let schema = b.schema().clone();
    let keep: Vec<usize> = (0..schema.fields().len())
        .filter(|i| !drop.contains(&schema.field(*i).name().as_str()))
        .collect();
    let b_all: Vec<_> = b.build().unwrap().map(|r| r.unwrap()).collect();
    let batches: Vec<_> = b_all.iter().map(|r| r.project(&keep).unwrap()).collect();
    let mut non_null = std::collections::HashMap::new();
    for b in b_all.iter() {
        for name in drop {
            let c = b.column_by_name(name).unwrap();
            *non_null.entry(name.to_string()).or_insert(0) += (c.len() - c.null_count()) as u64;
        }
    }
    let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(kv))
        .build();
    let tmp = path.with_extension("old");
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(&tmp).unwrap(),
        batches[0].schema(),
        Some(props),
    )
    .unwrap();
    for b in &batches {
        w.write(b).unwrap();
    }
    w.close().unwrap();
    std::fs::rename(&tmp, path).unwrap();
    // committed files never change: an older file belongs to a lake from before the Delta log
    // (whose first writer converts it), so the lake's logs go
    let root = path
        .ancestors()
        .find(|a| {
            a.file_name()
                .is_some_and(|n| n == "events" || n == "_errors")
        })
        .and_then(|t| t.parent())
        .unwrap();
    for t in ["events", "_errors"] {
        let _ = std::fs::remove_dir_all(root.join(t).join("_delta_log"));
    }
    (rows, non_null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_of_an_older_schema_version_read_with_missing_columns_as_null() {
    let (_dir, lake, _) = fixture_lake(1500, 21).await;
    let engine = QueryEngine::try_new(Lake::open(&lake).unwrap(), None, Limits::default()).unwrap();
    let q = "SELECT count(*) AS n, count(rev) AS revs, count(cid) AS cids, count(seq) AS seqs, \
             count(subject_uri) AS subjects FROM likes";
    let before = first_row(&engine, q).await.unwrap();
    // one likes file loses `rev`, `cid` and `seq`, as if written before they existed
    let like_dir =
        std::path::Path::new(&lake).join("events/collection_partition=app.bsky.feed.like");
    let mut files = Vec::new();
    let mut stack = vec![like_dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                files.push(p);
            }
        }
    }
    files.sort();
    let (old_rows, non_null) = rewrite_as_older_schema(&files[0], &["rev", "cid", "seq"]);
    assert!(old_rows > 0);
    let engine = QueryEngine::try_new(Lake::open(&lake).unwrap(), None, Limits::default()).unwrap();
    let after = first_row(&engine, q).await.unwrap();
    let get = |v: &std::collections::HashMap<String, u64>, k: &str| v[k];
    assert_eq!(get(&after, "n"), get(&before, "n"), "every row still reads");
    for (col, stored) in [("revs", "rev"), ("cids", "cid"), ("seqs", "seq")] {
        assert!(non_null[stored] > 0);
        assert_eq!(
            get(&after, col),
            get(&before, col) - non_null[stored],
            "{col}: the old file's rows read as null"
        );
    }
    assert_eq!(get(&after, "subjects"), get(&before, "subjects"));
    // and the old rows are there with their other columns
    let v = first_row(&engine, "SELECT count(*) AS n FROM likes WHERE rev IS NULL AND did IS NOT NULL AND rkey IS NOT NULL")
        .await
        .unwrap();
    assert_eq!(get(&v, "n"), old_rows);
    let v = first_row(
        &engine,
        "SELECT count(*) AS n FROM events WHERE collection = 'app.bsky.feed.like' AND seq IS NULL",
    )
    .await
    .unwrap();
    assert_eq!(get(&v, "n"), old_rows);
}

/// Files written before `origin` existed (schema version 3) take it from their file name: the
/// same answers, whether the column is read, filtered on, or both, on one-collection partitions
/// and on `events`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_without_origin_take_it_from_their_name() {
    let (_dir, lake, _) = fixture_lake(1500, 22).await;
    let queries = [
        "SELECT count(*) AS n FROM events WHERE origin = 'firehose'",
        "SELECT count(*) AS n FROM events WHERE origin = 'jetstream'",
        "SELECT count(*) AS n FROM events WHERE origin IS NULL",
        "SELECT count(*) AS n FROM likes WHERE origin = 'firehose' AND operation = 'create'",
        "SELECT count(*) AS n FROM likes WHERE origin <> 'firehose'",
        "SELECT count(DISTINCT origin) AS n FROM events",
        "SELECT count(*) AS n FROM events WHERE collection = 'app.bsky.feed.like' AND origin = 'firehose'",
    ];
    let engine = QueryEngine::try_new(Lake::open(&lake).unwrap(), None, Limits::default()).unwrap();
    let mut before = Vec::new();
    for q in queries {
        before.push(first_row(&engine, q).await.unwrap()["n"]);
    }
    let total = first_row(&engine, "SELECT count(*) AS n FROM events")
        .await
        .unwrap()["n"];
    // the fixture is a firehose capture: every row says so
    assert_eq!(before[0], total);
    assert_eq!((before[1], before[2], before[4], before[5]), (0, 0, 0, 1));
    assert!(before[3] > 0 && before[6] >= before[3]);
    // every events file loses `origin`
    let mut stack = vec![std::path::Path::new(&lake).join("events")];
    let mut rewritten = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.ends_with("_delta_log") {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                let (_, non_null) = rewrite_as_older_schema(&p, &["origin"]);
                assert!(non_null["origin"] > 0);
                rewritten += 1;
            }
        }
    }
    assert!(rewritten > 5);
    let engine = QueryEngine::try_new(Lake::open(&lake).unwrap(), None, Limits::default()).unwrap();
    for (q, want) in queries.iter().zip(&before) {
        assert_eq!(first_row(&engine, q).await.unwrap()["n"], *want, "{q}");
    }
}

/// `current.records` is the log folded: per (did, collection, rkey) the row with the highest
/// rev, gone when that is a delete or the account's latest `#account` event is a deletion or
/// takedown; computed here independently from the rows and compared key by key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_records_fold_the_log() {
    use arrow::array::{Array, AsArray};
    let (_dir, lake, _) = fixture_lake(6000, 23).await;
    let engine = QueryEngine::try_new(Lake::open(&lake).unwrap(), None, Limits::default()).unwrap();
    let rows = engine
        .collect(
            "SELECT did, collection, rkey, rev, operation, cid FROM events WHERE kind = 'commit'",
        )
        .await
        .unwrap();
    // (did, collection, rkey) -> (rev, operation, cid)
    type Latest =
        std::collections::HashMap<(String, String, String), (String, String, Option<String>)>;
    let mut latest: Latest = Latest::new();
    let mut total = 0;
    for b in &rows {
        let col = |i: usize| {
            arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8).unwrap()
        };
        let (d, c, r, rev, op, cid) = (col(0), col(1), col(2), col(3), col(4), col(5));
        let s = |a: &arrow::array::ArrayRef, i: usize| {
            let a = a.as_string::<i32>();
            (!a.is_null(i)).then(|| a.value(i).to_string())
        };
        for i in 0..b.num_rows() {
            total += 1;
            let key = (s(&d, i).unwrap(), s(&c, i).unwrap(), s(&r, i).unwrap());
            let v = (s(&rev, i).unwrap(), s(&op, i).unwrap(), s(&cid, i));
            match latest.get(&key) {
                Some(old) if old.0 >= v.0 => {}
                _ => {
                    latest.insert(key, v);
                }
            }
        }
    }
    let accounts = engine
        .collect("SELECT did, active, status, time_us, event_seq FROM account")
        .await
        .unwrap();
    let mut last: std::collections::HashMap<String, (i64, i64, bool, Option<String>)> =
        std::collections::HashMap::new();
    for b in &accounts {
        let did = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let status = arrow::compute::cast(b.column(2), &arrow::datatypes::DataType::Utf8).unwrap();
        for i in 0..b.num_rows() {
            let d = did.as_string::<i32>().value(i).to_string();
            let st = status.as_string::<i32>();
            let v = (
                b.column(3)
                    .as_primitive::<arrow::datatypes::Int64Type>()
                    .value(i),
                b.column(4)
                    .as_primitive::<arrow::datatypes::Int64Type>()
                    .value(i),
                b.column(1).as_boolean().value(i),
                (!st.is_null(i)).then(|| st.value(i).to_string()),
            );
            if last.get(&d).is_none_or(|o| (o.0, o.1) < (v.0, v.1)) {
                last.insert(d, v);
            }
        }
    }
    let gone: std::collections::HashSet<String> = last
        .into_iter()
        .filter(|(_, v)| !v.2 && matches!(v.3.as_deref(), Some("deleted" | "takendown")))
        .map(|(d, _)| d)
        .collect();
    let mut want: Vec<(String, String, String, String)> = latest
        .into_iter()
        .filter(|(k, v)| v.1 != "delete" && !gone.contains(&k.0))
        .map(|(k, v)| (k.0, k.1, k.2, v.2.unwrap_or_default()))
        .collect();
    want.sort();
    let got_b = engine
        .collect("SELECT did, collection, rkey, cid FROM current.records")
        .await
        .unwrap();
    let mut got = Vec::new();
    for b in &got_b {
        let c: Vec<_> = (0..4)
            .map(|i| arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8).unwrap())
            .collect();
        for i in 0..b.num_rows() {
            got.push((
                c[0].as_string::<i32>().value(i).to_string(),
                c[1].as_string::<i32>().value(i).to_string(),
                c[2].as_string::<i32>().value(i).to_string(),
                c[3].as_string::<i32>().value(i).to_string(),
            ));
        }
    }
    got.sort();
    assert!(
        want.len() < total,
        "the fold removed nothing: the test proves nothing"
    );
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
    // the typed views agree with records, and keep their typed columns
    let n = |q: &'static str| {
        let engine = &engine;
        async move { first_row(engine, q).await.unwrap()["n"] }
    };
    assert_eq!(
        n("SELECT count(*) AS n FROM current.posts").await,
        n("SELECT count(*) AS n FROM current.records WHERE collection = 'app.bsky.feed.post'")
            .await
    );
    assert!(n("SELECT count(text) AS n FROM current.posts").await > 0);
    assert_eq!(
        n("SELECT count(*) AS n FROM current.follows").await,
        n("SELECT count(*) AS n FROM current.records WHERE collection = 'app.bsky.graph.follow'")
            .await
    );
}

/// The first row of a query's result, as column name -> integer.
async fn first_row(
    engine: &QueryEngine,
    q: &str,
) -> Result<std::collections::HashMap<String, u64>, String> {
    let batches = engine.collect(q).await.map_err(|e| e.to_string())?;
    let b = &batches[0];
    Ok(b.schema()
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let c = arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::UInt64).unwrap();
            let c = c
                .as_any()
                .downcast_ref::<arrow::array::UInt64Array>()
                .unwrap();
            (f.name().clone(), c.value(0))
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_json_unions_encode_in_every_text_format() {
    let (_dir, lake, _) = fixture_lake(400, 6).await;
    let s = server(&lake, Limits::default(), None).await;
    let c = reqwest::Client::new();
    for (format, q) in [
        ("csv", "SELECT langs, facet_tags FROM posts LIMIT 5"),
        ("csv", "SELECT record->'subject' AS s FROM likes LIMIT 5"),
        ("json", "SELECT record->'subject' AS s FROM likes LIMIT 5"),
        ("ndjson", "SELECT record->'a'->'b' AS s FROM events LIMIT 5"),
        ("csv", "SELECT langs FROM posts WHERE false"),
    ] {
        let r = c
            .post(format!("{}/sql?format={format}", s.base))
            .body(q)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(status, 200, "{format}: {q}: {body}");
        assert!(!body.is_empty(), "{format}: {q}");
    }
}

/// One event's filterable columns, for evaluating predicates in Rust.
struct Row {
    kind: String,
    collection: Option<String>,
    operation: Option<String>,
    did: String,
}

/// Checks that filters on stored columns, which the scan applies itself (substituting what a
/// partition says about `kind` and `collection`, then row by row), count exactly the rows a
/// plain evaluation of the same predicate over every row keeps.
async fn filters_match_row_by_row_evaluation(engine: &QueryEngine) {
    use arrow::array::{Array, AsArray};
    let batches = engine
        .collect("SELECT kind, collection, operation, did FROM events")
        .await
        .unwrap();
    let mut rows = Vec::new();
    for b in &batches {
        let s = |i: usize| arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8);
        let (k, c, o, d) = (s(0).unwrap(), s(1).unwrap(), s(2).unwrap(), s(3).unwrap());
        let (k, c, o, d) = (
            k.as_string::<i32>(),
            c.as_string::<i32>(),
            o.as_string::<i32>(),
            d.as_string::<i32>(),
        );
        for i in 0..b.num_rows() {
            let opt = |a: &arrow::array::StringArray| a.is_valid(i).then(|| a.value(i).to_string());
            rows.push(Row {
                kind: k.value(i).to_string(),
                collection: opt(c),
                operation: opt(o),
                did: d.value(i).to_string(),
            });
        }
    }
    assert!(rows.len() > 100, "the fixture has rows");
    let some_did = rows
        .iter()
        .find(|r| r.kind == "identity")
        .or(rows.first())
        .map(|r| r.did.clone())
        .unwrap();
    let is = |v: &Option<String>, x: &str| v.as_deref() == Some(x);
    type Pred<'a> = Box<dyn Fn(&Row) -> bool + 'a>;
    let cases: Vec<(String, Pred)> =
        vec![
        ("kind = 'commit'".into(), Box::new(|r| r.kind == "commit")),
        ("kind = 'identity'".into(), Box::new(|r| r.kind == "identity")),
        ("kind <> 'commit'".into(), Box::new(|r| r.kind != "commit")),
        (
            "collection = 'app.bsky.feed.like'".into(),
            Box::new(|r| is(&r.collection, "app.bsky.feed.like")),
        ),
        (
            "collection IN ('app.bsky.feed.post', 'app.bsky.feed.like') AND operation = 'create'"
                .into(),
            Box::new(|r| {
                (is(&r.collection, "app.bsky.feed.post") || is(&r.collection, "app.bsky.feed.like"))
                    && is(&r.operation, "create")
            }),
        ),
        (
            "kind = 'commit' AND operation = 'create'".into(),
            Box::new(|r| r.kind == "commit" && is(&r.operation, "create")),
        ),
        ("collection IS NULL".into(), Box::new(|r| r.collection.is_none())),
        (
            "NOT (collection = 'app.bsky.feed.like')".into(),
            Box::new(|r| r.collection.is_some() && !is(&r.collection, "app.bsky.feed.like")),
        ),
        (
            "collection LIKE 'app.bsky.graph.%'".into(),
            Box::new(|r| {
                r.collection
                    .as_deref()
                    .is_some_and(|c| c.starts_with("app.bsky.graph."))
            }),
        ),
        (
            format!("kind = 'identity' OR did = '{some_did}'"),
            Box::new(|r| r.kind == "identity" || r.did == some_did),
        ),
        (
            "kind = 'account' AND operation = 'create'".into(),
            Box::new(|_| false),
        ),
        (
            "operation = 'delete' OR collection = 'app.bsky.feed.repost'".into(),
            Box::new(|r| is(&r.operation, "delete") || is(&r.collection, "app.bsky.feed.repost")),
        ),
    ];
    for (pred, f) in &cases {
        let want = rows.iter().filter(|r| f(r)).count() as u64;
        let got = first_row(
            engine,
            &format!("SELECT count(*) AS n FROM events WHERE {pred}"),
        )
        .await
        .unwrap();
        assert_eq!(got["n"], want, "count(*) WHERE {pred}");
        // the filter's columns are not selected: the scan reads them for the filter only
        let got = first_row(
            engine,
            &format!("SELECT count(did) AS n, count(DISTINCT did) AS u FROM events WHERE {pred}"),
        )
        .await
        .unwrap();
        let dids: std::collections::HashSet<&str> = rows
            .iter()
            .filter(|r| f(r))
            .map(|r| r.did.as_str())
            .collect();
        assert_eq!((got["n"], got["u"]), (want, dids.len() as u64), "{pred}");
        // a limit above a filtered scan still returns matching rows only
        let got = first_row(
            engine,
            &format!("SELECT count(*) AS n FROM (SELECT did FROM events WHERE {pred} LIMIT 3)"),
        )
        .await
        .unwrap();
        assert_eq!(got["n"], want.min(3), "LIMIT 3 WHERE {pred}");
    }
    // grouped, as JSONBench Q2 asks it (count(DISTINCT) on a view, beside count(*))
    let grouped = engine
        .collect(
            "SELECT collection, count(*) AS n, count(DISTINCT did) AS u FROM events \
             WHERE kind = 'commit' AND operation = 'create' GROUP BY collection",
        )
        .await
        .unwrap();
    let mut want: std::collections::BTreeMap<String, (u64, std::collections::HashSet<&str>)> =
        Default::default();
    for r in rows
        .iter()
        .filter(|r| r.kind == "commit" && is(&r.operation, "create"))
    {
        let e = want
            .entry(r.collection.clone().unwrap_or_default())
            .or_default();
        e.0 += 1;
        e.1.insert(&r.did);
    }
    let mut got = std::collections::BTreeMap::new();
    for b in &grouped {
        let c = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let c = c.as_string::<i32>();
        let n = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        let u = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..b.num_rows() {
            got.insert(
                c.value(i).to_string(),
                (n.value(i) as u64, u.value(i) as u64),
            );
        }
    }
    let want: std::collections::BTreeMap<String, (u64, u64)> = want
        .into_iter()
        .map(|(k, (n, u))| (k, (n, u.len() as u64)))
        .collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_on_files_match_row_by_row_evaluation() {
    let (_dir, lake, _) = fixture_lake(1500, 11).await;
    let engine = QueryEngine::try_new(Lake::open(&lake).unwrap(), None, Limits::default()).unwrap();
    filters_match_row_by_row_evaluation(&engine).await;
}

/// The text of EXPLAIN's physical plan.
async fn physical_plan(engine: &QueryEngine, sql: &str) -> String {
    use arrow::array::AsArray;
    let mut out = String::new();
    for b in engine.collect(&format!("EXPLAIN {sql}")).await.unwrap() {
        let t = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let p = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Utf8).unwrap();
        for i in 0..b.num_rows() {
            if t.as_string::<i32>().value(i) == "physical_plan" {
                out.push_str(p.as_string::<i32>().value(i));
            }
        }
    }
    out
}

/// Whether every file a plan names is one of `_other` (the partition of many collections).
fn only_other_files(plan: &str) -> bool {
    plan.split("collection_partition=")
        .skip(1)
        .all(|rest| rest.starts_with("_other/"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_by_partition_come_from_the_log_and_equal_the_rows() {
    use arrow::array::AsArray;
    let (_dir, lake, events) = fixture_lake(1500, 23).await;
    let handle = Lake::open(&lake).unwrap();
    let rows = crate::common::read_lake(&handle).await;
    let engine = QueryEngine::try_new(handle, None, Limits::default()).unwrap();
    // (kind, collection) → rows, and collection → rows, read row by row from the files
    let mut by_kind: std::collections::BTreeMap<(String, String), i64> = Default::default();
    let mut by_coll: std::collections::BTreeMap<String, i64> = Default::default();
    for ((kind, coll, _), n) in &rows.counts {
        *by_kind.entry((kind.clone(), coll.clone())).or_default() += *n as i64;
        *by_coll.entry(coll.clone()).or_default() += *n as i64;
    }
    assert_eq!(by_kind.values().sum::<i64>() as u64, events);
    assert!(
        by_kind.keys().any(|(k, _)| k == "identity") && by_coll.len() > 5,
        "the fixture has events of several kinds and collections: {by_kind:?}"
    );
    let text = |b: &RecordBatch, c: usize, i: usize| {
        let a = arrow::compute::cast(b.column(c), &arrow::datatypes::DataType::Utf8).unwrap();
        let a = a.as_string::<i32>();
        if a.is_null(i) {
            String::new()
        } else {
            a.value(i).to_string()
        }
    };
    use arrow::array::{Array, RecordBatch};
    // JSONBench Q1 as it is written
    let q1 = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("queries/q1_top_event_types.sql"),
    )
    .unwrap();
    let plan = physical_plan(&engine, &q1).await;
    assert!(
        only_other_files(&plan),
        "Q1 reads no file of a one-collection partition:\n{plan}"
    );
    assert!(
        plan.contains("DataSourceExec: partitions=1"),
        "the counts' batch:\n{plan}"
    );
    let mut got: std::collections::BTreeMap<String, i64> = Default::default();
    for b in engine.collect(&q1).await.unwrap() {
        let n = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..b.num_rows() {
            got.insert(text(&b, 0, i), n.value(i));
        }
    }
    assert_eq!(got, by_coll);
    // two keys, two counts
    let sql = "SELECT kind, collection, count(*) AS n, count(1) AS m FROM events \
               GROUP BY kind, collection";
    assert!(only_other_files(&physical_plan(&engine, sql).await));
    let mut got: std::collections::BTreeMap<(String, String), i64> = Default::default();
    for b in engine.collect(sql).await.unwrap() {
        let n = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
        let m = b.column(3).as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..b.num_rows() {
            assert_eq!(n.value(i), m.value(i));
            got.insert((text(&b, 0, i), text(&b, 1, i)), n.value(i));
        }
    }
    assert_eq!(got, by_kind);
    // with a filter, the rows are read (and still counted right)
    let sql = "SELECT collection, count(*) AS n FROM events WHERE operation = 'create' \
               GROUP BY collection";
    let plan = physical_plan(&engine, sql).await;
    assert!(
        !only_other_files(&plan) && plan.contains("collection_partition=app.bsky"),
        "{plan}"
    );
    let mut want: std::collections::BTreeMap<String, i64> = Default::default();
    for ((_, coll, op), n) in &rows.counts {
        if op == "create" {
            *want.entry(coll.clone()).or_default() += *n as i64;
        }
    }
    let mut got: std::collections::BTreeMap<String, i64> = Default::default();
    for b in engine.collect(sql).await.unwrap() {
        let n = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..b.num_rows() {
            got.insert(text(&b, 0, i), n.value(i));
        }
    }
    assert_eq!(got, want);
}
