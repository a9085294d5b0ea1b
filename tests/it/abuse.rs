//! SQL abuse: more than a thousand generated hostile queries against `atlake serve` running as
//! its own process with a token, a query timeout and a memory cap. Every query gets a result or
//! a JSON error within the timeout, the server stays up, and its RSS stays under the cap.

use crate::common::{ChildGuard, atlake_bin, free_port, rss_kb};
use crate::sql::fixture_lake;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const TOKEN: &str = "abuse-token";
const QUERY_TIMEOUT_S: u64 = 2;
const MEMORY_LIMIT_MIB: u64 = 128;
/// The RSS cap the server must stay under: the query memory pool (shared by all queries) plus
/// what it does not account for: the process baseline (runtime, catalog, HTTP), parsed SQL and
/// plans (a 25,000-item IN list is megabytes of plan), and scalar function outputs, each call
/// bounded to a quarter of the pool per batch (`query::bounded`), for 4 concurrent clients.
/// Measured peaks: 644 and 629 MiB (debug build).
const RSS_CAP_MIB: u64 = 1024;

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
