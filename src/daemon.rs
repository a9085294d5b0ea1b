//! The daemon (`atlake run`): ingest and the SQL endpoint in one process, over one catalog, so
//! queries see committed files and the rows still buffered. The command line and the tests
//! start it the same way: [`Daemon::start`], then [`Daemon::run_until`].

use crate::config::Config;
use crate::ingest::{self, IngestError, IngestHandle, Input, Summary};
use crate::query::http::{AppState, SHUTDOWN_GRACE};
use crate::query::{Limits, QueryEngine, QueryError};
use crate::sink::store::{Lake, StoreError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Why the daemon could not start or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The lake could not be opened or reached.
    #[error(
        "cannot open the lake at {url:?}: {source} (check the path is writable, or for S3 the AWS_* environment)"
    )]
    Lake {
        /// The lake URL.
        url: String,
        /// Why.
        source: StoreError,
    },
    /// The lake did not answer a listing.
    #[error(
        "cannot reach the lake at {url}: {source} (check the URL, the bucket, and the AWS_* credentials/endpoint)"
    )]
    Unreachable {
        /// The lake URL.
        url: String,
        /// Why.
        source: StoreError,
    },
    /// A command that reads was pointed at a place that holds no lake.
    #[error(
        "no atlake lake at {url:?}: {why} (check the path; `atlake run`, `atlake ingest` or `atlake backfill` make one)"
    )]
    NotALake {
        /// The lake URL.
        url: String,
        /// What is missing.
        why: String,
    },
    /// The lake did not answer in time.
    #[error("cannot reach the lake at {0} within 30s (is the S3 endpoint up?)")]
    Timeout(String),
    /// The SQL port could not be bound.
    #[error("cannot listen on {addr:?}: {source} (is the port in use? use --listen HOST:PORT)")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The Postgres front end's TLS certificate or key could not be loaded.
    #[error("cannot set up TLS for the Postgres front end: {0}")]
    Tls(std::io::Error),
    /// Ingest failed to start or failed while running.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// The query engine could not be set up.
    #[error(transparent)]
    Query(#[from] QueryError),
}

/// Opens the lake at `url` and checks it answers (a listing of `_atlake/`).
pub async fn open_lake(url: &str) -> Result<Lake, DaemonError> {
    let lake = Lake::open(url).map_err(|source| DaemonError::Lake {
        url: url.to_string(),
        source,
    })?;
    match tokio::time::timeout(Duration::from_secs(30), lake.list("_atlake")).await {
        Ok(Ok(_)) => Ok(lake),
        Ok(Err(source)) => Err(DaemonError::Unreachable {
            url: url.to_string(),
            source,
        }),
        Err(_) => Err(DaemonError::Timeout(url.to_string())),
    }
}

/// Opens a lake that must already exist, for the commands that only read (`query`, `serve`):
/// a local directory is never created, and a place without atlake's state (`_atlake/`) or a
/// Delta log (`events/_delta_log/`) is not a lake.
pub async fn open_existing_lake(url: &str) -> Result<Lake, DaemonError> {
    let not_a_lake = |why: &str| DaemonError::NotALake {
        url: url.to_string(),
        why: why.to_string(),
    };
    if let Ok(crate::sink::store::LakeLocation::Local(p)) =
        crate::sink::store::LakeLocation::parse(url)
        && !p.is_dir()
    {
        return Err(not_a_lake("no such directory"));
    }
    let lake = open_lake(url).await?;
    let state = lake.list("_atlake").await;
    let log = lake.list("events/_delta_log").await;
    match (state, log) {
        (Ok(a), Ok(b)) if a.is_empty() && b.is_empty() => Err(not_a_lake(
            "neither _atlake/ nor events/_delta_log/ is there",
        )),
        (Err(source), _) | (_, Err(source)) => Err(DaemonError::Unreachable {
            url: url.to_string(),
            source,
        }),
        _ => Ok(lake),
    }
}

