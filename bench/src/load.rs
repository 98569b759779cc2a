//! The load generator: closed loop (connections x calls in flight, for a
//! duration) for peak throughput, and open loop (a fixed arrival rate,
//! latency measured from each call's intended send time, so coordinated
//! omission does not hide queueing) for latency. Unary Execute or
//! ExecuteBatch; HDR histograms; errors by status code; the server's CPU
//! time and peak RSS from /proc.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use offload_proto::offload::v1::{ExecuteRequest, ExecutionMode, compute_client::ComputeClient};
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;

use crate::{
    corpus::{Corpus, Draws},
    procstat,
};

/// How calls are sent.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Shape {
    /// Each of `connections x in_flight` loops sends its next call when the
    /// previous one answers.
    Closed,
    /// Calls start at a fixed rate per second, whatever the answers.
    Open {
        /// Calls per second.
        rate: f64,
    },
}

/// Which RPC carries the calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Api {
    /// One Execute per call.
    Unary,
    /// One ExecuteBatch stream per connection, items as calls.
    Batch,
}

/// One load run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadSpec {
    /// Server URL.
    pub url: String,
    /// Task name.
    pub task: String,
    /// Params.
    pub params: HashMap<String, String>,
    /// Mode, as the wire value.
    pub mode: i32,
    /// Input size in bytes.
    pub input_size: usize,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Calls in flight per connection (closed loop; batch: items per stream).
    pub in_flight: usize,
    /// How long to send.
    pub duration: Duration,
    /// Closed or open loop.
    pub shape: Shape,
    /// Unary or batch.
    pub api: Api,
    /// Metadata every call carries (`offload-client`, `offload-priority`, ...).
    pub metadata: Vec<(String, String)>,
    /// A PEM CA file: connect over TLS, trusting it.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Inputs to draw each call's from (closed-loop unary only), instead
    /// of one input of `input_size` for every call.
    #[serde(skip)]
    pub corpus: Option<Arc<Corpus>>,
}

impl LoadSpec {
    /// A closed-loop unary spec for `task` in `mode`.
    pub fn closed(url: &str, task: &str, params: &[(&str, &str)], mode: ExecutionMode, input_size: usize) -> Self {
        Self {
            url: url.to_string(),
            task: task.to_string(),
            params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            mode: mode as i32,
            input_size,
            connections: 4,
            in_flight: 64,
            duration: Duration::from_secs(5),
            shape: Shape::Closed,
            api: Api::Unary,
            metadata: Vec::new(),
            tls_ca: None,
            corpus: None,
        }
    }

    /// `message` with the spec's metadata.
    fn with_metadata<T>(metadata: &[(String, String)], message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        for (key, value) in metadata {
            let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes()).expect("checked by the CLI");
            request.metadata_mut().insert(key, value.parse().expect("checked by the CLI"));
        }
        request
    }

    fn request(&self, input: &Bytes) -> ExecuteRequest {
        ExecuteRequest {
            task: self.task.clone(),
            input: input.clone(),
            params: self.params.clone(),
            mode: self.mode,
            id: String::new(),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Calls answered OK.
    pub ok: u64,
    /// Failed calls by status code name.
    pub errors: BTreeMap<String, u64>,
    /// Calls answered from Offload's result cache (`offload-cache: hit`).
    pub cache_hits: u64,
    /// Wall time of the run, seconds.
    pub seconds: f64,
    /// OK calls per second.
    pub calls_per_sec: f64,
    /// Latency percentiles and max, microseconds.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
    /// Server CPU seconds (front + workers) spent during the run.
    pub server_cpu_secs: Option<f64>,
    /// Peak resident memory of the front during the run, bytes.
    pub front_peak_rss: Option<u64>,
    /// Peak resident memory of any worker during the run, bytes.
    pub worker_peak_rss: Option<u64>,
    /// (quantile, microseconds) from p50 to p99.9, for charts.
    #[serde(skip)]
    pub distribution: Vec<(f64, f64)>,
}

impl Report {
    /// One line for people.
    pub fn summary(&self) -> String {
        let errors: u64 = self.errors.values().sum();
        format!(
            "{:.0} calls/s, p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us, {} ok, {} errors{}",
            self.calls_per_sec,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.ok,
            errors,
            if errors > 0 { format!(" {:?}", self.errors) } else { String::new() }
        )
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

/// What each sender collects.
struct Tally {
    latencies: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    cache_hits: u64,
}

impl Tally {
    fn new() -> Self {
        Self { latencies: histogram(), errors: BTreeMap::new(), cache_hits: 0 }
    }

    fn record(&mut self, result: Result<(), tonic::Code>, latency: Duration) {
        match result {
            Ok(()) => {
                let _ = self.latencies.record((latency.as_micros() as u64).max(1));
            }
            Err(code) => *self.errors.entry(format!("{code:?}")).or_default() += 1,
        }
    }

    /// A call the open loop did not send (too many outstanding).
    fn not_sent(&mut self) {
        *self.errors.entry("NotSent".into()).or_default() += 1;
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.latencies.add(other.latencies);
        self.cache_hits += other.cache_hits;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
    }
}

/// Opens `n` connections (one HTTP/2 connection each).
pub async fn connect(url: &str, n: usize) -> anyhow::Result<Vec<ComputeClient<Channel>>> {
    connect_with(url, n, None).await
}

/// `n` clients of `url`, each on its own HTTP/2 connection, over TLS
/// trusting the PEM CA file `tls_ca` when given.
pub async fn connect_with(
    url: &str,
    n: usize,
    tls_ca: Option<&std::path::Path>,
) -> anyhow::Result<Vec<ComputeClient<Channel>>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut endpoint = Channel::from_shared(url.to_string())?;
        if let Some(ca) = tls_ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            let tls =
                tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem));
            endpoint = endpoint.tls_config(tls)?;
        }
        let channel = endpoint.connect().await.with_context(|| format!("connecting to {url}"))?;
        clients.push(
            ComputeClient::new(channel).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX),
        );
    }
    Ok(clients)
}

