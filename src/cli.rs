//! The command line: argument parsing and dispatch to the library's entry points.
//!
//! `main` stays thin; every command is a function here that calls into the library.

use crate::config::{Config, SourceKind};
use crate::daemon::Daemon;
use crate::ingest::{self, Input};
use crate::simulate::server::{Faults, SimConfig};
use crate::simulate::traffic::TrafficConfig;
use crate::source::capture::{CaptureFormat, CaptureWriter, Compression};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// atlake: an analytics sink for the AT Protocol firehose and Jetstream.
///
/// Reads the relay firehose or Jetstream, writes every event once into a Parquet lake
/// partitioned by collection and hour (local disk or S3), and answers SQL over it.
#[derive(Debug, Parser)]
#[command(
    name = "atlake",
    version,
    about,
    long_about,
    after_help = "Run `atlake <command> --help` for examples."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Source, lake and config flags shared by the daemon commands.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Config file (default: config/atlake.toml when it exists).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the lake lives: a path, file:///abs, s3://bucket/prefix or memory://.
    #[arg(long, value_name = "PATH_OR_URL")]
    pub lake: Option<String>,
}

/// Flags of the commands that write the lake.
#[derive(Debug, Clone, Args)]
pub struct WriterArgs {
    /// When another process is writing this lake, wait for it to stop (or, on S3, for its lease
    /// to lapse) instead of failing.
    #[arg(long)]
    pub wait: bool,
}

/// Where `run`, `serve` and `demo` serve SQL.
#[derive(Debug, Clone, Args)]
pub struct FrontEndArgs {
    /// Address for the SQL endpoint and the web console (default 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Also serve the Postgres wire protocol here (psql, DBeaver, Grafana), e.g.
    /// 127.0.0.1:5432 (config: server.pg_listen).
    #[arg(long, value_name = "ADDR")]
    pub pg_listen: Option<String>,
    /// Also serve Arrow Flight SQL here (ADBC, JDBC Flight SQL drivers), e.g.
    /// 127.0.0.1:50051 (config: server.flight_listen).
    #[arg(long, value_name = "ADDR")]
    pub flight_listen: Option<String>,
}

impl FrontEndArgs {
    /// The flags over the configuration, checked again.
    fn apply(self, cfg: &mut Config) -> anyhow::Result<()> {
        if let Some(l) = self.listen {
            cfg.server.listen = l;
        }
        if let Some(l) = self.pg_listen {
            cfg.server.pg_listen = l;
        }
        if let Some(l) = self.flight_listen {
            cfg.server.flight_listen = l;
        }
        cfg.validate()?;
        Ok(())
    }
}

/// Source flags.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// Which stream to read.
    #[arg(long, value_enum)]
    pub source: Option<SourceKind>,
    /// Endpoint: a bare host (wss://bsky.network) or the full URL.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Keep only these collections (NSIDs or prefix.*), comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "NSID")]
    pub collections: Vec<String>,
    /// Keep only these DIDs, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "DID")]
    pub dids: Vec<String>,
    /// When the lake has no checkpoint yet, start here (firehose seq or Jetstream time_us;
    /// 0 replays the source's whole window) instead of the live tip.
    #[arg(long, value_name = "CURSOR")]
    pub start_cursor: Option<i64>,
}

/// `--source` takes the model's one source-kind type.
impl ValueEnum for SourceKind {
    fn value_variants<'a>() -> &'a [Self] {
        &[SourceKind::Jetstream, SourceKind::Firehose]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(match self {
            SourceKind::Firehose => clap::builder::PossibleValue::new("firehose")
                .help("The relay firehose (com.atproto.sync.subscribeRepos)"),
            SourceKind::Jetstream => {
                clap::builder::PossibleValue::new("jetstream").help("Jetstream /subscribe")
            }
            // not offered (value_variants): a backfill is its own command
            SourceKind::Repo => return None,
        })
    }
}

/// Capture formats for `simulate --capture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Concatenated raw frames.
    Frames,
    /// [u32 LE length][frame] records.
    LengthPrefixed,
    /// Jetstream JSON lines.
    Jetstream,
}

/// Compression for `simulate --capture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressArg {
    /// Plain.
    None,
    /// zstd.
    Zstd,
    /// gzip.
    Gzip,
}

/// Output formats of `query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueryFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header.
    Csv,
    /// JSON lines.
    Json,
}