/// Binds the SQL endpoint's address.
pub async fn bind(addr: &str) -> Result<tokio::net::TcpListener, DaemonError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// The Postgres front end, when `server.pg_listen` is set: bound, serving `engine` until
/// `stop` turns true. Returns where it listens and its task.
pub async fn start_pg(
    cfg: &crate::config::ServerConfig,
    engine: Arc<QueryEngine>,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)>, DaemonError> {
    if cfg.pg_listen.is_empty() {
        return Ok(None);
    }
    let tls = if cfg.pg_tls_cert.is_empty() {
        None
    } else {
        Some(
            crate::query::pg::tls_acceptor(&cfg.pg_tls_cert, &cfg.pg_tls_key)
                .map_err(DaemonError::Tls)?,
        )
    };
    let listener = bind(&cfg.pg_listen).await?;
    let addr = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: cfg.pg_listen.clone(),
            source,
        })?;
    if cfg.token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the Postgres endpoint is reachable beyond this machine without a password; set ATLAKE_SERVER_TOKEN");
    }
    let front = Arc::new(crate::query::pg::PgFrontEnd::new(engine, cfg.token.clone()));
    let task = tokio::spawn(crate::query::pg::serve(
        listener,
        front,
        tls,
        cfg.max_connections,
        async move {
            if stop.wait_for(|s| *s).await.is_err() {
                tracing::debug!("the daemon dropped its stop signal: this front end stops too");
            }
        },
    ));
    Ok(Some((addr, task)))
}

/// The Flight SQL front end, when `server.flight_listen` is set: bound, serving `engine`
/// until `stop` turns true. Returns where it listens and its task.
pub async fn start_flight(
    cfg: &crate::config::ServerConfig,
    engine: Arc<QueryEngine>,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)>, DaemonError> {
    if cfg.flight_listen.is_empty() {
        return Ok(None);
    }
    let listener = bind(&cfg.flight_listen).await?;
    let addr = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: cfg.flight_listen.clone(),
            source,
        })?;
    if cfg.token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the Flight SQL endpoint is reachable beyond this machine without a token; set ATLAKE_SERVER_TOKEN");
    }
    let front = Arc::new(crate::query::flight::FlightFrontEnd::try_new(
        engine,
        cfg.token.clone(),
    )?);
    let max = cfg.max_connections;
    let task = tokio::spawn(async move {
        crate::query::flight::serve(listener, front, max, async move {
            if stop.wait_for(|s| *s).await.is_err() {
                tracing::debug!("the daemon dropped its stop signal: this front end stops too");
            }
        })
        .await
        .map_err(std::io::Error::other)
    });
    Ok(Some((addr, task)))
}

/// Waits for a front end's task to end after the stop signal.
async fn join_front_end(name: &str, task: Option<tokio::task::JoinHandle<std::io::Result<()>>>) {
    let Some(task) = task else { return };
    match tokio::time::timeout(SHUTDOWN_GRACE * 2, task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "the {name} endpoint failed"),
        Ok(Err(e)) => tracing::error!(error = %e, "the {name} endpoint's task failed"),
        Err(_) => tracing::warn!("the {name} endpoint did not stop in time"),
    }
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    /// Where the SQL endpoint listens.
    pub addr: SocketAddr,
    /// Where the Postgres front end listens, when it is on.
    pub pg_addr: Option<SocketAddr>,
    /// Where the Flight SQL front end listens, when it is on.
    pub flight_addr: Option<SocketAddr>,
    ingest: IngestHandle,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    pg_server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    flight_server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    stop_server: watch::Sender<bool>,
    deadline: Duration,
    backfill: Option<Backfill>,
}

/// A backfill running beside the live source.
#[derive(Debug)]
struct Backfill {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<crate::backfill::Summary, crate::backfill::BackfillError>>,
}

