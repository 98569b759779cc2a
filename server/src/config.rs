//! Configuration: command-line flags, each with an `OFFLOAD_*` environment
//! fallback, over an optional TOML file, over documented defaults. Raw input
//! is validated once into [`Config`]; a bad value is a [`ConfigError`], which
//! `main` reports with exit status 64.

use std::{
    net::SocketAddr,
    num::{NonZeroU32, NonZeroU64, NonZeroUsize},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Parser, ValueEnum};
use offload_worker::{CatalogOptions, tasks::exec::ExecSpec};

use crate::{
    clients::{ClientSpec, Clients},
    inflight::{self, MemorySource},
    isolated::{
        program::{ProgramConfig, ProgramDefaults, ProgramSpec},
        sandbox::SandboxMode,
    },
    telemetry::{self, TraceSettings},
    tls::{Tls, TlsFiles},
};
use serde::Deserialize;

/// Default address: loopback only, so a first run exposes nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default largest request or response message.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Default largest output of `decompress.zstd`.
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: usize = 256 << 20;
/// Default number of calls that may wait for the pool.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;
/// Default cost below which a task runs on the calling tokio thread.
pub const DEFAULT_INLINE_THRESHOLD_US: u64 = 20;
/// Default cost below which a unary POOL call runs in place when the pool is idle.
pub const DEFAULT_IN_PLACE_THRESHOLD_US: u64 = 5_000;
/// Default number of items of one ExecuteBatch stream run at once.
pub const DEFAULT_BATCH_CONCURRENCY: usize = 64;
/// Default --cache-max-bytes: 128 MiB.
pub const DEFAULT_CACHE_MAX_BYTES: usize = 128 << 20;
/// Default --cache-max-entry-bytes: 8 MiB.
pub const DEFAULT_CACHE_MAX_ENTRY_BYTES: usize = 8 << 20;
/// Default time in-flight calls get to finish on SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: f64 = 30.0;
/// Default memory limit of a worker (RLIMIT_AS; an RSS watch for programs).
pub const DEFAULT_WORKER_MEMORY_LIMIT_BYTES: u64 = 2 << 30;
/// Default tasks a worker runs before it is recycled.
pub const DEFAULT_WORKER_MAX_TASKS: u64 = 1_000_000;
/// Default resident memory past which a worker is recycled.
pub const DEFAULT_WORKER_MAX_RSS_BYTES: u64 = 512 << 20;
/// Default wait between the rungs of the stop ladder, in ms.
pub const DEFAULT_WORKER_KILL_GRACE_MS: u64 = 100;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    Auto,
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// Offload's front service: runs CPU-bound tasks for gRPC clients.
///
/// Every flag also reads an OFFLOAD_* environment variable and a key of the
/// TOML file given by --config (same name with '_' for '-'); flags win over
/// the environment, which wins over the file.
//
// The same struct is the file's shape: each field is optional so that what
// the command line leaves unset can come from the file, then the default.
#[derive(Debug, Clone, Default, Parser, Deserialize)]
#[command(name = "offload-server", version, about, long_about = None, args_override_self = true)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML file with any of the settings below (keys as flag names, with '_').
    #[arg(long, env = "OFFLOAD_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Check the configuration, start one of Offload's worker processes and
    /// one worker of each `[[worker_program]]` through its handshake (in the
    /// worker sandbox), print how each went, and exit: 0 if all started, 1
    /// if one failed, 64 for a bad configuration. Serves nothing.
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,

    /// Address to serve gRPC on. Port 0 picks a free port (logged at start).
    /// [default: 127.0.0.1:50051]
    #[arg(long, env = "OFFLOAD_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Front replicas on this machine, all serving --listen (SO_REUSEPORT):
    /// a number, or "auto" for one per core. With more than one, this
    /// process supervises them: restarts dead ones, rolls them on SIGHUP,
    /// drains them all on SIGTERM. [default: 1]
    #[arg(long, env = "OFFLOAD_REPLICAS", value_name = "N|auto")]
    pub replicas: Option<String>,

    /// Set by the replica supervisor on its replicas: bind --listen with
    /// SO_REUSEPORT, die with the supervisor, say "ready" on stdout.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub replica: bool,

    /// List and run the debug.* tasks (for tests and benchmarks). The
    /// environment variable takes 1/0, true/false, yes/no or on/off.
    #[arg(
        long,
        env = "OFFLOAD_DEBUG_TASKS",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = boolish("OFFLOAD_DEBUG_TASKS"),
    )]
    pub debug_tasks: Option<bool>,

    /// Threads of the POOL executor. [default: the available cores]
    #[arg(long, env = "OFFLOAD_POOL_THREADS", value_name = "N")]
    pub pool_threads: Option<NonZeroUsize>,

    /// Calls that may wait for a pool thread, and separately for a worker
    /// process; beyond it calls fail at once with RESOURCE_EXHAUSTED. [default: 1024]
    #[arg(long, env = "OFFLOAD_QUEUE_CAPACITY", value_name = "N")]
    pub queue_capacity: Option<NonZeroUsize>,

    /// Largest request or response message, in bytes; a larger request fails
    /// with RESOURCE_EXHAUSTED. [default: 67108864 (64 MiB)]
    #[arg(long, env = "OFFLOAD_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<NonZeroUsize>,

    /// Request and response bytes the front holds at once; a call whose
    /// request message does not fit is refused with RESOURCE_EXHAUSTED before
    /// its body is read. [default: a quarter of the memory limit (cgroup,
    /// else physical memory), at most 2 GiB, shared among --replicas]
    #[arg(long, env = "OFFLOAD_MAX_INFLIGHT_BYTES", value_name = "BYTES")]
    pub max_inflight_bytes: Option<NonZeroUsize>,

    /// Largest output decompress.zstd may produce, in bytes.
    /// [default: 268435456 (256 MiB)]
    #[arg(long, env = "OFFLOAD_MAX_DECOMPRESSED_BYTES", value_name = "BYTES")]
    pub max_decompressed_bytes: Option<NonZeroUsize>,

    /// Tasks whose expected cost is below this many microseconds run on the
    /// calling I/O thread instead of hopping to the pool; 0 disables it. [default: 20]
    #[arg(long, env = "OFFLOAD_INLINE_THRESHOLD_US", value_name = "US")]
    pub inline_threshold_us: Option<u64>,

    /// Unary POOL calls whose expected cost is below this many microseconds
    /// run on the calling I/O thread, holding a pool slot, when a slot is
    /// free and no call waits; 0 disables it. [default: 5000]
    #[arg(long, env = "OFFLOAD_IN_PLACE_THRESHOLD_US", value_name = "US")]
    pub in_place_threshold_us: Option<u64>,

    /// Items of one ExecuteBatch stream run at once; further items are read
    /// as earlier ones finish. [default: 64]
    #[arg(long, env = "OFFLOAD_BATCH_CONCURRENCY", value_name = "N")]
    pub batch_concurrency: Option<NonZeroUsize>,

    /// Seconds a connection may go without a call in flight before it is
    /// closed (GOAWAY; clients reconnect); 0 for never. [default: 300]
    #[arg(long, env = "OFFLOAD_CONNECTION_IDLE_TIMEOUT_SECS", value_name = "SECS")]
    pub connection_idle_timeout_secs: Option<u64>,

    /// Seconds in-flight calls get to finish after SIGTERM/SIGINT. [default: 30]
    #[arg(long, env = "OFFLOAD_SHUTDOWN_GRACE_SECS", value_name = "SECS")]
    pub shutdown_grace_secs: Option<f64>,

    /// Where jobs are kept: a SQLite file path (created if need be), or a
    /// postgres:// URL of a database shared by fronts on any hosts.
    /// [default: $XDG_STATE_HOME/offload/jobs.sqlite3, else
    /// ~/.local/state/offload/jobs.sqlite3]
    #[arg(long, env = "OFFLOAD_JOB_STORE", value_name = "PATH|URL")]
    pub job_store: Option<String>,

    /// Seconds a claimed job's lease lasts; its front renews it every third
    /// of that, and another front runs the job again once it lapses. [default: 30]
    #[arg(long, env = "OFFLOAD_JOB_LEASE_SECS", value_name = "SECS")]
    pub job_lease_secs: Option<f64>,

    /// Runs a job gets before a lost front fails it. [default: 3]
    #[arg(long, env = "OFFLOAD_JOB_MAX_ATTEMPTS", value_name = "N")]
    pub job_max_attempts: Option<NonZeroU32>,

    /// Seconds finished jobs are kept. [default: 86400]
    #[arg(long, env = "OFFLOAD_JOB_RETENTION_SECS", value_name = "SECS")]
    pub job_retention_secs: Option<u64>,

    /// Largest output a job keeps; over it the job fails RESOURCE_EXHAUSTED.
    /// [default: --max-message-bytes]
    #[arg(long, env = "OFFLOAD_MAX_JOB_OUTPUT_BYTES", value_name = "BYTES")]
    pub max_job_output_bytes: Option<NonZeroUsize>,

    /// Bytes of results the in-memory result cache holds at most, the least
    /// recently used evicted first; 0 turns the cache off. [default: 134217728]
    #[arg(long, env = "OFFLOAD_CACHE_MAX_BYTES", value_name = "BYTES")]
    pub cache_max_bytes: Option<usize>,

    /// Results larger than this are never cached. [default: 8388608]
    #[arg(long, env = "OFFLOAD_CACHE_MAX_ENTRY_BYTES", value_name = "BYTES")]
    pub cache_max_entry_bytes: Option<usize>,

    /// Where cached results are kept: `memory` (this front's own), or a
    /// `postgres://` database every front shares. [default: the job store's
    /// database when it is PostgreSQL, else memory]
    #[arg(long, env = "OFFLOAD_CACHE_STORE", value_name = "memory|URL")]
    pub cache_store: Option<String>,

    /// Seconds a cached result is kept. [default: 86400]
    #[arg(long, env = "OFFLOAD_CACHE_TTL_SECS", value_name = "SECS")]
    pub cache_ttl_secs: Option<NonZeroU64>,

    /// Name reported in TaskStats.replica. [default: the host name]
    #[arg(long, env = "OFFLOAD_REPLICA_NAME", value_name = "NAME")]
    pub replica_name: Option<String>,

    /// Serve gRPC over TLS with this PEM certificate chain (with --tls-key).
    /// The files are reloaded when they change. A relative path in the
    /// config file is relative to the file's folder.
    #[arg(long, env = "OFFLOAD_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "OFFLOAD_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by a CA in this PEM file (mutual
    /// TLS; needs --tls-cert).
    #[arg(long, env = "OFFLOAD_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,

    /// Origins allowed to call from browsers (gRPC-Web with CORS), comma
    /// separated, e.g. `https://app.example.com`; `*` for any. [default: none]
    #[arg(long, env = "OFFLOAD_CORS_ALLOWED_ORIGINS", value_name = "ORIGINS", value_delimiter = ',')]
    #[serde(default)]
    pub cors_allowed_origins: Vec<String>,

    /// Serve the web console at http://ADDR/ (it calls the gRPC port through
    /// gRPC-Web); may be the metrics address. [default: off]
    #[arg(long, env = "OFFLOAD_CONSOLE_LISTEN", value_name = "ADDR")]
    pub console_listen: Option<SocketAddr>,

    /// Address of the Prometheus endpoint (GET /metrics); off when unset.
    #[arg(long, env = "OFFLOAD_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// OTLP/gRPC endpoint to export traces to (e.g. http://jaeger:4317);
    /// traces are off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// service.name of the exported traces. [default: offload]
    #[arg(long, env = "OTEL_SERVICE_NAME", value_name = "NAME")]
    pub otel_service_name: Option<String>,

    /// Trace sampler: always_on, always_off, traceidratio,
    /// parentbased_always_on, parentbased_always_off or
    /// parentbased_traceidratio. [default: parentbased_always_on]
    #[arg(long, env = "OTEL_TRACES_SAMPLER", value_name = "SAMPLER")]
    pub otel_traces_sampler: Option<String>,

    /// The sampler's argument: the ratio for the *traceidratio samplers.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", value_name = "ARG")]
    pub otel_traces_sampler_arg: Option<String>,

    /// Extra resource attributes of the exported spans, as key=value,key=value.
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES", value_name = "ATTRS")]
    pub otel_resource_attributes: Option<String>,

    /// Log format; the level comes from RUST_LOG (default info). [default: auto]
    #[arg(long, env = "OFFLOAD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Worker processes of the ISOLATED executor. [default: the available cores]
    #[arg(long, env = "OFFLOAD_WORKERS", value_name = "N")]
    pub workers: Option<NonZeroUsize>,

    /// Address-space limit of each worker in bytes (RLIMIT_AS); 0 for none.
    /// [default: 2147483648 (2 GiB)]
    #[arg(long, env = "OFFLOAD_WORKER_MEMORY_LIMIT_BYTES", value_name = "BYTES")]
    pub worker_memory_limit_bytes: Option<u64>,

    /// Nice level of the workers (0..=19), so the front's own threads stay
    /// responsive when workers saturate the cores. [default: 10]
    #[arg(long, env = "OFFLOAD_WORKER_NICE", value_name = "N")]
    pub worker_nice: Option<i32>,

    /// Tasks after which a worker is replaced (between tasks); 0 for never.
    /// [default: 1000000]
    #[arg(long, env = "OFFLOAD_WORKER_MAX_TASKS", value_name = "N")]
    pub worker_max_tasks: Option<u64>,

    /// Resident memory in bytes after which a worker is replaced (between
    /// tasks); 0 for never. [default: 536870912 (512 MiB)]
    #[arg(long, env = "OFFLOAD_WORKER_MAX_RSS_BYTES", value_name = "BYTES")]
    pub worker_max_rss_bytes: Option<u64>,

    /// Milliseconds between heartbeats to each worker. [default: 1000]
    #[arg(long, env = "OFFLOAD_WORKER_HEARTBEAT_MS", value_name = "MS")]
    pub worker_heartbeat_ms: Option<u64>,

    /// Milliseconds of silence after which a worker counts as hung and is
    /// killed. [default: 5000]
    #[arg(long, env = "OFFLOAD_WORKER_HEARTBEAT_TIMEOUT_MS", value_name = "MS")]
    pub worker_heartbeat_timeout_ms: Option<u64>,

    /// Milliseconds each rung of the stop ladder (cancel frame, SIGTERM)
    /// waits before the next (SIGTERM, SIGKILL). [default: 100]
    #[arg(long, env = "OFFLOAD_WORKER_KILL_GRACE_MS", value_name = "MS")]
    pub worker_kill_grace_ms: Option<u64>,

    /// The sandbox of worker processes: auto (every piece the kernel
    /// offers: Landlock, seccomp, a network namespace, no_new_privs), strict
    /// (all of them or no start), off. [default: auto]
    #[arg(long, env = "OFFLOAD_WORKER_SANDBOX", value_name = "MODE")]
    pub worker_sandbox: Option<SandboxMode>,

    /// Worker program to run instead of re-executing this server in worker
    /// mode (for example the offload-worker binary).
    #[arg(long, env = "OFFLOAD_WORKER_PROGRAM", value_name = "PATH")]
    #[serde(skip)]
    pub worker_program: Option<PathBuf>,

    /// The file's `worker_program` key: the path of --worker-program, or
    /// `[[worker_program]]` tables declaring worker programs in any
    /// language (see the README).
    #[arg(skip)]
    #[serde(rename = "worker_program", default, deserialize_with = "worker_program_key")]
    pub worker_program_file: Option<WorkerProgramKey>,

    /// External programs served as `exec.*` tasks: `[[exec]]` tables of the
    /// config file only (see the README).
    #[arg(skip)]
    #[serde(default)]
    pub exec: Vec<ExecSpec>,

    /// Clients with a weight in the fair share or an in-flight limit:
    /// `[[client]]` tables of the config file only (see the README).
    #[arg(skip)]
    #[serde(default)]
    pub client: Vec<ClientSpec>,
}

