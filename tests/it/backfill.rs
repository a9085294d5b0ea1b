//! Backfill from the simulator's sync endpoints (a relay, a PLC stand-in, three PDS hosts, with
//! faults): every record of every readable repo lands exactly once, with its CID, rev and
//! record JSON; broken repos fail by reason and are quarantined; inactive ones are counted; a
//! second run fetches only what failed; and the real `atlake backfill` process, killed with
//! SIGKILL again and again, ends with the same lake (local disk and S3).

use crate::common::AtlakeChild;
use crate::tools::{Moto, missing};
use arrow::array::{Array, AsArray};
use atlake::backfill::{Plan, Stats, Target};
use atlake::config::Config;
use atlake::query::{Limits, QueryEngine};
use atlake::simulate::sync::{Broken, RepoTruth, SyncFaults, SyncSim, SyncSimConfig};
use atlake::simulate::traffic::Rng;
use atlake::sink::partition::PartitionName;
use atlake::sink::store::Lake;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One backfilled row: (did, key) → (cid, rev, record JSON).
type Rows = BTreeMap<(String, String), Vec<(String, String, serde_json::Value)>>;

/// The repo rows of the lake (every `rp-` file its logs commit, read directly) and the
/// quarantine by reason. Every backfill file left in the lake is committed.
async fn read_rows(lake: &Lake) -> (Rows, BTreeMap<String, u64>) {
    let mut rows: Rows = BTreeMap::new();
    let mut errors = BTreeMap::new();
    let (committed, _) = atlake::checkpoint::lake_state(lake).await.unwrap();
    let listed = atlake::checkpoint::list_files(lake).await.unwrap();
    let paths = |v: &[atlake::sink::partition::LakeFile]| -> Vec<String> {
        v.iter().map(|f| f.path.clone()).collect()
    };
    assert_eq!(
        paths(&committed),
        paths(&listed),
        "every file in the lake is named by its table's log"
    );
    for f in committed {
        let bytes = lake.get(&f.path).await.unwrap().unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            let b = b.unwrap();
            let s = |n: &str, i: usize| {
                let c = b.column_by_name(n).unwrap().as_string::<i32>();
                (!c.is_null(i)).then(|| c.value(i).to_string())
            };
            for i in 0..b.num_rows() {
                if f.key.name == PartitionName::Errors {
                    *errors.entry(s("reason", i).unwrap()).or_insert(0) += 1;
                    continue;
                }
                assert_eq!(s("origin", i).as_deref(), Some("repo"));
                assert_eq!(s("kind", i).as_deref(), Some("commit"));
                assert_eq!(s("operation", i).as_deref(), Some("create"));
                assert!(b.column_by_name("seq").unwrap().is_null(i));
                let key = format!("{}/{}", s("collection", i).unwrap(), s("rkey", i).unwrap());
                let record: serde_json::Value =
                    serde_json::from_str(&s("record", i).unwrap()).unwrap();
                rows.entry((s("did", i).unwrap(), key)).or_default().push((
                    s("cid", i).unwrap(),
                    s("rev", i).unwrap(),
                    record,
                ));
            }
        }
    }
    (rows, errors)
}

/// Every record of every readable repo exactly once, with its CID, the repo's rev and the
/// record as generated; nothing else.
fn assert_matches_truth(rows: &Rows, truth: &[RepoTruth]) {
    let mut expected = 0;
    for t in truth.iter().filter(|t| t.broken == Broken::No) {
        for (key, (cid, rec)) in &t.records {
            expected += 1;
            let got = rows
                .get(&(t.did.clone(), key.clone()))
                .unwrap_or_else(|| panic!("{} {key} is missing", t.did));
            assert_eq!(got.len(), 1, "{} {key} appears {} times", t.did, got.len());
            assert_eq!(got[0].0, *cid, "{} {key}: cid", t.did);
            assert_eq!(got[0].1, t.rev, "{} {key}: rev", t.did);
            assert_eq!(got[0].2, *rec, "{} {key}: record", t.did);
        }
    }
    let total: usize = rows.values().map(Vec::len).sum();
    assert_eq!(total, expected, "rows beyond the readable repos' records");
}

