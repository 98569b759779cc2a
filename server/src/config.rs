//! Configuration: command-line flags, each with an `OFFLOAD_*` environment
//! fallback, over an optional TOML file, over documented defaults. Raw input
//! is validated once into [`Config`]; a bad value is a [`ConfigError`], which
//! `main` reports with exit status 64.

use std::{net::SocketAddr, num::NonZeroUsize, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
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
/// Default number of items of one ExecuteBatch stream run at once.
pub const DEFAULT_BATCH_CONCURRENCY: usize = 64;
/// Default time in-flight calls get to finish on SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: f64 = 30.0;

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
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "offload-server", version, about, long_about = None)]
pub struct Args {
    /// TOML file with any of the settings below (keys as flag names, with '_').
    #[arg(long, env = "OFFLOAD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to serve gRPC on. Port 0 picks a free port (logged at start).
    /// [default: 127.0.0.1:50051]
    #[arg(long, env = "OFFLOAD_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// List and run the debug.* tasks (for tests and benchmarks).
    #[arg(long, env = "OFFLOAD_DEBUG_TASKS")]
    pub debug_tasks: bool,

    /// Threads of the POOL executor. [default: the available cores]
    #[arg(long, env = "OFFLOAD_POOL_THREADS", value_name = "N")]
    pub pool_threads: Option<NonZeroUsize>,

    /// Calls that may wait for a pool thread; beyond it calls fail at once
    /// with RESOURCE_EXHAUSTED. [default: 1024]
    #[arg(long, env = "OFFLOAD_QUEUE_CAPACITY", value_name = "N")]
    pub queue_capacity: Option<NonZeroUsize>,

    /// Largest request or response message, in bytes; a larger request fails
    /// with RESOURCE_EXHAUSTED. [default: 67108864 (64 MiB)]
    #[arg(long, env = "OFFLOAD_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<NonZeroUsize>,

    /// Largest output decompress.zstd may produce, in bytes.
    /// [default: 268435456 (256 MiB)]
    #[arg(long, env = "OFFLOAD_MAX_DECOMPRESSED_BYTES", value_name = "BYTES")]
    pub max_decompressed_bytes: Option<NonZeroUsize>,

    /// Tasks whose expected cost is below this many microseconds run on the
    /// calling I/O thread instead of hopping to the pool; 0 disables it. [default: 20]
    #[arg(long, env = "OFFLOAD_INLINE_THRESHOLD_US", value_name = "US")]
    pub inline_threshold_us: Option<u64>,

    /// Items of one ExecuteBatch stream run at once; further items are read
    /// as earlier ones finish. [default: 64]
    #[arg(long, env = "OFFLOAD_BATCH_CONCURRENCY", value_name = "N")]
    pub batch_concurrency: Option<NonZeroUsize>,

    /// Seconds in-flight calls get to finish after SIGTERM/SIGINT. [default: 30]
    #[arg(long, env = "OFFLOAD_SHUTDOWN_GRACE_SECS", value_name = "SECS")]
    pub shutdown_grace_secs: Option<f64>,

    /// Name reported in TaskStats.replica. [default: the host name]
    #[arg(long, env = "OFFLOAD_REPLICA_NAME", value_name = "NAME")]
    pub replica_name: Option<String>,

    /// Log format; the level comes from RUST_LOG (default info). [default: auto]
    #[arg(long, env = "OFFLOAD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The TOML file's shape: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    debug_tasks: Option<bool>,
    pool_threads: Option<NonZeroUsize>,
    queue_capacity: Option<NonZeroUsize>,
    max_message_bytes: Option<NonZeroUsize>,
    max_decompressed_bytes: Option<NonZeroUsize>,
    inline_threshold_us: Option<u64>,
    batch_concurrency: Option<NonZeroUsize>,
    shutdown_grace_secs: Option<f64>,
    replica_name: Option<String>,
    log_format: Option<LogFormat>,
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

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to serve gRPC on.
    pub listen: SocketAddr,
    /// Whether the debug.* tasks are served.
    pub debug_tasks: bool,
    /// Threads of the rayon pool.
    pub pool_threads: usize,
    /// Calls that may wait for the pool.
    pub queue_capacity: usize,
    /// Largest request or response message.
    pub max_message_bytes: usize,
    /// Largest output of decompress.zstd.
    pub max_decompressed_bytes: usize,
    /// Cost under which tasks run inline on the I/O thread.
    pub inline_threshold: Duration,
    /// Items of one batch stream run at once.
    pub batch_concurrency: usize,
    /// Time in-flight calls get on shutdown.
    pub shutdown_grace: Duration,
    /// Name reported in TaskStats.replica.
    pub replica_name: String,
    /// Log format.
    pub log_format: LogFormat,
}

impl Config {
    /// Reads the file named by `args` (if any) and validates the result.
    pub fn load(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            None => FileConfig::default(),
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str(&text)
                    .map_err(|source| ConfigError::Parse { path: path.clone(), source: Box::new(source) })?
            }
        };
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let grace = args.shutdown_grace_secs.or(file.shutdown_grace_secs).unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECS);
        if !(0.0..=86_400.0).contains(&grace) {
            return Err(ConfigError::Invalid {
                name: "shutdown-grace-secs",
                reason: format!("{grace} is not in 0..=86400"),
            });
        }
        let max_message_bytes =
            args.max_message_bytes.or(file.max_message_bytes).map_or(DEFAULT_MAX_MESSAGE_BYTES, NonZeroUsize::get);
        if max_message_bytes > u32::MAX as usize {
            return Err(ConfigError::Invalid {
                name: "max-message-bytes",
                reason: format!("{max_message_bytes} exceeds the gRPC frame limit of {}", u32::MAX),
            });
        }
        Ok(Self {
            listen: args.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            debug_tasks: args.debug_tasks || file.debug_tasks.unwrap_or(false),
            pool_threads: args.pool_threads.or(file.pool_threads).map_or(cores, NonZeroUsize::get),
            queue_capacity: args
                .queue_capacity
                .or(file.queue_capacity)
                .map_or(DEFAULT_QUEUE_CAPACITY, NonZeroUsize::get),
            max_message_bytes,
            max_decompressed_bytes: args
                .max_decompressed_bytes
                .or(file.max_decompressed_bytes)
                .map_or(DEFAULT_MAX_DECOMPRESSED_BYTES, NonZeroUsize::get),
            inline_threshold: Duration::from_micros(
                args.inline_threshold_us.or(file.inline_threshold_us).unwrap_or(DEFAULT_INLINE_THRESHOLD_US),
            ),
            batch_concurrency: args
                .batch_concurrency
                .or(file.batch_concurrency)
                .map_or(DEFAULT_BATCH_CONCURRENCY, NonZeroUsize::get),
            shutdown_grace: Duration::from_secs_f64(grace),
            replica_name: args.replica_name.or(file.replica_name).unwrap_or_else(host_name),
            log_format: args.log_format.or(file.log_format).unwrap_or(LogFormat::Auto),
        })
    }
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
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.toml");
        std::fs::write(&path, "listn = \"127.0.0.1:7000\"\n").unwrap();
        let err = Config::load(parse(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(err.to_string().contains("unknown field `listn`"), "{err}");
    }
}