/// What the file's `worker_program` key holds.
#[derive(Debug, Clone)]
pub enum WorkerProgramKey {
    /// `worker_program = "/path"`: the --worker-program setting.
    Path(PathBuf),
    /// `[[worker_program]]` tables.
    Programs(Vec<ProgramSpec>),
}

fn worker_program_key<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<WorkerProgramKey>, D::Error> {
    use serde::de::Error as _;
    match toml::Value::deserialize(deserializer)? {
        toml::Value::String(path) => Ok(Some(WorkerProgramKey::Path(path.into()))),
        tables @ toml::Value::Array(_) => {
            tables.try_into().map(|programs| Some(WorkerProgramKey::Programs(programs))).map_err(D::Error::custom)
        }
        _ => Err(D::Error::custom("worker_program is a path (as --worker-program) or [[worker_program]] tables")),
    }
}

impl Args {
    /// Fills what `self` leaves unset from `file`.
    fn or(self, file: Args) -> Args {
        Args {
            config: self.config,
            check_config: self.check_config,
            listen: self.listen.or(file.listen),
            replicas: self.replicas.or(file.replicas),
            replica: self.replica,
            debug_tasks: self.debug_tasks.or(file.debug_tasks),
            pool_threads: self.pool_threads.or(file.pool_threads),
            queue_capacity: self.queue_capacity.or(file.queue_capacity),
            max_message_bytes: self.max_message_bytes.or(file.max_message_bytes),
            max_inflight_bytes: self.max_inflight_bytes.or(file.max_inflight_bytes),
            max_decompressed_bytes: self.max_decompressed_bytes.or(file.max_decompressed_bytes),
            inline_threshold_us: self.inline_threshold_us.or(file.inline_threshold_us),
            in_place_threshold_us: self.in_place_threshold_us.or(file.in_place_threshold_us),
            batch_concurrency: self.batch_concurrency.or(file.batch_concurrency),
            connection_idle_timeout_secs: self.connection_idle_timeout_secs.or(file.connection_idle_timeout_secs),
            shutdown_grace_secs: self.shutdown_grace_secs.or(file.shutdown_grace_secs),
            job_store: self.job_store.or(file.job_store),
            job_lease_secs: self.job_lease_secs.or(file.job_lease_secs),
            job_max_attempts: self.job_max_attempts.or(file.job_max_attempts),
            job_retention_secs: self.job_retention_secs.or(file.job_retention_secs),
            max_job_output_bytes: self.max_job_output_bytes.or(file.max_job_output_bytes),
            cache_max_bytes: self.cache_max_bytes.or(file.cache_max_bytes),
            cache_store: self.cache_store.or(file.cache_store),
            cache_max_entry_bytes: self.cache_max_entry_bytes.or(file.cache_max_entry_bytes),
            cache_ttl_secs: self.cache_ttl_secs.or(file.cache_ttl_secs),
            replica_name: self.replica_name.or(file.replica_name),
            log_format: self.log_format.or(file.log_format),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            console_listen: self.console_listen.or(file.console_listen),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            tls_client_ca: self.tls_client_ca.or(file.tls_client_ca),
            cors_allowed_origins: if self.cors_allowed_origins.is_empty() {
                file.cors_allowed_origins
            } else {
                self.cors_allowed_origins
            },
            otlp_endpoint: self.otlp_endpoint.or(file.otlp_endpoint),
            otel_service_name: self.otel_service_name.or(file.otel_service_name),
            otel_traces_sampler: self.otel_traces_sampler.or(file.otel_traces_sampler),
            otel_traces_sampler_arg: self.otel_traces_sampler_arg.or(file.otel_traces_sampler_arg),
            otel_resource_attributes: self.otel_resource_attributes.or(file.otel_resource_attributes),
            workers: self.workers.or(file.workers),
            worker_memory_limit_bytes: self.worker_memory_limit_bytes.or(file.worker_memory_limit_bytes),
            worker_nice: self.worker_nice.or(file.worker_nice),
            worker_max_tasks: self.worker_max_tasks.or(file.worker_max_tasks),
            worker_max_rss_bytes: self.worker_max_rss_bytes.or(file.worker_max_rss_bytes),
            worker_heartbeat_ms: self.worker_heartbeat_ms.or(file.worker_heartbeat_ms),
            worker_heartbeat_timeout_ms: self.worker_heartbeat_timeout_ms.or(file.worker_heartbeat_timeout_ms),
            worker_kill_grace_ms: self.worker_kill_grace_ms.or(file.worker_kill_grace_ms),
            worker_sandbox: self.worker_sandbox.or(file.worker_sandbox),
            worker_program: self.worker_program.or(match &file.worker_program_file {
                Some(WorkerProgramKey::Path(path)) => Some(path.clone()),
                _ => None,
            }),
            worker_program_file: file.worker_program_file,
            exec: if self.exec.is_empty() { file.exec } else { self.exec },
            client: if self.client.is_empty() { file.client } else { self.client },
        }
    }
}

