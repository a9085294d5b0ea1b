//! One writer per lake: a lease taken before anything is written, held while writing.
//!
//! - **Local lake**: an OS file lock (`flock`) on `_atlake/writer.lock`, released by the kernel
//!   when the process ends however it ends. The file also says who holds it, for the error a
//!   second writer prints.
//! - **S3**: a lease object `_atlake/lease.json` holding the holder (host, pid, a per-process
//!   token) and its expiry, created with a conditional put (`If-None-Match: *`) and renewed every
//!   `ttl / 3` with a conditional update on its ETag (`If-Match`). Every renewal changes the body
//!   (a counter), so its ETag changes too (S3 ETags are the body's MD5).
//!
//! **The holder** may start a write only while its lease is valid: until `ttl / 2` after it
//! *sent* its last successful renewal, by its own monotonic clock. A write that has not finished
//! when the validity ends is cancelled ([`Fence::deadline`]). A renewal that fails leaves the
//! validity to run out (writes pause, and resume if a later renewal succeeds); a renewal refused
//! because someone else updated the lease ends the writer.
//!
//! **A second writer** is refused with the holder's name, unless the holder is provably gone:
//! - it ran on this machine (same boot id, pid namespace and host) and its process is no longer
//!   running (or the pid now belongs to a process that started later), or
//! - with `--wait`, the lease object kept the same ETag for `ttl + ttl / 6` by the waiting
//!   writer's own monotonic clock. The holder's writes stopped `ttl / 2` after its last renewal
//!   was sent, which is before that renewal's ETag was first seen.
//!
//! The takeover itself is a conditional update on the ETag that was observed, so of two
//! writers racing for an abandoned lease exactly one wins.
//!
//! **Clock skew**: no decision compares wall clocks of two machines. Expiry times written into
//! the lease are informational (they are shown in messages). What must hold is that monotonic
//! clocks *run* at the same rate within a few percent, and that a write request completes or
//! fails within `ttl / 2` of being sent. A holder whose lease expired because its renewals
//! failed stops starting writes at its own deadline, whatever the other machines' clocks say.

use super::partition::STATE_DIR;
use super::store::{Lake, LakeLocation, StoreError};
use crate::backoff::Backoff;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{Read, Seek, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The local lock file, relative to the lake root.
pub fn lock_path() -> String {
    format!("{STATE_DIR}/writer.lock")
}

/// The S3 lease object, relative to the lake root.
pub fn lease_path() -> String {
    format!("{STATE_DIR}/lease.json")
}

/// Who holds (or held) a lake's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// What is writing (`ingest`, `run`, …).
    pub command: String,
    /// Host name.
    pub host: String,
    /// Process id on that host.
    pub pid: u32,
    /// Boot id and pid namespace of the holder's machine: two holders with the same value can
    /// see each other's processes.
    #[serde(default)]
    pub machine: String,
    /// When the process started, in clock ticks since boot (tells a reused pid apart).
    #[serde(default)]
    pub process_start: Option<u64>,
    /// When it took the lease (its wall clock, RFC 3339).
    pub since: String,
    /// When the lease runs out unless renewed (its wall clock; informational).
    #[serde(default)]
    pub expires: Option<String>,
    /// Renewals so far (changes the body, and so the ETag, at every renewal).
    #[serde(default)]
    pub renewals: u64,
    /// Random per process: tells our own lease apart from another writer's.
    #[serde(default)]
    pub token: u64,
    /// Set when the holder gave the lease back at a clean shutdown.
    #[serde(default)]
    pub released: bool,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`atlake {}` (pid {} on host {}, since {}",
            self.command, self.pid, self.host, self.since
        )?;
        if let Some(e) = &self.expires {
            write!(f, ", lease until {e} by its clock")?;
        }
        f.write_str(")")
    }
}

/// How to take the lease.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// What is writing (shown to a refused second writer).
    pub command: String,
    /// Lease duration on S3 (renewed every third of it).
    pub ttl: Duration,
    /// Wait for a held lease instead of failing.
    pub wait: bool,
}

/// Why the lease could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another writer holds it.
    #[error(
        "the lake {lake} is being written by {holder}; a lake takes one writer at a time (stop that writer, or pass --wait to take over once it is gone)"
    )]
    Held {
        /// The lake.
        lake: String,
        /// Who holds it.
        holder: Box<Holder>,
    },
    /// Another writer took the lease over.
    #[error("lost the writer lease of {lake}: {why}")]
    Lost {
        /// The lake.
        lake: String,
        /// What happened.
        why: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The lock file could not be used.
    #[error("lock file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Why a write was refused by the fence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// The lease ran out (renewals failed); writes wait for a renewal.
    #[error("the writer lease is not valid now (renewals failed); writing paused")]
    Expired,
    /// The lease was taken over; this writer must stop.
    #[error("the writer lease was lost: {0}")]
    Lost(String),
}

