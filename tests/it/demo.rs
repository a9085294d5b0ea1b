//! `atlake demo` as a new user runs it (one command, no network: the simulator in the same
//! process, the lake, SQL and the console), and the Grafana files of `config/grafana/` against
//! it: every metric the dashboard plots is in its `/metrics`, and the dashboard's SQL panels, with
//! their macros expanded as Grafana expands them, answer over its Postgres port.

use crate::common::{AtlakeChild, get_text, post_json};
use crate::pg::{have_psql, psql};
use crate::tools::missing;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const DASHBOARD: &str = include_str!("../../config/grafana/atlake-dashboard.json");
const DATASOURCES: &str = include_str!("../../config/grafana/datasources.yaml");

/// The text after `prefix` on the first log line that has it, up to the next space or `)`.
fn after(log: &str, prefix: &str) -> Option<String> {
    let at = log.find(prefix)? + prefix.len();
    let rest = &log[at..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == ')')
        .unwrap_or(rest.len());
    Some(rest[..end].trim_end_matches('/').to_string())
}

/// Every `atlake_…` metric name a PromQL expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("atlake_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

/// The dashboard's Prometheus expressions and its SQL panels' queries.
fn dashboard_queries() -> (Vec<String>, Vec<(String, String)>) {
    let dash: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let (mut exprs, mut sql) = (Vec::new(), Vec::new());
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                exprs.push(e.to_string());
            }
            if let Some(q) = t["rawSql"].as_str() {
                sql.push((
                    panel["title"].as_str().unwrap_or("").to_string(),
                    q.to_string(),
                ));
            }
        }
    }
    (exprs, sql)
}

/// Grafana's Postgres macro `$__timeFilter(col)` as Grafana expands it for a range.
fn expand_time_filter(sql: &str, from: &str, to: &str) -> String {
    let mut out = String::new();
    let mut rest = sql;
    while let Some(i) = rest.find("$__timeFilter(") {
        out.push_str(&rest[..i]);
        let args = &rest[i + "$__timeFilter(".len()..];
        let close = args.find(')').expect("macro closes");
        out.push_str(&format!(
            "{} BETWEEN '{from}' AND '{to}'",
            args[..close].trim()
        ));
        rest = &args[close + 1..];
    }
    out.push_str(rest);
    out
}

