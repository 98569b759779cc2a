//! Assembles the service (Compute, health, reflection, the tower layers) and
//! serves it over HTTP/2 until told to stop, then drains: health goes
//! NOT_SERVING, new calls are refused, the listener closes, and calls in
//! flight get a bounded grace to finish.
//!
//! Connections are served with hyper directly rather than through tonic's
//! `Server`, whose built-in timeout layer would answer expired calls with
//! CANCELLED before the dispatcher could answer DEADLINE_EXCEEDED.

use std::{path::PathBuf, sync::Arc, time::Duration};

use http::{HeaderName, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use offload_proto::offload::{
    admin::v1::admin_server::AdminServer,
    v1::{compute_server::ComputeServer, jobs_server::JobsServer},
};
use offload_worker::{Allowances, Catalog, process::Settings};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Code, Status, service::Routes};
use tonic_health::ServingStatus;
use tower::ServiceBuilder;

use crate::{
    admin::AdminService,
    auth::AuthLayer,
    clients::Clients,
    config::Config,
    connection,
    dispatch::{DispatchOptions, Dispatcher},
    error::request_status,
    inflight::{Budget, layer::InflightLayer},
    isolated::{
        IsolatedOptions, Launch, Supervisor, WorkerOptions,
        program::Program,
        sandbox::{Sandbox, SandboxError},
    },
    jobs::{Jobs, service::JobsService},
    metrics,
    pool::Pool,
    service::ComputeService,
    tls::{self, Tls},
    web,
};

/// HTTP/2 flow-control window of each stream.
const STREAM_WINDOW: u32 = 1 << 20;
/// HTTP/2 flow-control window of each connection. As large as a stream's:
/// a connection then uploads about one large body at a time, in the order
/// its calls were sent, instead of interleaving all of them so that they
/// all arrive late together. Measured with 1 MiB hashes at 4 x 4 in flight
/// (the call's work done inline, to see the transport alone): p99 28-30 ms
/// with 4 MiB / 8 MiB windows, 23-26 ms with 1 MiB / 1 MiB, the plain tonic
/// server's 23 ms.
const CONNECTION_WINDOW: u32 = 1 << 20;
/// Largest HTTP/2 frame a client may send. A 1 MiB input comes in 4 DATA
/// frames instead of HTTP/2's default 64, each a wake-up and a pass through
/// the framing code (see `bench/PROFILING.md`, item 11).
const MAX_FRAME: u32 = 256 << 10;

