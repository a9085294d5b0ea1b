//! Configuration: one TOML file (`config/atlake.toml` by default), `ATLAKE_*` environment
//! overrides, then command-line flags. Unknown keys are errors; sizes and durations carry their
//! units (`"5m"`, `"256MiB"`). Credentials never live here: S3 uses the standard `AWS_*`
//! environment.
//!
//! Every leaf `section.key` can be overridden by `ATLAKE_SECTION_KEY` (upper case, dots and
//! dashes as underscores), e.g. `ATLAKE_LAKE_URL=s3://bucket/prefix`,
//! `ATLAKE_FLUSH_MAX_AGE=30s`. Lists take comma-separated values.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::model::SourceKind;

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error(
        "cannot read config file {path}: {source} (create it, or pass --config with an existing file)"
    )]
    Read {
        /// the file
        path: String,
        /// why
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// the file
        path: String,
        /// toml's message
        message: String,
    },
    /// An environment override is invalid.
    #[error("invalid value in environment variable {var}: {message}")]
    Env {
        /// the variable
        var: String,
        /// why
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// the setting
        key: &'static str,
        /// why
        message: String,
    },
}

/// A duration written with its unit: `"500ms"`, `"30s"`, `"5m"`, `"2h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

/// A size written with its unit: `"512KiB"`, `"128MiB"`, `"1GiB"`, `"1000"` (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// Parses `"30s"`-style durations.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like \"30s\""))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        u => {
            return Err(format!(
                "unknown duration unit {u:?} in {s:?} (use ms, s, m, h, d)"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `"128MiB"`-style sizes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"128MiB\""))?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" | "K" => 1024.0,
        "MiB" | "M" => 1024.0 * 1024.0,
        "GiB" | "G" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown size unit {u:?} in {s:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is not a valid size"));
    }
    Ok(v as u64)
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(3_600_000) && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b.is_multiple_of(1 << 30) && b > 0 {
            write!(f, "{}GiB", b >> 30)
        } else if b.is_multiple_of(1 << 20) && b > 0 {
            write!(f, "{}MiB", b >> 20)
        } else if b.is_multiple_of(1 << 10) && b > 0 {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b}B")
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// `[source]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// `jetstream` or `firehose`.
    pub kind: SourceKind,
    /// Endpoint: a bare host (`wss://bsky.network`) or the full URL.
    pub url: String,
    /// Collections to keep (NSIDs or `prefix.*`); empty keeps all.
    pub collections: Vec<String>,
    /// DIDs to keep; empty keeps all.
    pub dids: Vec<String>,
    /// Where to start when the lake has no checkpoint for this source: a firehose seq or a
    /// Jetstream `time_us` (`0`: the whole replay window). Unset: the live tip.
    pub start_cursor: Option<i64>,
    /// Jetstream: ask for per-message zstd with the v1 dictionary.
    pub compress: bool,
    /// Jetstream: on reconnect, start this far before the last `time_us` (then deduplicate).
    pub rewind: HumanDuration,
    /// Firehose: check every CAR block's hash.
    pub verify_hashes: bool,
    /// Threads that decode messages (frames: CAR, hashes, records to JSON; lines: JSON), each
    /// taking batches in turn, their results put back in stream order. 0: for the firehose one
    /// per core (at most 4); Jetstream lines are decoded on the loop's thread, which measured
    /// faster (docs/performance.md).
    pub decode_threads: usize,
    /// Reconnect when nothing arrives for this long.
    pub read_timeout: HumanDuration,
    /// Send a WebSocket ping this often.
    pub ping_interval: HumanDuration,
    /// Largest WebSocket message accepted (the spec limit is 5 MB; larger frames are quarantined).
    pub max_message_size: ByteSize,
    /// First reconnect delay; doubles up to `backoff_max`, with jitter.
    pub backoff_initial: HumanDuration,
    /// Longest reconnect delay.
    pub backoff_max: HumanDuration,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            kind: SourceKind::Jetstream,
            url: "wss://jetstream2.us-east.bsky.network/subscribe".into(),
            collections: Vec::new(),
            dids: Vec::new(),
            start_cursor: None,
            compress: true,
            rewind: HumanDuration(Duration::from_secs(5)),
            verify_hashes: true,
            decode_threads: 0,
            read_timeout: HumanDuration(Duration::from_secs(60)),
            ping_interval: HumanDuration(Duration::from_secs(30)),
            max_message_size: ByteSize(32 << 20),
            backoff_initial: HumanDuration(Duration::from_millis(500)),
            backoff_max: HumanDuration(Duration::from_secs(60)),
        }
    }
}

