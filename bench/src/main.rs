//! `offload-bench`: Offload's load generator, its baselines and the suite
//! that measures the performance targets and writes `BENCHMARKS.md`.
//!
//! - [`load`]: closed- and open-loop load with HDR histograms.
//! - [`flood`]: many concurrent large calls, counted by status, for the memory budget.
//! - [`jobs`]: jobs submitted and awaited (scenario 14), and the baselines' Redis.
//! - [`corpus`]: distinct inputs asked for by a Zipf law (scenario 15, the result cache).
//! - [`baseline`]: the inline and spawn_blocking servers, the socket ping-pong.
//! - [`procstat`]: the server's CPU time and memory from /proc.
//! - [`suite`]: the scenarios and the report; [`charts`]: its SVG charts.

mod baseline;
mod charts;
mod corpus;
mod flood;
mod jobs;
mod load;
mod procstat;
mod programs;
mod suite;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use offload_proto::offload::v1::ExecutionMode;

#[derive(Debug, Parser)]
#[command(name = "offload-bench", about = "Offload's load generator, baselines and benchmark suite")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Default,
    Pool,
    Isolated,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs every scenario against release builds and writes BENCHMARKS.md.
    Suite {
        /// One short run per scenario: checks the suite works (what CI runs).
        #[arg(long)]
        quick: bool,
        /// Where to write the report.
        #[arg(long, default_value = "BENCHMARKS.md")]
        out: PathBuf,
        /// Runs only these scenarios (by number, e.g. `--only 3,9`); the
        /// report then holds only their rows.
        #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u8).range(1..=15))]
        only: Vec<u8>,
    },
    /// Puts load on a running server and prints a JSON report and a summary.
    Load {
        /// Server URL.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// Task name.
        #[arg(long, default_value = "debug.echo")]
        task: String,
        /// Param as NAME=VALUE (repeatable).
        #[arg(short, long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// Mode.
        #[arg(long, value_enum, default_value = "default")]
        mode: ModeArg,
        /// Input size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// HTTP/2 connections.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Calls in flight per connection (closed loop) or batch window.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Open loop at this many calls per second instead of a closed loop.
        #[arg(long)]
        rate: Option<f64>,
        /// Use ExecuteBatch (one stream per connection).
        #[arg(long)]
        batch: bool,
        /// Server pid, to report its CPU time and memory (front and workers).
        #[arg(long)]
        pid: Option<u32>,
        /// Metadata on every call as KEY=VALUE (repeatable), e.g.
        /// `offload-client=billing` or `offload-priority=batch`.
        #[arg(long = "metadata", value_parser = parse_metadata)]
        metadata: Vec<(String, String)>,
        /// Connect over TLS, trusting this PEM CA file (the server URL is
        /// then https://).
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<std::path::PathBuf>,
    },
    /// Floods a running server with concurrent large `hash.sha256` calls
    /// (scenario 8) and prints the answers by gRPC status code and the
    /// server's peak RSS.
    Flood {
        /// Server address.
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        /// Server pid, for its peak RSS.
        #[arg(long)]
        pid: u32,
        /// Input size in MiB.
        #[arg(long, default_value_t = 50)]
        size_mib: usize,
        /// HTTP/2 connections.
        #[arg(long, default_value_t = 20)]
        connections: usize,
        /// Calls in flight per connection.
        #[arg(long, default_value_t = 20)]
        streams: usize,
        /// Seconds to keep sending.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Submits jobs to a running server, each awaited to its end (Wait), and
    /// prints how they went as JSON (scenario 14's measure).
    Jobs {
        /// Server URL.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// The work: `sha256` (SHA-256 of 1 KiB) or `spin` (50 ms of CPU;
        /// needs --debug-tasks).
        #[arg(long, default_value = "sha256")]
        kind: String,
        /// Jobs to submit.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Jobs submitted and awaited at once.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// Server pid: also report the CPU time it (with its workers) spent
        /// per job.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Serves the baseline (same proto and task code, no dispatcher).
    Baseline {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Run tasks inline in the handler or through spawn_blocking.
        #[arg(long, value_enum)]
        style: baseline::Style,
    },
    /// The peer process of the Unix-socket ping-pong baseline.
    #[command(hide = true)]
    PingpongPeer {
        /// The inherited socket's descriptor.
        #[arg(long)]
        fd: i32,
        /// Message size in bytes.
        #[arg(long)]
        size: usize,
    },
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}

/// A metadata pair whose key and value gRPC can carry.
fn parse_metadata(s: &str) -> Result<(String, String), String> {
    let (key, value) = parse_param(s)?;
    tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(key.as_bytes())
        .map_err(|_| format!("{key:?} is not a metadata key"))?;
    value
        .parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
        .map_err(|_| format!("{value:?} is not ASCII"))?;
    Ok((key, value))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Suite { quick, out, only } => {
            let options = if quick {
                suite::SuiteOptions { seconds: 1.0, runs: 1, soak_seconds: 2.0, out, quick, only }
            } else {
                suite::SuiteOptions { seconds: 5.0, runs: 3, soak_seconds: 60.0, out, quick, only }
            };
            suite::run(options).await
        }
        Command::Load {
            server,
            task,
            params,
            mode,
            size,
            connections,
            in_flight,
            seconds,
            rate,
            batch,
            pid,
            metadata,
            tls_ca,
        } => {
            let spec = load::LoadSpec {
                url: server,
                task,
                params: params.into_iter().collect(),
                mode: match mode {
                    ModeArg::Default => ExecutionMode::Unspecified,
                    ModeArg::Pool => ExecutionMode::Pool,
                    ModeArg::Isolated => ExecutionMode::Isolated,
                } as i32,
                input_size: size,
                connections,
                in_flight,
                duration: Duration::from_secs_f64(seconds),
                shape: rate.map_or(load::Shape::Closed, |rate| load::Shape::Open { rate }),
                api: if batch { load::Api::Batch } else { load::Api::Unary },
                metadata,
                tls_ca,
                corpus: None,
            };
            let report = load::run(&spec, pid).await?;
            println!("{}", serde_json::to_string(&serde_json::json!({ "spec": spec, "report": report }))?);
            println!("summary: {}", report.summary());
            Ok(())
        }
        Command::Flood { addr, pid, size_mib, connections, streams, seconds } => {
            let request = flood::request(size_mib << 20);
            let duration = Duration::from_secs_f64(seconds);
            let report = flood::run(&addr, pid, &request, connections, streams, duration).await?;
            println!("{}", report.summary());
            Ok(())
        }
        Command::Jobs { server, kind, count, in_flight, pid } => {
            let kind = match kind.as_str() {
                "sha256" => jobs::Kind::Sha256,
                "spin" => jobs::Kind::Spin,
                other => anyhow::bail!("no job kind {other:?}: sha256 or spin"),
            };
            let before = pid.map(procstat::tree);
            let result = jobs::offload(&server, kind, count, in_flight).await?;
            println!("{}", serde_json::to_string(&result)?);
            if let (Some(pid), Some(before)) = (pid, before) {
                let cpu = procstat::tree(pid).cpu.saturating_sub(before.cpu);
                let per_job = cpu.as_secs_f64() * 1e6 / result.done.max(1) as f64;
                println!("server CPU: {:.2} s, {per_job:.0} us per job", cpu.as_secs_f64());
            }
            Ok(())
        }
        Command::Baseline { listen, style } => baseline::serve(listen, style).await,
        Command::PingpongPeer { fd, size } => baseline::pingpong_peer(fd, size),
    }
}
