//! SQL abuse: more than a thousand generated hostile queries against `atlake serve` running as
//! its own process with a token, a query timeout and a memory cap. Every query gets a result or
//! a JSON error within the timeout, the server stays up, and its RSS stays under the cap.

use crate::common::{ChildGuard, atlake_bin, free_port, rss_anon_kb, rss_kb};
use crate::sql::fixture_lake;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub(crate) const TOKEN: &str = "abuse-token";
const QUERY_TIMEOUT_S: u64 = 2;
const MEMORY_LIMIT_MIB: u64 = 128;
/// What the process may hold beyond the memory pool: the baseline (runtime, catalog, HTTP),
/// plans, and the bounded functions' per-batch budget (a quarter of the pool) on each query
/// thread, plus held-back results (1 MiB per query).
const RSS_HEADROOM_MIB: u64 = 512;
/// The RSS cap the server must stay under: the pool plus the headroom (the 1,000-query run
/// peaked at 471 MiB in a debug build).
const RSS_CAP_MIB: u64 = MEMORY_LIMIT_MIB + RSS_HEADROOM_MIB;
/// How far above its start RSS may stay after a burst of abuse (code pages included).
const RSS_AFTER_MIB: u64 = 160;
/// How far above its start the anonymous part of RSS (heap, stacks) may stay after it. The
/// binary gives freed memory back after the last query ends (`atlake::memory`, `trim` in
/// main.rs): 17 MiB above the start with it, 40 MiB without it (debug build, 2026-12-05).
const ANON_AFTER_MIB: u64 = 32;

/// The limits the hostile queries run under (with the token).
pub const HOSTILE_LIMITS: &[(&str, &str)] = &[
    ("ATLAKE_SERVER_QUERY_TIMEOUT", "2s"),
    ("ATLAKE_SERVER_MEMORY_LIMIT", "128MiB"),
    ("ATLAKE_SERVER_MAX_RESULT_BYTES", "16MiB"),
    ("ATLAKE_SERVER_MAX_CONCURRENT_QUERIES", "2"),
    ("ATLAKE_SERVER_QUERY_QUEUE", "2"),
];

/// Queries whose functions amplify their input past the per-batch budget (with a 128 MiB
/// pool): refused as resources exhausted, or stopped by the timeout.
pub const AMPLIFYING: &[&str] = &[
    "SELECT length(concat(repeat('a', 25000000), repeat('a', 25000000), repeat('a', 25000000), repeat('a', 25000000)))",
    "SELECT length(repeat('a', 25000000) || repeat('a', 25000000) || repeat('a', 25000000))",
    "SELECT length(regexp_replace(repeat('a', 1000000), '', repeat('b', 1000), 'g'))",
    "SELECT length(regexp_replace(record, '(.)', repeat('\\1', 1000), 'g')) FROM events",
    "SELECT cardinality(range(TIMESTAMP '2020-01-01', TIMESTAMP '2020-01-02', INTERVAL '1 nanosecond'))",
    "SELECT cardinality(generate_series(TIMESTAMP '2020-01-01', TIMESTAMP '2021-01-01', INTERVAL '1 millisecond'))",
    "SELECT count(*) FROM range(TIMESTAMP '2020-01-01', TIMESTAMP '2020-01-02', INTERVAL '1 nanosecond')",
    "SELECT length(concat_ws(repeat(',', 10000000), 1, 2, 3, 4, 5))",
    "SELECT length(translate(repeat('a', 10000000), 'a', 'é'))",
    "SELECT length(lpad(record, 100000)) FROM events",
    "SELECT levenshtein(repeat('a', 50000), repeat('b', 50000))",
    "SELECT length(overlay(repeat('a', 20000000) placing repeat('b', 20000000) from 2))",
    // || of strings and of lists, and the list functions that copy their arguments
    "WITH t AS (SELECT repeat('a', 12000000) s) SELECT length(s || s || s) FROM t",
    "WITH t AS (SELECT [repeat('a', 12000000)] s) SELECT cardinality(s || s || s) FROM t",
    "WITH t AS (SELECT repeat('a', 12000000) s) SELECT cardinality(make_array(s, s, s)) FROM t",
    "WITH t AS (SELECT [repeat('a', 12000000)] s) SELECT cardinality(array_concat(s, s, s)) FROM t",
    "SELECT length(array_to_string(range(1000000), repeat('x', 100)))",
    "SELECT length(encode(repeat('a', 20000000), 'hex'))",
    "SELECT cardinality(string_to_array(repeat('a', 5000000), NULL))",
    // a chain of CTEs, each doubling the last
    "WITH a AS (SELECT repeat('a', 1000000) s), b AS (SELECT s || s s FROM a), c AS (SELECT s || s s FROM b), d AS (SELECT s || s s FROM c), e AS (SELECT s || s s FROM d), f AS (SELECT s || s s FROM e), g AS (SELECT s || s s FROM f) SELECT length(s) FROM g",
    // copies no function budget covers: the operator's batch is over the limit
    "WITH t AS (SELECT repeat('a', 12000000) s) SELECT upper(s) a, lower(s) b, upper(s) c, lower(s) d FROM t",
    // aggregates: what they hold is in the memory pool
    "SELECT length(string_agg(repeat('a', 1000), '')) FROM range(2000000)",
    "SELECT cardinality(array_agg(repeat('a', 1000))) FROM range(2000000)",
];