fn rfc3339(t: std::time::SystemTime) -> String {
    let us = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
    atlake::syntax::format_datetime_ms(us - us % 1_000_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_the_simulator_live_and_feeds_every_grafana_panel() {
    if !have_psql() {
        return missing("psql (postgresql-client)");
    }
    let (exprs, panels) = dashboard_queries();
    assert!(
        exprs.len() >= 15 && panels.len() >= 2,
        "{exprs:?} {panels:?}"
    );
    assert!(DATASOURCES.contains("type: grafana-postgresql-datasource"));
    assert!(DATASOURCES.contains("password: ${ATLAKE_SERVER_TOKEN}"));
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut demo = AtlakeChild::spawn(
        &[
            "demo",
            "--lake",
            "lake-demo",
            "--source",
            "firehose",
            "--faults",
            "bad-hash=150,drop=3000",
            "--listen",
            "127.0.0.1:0",
            "--pg-listen",
            "127.0.0.1:0",
            "--flight-listen",
            "127.0.0.1:0",
        ],
        &[("ATLAKE_FLUSH_MAX_AGE".into(), "2s".into())],
        dir.path(),
        "demo",
    );
    assert!(
        demo.wait_log("for the web console", Duration::from_secs(60))
            .await,
        "{}",
        demo.log()
    );
    let log = demo.log();
    let base = after(&log, "open ").expect("the console URL");
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    let pg_port: u16 = after(&log, "Postgres protocol on 127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .expect("the Postgres port");
    assert!(log.contains("Flight SQL on grpc://127.0.0.1:"), "{log}");
    assert!(log.contains("simulated firehose traffic"), "{log}");
    let c = reqwest::Client::new();
    // the console
    assert!(get_text(&c, &format!("{base}/")).await.contains("<html"));
    // rows, quarantined inputs and a reconnect within seconds
    let mut metrics = String::new();
    let mut rows = 0u64;
    while started.elapsed() < Duration::from_secs(60) {
        let r = post_json(&c, &base, "SELECT count(*) AS n FROM events", None).await;
        rows = r[0]["n"].as_u64().unwrap_or(0);
        metrics = get_text(&c, &format!("{base}/metrics")).await;
        if rows > 0
            && metrics.contains("atlake_quarantined_total{")
            && metrics.contains("atlake_reconnects_total{")
            && metrics.contains("atlake_files_written_total{")
            && metrics.contains("atlake_checkpoint_cursor ")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(rows > 0, "no rows: {}", demo.log());
    // the simulator's clock is the present: the lag is seconds, not months
    let samples = atlake::telemetry::samples(&metrics);
    let lag = samples
        .iter()
        .find(|s| s.name == "atlake_lag_seconds")
        .map(|s| s.value)
        .expect("atlake_lag_seconds");
    assert!((-5.0..60.0).contains(&lag), "lag {lag}");
    // a bad query (errors by protocol) and a query over the Postgres port
    let bad = c
        .post(format!("{base}/sql"))
        .body("SELEC 1")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let (ok, out, err) = psql(pg_port, "", "SELECT count(*) FROM events");
    assert!(ok && out.trim().parse::<u64>().unwrap() > 0, "{out} {err}");
    let metrics = get_text(&c, &format!("{base}/metrics")).await;
    let names: BTreeSet<String> = atlake::telemetry::samples(&metrics)
        .into_iter()
        .map(|s| s.name)
        .collect();
    let missing_names: BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| metric_names(e))
        .filter(|n| !names.contains(n))
        .collect();
    assert!(
        missing_names.is_empty(),
        "the dashboard plots metrics that /metrics does not have: {missing_names:?}\n{metrics}"
    );
    // the SQL panels, as Grafana sends them for the last hour to now
    let now = std::time::SystemTime::now();
    let from = rfc3339(now - Duration::from_secs(3600));
    let to = rfc3339(now + Duration::from_secs(60));
    for (title, sql) in &panels {
        let q = expand_time_filter(sql, &from, &to);
        assert!(!q.contains("$__"), "{title}: an unexpanded macro in {q}");
        let (ok, out, err) = psql(pg_port, "", &q);
        assert!(ok, "{title}: {q}\n{err}");
        assert!(!out.trim().is_empty(), "{title}: no rows for {q}");
    }
    // the query builder's table and column lists, as Grafana sends them
    let grafana = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grafana");
    let sql = |f: &str| std::fs::read_to_string(grafana.join(f)).expect("a Grafana query");
    let (ok, tables, err) = psql(pg_port, "", &sql("tables.sql"));
    assert!(ok, "{err}");
    let tables: Vec<&str> = tables.lines().collect();
    for t in ["events", "posts", "likes", "system.files"] {
        assert!(
            tables.contains(&t),
            "{t} not in Grafana's table list {tables:?}"
        );
    }
    let (ok, columns, err) = psql(pg_port, "", &sql("columns.sql"));
    assert!(ok, "{err}");
    for c in ["time|", "did|", "langs|", "text|"] {
        assert!(
            columns.lines().any(|l| l.starts_with(c)),
            "{c} not in Grafana's column list of posts:\n{columns}"
        );
    }
    // Ctrl-C: flush and exit 0, the files are in ./lake-demo
    let status = demo.terminate();
    assert!(status.success(), "{status:?}\n{}", demo.log());
    assert!(demo.log().contains("shutting down"));
    assert!(dir.path().join("lake-demo/events/_delta_log").is_dir());
}

#[test]
fn grafana_macros_expand_as_grafana_does() {
    assert_eq!(
        expand_time_filter(
            "SELECT 1 FROM events WHERE $__timeFilter(time) AND $__timeFilter( t2 )",
            "A",
            "B"
        ),
        "SELECT 1 FROM events WHERE time BETWEEN 'A' AND 'B' AND t2 BETWEEN 'A' AND 'B'"
    );
    assert_eq!(
        metric_names("sum by (le) (rate(atlake_flush_seconds_bucket[5m])) / atlake_x"),
        ["atlake_flush_seconds_bucket", "atlake_x"]
    );
}
