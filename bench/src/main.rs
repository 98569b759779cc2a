//! `offload-bench`: measures Offload. For now one scenario, `modes`: the same
//! task and input run alternately in POOL and ISOLATED mode, reporting the
//! median latency of each and their ratio (the large-payload target of
//! isolated mode: hashing 16 MiB isolated within 1.5x of POOL).
//!
//! It starts a release server itself (`target/release/offload-server`, built
//! by `cargo build --release`) unless `--server` names a running one.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use offload_proto::offload::v1::{ExecuteRequest, ExecutionMode, compute_client::ComputeClient};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "offload-bench", about = "Benchmarks of Offload")]
struct Cli {
    /// A running server to measure; by default a release server is started.
    #[arg(long, global = true)]
    server: Option<String>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// One task, one input size, alternately POOL and ISOLATED, at concurrency 1.
    Modes {
        /// Task to run.
        #[arg(long, default_value = "hash.sha256")]
        task: String,
        /// Input size in bytes.
        #[arg(long, default_value_t = 16 << 20)]
        size: usize,
        /// Calls per mode (after warm-up).
        #[arg(long, default_value_t = 30)]
        calls: usize,
        /// Runs of the whole comparison; the report gives each and their median.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

/// A server this process started; killed on drop.
struct Started(Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server() -> anyhow::Result<(String, Started)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let binary = root.join("target/release/offload-server");
    if !binary.is_file() {
        bail!("{} is missing: run `cargo build --release` first", binary.display());
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    let child = Command::new(binary)
        .args(["--listen", &addr.to_string(), "--debug-tasks", "--log-format", "json"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the server")?;
    Ok((format!("http://{addr}"), Started(child)))
}

async fn connect(url: &str) -> anyhow::Result<ComputeClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match Channel::from_shared(url.to_string())?.connect().await {
            Ok(channel) => {
                return Ok(ComputeClient::new(channel)
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX));
            }
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(err) => return Err(err).context("connecting to the server"),
        }
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (url, _started) = match &cli.server {
        Some(url) => (url.clone(), None),
        None => {
            let (url, child) = start_server()?;
            (url, Some(child))
        }
    };
    let mut client = connect(&url).await?;
    match cli.scenario {
        Scenario::Modes { task, size, calls, runs } => {
            let input = Bytes::from((0..size).map(|i| (i * 31 + i / 4096) as u8).collect::<Vec<u8>>());
            let mut ratios = Vec::new();
            let mut pool_ms = Vec::new();
            let mut isolated_ms = Vec::new();
            for run in 0..runs {
                let mut samples = [Vec::new(), Vec::new()];
                for i in 0..calls + 3 {
                    for (slot, mode) in [ExecutionMode::Pool, ExecutionMode::Isolated].into_iter().enumerate() {
                        let request = ExecuteRequest {
                            task: task.clone(),
                            input: input.clone(),
                            mode: mode as i32,
                            ..Default::default()
                        };
                        let started = Instant::now();
                        client.execute(request).await.with_context(|| format!("{task} in {mode:?}"))?;
                        if i >= 3 {
                            samples[slot].push(started.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                }
                let [pool, isolated] = samples;
                let (p, s) = (median(pool), median(isolated));
                println!(
                    "run {run}: {task} {size} B: POOL median {p:.2} ms, ISOLATED median {s:.2} ms, ratio {:.3}",
                    s / p
                );
                ratios.push(s / p);
                pool_ms.push(p);
                isolated_ms.push(s);
            }
            let ratio = median(ratios.clone());
            println!(
                "{{\"scenario\":\"modes\",\"task\":\"{task}\",\"size\":{size},\"calls\":{calls},\"pool_median_ms\":{:.3},\"isolated_median_ms\":{:.3},\"ratios\":{ratios:?},\"median_ratio\":{ratio:.3}}}",
                median(pool_ms),
                median(isolated_ms)
            );
            println!("summary: ISOLATED/POOL = {ratio:.3} (median of {runs} runs)");
        }
    }
    Ok(())
}