impl Daemon {
    /// Opens the lake, takes its writer lease, recovers, starts ingesting from the configured
    /// source and serves SQL on `cfg.server.listen`.
    pub async fn start(cfg: Config) -> Result<Daemon, DaemonError> {
        let lake = open_lake(&cfg.lake.url).await?;
        let listener = bind(&cfg.server.listen).await?;
        let addr = listener
            .local_addr()
            .map_err(|source| DaemonError::Listen {
                addr: cfg.server.listen.clone(),
                source,
            })?;
        crate::telemetry::metrics();
        let ingest = ingest::start_with_lake(cfg.clone(), Input::Network, lake.clone()).await?;
        let engine = Arc::new(QueryEngine::try_new(
            lake,
            Some(ingest.catalog.clone()),
            Limits::from_config(&cfg.server),
        )?);
        let (stop_server, mut stop_rx) = watch::channel(false);
        let pg = start_pg(&cfg.server, engine.clone(), stop_server.subscribe()).await?;
        let flight = start_flight(&cfg.server, engine.clone(), stop_server.subscribe()).await?;
        let state = Arc::new(AppState {
            engine,
            token: cfg.server.token.clone(),
            storage: Some(ingest.health.clone()),
            filters: Some(ingest.filters_sender()),
        });
        let server = tokio::spawn(crate::query::http::serve(listener, state, async move {
            if stop_rx.wait_for(|s| *s).await.is_err() {
                tracing::debug!("the daemon dropped its stop signal: the HTTP front end stops too");
            }
        }));
        if cfg.server.token.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the SQL endpoint is reachable beyond this machine without a token; set ATLAKE_SERVER_TOKEN");
        }
        // the live source runs first; the backfill follows, under the same lease
        let backfill = cfg.backfill.enabled.then(|| {
            let (stop, stop_rx) = watch::channel(false);
            // a daemon whose live source takes some DIDs backfills those (their chains are
            // the only ones it follows); otherwise every repo the relay lists
            let target = if cfg.source.dids.is_empty() {
                crate::backfill::Target::Listed
            } else {
                crate::backfill::Target::Dids(cfg.source.dids.clone())
            };
            let plan = crate::backfill::Plan {
                target,
                cfg: cfg.clone(),
                follow: true,
            };
            let lake = ingest.lake.clone();
            let catalog = ingest.catalog.clone();
            let commits = ingest.commits.clone();
            let task = tokio::spawn(async move {
                let stats = Arc::new(crate::backfill::Stats::default());
                let r = crate::backfill::run_fenced(
                    plan,
                    &lake,
                    stats,
                    Some(catalog),
                    commits,
                    stop_rx,
                )
                .await;
                match &r {
                    Ok(s) => tracing::info!(
                        done = s.done,
                        records = s.records,
                        failed = s.failures.values().sum::<u64>(),
                        "backfill finished; live ingest goes on"
                    ),
                    Err(e) => {
                        metrics::counter!("atlake_backfill_runs_failed_total").increment(1);
                        tracing::error!(error = %e, "backfill failed; live ingest goes on (see system.backfill)")
                    }
                }
                r
            });
            Backfill { stop, task }
        });
        let (pg_addr, pg_server) = pg.unzip();
        let (flight_addr, flight_server) = flight.unzip();
        crate::telemetry::register_zero_series(true, pg_addr.is_some(), flight_addr.is_some());
        Ok(Daemon {
            addr,
            pg_addr,
            flight_addr,
            ingest,
            server,
            pg_server,
            flight_server,
            stop_server,
            deadline: cfg.shutdown.deadline.0,
            backfill,
        })
    }

    /// Runs until `stop` resolves (then flushes, checkpoints and stops within the shutdown
    /// deadline) or until ingest fails by itself (a lost lease, a source that gave up).
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Summary, DaemonError> {
        let ended = tokio::select! {
            r = self.ingest.finished() => Some(r),
            _ = stop => None,
        };
        let _ = self.stop_server.send(true);
        if let Some(b) = self.backfill.take() {
            let _ = b.stop.send(true);
            match tokio::time::timeout(self.deadline, b.task).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "the backfill task failed"),
                Err(_) => {
                    tracing::warn!(deadline = ?self.deadline, "the backfill did not commit within the shutdown deadline; its uncommitted batch is fetched again next time")
                }
            }
        }
        let summary = match ended {
            Some(r) => r,
            None => {
                tracing::info!(deadline = ?self.deadline, "shutting down: flushing");
                self.ingest.stop(self.deadline).await
            }
        };
        join_front_end("Postgres", self.pg_server.take()).await;
        join_front_end("Flight SQL", self.flight_server.take()).await;
        match tokio::time::timeout(SHUTDOWN_GRACE, self.server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "the SQL endpoint failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "the SQL endpoint's task failed"),
            Err(_) => {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "requests still running at shutdown were cut off")
            }
        }
        Ok(summary?)
    }
}
