//! Prometheus metrics: what the service counts, and the `/metrics` text
//! endpoint on its own address (`--metrics-listen`). Calls are counted by
//! the dispatcher, in one place for every RPC; gauges are read from the
//! executors when scraped.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::{dispatch::Dispatcher, schedule::Priority};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    task: &'static str,
    mode: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskModeLabels {
    task: &'static str,
    mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    task: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// A call's scheduling class: its priority, and its client's name if the
/// config declares it (else "other"; "" for calls with no client).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    priority: &'static str,
    client: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    client: String,
}

/// A worker program (`[[worker_program]]`): a bounded set, from the config.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramReasonLabels {
    program: String,
    reason: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 10 us to about 10 minutes.
    Histogram::new(exponential_buckets(0.000_01, 2.5, 20))
}

/// The service's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    duration: Histograms<TaskModeLabels>,
    queue_wait: Histograms<ModeLabels>,
    class_wait: Histograms<ClassLabels>,
    client_in_flight: Family<ClientLabels, Gauge>,
    queue_depth: Family<ModeLabels, Gauge>,
    busy: Family<ModeLabels, Gauge>,
    live_workers: Gauge,
    worker_restarts: Family<ReasonLabels, Counter>,
    program_queue_depth: Family<ProgramLabels, Gauge>,
    program_busy: Family<ProgramLabels, Gauge>,
    program_live_workers: Family<ProgramLabels, Gauge>,
    program_restarts: Family<ProgramReasonLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    jobs: Family<StateLabels, Gauge>,
    oldest_queued_job: Gauge<f64, AtomicU64>,
    job_runs: Family<OutcomeLabels, Counter>,
    job_lease_expiries: Counter,
    cache_lookups: Family<CacheLabels, Counter>,
    cache_evictions: Family<TaskLabels, Counter>,
    cache_bytes: Gauge,
    cache_waiting: Gauge,
    inflight_bytes: Gauge,
    inflight_budget: Gauge,
    /// Totals by task and mode, for the admin API's live view.
    totals: std::sync::RwLock<HashMap<(&'static str, &'static str), Totals>>,
}

/// One task's totals in one mode since start.
#[derive(Debug, Default)]
struct Totals {
    calls: AtomicU64,
    failed: AtomicU64,
    ran: AtomicU64,
    run_nanos: AtomicU64,
    queued_nanos: AtomicU64,
    /// Calls by gRPC status code (0..=16).
    codes: [AtomicU64; 17],
    /// Run times of the last 10 to 20 seconds, for the live view.
    recent: std::sync::Mutex<Recent>,
}

/// Run times, microseconds, in two windows of [`RECENT_WINDOW`]: the one
/// filling and the one before, so that a reading always covers at least
/// one whole window.
#[derive(Debug)]
struct Recent {
    filling: hdrhistogram::Histogram<u64>,
    previous: hdrhistogram::Histogram<u64>,
    since: std::time::Instant,
}

/// How long each window of [`Recent`] lasts.
const RECENT_WINDOW: Duration = Duration::from_secs(10);

impl Default for Recent {
    fn default() -> Self {
        // Up to an hour, three significant digits: a few KiB per task and mode.
        let histogram = || hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        Self { filling: histogram(), previous: histogram(), since: std::time::Instant::now() }
    }
}

impl Recent {
    /// Moves to a new window when the filling one is over (both, when the
    /// one before is over too).
    fn turn(&mut self) {
        let age = self.since.elapsed();
        if age < RECENT_WINDOW {
            return;
        }
        std::mem::swap(&mut self.filling, &mut self.previous);
        self.filling.reset();
        if age >= 2 * RECENT_WINDOW {
            self.previous.reset();
        }
        self.since = std::time::Instant::now();
    }

    fn record(&mut self, ran: Duration) {
        self.turn();
        let _ = self.filling.record((ran.as_micros() as u64).max(1));
    }