/// `atlake export --format`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// Parquet (zstd).
    Parquet,
    /// JSON lines.
    Ndjson,
    /// CSV with a header.
    Csv,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ingest and serve SQL in one process: the main daemon.
    ///
    /// Connects to the configured source (default: Jetstream, jetstream2.us-east), writes the
    /// lake (default ./lake) and serves SQL on 127.0.0.1:8080. Queries see committed files and
    /// the rows still buffered, within a second of their arrival. SIGINT/SIGTERM flushes,
    /// checkpoints and exits.
    #[command(
        after_help = "Examples:\n  atlake run\n  atlake run --source firehose --url wss://bsky.network --lake s3://my-bucket/atlake\n  atlake run --collections app.bsky.feed.post --listen 127.0.0.1:9000\n  curl -s 127.0.0.1:8080/sql --data 'SELECT collection, count(*) FROM events GROUP BY 1 ORDER BY 2 DESC'"
    )]
    Run {
        /// Config and lake.
        #[command(flatten)]
        common: CommonArgs,
        /// Source.
        #[command(flatten)]
        source: SourceArgs,
        /// Writing.
        #[command(flatten)]
        writer: WriterArgs,
        /// Where SQL is served.
        #[command(flatten)]
        fronts: FrontEndArgs,
    },
    /// See atlake work without a network: simulated traffic, ingest, SQL and the web console
    /// in one process.
    ///
    /// Starts the simulator in this process on a loopback port (Jetstream traffic at --rate
    /// messages/s whose stream time starts now), ingests it into --lake (default ./lake-demo,
    /// flushed every 30 s) and serves SQL and the web console (default
    /// http://127.0.0.1:8080/). Needs no internet. Ctrl-C flushes and stops; a second run adds
    /// to the same lake.
    #[command(
        after_help = "Examples:\n  atlake demo\n  atlake demo --listen 127.0.0.1:9000 --lake /tmp/lake-demo\n  atlake demo --source firehose --pg-listen 127.0.0.1:5432   # then: psql -h 127.0.0.1 -p 5432 -c 'SELECT count(*) FROM events'"
    )]
    Demo {
        /// Where the lake lives.
        #[arg(long, value_name = "PATH_OR_URL", default_value = "./lake-demo")]
        lake: String,
        /// Which simulated stream to read.
        #[arg(long, value_enum, default_value = "jetstream")]
        source: SourceKind,
        /// Messages per second the simulator sends.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Where SQL is served.
        #[command(flatten)]
        fronts: FrontEndArgs,
        /// Faults for the simulator to inject, as for `simulate` (e.g. bad-hash=300,drop=5000),
        /// to watch the quarantine and reconnects at work.
        #[arg(long, default_value = "", value_name = "FAULTS")]
        faults: String,
    },
    /// Serve SQL over a lake written by another process, on disk or S3.
    #[command(
        after_help = "Examples:\n  atlake serve --lake ./lake\n  atlake serve --lake s3://my-bucket/atlake --listen 0.0.0.0:8080   # set ATLAKE_SERVER_TOKEN first\n  atlake serve --lake ./lake --pg-listen 127.0.0.1:5432 && psql -h 127.0.0.1 -p 5432 -c '\\dt'\n  atlake serve --lake ./lake --flight-listen 127.0.0.1:50051   # ADBC: grpc://127.0.0.1:50051"
    )]
    Serve {
        /// Config and lake.
        #[command(flatten)]
        common: CommonArgs,
        /// Where SQL is served.
        #[command(flatten)]
        fronts: FrontEndArgs,
    },
    /// Run one SQL query over a lake and print the result.
    #[command(
        after_help = "Examples:\n  atlake query --lake ./lake \"SELECT collection, count(*) AS n FROM events GROUP BY 1 ORDER BY n DESC LIMIT 10\"\n  atlake query --lake ./lake --format csv \"SELECT text FROM posts WHERE 'en' = ANY(langs) LIMIT 5\"\n  atlake query --lake ./lake --file queries/q1_top_event_types.sql"
    )]
    Query {
        /// Config and lake.
        #[command(flatten)]
        common: CommonArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: QueryFormat,
        /// Read the SQL from this file (e.g. one of queries/*.sql).
        #[arg(long, short, value_name = "FILE", conflicts_with_all = ["sql", "sql_option"])]
        file: Option<PathBuf>,
        /// The SQL, as an option (the same as the positional SQL).
        #[arg(
            long = "sql",
            id = "sql_option",
            value_name = "SQL",
            allow_hyphen_values = true,
            conflicts_with = "sql"
        )]
        sql_option: Option<String>,
        /// The SQL.
        #[arg(allow_hyphen_values = true, required_unless_present_any = ["file", "sql_option"])]
        sql: Option<String>,
    },
    /// Ingest a live stream or a capture file into the lake.
    ///
    /// With --input, reads the capture to its end and exits. Otherwise connects to the
    /// configured source and runs until SIGINT/SIGTERM, then flushes, checkpoints and exits.
    /// A restart resumes from the checkpoint in the lake, exactly once.
    #[command(
        after_help = "Examples:\n  atlake ingest --source jetstream --url wss://jetstream2.us-east.bsky.network --lake ./lake\n  atlake ingest --source firehose --url wss://bsky.network --lake s3://my-bucket/atlake\n  atlake ingest --input capture.frames.zst --lake ./lake\n  atlake ingest --collections app.bsky.feed.post --lake ./posts"
    )]
    Ingest {
        /// Config and lake.
        #[command(flatten)]
        common: CommonArgs,
        /// Source.
        #[command(flatten)]
        source: SourceArgs,
        /// Writing.
        #[command(flatten)]
        writer: WriterArgs,
        /// A capture file to ingest (frames, length-prefixed frames or Jetstream NDJSON; zstd/gzip ok).
        #[arg(long, short, value_name = "FILE")]
        input: Option<PathBuf>,
    },
    /// Backfill the network's history from the repositories into the lake, then exit.
    ///
    /// Lists the repos of a relay (or of a PDS: --relay takes its URL too), or takes
    /// --dids/--dids-file, resolves each DID to its PDS, fetches its repo (getRepo), verifies
    /// every block's hash and the MST, and writes one row per record. Progress is durable in
    /// the lake: a restart skips finished repos, exactly once.
    #[command(
        after_help = "Examples:\n  atlake backfill --relay https://bsky.network --lake ./lake\n  atlake backfill --relay https://bsky.network --collections app.bsky.feed.post --lake s3://my-bucket/atlake\n  atlake backfill --dids did:plc:z72i7hdynmk6r22z27h6tvur --relay https://bsky.network --lake ./lake\n  atlake backfill --relay https://my-pds.example --plc https://plc.directory --lake ./lake"
    )]
    Backfill {
        /// Config and lake.
        #[command(flatten)]
        common: CommonArgs,
        /// Writing.
        #[command(flatten)]
        writer: WriterArgs,
        /// Host that lists repos (a relay, or a PDS for its own accounts).
        #[arg(long, value_name = "URL")]
        relay: Option<String>,
        /// PLC directory for did:plc (default https://plc.directory).
        #[arg(long, value_name = "URL")]
        plc: Option<String>,
        /// Only records of these collections (NSIDs), comma-separated.
        #[arg(long, value_delimiter = ',', value_name = "NSID")]
        collections: Vec<String>,
        /// Only these repos, comma-separated (instead of listing the relay's).
        #[arg(
            long,
            value_delimiter = ',',
            value_name = "DID",
            conflicts_with = "dids_file"
        )]
        dids: Vec<String>,
        /// Only the repos in this file, one DID a line.
        #[arg(long, value_name = "FILE")]
        dids_file: Option<PathBuf>,
        /// Repos fetched at once (default 32).
        #[arg(long, value_name = "N")]
        concurrency: Option<usize>,
    },
    /// Compact the lake's closed partitions, purge deleted data, apply retention and vacuum,
    /// then exit.
    ///
    /// Takes the writer lease (a running daemon compacts on its own: see [compaction]). Each
    /// closed hour of a collection becomes one sorted file; a long-tail collection's closed day
    /// becomes one file; deleted records lose their content and deleted accounts their rows.
    /// Each rewrite is one commit of the Delta log: a kill at any moment loses and doubles
    /// nothing. Replaced files are deleted by vacuum once out of the table for
    /// lake.vacuum_retention.
    #[command(
        after_help = "Examples:\n  atlake compact --lake ./lake\n  atlake compact --lake s3://my-bucket/atlake --purge\n  atlake compact --lake ./lake --open   # also the current hour and day (no writer running)"
    )]
    Compact {
        /// Config and lake.
        #[command(flatten)]
        common: CommonArgs,
        /// Writing.
        #[command(flatten)]
        writer: WriterArgs,
        /// Also compact partitions that are not closed yet (the current hour and day).
        #[arg(long)]
        open: bool,
        /// Run the purge scan now, whenever the last one ran.
        #[arg(long)]
        purge: bool,
    },
    /// Export a slice of the lake as files another tool can take away, then exit.
    ///
    /// Reads the committed snapshot (no lease: a running daemon goes on), file by file, and
    /// writes DEST in the lake's layout (one output file per input file), as Parquet, NDJSON or
    /// CSV. Deleted records and the rows of deleted accounts are left out whatever the lake's
    /// purge has done so far. With --current, only records that still exist
    /// (current.records).
    #[command(
        after_help = "Examples:\n  atlake export --lake ./lake --to ./posts-2026 --collections app.bsky.feed.post --since 2026-01-01\n  atlake export --lake s3://my-bucket/atlake --to s3://other-bucket/export --format ndjson --since 2026-11-01T00:00:00Z --until 2026-12-01\n  atlake export --lake ./lake --to ./current --current --format csv"
    )]
    Export {
        /// Config and lake.
        #[command(flatten)]
        common: CommonArgs,
        /// Destination: a local directory or s3://bucket/prefix.
        #[arg(long, value_name = "DEST")]
        to: String,
        /// Only these collections (NSIDs), comma-separated.
        #[arg(long, value_delimiter = ',', value_name = "NSID")]
        collections: Vec<String>,
        /// Only rows at or after this time (2026-01-01 or 2026-01-01T12:00:00Z).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only rows before this time.
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Only records that still exist (current.records), instead of every event.
        #[arg(long)]
        current: bool,
        /// With --current: rows per output file.
        #[arg(long, value_name = "N", default_value_t = crate::export::CURRENT_FILE_ROWS)]
        rows_per_file: u64,
        /// Output format.
        #[arg(long, value_enum, default_value = "parquet")]
        format: ExportFormat,
    },
    /// Serve synthetic traffic as a firehose and a Jetstream endpoint, or write it as a capture.
    ///
    /// The same seed always gives the same bytes. The server speaks
    /// /xrpc/com.atproto.sync.subscribeRepos and /subscribe on one port, with cursor replay.
    #[command(
        after_help = "Examples:\n  atlake simulate --listen 127.0.0.1:6008 --rate 500\n  atlake simulate --messages 100000 --capture sim.frames.zst --format frames --compress zstd --truth truth.json\n  atlake simulate --faults drop=1000,garbage=500,bad-hash=700"
    )]
    Simulate {
        /// Address to serve on.
        #[arg(long, default_value = "127.0.0.1:6008", value_name = "ADDR")]
        listen: String,
        /// Messages to generate (0: unlimited).
        #[arg(long, default_value_t = 0)]
        messages: u64,
        /// Messages per second (0: as fast as clients read).
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Accounts.
        #[arg(long, default_value_t = 5000)]
        accounts: u64,
        /// Mean stream-time step between messages, µs (frame times have millisecond precision:
        /// serving at a rate, the clock keeps its microseconds and several frames may share a
        /// millisecond; a capture's steps are whole milliseconds, at least one). Default: when serving at a rate, 1,000,000 / rate, so stream
        /// time keeps pace with the clock; otherwise 2,500.
        #[arg(long, value_name = "US")]
        step_us: Option<i64>,
        /// Stream time of the first message: `now`, or a time like 2026-07-04T14:00:00Z.
        /// Default: `now` when serving (a healthy demo shows a lag near zero); captures start at
        /// 2026-07-04T14:00:00Z so that the same seed always gives the same bytes.
        #[arg(long, value_name = "TIME")]
        start: Option<String>,
        /// Faults: drop=N, garbage=N, oversized=N, bad-hash=N, truncated-car=N, big-record=N,
        /// backwards=N, too-slow=N, silent=N (comma-separated).
        #[arg(long, default_value = "")]
        faults: String,
        /// Write the traffic to this capture file instead of serving it.
        #[arg(long, value_name = "FILE")]
        capture: Option<PathBuf>,
        /// Capture format.
        #[arg(long, value_enum, default_value = "frames")]
        format: FormatArg,
        /// Capture compression.
        #[arg(long, value_enum, default_value = "none")]
        compress: CompressArg,
        /// Write the ground truth (counts per kind/collection/operation) as JSON.
        #[arg(long, value_name = "FILE")]
        truth: Option<PathBuf>,
        /// Serve the repository sync endpoints instead (listRepos, listReposByCollection,
        /// getRepo on several PDS hosts, a PLC stand-in at /plc), for `atlake backfill`.
        #[arg(long)]
        sync: bool,
        /// With --sync: mean records per repo.
        #[arg(long, default_value_t = 60, value_name = "N")]
        records: u64,
        /// With --sync: PDS hosts.
        #[arg(long, default_value_t = 3, value_name = "N")]
        hosts: usize,
        /// With --sync: make account 0's repo this many records.
        #[arg(long, value_name = "N")]
        big_repo: Option<u64>,
    },
    /// Write the Jetstream v1 JSON lines for a capture file to stdout.
    ///
    /// Reads raw firehose frames (a CBOR sequence, as `websocat --binary` saves them),
    /// length-prefixed frames ([u32 LE length][frame]) or Jetstream NDJSON, optionally
    /// compressed with zstd or gzip; the format is detected. Firehose commits give one line per
    /// op with `time_us` taken from the frame's `time`. Input that cannot be converted is
    /// counted by reason on stderr.
    #[command(after_help = "Example:\n  atlake convert --input capture.frames.zst > events.jsonl")]
    Convert {
        /// The capture file.
        #[arg(long, short, value_name = "FILE")]
        input: PathBuf,
    },
    /// Load the configuration exactly as `run` would, check it, and print it.
    #[command(
        after_help = "Examples:\n  atlake check-config\n  atlake check-config --config config/firehose-s3.toml"
    )]
    CheckConfig {
        /// Config and lake.
        #[command(flatten)]
        common: CommonArgs,
        /// Source.
        #[command(flatten)]
        source: SourceArgs,
    },
}