/// TLS as the settings ask for it, loaded (a server that cannot serve TLS
/// as asked does not start in plaintext).
fn tls(a: &Args) -> Result<Option<Tls>, ConfigError> {
    let files = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => {
            TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: a.tls_client_ca.clone() }
        }
        (None, None) if a.tls_client_ca.is_some() => {
            return Err(invalid("tls-client-ca", "needs --tls-cert and --tls-key (mutual TLS is TLS first)".into()));
        }
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(invalid("tls-cert", "needs --tls-key too".into())),
        (None, Some(_)) => return Err(invalid("tls-key", "needs --tls-cert too".into())),
    };
    Tls::load(files).map(Some).map_err(|e| invalid("tls-cert", e.to_string()))
}

/// The allowed origins: `*`, or each a scheme and host with an optional
/// port and nothing after (what a browser sends in `Origin`).
fn cors_origins(origins: &[String]) -> Result<Vec<http::HeaderValue>, ConfigError> {
    let bad = |origin: &str, why: &str| invalid("cors-allowed-origins", format!("{origin:?} {why}"));
    let mut out = Vec::new();
    for origin in origins.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
        if origin != "*" {
            let uri: http::Uri =
                origin.parse().map_err(|_| bad(origin, "is not an origin like https://app.example.com"))?;
            if uri.scheme().is_none() || uri.host().is_none() || uri.path_and_query().is_some_and(|p| p != "/") {
                return Err(bad(origin, "is not an origin like https://app.example.com (scheme and host, no path)"));
            }
        }
        out.push(http::HeaderValue::from_str(origin.trim_end_matches('/')).map_err(|_| bad(origin, "is not ASCII"))?);
    }
    Ok(out)
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named by --config.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file named by --config.
        path: PathBuf,
        /// What is wrong.
        source: Box<toml::de::Error>,
    },
    /// A value is out of its range.
    #[error("invalid setting {name}: {reason}")]
    Invalid {
        /// The setting's flag name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Where cached results are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStore {
    /// In this front's memory.
    Memory,
    /// In a PostgreSQL database (this URL) every front shares.
    Postgres(String),
}