    /// The p50 and p99 of both windows.
    fn percentiles(&mut self) -> (Duration, Duration) {
        self.turn();
        let mut both = self.previous.clone();
        let _ = both.add(&self.filling);
        if both.is_empty() {
            return (Duration::ZERO, Duration::ZERO);
        }
        let at = |q| Duration::from_micros(both.value_at_quantile(q));
        (at(0.5), at(0.99))
    }
}

impl Totals {
    /// Counts a finished call; `timing` (queued, ran) when it ran.
    fn add(&self, code: Code, timing: Option<(Duration, Duration)>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if code != Code::Ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(count) = self.codes.get(code as usize) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((queued, ran)) = timing {
            self.ran.fetch_add(1, Ordering::Relaxed);
            self.run_nanos.fetch_add(ran.as_nanos() as u64, Ordering::Relaxed);
            self.queued_nanos.fetch_add(queued.as_nanos() as u64, Ordering::Relaxed);
            self.recent.lock().unwrap_or_else(|e| e.into_inner()).record(ran);
        }
    }
}

/// One task's totals in one mode, as read.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskTotals {
    /// The task.
    pub task: &'static str,
    /// Its mode.
    pub mode: &'static str,
    /// Calls finished.
    pub calls: u64,
    /// Calls that did not end OK.
    pub failed: u64,
    /// Calls that ran.
    pub ran: u64,
    /// Their run time, summed.
    pub run: Duration,
    /// Their queue time, summed.
    pub queued: Duration,
    /// Calls by status code name, those with any.
    pub codes: Vec<(&'static str, u64)>,
    /// The p50 and p99 run times of the last 10 to 20 seconds.
    pub recent: (Duration, Duration),
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("offload");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register("calls", "Calls finished, by task, mode and gRPC status code", calls.clone());
        let duration: Histograms<TaskModeLabels> = Family::new_with_constructor(seconds_histogram);
        registry.register("task_duration_seconds", "Time tasks ran, by task and mode", duration.clone());
        let queue_wait: Histograms<ModeLabels> = Family::new_with_constructor(seconds_histogram);
        registry.register("queue_wait_seconds", "Time calls waited for an executor, by mode", queue_wait.clone());
        let class_wait: Histograms<ClassLabels> = Family::new_with_constructor(seconds_histogram);
        registry.register(
            "class_queue_wait_seconds",
            "Time calls waited for an executor, by priority and declared client (\"other\" for the rest)",
            class_wait.clone(),
        );
        let client_in_flight = Family::<ClientLabels, Gauge>::default();
        registry.register(
            "client_in_flight",
            "Calls admitted and unfinished now, by declared client",
            client_in_flight.clone(),
        );
        let queue_depth = Family::<ModeLabels, Gauge>::default();
        registry.register("queue_depth", "Calls waiting for an executor now, by mode", queue_depth.clone());
        let busy = Family::<ModeLabels, Gauge>::default();
        registry.register(
            "busy_executors",
            "Pool threads or worker processes running a task now, by mode",
            busy.clone(),
        );
        let live_workers = Gauge::default();
        registry.register("live_workers", "Worker processes alive now", live_workers.clone());
        let worker_restarts = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "worker_restarts",
            "Worker processes replaced, by reason (crash, memory, deadline_kill, cancel_kill, unresponsive, protocol, recycle)",
            worker_restarts.clone(),
        );
        let program_queue_depth = Family::<ProgramLabels, Gauge>::default();
        registry.register(
            "program_queue_depth",
            "Calls waiting for a worker of a worker program now (also counted in queue_depth{mode=\"ISOLATED\"})",
            program_queue_depth.clone(),
        );
        let program_busy = Family::<ProgramLabels, Gauge>::default();
        registry.register(
            "program_busy_workers",
            "Workers of a worker program running a task now (also counted in busy_executors{mode=\"ISOLATED\"})",
            program_busy.clone(),
        );
        let program_live_workers = Family::<ProgramLabels, Gauge>::default();
        registry.register(
            "program_live_workers",
            "Worker processes of a worker program alive now (also counted in live_workers)",
            program_live_workers.clone(),
        );
        let program_restarts = Family::<ProgramReasonLabels, Counter>::default();
        registry.register(
            "program_worker_restarts",
            "Worker processes of a worker program replaced, by reason (also counted in worker_restarts)",
            program_restarts.clone(),
        );
        let rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rejected_calls",
            "Calls refused before running, by reason (queue_full, deadline, draining, no_worker, client_limit, too_large, memory)",
            rejected.clone(),
        );
        let inflight_bytes = Gauge::default();
        registry.register(
            "inflight_bytes",
            "Request and response bytes held now, counted against --max-inflight-bytes",
            inflight_bytes.clone(),
        );
        let inflight_budget = Gauge::default();
        registry.register(
            "inflight_bytes_budget",
            "The in-flight bytes budget (--max-inflight-bytes)",
            inflight_budget.clone(),
        );
        let jobs = Family::<StateLabels, Gauge>::default();
        registry.register(
            "jobs",
            "Jobs in the job store now, by state (every front sharing it sees the same)",
            jobs.clone(),
        );
        let oldest_queued_job = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "oldest_queued_job_age_seconds",
            "Age of the oldest job waiting for a front (0 with none queued)",
            oldest_queued_job.clone(),
        );
        let job_runs = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "job_runs",
            "Job runs this front ended, by outcome: succeeded, failed, cancelled, handed_back (at shutdown, or \
             refused by its executor: queued again), lost (its lease lapsed while it ran)",
            job_runs.clone(),
        );
        let job_lease_expiries = Counter::default();
        registry.register(
            "job_lease_expiries",
            "Running jobs this front found with a lapsed lease (their front was lost) and queued again",
            job_lease_expiries.clone(),
        );
        let cache_lookups = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_lookups",
            "Calls of cacheable tasks by how the result cache answered: hit (a stored result), coalesced (the \
             result of an identical call that ran meanwhile), miss (the call ran)",
            cache_lookups.clone(),
        );
        let cache_evictions = Family::<TaskLabels, Counter>::default();
        registry.register(
            "cache_evictions",
            "Results evicted from the result cache to make room, by task",
            cache_evictions.clone(),
        );
        let cache_bytes = Gauge::default();
        registry.register(
            "cache_bytes",
            "Bytes of results the in-memory result cache holds (bounded by --cache-max-bytes)",
            cache_bytes.clone(),
        );
        let cache_waiting = Gauge::default();
        registry.register(
            "cache_waiting",
            "Calls waiting now for the result of an identical call under way (coalesced)",
            cache_waiting.clone(),
        );
        Self {
            registry,
            cache_lookups,
            cache_evictions,
            cache_bytes,
            cache_waiting,
            jobs,
            oldest_queued_job,
            job_runs,
            job_lease_expiries,
            calls,
            duration,
            queue_wait,
            class_wait,
            client_in_flight,
            queue_depth,
            busy,
            live_workers,
            worker_restarts,
            program_queue_depth,
            program_busy,
            program_live_workers,
            program_restarts,
            rejected,
            inflight_bytes,
            inflight_budget,
            totals: std::sync::RwLock::default(),
        }
    }
}