/// Parses arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // query planning walks expression trees recursively; give it room beyond the 2 MiB default
        .thread_stack_size(8 << 20)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, leaving out a cause its parent already quoted.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Loads configuration: file, `ATLAKE_*` environment, then flags.
pub fn load_config(common: &CommonArgs, source: &SourceArgs) -> anyhow::Result<Config> {
    let path = Config::resolve_path(common.config.as_deref());
    let mut cfg = Config::load(path.as_deref(), std::env::vars())?;
    if let Some(l) = &common.lake {
        cfg.lake.url = l.clone();
    }
    if let Some(s) = source.source {
        cfg.source.kind = s;
        // a source given without a URL uses that source's public default
        if source.url.is_none() && path.is_none() && std::env::var("ATLAKE_SOURCE_URL").is_err() {
            cfg.source.url = match s {
                SourceKind::Firehose => "wss://bsky.network".into(),
                SourceKind::Jetstream => "wss://jetstream2.us-east.bsky.network/subscribe".into(),
                SourceKind::Repo => {
                    anyhow::bail!("--source repo is not a live source; use `atlake backfill`")
                }
            };
        }
    }
    if let Some(u) = &source.url {
        cfg.source.url = u.clone();
    }
    if !source.collections.is_empty() {
        cfg.source.collections = source.collections.clone();
    }
    if !source.dids.is_empty() {
        cfg.source.dids = source.dids.clone();
    }
    if source.start_cursor.is_some() {
        cfg.source.start_cursor = source.start_cursor;
    }
    cfg.validate()?;
    crate::sink::store::LakeLocation::parse(&cfg.lake.url)?;
    Ok(cfg)
}