/// The result cache's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    /// Where results are kept.
    pub store: CacheStore,
    /// Bytes of results held at most.
    pub max_bytes: usize,
    /// Larger results are never stored.
    pub max_entry_bytes: usize,
    /// How long a result is kept.
    pub ttl: Duration,
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to serve gRPC on.
    pub listen: SocketAddr,
    /// Replicas to supervise; 1 means this process serves.
    pub replicas: usize,
    /// Whether this process is a replica under a supervisor.
    pub replica: bool,
    /// Whether the debug.* tasks are served.
    pub debug_tasks: bool,
    /// Threads of the rayon pool.
    pub pool_threads: usize,
    /// Calls that may wait, per executor.
    pub queue_capacity: usize,
    /// Largest request or response message.
    pub max_message_bytes: usize,
    /// Request and response bytes held at once.
    pub max_inflight_bytes: usize,
    /// Where the default of `max_inflight_bytes` came from, for the log;
    /// None when it was set.
    pub inflight_default: Option<(u64, MemorySource)>,
    /// Largest output of decompress.zstd.
    pub max_decompressed_bytes: usize,
    /// Cost under which tasks run inline on the I/O thread.
    pub inline_threshold: Duration,
    /// Cost under which unary POOL calls run in place when the pool is idle.
    pub in_place_threshold: Duration,
    /// Items of one batch stream run at once.
    pub batch_concurrency: usize,
    /// Time a connection may go without a call; None for ever.
    pub connection_idle_timeout: Option<Duration>,
    /// Time in-flight calls get on shutdown.
    pub shutdown_grace: Duration,
    /// The job store named (None: the default file).
    pub job_store: Option<String>,
    /// How jobs are run.
    pub jobs: crate::jobs::JobOptions,
    /// The result cache; None when it is off.
    pub cache: Option<CacheSettings>,
    /// Name reported in TaskStats.replica.
    pub replica_name: String,
    /// Log format.
    pub log_format: LogFormat,
    /// TLS on the gRPC port, if configured.
    pub tls: Option<Tls>,
    /// The workers' sandbox.
    pub worker_sandbox: SandboxMode,
    /// Origins allowed to call through gRPC-Web from browsers.
    pub cors_allowed_origins: Vec<http::HeaderValue>,
    /// Address of the metrics endpoint, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// Web console address.
    pub console_listen: Option<SocketAddr>,
    /// Where traces go.
    pub traces: TraceSettings,
    /// Worker processes.
    pub workers: usize,
    /// RLIMIT_AS of each worker; 0 for none.
    pub worker_memory_limit_bytes: u64,
    /// Nice level of the workers.
    pub worker_nice: i32,
    /// Tasks per worker before recycling; 0 for never.
    pub worker_max_tasks: u64,
    /// Resident memory per worker before recycling; 0 for never.
    pub worker_max_rss_bytes: u64,
    /// Interval between heartbeats.
    pub worker_heartbeat: Duration,
    /// Silence after which a worker is killed.
    pub worker_heartbeat_timeout: Duration,
    /// Wait between rungs of the stop ladder.
    pub worker_kill_grace: Duration,
    /// Worker program; None to re-execute this server.
    pub worker_program: Option<PathBuf>,
    /// External programs served as tasks.
    pub exec: Vec<ExecSpec>,
    /// Declared clients (checked).
    pub clients: Vec<ClientSpec>,
    /// Worker programs in any language, with their own workers and tasks.
    pub worker_programs: Vec<ProgramConfig>,
}