impl Metrics {
    /// Counts a finished call; `timing` (queued, ran) when it ran.
    pub fn call(&self, task: &'static str, mode: &'static str, code: Code, timing: Option<(Duration, Duration)>) {
        // Labels borrow static names: no allocation per call.
        let labels = CallLabels { task, mode, code: code_name(code) };
        self.calls.get_or_create(&labels).inc();
        self.with_totals(task, mode, |totals| totals.add(code, timing));
        if let Some((queued, ran)) = timing {
            self.queue_wait.get_or_create(&ModeLabels { mode }).observe(queued.as_secs_f64());
            let labels = TaskModeLabels { task, mode };
            self.duration.get_or_create(&labels).observe(ran.as_secs_f64());
        }
    }

    /// Runs `update` on the totals of `task` in `mode` (made on first use).
    fn with_totals(&self, task: &'static str, mode: &'static str, update: impl FnOnce(&Totals)) {
        if let Some(totals) = self.totals.read().unwrap_or_else(|e| e.into_inner()).get(&(task, mode)) {
            return update(totals);
        }
        update(self.totals.write().unwrap_or_else(|e| e.into_inner()).entry((task, mode)).or_default());
    }

    /// Every task's totals by mode since start, sorted by task.
    pub fn task_totals(&self) -> Vec<TaskTotals> {
        let totals = self.totals.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<TaskTotals> = totals
            .iter()
            .map(|(&(task, mode), t)| TaskTotals {
                task,
                mode,
                calls: t.calls.load(Ordering::Relaxed),
                failed: t.failed.load(Ordering::Relaxed),
                ran: t.ran.load(Ordering::Relaxed),
                run: Duration::from_nanos(t.run_nanos.load(Ordering::Relaxed)),
                queued: Duration::from_nanos(t.queued_nanos.load(Ordering::Relaxed)),
                codes: t
                    .codes
                    .iter()
                    .enumerate()
                    .map(|(code, count)| (code_name(Code::from_i32(code as i32)), count.load(Ordering::Relaxed)))
                    .filter(|(_, count)| *count > 0)
                    .collect(),
                recent: t.recent.lock().unwrap_or_else(|e| e.into_inner()).percentiles(),
            })
            .collect();
        out.sort_by_key(|t| (t.task, t.mode));
        out
    }