/// `[lake]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LakeConfig {
    /// `./lake`, `file:///abs/path`, `s3://bucket/prefix` or `memory://`.
    pub url: String,
    /// S3: how long the writer lease lasts without renewal (renewed every third of it). A
    /// writer whose renewals fail stops writing half a lease after its last renewal; another
    /// writer with `--wait` takes over once the lease went unrenewed for 7/6 of it.
    pub lease_ttl: HumanDuration,
    /// Wait for the lake's writer lease when another writer holds it, instead of failing
    /// (the `--wait` flag).
    pub lease_wait: bool,
    /// Drop whole partitions whose hour ended longer ago than this (`"400d"`; off when unset),
    /// in a commit of the Delta log, checked by the writer at start and every hour.
    pub retention: Option<HumanDuration>,
    /// Delete the files a commit removed from a table (retention, compaction) once they have
    /// been out of it this long: a reader's snapshot from before the removal stays readable
    /// until then.
    pub vacuum_retention: HumanDuration,
    /// Delete the Delta log's commits and checkpoints older than this once a newer checkpoint
    /// covers them (Delta's `delta.logRetentionDuration`, 30 days by default): the tables can
    /// be read at any version from then on, not before.
    pub log_retention: HumanDuration,
}

impl Default for LakeConfig {
    fn default() -> Self {
        LakeConfig {
            url: "./lake".into(),
            lease_ttl: HumanDuration(Duration::from_secs(30)),
            lease_wait: false,
            retention: None,
            vacuum_retention: HumanDuration(Duration::from_secs(3600)),
            log_retention: HumanDuration(Duration::from_secs(30 * 24 * 3600)),
        }
    }
}

/// `[flush]`: the named flush policy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    /// Flush a partition when its oldest buffered row is this old.
    pub max_age: HumanDuration,
    /// Flush a partition when its buffer reaches this size.
    pub max_bytes: ByteSize,
    /// Flush a partition when it holds this many rows.
    pub max_rows: u64,
    /// Memory budget of the whole process for event data: buffered rows get 1/4 (the largest
    /// partitions flush first beyond that), buffered plus in-flight rows 5/16 (reading pauses
    /// beyond that), and the rest is for encoding, read-ahead and the allocator.
    pub memory_cap: ByteSize,
    /// Most partitions buffered at once; collections beyond share `_other`.
    pub max_open_partitions: usize,
    /// Flush an hour's partitions once the stream is this far past the hour's end.
    pub hour_close_grace: HumanDuration,
    /// Flush a partition whose oldest row is this many events behind the newest, so the
    /// checkpoint (and the replay after a crash) never lags far.
    pub max_checkpoint_lag: u64,
}

impl Default for FlushConfig {
    fn default() -> Self {
        FlushConfig {
            max_age: HumanDuration(Duration::from_secs(300)),
            max_bytes: ByteSize(128 << 20),
            max_rows: 2_000_000,
            memory_cap: ByteSize(256 << 20),
            max_open_partitions: 64,
            hour_close_grace: HumanDuration(Duration::from_secs(10)),
            max_checkpoint_lag: 2_000_000,
        }
    }
}

