//! `offload`: the command-line client. Lists the server's tasks and runs one,
//! with input from a file, stdin or the command line, params as `k=v`, a mode
//! and a deadline; shows a progress bar on a terminal (via ExecuteStream)
//! and prints binary output as hex on a terminal. Submits, waits for, lists
//! and cancels jobs ([`jobs`]), and shows the admin view ([`top`]).

use std::{
    collections::HashMap,
    io::{IsTerminal, Read, Write},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use offload_proto::offload::admin::v1::{RecycleWorkerRequest, SetWorkersRequest, admin_client::AdminClient};
use offload_proto::offload::v1::{
    ExecuteRequest, ExecuteResponse, ExecutionMode, ListTasksRequest, Stage, compute_client::ComputeClient,
    execute_event::Event,
};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

/// Client of an Offload server.
#[derive(Debug, Parser)]
#[command(name = "offload", version, about)]
struct Cli {
    /// Server address.
    #[arg(long, short, env = "OFFLOAD_SERVER", default_value = "http://127.0.0.1:50051", global = true)]
    server: String,

    #[command(flatten)]
    tls: TlsArgs,

    /// Bearer token sent as `authorization: Bearer <TOKEN>`, for a server
    /// that declares clients with token_sha256.
    #[arg(long, env = "OFFLOAD_TOKEN", value_name = "TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,

    #[command(subcommand)]
    command: Command,
}

/// TLS towards the server: used when the address is https:// or any of
/// these is given.
#[derive(Debug, clap::Args)]
struct TlsArgs {
    /// Trust the server certificates this PEM CA file signed (instead of
    /// the system's roots).
    #[arg(long, value_name = "FILE", global = true)]
    tls_ca: Option<PathBuf>,
    /// Present this PEM certificate to a server that requires one (mutual
    /// TLS; with --tls-key).
    #[arg(long, value_name = "FILE", global = true, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry, when it is not the
    /// address's host (for example when connecting by IP address).
    #[arg(long, value_name = "NAME", global = true)]
    tls_domain: Option<String>,
}

impl TlsArgs {
    fn wanted(&self, server: &str) -> bool {
        server.starts_with("https://") || self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_domain.is_some()
    }

    fn config(&self) -> anyhow::Result<ClientTlsConfig> {
        let read = |path: &PathBuf| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
        let mut config = ClientTlsConfig::new();
        config = match &self.tls_ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => config.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(domain) = &self.tls_domain {
            config = config.domain_name(domain);
        }
        Ok(config)
    }
}

/// A channel to `server`, over TLS as `tls` says.
async fn connect(server: &str, tls: &TlsArgs) -> anyhow::Result<Channel> {
    let mut endpoint =
        Channel::from_shared(server.to_string()).with_context(|| format!("bad server address {server:?}"))?;
    if tls.wanted(server) {
        if let Some(rest) = server.strip_prefix("http://") {
            endpoint = Channel::from_shared(format!("https://{rest}")).context("server address")?;
        }
        endpoint = endpoint.tls_config(tls.config()?).context("TLS settings")?;
    }
    endpoint.connect().await.with_context(|| format!("cannot connect to {server}"))
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lists the server's tasks with their modes and params.
    Tasks,
    /// Runs one task and writes its output.
    Run(RunArgs),
    /// Checks the server's gRPC health: exits 0 when SERVING, 1 otherwise
    /// (for container health checks and scripts).
    Health {
        /// The service to check; "" is the server as a whole.
        #[arg(long, default_value = "")]
        service: String,
        /// Seconds to wait for an answer.
        #[arg(long, default_value_t = 3.0)]
        timeout: f64,
    },
    /// A live view of the replica: per task calls/s, failures and mean
    /// times, the queues, and every worker process, redrawn every second
    /// (from the admin service: loopback, or an admin client).
    Top {
        /// Seconds between frames.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many frames (default: until Ctrl-C).
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// Prints the worker processes once: pool, slot, pid, state, task, RSS,
    /// tasks done, age.
    Workers,
    /// Replaces the worker process with this pid (its replacement first).
    Recycle {
        /// The worker's pid (see `offload workers`).
        pid: u32,
    },
    /// Submits a job (kept by the server until done, whatever becomes of
    /// this client) and prints its id; with --wait, waits for it as `wait`.
    Submit(jobs::SubmitArgs),
    /// Waits for a job, with a progress bar on a terminal, and writes its
    /// output; fails with the job's status if it failed or was cancelled.
    Wait(jobs::WaitArgs),
    /// Lists jobs, newest first.
    Jobs(jobs::ListArgs),
    /// Cancels a job.
    Cancel {
        /// The job's id.
        id: String,
    },
    /// Sets how many worker processes a pool keeps.
    Scale {
        /// Worker processes, 1..=256.
        workers: u32,
        /// The pool: Offload's own workers by default, or a worker program's name.
        #[arg(long, default_value = "")]
        pool: String,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Task name, e.g. hash.sha256.
    task: String,
    #[command(flatten)]
    work: WorkArgs,
    /// Deadline in seconds (sent as grpc-timeout).
    #[arg(short, long, value_name = "SECS")]
    timeout: Option<f64>,
    #[command(flatten)]
    out: OutputArgs,
    /// Print the run's stats to stderr.
    #[arg(long, short = 'v')]
    verbose: bool,
}

/// Where an output goes, and whether progress is drawn (for `run`,
/// `submit --wait` and `wait`).
#[derive(Debug, clap::Args)]
struct OutputArgs {
    /// Write the output to FILE instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print the output as hex even when not on a terminal.
    #[arg(long)]
    hex: bool,
    /// Never show a progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// What to run: params, input and mode (for `run` and `submit`).
#[derive(Debug, clap::Args)]
struct WorkArgs {
    /// Param as NAME=VALUE; repeat for several.
    #[arg(short, long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
    params: Vec<(String, String)>,
    /// Read the input from FILE ('-' for stdin).
    #[arg(short, long, value_name = "FILE", conflicts_with = "data")]
    input: Option<PathBuf>,
    /// Use TEXT as the input.
    #[arg(short, long, value_name = "TEXT")]
    data: Option<String>,
    /// Where to run it. [default: the task's default]
    #[arg(short, long, value_enum)]
    mode: Option<ModeArg>,
    /// Result cache directives, sent as `offload-cache`: no-store (do not
    /// keep the result), no-cache (run even if a result is kept), or both
    /// comma-separated.
    #[arg(long, value_name = "DIRECTIVES")]
    cache: Option<String>,
}

impl WorkArgs {
    /// The input, from the file, stdin or the text given (none: empty).
    fn input(&self) -> anyhow::Result<Bytes> {
        Ok(Bytes::from(match (&self.input, &self.data) {
            (Some(path), _) if path.as_os_str() == "-" => {
                let mut buf = Vec::new();
                std::io::stdin().read_to_end(&mut buf).context("reading stdin")?;
                buf
            }
            (Some(path), _) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            (None, Some(text)) => text.clone().into_bytes(),
            (None, None) => Vec::new(),
        }))
    }

    fn params(&self) -> HashMap<String, String> {
        self.params.iter().cloned().collect()
    }

    /// `body` as a request carrying the --cache directives.
    fn request<T>(&self, body: T) -> anyhow::Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(body);
        if let Some(directives) = &self.cache {
            let value = directives.parse().map_err(|_| anyhow::anyhow!("--cache {directives:?}: not header text"))?;
            request.metadata_mut().insert("offload-cache", value);
        }
        Ok(request)
    }

    fn mode(&self) -> ExecutionMode {
        match self.mode {
            None => ExecutionMode::Unspecified,
            Some(ModeArg::Pool) => ExecutionMode::Pool,
            Some(ModeArg::Isolated) => ExecutionMode::Isolated,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Pool,
    Isolated,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("offload: {err:#}");
            ExitCode::FAILURE
        }
    }
}

mod jobs;
mod top;

/// Adds the bearer token, if any, to every call.
#[derive(Debug, Clone)]
struct Credentials(Option<MetadataValue<Ascii>>);

impl Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Client = ComputeClient<InterceptedService<Channel, Credentials>>;

async fn run(cli: Cli) -> anyhow::Result<()> {
    let channel = connect(&cli.server, &cli.tls).await?;
    let token = match &cli.token {
        Some(token) => Some(format!("Bearer {token}").parse().context("--token must be printable ASCII")?),
        None => None,
    };
    let credentials = Credentials(token);
    let mut admin = AdminClient::with_interceptor(channel.clone(), credentials.clone());
    let mut jobs_client = jobs::client(channel.clone(), credentials.clone());
    let mut client =
        ComputeClient::with_interceptor(channel.clone(), credentials).max_decoding_message_size(usize::MAX);
    match cli.command {
        Command::Tasks => list(&mut client).await,
        Command::Run(args) => execute(&mut client, args).await,
        Command::Health { service, timeout } => health(channel, &service, timeout).await,
        Command::Top { interval, iterations } => {
            let interval = Duration::try_from_secs_f64(interval).context("--interval")?;
            top::top(&mut admin, interval, iterations).await
        }
        Command::Workers => top::workers(&mut admin).await,
        Command::Submit(args) => jobs::submit(&mut jobs_client, args).await,
        Command::Wait(args) => jobs::wait(&mut jobs_client, args).await,
        Command::Jobs(args) => jobs::list(&mut jobs_client, args).await,
        Command::Cancel { id } => jobs::cancel(&mut jobs_client, &id).await,
        Command::Recycle { pid } => {
            admin.recycle_worker(RecycleWorkerRequest { pid }).await.map_err(status_error)?;
            println!("worker {pid} is being replaced");
            Ok(())
        }
        Command::Scale { workers, pool } => {
            let previous = admin
                .set_workers(SetWorkersRequest { pool, workers })
                .await
                .map_err(status_error)?
                .into_inner()
                .previous;
            println!("workers: {previous} -> {workers}");
            Ok(())
        }
    }
}

async fn health(channel: Channel, service: &str, timeout: f64) -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let mut request = tonic::Request::new(HealthCheckRequest { service: service.to_string() });
    request.set_timeout(Duration::from_secs_f64(timeout.max(0.001)));
    let status = HealthClient::new(channel).check(request).await.map_err(status_error)?.into_inner().status;
    let status = ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown);
    println!("{}", status.as_str_name());
    if status != ServingStatus::Serving {
        bail!("{:?} is not serving", service);
    }
    Ok(())
}

async fn list(client: &mut Client) -> anyhow::Result<()> {
    let tasks = client.list_tasks(ListTasksRequest {}).await.map_err(status_error)?.into_inner().tasks;
    let mode_name =
        |m: i32| ExecutionMode::try_from(m).map_or("?", |m| m.as_str_name().trim_start_matches("EXECUTION_MODE_"));
    for task in tasks {
        let allowed: Vec<&str> = task.allowed_modes.iter().map(|m| mode_name(*m)).collect();
        println!("{}  [{} default; allowed {}]", task.name, mode_name(task.default_mode), allowed.join(", "));
        println!("    {}", task.description);
        for p in task.params {
            let default = if p.required { "required".to_string() } else { format!("default {}", p.default_value) };
            println!("    {}: {} ({default})", p.name, p.description);
        }
    }
    Ok(())
}

async fn execute(client: &mut Client, args: RunArgs) -> anyhow::Result<()> {
    let body = ExecuteRequest {
        task: args.task.clone(),
        input: args.work.input()?,
        params: args.work.params(),
        mode: args.work.mode() as i32,
        id: String::new(),
    };
    let mut request = args.work.request(body)?;
    if let Some(secs) = args.timeout {
        if !(secs > 0.0 && secs.is_finite()) {
            bail!("--timeout must be a positive number of seconds");
        }
        // Sent as the header alone: tonic's client-side timer would answer
        // CANCELLED before the server's DEADLINE_EXCEEDED arrives.
        let header = grpc_timeout(Duration::from_secs_f64(secs)).parse().expect("ascii header");
        request.metadata_mut().insert("grpc-timeout", header);
    }
    let show_progress = !args.out.no_progress && std::io::stderr().is_terminal();
    let response = if show_progress {
        with_progress(client, request).await?
    } else {
        client.execute(request).await.map_err(status_error)?.into_inner()
    };
    if args.verbose
        && let Some(stats) = &response.stats
    {
        eprintln!(
            "mode {} queued {} us, ran {} us, worker pid {}, replica {}{}",
            ExecutionMode::try_from(response.mode).map_or("?", |m| m.as_str_name()),
            stats.queued_us(),
            stats.run_us(),
            stats.worker_pid,
            stats.replica,
            if stats.cached { ", from the result cache" } else { "" }
        );
    }
    write_output(&response.output, args.out.output.as_deref(), args.out.hex)
}

/// A progress bar on stderr.
fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix:8} [{bar:40}] {percent:>3}% {elapsed} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// Runs the call through ExecuteStream, drawing its progress on stderr.
async fn with_progress(
    client: &mut Client,
    request: tonic::Request<ExecuteRequest>,
) -> anyhow::Result<ExecuteResponse> {
    let bar = progress_bar();
    let mut events = client.execute_stream(request).await.map_err(status_error)?.into_inner();
    while let Some(event) = events.message().await.map_err(|s| {
        bar.abandon();
        status_error(s)
    })? {
        match event.event {
            Some(Event::Progress(p)) => {
                bar.set_prefix(if p.stage == Stage::Queued as i32 { "queued" } else { "running" });
                bar.set_position((p.fraction * 1000.0) as u64);
                bar.set_message(p.message);
            }
            Some(Event::Result(result)) => {
                bar.finish_and_clear();
                return Ok(result);
            }
            None => {}
        }
    }
    bar.abandon();
    bail!("the server closed the stream without a result")
}