/// Runs one parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Convert { input } => convert(&input),
        Command::CheckConfig { common, source } => {
            let cfg = load_config(&common, &source)?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "# configuration is valid")?;
            write!(out, "{}", cfg.to_toml_redacted()?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            common,
            source,
            writer,
            fronts,
        } => {
            let mut cfg = load_config(&common, &source)?;
            fronts.apply(&mut cfg)?;
            cfg.lake.lease_wait |= writer.wait;
            run_cmd(cfg).await
        }
        Command::Demo {
            lake,
            source,
            rate,
            fronts,
            faults,
        } => {
            let faults = Faults::parse(&faults).map_err(anyhow::Error::msg)?;
            if !(rate > 0.0 && rate.is_finite()) {
                bail!("--rate must be a positive number of messages per second");
            }
            let mut cfg = Config::load(None, std::env::vars())?;
            cfg.lake.url = lake;
            if std::env::var_os("ATLAKE_FLUSH_MAX_AGE").is_none() {
                cfg.flush.max_age = crate::config::HumanDuration(Duration::from_secs(30));
            }
            fronts.apply(&mut cfg)?;
            demo_cmd(cfg, source, rate, faults).await
        }
        Command::Serve { common, fronts } => {
            let mut cfg = load_config(&common, &no_source())?;
            fronts.apply(&mut cfg)?;
            serve_cmd(cfg).await
        }
        Command::Query {
            common,
            format,
            file,
            sql_option,
            sql,
        } => {
            let cfg = load_config(&common, &no_source())?;
            let sql = match (file, sql.or(sql_option)) {
                (Some(f), _) => std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?,
                (None, Some(s)) => s,
                (None, None) => bail!("give the SQL as an argument or with --file"),
            };
            query_cmd(cfg, format, &sql).await
        }
        Command::Export {
            common,
            to,
            collections,
            since,
            until,
            current,
            rows_per_file,
            format,
        } => {
            let cfg = load_config(&common, &no_source())?;
            if rows_per_file == 0 {
                bail!("--rows-per-file must be at least 1");
            }
            let time = |s: &Option<String>, flag: &str| -> anyhow::Result<Option<i64>> {
                s.as_deref()
                    .map(|t| {
                        let full = if t.len() == 10 {
                            format!("{t}T00:00:00Z")
                        } else {
                            t.to_string()
                        };
                        crate::syntax::parse_datetime_us(&full)
                            .map_err(|e| anyhow::anyhow!("{flag} {t:?}: {e}"))
                    })
                    .transpose()
            };
            for c in &collections {
                if !crate::syntax::is_nsid(c) {
                    bail!("--collections: {c:?} is not an NSID");
                }
            }
            let slice = crate::export::Slice {
                collections,
                since_us: time(&since, "--since")?,
                until_us: time(&until, "--until")?,
                current,
                rows_per_file,
                format: match format {
                    ExportFormat::Parquet => crate::export::Format::Parquet,
                    ExportFormat::Ndjson => crate::export::Format::Ndjson,
                    ExportFormat::Csv => crate::export::Format::Csv,
                },
            };
            export_cmd(cfg, &to, slice).await
        }
        Command::Compact {
            common,
            writer,
            open,
            purge,
        } => {
            let mut cfg = load_config(&common, &no_source())?;
            cfg.lake.lease_wait |= writer.wait;
            compact_cmd(cfg, open, purge).await
        }
        Command::Ingest {
            common,
            source,
            writer,
            input,
        } => {
            let mut cfg = load_config(&common, &source)?;
            cfg.lake.lease_wait |= writer.wait;
            ingest_cmd(cfg, input).await
        }
        Command::Backfill {
            common,
            writer,
            relay,
            plc,
            collections,
            dids,
            dids_file,
            concurrency,
        } => {
            let mut cfg = load_config(&common, &no_source())?;
            cfg.lake.lease_wait |= writer.wait;
            let b = &mut cfg.backfill;
            if let Some(r) = relay {
                b.relay = r;
            }
            if let Some(p) = plc {
                b.plc = p;
            }
            if !collections.is_empty() {
                b.collections = collections;
            }
            if let Some(c) = concurrency {
                b.concurrency = c;
            }
            cfg.validate()?;
            let target = match (dids.is_empty(), dids_file) {
                (false, _) => crate::backfill::Target::Dids(check_dids(dids)?),
                (true, Some(f)) => {
                    let text = std::fs::read_to_string(&f)
                        .with_context(|| format!("reading {}", f.display()))?;
                    let list = text
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_string)
                        .collect();
                    crate::backfill::Target::Dids(check_dids(list)?)
                }
                (true, None) => crate::backfill::Target::Listed,
            };
            backfill_cmd(cfg, target).await
        }
        Command::Simulate {
            listen,
            messages,
            rate,
            seed,
            accounts,
            step_us,
            start,
            faults,
            capture,
            format,
            compress,
            truth,
            sync,
            records,
            hosts,
            big_repo,
        } => {
            if sync {
                return simulate_sync(SyncArgs {
                    listen,
                    seed,
                    accounts,
                    records,
                    hosts,
                    big_repo,
                })
                .await;
            }
            let serving = capture.is_none();
            let rate = (serving && rate > 0.0).then_some(rate);
            let traffic = TrafficConfig {
                seed,
                accounts,
                step_us: sim_step_us(step_us, rate)?,
                exact_clock: rate.is_some(),
                start_time_us: sim_start_us(start.as_deref(), serving)?,
                ..Default::default()
            };
            let faults = Faults::parse(&faults).map_err(anyhow::Error::msg)?;
            match capture {
                Some(path) => {
                    write_capture(traffic, messages, &path, format, compress, truth.as_deref())
                }
                None => {
                    let cfg = SimConfig {
                        traffic,
                        messages: (messages > 0).then_some(messages),
                        rate,
                        retention: 200_000,
                        faults,
                    };
                    simulate_serve(cfg, &listen, truth).await
                }
            }
        }
    }
}