/// Amplifying queries over constants: refused by the budget within a second. Before constant
/// folding was limited to small results, the first answered 408 at the 2 s timeout and the
/// server then printed a million-element constant for up to 2.5 s more; the second kept a core busy
/// for 3 s after its 408.
const LARGE_CONSTANTS: &[&str] = &[
    "SELECT length(array_to_string(range(1000000), repeat('x', 100)))",
    "SELECT length(encode(repeat('a', 20000000), 'hex'))",
];

/// Queries whose results pass a 16 MiB byte limit.
pub const LARGE_RESULTS: &[&str] = &[
    "SELECT repeat('a', 10000000) AS a, repeat('b', 10000000) AS b, repeat('c', 10000000) AS c",
    "SELECT e1.record, e2.record FROM events e1, events e2",
    "SELECT repeat(record, 100) FROM events",
];

/// splitmix64: a deterministic generator, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// One hostile request body, by category.
fn hostile(rng: &mut Rng, i: u64) -> (&'static str, Vec<u8>) {
    // every table of the catalog, the quarantine included
    let tables = atlake::query::table_names();
    let t = rng.pick(&tables);
    let u = rng.pick(&tables);
    let q = match i % 10 {
        0 => {
            // huge cross joins
            let n = 2 + rng.below(5);
            let from: Vec<String> = (0..n).map(|k| format!("events e{k}")).collect();
            let shape = match rng.below(4) {
                0 => format!("SELECT count(*) FROM {}", from.join(", ")),
                1 => format!(
                    "SELECT e0.did, e1.record FROM {} ORDER BY e0.record, e1.record DESC",
                    from.join(" CROSS JOIN ")
                ),
                2 => format!(
                    "SELECT e0.collection, count(DISTINCT e1.record || e0.record) FROM {} GROUP BY 1",
                    from.join(", ")
                ),
                _ => format!(
                    "SELECT * FROM {t} a, {u} b, (SELECT * FROM events) c WHERE a.did <> b.did"
                ),
            };
            return ("cross join", shape.into_bytes());
        }
        1 => {
            // deep nesting: parentheses, subqueries, function calls, long operator chains
            let d = [10, 60, 200, 1_000, 10_000, 100_000][rng.below(6) as usize];
            match rng.below(5) {
                0 => format!("SELECT {}1{}", "(".repeat(d), ")".repeat(d)),
                1 => {
                    let mut s = format!("SELECT * FROM {t}");
                    for _ in 0..d.min(20_000) {
                        s = format!("SELECT * FROM ({s})");
                    }
                    s
                }
                2 => format!("SELECT {}1{}", "abs(".repeat(d), ")".repeat(d)),
                3 => format!("SELECT 1{}", " + 1".repeat(d)),
                _ => format!(
                    "SELECT {} 1 {}",
                    "CASE WHEN true THEN ".repeat(d.min(20_000)),
                    " ELSE 0 END".repeat(d.min(20_000))
                ),
            }
        }
        2 => {
            // regex bombs
            let pat = rng.pick(&[
                "(a+)+$",
                "(x+x+)+y",
                "(.*a){25}",
                "((((((a*)*)*)*)*)*)b",
                "a{1000}{1000}",
                "(\\w+\\s?)+$",
                "[",
                "(?<",
                "\\p{Unknown}",
                ".{65535}",
            ]);
            match rng.below(4) {
                0 => format!("SELECT count(*) FROM events WHERE record ~ '{pat}'"),
                1 => format!("SELECT regexp_like(did, '{pat}') FROM {t} LIMIT 100"),
                2 => format!(
                    "SELECT count(*) FROM events WHERE regexp_replace(coalesce(record, ''), '{pat}', 'x', 'g') <> ''"
                ),
                _ => format!("SELECT regexp_match(repeat('a', 5000), '{pat}')"),
            }
        }
        3 => {
            // enormous IN lists
            // up to ~900 KB of SQL, under the endpoint's 1 MiB body limit
            let n = [1_000, 5_000, 10_000, 25_000][rng.below(4) as usize];
            let list: Vec<String> = (0..n)
                .map(|k| format!("'did:plc:{:024x}'", rng.next() ^ k))
                .collect();
            let neg = if rng.below(2) == 0 { "" } else { "NOT " };
            format!(
                "SELECT count(*) FROM {t} WHERE did {neg}IN ({})",
                list.join(",")
            )
        }
        4 => {
            // every write statement
            let s = [
                format!("CREATE TABLE x{i} AS SELECT * FROM {t}"),
                format!("CREATE TABLE x{i} (a INT)"),
                format!("CREATE OR REPLACE VIEW {t} AS SELECT 1"),
                format!("CREATE VIEW v{i} AS SELECT * FROM {t}"),
                format!("CREATE EXTERNAL TABLE x{i} STORED AS PARQUET LOCATION '/'"),
                format!("CREATE EXTERNAL TABLE x{i} STORED AS CSV LOCATION '/etc/passwd'"),
                format!("DROP TABLE {t}"),
                format!("DROP VIEW IF EXISTS {t}"),
                "DROP SCHEMA system CASCADE".to_string(),
                format!("INSERT INTO {t} SELECT * FROM {t}"),
                format!("INSERT INTO {t} VALUES (1)"),
                format!("DELETE FROM {t}"),
                format!("UPDATE {t} SET did = 'x'"),
                format!("TRUNCATE {t}"),
                format!("COPY {t} TO '/tmp/atlake-abuse-{i}.parquet'"),
                format!("COPY (SELECT * FROM {t}) TO '/tmp/atlake-abuse-{i}.csv' STORED AS CSV"),
                "SET datafusion.execution.target_partitions = 1000000".into(),
                "SET datafusion.runtime.memory_limit = '100G'".into(),
                "RESET datafusion.execution.batch_size".into(),
                format!("CREATE SCHEMA s{i}"),
                format!("CREATE DATABASE d{i}"),
                format!("CREATE FUNCTION f{i}(INT) RETURNS INT RETURN $1"),
                format!("ALTER TABLE {t} ADD COLUMN z INT"),
                format!("SELECT 1; DROP TABLE {t}"),
                format!("EXPLAIN ANALYZE INSERT INTO {t} SELECT * FROM {t}"),
                format!("PREPARE p{i} AS SELECT * FROM {t}"),
            ];
            s[rng.below(s.len() as u64) as usize].clone()
        }
        5 => {
            // files referenced by path
            let path = rng.pick(&[
                "/etc/passwd",
                "/etc/shadow",
                "file:///etc/passwd",
                "../../../../etc/passwd",
                "/proc/self/environ",
                "s3://some-bucket/key.parquet",
                "http://169.254.169.254/latest/meta-data/",
                "lake/_atlake/checkpoint.json",
                "/tmp",
            ]);
            match rng.below(5) {
                0 => format!("SELECT * FROM '{path}'"),
                1 => format!("SELECT * FROM read_parquet('{path}')"),
                2 => format!("SELECT * FROM read_csv('{path}')"),
                3 => format!("SELECT * FROM \"{path}\""),
                _ => format!("SELECT * FROM parquet_scan('{path}')"),
            }
        }
        6 => {
            // memory and size bombs
            match rng.below(10) {
                0 => "SELECT repeat('a', 2000000000)".into(),
                1 => "SELECT length(repeat(record, 100000)) FROM events".into(),
                2 => "SELECT count(*) FROM range(1000000000000)".into(),
                3 => "SELECT lpad('x', 2147483647)".into(),
                4 => "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r".into(),
                5 => "SELECT array_agg(e1.record) FROM events e1, events e2".into(),
                6 => "SELECT string_agg(e1.record, ',') FROM events e1, events e2".into(),
                7 => "SELECT * FROM generate_series(1, 100000000000)".into(),
                8 => "SELECT array_repeat('aaaaaaaaaaaaaaaa', 1000000000)".into(),
                _ => format!(
                    "SELECT e1.did, e2.did FROM {t} e1 JOIN {u} e2 ON e1.did = e2.did ORDER BY e1.record"
                ),
            }
        }
        7 => {
            // garbage bodies
            let n = [0usize, 1, 17, 4096, 512 << 10][rng.below(5) as usize];
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            return ("garbage", bytes);
        }
        8 => {
            // catalog and function probing
            rng.pick(&[
                "SELECT * FROM information_schema.df_settings",
                "SHOW ALL",
                "SHOW TABLES",
                "SELECT * FROM system.files",
                "SELECT * FROM system.checkpoint",
                "SELECT * FROM system.ingest",
                "DESCRIBE events",
                "EXPLAIN SELECT * FROM events",
                "EXPLAIN ANALYZE SELECT count(*) FROM events e1, events e2",
                "SELECT json_get_str(record, repeat('k', 100000)) FROM events",
                "SELECT record->'a'->'b'->'c'->'d' FROM events",
                "SELECT arrow_cast(record, 'Utf8View') FROM events",
                "SELECT version()",
            ])
            .to_string()
        }
        _ => {
            // ordinary-looking queries with hostile literals
            let lit = rng.pick(&[
                "'",
                "\\'",
                "''''",
                "\u{0}",
                "%s%s%s%n",
                "\u{202e}txt.exe",
                "${jndi:ldap://x}",
            ]);
            format!(
                "SELECT did, count(*) FROM {t} WHERE did = '{}' OR did LIKE '%{}%' GROUP BY did LIMIT 10",
                lit.replace('\'', "''"),
                lit.replace('\'', "''")
            )
        }
    };
    let cat = [
        "cross join",
        "nesting",
        "regex",
        "in list",
        "write",
        "path",
        "memory",
        "garbage",
        "probing",
        "literals",
    ][(i % 10) as usize];
    (cat, q.into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hostile_queries_leave_the_server_up_and_bounded() {
    let _heavy = crate::common::HEAVY.lock().await;
    let (dir, lake, _) = fixture_lake(2000, 17).await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let log = dir.path().join("serve.log");
    let mut child = ChildGuard(
        Command::new(atlake_bin())
            .args(["serve", "--lake", &lake, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .current_dir(dir.path())
            .env("ATLAKE_SERVER_TOKEN", TOKEN)
            .env("ATLAKE_SERVER_QUERY_TIMEOUT", format!("{QUERY_TIMEOUT_S}s"))
            .env(
                "ATLAKE_SERVER_MEMORY_LIMIT",
                format!("{MEMORY_LIMIT_MIB}MiB"),
            )
            .env("ATLAKE_SERVER_MAX_RESULT_BYTES", "16MiB")
            .env("ATLAKE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = child.id();
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(QUERY_TIMEOUT_S + 20))
        .build()
        .unwrap();
    let up = Instant::now();
    while c.get(format!("{base}/health")).send().await.is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // the token is required on every route but /health
    for path in ["/sql?q=SELECT%201", "/tables", "/metrics"] {
        assert_eq!(
            c.get(format!("{base}{path}"))
                .send()
                .await
                .unwrap()
                .status(),
            401,
            "{path}"
        );
        let r = c
            .get(format!("{base}{path}"))
            .bearer_auth("wrong-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = c
        .post(format!("{base}/sql"))
        .body("SELECT count(*) AS n FROM events")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // sample RSS all along
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kb(pid) / 1024, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    const QUERIES: u64 = 1_000;
    const WORKERS: u64 = 4;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (c, base) = (c.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0xa7_1a4e ^ w);
            let mut out = Vec::new();
            let mut i = w;
            while i < QUERIES {
                let (cat, body) = hostile(&mut rng, i);
                let t = Instant::now();
                let r = c
                    .post(format!("{base}/sql?format=json"))
                    .bearer_auth(TOKEN)
                    .body(body.clone())
                    .send()
                    .await;
                let (status, error) = match r {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        let text = r.text().await.unwrap_or_default();
                        let error = if s == 200 {
                            String::new()
                        } else {
                            serde_json::from_str::<serde_json::Value>(&text)
                                .ok()
                                .and_then(|v| v["error"].as_str().map(String::from))
                                .unwrap_or_else(|| format!("not a JSON error: {text:.200}"))
                        };
                        (s, error)
                    }
                    Err(e) => (0, format!("request failed: {e}")),
                };
                out.push((
                    cat,
                    String::from_utf8_lossy(&body[..body.len().min(160)]).into_owned(),
                    status,
                    error,
                    t.elapsed(),
                ));
                i += WORKERS;
            }
            out
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);

    assert!(
        child.try_wait().unwrap().is_none(),
        "the server died: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(results.len() as u64, QUERIES);
    let mut by_cat: std::collections::BTreeMap<(&str, u16, String), u64> = Default::default();
    let mut slowest = Duration::ZERO;
    let mut failures = Vec::new();
    for (cat, q, status, error, took) in &results {
        let q: String = q.chars().take(100).collect();
        // a result or a typed JSON error, never a dropped connection or a server fault
        if !(*status == 200 || (400..500).contains(status)) || error.starts_with("not a JSON error")
        {
            failures.push(format!(
                "{cat}: {q}: status {status} {error} after {took:?}"
            ));
        }
        // within the timeout (plus the time to read a large body and some scheduling slack)
        if *took >= Duration::from_secs(QUERY_TIMEOUT_S + 8) {
            failures.push(format!("{cat}: {q}: took {took:?}"));
        }
        // writes never succeed
        if *cat == "write" && *status == 200 {
            failures.push(format!("{cat}: {q}: a write succeeded"));
        }
        slowest = slowest.max(*took);
        *by_cat.entry((cat, *status, error.clone())).or_default() += 1;
    }
    for ((cat, status, error), n) in &by_cat {
        eprintln!("  {cat:<11} {status} {error:<22} {n}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // nothing was written anywhere
    for i in 0..QUERIES {
        assert!(!std::path::Path::new(&format!("/tmp/atlake-abuse-{i}.parquet")).exists());
        assert!(!std::path::Path::new(&format!("/tmp/atlake-abuse-{i}.csv")).exists());
    }
    assert!(
        peak < RSS_CAP_MIB,
        "peak RSS {peak} MiB over the cap of {RSS_CAP_MIB} MiB"
    );
    // and it still answers, with the lake intact
    let r = c
        .post(format!("{base}/sql"))
        .bearer_auth(TOKEN)
        .body("SELECT count(*) AS n FROM events")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v[0]["n"].as_u64().unwrap() > 0);
    eprintln!(
        "SQL ABUSE RESULT: {QUERIES} hostile queries, {WORKERS} clients, {:.1} s, slowest {:.2} s, peak RSS {peak} MiB (cap {RSS_CAP_MIB} MiB, pool {MEMORY_LIMIT_MIB} MiB), server up",
        elapsed.as_secs_f64(),
        slowest.as_secs_f64()
    );
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
}

/// CPU time of process `pid` so far, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // fields after the command name (which may hold spaces): utime is the 12th, stime the 13th
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// `atlake serve` on `lake` with a token and the given extra settings; waits until it answers.
/// The hostile queries every other front end replays to compare its verdicts with HTTP's:
/// deep SQL of every shape, the amplifying functions, results over the byte limit, a plain
/// query, a write, a path, and bad SQL.
pub(crate) fn replayed_queries() -> Vec<String> {
    let mut queries: Vec<String> = Vec::new();
    for n in [20, 1_000, 10_000] {
        for (_, q) in atlake::query::guard::deep_sql(n) {
            queries.push(q);
        }
    }
    queries.extend(AMPLIFYING.iter().map(|q| q.to_string()));
    queries.extend(LARGE_RESULTS.iter().map(|q| q.to_string()));
    queries.extend(
        [
            "SELECT count(*) FROM events",
            "DROP TABLE events",
            "SELECT * FROM 'lake/events'",
            "SELECT nonsense(",
        ]
        .map(String::from),
    );
    queries
}

pub(crate) async fn start_serve(
    dir: &std::path::Path,
    lake: &str,
    env: &[(&str, &str)],
) -> (ChildGuard, String, std::path::PathBuf) {
    let port = free_port();
    let log = dir.join(format!("serve-{port}.log"));
    let mut cmd = Command::new(atlake_bin());
    cmd.args(["serve", "--lake", lake, "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .current_dir(dir)
        .env("ATLAKE_SERVER_TOKEN", TOKEN)
        .env("ATLAKE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = ChildGuard(cmd.spawn().unwrap());
    let base = format!("http://127.0.0.1:{port}");
    let c = reqwest::Client::new();
    let up = Instant::now();
    while c.get(format!("{base}/health")).send().await.is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "serve did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, base, log)
}

/// Status, `error` code and time of one query.
pub(crate) async fn post_sql(c: &reqwest::Client, base: &str, q: &str) -> (u16, String, Duration) {
    let t = Instant::now();
    match c
        .post(format!("{base}/sql?format=json"))
        .bearer_auth(TOKEN)
        .body(q.to_string())
        .send()
        .await
    {
        Ok(r) => {
            let s = r.status().as_u16();
            let (text, aborted) = match r.text().await {
                Ok(t) => (t, false),
                Err(_) => (String::new(), true),
            };
            let e = if s == 200 && aborted {
                // a limit hit after the response started: the transfer is cut off
                "aborted".to_string()
            } else if s == 200 {
                String::new()
            } else {
                serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(String::from))
                    .unwrap_or_else(|| format!("not a JSON error: {text:.200}"))
            };
            (s, e, t.elapsed())
        }
        Err(e) => (0, format!("request failed: {e}"), t.elapsed()),
    }
}

/// `/health` answers 200 within `within`.
pub(crate) async fn healthy(
    c: &reqwest::Client,
    base: &str,
    within: Duration,
) -> Result<Duration, String> {
    let t = Instant::now();
    let r = tokio::time::timeout(within, c.get(format!("{base}/health")).send())
        .await
        .map_err(|_| format!("/health took more than {within:?}"))?
        .map_err(|e| format!("/health failed: {e}"))?;
    if r.status() != 200 {
        return Err(format!("/health answered {}", r.status()));
    }
    Ok(t.elapsed())
}

/// Regression for issue 13: one request of deep SQL aborted the process (stack overflow), and
/// amplifying functions, planning and long batches went past the memory pool and the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_and_amplifying_sql_is_refused_and_the_server_stays_up_within_its_limits() {
    let _heavy = crate::common::HEAVY.lock().await;
    let (dir, lake, _) = fixture_lake(2000, 17).await;
    let (mut child, base, log) = start_serve(dir.path(), &lake, HOSTILE_LIMITS).await;
    let pid = child.id();
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let base_rss = rss_kb(pid) / 1024;
    let base_anon = rss_anon_kb(pid) / 1024;
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kb(pid) / 1024, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut failures = Vec::new();
    let mut counts: std::collections::BTreeMap<(u16, String), u64> = Default::default();

    // 1. deep SQL of every shape: short chains run, long ones get a 4xx; never a crash
    let started = Instant::now();
    for n in [20, 150, 1_000, 3_000, 10_000, 30_000] {
        for (shape, q) in atlake::query::guard::deep_sql(n) {
            if q.len() >= 1 << 20 {
                continue;
            }
            let (status, error, took) = post_sql(&c, &base, &q).await;
            if std::env::var("ATLAKE_TEST_VERBOSE").is_ok() {
                eprintln!("  {shape} x{n}: {status} {error} {took:?}");
            }
            *counts.entry((status, error.clone())).or_default() += 1;
            let ok =
                status == 200 || ((400..500).contains(&status) && !error.starts_with("not a JSON"));
            if !ok || (n >= 1_000 && status == 200) || took > Duration::from_secs(4) {
                failures.push(format!("{shape} x{n}: {status} {error} after {took:?}"));
            }
            if let Err(e) = healthy(&c, &base, Duration::from_secs(2)).await {
                panic!(
                    "after {shape} x{n}: {e}; log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }
    let deep_time = started.elapsed();

    // 2. amplifying functions: refused by the per-batch budget (32 MiB: a quarter of the pool)
    for q in AMPLIFYING {
        let (status, error, took) = post_sql(&c, &base, q).await;
        *counts.entry((status, error.clone())).or_default() += 1;
        if !(status == 400 && error == "resources_exhausted" || status == 408) {
            failures.push(format!(
                "amplifying {q:.90}: {status} {error} after {took:?}"
            ));
        }
        // large constants are not folded while the query is planned (where the planner
        // printed them into names for seconds, past the 408): the budget refuses them at once
        if LARGE_CONSTANTS.contains(q) && (status != 400 || took > Duration::from_secs(1)) {
            failures.push(format!(
                "large constant {q:.90}: {status} {error} after {took:?}, not refused at once"
            ));
        }
        // nothing keeps running after a 408. On a loaded machine (CI runs the tests side by
        // side) the query's last batches may end a little after the answer (once 26 ticks in
        // the first second); work that goes on (the runaway this guards against used seconds
        // of CPU after its 408) is still busy in the second second
        if status == 408 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut windows = Vec::new();
            for _ in 0..2 {
                let t0 = cpu_ticks(pid);
                tokio::time::sleep(Duration::from_secs(1)).await;
                let busy = cpu_ticks(pid) - t0;
                windows.push(busy);
                if busy <= 20 {
                    break;
                }
            }
            if windows.iter().all(|b| *b > 20) {
                failures.push(format!(
                    "amplifying {q:.90}: {windows:?} ticks of CPU in each second after its 408"
                ));
            }
            if windows.len() > 1 {
                eprintln!(
                    "amplifying {q:.90}: {windows:?} ticks of CPU in the seconds after its 408"
                );
            }
        }
    }
    // results over the byte limit stop there: 413, not a result built in full first
    for q in LARGE_RESULTS {
        let (status, error, took) = post_sql(&c, &base, q).await;
        *counts.entry((status, error.clone())).or_default() += 1;
        // 413 before the response starts, a cut-off transfer after, or the timeout when
        // encoding is slow (a loaded machine): never a complete result
        if status == 200 && error.is_empty()
            || (400..500).contains(&status) && error.starts_with("not a JSON")
            || status >= 500
            || status == 0
        {
            failures.push(format!(
                "large result {q:.90}: {status} {error} after {took:?}"
            ));
        }
    }
    // planning: a 3,000-CTE chain is refused before it is planned
    let ctes = atlake::query::guard::deep_sql(3_000)
        .into_iter()
        .find(|(s, _)| *s == "cte chain")
        .unwrap()
        .1;
    let (status, _, took) = post_sql(&c, &base, &ctes).await;
    if status != 400 || took > Duration::from_secs(1) {
        failures.push(format!("3,000 CTEs: {status} after {took:?}"));
    }
    // and an IN list of more values than a statement may hold (the largest that fits the body
    // limit took 79 MiB and more than 5 s to plan)
    let values = (0..60_000).map(|i| i.to_string()).collect::<Vec<_>>();
    let list = format!(
        "SELECT count(*) FROM events WHERE seq IN ({})",
        values.join(",")
    );
    let (status, error, took) = post_sql(&c, &base, &list).await;
    if status != 400 || error != "bad_sql" || took > Duration::from_secs(1) {
        failures.push(format!("60,000 values: {status} {error} after {took:?}"));
    }

    // 3. time: a CPU-heavy filter stops at the deadline, and nothing runs after the 408.
    // The server is idle within 3 s of the queries above (it stayed busy 3.5-11 s when large
    // constants were folded while planning)
    let quiet = Instant::now();
    loop {
        let t0 = cpu_ticks(pid);
        tokio::time::sleep(Duration::from_millis(500)).await;
        if cpu_ticks(pid) - t0 <= 5 {
            break;
        }
        if quiet.elapsed() > Duration::from_secs(3) {
            failures.push("the server stayed busy for 3 s after the amplifying queries".into());
            break;
        }
    }
    eprintln!("idle {:?} after the amplifying queries", quiet.elapsed());
    let heavy = "SELECT count(*) FROM events a, events b WHERE regexp_like(a.record || b.record, 'x{3}y[0-9]+z')";
    let (status, error, took) = post_sql(&c, &base, heavy).await;
    if status != 408 || took > Duration::from_millis(3_000) {
        failures.push(format!(
            "heavy: {status} {error} after {took:?} (timeout 2 s)"
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu0 = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = cpu_ticks(pid) - cpu0;
    if after > 30 {
        failures.push(format!(
            "the server used {after} ticks of CPU in the 2 s after a 408"
        ));
    }
    // heavy queries do not starve /health, and beyond 2 running + 2 queued: 503
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, base) = (c.clone(), base.clone());
        tasks.push(tokio::spawn(
            async move { post_sql(&c, &base, heavy).await },
        ));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut slowest_health = Duration::ZERO;
    for _ in 0..5 {
        match healthy(&c, &base, Duration::from_secs(1)).await {
            Ok(t) => slowest_health = slowest_health.max(t),
            Err(e) => failures.push(format!("under load: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let (s, e, took) = t.await.unwrap();
        *counts.entry((s, e.clone())).or_default() += 1;
        statuses.push(s);
        if took > Duration::from_secs(3) {
            failures.push(format!("concurrent heavy: {s} {e} after {took:?}"));
        }
    }
    if !statuses.contains(&503) || !statuses.contains(&408) {
        failures.push(format!(
            "8 heavy queries on 2 slots + 2 queued: {statuses:?}"
        ));
    }

    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server died: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let end_rss = rss_kb(pid) / 1024;
    let end_anon = rss_anon_kb(pid) / 1024;
    for ((status, error), n) in &counts {
        eprintln!("  {status} {error:<22} {n}");
    }
    eprintln!(
        "DEEP SQL RESULT: deep shapes in {:.1} s; RSS start {base_rss} MiB, peak {peak} MiB, end {end_rss} MiB; anonymous RSS start {base_anon} MiB, end {end_anon} MiB; /health under load at most {} ms",
        deep_time.as_secs_f64(),
        slowest_health.as_millis()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        peak < MEMORY_LIMIT_MIB + RSS_HEADROOM_MIB,
        "peak RSS {peak} MiB over the pool plus headroom"
    );
    // what the process holds comes back near its start: the query threads keep the stack
    // pages deep plans touched, and the allocator what it could not give back (17 MiB more
    // than at the start in the last run); the rest of RSS's growth is the pages of the
    // binary's code those queries ran (file-backed, shared, reclaimable: 73 MiB of this
    // debug build's)
    assert!(
        end_anon < base_anon + ANON_AFTER_MIB,
        "anonymous RSS stayed at {end_anon} MiB after the burst (start {base_anon} MiB)"
    );
    assert!(
        end_rss < base_rss + RSS_AFTER_MIB,
        "RSS stayed at {end_rss} MiB after the burst (start {base_rss} MiB)"
    );
}

/// Connections: a partial header, a partial body or silence are closed at their deadlines;
/// `/health` and `SHOW ALL` show no paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_and_nothing_shows_a_path() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (dir, lake, _) = fixture_lake(200, 3).await;
    let spill = dir.path().join("spill-here");
    let (_child, base, _log) = start_serve(
        dir.path(),
        &lake,
        &[
            ("ATLAKE_SERVER_HEADER_TIMEOUT", "1s"),
            ("ATLAKE_SERVER_BODY_TIMEOUT", "1s"),
            ("ATLAKE_SERVER_QUERY_TIMEOUT", "2s"),
            ("ATLAKE_SERVER_IDLE_TIMEOUT", "3s"),
            ("ATLAKE_SERVER_SPILL_DIR", spill.to_str().unwrap()),
        ],
    )
    .await;
    let addr = base.trim_start_matches("http://").to_string();
    // how long until the server closes a connection that sends `sent`
    async fn closed_after(addr: &str, sent: &[u8], drip: bool) -> Option<Duration> {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let t = Instant::now();
        if drip {
            s.write_all(sent).await.ok()?;
            // one header line a second, never finishing
            for i in 0..20 {
                if s.write_all(format!("X-Drip-{i}: 1\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return Some(t.elapsed());
                }
                let mut b = [0u8; 1024];
                match tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
                    Ok(Ok(_)) => {}
                    Err(_) => {}
                }
            }
            return None;
        }
        s.write_all(sent).await.ok()?;
        let mut b = Vec::new();
        match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut b)).await {
            Ok(_) => Some(t.elapsed()),
            Err(_) => None,
        }
    }
    let partial_body = format!(
        "POST /sql HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\nSELECT"
    );
    let cases: Vec<(&str, Vec<u8>, bool, Duration)> = vec![
        ("silence", Vec::new(), false, Duration::from_secs(2)),
        (
            "partial header",
            b"GET /health HTTP/1.1\r\nHost: x\r\n".to_vec(),
            false,
            Duration::from_secs(2),
        ),
        (
            "dripping header",
            b"GET /health HTTP/1.1\r\n".to_vec(),
            true,
            Duration::from_secs(3),
        ),
        (
            "partial body",
            partial_body.into_bytes(),
            false,
            Duration::from_secs(2),
        ),
    ];
    let mut failures = Vec::new();
    for (name, sent, drip, within) in cases {
        match closed_after(&addr, &sent, drip).await {
            Some(t) if t <= within => {}
            other => failures.push(format!(
                "{name}: closed after {other:?}, expected within {within:?}"
            )),
        }
    }
    // 50 dripping connections do not keep /health from answering once they are closed
    let drips: Vec<_> = (0..50)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(
                async move { closed_after(&addr, b"GET /health HTTP/1.1\r\n", true).await },
            )
        })
        .collect();
    for d in drips {
        if d.await.unwrap().is_none_or(|t| t > Duration::from_secs(3)) {
            failures.push("a dripping connection stayed open".into());
        }
    }
    let c = reqwest::Client::new();
    let h: serde_json::Value = c
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = h.to_string();
    if text.contains(&lake)
        || text.contains(dir.path().to_str().unwrap())
        || h.get("lake").is_some()
    {
        failures.push(format!("/health shows a path: {text}"));
    }
    for q in [
        "SHOW ALL",
        "SELECT * FROM information_schema.df_settings",
        "SELECT name, value FROM information_schema.df_settings WHERE name LIKE '%temp%' OR name LIKE '%runtime%'",
        "SHOW datafusion.runtime.temp_directory",
    ] {
        let r = c
            .post(format!("{base}/sql?format=json"))
            .bearer_auth(TOKEN)
            .body(q)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        if body.contains("spill-here")
            || body.contains("datafusion.runtime")
            || body.contains("/tmp")
        {
            failures.push(format!(
                "{q}: {status} shows a runtime setting or path: {body:.300}"
            ));
        }
        if q == "SHOW ALL" && (status != 200 || !body.contains("datafusion.execution.batch_size")) {
            failures.push(format!("SHOW ALL no longer works: {status} {body:.200}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