impl Config {
    /// What the configuration adds to a program's tasks: the debug tasks
    /// and the exec programs, and the limits tasks obey.
    pub fn catalog_options(&self) -> CatalogOptions {
        CatalogOptions {
            debug_tasks: self.debug_tasks,
            max_decompressed_bytes: self.max_decompressed_bytes,
            exec: self.exec.clone(),
        }
    }

    /// Reads the file named by `args` (if any) and validates the result.
    pub fn load(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            None => Args::default(),
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                let mut file: Args = toml::from_str(&text)
                    .map_err(|source| ConfigError::Parse { path: path.clone(), source: Box::new(source) })?;
                // The file's paths are relative to its folder.
                let dir = path.parent().unwrap_or(Path::new(""));
                for tls_path in [&mut file.tls_cert, &mut file.tls_key, &mut file.tls_client_ca].into_iter().flatten() {
                    *tls_path = dir.join(&*tls_path);
                }
                file
            }
        };
        let a = args.or(file);
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let grace = a.shutdown_grace_secs.unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECS);
        if !(0.0..=86_400.0).contains(&grace) {
            return Err(invalid("shutdown-grace-secs", format!("{grace} is not in 0..=86400")));
        }
        let max_message_bytes = a.max_message_bytes.map_or(DEFAULT_MAX_MESSAGE_BYTES, NonZeroUsize::get);
        if max_message_bytes > (u32::MAX as usize) / 2 {
            return Err(invalid("max-message-bytes", format!("{max_message_bytes} exceeds {}", u32::MAX / 2)));
        }
        let job_lease = a.job_lease_secs.unwrap_or(30.0);
        if !(0.3..=3600.0).contains(&job_lease) {
            return Err(invalid("job-lease-secs", format!("{job_lease} is not in 0.3..=3600")));
        }
        let worker_nice = a.worker_nice.unwrap_or(10);
        if !(0..=19).contains(&worker_nice) {
            return Err(invalid("worker-nice", format!("{worker_nice} is not in 0..=19")));
        }
        let millis = |value: Option<u64>, default: u64| Duration::from_millis(value.unwrap_or(default));
        let worker_heartbeat = millis(a.worker_heartbeat_ms, 1000);
        let worker_heartbeat_timeout = millis(a.worker_heartbeat_timeout_ms, 5000);
        if worker_heartbeat.is_zero() || worker_heartbeat_timeout <= worker_heartbeat {
            return Err(invalid(
                "worker-heartbeat-timeout-ms",
                "must be longer than a non-zero --worker-heartbeat-ms".to_string(),
            ));
        }
        if let Some(program) = &a.worker_program
            && !program.is_file()
        {
            return Err(invalid("worker-program", format!("{} is not a file", program.display())));
        }
        for (i, spec) in a.exec.iter().enumerate() {
            spec.validate().map_err(|e| invalid("exec", e.to_string()))?;
            if a.exec[..i].iter().any(|other| other.name == spec.name) {
                return Err(invalid("exec", format!("task {:?} is declared twice", spec.name)));
            }
        }
        Clients::new(&a.client).map_err(|e| invalid("client", e.to_string()))?;
        let worker_programs = match &a.worker_program_file {
            Some(WorkerProgramKey::Programs(specs)) => {
                // Relative paths are relative to the file that holds them.
                let base = match args_config_dir(&a) {
                    Some(dir) => dir,
                    None => std::env::current_dir().map_err(|e| invalid("worker_program", e.to_string()))?,
                };
                let defaults = ProgramDefaults {
                    nice: worker_nice,
                    memory_limit: a.worker_memory_limit_bytes.unwrap_or(DEFAULT_WORKER_MEMORY_LIMIT_BYTES),
                    max_tasks: a.worker_max_tasks.unwrap_or(DEFAULT_WORKER_MAX_TASKS),
                    max_rss_bytes: a.worker_max_rss_bytes.unwrap_or(DEFAULT_WORKER_MAX_RSS_BYTES),
                    heartbeat: worker_heartbeat,
                    heartbeat_timeout: worker_heartbeat_timeout,
                    kill_grace: millis(a.worker_kill_grace_ms, DEFAULT_WORKER_KILL_GRACE_MS),
                };
                let mut programs: Vec<ProgramConfig> = Vec::new();
                for spec in specs {
                    let program = spec.validate(&base, &defaults).map_err(|e| invalid("worker_program", e))?;
                    if programs.iter().any(|p| p.name == program.name) {
                        return Err(invalid("worker_program", format!("program {:?} is declared twice", program.name)));
                    }
                    programs.push(program);
                }
                programs
            }
            _ => Vec::new(),
        };
        let tls = tls(&a)?;
        if let Some(spec) = a.client.iter().find(|c| c.cert_san.is_some())
            && tls.as_ref().is_none_or(|t| !t.mutual())
        {
            return Err(invalid(
                "client",
                format!(
                    "client {:?} authenticates with cert_san, which needs client certificates (--tls-client-ca)",
                    spec.name
                ),
            ));
        }
        let replica_name = a.replica_name.clone().unwrap_or_else(host_name);
        let replicas = match a.replicas.as_deref().map(str::trim) {
            None | Some("") => 1,
            Some("auto") => cores,
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=256).contains(n))
                .ok_or_else(|| invalid("replicas", format!("{n:?} is not auto or a number in 1..=256")))?,
        };
        // Each replica gets its share of the default; the supervisor itself
        // holds no calls.
        let (max_inflight_bytes, inflight_default) = match a.max_inflight_bytes {
            Some(bytes) => (bytes.get(), None),
            None => {
                let (bytes, memory, source) = inflight::default_budget(replicas);
                (bytes, Some((memory, source)))
            }
        };
        Ok(Self {
            listen: a.listen.unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            replicas: if a.replica { 1 } else { replicas },
            replica: a.replica,
            debug_tasks: a.debug_tasks.unwrap_or(false),
            pool_threads: a.pool_threads.map_or(cores, NonZeroUsize::get),
            queue_capacity: a.queue_capacity.map_or(DEFAULT_QUEUE_CAPACITY, NonZeroUsize::get),
            max_message_bytes,
            max_inflight_bytes,
            inflight_default,
            max_decompressed_bytes: a.max_decompressed_bytes.map_or(DEFAULT_MAX_DECOMPRESSED_BYTES, NonZeroUsize::get),
            inline_threshold: Duration::from_micros(a.inline_threshold_us.unwrap_or(DEFAULT_INLINE_THRESHOLD_US)),
            in_place_threshold: Duration::from_micros(a.in_place_threshold_us.unwrap_or(DEFAULT_IN_PLACE_THRESHOLD_US)),
            batch_concurrency: a.batch_concurrency.map_or(DEFAULT_BATCH_CONCURRENCY, NonZeroUsize::get),
            connection_idle_timeout: match a.connection_idle_timeout_secs.unwrap_or(300) {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            shutdown_grace: Duration::from_secs_f64(grace),
            job_store: a.job_store.clone().filter(|s| !s.is_empty()),
            jobs: crate::jobs::JobOptions {
                lease: Duration::from_secs_f64(job_lease),
                max_attempts: a.job_max_attempts.map_or(3, NonZeroU32::get),
                retention: Duration::from_secs(a.job_retention_secs.unwrap_or(86_400)),
                max_output_bytes: a.max_job_output_bytes.map_or(max_message_bytes, NonZeroUsize::get),
            },
            cache: match a.cache_max_bytes.unwrap_or(DEFAULT_CACHE_MAX_BYTES) {
                0 => None,
                max_bytes => Some(CacheSettings {
                    store: cache_store(a.cache_store.as_deref(), a.job_store.as_deref())?,
                    max_bytes,
                    max_entry_bytes: a.cache_max_entry_bytes.unwrap_or(DEFAULT_CACHE_MAX_ENTRY_BYTES),
                    ttl: Duration::from_secs(a.cache_ttl_secs.map_or(86_400, NonZeroU64::get)),
                }),
            },
            replica_name: replica_name.clone(),
            log_format: a.log_format.unwrap_or(LogFormat::Auto),
            tls,
            worker_sandbox: a.worker_sandbox.unwrap_or_default(),
            cors_allowed_origins: cors_origins(&a.cors_allowed_origins)?,
            metrics_listen: a.metrics_listen,
            console_listen: a.console_listen,
            traces: TraceSettings {
                endpoint: a.otlp_endpoint.filter(|e| !e.is_empty()),
                service_name: a.otel_service_name.filter(|n| !n.is_empty()),
                sampler: telemetry::Sampling::parse(
                    a.otel_traces_sampler.as_deref(),
                    a.otel_traces_sampler_arg.as_deref(),
                )
                .map_err(|reason| invalid("otel-traces-sampler", reason))?,
                resource_attributes: telemetry::parse_attributes(a.otel_resource_attributes.as_deref().unwrap_or(""))
                    .map_err(|reason| invalid("otel-resource-attributes", reason))?,
                instance: replica_name.clone(),
            },
            workers: a.workers.map_or(cores, NonZeroUsize::get),
            worker_memory_limit_bytes: a.worker_memory_limit_bytes.unwrap_or(DEFAULT_WORKER_MEMORY_LIMIT_BYTES),
            worker_nice,
            worker_max_tasks: a.worker_max_tasks.unwrap_or(DEFAULT_WORKER_MAX_TASKS),
            worker_max_rss_bytes: a.worker_max_rss_bytes.unwrap_or(DEFAULT_WORKER_MAX_RSS_BYTES),
            worker_heartbeat,
            worker_heartbeat_timeout,
            worker_kill_grace: millis(a.worker_kill_grace_ms, DEFAULT_WORKER_KILL_GRACE_MS),
            worker_program: a.worker_program,
            exec: a.exec,
            clients: a.client,
            worker_programs,
        })
    }
}