/// Runs `spec`; `server_pid`, when known, is measured from /proc.
pub async fn run(spec: &LoadSpec, server_pid: Option<u32>) -> anyhow::Result<Report> {
    let clients = connect_with(&spec.url, spec.connections, spec.tls_ca.as_deref()).await?;
    let input = Bytes::from((0..spec.input_size).map(|i| (i * 131 + i / 977) as u8).collect::<Vec<u8>>());
    let before = server_pid.map(procstat::tree);
    let sampling = server_pid.map(|pid| {
        let peak = Arc::new(Mutex::new((0u64, 0u64)));
        let writer = Arc::clone(&peak);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            while !stop_flag.load(std::sync::atomic::Ordering::Relaxed) {
                let stat = procstat::tree(pid);
                let mut peak = writer.lock().unwrap();
                peak.0 = peak.0.max(stat.front_rss);
                peak.1 = peak.1.max(stat.max_worker_rss);
                drop(peak);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        (peak, stop, handle)
    });

    let started = Instant::now();
    let tally = match (spec.shape, spec.api) {
        (Shape::Closed, Api::Unary) => closed_unary(spec, &clients, &input).await,
        (Shape::Closed, Api::Batch) => closed_batch(spec, &clients, &input).await?,
        (Shape::Open { rate }, _) => open_unary(spec, &clients, &input, rate).await,
    };
    let seconds = started.elapsed().as_secs_f64();

    let (front_peak_rss, worker_peak_rss) = match sampling {
        Some((peak, stop, handle)) => {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = handle.join();
            let (front, worker) = *peak.lock().unwrap();
            (Some(front), Some(worker))
        }
        None => (None, None),
    };
    let server_cpu_secs = match (before, server_pid) {
        (Some(before), Some(pid)) => Some(procstat::tree(pid).cpu.saturating_sub(before.cpu).as_secs_f64()),
        _ => None,
    };
    let h = &tally.latencies;
    let ok = h.len();
    Ok(Report {
        ok,
        errors: tally.errors,
        cache_hits: tally.cache_hits,
        seconds,
        calls_per_sec: ok as f64 / seconds,
        p50_us: h.value_at_quantile(0.5),
        p90_us: h.value_at_quantile(0.9),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        server_cpu_secs,
        front_peak_rss,
        worker_peak_rss,
        distribution: [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999]
            .iter()
            .map(|q| (*q, h.value_at_quantile(*q) as f64))
            .collect(),
    })
}

async fn closed_unary(spec: &LoadSpec, clients: &[ComputeClient<Channel>], input: &Bytes) -> Tally {
    let end = Instant::now() + spec.duration;
    let mut loops = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        for l in 0..spec.in_flight {
            let mut client = client.clone();
            let mut request = spec.request(input);
            let metadata = spec.metadata.clone();
            // Each loop its own draws, the same in every run.
            let mut draws = Draws::new((c * spec.in_flight + l) as u64);
            let corpus = spec.corpus.clone();
            loops.push(tokio::spawn(async move {
                let mut tally = Tally::new();
                while Instant::now() < end {
                    if let Some(corpus) = &corpus {
                        request.input = corpus.pick(draws.unit()).clone();
                    }
                    let sent = Instant::now();
                    let call = LoadSpec::with_metadata(&metadata, request.clone());
                    let result = client.execute(call).await.map_err(|s| s.code());
                    if result.as_ref().is_ok_and(|r| r.metadata().get("offload-cache").is_some_and(|v| v == "hit")) {
                        tally.cache_hits += 1;
                    }
                    tally.record(result.map(drop), sent.elapsed());
                }
                tally
            }));
        }
    }
    let mut total = Tally::new();
    for tally in futures::future::join_all(loops).await.into_iter().flatten() {
        total.merge(tally);
    }
    total
}

