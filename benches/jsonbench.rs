#![allow(missing_docs, clippy::print_stdout)] // a benchmark report printed to stdout
//! JSONBench Q1–Q5 over a lake, with DuckDB side by side when the Python `duckdb` package is
//! there.
//!
//! `ATLAKE_BENCH_LAKE=/path/to/lake cargo bench --bench jsonbench` (scripts/bench builds a lake
//! from the simulator first). Each query runs once to warm up, then `ATLAKE_BENCH_RUNS` times
//! (default 3); the best time is reported. DuckDB reads the same Parquet files with the same
//! number of threads (`ATLAKE_BENCH_THREADS`, default: all cores). `ATLAKE_BENCH_QUERIES=DIR`
//! runs the `*.sql` files of DIR instead of Q1–Q5 (to compare formulations).

use atlake::query::{Limits, QueryEngine};
use atlake::sink::store::Lake;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const QUERIES: [&str; 5] = [
    "q1_top_event_types",
    "q2_event_types_and_users",
    "q3_when_do_people_use_bluesky",
    "q4_post_veterans",
    "q5_longest_activity",
];

const DUCKDB: &str = r#"
import duckdb, sys, time, json
lake, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
qs = json.loads(sys.argv[4])
con = duckdb.connect()
con.execute(f"SET threads={threads}")
# the files store time_us; `time` is derived, as in atlake
con.execute(f"CREATE VIEW events AS SELECT *, make_timestamp(time_us) AS time FROM read_parquet('{lake}/events/*=*/**/*.parquet', union_by_name=true, hive_partitioning=false)")
out = {}
for name, sql in qs.items():
    con.execute(sql).fetchall()
    best = 1e9
    for _ in range(runs):
        t = time.time(); rows = con.execute(sql).fetchall(); best = min(best, time.time() - t)
    out[name] = [best, len(rows)]
print(json.dumps(out))
"#;

fn best_of(runs: usize, mut f: impl FnMut() -> usize) -> (Duration, usize) {
    let mut best = Duration::MAX;
    let mut rows = 0;
    f();
    for _ in 0..runs {
        let t = Instant::now();
        rows = f();
        best = best.min(t.elapsed());
    }
    (best, rows)
}

/// The queries to time: Q1–Q5 of `queries/`, or every `*.sql` of `$ATLAKE_BENCH_QUERIES`.
fn load_queries() -> Result<Vec<(String, String)>, String> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
    };
    match std::env::var("ATLAKE_BENCH_QUERIES") {
        Ok(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| format!("ATLAKE_BENCH_QUERIES={dir}: {e}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "sql"))
                .collect();
            files.sort();
            files
                .iter()
                .map(|p| {
                    let name = p.file_stem().unwrap_or_default().to_string_lossy();
                    Ok((name.into_owned(), read(p)?))
                })
                .collect()
        }
        Err(_) => {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            QUERIES
                .iter()
                .map(|q| Ok((q.to_string(), read(&root.join(format!("queries/{q}.sql")))?)))
                .collect()
        }
    }
}

fn main() {
    let Ok(lake) = std::env::var("ATLAKE_BENCH_LAKE") else {
        eprintln!(
            "jsonbench: set ATLAKE_BENCH_LAKE to a lake (scripts/bench builds one); skipping"
        );
        return;
    };
    let runs: usize = std::env::var("ATLAKE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let threads: usize = std::env::var("ATLAKE_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    // ATLAKE_BENCH_QUERIES=DIR runs every `*.sql` of DIR instead (to compare variants)
    let sqls = or_exit(load_queries(), "queries");
    let rt = or_exit(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build(),
        "runtime",
    );
    let lake_handle = or_exit(Lake::open(&lake), &lake);
    let engine = or_exit(
        QueryEngine::try_new(lake_handle, None, Limits::default()),
        "query engine",
    );
    let events = rt
        .block_on(engine.collect("SELECT count(*) FROM events"))
        .ok()
        .and_then(|b| {
            b.first().map(|b| {
                arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b.column(0))
                    .value(0)
            })
        })
        .unwrap_or(0);
    let mut ours = Vec::new();
    for (name, sql) in &sqls {
        let (t, rows) = best_of(runs, || {
            or_exit(rt.block_on(engine.collect(sql)), name)
                .iter()
                .map(|b| b.num_rows())
                .sum()
        });
        ours.push((name.clone(), t, rows));
    }
    let py = std::env::var("ATLAKE_PYTHON").unwrap_or_else(|_| "python3".into());
    let qs: serde_json::Map<String, serde_json::Value> = sqls
        .iter()
        .map(|(n, s)| (n.clone(), serde_json::Value::String(s.clone())))
        .collect();
    let duck = std::process::Command::new(&py)
        .args([
            "-c",
            DUCKDB,
            &lake,
            &threads.to_string(),
            &runs.to_string(),
            &serde_json::Value::Object(qs).to_string(),
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok());
    println!("JSONBench on {events} events ({lake}), {threads} threads, best of {runs}");
    println!("| query | atlake (s) | DuckDB (s) | atlake / DuckDB | rows |");
    println!("|---|---|---|---|---|");
    for (name, t, rows) in &ours {
        let d = duck.as_ref().and_then(|v| v[name][0].as_f64());
        let drows = duck.as_ref().and_then(|v| v[name][1].as_u64());
        if let Some(dr) = drows {
            assert_eq!(
                dr as usize, *rows,
                "{name}: DuckDB and atlake disagree on the number of rows"
            );
        }
        match d {
            Some(d) => println!(
                "| {name} | {:.3} | {d:.3} | {:.2} | {rows} |",
                t.as_secs_f64(),
                t.as_secs_f64() / d
            ),
            None => println!("| {name} | {:.3} | - | - | {rows} |", t.as_secs_f64()),
        }
    }
    if duck.is_none() {
        println!("(DuckDB not measured: no Python with duckdb at {py}; set ATLAKE_PYTHON)");
    }
}

/// The value, or the error on stderr and exit status 2 (a benchmark that cannot run says why).
fn or_exit<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| {
        eprintln!("jsonbench: {what}: {e}");
        std::process::exit(2)
    })
}