/// The name health checks use for the Compute service.
pub const COMPUTE_SERVICE_NAME: &str = "offload.v1.Compute";

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A `[[client]]` table is invalid.
    #[error(transparent)]
    Clients(#[from] crate::clients::ClientSpecError),
    /// The rayon pool could not be built.
    #[error("cannot start the pool: {0}")]
    Pool(#[from] rayon::ThreadPoolBuildError),
    /// The reflection service could not load the descriptors.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The worker sandbox cannot be had as configured.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The metrics address could not be bound.
    #[error("cannot listen for metrics: {0}")]
    Metrics(#[from] std::io::Error),
    /// The job store named by --job-store cannot be opened.
    #[error("cannot open the job store {store}: {source}")]
    JobStore {
        /// What was named.
        store: String,
        /// Why.
        source: crate::jobs::store::StoreError,
    },
    /// The cache's database cannot be reached.
    #[error("cannot open the result cache's store: {source}")]
    CacheStore {
        /// Why.
        source: crate::cache::StoreError,
    },
}

/// Serves `catalog` as `config` says on `listener` until `shutdown` fires,
/// then drains. `on_serving` runs once the server accepts calls.
pub async fn serve(
    config: &Config,
    catalog: Catalog,
    listener: TcpListener,
    shutdown: CancellationToken,
    on_serving: impl FnOnce(),
) -> Result<(), ServeError> {
    let pool = Pool::new(config.pool_threads, config.queue_capacity)?;
    let sandbox = Sandbox::detect(config.worker_sandbox)?;
    sandbox.log_start();
    let front_port = listener.local_addr().map_or(0, |a| a.port());
    offload_worker::tasks::debug::set_front_port(front_port);
    let isolated = Supervisor::start(isolated_options(config, &catalog, &sandbox, front_port));
    let programs: Vec<Program> = config
        .worker_programs
        .iter()
        .map(|program| Program::start(program, config.queue_capacity, max_frame(config), &sandbox))
        .collect();
    let budget = Budget::new(config.max_inflight_bytes);
    budget.log_start(config.inflight_default, config.max_message_bytes);
    let clients = Clients::new(&config.clients)?;
    let dispatcher = Dispatcher::new(
        catalog,
        pool,
        isolated,
        programs,
        clients,
        budget,
        DispatchOptions {
            inline_threshold: config.inline_threshold,
            in_place_threshold: config.in_place_threshold,
            max_output_bytes: config.max_message_bytes,
            cache: open_cache(config).await?,
        },
    );
    let metrics_stop = CancellationToken::new();
    let _stop_metrics = metrics_stop.clone().drop_guard();
    let jobs = open_jobs(config).await?;
    // The console, on its own address or beside the metrics on theirs.
    let console = config.console_listen.map(|_| {
        let grpc_scheme = if config.tls.is_some() { "https" } else { "http" };
        Arc::new(crate::console::Console { grpc_port: front_port, grpc_scheme })
    });
    let mut cors_origins = config.cors_allowed_origins.clone();
    if let (Some(addr), Some(console)) = (config.console_listen, &console)
        && Some(addr) != config.metrics_listen
    {
        let listener = TcpListener::bind(addr).await?;
        cors_origins.extend(console_origins(&listener));
        tracing::info!("console on http://{}", listener.local_addr()?);
        tokio::spawn(crate::console::serve(listener, Arc::clone(console), metrics_stop.clone()));
    }
    if let Some(addr) = config.metrics_listen {
        let listener = metrics::bind(addr).await?;
        // Served until the very end, so the drain can be watched.
        let store = jobs.as_ref().ok().cloned();
        let shared = console.clone().filter(|_| config.console_listen == Some(addr));
        if shared.is_some() {
            cors_origins.extend(console_origins(&listener));
            tracing::info!("console on http://{}", listener.local_addr()?);
        }
        tokio::spawn(metrics::serve(listener, Arc::clone(&dispatcher), store, shared, metrics_stop.clone()));
    }
    // The job runner: claims while serving, then hands back what still runs
    // when the drain's grace is over.
    let (stop_claiming, hand_back, job_runs) = (CancellationToken::new(), CancellationToken::new(), TaskTracker::new());
    let runner = jobs.as_ref().ok().map(|jobs| {
        // Unique among every front sharing the store, even replicas of one
        // name whose pid is the same (1, in containers).
        let owner =
            format!("{}-{}-{:08x}", config.replica_name, std::process::id(), getrandom::u32().unwrap_or_default());
        let capacity = dispatcher.pool().threads() + config.workers;
        tokio::spawn(crate::jobs::runner::run(
            Arc::clone(jobs),
            Arc::clone(&dispatcher),
            owner,
            capacity,
            stop_claiming.clone(),
            hand_back.clone(),
            job_runs.clone(),
        ))
    });
    let in_flight = TaskTracker::new();
    let compute = ComputeService::new(
        Arc::clone(&dispatcher),
        &config.replica_name,
        config.batch_concurrency,
        config.max_message_bytes,
        in_flight.clone(),
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in ["", COMPUTE_SERVICE_NAME] {
        health.set_service_status(name, ServingStatus::Serving).await;
    }
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(offload_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let routes = Routes::new(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(
            ComputeServer::new(compute)
                .max_decoding_message_size(config.max_message_bytes)
                .max_encoding_message_size(config.max_message_bytes),
        )
        .add_service(
            JobsServer::new(JobsService::new(jobs, Arc::clone(&dispatcher)))
                .max_decoding_message_size(config.max_message_bytes)
                .max_encoding_message_size(config.max_message_bytes),
        )
        .add_service(AdminServer::new(AdminService::new(Arc::clone(&dispatcher), &config.replica_name)));
    let max_message_bytes = config.max_message_bytes;
    let counted = Arc::clone(&dispatcher);
    let service = ServiceBuilder::new()
        // Outermost: give oversized unary requests the API's status code.
        .map_response(move |response| rewrite_oversized(response, max_message_bytes, counted.metrics()))
        // Every request and response byte held is counted against the budget;
        // a call that does not fit is refused before its body is read.
        .layer(InflightLayer::new(Arc::clone(&dispatcher), max_message_bytes))
        // Browsers' preflight requests are answered before authentication
        // (they carry no credentials); without allowed origins there is no
        // CORS layer at all (it would add Vary headers to every response).
        .option_layer((!cors_origins.is_empty()).then(|| cors(&cors_origins)))
        // A call without credentials is refused before its body is read
        // (health checks pass).
        .layer(AuthLayer::new(Arc::clone(&dispatcher)))
        // gRPC-Web (application/grpc-web[-text]) becomes gRPC here; plain
        // gRPC goes by untouched.
        .layer(web::GrpcWebLayer)
        .service(routes);

    // HTTP/2 for gRPC; HTTP/1.1 too, for gRPC-Web from browsers (which
    // cannot speak HTTP/2 without TLS). The protocol is told apart by the
    // HTTP/2 preface.
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    http.http1().timer(TokioTimer::new()).keep_alive(true);
    http.http2()
        .timer(TokioTimer::new())
        // Large inputs need windows larger than HTTP/2's 64 KiB default.
        // Fixed, not adaptive: they bound what a connection can have in
        // flight unread (outside the in-flight budget), and under a flood of
        // large calls the adaptive window's BDP pings went unanswered, so
        // keepalive closed busy connections with every call on them.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(1024)
        // A call refused before its body is read (RESOURCE_EXHAUSTED: the
        // in-flight budget, a full queue) has its stream reset while the
        // client is still sending. h2 remembers 50 reset streams for a
        // second; late frames for one it forgot make it reset the stream
        // again, and by default a connection may cause 1024 such resets in
        // its life before it is closed (ENHANCE_YOUR_CALM), failing every
        // call on it. Under a sustained flood of refused calls that took
        // about 50 s (bench scenario 8). The limit guards against peers
        // that make a server reset streams whose work goes on; here a reset
        // call's handler is dropped and its task cancelled, and admission
        // bounds the rest, so it is off.
        .max_local_error_reset_streams(None)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    // Connections are told to finish when the drain is over (GOAWAY).
    let connections = TaskTracker::new();
    let close_connections = CancellationToken::new();
    // Loaded (and checked) with the configuration; watched from here.
    let tls = config.tls.clone();
    if let Some(tls) = &tls {
        tokio::spawn(tls.clone().watch(tls::RELOAD_CHECK, close_connections.clone()));
        tracing::info!(
            cert = %tls.cert().display(),
            mutual = tls.mutual(),
            "serving TLS{}",
            if tls.mutual() { " with client certificates required" } else { "" }
        );
    }

    // A worker program's tasks are known from its first worker's Hello:
    // calls are accepted once every program has one (or has failed).
    let ready = futures::future::join_all(dispatcher.programs().iter().map(Program::wait_ready)).await;
    for (program, ready) in dispatcher.programs().iter().zip(ready) {
        if !ready {
            tracing::warn!(
                worker.program = %program.name,
                "worker program {} is not ready; its tasks answer UNAVAILABLE until a worker starts",
                program.name
            );
        }
    }
    warn_if_open(config, dispatcher.clients());
    on_serving();
    tracing::info!(pool_threads = dispatcher.pool().threads(), tasks = dispatcher.catalog().iter().count(), "serving");
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let served = connection::serve(
                        http.clone(),
                        stream,
                        tls.as_ref().map(Tls::acceptor),
                        service.clone(),
                        config.connection_idle_timeout,
                        close_connections.clone(),
                    );
                    connections.spawn(async move {
                        if let Err(err) = served.await {
                            tracing::debug!(%peer, error = %err, "connection ended with an error");
                        }
                    });
                }
                Err(err) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shutdown.cancelled() => break,
        }
    }

    tracing::info!(grace = ?config.shutdown_grace, "draining");
    // Refuse first, then tell: once a health watcher sees NOT_SERVING, new
    // connections are already refused and new calls answered UNAVAILABLE.
    dispatcher.start_draining();
    // Closing our descriptor is not enough: a worker being spawned holds a
    // copy of every descriptor until its exec, and while any copy is open the
    // kernel keeps accepting connections that nobody will serve (they are
    // reset instead of refused). Shutting the socket down stops the listening
    // for every holder.
    if let Err(err) = socket2::SockRef::from(&listener).shutdown(std::net::Shutdown::Read) {
        tracing::warn!(error = %err, "cannot shut the listener down; closing it");
    }
    drop(listener);
    for name in ["", COMPUTE_SERVICE_NAME] {
        health.set_service_status(name, ServingStatus::NotServing).await;
    }
    in_flight.close();
    stop_claiming.cancel();
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        // Calls and jobs first; then connections get a moment to flush their
        // last responses (a health watch stream never ends on its own, so
        // this part does not wait for every connection).
        in_flight.wait().await;
        if runner.is_some() {
            job_runs.close();
            job_runs.wait().await;
        }
        close_connections.cancel();
        connections.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), connections.wait()).await;
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("drained"),
        Err(_) => {
            tracing::warn!(still_running = in_flight.len(), "shutdown grace ran out; stopping with calls in flight")
        }
    }
    // Jobs still running go back to the queue, for another front (or this
    // one, restarted): not lost, and not counted as a failed attempt.
    hand_back.cancel();
    if let Some(runner) = runner
        && tokio::time::timeout(Duration::from_secs(5), runner).await.is_err()
    {
        tracing::warn!("the job runner did not hand its jobs back within 5 s; their leases will lapse");
    }
    dispatcher.stop_workers(config.worker_kill_grace * 5).await;
    tracing::info!("stopped");
    Ok(())
}