/// `[writer]`: Parquet settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WriterConfig {
    /// zstd level for Parquet pages.
    pub zstd_level: i32,
    /// Rows per row group.
    pub row_group_rows: usize,
    /// Target size of a data page before compression. Each page is compressed on its own, so
    /// bigger pages compress better: 4 MiB made the benchmark's Jetstream lake 2.7 % smaller
    /// than 1 MiB (docs/performance.md); pages also end at 20,000 rows.
    pub page_bytes: usize,
    /// Write a bloom filter on `did`.
    pub bloom_filter_did: bool,
    /// Flushes encoded at the same time.
    pub encoders: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            zstd_level: 3,
            row_group_rows: 64 * 1024,
            page_bytes: 4 << 20,
            bloom_filter_did: true,
            encoders: 1,
        }
    }
}

/// `[server]`: the SQL endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to bind; 127.0.0.1 unless told otherwise.
    pub listen: String,
    /// Bearer token required on every route but `/health` (or set `ATLAKE_SERVER_TOKEN`).
    pub token: Option<String>,
    /// Per-query timeout.
    pub query_timeout: HumanDuration,
    /// Memory pool for query execution (spills where DataFusion can).
    pub memory_limit: ByteSize,
    /// Most rows a result may have.
    pub max_result_rows: u64,
    /// Most bytes a result may have.
    pub max_result_bytes: ByteSize,
    /// Queries that run at once; more wait in the queue.
    pub max_concurrent_queries: usize,
    /// Queries that may wait for a slot; beyond this a query gets 503 at once.
    pub query_queue: usize,
    /// Directory where queries spill sorts and joins (empty: the system's temporary directory).
    pub spill_dir: String,
    /// Most bytes all queries together may spill to disk.
    pub spill_limit: ByteSize,
    /// Time a client has to send a request's header, counted from when the connection starts
    /// waiting for it (a new connection, or the end of the previous response).
    pub header_timeout: HumanDuration,
    /// Time a client has to send a request's body.
    pub body_timeout: HumanDuration,
    /// A connection on which nothing is read or written for this long is closed; must be longer
    /// than `query_timeout`.
    pub idle_timeout: HumanDuration,
    /// Most connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Address of the Postgres wire protocol front end (psql, DBeaver, Grafana, psycopg), for
    /// example `127.0.0.1:5432`; empty: off. Same tables, limits and token (as the password).
    pub pg_listen: String,
    /// PEM certificate chain offered to Postgres clients that ask for TLS (with `pg_tls_key`);
    /// empty: no TLS.
    pub pg_tls_cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `pg_tls_cert`.
    pub pg_tls_key: String,
    /// Address of the Arrow Flight SQL front end (ADBC, JDBC Flight SQL drivers), for example
    /// `127.0.0.1:50051`; empty: off. Same tables, limits and token (as a bearer header).
    pub flight_listen: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            token: None,
            query_timeout: HumanDuration(Duration::from_secs(30)),
            memory_limit: ByteSize(1 << 30),
            max_result_rows: 1_000_000,
            max_result_bytes: ByteSize(256 << 20),
            max_concurrent_queries: 4,
            query_queue: 16,
            spill_dir: String::new(),
            spill_limit: ByteSize(4 << 30),
            header_timeout: HumanDuration(Duration::from_secs(10)),
            body_timeout: HumanDuration(Duration::from_secs(30)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            max_connections: 256,
            pg_listen: String::new(),
            pg_tls_cert: String::new(),
            pg_tls_key: String::new(),
            flight_listen: String::new(),
        }
    }
}

/// `[shutdown]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGINT/SIGTERM: stop reading, flush, checkpoint, and exit within this time.
    pub deadline: HumanDuration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            deadline: HumanDuration(Duration::from_secs(10)),
        }
    }
}