#[derive(Debug)]
struct FenceState {
    /// `None`: held for as long as the process lives (an OS lock).
    valid_until: Option<Instant>,
    lost: Option<String>,
}

/// What writes check before they start: whether this process may write now, and until when.
#[derive(Debug, Clone)]
pub struct Fence {
    state: Arc<Mutex<FenceState>>,
    lost_tx: Arc<watch::Sender<Option<String>>>,
}

impl Fence {
    /// A fence valid until `valid_until` (`None`: for good).
    pub(crate) fn new(valid_until: Option<Instant>) -> Fence {
        let (lost_tx, _) = watch::channel(None);
        Fence {
            state: Arc::new(Mutex::new(FenceState {
                valid_until,
                lost: None,
            })),
            lost_tx: Arc::new(lost_tx),
        }
    }

    /// A fence that never closes (memory lakes, tests).
    pub fn open() -> Fence {
        Fence::new(None)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FenceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a write may start now; on success, how long it may run (`None`: no limit).
    pub fn deadline(&self) -> Result<Option<Duration>, FenceError> {
        let g = self.lock();
        if let Some(why) = &g.lost {
            return Err(FenceError::Lost(why.clone()));
        }
        match g.valid_until {
            None => Ok(None),
            Some(until) => {
                let now = Instant::now();
                if now < until {
                    Ok(Some(until - now))
                } else {
                    Err(FenceError::Expired)
                }
            }
        }
    }

    /// Extends the validity (a renewal succeeded).
    pub(crate) fn extend(&self, until: Instant) {
        let mut g = self.lock();
        if g.lost.is_none() {
            g.valid_until = Some(g.valid_until.map_or(until, |u| u.max(until)));
        }
    }

    /// Closes the fence for good (the lease was taken over).
    pub(crate) fn lose(&self, why: String) {
        let mut g = self.lock();
        if g.lost.is_none() {
            g.lost = Some(why.clone());
            drop(g);
            self.lost_tx.send_replace(Some(why));
        }
    }

    /// Resolves when writes must stop, with why: the validity ran out (as renewals extended it
    /// meanwhile, not as it was when the write started), or the lease was lost.
    pub async fn closed(&self) -> FenceError {
        loop {
            let left = match self.deadline() {
                Err(e) => return e,
                Ok(left) => left,
            };
            let run_out = async {
                match left {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // then look again: a renewal may have moved the end
                _ = run_out => {}
                why = self.lost() => return FenceError::Lost(why),
            }
        }
    }

    /// Resolves when the lease is lost, with why.
    pub async fn lost(&self) -> String {
        let mut rx = self.lost_tx.subscribe();
        loop {
            // the borrow of the value ends here, before any other await
            let got = rx.wait_for(|l| l.is_some()).await.map(|v| v.clone());
            match got {
                Ok(Some(why)) => return why,
                // not lost (the wait only ends on a reason): keep waiting, never invent one
                Ok(None) => continue,
                // the sender lives as long as any fence clone: never closed while awaited
                Err(_) => return std::future::pending().await,
            }
        }
    }
}

/// A held lease. Dropping it stops renewals (a local lock is released when the file closes);
/// [`Lease::release`] gives it back explicitly.
#[derive(Debug)]
pub struct Lease {
    fence: Fence,
    kind: LeaseKind,
}

#[derive(Debug)]
enum LeaseKind {
    Local {
        _file: std::fs::File,
    },
    S3 {
        stop: watch::Sender<bool>,
        renewer: tokio::task::JoinHandle<()>,
    },
    None,
}

/// This process, as a holder.
fn me(command: &str, ttl: Option<Duration>) -> Holder {
    let now = crate::model::cursor::now_us() + clock_skew_us();
    Holder {
        command: command.to_string(),
        host: host_name(),
        pid: std::process::id(),
        machine: machine_id(),
        process_start: process_start(std::process::id()),
        since: crate::syntax::format_datetime_ms(now),
        expires: ttl.map(|t| {
            crate::syntax::format_datetime_ms(
                now.saturating_add(i64::try_from(t.as_micros()).unwrap_or(i64::MAX)),
            )
        }),
        renewals: 0,
        token: token(),
        released: false,
    }
}

fn token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Boot id, pid namespace and host: equal for two processes that see the same pids. Empty
/// when unknown (then no holder is ever taken for dead without waiting).
fn machine_id() -> String {
    if let Ok(m) = std::env::var("ATLAKE_FAULT_MACHINE_ID") {
        return m;
    }
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok();
    let ns = std::fs::read_link("/proc/self/ns/pid").ok();
    match (boot, ns) {
        (Some(b), Some(n)) => format!("{}/{}/{}", b.trim(), n.display(), host_name()),
        _ => String::new(),
    }
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
pub(crate) fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name (field 2) is in parentheses and may contain spaces
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Test-only fault injection: `ATLAKE_FAULT_CLOCK_SKEW_SECS` shifts the wall clock this
/// process writes into its lease (tests show no decision depends on it).
fn clock_skew_us() -> i64 {
    std::env::var("ATLAKE_FAULT_CLOCK_SKEW_SECS")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
        .map_or(0, |s| s.saturating_mul(1_000_000))
}

/// Whether `h` ran on this machine and is gone.
fn gone_from_this_machine(h: &Holder) -> bool {
    let mine = machine_id();
    if mine.is_empty() || h.machine != mine {
        return false;
    }
    if h.pid == std::process::id() {
        // our own pid: a lease of an earlier process with the same pid, or our own
        return h.process_start != process_start(h.pid);
    }
    match process_start(h.pid) {
        None => true,
        Some(start) => h.process_start.is_some_and(|s| s != start),
    }
}

impl Lease {
    /// Takes the lease of `lake`, or fails naming the holder (or waits, with `wait`).
    pub async fn acquire(lake: &Lake, s: &LeaseSettings) -> Result<Lease, LeaseError> {
        match lake.location() {
            LakeLocation::Local(_) => acquire_local(lake, s).await,
            LakeLocation::S3 { .. } => acquire_s3(lake, s).await,
            LakeLocation::Memory => Ok(Lease {
                fence: Fence::open(),
                kind: LeaseKind::None,
            }),
        }
    }

    /// The fence writes check.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// Gives the lease back (S3: marks the lease object released, if it is still ours).
    pub async fn release(self) {
        match self.kind {
            LeaseKind::Local { _file } => drop(_file),
            LeaseKind::S3 { stop, renewer } => {
                let _ = stop.send(true);
                if let Err(e) = renewer.await {
                    tracing::error!(error = %e, "the lease renewal task failed");
                }
            }
            LeaseKind::None => {}
        }
    }
}

async fn acquire_local(lake: &Lake, s: &LeaseSettings) -> Result<Lease, LeaseError> {
    let Some(root) = lake.local_root().map(|p| p.to_path_buf()) else {
        return Err(LeaseError::Lost {
            lake: lake.url().to_string(),
            why: "a local lake without a root directory".into(),
        });
    };
    let path = root.join(lock_path());
    let io = |source| LeaseError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut logged = false;
    loop {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {
                let me = me(&s.command, None);
                let body = to_json(&me)?;
                file.set_len(0).map_err(io)?;
                file.rewind().map_err(io)?;
                file.write_all(&body).map_err(io)?;
                file.sync_all().map_err(io)?;
                tracing::info!(lake = lake.url(), "took the lake's writer lock");
                return Ok(Lease {
                    fence: Fence::open(),
                    kind: LeaseKind::Local { _file: file },
                });
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                // the holder writes its name right after locking: give it a moment, so the
                // refusal can name it, before calling it unknown
                let mut named = None;
                for _ in 0..20 {
                    let mut text = String::new();
                    file.rewind().map_err(io)?;
                    file.read_to_string(&mut text).map_err(io)?;
                    if let Ok(h) = serde_json::from_str::<Holder>(&text) {
                        named = Some(h);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let holder = named.unwrap_or_else(|| Holder {
                    command: "(not yet named in the lock file)".into(),
                    host: "?".into(),
                    pid: 0,
                    machine: String::new(),
                    process_start: None,
                    since: "(starting)".into(),
                    expires: None,
                    renewals: 0,
                    token: 0,
                    released: false,
                });
                if !s.wait {
                    return Err(LeaseError::Held {
                        lake: lake.url().to_string(),
                        holder: Box::new(holder),
                    });
                }
                if !logged {
                    tracing::warn!(lake = lake.url(), %holder, "the lake is being written by another process; waiting for its lock");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
    }
}

/// An object store that gives no ETags cannot hold a lease: conditional updates need them.
fn no_etag(lake: &Lake) -> LeaseError {
    LeaseError::Lost {
        lake: lake.url().to_string(),
        why: "the object store returned no ETag for the lease object, so it cannot be renewed \
              safely"
            .into(),
    }
}

fn to_json(h: &Holder) -> Result<Vec<u8>, LeaseError> {
    serde_json::to_vec_pretty(h).map_err(|e| LeaseError::Io {
        path: lease_path(),
        source: std::io::Error::other(e),
    })
}

/// The lease object and its ETag (`None` when absent).
async fn read_lease(lake: &Lake) -> Result<Option<(Holder, String)>, LeaseError> {
    let store = lake.object_store();
    let path = lake.object_path(&lease_path());
    match store.get(&path).await {
        Ok(r) => {
            let etag = r.meta.e_tag.clone().ok_or_else(|| no_etag(lake))?;
            let bytes = r.bytes().await.map_err(StoreError::from)?;
            let holder =
                serde_json::from_slice::<Holder>(&bytes).map_err(|e| LeaseError::Lost {
                    lake: lake.url().to_string(),
                    why: format!("the lease object {} is not a lease: {e}", lease_path()),
                })?;
            Ok(Some((holder, etag)))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(StoreError::from(e).into()),
    }
}

/// Puts the lease body: create (`etag = None`) or update the version `etag`. `Ok(None)` when
/// the precondition failed (someone else got there first).
async fn put_lease(
    lake: &Lake,
    body: &Holder,
    etag: Option<&str>,
) -> Result<Option<String>, LeaseError> {
    let store = lake.object_store();
    let path = lake.object_path(&lease_path());
    let bytes = to_json(body)?;
    let mode = match etag {
        None => PutMode::Create,
        Some(e) => PutMode::Update(UpdateVersion {
            e_tag: Some(e.to_string()),
            version: None,
        }),
    };
    let opts = PutOptions {
        mode,
        ..Default::default()
    };
    match store.put_opts(&path, PutPayload::from(bytes), opts).await {
        Ok(r) => Ok(Some(r.e_tag.ok_or_else(|| no_etag(lake))?)),
        Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        ) => Ok(None),
        Err(e) => Err(StoreError::from(e).into()),
    }
}

async fn acquire_s3(lake: &Lake, s: &LeaseSettings) -> Result<Lease, LeaseError> {
    let ttl = s.ttl.max(Duration::from_millis(300));
    let mut observed: Option<(String, Instant)> = None;
    let mut logged = false;
    loop {
        let sent = Instant::now();
        let mine = me(&s.command, Some(ttl));
        if let Some(etag) = put_lease(lake, &mine, None).await? {
            return Ok(start_renewing(lake, mine, etag, sent, ttl));
        }
        let Some((holder, etag)) = read_lease(lake).await? else {
            continue; // released and deleted in between: try again
        };
        let takeover = if holder.released {
            Some("it was released")
        } else if gone_from_this_machine(&holder) {
            Some("its process on this machine is gone")
        } else if s.wait
            && observed
                .as_ref()
                .is_some_and(|(e, since)| *e == etag && since.elapsed() >= ttl + ttl / 6)
        {
            Some("it was not renewed for a whole lease duration")
        } else {
            None
        };
        if let Some(why) = takeover {
            let sent = Instant::now();
            if let Some(new) = put_lease(lake, &mine, Some(&etag)).await? {
                tracing::warn!(lake = lake.url(), previous = %holder, why, "took over the lake's writer lease");
                return Ok(start_renewing(lake, mine, new, sent, ttl));
            }
            continue; // someone else changed it first
        }
        if !s.wait {
            return Err(LeaseError::Held {
                lake: lake.url().to_string(),
                holder: Box::new(holder),
            });
        }
        if observed.as_ref().is_none_or(|(e, _)| *e != etag) {
            observed = Some((etag, Instant::now()));
        }
        if !logged {
            tracing::warn!(lake = lake.url(), %holder, ?ttl, "the lake is being written by another process; waiting for its lease to be released or to lapse");
            logged = true;
        }
        tokio::time::sleep(ttl / 6).await;
    }
}

fn start_renewing(lake: &Lake, mine: Holder, etag: String, sent: Instant, ttl: Duration) -> Lease {
    let fence = Fence::new(Some(sent + ttl / 2));
    let (stop_tx, stop_rx) = watch::channel(false);
    let renewer = tokio::spawn(renew(lake.clone(), mine, etag, ttl, fence.clone(), stop_rx));
    tracing::info!(lake = lake.url(), ?ttl, "took the lake's writer lease");
    Lease {
        fence,
        kind: LeaseKind::S3 {
            stop: stop_tx,
            renewer,
        },
    }
}

/// Renews every `ttl / 3` until stopped (then marks the lease released) or lost.
async fn renew(
    lake: Lake,
    mut mine: Holder,
    mut etag: String,
    ttl: Duration,
    fence: Fence,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(ttl / 12, ttl / 3);
    let mut wait = ttl / 3;
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopping {
            mine.released = true;
            mine.renewals += 1;
            match tokio::time::timeout(ttl / 3, put_lease(&lake, &mine, Some(&etag))).await {
                Ok(Ok(Some(_))) => {
                    tracing::info!(lake = lake.url(), "released the lake's writer lease")
                }
                other => {
                    tracing::warn!(lake = lake.url(), result = ?other.map(|r| r.map(|e| e.is_some())), "could not mark the writer lease released; the next writer takes it over once it lapses")
                }
            }
            return;
        }
        mine.renewals += 1;
        mine.expires = Some(crate::syntax::format_datetime_ms(
            (crate::model::cursor::now_us() + clock_skew_us())
                .saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX)),
        ));
        let sent = Instant::now();
        let result = tokio::time::timeout(ttl / 3, put_lease(&lake, &mine, Some(&etag))).await;
        match result {
            Ok(Ok(Some(new))) => {
                etag = new;
                fence.extend(sent + ttl / 2);
                backoff.reset();
                wait = ttl / 3;
                metrics::counter!("atlake_lease_renewals_total", "result" => "ok").increment(1);
            }
            Ok(Ok(None)) => {
                // the ETag changed: a renewal of ours that timed out may have landed after all
                match read_lease(&lake).await {
                    Ok(Some((h, e))) if h.token == mine.token => {
                        etag = e;
                        mine.renewals = h.renewals;
                        wait = Duration::ZERO;
                        continue;
                    }
                    Ok(other) => {
                        let why = match other {
                            Some((h, _)) => format!("taken over by {h}"),
                            None => "the lease object was deleted".to_string(),
                        };
                        metrics::counter!("atlake_lease_renewals_total", "result" => "lost")
                            .increment(1);
                        tracing::error!(lake = lake.url(), %why, "lost the lake's writer lease; this writer stops");
                        fence.lose(why);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(lake = lake.url(), error = %e, "reading the writer lease failed");
                        wait = backoff.next_delay();
                    }
                }
            }
            Ok(Err(e)) => {
                metrics::counter!("atlake_lease_renewals_total", "result" => "error").increment(1);
                tracing::warn!(lake = lake.url(), error = %e, "renewing the writer lease failed; retrying (writes pause if it runs out)");
                wait = backoff.next_delay();
            }
            Err(_) => {
                metrics::counter!("atlake_lease_renewals_total", "result" => "timeout")
                    .increment(1);
                tracing::warn!(
                    lake = lake.url(),
                    "renewing the writer lease timed out; retrying (writes pause if it runs out)"
                );
                wait = backoff.next_delay();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_dead_pid_is_gone() {
        let me = me("test", None);
        assert!(!gone_from_this_machine(&me), "we are running");
        let mut dead = me.clone();
        dead.pid = u32::MAX - 7; // above pid_max: never a running process
        assert!(gone_from_this_machine(&dead));
        let mut reused = me.clone();
        reused.process_start = me.process_start.map(|s| s + 1);
        assert!(gone_from_this_machine(&reused), "same pid, later process");
        let mut elsewhere = dead.clone();
        elsewhere.machine = "another machine".into();
        assert!(
            !gone_from_this_machine(&elsewhere),
            "cannot see its processes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fence_expires_and_extends() {
        let f = Fence::new(Some(Instant::now() + Duration::from_secs(10)));
        assert_eq!(f.deadline(), Ok(Some(Duration::from_secs(10))));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(f.deadline(), Err(FenceError::Expired));
        f.extend(Instant::now() + Duration::from_secs(5));
        assert_eq!(f.deadline(), Ok(Some(Duration::from_secs(5))));
        f.lose("taken".into());
        assert_eq!(f.deadline(), Err(FenceError::Lost("taken".into())));
        assert_eq!(f.lost().await, "taken");
        assert_eq!(Fence::open().deadline(), Ok(None));
    }
}