fn write_output(output: &[u8], path: Option<&std::path::Path>, force_hex: bool) -> anyhow::Result<()> {
    if let Some(path) = path {
        return std::fs::write(path, output).with_context(|| format!("writing {}", path.display()));
    }
    let mut stdout = std::io::stdout().lock();
    let printable = std::str::from_utf8(output).is_ok_and(|s| !s.chars().any(|c| c.is_control() && !c.is_whitespace()));
    if force_hex || (stdout.is_terminal() && !printable) {
        writeln!(stdout, "{}", hex::encode(output))?;
    } else {
        stdout.write_all(output)?;
        if stdout.is_terminal() && !output.ends_with(b"\n") {
            writeln!(stdout)?;
        }
    }
    Ok(())
}

/// Formats a grpc-timeout value: at most 8 digits, in the finest unit that fits.
fn grpc_timeout(timeout: Duration) -> String {
    const LIMIT: u128 = 99_999_999;
    let micros = timeout.as_micros();
    [(1, 'u'), (1_000, 'm'), (1_000_000, 'S'), (60_000_000, 'M'), (3_600_000_000, 'H')]
        .into_iter()
        .map(|(per_unit, unit)| (micros.div_ceil(per_unit), unit))
        .find(|(value, _)| *value <= LIMIT)
        .map_or_else(|| format!("{LIMIT}H"), |(value, unit)| format!("{value}{unit}"))
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    // tonic's channel enforces the deadline locally too and calls that
    // CANCELLED; it is the deadline all the same.
    if status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired" {
        return anyhow::anyhow!("DeadlineExceeded: the --timeout passed before the server answered");
    }
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}