/// The simulator's mean step: as given, or one that makes stream time keep pace with the clock
/// at `rate` messages per second.
fn sim_step_us(given: Option<i64>, rate: Option<f64>) -> anyhow::Result<i64> {
    match (given, rate) {
        (Some(s), _) if s <= 0 => bail!("--step-us must be positive"),
        (Some(s), _) => Ok(s),
        (None, Some(r)) => Ok(((1e6 / r).round() as i64).max(1)),
        (None, None) => Ok(TrafficConfig::default().step_us),
    }
}

/// The simulator's first stream time: `now` (the default when serving), a time, or the fixed
/// start of captures.
fn sim_start_us(given: Option<&str>, serving: bool) -> anyhow::Result<i64> {
    let now = crate::model::cursor::now_us;
    match given {
        Some("now") => Ok(now()),
        Some(t) => {
            let full = if t.len() == 10 {
                format!("{t}T00:00:00Z")
            } else {
                t.to_string()
            };
            let us = crate::syntax::parse_datetime_us(&full)
                .map_err(|e| anyhow::anyhow!("--start {t:?}: {e}"))?;
            if us < crate::model::cursor::NETWORK_EPOCH_US {
                bail!("--start {t:?} is before the network began");
            }
            Ok(us)
        }
        None if serving => Ok(now()),
        None => Ok(TrafficConfig::default().start_time_us),
    }
}

/// Every DID must be one (`did:plc:…`, `did:web:…`).
fn check_dids(dids: Vec<String>) -> anyhow::Result<Vec<String>> {
    if let Some(bad) = dids.iter().find(|d| !crate::syntax::is_did(d)) {
        bail!("{bad:?} is not a DID");
    }
    Ok(dids)
}

async fn backfill_cmd(cfg: Config, target: crate::backfill::Target) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let lake = crate::sink::store::Lake::open(&cfg.lake.url)?;
    let stats = Arc::new(crate::backfill::Stats::default());
    let from = match &target {
        crate::backfill::Target::Dids(d) => format!("{} repos", d.len()),
        crate::backfill::Target::Listed => format!("the repos listed by {}", cfg.backfill.relay),
    };
    eprintln!("atlake: backfilling {from} into {}", cfg.lake.url);
    let tty = std::io::stderr().is_terminal();
    let watch = stats.clone();
    let started = std::time::Instant::now();
    let reporter = spawn_progress(tty, move || progress_line(&watch, started.elapsed()));
    let plan = crate::backfill::Plan {
        target,
        cfg,
        follow: false,
    };
    let result = crate::backfill::run(plan, &lake, stats.clone()).await;
    reporter.abort();
    if tty {
        eprintln!("\r\x1b[2K{}", progress_line(&stats, started.elapsed()));
    }
    let s = result?;
    let failed: u64 = s.failures.values().sum();
    eprintln!(
        "atlake: {} repos done ({} were already), {} failed {:?}, {} inactive {:?}; {} records, {} MB of CAR, {} files in {} batches, {:.1}s",
        s.done,
        s.already_done,
        failed,
        s.failures,
        s.inactive.values().sum::<u64>(),
        s.inactive,
        s.records,
        s.car_bytes / 1_000_000,
        s.files,
        s.batches,
        started.elapsed().as_secs_f64()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        // finished, but some repos must be fetched again by another run
        ExitCode::from(3)
    })
}

