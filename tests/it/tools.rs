//! Real external components the tests start themselves: an S3-compatible server (moto) on
//! loopback, and Python with duckdb/pyarrow.
//!
//! `cargo test` alone skips these tests with a printed notice when the tools are missing;
//! `scripts/test` installs them and sets `ATLAKE_REQUIRE_TOOLS=1`, which turns a missing tool
//! into a failure.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};

fn required() -> bool {
    std::env::var("ATLAKE_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// Skips (or fails, when tools are required) with a notice.
pub fn missing(what: &str) {
    if required() {
        panic!("{what} is required (ATLAKE_REQUIRE_TOOLS=1) but not available");
    }
    eprintln!("NOTICE: skipping: {what} is not available (scripts/test installs it)");
}

/// A moto S3 server on a free loopback port, stopped on drop.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

impl Moto {
    /// Starts moto and creates `bucket`; `None` when `moto_server` is not installed.
    pub async fn start(bucket: &str) -> Option<Moto> {
        Moto::start_with_env(bucket, &[]).await
    }

    /// [`Moto::start`] with moto settings in its environment (`S3_UPLOAD_PART_MIN_SIZE`…).
    pub async fn start_with_env(bucket: &str, env: &[(&str, &str)]) -> Option<Moto> {
        let bin = std::env::var("ATLAKE_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let m = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let mut up = false;
        for _ in 0..200 {
            if client.get(&m.endpoint).send().await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up, "moto_server did not come up on {}", m.endpoint);
        let r = client
            .put(format!("{}/{bucket}", m.endpoint))
            .send()
            .await
            .expect("create bucket");
        assert!(r.status().is_success(), "create bucket: {}", r.status());
        Some(m)
    }

    /// The `AWS_*` environment that points object_store at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT".into(), self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID".into(), "test".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
            ("AWS_DEFAULT_REGION".into(), "us-east-1".into()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
        ]
    }

    /// Stops the server (it can be started again on the same port with [`Moto::restart`]).
    #[allow(dead_code)] // used by the storage-outage test
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    #[allow(dead_code)] // used by the storage-outage test
    /// Starts the server again on the same port (moto keeps no data across restarts, so this is
    /// only for outage tests that recreate the bucket).
    pub async fn restart(&mut self, bucket: &str) {
        let port = self.endpoint.rsplit(':').next().unwrap_or("0").to_string();
        let bin = std::env::var("ATLAKE_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        self.child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart moto");
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if client.get(&self.endpoint).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = client
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await;
    }
}

/// A Python interpreter with duckdb and pyarrow, if there is one.
pub fn python() -> Option<String> {
    let bin = std::env::var("ATLAKE_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&bin)
        .args(["-c", "import duckdb, pyarrow"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(bin)
}

/// A Python interpreter that can import every one of `modules`, if there is one.
pub fn python_with(modules: &[&str]) -> Option<String> {
    let bin = std::env::var("ATLAKE_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&bin)
        .args(["-c", &format!("import {}", modules.join(", "))])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(bin)
}

/// Runs a Python script with arguments; returns stdout.
pub fn run_python(py: &str, script: &str, args: &[&str]) -> String {
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

/// A TCP proxy that can cut every connection and refuse new ones, like a server going away.
pub struct Proxy {
    /// Where clients connect.
    pub addr: std::net::SocketAddr,
    down: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Proxy {
    /// Starts forwarding to `target`.
    pub async fn start(target: std::net::SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(tx);
        let d = down.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = l.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                // a fresh receiver: only cuts that happen after this connection count
                let mut rx = rx.clone();
                rx.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.changed() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            down,
            generation,
        }
    }

    /// Cuts every connection and refuses new ones (`true`), or lets them through again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.generation.send_modify(|g| *g += 1);
        }
    }
}
