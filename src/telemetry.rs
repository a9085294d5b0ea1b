//! Logs (`tracing`) and metrics (`metrics` with a Prometheus exporter).
//!
//! The Prometheus recorder is installed once per process; `/metrics` renders it and the SQL
//! table `system.ingest` is built from the same snapshot, so both always agree.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's metrics handle, installing the recorder on first use.
pub fn metrics() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // another recorder may already be installed (tests); the handle still renders ours
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Registers at 0 the series a dashboard plots from the first scrape: counters that move only
/// when something goes wrong (a broken invariant, a refused or overrun query, a duplicate),
/// compaction's counters, and the connection gauges of the front ends that are on. A counter
/// that appears only on its first increment has no `rate()` until its second.
pub fn register_zero_series(daemon: bool, pg: bool, flight: bool) {
    metrics::counter!("atlake_broken_invariants_total").increment(0);
    metrics::counter!("atlake_queries_refused_busy_total").increment(0);
    metrics::counter!("atlake_query_overruns_total").increment(0);
    metrics::counter!("atlake_query_panics_total").increment(0);
    metrics::gauge!("atlake_http_connections").increment(0.0);
    if pg {
        metrics::gauge!("atlake_pg_connections").increment(0.0);
    }
    if flight {
        metrics::gauge!("atlake_flight_connections").increment(0.0);
    }
    if daemon {
        metrics::counter!("atlake_duplicates_total", "reason" => "key").increment(0);
        metrics::counter!("atlake_duplicates_total", "reason" => "seq").increment(0);
        metrics::counter!("atlake_compaction_passes_total").increment(0);
        metrics::counter!("atlake_compaction_files_replaced_total").increment(0);
        metrics::counter!("atlake_compaction_files_written_total").increment(0);
    }
}

/// One sample of the metrics snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels as `k="v",…`.
    pub labels: String,
    /// Value.
    pub value: f64,
}

/// Parses the Prometheus text exposition into samples (comments skipped).
pub fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            Some((n, l)) => (n.to_string(), l.trim_end_matches('}').to_string()),
            None => (head.to_string(), String::new()),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// Logging to stderr, filtered by `ATLAKE_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATLAKE_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,object_store=warn,aws_config=warn,hyper=warn,datafusion=warn",
        )
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