/// `repos 1200/5000 [####......] 24% · 152k rec/s · 110 MB/s · 3 failed · ETA 40s`.
fn progress_line(s: &crate::backfill::Stats, elapsed: Duration) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let listed = s.listed.load(Relaxed);
    let finished = s.done.load(Relaxed) + s.failed.load(Relaxed) + s.already_done.load(Relaxed);
    let inactive: u64 = s.snapshot().inactive.values().sum();
    let secs = elapsed.as_secs_f64().max(1e-3);
    let rate = s.records.load(Relaxed) as f64 / secs;
    let mbs = s.car_bytes.load(Relaxed) as f64 / 1e6 / secs;
    let of = listed.saturating_sub(inactive);
    let frac = if of == 0 {
        0.0
    } else {
        finished as f64 / of as f64
    };
    let bar: String = (0..20)
        .map(|i| if (i as f64) < frac * 20.0 { '#' } else { '.' })
        .collect();
    let listing = if s.listing_done.load(Relaxed) == 1 {
        ""
    } else {
        "+ (listing)"
    };
    let done_now = s.done.load(Relaxed) + s.failed.load(Relaxed);
    let eta = if s.listing_done.load(Relaxed) == 1 && done_now > 0 && of > finished {
        let per = secs / done_now as f64;
        format!(" · ETA {:.0}s", per * (of - finished) as f64)
    } else {
        String::new()
    };
    format!(
        "repos {finished}/{of}{listing} [{bar}] {:.0}% · {:.0} rec/s · {:.1} MB/s · {} failed · {} in flight{eta}",
        frac * 100.0,
        rate,
        mbs,
        s.failed.load(Relaxed),
        s.in_flight.load(Relaxed),
    )
}

fn no_source() -> SourceArgs {
    SourceArgs {
        source: None,
        url: None,
        collections: Vec::new(),
        dids: Vec::new(),
        start_cursor: None,
    }
}

/// `atlake demo`: the simulator on a loopback port, and the daemon reading it.
async fn demo_cmd(
    mut cfg: Config,
    source: SourceKind,
    rate: f64,
    faults: Faults,
) -> anyhow::Result<ExitCode> {
    let traffic = TrafficConfig {
        step_us: sim_step_us(None, Some(rate))?,
        exact_clock: true,
        start_time_us: sim_start_us(None, true)?,
        ..Default::default()
    };
    let sim = SimConfig {
        traffic,
        messages: None,
        rate: Some(rate),
        retention: 200_000,
        faults,
    };
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let h = crate::simulate::server::start(sim, loopback)
        .await
        .context("starting the simulator on 127.0.0.1")?;
    cfg.source.kind = source;
    cfg.source.url = format!("ws://{}", h.addr);
    cfg.source.start_cursor = Some(0);
    cfg.validate()?;
    eprintln!(
        "atlake demo: simulated {source} traffic, {rate} messages/s, on ws://{}",
        h.addr
    );
    let result = run_daemon(cfg, |addr| {
        eprintln!(
            "atlake demo: open http://{addr}/ for the web console (SQL, tables, live charts)"
        );
    })
    .await;
    h.stop();
    result
}

async fn run_cmd(cfg: Config) -> anyhow::Result<ExitCode> {
    run_daemon(cfg, |_| {}).await
}