async fn closed_batch(spec: &LoadSpec, clients: &[ComputeClient<Channel>], input: &Bytes) -> anyhow::Result<Tally> {
    let end = Instant::now() + spec.duration;
    let mut streams = Vec::new();
    for client in clients {
        let mut client = client.clone();
        let template = spec.request(input);
        let metadata = spec.metadata.clone();
        let window = spec.in_flight;
        streams.push(tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(window));
            let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
            let (items, items_rx) = mpsc::channel::<ExecuteRequest>(window);
            let feeder = {
                let permits = Arc::clone(&permits);
                let sent_at = Arc::clone(&sent_at);
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < end {
                        let Ok(permit) = permits.acquire().await else { break };
                        permit.forget();
                        let id = n.to_string();
                        n += 1;
                        sent_at.lock().unwrap().insert(id.clone(), Instant::now());
                        if items.send(ExecuteRequest { id, ..template.clone() }).await.is_err() {
                            break;
                        }
                    }
                })
            };
            let mut tally = Tally::new();
            let items = LoadSpec::with_metadata(&metadata, tokio_stream::wrappers::ReceiverStream::new(items_rx));
            let mut results = match client.execute_batch(items).await {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    tally.record(Err(status.code()), Duration::ZERO);
                    return tally;
                }
            };
            loop {
                match results.message().await {
                    Ok(Some(item)) => {
                        permits.add_permits(1);
                        let sent = sent_at.lock().unwrap().remove(&item.id);
                        let latency = sent.map_or(Duration::ZERO, |t| t.elapsed());
                        let result = match item.error {
                            None => Ok(()),
                            Some(e) => Err(tonic::Code::from_i32(e.code)),
                        };
                        tally.record(result, latency);
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tally.record(Err(status.code()), Duration::ZERO);
                        break;
                    }
                }
            }
            let _ = feeder.await;
            tally
        }));
    }
    let mut total = Tally::new();
    for tally in futures::future::join_all(streams).await {
        total.merge(tally?);
    }
    Ok(total)
}

/// Calls outstanding beyond which the open loop counts a call as not sent
/// (an error, "NotSent") instead of starting it: the server is not keeping
/// up at all.
const OPEN_LOOP_CAP: usize = 10_000;

async fn open_unary(spec: &LoadSpec, clients: &[ComputeClient<Channel>], input: &Bytes, rate: f64) -> Tally {
    let start = Instant::now();
    let total = (spec.duration.as_secs_f64() * rate) as u64;
    let (done, mut results) = mpsc::unbounded_channel::<(Result<(), tonic::Code>, Duration)>();
    let outstanding = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tally = Tally::new();
    for i in 0..total {
        let intended = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(intended.into()).await;
        if outstanding.load(std::sync::atomic::Ordering::Relaxed) >= OPEN_LOOP_CAP {
            tally.not_sent();
            continue;
        }
        outstanding.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut client = clients[i as usize % clients.len()].clone();
        let call = LoadSpec::with_metadata(&spec.metadata, spec.request(input));
        let done = done.clone();
        let outstanding = Arc::clone(&outstanding);
        tokio::spawn(async move {
            let result = client.execute(call).await.map(|_| ()).map_err(|s| s.code());
            // From the intended send time: a late start is the server's delay too.
            let _ = done.send((result, intended.elapsed()));
            outstanding.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
    drop(done);
    while let Some((result, latency)) = results.recv().await {
        tally.record(result, latency);
    }
    tally
}