/// The result cache, if it is on: in memory, or in the PostgreSQL database
/// it names (which must be reachable: a front that cannot share results
/// does not start).
async fn open_cache(config: &Config) -> Result<Option<Arc<crate::cache::Cache>>, ServeError> {
    use crate::{cache, config::CacheStore};
    let Some(settings) = &config.cache else {
        tracing::info!("result cache off (--cache-max-bytes 0)");
        return Ok(None);
    };
    let store: Arc<dyn cache::CacheStore> = match &settings.store {
        CacheStore::Memory => Arc::new(cache::memory::MemoryStore::new(settings.max_bytes, settings.ttl)),
        CacheStore::Postgres(url) => {
            let store = cache::postgres::PgCacheStore::connect(url, settings.max_bytes, settings.ttl)
                .await
                .map_err(|source| ServeError::CacheStore { source })?;
            tracing::info!(store = %store.describe(), "results cached in PostgreSQL {}", store.describe());
            Arc::new(store)
        }
    };
    Ok(Some(cache::Cache::new(store, settings.max_entry_bytes)))
}

/// The job store: the one --job-store names (a failure to open it stops the
/// server), else the default file (a failure leaves jobs unavailable, with
/// the reason, and serves calls all the same).
async fn open_jobs(config: &Config) -> Result<Result<Arc<Jobs>, String>, ServeError> {
    let (named, options) = (config.job_store.clone(), config.jobs.clone());
    let store = named.clone().unwrap_or_else(|| crate::jobs::default_store_path().display().to_string());
    let opened = Jobs::open(&store, options).await;
    match (opened, named) {
        (Ok(jobs), _) => {
            tracing::info!(store = %jobs.description, "jobs kept in {}", jobs.description);
            Ok(Ok(jobs))
        }
        (Err(source), Some(_)) => Err(ServeError::JobStore { store, source }),
        (Err(err), None) => {
            let why = format!("the default job store {store} cannot be opened ({err}); set --job-store");
            tracing::warn!("{why}");
            Ok(Err(why))
        }
    }
}

