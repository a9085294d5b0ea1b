//! Storage faults: the S3 server unreachable for 60 s mid-ingest, and a full disk. Nothing is
//! lost, memory stays bounded (backpressure reaches the socket), and ingest resumes by itself.

use crate::common::{
    ChildGuard, assert_exactly_once, atlake_bin, local_checkpoint, read_lake, rss_kb, seeded,
    start_sim, wait_until,
};
use crate::ingest::test_config;
use crate::tools::{Moto, Proxy, missing};
use atlake::config::SourceKind;
use atlake::ingest::{self, Input};
use atlake::simulate::server::SimConfig;
use atlake::sink::store::Lake;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_of_a_minute_loses_nothing_and_bounds_memory() {
    let Some(moto) = Moto::start("outage").await else {
        return missing("moto_server (S3-compatible server)");
    };
    let target: std::net::SocketAddr = moto.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = Proxy::start(target).await;
    let messages = 400_000;
    let sim = start_sim(SimConfig {
        messages: Some(messages),
        rate: Some(4000.0),
        retention: 1_000_000,
        ..seeded(61)
    })
    .await;
    let mut env = moto.env();
    env.retain(|(k, _)| k != "AWS_ENDPOINT");
    env.push(("AWS_ENDPOINT".into(), format!("http://{}", proxy.addr)));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ingest.log");
    let lake_url = "s3://outage/lake";
    let mut child = ChildGuard(
        Command::new(atlake_bin())
            .args([
                "ingest",
                "--source",
                "firehose",
                "--url",
                &sim.url(),
                "--lake",
                lake_url,
                "--start-cursor",
                "0",
            ])
            .current_dir(dir.path())
            .envs(env.iter().cloned())
            .env("ATLAKE_FLUSH_MAX_AGE", "1s")
            .env("ATLAKE_LOG", "warn,atlake::ingest::writer=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = child.id();
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.set_down(true);
    let outage = Instant::now();
    let mut peak = 0;
    let mut sent_at_20s = 0;
    while outage.elapsed() < Duration::from_secs(60) {
        peak = peak.max(rss_kb(pid));
        if sent_at_20s == 0 && outage.elapsed() >= Duration::from_secs(20) {
            sent_at_20s = sim.sent();
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "ingest died during the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sent_at_60s = sim.sent();
    proxy.set_down(false);
    let generated = sim.truth().messages;
    // backpressure: the source stopped reading, so the relay could not send
    assert!(
        sent_at_60s - sent_at_20s < 20_000 && generated > sent_at_60s + 50_000,
        "sent {sent_at_20s} at 20 s, {sent_at_60s} at 60 s, generated {generated}"
    );
    assert!(
        peak < 300 * 1024,
        "peak RSS during the outage {} MiB",
        peak / 1024
    );
    // and it resumes by itself
    let lake = Lake::open_with_env(lake_url, &env).unwrap();
    sim.wait_for_messages(messages).await;
    let target_seq = sim.last_seq().unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let c = atlake::checkpoint::Checkpoint::load(&lake)
            .await
            .ok()
            .flatten()
            .and_then(|c| c.firehose)
            .map(|p| p.cursor);
        if c.is_some_and(|c| c >= target_seq) {
            break;
        }
        if Instant::now() >= deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: String = text.lines().rev().take(40).collect::<Vec<_>>().join("\n");
            panic!(
                "did not catch up after the outage: {c:?} < {target_seq}; log (last lines first):\n{tail}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("storing a file failed; retrying")
            && text.contains("storage is writable again"),
        "{text}"
    );
    let got = read_lake(&lake).await;
    assert_exactly_once(&got, &sim.truth());
    eprintln!(
        "S3 OUTAGE RESULT: 60 s outage, peak RSS {} MiB, relay sends during the last 40 s of the outage: {}, events {} lost 0 duplicated 0",
        peak / 1024,
        sent_at_60s - sent_at_20s,
        sim.truth().events()
    );
    sim.stop();
}

/// A small filesystem for the lake: tmpfs when we may mount one (CI runs as root).
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: &std::path::Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(path).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_writing_resumes_when_space_returns() {
    atlake::telemetry::metrics();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("disk");
    let Some(_disk) = SmallDisk::mount(&mnt, "64m") else {
        return missing("permission to mount a tmpfs (root)");
    };
    // leave about 300 KiB free
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0u8; 64 * 1024 * 1024 - 300 * 1024]).ok();
    let sim = start_sim(SimConfig {
        messages: Some(20_000),
        rate: Some(5000.0),
        retention: 1_000_000,
        ..seeded(62)
    })
    .await;
    let lake_dir = mnt.join("lake");
    let mut cfg = test_config(lake_dir.to_str().unwrap());
    cfg.source.kind = SourceKind::Firehose;
    cfg.source.url = sim.url();
    cfg.source.start_cursor = Some(0);
    cfg.flush.max_age.0 = Duration::from_millis(500);
    cfg.flush.max_rows = 5000;
    let no_space_before = crate::faults::metric("atlake_storage_errors_total", "kind=\"no_space\"");
    let h = ingest::start(cfg, Input::Network).await.unwrap();
    let health = h.health.clone();
    assert!(
        wait_until(Duration::from_secs(60), || health
            .no_space
            .load(Ordering::Relaxed))
        .await,
        "the full disk was noticed"
    );
    assert!(
        crate::faults::metric("atlake_storage_errors_total", "kind=\"no_space\"") > no_space_before
    );
    // every file that made it is whole: no committed file is left corrupt, no temp file remains
    let lake = Lake::open(lake_dir.to_str().unwrap()).unwrap();
    let partial = read_lake(&lake).await;
    assert!(partial.keys.len() < 60_000);
    // space returns
    std::fs::remove_file(&filler).unwrap();
    sim.wait_for_messages(20_000).await;
    let target = sim.last_seq().unwrap();
    assert!(
        wait_until(Duration::from_secs(120), || local_checkpoint(
            &lake_dir, "firehose"
        )
        .is_some_and(|c| c >= target))
        .await,
        "writing did not resume when space returned: checkpoint {:?} < {target}, no_space {}, failing {}, relay sent {}",
        local_checkpoint(&lake_dir, "firehose"),
        health.no_space.load(Ordering::Relaxed),
        health.failing.load(Ordering::Relaxed),
        sim.sent()
    );
    assert!(!health.no_space.load(Ordering::Relaxed));
    h.stop(Duration::from_secs(10)).await.unwrap();
    assert_exactly_once(&read_lake(&lake).await, &sim.truth());
    sim.stop();
}