    /// Records how long a call of `priority` from the client labelled
    /// `client` waited for its executor.
    pub fn waited(&self, priority: Priority, client: &str, queued: Duration) {
        let labels = ClassLabels { priority: priority.as_str(), client: client.to_string() };
        self.class_wait.get_or_create(&labels).observe(queued.as_secs_f64());
    }

    /// Counts a call that never ran: in calls_total, and in
    /// rejected_calls_total when it was refused for a `rejection` reason
    /// (queue_full, deadline, ...) rather than for a bad request.
    pub fn refused(&self, task: &'static str, mode: &'static str, code: Code, rejection: Option<&'static str>) {
        self.call(task, mode, code, None);
        if let Some(reason) = rejection {
            self.rejected.get_or_create(&ReasonLabels { reason }).inc();
        }
    }

    /// Counts a call of cacheable `task` by how the cache answered it.
    pub fn cache_lookup(&self, task: &'static str, result: &'static str) {
        self.cache_lookups.get_or_create(&CacheLabels { task, result }).inc();
    }

    /// Counts the results evicted from the cache, by task.
    pub fn cache_evicted(&self, evicted: &[(&'static str, usize)]) {
        for (task, _) in evicted {
            self.cache_evictions.get_or_create(&TaskLabels { task }).inc();
        }
    }

    /// Counts a job run this front ended, by `outcome`.
    pub fn job_run(&self, outcome: &'static str) {
        self.job_runs.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Counts `jobs` found with a lapsed lease.
    pub fn job_leases_expired(&self, jobs: usize) {
        self.job_lease_expiries.inc_by(jobs as u64);
    }

    /// The text exposition, with gauges read from `dispatcher` and the job
    /// store's `jobs` statistics now.
    pub fn render(&self, dispatcher: &Dispatcher, jobs: Option<&crate::jobs::store::Stats>) -> String {
        if let Some(stats) = jobs {
            for state in crate::jobs::store::State::ALL {
                let count = stats.by_state.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n);
                self.jobs.get_or_create(&StateLabels { state: state.label() }).set(count as i64);
            }
            let age = stats.oldest_queued_age.map_or(0.0, |age| age.as_secs_f64());
            self.oldest_queued_job.set(age);
        }
        // ISOLATED covers Offload's own workers and the worker programs'
        // together; the program_* families break the programs out.
        let programs = dispatcher.programs();
        let isolated: Vec<_> =
            std::iter::once(dispatcher.isolated()).chain(programs.iter().map(|p| &p.supervisor)).collect();
        let pool = dispatcher.pool().admission();
        for (mode, queued, running) in [
            ("POOL", pool.queued(), pool.running()),
            (
                "ISOLATED",
                isolated.iter().map(|s| s.admission().queued()).sum(),
                isolated.iter().map(|s| s.admission().running()).sum(),
            ),
        ] {
            let labels = ModeLabels { mode };
            self.queue_depth.get_or_create(&labels).set(queued as i64);
            self.busy.get_or_create(&labels).set(running as i64);
        }
        self.live_workers.set(isolated.iter().map(|s| s.live_workers() as i64).sum());
        for client in dispatcher.clients().declared() {
            let labels = ClientLabels { client: client.name().to_string() };
            self.client_in_flight.get_or_create(&labels).set(client.in_flight() as i64);
        }
        if let Some(cache) = dispatcher.cache() {
            self.cache_waiting.set(cache.waiting() as i64);
            if let Some(bytes) = cache.bytes_held() {
                self.cache_bytes.set(bytes as i64);
            }
        }
        let budget = dispatcher.budget();
        self.inflight_bytes.set(budget.used() as i64);
        self.inflight_budget.set(budget.limit() as i64);
        let mut deaths: Vec<(&'static str, u64)> = dispatcher.isolated().deaths();
        for program in programs {
            let supervisor = &program.supervisor;
            let labels = ProgramLabels { program: program.name.clone() };
            self.program_queue_depth.get_or_create(&labels).set(supervisor.admission().queued() as i64);
            self.program_busy.get_or_create(&labels).set(supervisor.admission().running() as i64);
            self.program_live_workers.get_or_create(&labels).set(supervisor.live_workers() as i64);
            for (total, (reason, more)) in deaths.iter_mut().zip(supervisor.deaths()) {
                total.1 += more;
                let labels = ProgramReasonLabels { program: program.name.clone(), reason };
                self.program_restarts.get_or_create(&labels).inner().store(more, Ordering::Relaxed);
            }
        }
        for (reason, total) in deaths {
            // The supervisors keep the totals (they only grow); the counter mirrors them.
            self.worker_restarts.get_or_create(&ReasonLabels { reason }).inner().store(total, Ordering::Relaxed);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// The canonical name of a gRPC code, as in the gRPC spec (e.g. NOT_FOUND).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` on `listener` (and the console's pages, when it
/// shares the address) until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    dispatcher: std::sync::Arc<Dispatcher>,
    jobs: Option<std::sync::Arc<crate::jobs::Jobs>>,
    console: Option<std::sync::Arc<crate::console::Console>>,
    stop: CancellationToken,
) {
    let respond = move |request: Request<Incoming>| {
        let (dispatcher, jobs) = (std::sync::Arc::clone(&dispatcher), jobs.clone());
        let page = console.as_ref().map(|c| c.respond(request.uri().path()).unwrap_or_else(crate::console::not_found));
        async move {
            if request.uri().path() == "/metrics" {
                let stats = match &jobs {
                    Some(jobs) => jobs.store.stats().await.ok(),
                    None => None,
                };
                let text = dispatcher.metrics().render(&dispatcher, stats.as_ref());
                Response::builder()
                    .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                    .body(Full::new(bytes::Bytes::from(text)))
                    .expect("valid response")
            } else if let Some(page) = page {
                page
            } else {
                Response::builder()
                    .status(404)
                    .body(Full::new(bytes::Bytes::from_static(b"metrics are at /metrics\n")))
                    .expect("valid response")
            }
        }
    };
    crate::plain_http::serve(listener, "metrics", stop, respond).await;
}

/// Binds the metrics address, logging where it serves.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "metrics on http://{local}/metrics");
    Ok(listener)
}