/// `[backfill]`: history from the repositories (`atlake backfill`, and `atlake run` when
/// `enabled`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackfillConfig {
    /// `atlake run` backfills beside the live source.
    pub enabled: bool,
    /// Host that lists the repos (`com.atproto.sync.listRepos`): a relay, or a PDS for its own
    /// accounts.
    pub relay: String,
    /// PLC directory that resolves `did:plc` DIDs.
    pub plc: String,
    /// Only records of these collections (NSIDs); with a relay that serves
    /// `listReposByCollection`, only repos that hold them are fetched. Empty: everything.
    pub collections: Vec<String>,
    /// Repos fetched at once.
    pub concurrency: usize,
    /// Requests in flight per host.
    pub per_host: usize,
    /// Least time between two request starts on one host.
    pub min_interval: HumanDuration,
    /// Attempts per request (429, 5xx, timeouts).
    pub attempts: u32,
    /// Timeout of one request (a repo's body: the most time between two chunks).
    pub timeout: HumanDuration,
    /// Rows buffered before they are written (one file per partition per flush).
    pub buffer: ByteSize,
    /// Longest time rows stay buffered before a flush makes them (and the repos they finish)
    /// durable.
    pub flush_interval: HumanDuration,
    /// With a live source (`atlake run`): how long a repo whose live history has a gap (a
    /// `#sync`, or a commit that does not follow) waits before it is fetched again, so that one
    /// fetch covers the events of one change (an account migration sends several at once),
    /// and how long a failed fresh fetch waits before its next attempt. The live checkpoint
    /// stays before the gap until the fetch is committed.
    pub refetch_delay: HumanDuration,
    /// Rows of several flushes staged on local disk (Arrow IPC in `spill_dir`) before a commit
    /// writes them as one file per partition: history spreads over hundreds of (collection,
    /// month) partitions, so a flush alone makes small files. 0: every flush commits.
    pub stage: ByteSize,
    /// Blocks of one repo kept in memory; beyond this a repo spills to a temporary file.
    pub repo_memory: ByteSize,
    /// Largest repo fetched (bigger ones fail with `repo_too_large`).
    pub max_repo_size: ByteSize,
    /// Directory for spilled repos (empty: the system's temporary directory).
    pub spill_dir: String,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            enabled: false,
            relay: "https://bsky.network".into(),
            plc: "https://plc.directory".into(),
            collections: Vec::new(),
            concurrency: 32,
            per_host: 4,
            min_interval: HumanDuration(Duration::ZERO),
            attempts: 5,
            timeout: HumanDuration(Duration::from_secs(60)),
            buffer: ByteSize(24 << 20),
            flush_interval: HumanDuration(Duration::from_secs(30)),
            refetch_delay: HumanDuration(Duration::from_secs(1)),
            stage: ByteSize(512 << 20),
            repo_memory: ByteSize(4 << 20),
            max_repo_size: ByteSize(8 << 30),
            spill_dir: String::new(),
        }
    }
}

/// Checks an `http(s)://host[:port][/path]` URL.
pub fn validate_http_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty()
        || url
            .bytes()
            .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        || !host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'[' | b']' | b':'))
    {
        return Err(format!("{url:?} is not a valid http(s) URL"));
    }
    Ok(())
}

/// `[compaction]`: closed partitions rewritten into fewer, larger, sorted files by the
/// writer (the daemon, in the background) and by `atlake compact`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompactionConfig {
    /// The daemon compacts (`atlake compact` always does).
    pub enabled: bool,
    /// How often the daemon's pass runs (also the purge's check).
    pub interval: HumanDuration,
    /// An hour (or day) is closed, and compacted, this long after it ends.
    pub grace: HumanDuration,
    /// A collection whose closed day holds at most this much is merged into one file for the
    /// day (`hour` null), not one per hour.
    pub small_day: ByteSize,
    /// One rewrite reads at most this much; a bigger hour becomes files of about this size.
    /// On S3 the inputs of a rewrite are held in memory, so this bounds its memory too.
    pub max_input: ByteSize,
    /// zstd level of the big text columns (`record`, `raw`) in compacted files: compaction runs
    /// off the ingest path, so it can spend more time for fewer bytes than a flush.
    pub zstd_level: i32,
    /// Rows per row group in compacted files.
    pub row_group_rows: usize,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        CompactionConfig {
            enabled: true,
            interval: HumanDuration(Duration::from_secs(3600)),
            grace: HumanDuration(Duration::from_secs(3600)),
            small_day: ByteSize(64 << 20),
            max_input: ByteSize(1 << 30),
            zstd_level: 9,
            row_group_rows: 1 << 20,
        }
    }
}

