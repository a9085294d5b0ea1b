//! One writer per lake: the real `atlake ingest` processes, two at a time on one lake (local
//! and S3), a killed holder, skewed clocks, and a holder cut off from S3.

use crate::common::{AtlakeChild, assert_exactly_once, read_lake, seeded, start_sim};
use crate::tools::{Moto, Proxy, missing};
use atlake::checkpoint::Checkpoint;
use atlake::simulate::server::{SimConfig, SimHandle};
use atlake::sink::store::Lake;
use std::time::{Duration, Instant};

/// The environment every writer of these tests gets (plus S3's, when given).
fn writer_env(extra: &[(&str, &str)], s3: Option<&Moto>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("ATLAKE_FLUSH_MAX_AGE", "2s"),
        ("ATLAKE_FLUSH_MAX_ROWS", "2000"),
        ("ATLAKE_SOURCE_BACKOFF_INITIAL", "20ms"),
        ("ATLAKE_SOURCE_BACKOFF_MAX", "200ms"),
        ("ATLAKE_LAKE_LEASE_TTL", "2s"),
        ("ATLAKE_LOG", "info"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some(m) = s3 {
        env.extend(m.env());
    }
    // last, so they override the defaults above (e.g. an endpoint through a proxy)
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn ingest_args<'a>(source: &'a str, url: &'a str, lake: &'a str, wait: bool) -> Vec<&'a str> {
    let mut a = vec![
        "ingest",
        "--source",
        source,
        "--url",
        url,
        "--lake",
        lake,
        "--start-cursor",
        "0",
    ];
    if wait {
        a.push("--wait");
    }
    a
}

async fn checkpoint(lake: &Lake, source: &str) -> Option<i64> {
    let c = Checkpoint::load(lake).await.ok()??;
    match source {
        "firehose" => c.firehose.map(|p| p.cursor),
        _ => c.jetstream.map(|p| p.cursor),
    }
}

/// The last cursor the simulator will send, once it has generated everything.
async fn target(sim: &SimHandle, source: &str, messages: u64) -> i64 {
    sim.wait_for_messages(messages).await;
    match source {
        "firehose" => sim.last_seq().unwrap(),
        _ => sim.truth().last_time_us.unwrap(),
    }
}