/// Starts the daemon, says where it serves (then `after_start` with the HTTP address), and runs
/// it until SIGINT/SIGTERM.
async fn run_daemon(
    cfg: Config,
    after_start: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<ExitCode> {
    let stop = shutdown_listener();
    let daemon = Daemon::start(cfg.clone())
        .await
        .with_context(|| format!("starting ingest into {}", cfg.lake.url))?;
    let addr = daemon.addr;
    if let Some(pg) = daemon.pg_addr {
        eprintln!(
            "atlake: Postgres protocol on {pg} (psql -h {} -p {})",
            pg.ip(),
            pg.port()
        );
    }
    if let Some(f) = daemon.flight_addr {
        eprintln!("atlake: Flight SQL on grpc://{f}");
    }
    eprintln!(
        "atlake: ingesting {} {} into {}\natlake: SQL on http://{addr}/sql  (try: curl -s http://{addr}/sql --data 'SELECT collection, count(*) FROM events GROUP BY 1 ORDER BY 2 DESC LIMIT 10')",
        cfg.source.kind, cfg.source.url, cfg.lake.url
    );
    after_start(addr);
    let summary = daemon
        .run_until(async {
            stop.await;
            eprintln!(
                "atlake: shutting down (flushing; deadline {:?})",
                cfg.shutdown.deadline.0
            );
        })
        .await?;
    eprintln!(
        "atlake: {} events written, {} quarantined, {} files, checkpoint {}",
        summary.events,
        summary.quarantined,
        summary.files,
        show_cursor(summary.checkpoint)
    );
    Ok(if summary.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn show_cursor(c: Option<crate::model::Cursor>) -> String {
    c.map_or_else(|| "none".to_string(), |c| c.to_string())
}

async fn serve_cmd(cfg: Config) -> anyhow::Result<ExitCode> {
    // counted from the first query, not from the first scrape of /metrics
    crate::telemetry::metrics();
    let lake = crate::daemon::open_existing_lake(&cfg.lake.url).await?;
    let listener = crate::daemon::bind(&cfg.server.listen).await?;
    let addr = listener.local_addr()?;
    let engine = Arc::new(crate::query::QueryEngine::try_new(
        lake,
        None,
        crate::query::Limits::from_config(&cfg.server),
    )?);
    let (stop_fronts, stop_fronts_rx) = tokio::sync::watch::channel(false);
    let pg = crate::daemon::start_pg(&cfg.server, engine.clone(), stop_fronts_rx.clone()).await?;
    let flight = crate::daemon::start_flight(&cfg.server, engine.clone(), stop_fronts_rx).await?;
    crate::telemetry::register_zero_series(false, pg.is_some(), flight.is_some());
    let state = Arc::new(crate::query::http::AppState {
        engine,
        token: cfg.server.token.clone(),
        storage: None,
        filters: None,
    });
    eprintln!(
        "atlake: serving SQL over {} on http://{addr}/sql",
        cfg.lake.url
    );
    if let Some((pg_addr, _)) = &pg {
        eprintln!(
            "atlake: serving the Postgres protocol on {pg_addr} (psql -h {} -p {})",
            pg_addr.ip(),
            pg_addr.port()
        );
    }
    if let Some((flight_addr, _)) = &flight {
        eprintln!("atlake: serving Flight SQL on grpc://{flight_addr}");
    }
    if cfg.server.token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the SQL endpoint is reachable beyond this machine without a token; set ATLAKE_SERVER_TOKEN");
    }
    crate::query::http::serve(listener, state, shutdown_signal()).await?;
    if stop_fronts.send(true).is_err() {
        tracing::debug!("no front end was listening for the stop: each had already ended");
    }
    for (_, task) in pg.into_iter().chain(flight) {
        task.await??;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints `line()` on stderr every half second on a terminal (in place), else logs it every
/// 10 s, until aborted.
fn spawn_progress(
    tty: bool,
    line: impl Fn() -> String + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = if tty {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(10)
        };
        loop {
            tokio::time::sleep(every).await;
            let l = line();
            if tty {
                eprint!("\r\x1b[2K{l}");
            } else {
                tracing::info!("{l}");
            }
        }
    })
}

async fn export_cmd(
    cfg: Config,
    to: &str,
    slice: crate::export::Slice,
) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    use std::sync::atomic::Ordering::Relaxed;
    let lake = crate::daemon::open_existing_lake(&cfg.lake.url).await?;
    let dest = crate::sink::store::Lake::open(to)?;
    let progress = Arc::new(crate::export::Progress::default());
    let started = std::time::Instant::now();
    let line = move |p: &crate::export::Progress| {
        format!(
            "exported {}/{} files: {} rows, {:.1} MB in {} files, {:.1?}",
            p.files_done.load(Relaxed),
            p.files_total.load(Relaxed),
            p.rows.load(Relaxed),
            p.bytes.load(Relaxed) as f64 / 1e6,
            p.outputs.load(Relaxed),
            started.elapsed()
        )
    };
    let tty = std::io::stderr().is_terminal();
    let watch = progress.clone();
    let reporter = spawn_progress(tty, move || line(&watch));
    let budget = crate::checkpoint::facts::Budget::from_config(&cfg.privacy);
    let r = crate::export::run(&lake, &dest, &slice, &budget, progress.clone()).await;
    reporter.abort();
    if tty {
        eprint!("\r\x1b[2K");
    }
    r?;
    eprintln!("atlake: {} to {to}", line(&progress));
    Ok(ExitCode::SUCCESS)
}

async fn compact_cmd(cfg: Config, open: bool, purge: bool) -> anyhow::Result<ExitCode> {
    let lake = crate::sink::store::Lake::open(&cfg.lake.url)?;
    let started = std::time::Instant::now();
    eprintln!("atlake: compacting {}", cfg.lake.url);
    let s = crate::checkpoint::compact::run_command(&lake, &cfg, open, purge).await?;
    let p = s.pass;
    eprintln!(
        "atlake: {} files -> {} ({} rewritten into {}); purged: {} records' content, {} rows of deleted accounts, {} quarantined rows{}; retention removed {}, vacuum deleted {}; took {:.1?}",
        s.files_before,
        s.files_after,
        p.inputs,
        p.outputs,
        p.blanked,
        p.dropped,
        p.quarantine_dropped,
        if p.purge_scan {
            " (purge scan ran)"
        } else {
            ""
        },
        s.maintenance.expired,
        s.maintenance.vacuumed,
        started.elapsed()
    );
    Ok(ExitCode::SUCCESS)
}

async fn query_cmd(cfg: Config, format: QueryFormat, sql: &str) -> anyhow::Result<ExitCode> {
    let lake = crate::daemon::open_existing_lake(&cfg.lake.url).await?;
    let engine = crate::query::QueryEngine::try_new(
        lake,
        None,
        crate::query::Limits::from_config(&cfg.server),
    )?;
    // on the query runtime, as the endpoint's queries: its threads have the large stacks
    // planning and execution may need
    let sql = sql.to_string();
    let mut task = crate::query::pool::spawn(async move { engine.collect(&sql).await })?;
    let batches = task.join().await??;
    let mut out = std::io::stdout().lock();
    match format {
        QueryFormat::Table => {
            let t = arrow::util::pretty::pretty_format_batches(&batches)?;
            writeln!(out, "{t}")?;
        }
        QueryFormat::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for b in &batches {
                w.write(b)?;
            }
        }
        QueryFormat::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut out);
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    shutdown_listener().await
}