/// The origins the console served on `listener` calls the gRPC port from.
fn console_origins(listener: &TcpListener) -> Vec<HeaderValue> {
    let Ok(addr) = listener.local_addr() else { return Vec::new() };
    crate::console::Console::origins(addr).iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect()
}

/// CORS for gRPC-Web callers in browsers: the origins allowed (none: no
/// cross-origin call is allowed), the headers gRPC-Web sends and reads.
fn cors(origins: &[HeaderValue]) -> tower_http::cors::CorsLayer {
    use http::header::{AUTHORIZATION, CONTENT_TYPE};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow =
        if origins.iter().any(|o| o == "*") { AllowOrigin::any() } else { AllowOrigin::list(origins.iter().cloned()) };
    let header = HeaderName::from_static;
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([http::Method::POST, http::Method::OPTIONS])
        .allow_headers([
            CONTENT_TYPE,
            AUTHORIZATION,
            header("x-grpc-web"),
            header("x-user-agent"),
            header("grpc-timeout"),
            header("offload-client"),
            header("offload-priority"),
            header("offload-cache"),
        ])
        .expose_headers([
            header("grpc-status"),
            header("grpc-message"),
            header("grpc-status-details-bin"),
            header("offload-cache"),
        ])
        .max_age(Duration::from_secs(24 * 3600))
}