/// `[privacy]`: what the lake keeps of data users deleted.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Remove the content (`cid`, `record`) of records that were later deleted, and every row
    /// of accounts that were deleted or taken down (their `#account` events and every delete
    /// event stay). Deleted data leaves the table within `purge_every` + `compaction.interval`
    /// and storage `lake.vacuum_retention` after that.
    pub purge_deleted: bool,
    /// How often the purge scan reads the key columns of every file.
    pub purge_every: HumanDuration,
    /// Memory for the deletion facts the purge and export apply (about 53 bytes a fact in
    /// memory); beyond it they are sorted to unnamed temporary files in `spill_dir`.
    pub facts_memory: ByteSize,
    /// Where the deletion facts spill (empty: the system's temporary directory).
    pub spill_dir: String,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            purge_deleted: true,
            purge_every: HumanDuration(Duration::from_secs(6 * 3600)),
            facts_memory: ByteSize(64 << 20),
            spill_dir: String::new(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where events come from.
    pub source: SourceConfig,
    /// Where the lake lives.
    pub lake: LakeConfig,
    /// When buffers become files.
    pub flush: FlushConfig,
    /// How files are written.
    pub writer: WriterConfig,
    /// The SQL endpoint.
    pub server: ServerConfig,
    /// Shutdown behaviour.
    pub shutdown: ShutdownConfig,
    /// History from the repositories.
    pub backfill: BackfillConfig,
    /// Compaction of closed partitions.
    pub compaction: CompactionConfig,
    /// Purge of deleted data.
    pub privacy: PrivacyConfig,
}

/// The default config file, used when it exists and no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "config/atlake.toml";