/// The words a boolean setting accepts, in any case, as operators write
/// them in environments and manifests.
pub const BOOLEAN_WORDS: &str = "1/0, true/false, yes/no, on/off";

/// A parser for a boolean setting whose environment variable is `variable`:
/// accepts [`BOOLEAN_WORDS`] and names the variable and those words when it
/// refuses a value (clap's own bool parser takes only true/false).
fn boolish(variable: &'static str) -> impl Fn(&str) -> Result<bool, String> + Clone + Send + Sync + 'static {
    move |value| parse_boolean(value).ok_or_else(|| format!("{variable} accepts {BOOLEAN_WORDS} (any case)"))
}

/// `value` as a boolean, if it is one of [`BOOLEAN_WORDS`] in any case.
pub fn parse_boolean(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// The folder of the config file, if there is one.
fn args_config_dir(args: &Args) -> Option<PathBuf> {
    let file = args.config.as_ref()?;
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Some(std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()))
}

/// The cache store `named` (--cache-store), else the job store's database
/// when it is PostgreSQL (fronts sharing jobs share results), else memory.
fn cache_store(named: Option<&str>, job_store: Option<&str>) -> Result<CacheStore, ConfigError> {
    match named.filter(|s| !s.is_empty()) {
        Some("memory") => Ok(CacheStore::Memory),
        Some(url) if crate::pg::is_url(url) => Ok(CacheStore::Postgres(url.to_string())),
        Some(other) => Err(invalid("cache-store", format!("{other:?}: give memory or a postgres:// URL"))),
        None => Ok(match job_store.filter(|s| crate::pg::is_url(s)) {
            Some(url) => CacheStore::Postgres(url.to_string()),
            None => CacheStore::Memory,
        }),
    }
}

fn invalid(name: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { name, reason }
}

/// The kernel's host name, or "offload" where it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "offload".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("offload-server").chain(argv.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::load(parse(&[])).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert!(!c.debug_tasks);
        assert_eq!(c.max_message_bytes, 64 << 20);
        assert!(c.pool_threads >= 1);
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:7000\"\nqueue_capacity = 5\ndebug_tasks = true\n").unwrap();
        let c = Config::load(parse(&["--config", path.to_str().unwrap(), "--queue-capacity", "9"])).unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.queue_capacity, 9);
        assert!(c.debug_tasks);
    }

    #[test]
    fn exec_tasks_come_from_the_file_and_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.toml");
        std::fs::write(&path, "[[exec]]\nname = \"exec.wc\"\nprogram = \"/usr/bin/wc\"\nargs = [\"-c\"]\n").unwrap();
        let c = Config::load(parse(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!(c.exec.len(), 1);
        assert_eq!(c.exec[0].args, ["-c"]);
        std::fs::write(&path, "[[exec]]\nname = \"exec.x\"\nprogram = \"/no/such/program\"\n").unwrap();
        let err = Config::load(parse(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(err.to_string().contains("/no/such/program"), "{err}");
    }

    #[test]
    fn boolean_words_in_any_case() {
        for word in ["1", "true", "TRUE", "yes", "Yes", "on", "ON"] {
            assert_eq!(parse_boolean(word), Some(true), "{word}");
        }
        for word in ["0", "false", "False", "no", "NO", "off", "Off"] {
            assert_eq!(parse_boolean(word), Some(false), "{word}");
        }
        for word in ["", "2", "y", "t", "enabled", "truee"] {
            assert_eq!(parse_boolean(word), None, "{word}");
        }
        // The flag alone, and with a value.
        assert_eq!(parse(&["--debug-tasks"]).debug_tasks, Some(true));
        assert_eq!(parse(&["--debug-tasks=off"]).debug_tasks, Some(false));
        assert_eq!(parse(&[]).debug_tasks, None);
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.toml");
        std::fs::write(&path, "listn = \"127.0.0.1:7000\"\n").unwrap();
        let err = Config::load(parse(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(err.to_string().contains("unknown field `listn`"), "{err}");
    }
}