/// Says so when anyone who reaches a non-loopback port can run every task.
fn warn_if_open(config: &Config, clients: &Clients) {
    let mutual_tls = config.tls.as_ref().is_some_and(Tls::mutual);
    if config.listen.ip().is_loopback() {
        return;
    }
    if clients.authenticating() && config.tls.is_none() {
        tracing::warn!(
            listen = %config.listen,
            "bearer tokens reach {} in plaintext, readable on the network; serve TLS (--tls-cert, --tls-key)",
            config.listen
        );
    }
    if !clients.authenticating() && !mutual_tls {
        tracing::warn!(
            listen = %config.listen,
            "serving {} without authentication: anyone who reaches it can run every task; declare [[client]] \
             tables with token_sha256 or cert_san, or require client certificates (--tls-client-ca)",
            config.listen
        );
    }
}

/// The flag with which this executable, re-executed, becomes a worker.
pub const WORKER_PROCESS_FLAG: &str = "--worker-process";

/// How Offload's own worker processes are started and supervised.
pub(crate) fn isolated_options(
    config: &Config,
    catalog: &Catalog,
    sandbox: &Sandbox,
    front_port: u16,
) -> IsolatedOptions {
    let (program, args) = match &config.worker_program {
        Some(program) => (program.clone(), Vec::new()),
        // /proc/self/exe still works when the file was replaced by a rebuild.
        None => (PathBuf::from("/proc/self/exe"), vec![WORKER_PROCESS_FLAG.to_string()]),
    };
    let executable = program.canonicalize().unwrap_or_else(|_| program.clone());
    // The exec programs run inside these workers: each may be run, with
    // what its table allows (all of it, for every one of them).
    let mut allow = Allowances::default();
    for exec in &config.exec {
        allow.exec.push(PathBuf::from(&exec.program));
        allow.extend(&exec.sandbox);
    }
    IsolatedOptions {
        workers: config.workers,
        queue_capacity: config.queue_capacity,
        worker: WorkerOptions {
            program,
            executable,
            sandbox: sandbox.clone(),
            allow,
            args,
            launch: Launch::Offload {
                settings: Settings {
                    memory_limit: config.worker_memory_limit_bytes,
                    nice: config.worker_nice,
                    catalog: config.catalog_options(),
                    max_frame: max_frame(config),
                    front_port,
                },
                tasks: catalog.iter().map(|t| t.spec().name).collect(),
            },
            handshake_timeout: Duration::from_secs(10),
            heartbeat_interval: config.worker_heartbeat,
            heartbeat_timeout: config.worker_heartbeat_timeout,
            kill_grace: config.worker_kill_grace,
        },
        max_tasks_per_worker: config.worker_max_tasks,
        max_worker_rss_bytes: config.worker_max_rss_bytes,
    }
}

/// Largest worker protocol frame: room for the protobuf fields around the
/// largest message.
pub(crate) fn max_frame(config: &Config) -> usize {
    config.max_message_bytes + (64 << 10)
}

/// Rewrites tonic's OUT_OF_RANGE answer to an oversized request (sent as a
/// trailers-only response, so the status is in the headers), and counts the
/// call: no handler saw it.
fn rewrite_oversized<B>(
    mut response: http::Response<B>,
    max_message_bytes: usize,
    metrics: &crate::metrics::Metrics,
) -> http::Response<B> {
    let headers = response.headers_mut();
    if headers.get("grpc-status") == Some(&HeaderValue::from_static("11"))
        && let Some(status) = Status::from_header_map(headers).filter(|s| s.code() == Code::OutOfRange)
    {
        metrics.refused("unknown", "unknown", Code::ResourceExhausted, Some("too_large"));
        headers.remove("grpc-message");
        let rewritten = request_status(status, max_message_bytes);
        if rewritten.add_header(headers).is_err() {
            headers.insert("grpc-status", HeaderValue::from(Code::ResourceExhausted as i32));
        }
    }
    response
}