impl Config {
    /// Loads `path` (or the defaults when `None`), then applies `ATLAKE_*` overrides from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (text, name) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "(defaults)".to_string()),
        };
        let mut value: toml::Value = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: name.clone(),
            message: e.to_string(),
        })?;
        // validate the file on its own first, so errors name the file
        let _: Config =
            value
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: name.clone(),
                    message: e.to_string(),
                })?;
        let defaults =
            toml::Value::try_from(Config::default()).map_err(|e| ConfigError::Parse {
                path: name.clone(),
                message: e.to_string(),
            })?;
        apply_env(&mut value, &defaults, env)?;
        let cfg: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: name,
                message: e.to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Finds the config file: an explicit path, else `config/atlake.toml` if it exists.
    pub fn resolve_path(explicit: Option<&Path>) -> Option<PathBuf> {
        match explicit {
            Some(p) => Some(p.to_path_buf()),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_PATH);
                p.exists().then_some(p)
            }
        }
    }

    /// Checks ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        if let Err(m) = crate::syntax::validate_url(&self.source.url) {
            return bad("source.url", &m);
        }
        if !self.source.kind.is_live() {
            return bad(
                "source.kind",
                "must be firehose or jetstream (a backfill is configured in [backfill])",
            );
        }
        if self.source.max_message_size.0 < 5 << 20 {
            return bad(
                "source.max_message_size",
                "must be at least 5MiB (the protocol's message limit)",
            );
        }
        for c in &self.source.collections {
            if !crate::syntax::is_nsid_pattern(c) {
                return bad(
                    "source.collections",
                    &format!("{c:?} is not an NSID or prefix.* pattern"),
                );
            }
        }
        for d in &self.source.dids {
            if !crate::syntax::is_did(d) {
                return bad("source.dids", &format!("{d:?} is not a DID"));
            }
        }
        let b = &self.backfill;
        if let Err(m) = validate_http_url(&b.relay) {
            return bad("backfill.relay", &m);
        }
        if let Err(m) = validate_http_url(&b.plc) {
            return bad("backfill.plc", &m);
        }
        for c in &b.collections {
            if !crate::syntax::is_nsid(c) {
                return bad("backfill.collections", &format!("{c:?} is not an NSID"));
            }
        }
        if b.concurrency == 0 || b.concurrency > 4096 {
            return bad("backfill.concurrency", "must be 1 to 4096");
        }
        if b.per_host == 0 {
            return bad("backfill.per_host", "must be at least 1");
        }
        if b.attempts == 0 {
            return bad("backfill.attempts", "must be at least 1");
        }
        if b.stage.0 != 0 && b.stage.0 < b.buffer.0 {
            return bad("backfill.stage", "must be 0 or at least backfill.buffer");
        }
        if b.buffer.0 < 1 << 20 {
            return bad("backfill.buffer", "must be at least 1MiB");
        }
        if b.repo_memory.0 < 64 << 10 {
            return bad("backfill.repo_memory", "must be at least 64KiB");
        }
        if b.timeout.0 < Duration::from_millis(100) {
            return bad("backfill.timeout", "must be at least 100ms");
        }
        if self
            .lake
            .retention
            .as_ref()
            .is_some_and(|r| r.0 < Duration::from_secs(3600))
        {
            return bad(
                "lake.retention",
                "must be at least 1h (whole hours are dropped)",
            );
        }
        let c = &self.compaction;
        if c.interval.0 < Duration::from_secs(1) {
            return bad("compaction.interval", "must be at least 1s");
        }
        if c.max_input.0 < 1 << 20 {
            return bad("compaction.max_input", "must be at least 1MiB");
        }
        if !(1..=22).contains(&c.zstd_level) {
            return bad("compaction.zstd_level", "must be 1..=22");
        }
        if c.row_group_rows == 0 {
            return bad("compaction.row_group_rows", "must be positive");
        }
        if self.privacy.purge_deleted
            && self.privacy.purge_every.0 + c.interval.0 + self.lake.vacuum_retention.0
                > Duration::from_secs(24 * 3600)
        {
            return bad(
                "privacy.purge_every",
                "with compaction.interval and lake.vacuum_retention must add up to at most 24h (deleted data is gone within that)",
            );
        }
        if self.lake.vacuum_retention.0 <= self.server.query_timeout.0 {
            return bad(
                "lake.vacuum_retention",
                "must be longer than server.query_timeout (a query's snapshot must stay readable)",
            );
        }
        if self.lake.lease_ttl.0 < Duration::from_secs(1) {
            return bad("lake.lease_ttl", "must be at least 1s");
        }
        if self.flush.max_rows == 0 {
            return bad("flush.max_rows", "must be positive");
        }
        if self.flush.max_open_partitions < 16 {
            return bad(
                "flush.max_open_partitions",
                "must be at least 16 (the core collections always have their own)",
            );
        }
        if self.privacy.facts_memory.0 < 64 << 10 {
            return bad("privacy.facts_memory", "must be at least 64KiB");
        }
        if self.flush.memory_cap.0 < 1 << 20 {
            return bad("flush.memory_cap", "must be at least 1MiB");
        }
        if !(1..=22).contains(&self.writer.zstd_level) {
            return bad("writer.zstd_level", "must be 1..=22");
        }
        if self.writer.row_group_rows == 0 {
            return bad("writer.row_group_rows", "must be positive");
        }
        let sv = &self.server;
        if sv.max_concurrent_queries == 0 {
            return bad("server.max_concurrent_queries", "must be at least 1");
        }
        if sv.max_connections == 0 {
            return bad("server.max_connections", "must be at least 1");
        }
        for (key, d) in [
            ("server.query_timeout", sv.query_timeout.0),
            ("server.header_timeout", sv.header_timeout.0),
            ("server.body_timeout", sv.body_timeout.0),
        ] {
            if d < Duration::from_millis(100) {
                return bad(key, "must be at least 100ms");
            }
        }
        if sv.idle_timeout.0 <= sv.query_timeout.0 {
            return bad(
                "server.idle_timeout",
                "must be longer than server.query_timeout (a query's connection is quiet while it runs)",
            );
        }
        if sv.pg_tls_cert.is_empty() != sv.pg_tls_key.is_empty() {
            return bad(
                "server.pg_tls_cert",
                "server.pg_tls_cert and server.pg_tls_key go together (both set, or neither)",
            );
        }
        Ok(())
    }

    /// The configuration as TOML with secrets redacted (what `check-config` prints).
    pub fn to_toml_redacted(&self) -> Result<String, ConfigError> {
        let mut c = self.clone();
        if c.server.token.is_some() {
            c.server.token = Some("<redacted>".into());
        }
        c.to_toml()
    }

    /// The configuration as TOML (what `check-config` prints).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(self).map_err(|e| ConfigError::Parse {
            path: "(printing)".into(),
            message: e.to_string(),
        })
    }
}

