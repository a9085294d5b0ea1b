//! Ingest end to end: capture files and live streams from the simulator into a lake, compared
//! with the simulator's ground truth.

use crate::common::{
    assert_exactly_once, local_checkpoint, read_lake, seeded, start_sim, wait_until,
};
use atlake::config::{Config, SourceKind};
use atlake::ingest::{self, Input};
use atlake::simulate::server::{Faults, SimConfig, SimHandle};
use atlake::simulate::traffic::{Traffic, TrafficConfig};
use atlake::sink::store::Lake;
use atlake::source::capture::{CaptureFormat, CaptureWriter, Compression};
use std::time::Duration;

/// A config with small, frequent flushes.
pub fn test_config(lake: &str) -> Config {
    let mut c = Config::default();
    c.lake.url = lake.to_string();
    c.flush.max_rows = 400;
    c.flush.max_age.0 = Duration::from_millis(300);
    c.source.read_timeout.0 = Duration::from_secs(5);
    c.source.backoff_initial.0 = Duration::from_millis(20);
    c.source.backoff_max.0 = Duration::from_millis(200);
    c.source.rewind.0 = Duration::from_millis(50);
    c
}

fn write_capture(
    path: &std::path::Path,
    format: CaptureFormat,
    n: u64,
) -> atlake::simulate::server::Truth {
    let mut t = Traffic::new(TrafficConfig {
        seed: 21,
        ..Default::default()
    });
    let mut w = CaptureWriter::create(path, format, Compression::Zstd).unwrap();
    let mut truth = atlake::simulate::server::Truth::default();
    for _ in 0..n {
        let m = t.next_message();
        if format == CaptureFormat::JetstreamJson {
            for (_, l) in m.jetstream_lines() {
                w.write(&l).unwrap();
            }
        } else {
            w.write(&m.frame).unwrap();
        }
        truth.add_message(&m);
    }
    w.finish().unwrap();
    truth
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_ingest_is_exactly_once_and_idempotent() {
    for format in [CaptureFormat::Frames, CaptureFormat::JetstreamJson] {
        let dir = tempfile::tempdir().unwrap();
        let cap = dir.path().join("cap.zst");
        let truth = write_capture(&cap, format, 3000);
        let lake_dir = dir.path().join("lake");
        let cfg = test_config(lake_dir.to_str().unwrap());
        // twice: the second run finds everything durable and adds nothing
        for round in 0..2 {
            let h = ingest::start(cfg.clone(), Input::File(cap.clone()))
                .await
                .unwrap();
            let summary = h.wait().await.unwrap();
            assert!(summary.clean);
            if round == 1 {
                assert_eq!(
                    summary.events, 0,
                    "{format:?}: a second ingest of the same file writes nothing"
                );
            }
            let lake = Lake::open(lake_dir.to_str().unwrap()).unwrap();
            let got = read_lake(&lake).await;
            assert_exactly_once(&got, &truth);
            assert!(got.errors.is_empty(), "{:?}", got.errors);
        }
        // the checkpoint is where the stream ended
        let source = if format == CaptureFormat::Frames {
            "firehose"
        } else {
            "jetstream"
        };
        assert!(local_checkpoint(&lake_dir, source).is_some());
    }
}

async fn live_run(kind: SourceKind, faults: Faults, n: u64) {
    let sim = start_sim(SimConfig {
        messages: Some(n),
        retention: 1_000_000,
        faults,
        ..seeded(5)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let lake_url = dir.path().to_str().unwrap().to_string();
    let mut cfg = test_config(&lake_url);
    cfg.source.kind = kind;
    cfg.source.url = sim.url();
    cfg.source.start_cursor = Some(0);
    let h = ingest::start(cfg, Input::Network).await.unwrap();
    sim.wait_for_messages(n).await;
    let source = match kind {
        SourceKind::Firehose => "firehose",
        SourceKind::Jetstream => "jetstream",
        SourceKind::Repo => unreachable!("not a live source"),
    };
    let target = match kind {
        SourceKind::Firehose => sim.last_seq().unwrap(),
        SourceKind::Jetstream => sim.truth().last_time_us.unwrap(),
        SourceKind::Repo => unreachable!("not a live source"),
    };
    let reached = wait_until(Duration::from_secs(120), || {
        local_checkpoint(dir.path(), source).is_some_and(|c| c >= target)
    })
    .await;
    assert!(
        reached,
        "{source}: checkpoint never reached {target}: {:?}",
        local_checkpoint(dir.path(), source)
    );
    let summary = h.stop(Duration::from_secs(10)).await.unwrap();
    assert!(summary.clean);
    let truth = sim.truth();
    let lake = Lake::open(&lake_url).unwrap();
    let got = read_lake(&lake).await;
    assert_exactly_once(&got, &truth);
    sim.stop();
    // quarantined faults are in the lake, by reason
    for (name, n) in &truth.faults {
        let reason = match name.as_str() {
            "garbage" => "frame",
            "backwards" => continue, // dropped as a duplicate seq, not quarantined
            other => other,
        };
        if kind == SourceKind::Jetstream && name != "garbage" {
            continue; // corrupted frames have no Jetstream form
        }
        let want = if kind == SourceKind::Jetstream {
            "json"
        } else {
            reason
        };
        assert_eq!(
            got.errors.get(want).copied().unwrap_or(0),
            *n,
            "{source}: quarantined {name}: {:?}",
            got.errors
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firehose_with_dropped_connections_and_bad_frames_is_exactly_once() {
    live_run(
        SourceKind::Firehose,
        Faults {
            drop_every: Some(700),
            garbage_every: Some(900),
            bad_hash_every: Some(1100),
            truncated_car_every: Some(1300),
            backwards_every: Some(500),
            ..Default::default()
        },
        4000,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_with_dropped_connections_and_rewind_is_exactly_once() {
    live_run(
        SourceKind::Jetstream,
        Faults {
            drop_every: Some(700),
            garbage_every: Some(900),
            ..Default::default()
        },
        4000,
    )
    .await;
}

const DUCKDB_COUNTS: &str = r#"
import duckdb, json, sys
lake = sys.argv[1]
con = duckdb.connect()
src = f"read_parquet('{lake}/events/*=*/**/*.parquet', hive_partitioning=true, union_by_name=true)"
out = {
  "kinds": {k: n for k, n in con.execute(f"select kind, count(*) from {src} group by 1").fetchall()},
  "core": {c: n for c, n in con.execute(f"select collection, count(*) from {src} where collection like 'app.bsky.%' group by 1").fetchall()},
  "pruned_like": con.execute(f"select count(*) from {src} where collection_partition = 'app.bsky.feed.like' and date = '2026-07-04'").fetchone()[0],
  "partitions": sorted({c for (c,) in con.execute(f"select distinct collection_partition from {src}").fetchall()}),
  # the real collection of every row, the long tail's included (not the directory's `_other`)
  "other_real": con.execute(f"select count(*) from {src} where collection_partition = '_other' and collection is not null and left(collection, 1) <> '_'").fetchone()[0],
  "other_rows": con.execute(f"select count(*) from {src} where collection_partition = '_other'").fetchone()[0],
}
import pyarrow.dataset as ds
d = ds.dataset(f"{lake}/events", format="parquet", partitioning="hive")
out["pyarrow_rows"] = d.count_rows()
print(json.dumps(out))
"#;

pub const DELTA_COUNTS: &str = r#"
import json, sys
from collections import Counter
import deltalake, polars as pl, duckdb
lake, source = sys.argv[1], sys.argv[2]
dt = deltalake.DeltaTable(f"{lake}/events")
t = dt.to_pyarrow_table(columns=["collection", "operation", "kind", "collection_partition", "hour"])
def key(c, o, k):
    return f"{c or '-'}|{o or '-'}|{k}"
delta = Counter(key(c, o, k) for c, o, k in zip(t["collection"].to_pylist(), t["operation"].to_pylist(), t["kind"].to_pylist()))
lf = pl.scan_delta(f"{lake}/events").group_by(["collection", "operation", "kind"]).len().collect()
polars_delta = {key(r["collection"], r["operation"], r["kind"]): r["len"] for r in lf.iter_rows(named=True)}
# the plain files, without the log: one schema in every file
lp = pl.scan_parquet(f"{lake}/events/*=*/**/*.parquet", hive_partitioning=False).group_by(["collection", "operation", "kind"]).len().collect()
polars_plain = {key(r["collection"], r["operation"], r["kind"]): r["len"] for r in lp.iter_rows(named=True)}
con = duckdb.connect()
dd = con.execute(f"select collection, operation, kind, count(*) from read_parquet('{lake}/events/*=*/**/*.parquet', hive_partitioning=false) group by all").fetchall()
duck = {key(c, o, k): n for c, o, k, n in dd}
print(json.dumps({
  "delta": delta, "polars_delta": polars_delta, "polars_plain": polars_plain, "duckdb": duck,
  "other_partition_rows": sum(1 for p in t["collection_partition"].to_pylist() if p == "_other"),
  "null_hour_rows": t["hour"].null_count,
  "files": len(dt.file_uris()),
  "errors_rows": deltalake.DeltaTable(f"{lake}/_errors").to_pyarrow_table().num_rows,
  "txn": dt.transaction_version(f"atlake.{source}"),
}))
# deltalake's runtime threads can abort the interpreter's exit ("terminate called without an
# active exception"): the answer is out, leave at once
import os
sys.stdout.flush()
os._exit(0)
"#;

/// Rows per (collection, operation, kind) as the Python `deltalake` package reads the
/// `events` table.
pub const DELTA_COUNTS_ONLY: &str = r#"
import json, sys
from collections import Counter
import deltalake
t = deltalake.DeltaTable(f"{sys.argv[1]}/events").to_pyarrow_table(columns=["collection", "operation", "kind"])
print(json.dumps(Counter(f"{c or '-'}|{o or '-'}|{k}" for c, o, k in zip(t["collection"].to_pylist(), t["operation"].to_pylist(), t["kind"].to_pylist()))))
import os
sys.stdout.flush()
os._exit(0)
"#;

/// The `events` table is a Delta table other engines read: the Python `deltalake` package and
/// Polars' `scan_delta` find the same rows per (collection, operation, kind) as atlake's SQL,
/// the long-tail `_other` rows with their real collection; the log's `txn` is atlake's
/// checkpoint; the quarantine is a Delta table too. Polars and DuckDB read the plain files
/// with one schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_readers_and_plain_parquet_readers_find_what_atlake_finds() {
    let Some(py) = crate::tools::python_with(&["deltalake", "polars", "duckdb"]) else {
        return crate::tools::missing("python3 with deltalake, polars and duckdb");
    };
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("cap.zst");
    write_capture(&cap, CaptureFormat::Frames, 3000);
    let lake_dir = dir.path().join("lake");
    let mut cfg = test_config(lake_dir.to_str().unwrap());
    cfg.flush.max_open_partitions = 24; // force some collections into _other
    cfg.flush.max_rows = 500; // several commits
    let h = ingest::start(cfg, Input::File(cap)).await.unwrap();
    h.wait().await.unwrap();
    let l = lake_dir.to_str().unwrap();
    let want = crate::common::sql_counts(l).await;
    assert!(want.len() > 10);
    // every reader's counts per (collection, operation, kind) must be atlake's
    let readers_agree = |when: &str| {
        let out = crate::tools::run_python(&py, DELTA_COUNTS, &[l, "firehose"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        for reader in ["delta", "polars_delta", "polars_plain", "duckdb"] {
            let got: std::collections::BTreeMap<String, u64> = v[reader]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
                .collect();
            assert_eq!(got, want, "{reader} {when}");
        }
        v
    };
    let v = readers_agree("after the ingest");
    assert!(v["other_partition_rows"].as_u64().unwrap() > 0);
    assert_eq!(
        v["null_hour_rows"].as_u64(),
        Some(0),
        "no day partitions before compaction"
    );
    let log = atlake::checkpoint::delta::load(
        &Lake::open(l).unwrap(),
        atlake::checkpoint::delta::Table::Events,
    )
    .await
    .unwrap();
    assert_eq!(v["files"].as_u64(), Some(log.files.len() as u64));
    assert!(log.version.unwrap() > 1, "one commit per flush round");
    assert_eq!(v["txn"].as_i64(), local_checkpoint(&lake_dir, "firehose"));
    assert!(v["txn"].as_i64().is_some());
    let engine = crate::common::engine(l);
    let errors = engine.collect("SELECT count(*) FROM errors").await.unwrap();
    let n = errors[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(v["errors_rows"].as_i64(), Some(n));

    // the log after its cleanup (`lake.log_retention`): two checkpoint intervals of commits
    // later, the commits and checkpoints before the older checkpoint are gone, and every
    // reader still finds the same rows
    use atlake::checkpoint::delta;
    let lake = Lake::open(l).unwrap();
    let mut st = log.clone();
    let cursor = st.txn(atlake::model::SourceKind::Firehose).unwrap().0;
    let info = st
        .positions
        .clone()
        .map(delta::positions_info)
        .unwrap_or_default();
    while st.version.unwrap() < 2 * delta::CHECKPOINT_INTERVAL + 5 {
        let acts = vec![delta::txn_action(
            atlake::model::SourceKind::Firehose,
            cursor,
            1,
        )];
        let out = delta::commit(
            &lake,
            delta::Table::Events,
            &mut st,
            "WRITE",
            info.clone(),
            acts,
        )
        .await
        .unwrap();
        assert!(matches!(out, delta::CommitOutcome::Committed(_)));
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let gone = delta::clean_log(&lake, delta::Table::Events, now_ms + 60_000)
        .await
        .unwrap();
    assert_eq!(gone, delta::CHECKPOINT_INTERVAL as usize);
    assert!(
        !lake_dir
            .join("events/_delta_log")
            .join(delta::commit_name(0))
            .exists()
    );
    assert_eq!(crate::common::sql_counts(l).await, want);
    let v = readers_agree("after the log cleanup");
    assert_eq!(v["txn"].as_i64(), Some(cursor));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_and_pyarrow_read_the_lake_with_hive_partitioning() {
    let Some(py) = crate::tools::python() else {
        return crate::tools::missing("python3 with duckdb and pyarrow");
    };
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("cap.zst");
    let truth = write_capture(&cap, CaptureFormat::Frames, 3000);
    let lake_dir = dir.path().join("lake");
    let mut cfg = test_config(lake_dir.to_str().unwrap());
    cfg.flush.max_open_partitions = 24; // force some collections into _other
    let h = ingest::start(cfg, Input::File(cap)).await.unwrap();
    h.wait().await.unwrap();
    let out = crate::tools::run_python(&py, DUCKDB_COUNTS, &[lake_dir.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut kinds = std::collections::BTreeMap::new();
    let mut core = std::collections::BTreeMap::new();
    for ((k, c, _), n) in &truth.counts {
        *kinds.entry(k.clone()).or_insert(0u64) += n;
        if c.starts_with("app.bsky.") {
            *core.entry(c.clone()).or_insert(0u64) += n;
        }
    }
    for (k, n) in &kinds {
        assert_eq!(v["kinds"][k].as_u64(), Some(*n), "duckdb count of kind {k}");
    }
    for (c, n) in &core {
        assert_eq!(v["core"][c].as_u64(), Some(*n), "duckdb count of {c}");
    }
    assert_eq!(
        v["pruned_like"].as_u64(),
        core.get("app.bsky.feed.like").copied()
    );
    assert_eq!(v["pyarrow_rows"].as_u64(), Some(truth.events()));
    let parts: Vec<&str> = v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    assert!(
        parts.contains(&"_other") && parts.contains(&"_identity") && parts.contains(&"_account"),
        "{parts:?}"
    );
    assert!(v["other_rows"].as_u64().unwrap() > 0);
    assert_eq!(v["other_real"], v["other_rows"]);
}

/// A file whose key column is missing (here: `rev`) cannot give correct dedupe keys. Recovery
/// refuses it with the file and the column named, instead of reading the column as empty and
/// letting duplicates through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_refuses_a_file_without_a_key_column() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("cap.zst");
    write_capture(&cap, CaptureFormat::Frames, 500);
    let lake_dir = dir.path().join("lake");
    let cfg = test_config(lake_dir.to_str().unwrap());
    let h = ingest::start(cfg.clone(), Input::File(cap.clone()))
        .await
        .unwrap();
    h.wait().await.unwrap();
    let lake = Lake::open(lake_dir.to_str().unwrap()).unwrap();
    let victim = atlake::checkpoint::list_files(&lake)
        .await
        .unwrap()
        .into_iter()
        .find(|f| f.path.contains("app.bsky.feed.like"))
        .unwrap();
    // the rewrite makes it a lake from before the Delta log, without a checkpoint: every file
    // of the source is read for keys
    crate::sql::rewrite_as_older_schema(&lake_dir.join(&victim.path), &["rev"]);
    let e = ingest::start(cfg, Input::File(cap))
        .await
        .expect_err("recovery must refuse the file");
    let msg = e.to_string();
    assert!(
        msg.contains(&victim.path) && msg.contains("column `rev` is missing"),
        "{msg}"
    );
}

/// A simulator that drops every Jetstream connection after `drop_every` events, and an ingest
/// config that reads it from cursor 0 with `rewind`.
async fn jetstream_dropping(
    n: u64,
    drop_every: u64,
    seed: u64,
    rewind: Duration,
) -> (SimHandle, tempfile::TempDir, Config) {
    let sim = start_sim(SimConfig {
        messages: Some(n),
        retention: 1_000_000,
        faults: Faults {
            drop_every: Some(drop_every),
            ..Default::default()
        },
        ..seeded(seed)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path().to_str().unwrap());
    cfg.source.kind = SourceKind::Jetstream;
    cfg.source.url = sim.url();
    cfg.source.start_cursor = Some(0);
    cfg.source.rewind.0 = rewind;
    (sim, dir, cfg)
}

/// Jetstream's rewind is for the first connection of a run (the lake's cursor may come from
/// another instance): a restart asks for the checkpoint minus the rewind, and every reconnect
/// after a dropped connection asks for a cursor no earlier than the previous connection's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_rewinds_on_restart_and_reconnects_only_move_forward() {
    let n = 2500;
    let (sim, dir, cfg) = jetstream_dropping(n, 300, 61, Duration::from_secs(2)).await;
    let lake = dir.path().to_str().unwrap().to_string();
    sim.wait_for_messages(n).await;
    let target = sim.truth().last_time_us.unwrap();
    let caught_up = || local_checkpoint(dir.path(), "jetstream").is_some_and(|c| c >= target);
    let h = ingest::start(cfg.clone(), Input::Network).await.unwrap();
    assert!(wait_until(Duration::from_secs(60), caught_up).await);
    h.stop(Duration::from_secs(10)).await.unwrap();
    let first_run = sim.cursors();
    assert!(first_run.len() > 5, "the connection dropped: {first_run:?}");
    assert_eq!(first_run[0], Some(0), "start_cursor 0, rewound, stays 0");
    for w in first_run.windows(2) {
        assert!(w[1] >= w[0], "a reconnect went back: {first_run:?}");
    }
    // the connections delivered new events every time: every reconnect moved forward
    assert!(first_run.windows(2).all(|w| w[1] > w[0]), "{first_run:?}");
    let checkpoint = local_checkpoint(dir.path(), "jetstream").unwrap();
    let h = ingest::start(cfg, Input::Network).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || sim.cursors().len()
            > first_run.len())
        .await
    );
    h.stop(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        sim.cursors()[first_run.len()],
        Some(checkpoint - 2_000_000),
        "a restart starts the rewind before the checkpoint"
    );
    let got = read_lake(&Lake::open(&lake).unwrap()).await;
    assert_exactly_once(&got, &sim.truth());
    sim.stop();
}

/// With no rewind configured, the instant a reconnect resumes at is still replayed by the server
/// and still deduplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_without_rewind_still_deduplicates_each_resume_instant() {
    let n = 2000;
    let (sim, dir, cfg) = jetstream_dropping(n, 250, 62, Duration::ZERO).await;
    let lake = dir.path().to_str().unwrap().to_string();
    let h = ingest::start(cfg, Input::Network).await.unwrap();
    sim.wait_for_messages(n).await;
    let target = sim.truth().last_time_us.unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || local_checkpoint(
            dir.path(),
            "jetstream"
        )
        .is_some_and(|c| c >= target))
        .await
    );
    h.stop(Duration::from_secs(10)).await.unwrap();
    assert!(sim.cursors().len() > 5);
    let got = read_lake(&Lake::open(&lake).unwrap()).await;
    assert_exactly_once(&got, &sim.truth());
    sim.stop();
}

/// The summary counts what it skipped: every commit outside the collection filter as
/// filtered (a repeated one too: the filter comes first), and every repeated line that passes
/// the filter as a duplicate, each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_and_duplicate_events_are_counted_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("cap.jsonl");
    let mut t = Traffic::new(TrafficConfig {
        seed: 23,
        ..Default::default()
    });
    let mut w =
        CaptureWriter::create(&cap, CaptureFormat::JetstreamJson, Compression::None).unwrap();
    let (mut lines, mut filtered, mut duplicates, mut kept) = (0u64, 0u64, 0u64, 0u64);
    for i in 0..1500u64 {
        let m = t.next_message();
        for (_, line) in m.jetstream_lines() {
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            let outside =
                v["kind"] == "commit" && v["commit"]["collection"] != "app.bsky.feed.post";
            // every third message's lines come twice in a row
            let copies = if i % 3 == 0 { 2 } else { 1 };
            for c in 0..copies {
                w.write(&line).unwrap();
                lines += 1;
                match (outside, c) {
                    (true, _) => filtered += 1,
                    (false, 0) => kept += 1,
                    (false, _) => duplicates += 1,
                }
            }
        }
    }
    w.finish().unwrap();
    assert!(filtered > 0 && duplicates > 0 && kept > 0);
    let lake_dir = dir.path().join("lake");
    let mut cfg = test_config(lake_dir.to_str().unwrap());
    cfg.source.collections = vec!["app.bsky.feed.post".into()];
    let summary = ingest::start(cfg, Input::File(cap))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(summary.messages, lines);
    assert_eq!(summary.filtered, filtered);
    assert_eq!(summary.duplicates, duplicates);
    assert_eq!(summary.events, kept);
    assert_eq!(summary.quarantined, 0);
}

/// Live ingest of the simulator's firehose from its start, with the cut-over a backfill beside
/// the stream uses; no backfill runs, so its progress (none) counts as loaded.
async fn firehose_with_cutover(
    mut cfg: atlake::config::Config,
    sim: &atlake::simulate::server::SimHandle,
) -> (
    ingest::IngestHandle,
    std::sync::Arc<atlake::catalog::Cutover>,
) {
    cfg.source.kind = SourceKind::Firehose;
    cfg.source.url = sim.url();
    cfg.source.start_cursor = Some(0);
    cfg.backfill.enabled = true;
    let h = ingest::start(cfg, Input::Network).await.unwrap();
    let cut = h
        .catalog
        .cutover()
        .expect("a backfill beside the stream")
        .clone();
    cut.set_loaded();
    (h, cut)
}

/// With a backfill beside the live stream, a gap the live stream reveals (here a `#sync` of
/// a backfilled repo) holds the live checkpoint just before the event that revealed it until
/// the fresh fetch it calls for is committed: a crash in between replays the event, which
/// marks the repo again. Then the checkpoint moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_holds_the_live_checkpoint_until_its_fresh_fetch_is_committed() {
    let sim = start_sim(SimConfig {
        messages: None,
        rate: Some(400.0),
        retention: 1_000_000,
        ..seeded(23)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path().to_str().unwrap());
    let (h, cut) = firehose_with_cutover(cfg, &sim).await;
    let first = |min: i64| {
        let dir = dir.path().to_path_buf();
        async move {
            let mut got = None;
            wait_until(Duration::from_secs(30), || {
                got = local_checkpoint(&dir, "firehose").filter(|c| *c >= min);
                got.is_some()
            })
            .await;
            got
        }
    };
    let c0 = first(1).await.expect("a first checkpoint");
    // a repo the backfill finished at one rev, then a #sync at a later one, at the position
    // just past the committed checkpoint
    let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
    cut.load_snapshot(did, "3kbaaaaaaaaa2", None, &[]);
    let at = atlake::model::Cursor::seq(c0 + 1).unwrap();
    assert!(cut.live_sync(did, "3kcaaaaaaaaa2", Some(at)).is_some());
    // the stream goes on, flushes and commits; the checkpoint stays before the #sync
    let before = sim.last_seq().unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        sim.last_seq().unwrap_or(0) > before + 200,
        "the stream moved on"
    );
    let held = local_checkpoint(dir.path(), "firehose").unwrap();
    assert!(held <= c0, "the checkpoint passed the gap: {held} > {c0}");
    // the fresh fetch is taken, finishes and is committed: the hold ends
    assert_eq!(cut.take_refetch(10), vec![did.to_string()]);
    cut.snapshot_done(did, Some("3kcaaaaaaaaa2"), None, true);
    cut.refetch_committed(did);
    let moved = first(c0 + 2).await;
    assert!(
        moved.is_some(),
        "the checkpoint never passed the gap once it was covered"
    );
    let summary = h.stop(Duration::from_secs(10)).await.unwrap();
    assert!(summary.clean);
    sim.stop();
}

/// A daemon whose source takes some DIDs follows the chains of those DIDs only (it keeps no
/// head for any other), and every commit of a followed DID moves its chain on, a commit of a
/// collection the filter leaves out too: otherwise the next kept commit, whose `since` is that
/// commit's rev, would look like a gap and mark the repo for a fresh fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_daemon_follows_every_commit_of_its_dids_and_no_other() {
    use atlake::simulate::traffic::did_of;
    let mut sc = SimConfig {
        messages: None,
        rate: Some(400.0),
        retention: 1_000_000,
        ..seeded(29)
    };
    sc.traffic.accounts = 6;
    let sim = start_sim(sc).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path().to_str().unwrap());
    cfg.source.dids = vec![did_of(0), did_of(1)];
    cfg.source.collections = vec!["app.bsky.feed.post".into()];
    let (h, cut) = firehose_with_cutover(cfg, &sim).await;
    wait_until(Duration::from_secs(30), || cut.followed().0 == 2).await;
    // a snapshot older than the live heads anchors both chains at their live heads: from here
    // each commit must name the previous one (`since`) and its MST root (`prevData`)
    for d in [did_of(0), did_of(1)] {
        cut.snapshot_done(&d, Some("2222222222222"), None, false);
    }
    let anchored = sim.truth().messages;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let truth = sim.truth();
    assert!(truth.messages > anchored + 800, "the stream moved on");
    let of_dids = |post: bool| {
        truth
            .keys
            .iter()
            .filter(|k| k.kind == "commit" && (k.did == did_of(0) || k.did == did_of(1)))
            .filter(|k| (k.collection == "app.bsky.feed.post") == post)
            .count()
    };
    assert!(
        of_dids(false) > 100 && of_dids(true) > 10,
        "commits of the followed DIDs, left out and kept: {} and {}",
        of_dids(false),
        of_dids(true)
    );
    assert_eq!(
        cut.followed(),
        (2, 0),
        "only the filter's DIDs are followed"
    );
    assert_eq!(cut.refetch_pending(), 0, "a gap where there was none");
    assert!(cut.take_refetch(10).is_empty());
    let summary = h.stop(Duration::from_secs(10)).await.unwrap();
    assert!(summary.clean && summary.filtered > 0);
    sim.stop();
}