/// Registers for SIGINT and SIGTERM now (not when first awaited), so a signal that arrives
/// while the process is still starting is not lost to the default action.
pub fn shutdown_listener() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            match (term, int) {
                (Some(mut t), Some(mut i)) => {
                    tokio::select! {
                        _ = t.recv() => {}
                        _ = i.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn ingest_cmd(mut cfg: Config, input: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    if cfg.backfill.enabled {
        // the cut-over beside a live source needs the backfill that `run` starts with it
        tracing::warn!(
            "[backfill] enabled is for `atlake run`; `atlake ingest` ingests the source alone"
        );
        cfg.backfill.enabled = false;
    }
    let deadline = cfg.shutdown.deadline.0;
    let what = match &input {
        Some(p) => format!("capture {}", p.display()),
        None => format!("{} {}", cfg.source.kind, cfg.source.url),
    };
    let lake_url = cfg.lake.url.clone();
    let stop = shutdown_listener();
    tokio::pin!(stop);
    let started = ingest::start(
        cfg,
        match input {
            Some(p) => Input::File(p),
            None => Input::Network,
        },
    );
    // a signal during start-up recovery stops before anything was read: nothing to flush
    let mut handle = tokio::select! {
        h = started => h.with_context(|| format!("starting ingest of {what} into {lake_url}"))?,
        _ = &mut stop => {
            tracing::info!("stopped during start-up");
            return Ok(ExitCode::SUCCESS);
        }
    };
    tracing::info!(source = %what, lake = %lake_url, "ingesting");
    // a file ends by itself; a network source only on a failure (a lost lease, a fatal error)
    let ended = tokio::select! {
        r = handle.finished() => Some(r),
        _ = &mut stop => None,
    };
    let summary = match ended {
        Some(r) => r?,
        None => handle.stop(deadline).await?,
    };
    eprintln!(
        "ingest: {} messages, {} events written, {} quarantined, {} duplicates skipped, {} filtered, {} files ({:.1} MB), checkpoint {}{}",
        summary.messages,
        summary.events,
        summary.quarantined,
        summary.duplicates,
        summary.filtered,
        summary.files,
        summary.bytes_written as f64 / 1e6,
        show_cursor(summary.checkpoint),
        if summary.clean {
            ""
        } else {
            " (unclean: some flushes were abandoned and will be replayed)"
        }
    );
    Ok(if summary.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn write_capture(
    traffic: TrafficConfig,
    messages: u64,
    path: &Path,
    format: FormatArg,
    compress: CompressArg,
    truth: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    if messages == 0 {
        bail!("--capture needs --messages N (how many messages to write)");
    }
    let fmt = match format {
        FormatArg::Frames => CaptureFormat::Frames,
        FormatArg::LengthPrefixed => CaptureFormat::LengthPrefixed,
        FormatArg::Jetstream => CaptureFormat::JetstreamJson,
    };
    let comp = match compress {
        CompressArg::None => Compression::None,
        CompressArg::Zstd => Compression::Zstd,
        CompressArg::Gzip => Compression::Gzip,
    };
    let mut w = CaptureWriter::create(path, fmt, comp)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut t = crate::simulate::traffic::Traffic::new(traffic);
    let mut truth_acc = crate::simulate::server::Truth::default();
    let started = std::time::Instant::now();
    for i in 0..messages {
        let m = t.next_message();
        if fmt == CaptureFormat::JetstreamJson {
            for (_, l) in m.jetstream_lines() {
                w.write(&l)?;
            }
        } else {
            w.write(&m.frame)?;
        }
        truth_acc.add_message(&m);
        truth_acc.last_time_us = m
            .jetstream_lines()
            .last()
            .map(|(t, _)| *t)
            .or(truth_acc.last_time_us);
        if (i + 1) % 100_000 == 0 {
            eprintln!(
                "simulate: {} of {messages} messages ({:.0}/s)",
                i + 1,
                (i + 1) as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    w.finish()?;
    eprintln!(
        "simulate: wrote {} messages, {} events to {} in {:.1}s",
        truth_acc.messages,
        truth_acc.events(),
        path.display(),
        started.elapsed().as_secs_f64()
    );
    if let Some(p) = truth {
        std::fs::write(p, truth_acc.to_json())?;
    }
    Ok(ExitCode::SUCCESS)
}

struct SyncArgs {
    listen: String,
    seed: u64,
    accounts: u64,
    records: u64,
    hosts: usize,
    big_repo: Option<u64>,
}

async fn simulate_sync(a: SyncArgs) -> anyhow::Result<ExitCode> {
    let addr: std::net::SocketAddr = a
        .listen
        .parse()
        .with_context(|| format!("--listen {:?} is not an address", a.listen))?;
    let started = std::time::Instant::now();
    let sim = crate::simulate::sync::SyncSim::start(crate::simulate::sync::SyncSimConfig {
        seed: a.seed,
        accounts: a.accounts,
        hosts: a.hosts,
        records: a.records,
        big_repo: a.big_repo,
        listen: Some(addr),
        ..Default::default()
    })
    .await
    .with_context(|| format!("cannot listen on {addr}"))?;
    let (records, bytes) = sim.size();
    eprintln!(
        "simulate: sync endpoints ready in {:.1}s: {} repos, {records} records, {:.1} MB of CAR\n  relay: {}\n  plc:   {}\n  hosts: {}\n  try:   atlake backfill --relay {} --plc {} --lake ./lake",
        started.elapsed().as_secs_f64(),
        a.accounts,
        bytes as f64 / 1e6,
        sim.relay,
        sim.plc,
        sim.hosts.join(" "),
        sim.relay,
        sim.plc,
    );
    shutdown_listener().await;
    eprintln!(
        "simulate: {} requests ({} getRepo)",
        sim.requests(),
        sim.get_repo_requests()
    );
    Ok(ExitCode::SUCCESS)
}

async fn simulate_serve(
    cfg: SimConfig,
    listen: &str,
    truth: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen:?} is not an address like 127.0.0.1:6008"))?;
    let h = crate::simulate::server::start(cfg.clone(), addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    eprintln!(
        "simulate: serving on ws://{0}\n  firehose:  ws://{0}/xrpc/com.atproto.sync.subscribeRepos\n  jetstream: ws://{0}/subscribe\n  {1} messages/s, {2}",
        h.addr,
        cfg.rate.map_or("unlimited".to_string(), |r| format!("{r}")),
        cfg.messages
            .map_or("no limit".to_string(), |m| format!("{m} messages"))
    );
    let mut last = 0;
    let mut truth_written = false;
    let stop = shutdown_listener();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                let t = h.truth();
                if t.messages != last {
                    eprintln!("simulate: {} messages ({} events), {} connections", t.messages, t.events(), h.connections());
                    last = t.messages;
                }
                if h.finished() && !truth_written
                    && let Some(p) = &truth {
                        std::fs::write(p, t.to_json())?;
                        truth_written = true;
                    }
            }
        }
    }
    if let Some(p) = &truth {
        std::fs::write(p, h.truth().to_json())?;
    }
    h.stop();
    Ok(ExitCode::SUCCESS)
}

fn convert(input: &Path) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    let started = std::time::Instant::now();
    let stats = crate::convert::convert(input, &mut out, |s, offset| {
        eprintln!(
            "convert: {} messages, {} lines, {:.1} MB read, {:.0} msg/s",
            s.messages,
            s.lines,
            offset as f64 / 1e6,
            s.messages as f64 / started.elapsed().as_secs_f64()
        );
    })
    .with_context(|| format!("converting {}", input.display()))?;
    out.flush()?;
    let errors: u64 = stats.errors.values().sum();
    eprintln!(
        "convert: {} ({}, {:?}): {} messages -> {} lines, {} set aside, {} without a Jetstream form, {:.2}s",
        input.display(),
        stats.format.map(|f| f.as_str()).unwrap_or("?"),
        stats.compression.unwrap_or(Compression::None),
        stats.messages,
        stats.lines,
        errors,
        stats.skipped,
        started.elapsed().as_secs_f64()
    );
    for (reason, n) in &stats.errors {
        eprintln!("  set aside: {reason}: {n}");
    }
    if let Some(t) = &stats.truncated {
        eprintln!("convert: stopped early: {t}");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
