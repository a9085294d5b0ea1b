//! Crash safety: the real `atlake ingest` process is killed with SIGKILL at random moments
//! (some during a data-file write, some during a checkpoint write, some during start-up
//! recovery), restarted each time, and at the end
//! the lake must hold every event of the simulator exactly once.

use crate::common::{ChildGuard, assert_exactly_once, atlake_bin, read_lake, seeded, start_sim};
use crate::tools::{Moto, missing};
use atlake::checkpoint::Checkpoint;
use atlake::simulate::server::SimConfig;
use atlake::simulate::traffic::Rng;
use atlake::sink::store::Lake;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    Local,
    S3,
}

/// Temporary files left by the process `pid` (a write it was killed in): (data files, checkpoints).
fn temp_files_of(dir: &Path, pid: u32) -> (usize, usize) {
    let (mut data, mut checkpoints) = (0, 0);
    let suffix = format!(".{pid}.tmp");
    for p in crate::common::files_under(&[dir.to_path_buf()]) {
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.') && n.ends_with(&suffix))
        {
            if p.components().any(|c| c.as_os_str() == "_delta_log") {
                checkpoints += 1;
            } else {
                data += 1;
            }
        }
    }
    (data, checkpoints)
}

async fn checkpoint(lake: &Lake, source: &str) -> Option<i64> {
    let c = Checkpoint::load(lake).await.ok()??;
    match source {
        "firehose" => c.firehose.map(|p| p.cursor),
        _ => c.jetstream.map(|p| p.cursor),
    }
}

async fn crash_test(source: &str, backend: Backend) {
    let bucket = "crash";
    let moto = match backend {
        Backend::S3 => match Moto::start(bucket).await {
            Some(m) => Some(m),
            None => return missing("moto_server (S3-compatible server)"),
        },
        Backend::Local => None,
    };
    let messages = 5000;
    let sim = start_sim(SimConfig {
        messages: Some(messages),
        rate: Some(1500.0),
        retention: 1_000_000,
        ..seeded(77)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let lake_url = match backend {
        Backend::Local => dir.path().join("lake").to_str().unwrap().to_string(),
        Backend::S3 => format!("s3://{bucket}/lake"),
    };
    let mut env: Vec<(String, String)> = vec![
        ("ATLAKE_FLUSH_MAX_ROWS".into(), "300".into()),
        ("ATLAKE_FLUSH_MAX_AGE".into(), "250ms".into()),
        ("ATLAKE_SOURCE_BACKOFF_INITIAL".into(), "20ms".into()),
        ("ATLAKE_SOURCE_BACKOFF_MAX".into(), "200ms".into()),
        ("ATLAKE_SOURCE_REWIND".into(), "50ms".into()),
        ("ATLAKE_SOURCE_READ_TIMEOUT".into(), "5s".into()),
        ("ATLAKE_LOG".into(), "info".into()),
    ];
    if backend == Backend::Local {
        env.push(("ATLAKE_FAULT_SLOW_WRITE_MS".into(), "40".into()));
    }
    if let Some(m) = &moto {
        env.extend(m.env());
    }
    let lake = Lake::open_with_env(&lake_url, &env).unwrap();
    let spawn = |run: usize| {
        let log = dir.path().join(format!("run{run}.log"));
        let mut cmd = Command::new(atlake_bin());
        cmd.args([
            "ingest",
            "--source",
            source,
            "--url",
            &sim.url(),
            "--lake",
            &lake_url,
            "--start-cursor",
            "0",
        ])
        .current_dir(dir.path())
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
        (ChildGuard(cmd.spawn().expect("spawn atlake")), log)
    };
    let mut rng = Rng::new(0xC0FFEE ^ source.len() as u64 ^ (backend as u64));
    let (mut kills, mut mid_write, mut mid_checkpoint, mut before_recovery) = (0, 0, 0, 0);
    let started = Instant::now();
    while kills < 12
        || (backend == Backend::Local && (mid_write == 0 || mid_checkpoint == 0) && kills < 40)
        || (before_recovery == 0 && kills < 40)
    {
        let (mut child, log) = spawn(kills);
        // a third of the kills land in the first moments, during start-up recovery
        let wait_ms = if kills % 3 == 1 {
            5 + rng.below(60)
        } else {
            150 + rng.below(700)
        };
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        let pid = child.id();
        // on a local lake, every third kill waits for a commit to the Delta log to be under way
        // (its temporary file exists; the slow-write fault holds it there for 40 ms) and lands
        // in it
        if backend == Backend::Local && kills % 3 == 2 {
            let logs = [
                dir.path().join("lake/events/_delta_log"),
                dir.path().join("lake/_errors/_delta_log"),
            ];
            let suffix = format!(".{pid}.tmp");
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until
                && !crate::common::files_under(&logs).iter().any(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.') && n.ends_with(&suffix))
                })
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        kills += 1;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !text.contains("recovered lake state") {
            before_recovery += 1;
        }
        if backend == Backend::Local {
            let (data, checkpoints) = temp_files_of(&dir.path().join("lake"), pid);
            mid_write += usize::from(data > 0);
            mid_checkpoint += usize::from(checkpoints > 0);
        }
    }
    // the last run catches up and shuts down cleanly
    sim.wait_for_messages(messages).await;
    let target = match source {
        "firehose" => sim.last_seq().unwrap(),
        _ => sim.truth().last_time_us.unwrap(),
    };
    let (mut child, log) = spawn(kills);
    let deadline = Instant::now() + Duration::from_secs(180);
    // caught up (earlier runs may already have checkpointed everything) and running: its
    // signal handler is in place once recovery is logged
    while checkpoint(&lake, source).await.is_none_or(|c| c < target)
        || !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("recovered lake state")
    {
        assert!(
            Instant::now() < deadline,
            "final run never caught up: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "atlake exited early: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let term_at = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "clean shutdown: {status:?}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        term_at.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        term_at.elapsed()
    );
    let truth = sim.truth();
    let got = read_lake(&lake).await;
    assert_exactly_once(&got, &truth);
    // what a Delta reader sees is what a plain reader sees: every file left in storage is
    // committed in the log, and the log names no other
    let (committed, _) = atlake::checkpoint::lake_state(&lake).await.unwrap();
    let listed = atlake::checkpoint::list_files(&lake).await.unwrap();
    assert_eq!(
        committed.iter().map(|f| &f.path).collect::<Vec<_>>(),
        listed.iter().map(|f| &f.path).collect::<Vec<_>>()
    );
    eprintln!(
        "CRASH RESULT source={source} backend={backend:?} kills={kills} mid_write={mid_write} mid_checkpoint={mid_checkpoint} before_recovery={before_recovery} events={} lost=0 duplicated=0 files={} took={:?}",
        truth.events(),
        got.files,
        started.elapsed()
    );
    if backend == Backend::Local {
        assert!(mid_write > 0, "no kill landed during a write");
        assert!(
            mid_checkpoint > 0,
            "no kill landed during a checkpoint write"
        );
    }
    assert!(
        before_recovery > 0,
        "no kill landed during start-up recovery"
    );
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_firehose_local_exactly_once() {
    crash_test("firehose", Backend::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_jetstream_local_exactly_once() {
    crash_test("jetstream", Backend::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_firehose_s3_exactly_once() {
    crash_test("firehose", Backend::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_jetstream_s3_exactly_once() {
    crash_test("jetstream", Backend::S3).await;
}