/// `atlake backfill` of every listed repo, to completion, through the library.
async fn backfill_listed(cfg: Config, lake: &Lake) -> atlake::backfill::Summary {
    atlake::backfill::run(
        Plan {
            target: Target::Listed,
            cfg,
            follow: false,
        },
        lake,
        Arc::new(Stats::default()),
    )
    .await
    .unwrap()
}

fn faults() -> SyncFaults {
    SyncFaults {
        rate_limit_every: Some(7),
        error_every: Some(11),
        stall_every: Some(13),
        stall: Duration::from_secs(3),
        truncated: 1,
        bad_cid: 1,
        wrong_did: 1,
        takendown: 1,
        deactivated: 1,
    }
}

fn config(lake: &str, sim: &SyncSim) -> Config {
    let mut cfg = Config::default();
    cfg.lake.url = lake.to_string();
    cfg.backfill.relay = sim.relay.clone();
    cfg.backfill.plc = sim.plc.clone();
    cfg.backfill.concurrency = 8;
    // a third of getRepo calls meet a fault: enough attempts that no readable repo gives up
    // (0.3^10 a repo), and a stall timeout well under the 3 s stalls but above scheduling
    // pauses of a loaded 2-core machine
    cfg.backfill.attempts = 10;
    cfg.backfill.timeout = atlake::config::HumanDuration(Duration::from_millis(1500));
    // small enough that repos span batches (partial progress is exercised)
    cfg.backfill.buffer = atlake::config::ByteSize(1 << 20);
    // and several flushes staged on disk per commit
    cfg.backfill.stage = atlake::config::ByteSize(3 << 20);
    cfg.backfill.repo_memory = atlake::config::ByteSize(64 << 10);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_of_every_repo_once_with_faults_and_a_second_run() {
    let sim = SyncSim::start(SyncSimConfig {
        accounts: 60,
        records: 50,
        big_repo: Some(3000),
        faults: faults(),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("lake").to_str().unwrap().to_string();
    let lake = Lake::open(&url).unwrap();
    let cfg = config(&url, &sim);
    let s = backfill_listed(cfg.clone(), &lake).await;
    let truth = sim.truth();
    // the faults were met and survived
    let injected = sim.injected();
    for f in ["rate_limited", "server_error", "stalled"] {
        assert!(
            injected.get(f).copied().unwrap_or(0) > 0,
            "{f}: {injected:?}"
        );
    }
    assert_eq!(s.listed, 60);
    assert_eq!(s.inactive.get("takendown"), Some(&1));
    assert_eq!(s.inactive.get("deactivated"), Some(&1));
    assert_eq!(s.done, 60 - 5, "failures: {:?}", s.failures);
    let want: BTreeMap<String, u64> = [("did_mismatch", 1), ("hash_mismatch", 1), ("truncated", 1)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(s.failures, want);
    assert!(s.batches > 1, "one batch: partial repos were not exercised");
    let (rows, errors) = read_rows(&lake).await;
    assert_matches_truth(&rows, &truth);
    assert_eq!(errors, want, "the broken repos are quarantined by reason");
    assert_eq!(
        s.records,
        truth
            .iter()
            .filter(|t| t.broken == Broken::No)
            .map(|t| t.records.len() as u64)
            .sum::<u64>()
    );
    // SQL sees them, origin and all
    let engine = QueryEngine::try_new(lake.clone(), None, Limits::default()).unwrap();
    let b = engine
        .collect("SELECT count(*) FROM events WHERE origin = 'repo' AND seq IS NULL")
        .await
        .unwrap();
    assert_eq!(
        b[0].column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0),
        s.records as i64
    );
    let b = engine
        .collect("SELECT count(*) FROM posts WHERE origin = 'repo' AND text IS NOT NULL")
        .await
        .unwrap();
    assert!(
        b[0].column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0)
            > 0
    );
    // a second run fetches only the failed repos, and adds nothing
    let before = sim.get_repo_requests();
    let s2 = backfill_listed(cfg, &lake).await;
    assert_eq!(s2.already_done, 55);
    assert_eq!(s2.failures, want);
    assert_eq!(s2.records, 0);
    let fetched = sim.get_repo_requests() - before;
    assert!((3..=9).contains(&fetched), "{fetched} getRepo calls");
    let (rows2, _) = read_rows(&lake).await;
    assert_eq!(rows2, rows);
    // the history and the quarantine are Delta tables: other engines read the same rows
    let Some(py) = crate::tools::python_with(&["deltalake", "polars"]) else {
        return missing("python3 with deltalake and polars");
    };
    let out = crate::tools::run_python(&py, HISTORY_READERS, &[&url]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut want_by: BTreeMap<String, u64> = BTreeMap::new();
    for (_, key) in rows.keys() {
        let coll = key.split('/').next().unwrap().to_string();
        *want_by.entry(coll).or_insert(0) += 1;
    }
    for reader in ["delta", "polars_delta"] {
        let got: BTreeMap<String, u64> =
            serde_json::from_value(v[reader].clone()).unwrap_or_else(|e| panic!("{reader}: {e}"));
        assert_eq!(
            got, want_by,
            "{reader}: rows per collection of the history table"
        );
    }
    let mut twice = want.clone();
    twice.values_mut().for_each(|n| *n *= 2);
    let got: BTreeMap<String, u64> = serde_json::from_value(v["errors"].clone()).unwrap();
    assert_eq!(
        got, twice,
        "the quarantine table holds both runs' broken repos, by reason"
    );
    assert_eq!(v["origin"], serde_json::json!(["repo"]));
    let (progress, _, _) = atlake::backfill::progress::Progress::recover(&lake)
        .await
        .unwrap();
    assert!(progress.last_batch.is_some());
    assert_eq!(
        v["txn"].as_i64(),
        progress.last_batch,
        "the history's txn is the last committed batch"
    );
}

/// Reads the `history` and `_errors` Delta tables with the `deltalake` package and Polars:
/// rows per collection, the quarantine's repo rows by reason, the backfill's `txn`.
const HISTORY_READERS: &str = r#"
import os, sys, json, deltalake, polars as pl
lake = sys.argv[1]
h = deltalake.DeltaTable(lake + "/history")
t = h.to_pyarrow_table(columns=["collection", "origin"])
by = {}
for c in t.column("collection").to_pylist():
    by[c] = by.get(c, 0) + 1
p = pl.scan_delta(lake + "/history").group_by("collection").len().collect()
reasons = {}
if os.path.isdir(lake + "/_errors/_delta_log"):
    e = deltalake.DeltaTable(lake + "/_errors").to_pyarrow_table(columns=["source", "reason"])
    for s, r in zip(e.column("source").to_pylist(), e.column("reason").to_pylist()):
        if s == "repo":
            reasons[r] = reasons.get(r, 0) + 1
txn = h.transaction_version("atlake.backfill")
print(json.dumps({
    "delta": by,
    "polars_delta": {r[0]: r[1] for r in p.iter_rows()},
    "errors": reasons,
    "origin": sorted(set(t.column("origin").to_pylist())),
    "txn": txn,
}))
# every answer is out: leave without the interpreter's teardown (once, under load, a native
# thread pool aborted the process there: "terminate called without an active exception")
sys.stdout.flush()
os._exit(0)
"#;

/// `--dids` takes only those repos.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_did_list() {
    let sim = SyncSim::start(SyncSimConfig {
        accounts: 20,
        records: 20,
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("lake").to_str().unwrap().to_string();
    let lake = Lake::open(&url).unwrap();
    let truth = sim.truth();
    let picked: Vec<RepoTruth> = truth.iter().step_by(5).cloned().collect();
    let s = atlake::backfill::run(
        Plan {
            target: Target::Dids(picked.iter().map(|t| t.did.clone()).collect()),
            cfg: config(&url, &sim),
            follow: false,
        },
        &lake,
        Arc::new(Stats::default()),
    )
    .await
    .unwrap();
    assert_eq!(s.done, picked.len() as u64);
    let (rows, _) = read_rows(&lake).await;
    assert_matches_truth(&rows, &picked);
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    Local,
    S3,
}

/// The real process, killed with SIGKILL at random moments (≥ 10 times), then run to the end:
/// every record once.
async fn crash(backend: Backend) {
    let _heavy = crate::common::HEAVY.lock().await;
    let bucket = "backfill";
    let moto = match backend {
        Backend::S3 => match Moto::start(bucket).await {
            Some(m) => Some(m),
            None => return missing("moto_server (S3-compatible server)"),
        },
        Backend::Local => None,
    };
    let sim = SyncSim::start(SyncSimConfig {
        accounts: 300,
        records: 80,
        seed: 11,
        faults: SyncFaults {
            truncated: 1,
            takendown: 1,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = match backend {
        Backend::Local => dir.path().join("lake").to_str().unwrap().to_string(),
        Backend::S3 => format!("s3://{bucket}/lake"),
    };
    // stages of killed runs land here; each restart removes those of dead processes
    let spill = dir.path().join("spill");
    std::fs::create_dir_all(&spill).unwrap();
    let mut env: Vec<(String, String)> = vec![
        (
            "ATLAKE_BACKFILL_SPILL_DIR".into(),
            spill.to_str().unwrap().to_string(),
        ),
        ("ATLAKE_BACKFILL_BUFFER".into(), "1MiB".into()),
        ("ATLAKE_BACKFILL_STAGE".into(), "2MiB".into()),
        ("ATLAKE_BACKFILL_FLUSH_INTERVAL".into(), "300ms".into()),
        ("ATLAKE_BACKFILL_CONCURRENCY".into(), "8".into()),
        ("ATLAKE_BACKFILL_REPO_MEMORY".into(), "64KiB".into()),
        ("ATLAKE_LAKE_LEASE_TTL".into(), "2s".into()),
        ("ATLAKE_LOG".into(), "info".into()),
    ];
    if let Some(m) = &moto {
        env.extend(m.env());
        // a killed holder's S3 lease is waited out
        env.push(("ATLAKE_LAKE_LEASE_WAIT".into(), "true".into()));
    }
    let lake = Lake::open_with_env(&url, &env).unwrap();
    let args = [
        "backfill", "--relay", &sim.relay, "--plc", &sim.plc, "--lake", &url,
    ];
    let mut rng = Rng::new(0xBACF ^ backend as u64);
    let started = Instant::now();
    let (mut kills, mut committed_before_kill) = (0, 0);
    let mut finished_early = false;
    let mut first_log = String::new();
    let mut orphans = 0u64;
    let orphans_of = |log: &str| -> u64 {
        log.split("orphans_removed=")
            .skip(1)
            .filter_map(|t| t.split(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    while kills < 12 {
        let mut child = AtlakeChild::spawn(&args, &env, dir.path(), &format!("run{kills}"));
        // wait for the run to be under way (S3: after the previous lease is taken over); every
        // other kill lands shortly after a batch was committed, the rest at random
        child
            .wait_log("recovered backfill progress", Duration::from_secs(30))
            .await;
        if kills % 2 == 0 {
            let before = child.log().matches("backfill batch committed").count();
            let until = Instant::now() + Duration::from_secs(10);
            while child.log().matches("backfill batch committed").count() == before
                && Instant::now() < until
                && matches!(child.child.try_wait(), Ok(None))
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.below(150))).await;
        } else {
            tokio::time::sleep(Duration::from_millis(20 + rng.below(500))).await;
        }
        if let Ok(Some(_)) = child.child.try_wait() {
            finished_early = true;
            break;
        }
        child.child.kill().unwrap();
        let _ = child.child.wait();
        kills += 1;
        committed_before_kill += usize::from(child.log().contains("backfill batch committed"));
        orphans += orphans_of(&child.log());
        if first_log.is_empty() {
            first_log = child.log();
        }
    }
    assert!(
        kills >= 10,
        "only {kills} kills landed before the backfill finished"
    );
    assert!(
        finished_early || committed_before_kill >= 3,
        "too few kills landed after a commit ({committed_before_kill}): {first_log}"
    );
    let mut last = AtlakeChild::spawn(&args, &env, dir.path(), "last");
    let status = last
        .exit_within(Duration::from_secs(240))
        .await
        .expect("the last run finishes");
    // 3: finished, with repos that failed (the truncated one)
    assert_eq!(status.code(), Some(3), "{}", last.log());
    orphans += orphans_of(&last.log());
    let truth = sim.truth();
    let (rows, errors) = read_rows(&lake).await;
    assert_matches_truth(&rows, &truth);
    assert!(errors.get("truncated").copied().unwrap_or(0) >= 1);
    assert!(
        orphans > 0,
        "no kill landed between a flush's files and its record"
    );
    let stages: Vec<_> = std::fs::read_dir(&spill)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("atlake-stage-"))
        .collect();
    assert!(stages.is_empty(), "stages left behind: {stages:?}");
    eprintln!(
        "BACKFILL CRASH RESULT backend={backend:?} kills={kills} committed_before_kill={committed_before_kill} uncommitted_files_removed={orphans} repos={} records={} lost=0 duplicated=0 took={:?}",
        truth.len(),
        rows.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_backfill_local() {
    crash(Backend::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_backfill_s3() {
    crash(Backend::S3).await;
}

/// A lake from before the log (its quarantine has files and no log) backfilled on its own:
/// the backfill gives the live tables their logs first, so the old quarantine files stay
/// committed beside the backfill's own, and the next writer's sweep keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_on_a_lake_from_before_the_log_keeps_its_old_quarantine() {
    let dir = tempfile::tempdir().unwrap();
    let lake_dir = dir.path().join("lake");
    let input = dir.path().join("live.jsonl");
    let good = serde_json::json!({"did": "did:plc:aliceaaaaaaaaaaaaaaaaaaa", "time_us": 1_783_173_600_000_000i64,
        "kind": "commit", "commit": {"rev": "3mpt7ukd22222", "operation": "delete",
        "collection": "app.bsky.feed.post", "rkey": "3mpt7ukd22223"}});
    std::fs::write(&input, format!("{good}\nnot json at all\n")).unwrap();
    let ingest = || {
        crate::common::atlake_ok(
            &["ingest", "--input", input.to_str().unwrap(), "--lake"],
            &lake_dir,
        )
    };
    ingest();
    // the format before the log: the same files, no `_delta_log`
    for t in ["events", "_errors"] {
        std::fs::remove_dir_all(lake_dir.join(t).join("_delta_log")).unwrap();
    }
    let lake = Lake::open(lake_dir.to_str().unwrap()).unwrap();
    let old: Vec<String> = atlake::checkpoint::list_files(&lake)
        .await
        .unwrap()
        .into_iter()
        .filter(|f| f.key.name == PartitionName::Errors)
        .map(|f| f.path)
        .collect();
    assert_eq!(old.len(), 1, "the bad line is quarantined");
    let sim = SyncSim::start(SyncSimConfig {
        accounts: 8,
        records: 10,
        faults: SyncFaults {
            truncated: 1,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let mut cfg = config(lake_dir.to_str().unwrap(), &sim);
    cfg.backfill.attempts = 3;
    let s = backfill_listed(cfg, &lake).await;
    assert_eq!(s.failures.get("truncated"), Some(&1));
    let errors = atlake::checkpoint::delta::load(&lake, atlake::checkpoint::delta::Table::Errors)
        .await
        .unwrap();
    assert!(
        errors.files.contains_key(&old[0]),
        "the old quarantine file is in the log"
    );
    assert_eq!(errors.files.len(), 2, "and the backfill's own");
    // the next writer's start and sweep keep both
    ingest();
    assert!(lake_dir.join(&old[0]).exists());
    let (committed, _) = atlake::checkpoint::lake_state(&lake).await.unwrap();
    let quarantined = committed
        .iter()
        .filter(|f| f.key.name == PartitionName::Errors)
        .count();
    assert!(quarantined >= 2, "{quarantined} quarantine files committed");
}
