//! The daemon as users run it: `atlake run` against the simulator, queried over HTTP while it
//! ingests; metrics; filters changed at run time; a clean SIGTERM.

use crate::common::{ChildGuard, atlake_bin, free_port, seeded, start_sim};
use atlake::simulate::server::SimConfig;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `atlake run` following the simulator's Jetstream at `url` into `dir/lake`, its SQL
/// on a free port; killed on drop, so a failing assertion does not leave it running. Returns
/// the child, the SQL base URL and the log file.
fn run_daemon(
    dir: &std::path::Path,
    url: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (ChildGuard, String, std::path::PathBuf) {
    let port = free_port();
    let log = dir.join("run.log");
    let child = ChildGuard(
        Command::new(atlake_bin())
            .args([
                "run",
                "--source",
                "jetstream",
                "--url",
                url,
                "--lake",
                "lake",
                "--listen",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .args(args)
            .current_dir(dir)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    (child, format!("http://127.0.0.1:{port}"), log)
}

async fn sql(c: &reqwest::Client, base: &str, q: &str) -> Option<Vec<serde_json::Value>> {
    let r = c
        .post(format!("{base}/sql"))
        .body(q.to_string())
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

async fn metrics_text(c: &reqwest::Client, base: &str) -> String {
    c.get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn count(c: &reqwest::Client, base: &str, q: &str) -> u64 {
    sql(c, base, q)
        .await
        .and_then(|v| v.first().and_then(|r| r["n"].as_u64()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_fresh_sql_metrics_filters_and_stops_cleanly() {
    let sim = start_sim(SimConfig {
        messages: None,
        rate: Some(300.0),
        retention: 100_000,
        ..seeded(31)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (mut child, base, log) = run_daemon(
        dir.path(),
        &sim.url(),
        &["--start-cursor", "0"],
        &[("ATLAKE_FLUSH_MAX_AGE", "2s")],
    );
    let c = reqwest::Client::new();
    // events land and SQL answers within seconds
    let mut first = 0;
    while started.elapsed() < Duration::from_secs(30) {
        first = count(&c, &base, "SELECT count(*) AS n FROM events").await;
        if first > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        first > 0,
        "no rows after {:?}: {}",
        started.elapsed(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    eprintln!("first SQL answer with rows after {:?}", started.elapsed());
    // let a few flushes happen
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = metrics_text(&c, &base).await;
    for m in [
        "atlake_events_total{kind=\"commit\",collection=\"app.bsky.feed.like\",operation=\"create\"}",
        "atlake_bytes_in_total{source=\"jetstream\"}",
        "atlake_messages_total",
        "atlake_files_written_total",
        "atlake_bytes_written_total",
        "atlake_flush_seconds",
        "atlake_buffered_rows",
        "atlake_buffered_bytes",
        "atlake_lag_seconds",
        "atlake_last_cursor",
        "atlake_checkpoint_cursor",
        "atlake_queries_total",
    ] {
        assert!(metrics.contains(m), "/metrics has {m}:\n{metrics}");
    }
    // the lag is in seconds: the simulator's stream time is months behind, not 10^19 s
    let lag: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("atlake_lag_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN);
    assert!((0.0..1e10).contains(&lag), "atlake_lag_seconds {lag}");
    // every flush is counted under the reason that triggered it
    let reasons = [
        "rows",
        "bytes",
        "age",
        "hour_closed",
        "memory_cap",
        "checkpoint_lag",
    ];
    assert!(
        reasons
            .iter()
            .any(|r| metrics.contains(&format!("atlake_flushes_total{{reason=\"{r}\"}}"))),
        "/metrics counts flushes by reason:\n{metrics}"
    );
    assert!(!metrics.contains("atlake_flushes_total{reason=\"\"}"));
    let ingest = sql(
        &c,
        &base,
        "SELECT count(*) AS n FROM system.ingest WHERE metric = 'atlake_events_total'",
    )
    .await
    .unwrap();
    assert!(
        ingest[0]["n"].as_u64().unwrap() > 0,
        "system.ingest mirrors /metrics"
    );
    let cp = sql(&c, &base, "SELECT source, cursor FROM system.checkpoint")
        .await
        .unwrap();
    assert_eq!(cp[0]["source"], "jetstream");
    let files = count(&c, &base, "SELECT count(*) AS n FROM system.files").await;
    assert!(files > 0);
    // filters changed at run time go to Jetstream as an options_update
    let r = c
        .put(format!("{base}/filters"))
        .body(r#"{"collections": ["app.bsky.feed.post"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let bad = c
        .put(format!("{base}/filters"))
        .body(r#"{"collections": ["not an nsid"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sim
        .options_updates()
        .iter()
        .any(|u| u == &vec!["app.bsky.feed.post".to_string()])
    {
        assert!(
            Instant::now() < deadline,
            "no options_update reached the server"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = sim.truth().last_time_us.unwrap() + 2_000_000;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let q = format!("SELECT count(*) AS n FROM events WHERE kind = 'commit' AND time_us > {after}");
    let commits_after = count(&c, &base, &q).await;
    let q = format!(
        "SELECT count(*) AS n FROM events WHERE kind = 'commit' AND time_us > {after} AND collection <> 'app.bsky.feed.post'"
    );
    let others_after = count(&c, &base, &q).await;
    assert!(commits_after > 0, "posts still arrive after the update");
    assert_eq!(others_after, 0, "only posts arrive after the update");
    // SIGTERM: flush, checkpoint, exit 0 within the deadline
    let t = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{status:?}\n{text}");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(text.contains("shutting down"), "{text}");
    sim.stop();
}

/// The daemon started in-process the way the binary starts it (`Daemon::start`, then
/// `run_until`): SQL over HTTP sees every event, and the stop signal flushes and checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_daemon_serves_and_stops_like_the_binary() {
    let n = 800;
    let sim = start_sim(SimConfig {
        messages: Some(n),
        ..seeded(34)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = crate::ingest::test_config(dir.path().to_str().unwrap());
    cfg.source.url = sim.url();
    cfg.source.start_cursor = Some(0);
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.pg_listen = "127.0.0.1:0".into();
    cfg.server.flight_listen = "127.0.0.1:0".into();
    let daemon = atlake::daemon::Daemon::start(cfg).await.unwrap();
    let base = format!("http://{}", daemon.addr);
    let pg = daemon.pg_addr.expect("the Postgres front end listens");
    let flight = daemon
        .flight_addr
        .expect("the Flight SQL front end listens");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(daemon.run_until(async {
        let _ = stop_rx.await;
    }));
    sim.wait_for_messages(n).await;
    let truth = sim.truth().events();
    let c = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&c, &base, "SELECT count(*) AS n FROM events").await < truth {
        assert!(Instant::now() < deadline, "SQL never saw every event");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // the Postgres front end reads the same daemon: every event, and its system.ingest
    if crate::pg::have_psql() {
        let (ok, n, err) = crate::pg::psql(pg.port(), "", "SELECT count(*) FROM events");
        assert!(ok, "{err}");
        assert_eq!(n.trim().parse::<u64>().unwrap(), truth);
        let (ok, rows, err) = crate::pg::psql(pg.port(), "", "SELECT count(*) FROM system.ingest");
        assert!(ok && rows.trim() != "0", "{rows} {err}");
    } else {
        crate::tools::missing("psql (postgresql-client)");
    }
    // and so does Flight SQL
    if let Some(py) = crate::tools::python_with(&["adbc_driver_flightsql"]) {
        let out = crate::tools::run_python(
            &py,
            "import sys, adbc_driver_flightsql.dbapi as f\n\
             with f.connect(sys.argv[1]) as c, c.cursor() as cur:\n\
             \x20   cur.execute('SELECT count(*) FROM events'); print(cur.fetchone()[0])\n\
             \x20   cur.execute('SELECT count(*) FROM system.ingest'); print(cur.fetchone()[0])\n",
            &[&format!("grpc://{flight}")],
        );
        let counts: Vec<u64> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
        assert_eq!(counts[0], truth, "{out}");
        assert!(counts[1] > 0, "{out}");
    } else {
        crate::tools::missing("python with adbc-driver-flightsql");
    }
    stop_tx.send(()).unwrap();
    let summary = running.await.unwrap().unwrap();
    assert!(summary.clean);
    assert_eq!(summary.events, truth);
    assert_eq!(
        summary.checkpoint.map(|c| c.value()),
        sim.truth().last_time_us
    );
    sim.stop();
}

/// A daemon whose source fails for good ends by itself with that error (no signal needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_ends_with_its_sources_fatal_error() {
    // a server that answers every upgrade with 404: the endpoint does not exist
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = crate::ingest::test_config(dir.path().to_str().unwrap());
    cfg.source.url = format!("ws://{addr}");
    cfg.server.listen = "127.0.0.1:0".into();
    let daemon = atlake::daemon::Daemon::start(cfg).await.unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        daemon.run_until(std::future::pending()),
    )
    .await
    .expect("ends by itself");
    let e = r.expect_err("a fatal source error");
    assert!(e.to_string().contains("404"), "{e}");
}

/// `atlake run` with `[backfill] enabled`: the live stream lands while every repo of the
/// simulator's sync endpoints is backfilled into the same tables; `system.backfill` reports
/// the run; `current.records` has every backfilled record; SIGTERM stops both cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_backfill_lands_history_beside_the_live_stream() {
    use atlake::simulate::sync::Broken;
    let (sim, sync) = live_and_sync(32).await;
    let records: u64 = sync
        .truth()
        .iter()
        .filter(|t| t.broken == Broken::No)
        .map(|t| t.records.len() as u64)
        .sum();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base, log) = run_backfilling_daemon(dir.path(), &sim, &sync, &[]).await;
    let c = reqwest::Client::new();
    let repo_rows = count(
        &c,
        &base,
        "SELECT count(*) AS n FROM events WHERE origin = 'repo'",
    )
    .await;
    assert_eq!(repo_rows, records);
    let done = count(
        &c,
        &base,
        "SELECT value AS n FROM system.backfill WHERE metric = 'repos' AND label = 'done'",
    )
    .await;
    assert_eq!(done, 40);
    // the live stream lands beside it
    let until = Instant::now() + Duration::from_secs(20);
    while count(
        &c,
        &base,
        "SELECT count(*) AS n FROM events WHERE origin = 'jetstream'",
    )
    .await
        == 0
    {
        assert!(Instant::now() < until, "no live rows");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let current = count(
        &c,
        &base,
        "SELECT count(*) AS n FROM current.records WHERE origin = 'repo'",
    )
    .await;
    assert!(current > 0 && current <= records, "{current}");
    let status = child.terminate();
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    sim.stop();
    // the daemon's committer committed the backfill's files to the history table's log:
    // every history file in the lake, with every record, and the backfill's batch as its txn
    let lake = atlake::sink::store::Lake::open(dir.path().join("lake").to_str().unwrap()).unwrap();
    let history = atlake::checkpoint::delta::load(&lake, atlake::checkpoint::delta::Table::History)
        .await
        .unwrap();
    let listed: Vec<String> = atlake::checkpoint::list_files(&lake)
        .await
        .unwrap()
        .into_iter()
        .filter(|f| f.path.starts_with("history/"))
        .map(|f| f.path)
        .collect();
    assert!(!listed.is_empty());
    assert_eq!(history.files.keys().cloned().collect::<Vec<_>>(), listed);
    let rows: u64 = history.files.values().map(|f| f.rows.unwrap()).sum();
    assert_eq!(rows, records, "the log's row counts");
    assert!(history.backfill_batch().is_some());
}

/// A live simulator at 200 messages/s and the sync endpoints of 40 repos of 30 records.
async fn live_and_sync(
    seed: u64,
) -> (
    atlake::simulate::server::SimHandle,
    atlake::simulate::sync::SyncSim,
) {
    let sim = start_sim(SimConfig {
        messages: None,
        rate: Some(200.0),
        retention: 100_000,
        ..seeded(seed)
    })
    .await;
    let sync = atlake::simulate::sync::SyncSim::start(atlake::simulate::sync::SyncSimConfig {
        accounts: 40,
        records: 30,
        ..Default::default()
    })
    .await
    .unwrap();
    (sim, sync)
}

/// `atlake run` on the live simulator with a backfill from `sync` (and `env`), once the
/// backfill has committed every repo it was given.
async fn run_backfilling_daemon(
    dir: &std::path::Path,
    sim: &atlake::simulate::server::SimHandle,
    sync: &atlake::simulate::sync::SyncSim,
    env: &[(&str, &str)],
) -> (ChildGuard, String, std::path::PathBuf) {
    let mut all = vec![
        ("ATLAKE_FLUSH_MAX_AGE", "1s"),
        ("ATLAKE_BACKFILL_ENABLED", "true"),
        ("ATLAKE_BACKFILL_RELAY", sync.relay.as_str()),
        ("ATLAKE_BACKFILL_PLC", sync.plc.as_str()),
    ];
    all.extend_from_slice(env);
    let (child, base, log) = run_daemon(dir, &sim.url(), &[], &all);
    wait_following(&reqwest::Client::new(), &base, &log).await;
    (child, base, log)
}

/// Waits (up to 60 s) until the daemon's backfill has committed every repo it was given and
/// follows gaps in live histories.
async fn wait_following(c: &reqwest::Client, base: &str, log: &std::path::Path) {
    let started = Instant::now();
    let mut state = String::new();
    while started.elapsed() < Duration::from_secs(60) {
        if let Some(rows) = sql(
            c,
            base,
            "SELECT text FROM system.backfill WHERE metric = 'state'",
        )
        .await
            && let Some(s) = rows.first().and_then(|r| r["text"].as_str())
        {
            state = s.to_string();
            if state == "following" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        state,
        "following",
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// A daemon whose live source takes some DIDs backfills those repos, not every repo the relay
/// lists: its lake holds the history of the DIDs it follows live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_backfill_and_a_did_filter_backfills_those_dids() {
    use atlake::simulate::sync::Broken;
    let (sim, sync) = live_and_sync(34).await;
    let truth = sync.truth();
    let wanted: Vec<_> = truth
        .iter()
        .filter(|t| t.broken == Broken::No)
        .take(3)
        .collect();
    assert_eq!(wanted.len(), 3);
    let dids = wanted
        .iter()
        .map(|t| t.did.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let records: u64 = wanted.iter().map(|t| t.records.len() as u64).sum();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base, _) =
        run_backfilling_daemon(dir.path(), &sim, &sync, &[("ATLAKE_SOURCE_DIDS", &dids)]).await;
    let c = reqwest::Client::new();
    let q = |sql: &'static str| count(&c, &base, sql);
    assert_eq!(
        q("SELECT value AS n FROM system.backfill WHERE metric = 'repos' AND label = 'done'").await,
        3
    );
    assert_eq!(
        q("SELECT count(*) AS n FROM events WHERE origin = 'repo'").await,
        records
    );
    let in_filter = format!(
        "SELECT count(*) AS n FROM events WHERE origin = 'repo' AND did IN ('{}')",
        dids.replace(',', "','")
    );
    assert_eq!(count(&c, &base, &in_filter).await, records);
    assert!(child.terminate().success());
    sim.stop();
}

/// The daemon compacts on its own, beside ingest: compaction commits land while events keep
/// arriving, every SQL answer meanwhile counts each event at most once and never fewer than
/// the one before, and at the end each partition is one file and the committed files hold the
/// simulator's events exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_compacts_in_the_background_and_sql_never_sees_a_row_twice() {
    let messages = 6000;
    let sim = start_sim(SimConfig {
        messages: Some(messages),
        rate: Some(1500.0),
        retention: 100_000,
        ..seeded(33)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base, log) = run_daemon(
        dir.path(),
        &sim.url(),
        &["--start-cursor", "0"],
        &[
            ("ATLAKE_FLUSH_MAX_AGE", "200ms"),
            ("ATLAKE_FLUSH_MAX_ROWS", "200"),
            ("ATLAKE_COMPACTION_INTERVAL", "1s"),
            ("ATLAKE_PRIVACY_PURGE_DELETED", "false"),
            ("ATLAKE_LAKE_VACUUM_RETENTION", "2s"),
            ("ATLAKE_SERVER_QUERY_TIMEOUT", "1s"),
        ],
    );
    sim.wait_for_messages(messages).await;
    let truth = sim.truth();
    let total = truth.events();
    let lake = atlake::sink::store::Lake::open(dir.path().join("lake").to_str().unwrap()).unwrap();
    let c = reqwest::Client::new();
    let started = Instant::now();
    let (mut last, mut compactions_seen, mut answers) = (0u64, 0usize, 0usize);
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "not compacted: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        if let Some(rows) = sql(&c, &base, "SELECT count(*) AS n FROM events").await {
            let n = rows[0]["n"].as_u64().unwrap();
            assert!(n <= total, "SQL counted {n} of {total} events: some twice");
            assert!(n >= last, "SQL counted {n} after {last}: rows went missing");
            last = n;
            answers += 1;
        }
        let log_state =
            atlake::checkpoint::delta::load(&lake, atlake::checkpoint::delta::Table::Events)
                .await
                .unwrap();
        compactions_seen = log_state.removed.len().max(compactions_seen);
        let mut per_key = std::collections::BTreeMap::new();
        for f in log_state.files.values() {
            *per_key.entry(f.key.clone()).or_insert(0) += 1;
        }
        if last == total && compactions_seen > 0 && per_key.values().all(|n| *n == 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = metrics_text(&c, &base).await;
    assert!(
        metrics.contains("atlake_compaction_passes_total"),
        "{metrics}"
    );
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(child.0.wait().unwrap().success());
    eprintln!(
        "DAEMON COMPACTION: {answers} SQL answers during compaction, {} files replaced, took {:?}",
        compactions_seen,
        started.elapsed()
    );
    crate::common::assert_exactly_once(&crate::common::read_committed(&lake).await, &truth);
    sim.stop();
}
