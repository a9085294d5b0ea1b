//! The command line: argument parsing and dispatch to the library's entry points.
//!
//! `main` stays thin; every command is a function here that tests can call too.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// atlake: an analytics sink for the AT Protocol firehose and Jetstream.
#[derive(Debug, Parser)]
#[command(name = "atlake", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the Jetstream v1 JSON lines for a capture file to stdout.
    ///
    /// Reads raw firehose frames (a CBOR sequence, as `websocat --binary` saves them),
    /// length-prefixed frames ([u32 LE length][frame]) or Jetstream NDJSON, optionally
    /// compressed with zstd or gzip; the format is detected. Firehose commits give one line per
    /// op with `time_us` taken from the frame's `time`. Input that cannot be converted is
    /// counted by reason on stderr.
    ///
    /// Example: atlake convert --input capture.frames.zst > events.jsonl
    Convert {
        /// The capture file.
        #[arg(long, short)]
        input: PathBuf,
    },
}

/// Parses arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATLAKE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Convert { input } => convert(&input),
    }
}

fn convert(input: &std::path::Path) -> anyhow::Result<ExitCode> {
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
        stats
            .compression
            .unwrap_or(crate::source::capture::Compression::None),
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