/// Waits until `w` has checkpointed `target`, then stops it cleanly.
async fn finish(w: &mut AtlakeChild, lake: &Lake, source: &str, target: i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while checkpoint(lake, source).await.is_none_or(|c| c < target) {
        assert!(Instant::now() < deadline, "never caught up: {}", w.log());
        assert!(
            matches!(w.child.try_wait(), Ok(None)),
            "exited early: {}",
            w.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = w.terminate();
    assert!(status.success(), "clean shutdown: {status:?}: {}", w.log());
}

/// The one-line error of a refused writer, which must name the holder.
fn assert_refused(w: &mut AtlakeChild, holder_pid: u32, lake_url: &str) -> String {
    let status = w.child.wait().unwrap();
    assert!(!status.success(), "a second writer must fail: {}", w.log());
    let err = w.log();
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {err}"))
        .to_string();
    assert!(
        line.contains("is being written by") && line.contains(&format!("pid {holder_pid}")),
        "the error names the holder (pid {holder_pid}): {line}"
    );
    assert!(
        line.contains(&format!("the lake {lake_url} ")),
        "the error names the lake: {line}"
    );
    line
}

/// Two writers started together on one lake and one relay: one is refused with a line naming
/// the other, and the lake ends up with every event exactly once.
async fn two_writers(source: &str, s3: bool) {
    let moto = if s3 {
        match Moto::start("lease").await {
            Some(m) => Some(m),
            None => return missing("moto_server (S3-compatible server)"),
        }
    } else {
        None
    };
    let messages = 4000;
    let sim = start_sim(SimConfig {
        messages: Some(messages),
        rate: Some(1500.0),
        retention: 1_000_000,
        ..seeded(31)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let lake_url = match &moto {
        Some(_) => "s3://lease/lake".to_string(),
        None => dir.path().join("lake").to_str().unwrap().to_string(),
    };
    let env = writer_env(&[], moto.as_ref());
    let url = sim.url();
    let args = ingest_args(source, &url, &lake_url, false);
    let mut a = AtlakeChild::spawn(&args, &env, dir.path(), "a");
    let mut b = AtlakeChild::spawn(&args, &env, dir.path(), "b");
    // one of the two is refused as soon as it looks at the lease; the other goes on
    let (mut holder, mut refused) = loop {
        if !matches!(a.child.try_wait(), Ok(None)) {
            break (b, a);
        }
        if !matches!(b.child.try_wait(), Ok(None)) {
            break (a, b);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let line = assert_refused(&mut refused, holder.pid(), &lake_url);
    let lake = Lake::open_with_env(&lake_url, &env).unwrap();
    let t = target(&sim, source, messages).await;
    finish(&mut holder, &lake, source, t).await;
    let truth = sim.truth();
    let got = read_lake(&lake).await;
    assert_exactly_once(&got, &truth);
    eprintln!(
        "LEASE two writers source={source} s3={s3}: events={} rows={} refused: {line}",
        truth.events(),
        got.keys.len()
    );
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_a_local_lake_one_refused_exactly_once() {
    two_writers("firehose", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_s3_one_refused_exactly_once() {
    two_writers("jetstream", true).await;
}

/// A lake on S3 with a simulator behind it, for the lease tests that need three processes.
struct S3Case {
    moto: Moto,
    sim: SimHandle,
    dir: tempfile::TempDir,
    lake_url: String,
    url: String,
    messages: u64,
}

impl S3Case {
    async fn start(bucket: &str, messages: u64) -> Option<S3Case> {
        let moto = Moto::start(bucket).await?;
        let sim = start_sim(SimConfig {
            messages: Some(messages),
            rate: Some(400.0),
            retention: 1_000_000,
            ..seeded(32)
        })
        .await;
        let url = sim.url();
        Some(S3Case {
            moto,
            sim,
            dir: tempfile::tempdir().unwrap(),
            lake_url: format!("s3://{bucket}/lake"),
            url,
            messages,
        })
    }

    fn writer(&self, name: &str, wait: bool, extra: &[(&str, &str)]) -> AtlakeChild {
        let env = writer_env(extra, Some(&self.moto));
        let args = ingest_args("firehose", &self.url, &self.lake_url, wait);
        AtlakeChild::spawn(&args, &env, self.dir.path(), name)
    }

    fn lake(&self) -> Lake {
        Lake::open_with_env(&self.lake_url, &self.moto.env()).unwrap()
    }

    async fn finish_exactly_once(&self, w: &mut AtlakeChild) {
        let t = target(&self.sim, "firehose", self.messages).await;
        let lake = self.lake();
        finish(w, &lake, "firehose", t).await;
        assert_exactly_once(&read_lake(&lake).await, &self.sim.truth());
    }
}

/// A holder killed with SIGKILL on another machine: a second writer without `--wait` is
/// refused (nothing says the holder is gone); one with `--wait` takes the lease over once it
/// went unrenewed for 7/6 of its duration, and carries on exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holders_lease_is_taken_over_after_it_lapses() {
    let Some(case) = S3Case::start("lapse", 3000).await else {
        return missing("moto_server (S3-compatible server)");
    };
    let mut a = case.writer("a", false, &[("ATLAKE_FAULT_MACHINE_ID", "machine-a")]);
    assert!(
        a.wait_log("took the lake's writer lease", Duration::from_secs(30))
            .await,
        "{}",
        a.log()
    );
    // let it write something, then kill it where it stands
    let lake = case.lake();
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint(&lake, "firehose").await.is_none() {
        assert!(Instant::now() < deadline, "{}", a.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let holder = a.pid();
    a.child.kill().unwrap();
    let _ = a.child.wait();
    let killed_at = Instant::now();
    let mut b = case.writer("b", false, &[("ATLAKE_FAULT_MACHINE_ID", "machine-b")]);
    assert_refused(&mut b, holder, &case.lake_url);
    let mut c = case.writer("c", true, &[("ATLAKE_FAULT_MACHINE_ID", "machine-b")]);
    assert!(
        c.wait_log("took over the lake's writer lease", Duration::from_secs(60))
            .await,
        "{}",
        c.log()
    );
    let waited = killed_at.elapsed();
    // the lease is 2 s: it cannot be taken before it went unrenewed for 7/6 of that
    assert!(
        waited >= Duration::from_millis(2300),
        "taken over after {waited:?}"
    );
    // and a waiting writer polls every ttl/6: well within four lease durations (2.7 s measured)
    assert!(
        waited < Duration::from_secs(8),
        "taken over after {waited:?}"
    );
    case.finish_exactly_once(&mut c).await;
    eprintln!("LEASE takeover after kill -9: {waited:?} (lease 2 s)");
    case.sim.stop();
}

/// Clocks two hours apart in opposite directions change nothing: a waiting writer does not take
/// a lease that is being renewed (it compares ETags on its own monotonic clock, never wall
/// clocks), and takes it at once when the holder releases it at a clean shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_clocks_never_let_a_live_lease_be_taken() {
    let Some(case) = S3Case::start("skew", 3000).await else {
        return missing("moto_server (S3-compatible server)");
    };
    let mut a = case.writer(
        "a",
        false,
        &[
            ("ATLAKE_FAULT_MACHINE_ID", "machine-a"),
            ("ATLAKE_FAULT_CLOCK_SKEW_SECS", "-7200"),
        ],
    );
    assert!(
        a.wait_log("took the lake's writer lease", Duration::from_secs(30))
            .await,
        "{}",
        a.log()
    );
    // the skew is real: a's lease says it expires about two hours before now
    let lease = case
        .lake()
        .get("_atlake/lease.json")
        .await
        .unwrap()
        .unwrap();
    let lease: serde_json::Value = serde_json::from_slice(&lease).unwrap();
    let expires = atlake::syntax::parse_datetime_us(lease["expires"].as_str().unwrap()).unwrap();
    let behind = atlake::model::cursor::now_us() - expires;
    assert!(
        (7_000_000_000..7_200_000_000).contains(&behind),
        "a's lease expires {behind} µs before now: {lease}"
    );
    let mut b = case.writer(
        "b",
        true,
        &[
            ("ATLAKE_FAULT_MACHINE_ID", "machine-b"),
            ("ATLAKE_FAULT_CLOCK_SKEW_SECS", "7200"),
        ],
    );
    // four lease durations: a's lease says it expired two hours ago, b's clock says four
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        !b.log().contains("took over"),
        "b took a live lease: {}",
        b.log()
    );
    assert!(matches!(a.child.try_wait(), Ok(None)), "{}", a.log());
    assert!(matches!(b.child.try_wait(), Ok(None)), "{}", b.log());
    let stopped = Instant::now();
    assert!(a.terminate().success(), "{}", a.log());
    assert!(
        b.wait_log("took over the lake's writer lease", Duration::from_secs(10))
            .await,
        "{}",
        b.log()
    );
    assert!(b.log().contains("it was released"), "{}", b.log());
    eprintln!(
        "LEASE skew: no takeover in 8 s of renewals; taken {:?} after a clean stop",
        stopped.elapsed()
    );
    case.finish_exactly_once(&mut b).await;
    case.sim.stop();
}

/// A holder cut off from S3 cannot renew: it stops writing, another writer takes over, and
/// when the holder reaches S3 again it finds the lease taken and exits with an error. The lake
/// stays exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_renew_stops_and_exits_when_taken_over() {
    let Some(case) = S3Case::start("cutoff", 3000).await else {
        return missing("moto_server (S3-compatible server)");
    };
    let target: std::net::SocketAddr = case
        .moto
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let proxy = Proxy::start(target).await;
    let through = format!("http://{}", proxy.addr);
    let mut a = case.writer(
        "a",
        false,
        &[
            ("ATLAKE_FAULT_MACHINE_ID", "machine-a"),
            ("AWS_ENDPOINT", through.as_str()),
        ],
    );
    let lake = case.lake();
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint(&lake, "firehose").await.is_none() {
        assert!(Instant::now() < deadline, "{}", a.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.set_down(true);
    let mut b = case.writer("b", true, &[("ATLAKE_FAULT_MACHINE_ID", "machine-b")]);
    assert!(
        b.wait_log("took over the lake's writer lease", Duration::from_secs(60))
            .await,
        "{}",
        b.log()
    );
    proxy.set_down(false);
    let back = Instant::now();
    // its renewals retry at most ttl/3 apart, so it learns within seconds (1.4 s measured)
    let status = a
        .exit_within(Duration::from_secs(12))
        .await
        .unwrap_or_else(|| panic!("a kept running: {}", a.log()));
    eprintln!(
        "LEASE cut-off holder exited {:?} after S3 came back",
        back.elapsed()
    );
    assert!(!status.success(), "{}", a.log());
    assert!(
        a.log().contains("lost the writer lease"),
        "a says why it stopped: {}",
        a.log()
    );
    case.finish_exactly_once(&mut b).await;
    case.sim.stop();
}

/// In one process, a second pipeline on the same local lake is refused before it reads
/// anything, and the first is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pipeline_in_one_process_is_refused() {
    let sim = start_sim(SimConfig {
        messages: Some(500),
        ..seeded(33)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().to_str().unwrap().to_string();
    let mut cfg = crate::ingest::test_config(&lake);
    cfg.source.url = sim.url();
    cfg.source.start_cursor = Some(0);
    let first = atlake::ingest::start(cfg.clone(), atlake::ingest::Input::Network)
        .await
        .unwrap();
    let second = atlake::ingest::start(cfg, atlake::ingest::Input::Network).await;
    match second {
        Err(atlake::ingest::IngestError::Lease(atlake::sink::lease::LeaseError::Held {
            holder,
            ..
        })) => assert_eq!(holder.pid, std::process::id()),
        other => panic!("expected a refusal, got {other:?}"),
    }
    first.stop(Duration::from_secs(10)).await.unwrap();
    sim.stop();
}

/// A commit to the Delta log on S3 is a conditional put: the version a second writer tries to
/// take is refused by the server (moto enforces `If-None-Match: *`), and the log keeps the
/// first commit; a local lake refuses it the same way (a hard link never replaces a file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_version_is_committed_once_on_s3_and_on_disk() {
    let Some(moto) = Moto::start("delta").await else {
        return missing("moto_server (S3-compatible server)");
    };
    let dir = tempfile::tempdir().unwrap();
    let lakes = [
        Lake::open_with_env("s3://delta/lake", &moto.env()).unwrap(),
        Lake::open(dir.path().to_str().unwrap()).unwrap(),
    ];
    for lake in lakes {
        let path = "events/_delta_log/00000000000000000000.json";
        assert!(
            lake.put_new(path, "first".into()).await.unwrap(),
            "{}",
            lake.url()
        );
        assert!(
            !lake.put_new(path, "second".into()).await.unwrap(),
            "{}",
            lake.url()
        );
        assert_eq!(lake.get(path).await.unwrap().unwrap(), "first");
    }
}