fn apply_env(
    value: &mut toml::Value,
    defaults: &toml::Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("ATLAKE_"))
        .collect();
    let Some(sections) = defaults.as_table() else {
        return Ok(());
    };
    for (section, fields) in sections {
        let Some(fields) = fields.as_table() else {
            continue;
        };
        let keys: Vec<&String> = fields.keys().collect();
        // optional settings are absent from the defaults
        let extra: Vec<String> = match section.as_str() {
            "server" => vec!["token".to_string()],
            "lake" => vec!["retention".to_string()],
            "source" => vec!["start_cursor".to_string()],
            _ => vec![],
        };
        for key in keys.into_iter().chain(extra.iter()) {
            let var = format!(
                "ATLAKE_{}_{}",
                section.to_uppercase(),
                key.to_uppercase().replace(['.', '-'], "_")
            );
            let Some((_, raw)) = env.iter().find(|(k, _)| *k == var) else {
                continue;
            };
            let template = fields.get(key.as_str());
            let integer =
                matches!(template, Some(toml::Value::Integer(_))) || key == "start_cursor";
            let v = match template {
                _ if integer => raw
                    .trim()
                    .replace('_', "")
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|e| ConfigError::Env {
                        var: var.clone(),
                        message: e.to_string(),
                    })?,
                Some(toml::Value::Boolean(_)) => match raw.trim() {
                    "1" | "true" | "yes" | "on" => toml::Value::Boolean(true),
                    "0" | "false" | "no" | "off" => toml::Value::Boolean(false),
                    other => {
                        return Err(ConfigError::Env {
                            var,
                            message: format!("{other:?} is not a boolean"),
                        });
                    }
                },
                Some(toml::Value::Array(_)) => toml::Value::Array(
                    raw.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| toml::Value::String(s.to_string()))
                        .collect(),
                ),
                _ => toml::Value::String(raw.clone()),
            };
            // a value that does not parse is the variable's fault, not the config file's
            let mut probe = defaults.clone();
            if let Some(t) = probe
                .get_mut(section.as_str())
                .and_then(toml::Value::as_table_mut)
            {
                t.insert(key.clone(), v.clone());
            }
            if let Err(e) = probe.try_into::<Config>() {
                return Err(ConfigError::Env {
                    var,
                    message: format!("{raw:?}: {}", e.message()),
                });
            }
            let table = value
                .as_table_mut()
                .ok_or_else(|| ConfigError::Env {
                    var: var.clone(),
                    message: "config root is not a table".into(),
                })?
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            if let Some(t) = table.as_table_mut() {
                t.insert(key.clone(), v);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn check_config_prints_the_token_redacted_and_idle_must_outlast_queries() {
        let mut c = super::Config::default();
        c.server.token = Some("s3cret-token".into());
        let t = c.to_toml_redacted().unwrap();
        assert!(
            !t.contains("s3cret-token") && t.contains("<redacted>"),
            "{t}"
        );
        c.server.idle_timeout = c.server.query_timeout;
        assert!(c.validate().is_err());
    }

    /// A vacuum that could delete files under a running query, and a purge that could take
    /// longer than a day, are refused.
    #[test]
    fn the_postgres_certificate_and_key_go_together() {
        let mut c = super::Config::default();
        c.server.pg_tls_cert = "cert.pem".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("server.pg_tls_cert"), "{e}");
        c.server.pg_tls_key = "key.pem".into();
        assert!(c.validate().is_ok());
    }

    #[test]
    fn vacuum_outlasts_queries_and_the_purge_bound_is_a_day() {
        let mut c = super::Config::default();
        assert!(c.validate().is_ok());
        c.lake.vacuum_retention = c.server.query_timeout;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("lake.vacuum_retention"), "{e}");
        let mut c = super::Config::default();
        c.privacy.purge_every.0 = std::time::Duration::from_secs(23 * 3600);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("privacy.purge_every"), "{e}");
        c.privacy.purge_deleted = false;
        assert!(c.validate().is_ok(), "no bound without a purge");
    }

    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_size("128MiB").unwrap(), 128 << 20);
        assert_eq!(parse_size("1_000").unwrap(), 1000);
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_size("lots").is_err());
        assert_eq!(HumanDuration(Duration::from_secs(300)).to_string(), "5m");
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
    }

    #[test]
    fn env_overrides_and_unknown_keys() {
        let cfg = Config::load(
            None,
            vec![
                ("ATLAKE_LAKE_URL".to_string(), "s3://b/p".to_string()),
                ("ATLAKE_FLUSH_MAX_AGE".to_string(), "30s".to_string()),
                (
                    "ATLAKE_SOURCE_COLLECTIONS".to_string(),
                    "app.bsky.feed.post, app.bsky.graph.*".to_string(),
                ),
                ("ATLAKE_SOURCE_COMPRESS".to_string(), "false".to_string()),
                ("ATLAKE_SERVER_TOKEN".to_string(), "sekrit".to_string()),
                ("ATLAKE_FLUSH_MAX_ROWS".to_string(), "10_000".to_string()),
            ],
        )
        .unwrap();
        assert_eq!(cfg.lake.url, "s3://b/p");
        assert_eq!(cfg.flush.max_age.0, Duration::from_secs(30));
        assert_eq!(
            cfg.source.collections,
            vec!["app.bsky.feed.post", "app.bsky.graph.*"]
        );
        assert!(!cfg.source.compress);
        assert_eq!(cfg.server.token.as_deref(), Some("sekrit"));
        assert_eq!(cfg.flush.max_rows, 10_000);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, "[lake]\nurl = \"x\"\nbogus = 1\n").unwrap();
        let err = Config::load(Some(&p), Vec::new()).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        // a bad value from the environment is the variable's error, not the file's
        for (var, raw) in [
            ("ATLAKE_FLUSH_MAX_AGE", "thirty"),
            ("ATLAKE_FLUSH_MAX_BYTES", "lots"),
            ("ATLAKE_SERVER_QUERY_TIMEOUT", "-1s"),
        ] {
            let err = Config::load(None, vec![(var.to_string(), raw.to_string())])
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!(
                    "invalid value in environment variable {var}: \"{raw}\""
                )),
                "{err}"
            );
        }
    }
}
