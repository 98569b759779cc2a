//! The dispatcher: turns a call into a run on the right executor. It checks
//! the request (task, mode, params), asks the executor's admission control
//! for a place, runs tiny tasks inline and everything else on the pool, and
//! enforces the deadline and cancellation while it waits.
//!
//! The work is split in two steps so that streaming handlers can refuse a
//! call with a plain status before they start streaming: [`Dispatcher::admit`]
//! checks and reserves, [`Admitted::run`] runs.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use offload_proto::offload::v1::ExecutionMode;
use offload_worker::{
    CancelFlag, Catalog, Context, Job, Mode, ProgressSink, Task, TaskError, catalog::LookupError, run_job,
};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::Span;

use crate::{
    admission::{Admission, Refusal, Ticket},
    clients::{Client, Clients, InFlight},
    cost::{CostModel, Sizing},
    error::CallError,
    inflight::Budget,
    isolated::{
        DeathCause, JobError, Supervisor, WorkerJob,
        death::StopReason,
        program::{self, Program},
    },
    metrics::Metrics,
    pool::Pool,
    schedule::{Class, Priority},
    telemetry,
};

/// Calls open per pool thread up to which a cheap unary call may run in
/// place. Beyond it the I/O threads have other streams to read and write,
/// and blocking one costs more than the hop to the pool saves: with 1 MiB
/// hashes on 2 threads, running in place gained throughput at 1 to 16 calls
/// in flight and lost about a tenth of it at 64 and 256
/// (`bench/PROFILING.md`, item 11).
const IN_PLACE_OPEN_CALLS_PER_THREAD: usize = 8;

/// One call as the dispatcher sees it, decoded from any of the RPCs.
#[derive(Debug, Default)]
pub struct Call {
    /// Task name.
    pub task: String,
    /// Input bytes.
    pub input: Bytes,
    /// Raw parameters.
    pub params: HashMap<String, String>,
    /// Raw ExecutionMode value.
    pub mode: i32,
    /// Absolute deadline, from grpc-timeout.
    pub deadline: Option<Instant>,
    /// Who it is from (None: no one in particular, as in tests).
    pub client: Option<Arc<Client>>,
    /// Its priority.
    pub priority: Priority,
}

/// A finished run.
#[derive(Debug)]
pub struct Outcome {
    /// The task's output.
    pub output: Bytes,
    /// Where it ran.
    pub mode: Mode,
    /// Time between admission and start.
    pub queued: Duration,
    /// Time it ran.
    pub run: Duration,
    /// The worker's pid in ISOLATED mode, else 0.
    pub worker_pid: u32,
}

/// What a streaming caller sees of a run in progress.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProgressState {
    /// Whether the task has started.
    pub running: bool,
    /// Fraction done, never decreasing.
    pub fraction: f64,
    /// The task's latest note.
    pub message: String,
}

/// Settings of the dispatcher.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    /// Tasks cheaper than this run on the calling thread.
    pub inline_threshold: Duration,
    /// Unary POOL calls cheaper than this run on the calling thread when
    /// the pool is idle (see [`Pool::try_in_place`]).
    pub in_place_threshold: Duration,
    /// Largest output a response may carry.
    pub max_output_bytes: usize,
    /// Results of cacheable tasks; None when the cache is off.
    pub cache: Option<Arc<crate::cache::Cache>>,
}

/// Routes calls to executors.
#[derive(Debug)]
pub struct Dispatcher {
    catalog: Catalog,
    /// Expected costs per executor (a run in a worker also pays the IPC).
    pool_costs: CostModel,
    isolated_costs: CostModel,
    pool: Pool,
    isolated: Supervisor,
    /// Worker programs, each with its own workers and tasks.
    programs: Vec<Program>,
    /// The declared clients, and how calls are told apart.
    clients: Clients,
    options: DispatchOptions,
    draining: AtomicBool,
    metrics: Metrics,
    /// Request and response bytes held at once (see [`crate::inflight`]).
    budget: Arc<Budget>,
}

impl Dispatcher {
    /// A dispatcher serving `catalog` on `pool` and `isolated`, and the
    /// tasks of `programs` on their workers.
    pub fn new(
        catalog: Catalog,
        pool: Pool,
        isolated: Supervisor,
        programs: Vec<Program>,
        clients: Clients,
        budget: Arc<Budget>,
        options: DispatchOptions,
    ) -> Arc<Self> {
        Arc::new(Self {
            pool_costs: CostModel::new(&catalog),
            isolated_costs: CostModel::new(&catalog),
            catalog,
            pool,
            isolated,
            programs,
            clients,
            options,
            draining: AtomicBool::new(false),
            metrics: Metrics::default(),
            budget,
        })
    }

    /// The result cache, if it is on.
    pub fn cache(&self) -> Option<&Arc<crate::cache::Cache>> {
        self.options.cache.as_ref()
    }

    /// The in-flight bytes budget.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// The declared clients.
    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    /// The service's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The ISOLATED executor.
    pub fn isolated(&self) -> &Supervisor {
        &self.isolated
    }

    /// The tasks served.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The worker programs.
    pub fn programs(&self) -> &[Program] {
        &self.programs
    }

    /// Every task served now: the catalog's, then those the worker programs
    /// have declared so far.
    pub fn tasks(&self) -> Vec<Arc<dyn Task>> {
        let programs = self.programs.iter().filter_map(Program::tasks).flat_map(|known| known.tasks.values());
        self.catalog.iter().chain(programs).cloned().collect()
    }

    /// The task called `name`, and the index of the worker program that
    /// runs it, if one does.
    fn lookup(&self, name: &str) -> Result<(&Arc<dyn Task>, Option<usize>), CallError> {
        let Some((index, program)) = self.programs.iter().enumerate().find(|(_, p)| p.owns(name)) else {
            return Ok((self.catalog.get(name)?, None));
        };
        let known = program.tasks().ok_or_else(|| CallError::Unavailable(program.not_ready()))?;
        let task = known.tasks.get(name).ok_or_else(|| LookupError::Unknown {
            name: name.to_string(),
            available: known.tasks.keys().copied().collect(),
        })?;
        Ok((task, Some(index)))
    }

    /// The ISOLATED executor of a task and its cost model: the built-in
    /// workers, or those of worker program `program`.
    fn isolated_executor(&self, program: Option<usize>) -> (&Supervisor, &CostModel) {
        match program.map(|i| &self.programs[i]) {
            Some(program) => {
                let known = program.tasks().expect("a program's tasks are known once one of them was admitted");
                (&program.supervisor, &known.costs)
            }
            None => (&self.isolated, &self.isolated_costs),
        }
    }

    /// Stops every worker process, the programs' included.
    pub async fn stop_workers(&self, grace: Duration) {
        let programs = self.programs.iter().map(|p| p.supervisor.shutdown(grace));
        futures::future::join(self.isolated.shutdown(grace), futures::future::join_all(programs)).await;
    }

    /// The POOL executor.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Refuses new calls from now on; calls already admitted go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Checks `call` and reserves its place on an executor; a refusal is
    /// counted in the metrics here.
    ///
    /// A call refused for its expected wait is asked about once more after
    /// the tasks woken before it have run: a cancellation already delivered
    /// (an HTTP/2 reset wakes its call's handler, whose drop gives the
    /// call's place back at once) may not have taken effect yet, and tokio
    /// runs the task woken last first. Calls sent right after others were
    /// cancelled are then not refused for work nobody waits for.
    pub async fn admit(self: &Arc<Self>, call: Call) -> Result<Admitted, CallError> {
        // Labels for a refusal: unknown names are not labels (unbounded).
        let mut labels = ("unknown", "unknown");
        let admitted = match self.admit_labelled(call, &mut labels) {
            Err(Refused { retry: Some(call), .. }) => {
                tokio::task::yield_now().await;
                self.admit_labelled(*call, &mut labels).map_err(|refused| refused.error)
            }
            other => other.map_err(|refused| refused.error),
        };
        if let Err(err) = &admitted {
            self.metrics.refused(labels.0, labels.1, err.code(), err.rejection());
            if let CallError::PermissionDenied { client, task, .. } = err {
                tracing::info!(client = %client, task.name = %task, "call refused: {err}");
            }
        }
        admitted
    }

    /// Checks `call` as admission does (permission, task, mode, params)
    /// without reserving anything: what a job's Submit checks.
    pub fn check(&self, call: &Call) -> Result<(), CallError> {
        self.checked(call, &mut ("unknown", "unknown")).map(drop)
    }

    /// `call`'s result-cache key, with its task's name and the mode it would
    /// run in: only for a cacheable task, and only if the call passes every
    /// check admission makes (permission, task, mode, params), so that no
    /// hit answers a call that would be refused. A refused call gets none,
    /// and admission refuses it as usual.
    pub async fn cache_key(&self, call: &Call) -> Option<(crate::cache::Key, &'static str, Mode)> {
        self.cache()?;
        let Checked { task, mode, .. } = self.checked(call, &mut ("unknown", "unknown")).ok()?;
        let spec = task.spec();
        if !spec.cacheable {
            return None;
        }
        Some((crate::cache::Key::of_call(spec, &call.params, &call.input).await, spec.name, mode))
    }

    /// `call`'s task, worker program, mode and prepared job, once every
    /// check a call goes through before admission has passed.
    fn checked(&self, call: &Call, labels: &mut (&'static str, &'static str)) -> Result<Checked, CallError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(CallError::Draining);
        }
        // A task outside an authenticated client's patterns is refused
        // whether it exists or not (which tasks exist is not its business).
        if let Some(client) = &call.client {
            client.check_task(&call.task)?;
        }
        let (task, program) = self.lookup(&call.task).map_err(|err| match (err, &call.client) {
            (CallError::Lookup(LookupError::Unknown { name, available }), Some(client)) => {
                let available = available.into_iter().filter(|task| client.may_run(task)).collect();
                CallError::Lookup(LookupError::Unknown { name, available })
            }
            (err, _) => err,
        })?;
        let spec = task.spec();
        labels.0 = spec.name;
        let mode = match ExecutionMode::try_from(call.mode) {
            Ok(ExecutionMode::Unspecified) => spec.default_mode,
            Ok(ExecutionMode::Pool) => Mode::Pool,
            Ok(ExecutionMode::Isolated) => Mode::Isolated,
            Err(_) => return Err(CallError::UndefinedMode(call.mode)),
        };
        labels.1 = mode.as_str();
        if !spec.allowed_modes.contains(&mode) {
            return Err(CallError::ModeNotAllowed {
                task: spec.name,
                mode: mode.as_str(),
                allowed: spec.allowed_modes.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "),
            });
        }
        let job = Catalog::prepare(task.as_ref(), &call.params)
            .map_err(|source| CallError::Task { task: spec.name, source })?;
        Ok(Checked { task: Arc::clone(task), program, mode, job })
    }

    fn admit_labelled(
        self: &Arc<Self>,
        call: Call,
        labels: &mut (&'static str, &'static str),
    ) -> Result<Admitted, Refused> {
        let Checked { task, program, mode, job } = self.checked(&call, labels)?;
        let spec = task.spec();
        let (costs, admission, executor): (&CostModel, &Arc<Admission>, &'static str) = match mode {
            Mode::Pool => (&self.pool_costs, self.pool.admission(), "POOL thread"),
            Mode::Isolated => {
                let (supervisor, costs) = self.isolated_executor(program);
                supervisor.check_available().map_err(|e| CallError::Unavailable(e.to_string()))?;
                (costs, supervisor.admission(), "worker process")
            }
        };

        // Counted against its client's limit from here until the call ends.
        let in_flight = call.client.as_ref().map(Client::enter).transpose()?.flatten();
        let class = match &call.client {
            Some(client) => client.class(call.priority),
            None => Class::anonymous(call.priority),
        };
        let sizing = Sizing::of(job.as_ref(), call.input.len());
        let expected = costs.expected(spec.name, sizing);
        let placement = match expected {
            Some(cost) if mode == Mode::Pool && cost < self.options.inline_threshold => Placement::Inline,
            _ => {
                // Unknown work is charged a millisecond until measured.
                let cost = expected.unwrap_or(Duration::from_millis(1));
                match admission.admit(cost, call.deadline, class.priority) {
                    Ok(ticket) => Placement::Queued(mode, ticket),
                    Err(Refusal::QueueFull { capacity }) => {
                        return Err(CallError::QueueFull { mode: mode.as_str(), capacity }.into());
                    }
                    Err(Refusal::WouldMissDeadline { wait, remaining }) => {
                        let error = CallError::WouldMissDeadline { task: spec.name, executor, wait, remaining };
                        return Err(Refused { error, retry: Some(Box::new(call)) });
                    }
                }
            }
        };
        // A worker program gets every param, its declared defaults filled in.
        let params = match program {
            Some(_) => program::with_defaults(task.as_ref(), call.params),
            None => call.params,
        };
        Ok(Admitted {
            dispatcher: Arc::clone(self),
            task: Arc::clone(&task),
            program,
            job,
            params,
            input: call.input,
            deadline: call.deadline,
            sizing,
            in_place: mode == Mode::Isolated
                || (expected.is_some_and(|cost| cost < self.options.in_place_threshold)
                    && self.pool_costs.computes_in_place(spec.name)
                    && self.budget.open_calls() <= IN_PLACE_OPEN_CALLS_PER_THREAD * self.pool.threads()),
            placement,
            class,
            client: call.client,
            _in_flight: in_flight,
        })
    }
}

/// A call that passed the checks before admission.
struct Checked {
    task: Arc<dyn Task>,
    program: Option<usize>,
    mode: Mode,
    job: Box<dyn Job>,
}

/// Why [`Dispatcher::admit_labelled`] refused a call, with the call back
/// when it was refused only for its expected wait.
struct Refused {
    error: CallError,
    retry: Option<Box<Call>>,
}

impl From<CallError> for Refused {
    fn from(error: CallError) -> Self {
        Self { error, retry: None }
    }
}

enum Placement {
    /// Run on the calling thread: tiny POOL work.
    Inline,
    /// Queued on an executor.
    Queued(Mode, Ticket),
    /// A POOL call started on the calling thread, after waiting this long.
    InPlace(Ticket, Duration),
}

/// A call that passed admission and holds its place until it runs.
pub struct Admitted {
    dispatcher: Arc<Dispatcher>,
    task: Arc<dyn Task>,
    /// The worker program that runs it, if one does.
    program: Option<usize>,
    job: Box<dyn Job>,
    /// Raw params, for a worker process to prepare its own job from.
    params: HashMap<String, String>,
    input: Bytes,
    deadline: Option<Instant>,
    sizing: Sizing,
    /// Whether it may run from the handler's own task when its executor is
    /// idle: a cheap POOL call on the handler's thread, an ISOLATED call on
    /// a worker the handler drives itself.
    in_place: bool,
    placement: Placement,
    /// When its turn comes.
    class: Class,
    /// Its client (None: no one in particular).
    client: Option<Arc<Client>>,
    _in_flight: Option<InFlight>,
}

impl std::fmt::Debug for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitted").field("task", &self.task.spec().name).finish_non_exhaustive()
    }
}

/// Raises a call's cancel flag when its handler goes away, whether the
/// client cancelled, disconnected, or the deadline fired.
struct CancelOnDrop(CancelFlag);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Admitted {
    /// Runs the call; `progress`, when given, follows its stage and progress.
    /// The call is counted in the metrics however it ends (a call whose
    /// caller went away counts as CANCELLED).
    pub async fn run(mut self, progress: Option<watch::Sender<ProgressState>>) -> Result<Outcome, CallError> {
        // Its task may have other work to do (a stream's progress, a batch's items).
        self.in_place = false;
        self.run_counted(progress).await
    }

    /// Runs a unary call, as [`Admitted::run`] does. Its handler waits for
    /// nothing else, so a cheap POOL call may run in place when the pool is
    /// idle, blocking the handler's thread as long as it runs.
    pub async fn run_unary(self) -> Result<Outcome, CallError> {
        self.run_counted(None).await
    }

    /// Runs a job's call, as [`Admitted::run`] does, but a cheap call may
    /// run in place as a unary call's may: nothing its runner waits on (a
    /// lease renewed every few seconds, a cancel heard within a second)
    /// suffers from a few milliseconds' hold, and a tiny job is spared two
    /// thread wake-ups, most of its time on an idle machine.
    pub async fn run_job(self, progress: watch::Sender<ProgressState>) -> Result<Outcome, CallError> {
        self.run_counted(Some(progress)).await
    }

    async fn run_counted(self, progress: Option<watch::Sender<ProgressState>>) -> Result<Outcome, CallError> {
        let dispatcher = Arc::clone(&self.dispatcher);
        let mode = match &self.placement {
            Placement::Inline | Placement::InPlace(..) => Mode::Pool,
            Placement::Queued(mode, _) => *mode,
        };
        let mut record = CallRecord { metrics: &dispatcher.metrics, task: self.task.spec().name, mode, done: false };
        let result = self.execute(progress).await;
        record.done = true;
        let timing = result.as_ref().ok().map(|o| (o.queued, o.run));
        let code = result.as_ref().map_or_else(CallError::code, |_| tonic::Code::Ok);
        record.metrics.call(record.task, mode.as_str(), code, timing);
        result
    }

    async fn execute(self, progress: Option<watch::Sender<ProgressState>>) -> Result<Outcome, CallError> {
        let name = self.task.spec().name;
        let dispatcher = Arc::clone(&self.dispatcher);
        let max_output = dispatcher.options.max_output_bytes;
        let (job, input, deadline, sizing) = (self.job, self.input, self.deadline, self.sizing);
        let (class, client) = (self.class, self.client);
        // The caller's task has nothing else to do: running here spares two
        // thread wake-ups (see `pool`).
        let placement = match self.placement {
            Placement::Queued(Mode::Pool, mut ticket) if self.in_place => {
                match dispatcher.pool.try_in_place(&mut ticket) {
                    Some(queued) => Placement::InPlace(ticket, queued),
                    None => Placement::Queued(Mode::Pool, ticket),
                }
            }
            placement => placement,
        };
        let queued_call = !matches!(placement, Placement::Inline);
        let outcome = match placement {
            Placement::Inline => {
                let ctx = Context::new(deadline, CancelFlag::new(), None);
                let (result, run) = run_here(&dispatcher, &Span::current(), name, job.as_ref(), &ctx, input, sizing);
                let output = result.map_err(|source| task_error(name, source))?;
                Outcome { output, mode: Mode::Pool, queued: Duration::ZERO, run, worker_pid: 0 }
            }
            Placement::InPlace(ticket, queued) => {
                // A queue span, as for every call admitted to an executor
                // (traces keep one shape); its wait is nil.
                drop(telemetry::queue_span("POOL"));
                let sink = progress.map(progress_sink);
                if let Some(sink) = &sink {
                    sink(0.0, "");
                }
                let ctx = Context::new(deadline, CancelFlag::new(), sink);
                let cpu = crate::cost::thread_cpu_time();
                let (result, run) = run_here(&dispatcher, &Span::current(), name, job.as_ref(), &ctx, input, sizing);
                dispatcher.pool_costs.record_in_place(name, crate::cost::thread_cpu_time() - cpu, run);
                drop(ticket);
                let output = result.map_err(|source| task_error(name, source))?;
                Outcome { output, mode: Mode::Pool, queued, run, worker_pid: 0 }
            }
            Placement::Queued(Mode::Pool, ticket) => {
                let cancel = CancelFlag::new();
                let _cancel_on_drop = CancelOnDrop(cancel.clone());
                let _abandon_on_drop = ticket.abandon_on_drop();
                let started = Arc::new(AtomicBool::new(false));
                let sink = progress.map(progress_sink);
                let work_started = Arc::clone(&started);
                let work_dispatcher = Arc::clone(&dispatcher);
                let (parent, queue) = (Span::current(), telemetry::queue_span("POOL"));
                let done = dispatcher.pool.submit(ticket, &class, move |queued| {
                    drop(queue);
                    work_started.store(true, Ordering::Release);
                    if let Some(sink) = &sink {
                        sink(0.0, "");
                    }
                    let ctx = Context::new(deadline, cancel, sink);
                    let (result, run) = run_here(&work_dispatcher, &parent, name, job.as_ref(), &ctx, input, sizing);
                    (result, queued, run)
                });
                let (result, queued, run) = answer(done, deadline, &started, name).await?;
                let output = result.map_err(|source| task_error(name, source))?;
                Outcome { output, mode: Mode::Pool, queued, run, worker_pid: 0 }
            }
            Placement::Queued(Mode::Isolated, ticket) => {
                drop(job);
                let cancel = CancellationToken::new();
                let _cancel_on_drop = cancel.clone().drop_guard();
                let _abandon_on_drop = ticket.abandon_on_drop();
                let started = Arc::new(AtomicBool::new(false));
                let (reply, done) = oneshot::channel();
                let (supervisor, costs) = dispatcher.isolated_executor(self.program);
                let job = WorkerJob {
                    task: name,
                    params: self.params,
                    input,
                    deadline,
                    cancel,
                    progress: progress.map(progress_sink),
                    ticket,
                    class: class.clone(),
                    started: Arc::clone(&started),
                    span: Span::current(),
                    queue_span: telemetry::queue_span("ISOLATED"),
                    reply,
                };
                let answered = answer(done, deadline, &started, name);
                // The caller's task has nothing else to do: with a worker
                // idle, it runs the job itself (see `Supervisor::lend`).
                let lent = if self.in_place { supervisor.lend() } else { None };
                let answer = match lent {
                    Some(lent) => lent.run_until(job, answered).await,
                    None => {
                        supervisor.submit(job);
                        answered.await
                    }
                };
                let run = answer?.map_err(|err| job_error(name, err))?;
                // The task's own time: the cost model decides placement, and the
                // socket round trip is the same for every task.
                costs.record(name, sizing, run.task_run);
                Outcome {
                    output: run.output,
                    mode: Mode::Isolated,
                    queued: run.queued,
                    run: run.run,
                    worker_pid: run.pid,
                }
            }
        };
        if queued_call {
            let label = client.as_deref().map_or("", Client::label);
            dispatcher.metrics.waited(class.priority, label, outcome.queued);
        }
        if outcome.output.len() > max_output {
            return Err(CallError::OutputTooLarge { task: name, size: outcome.output.len(), limit: max_output });
        }
        Ok(outcome)
    }
}

/// Runs a POOL job on the calling thread, in its execution span, and feeds
/// a successful run's time to the cost model.
fn run_here(
    dispatcher: &Dispatcher,
    parent: &Span,
    name: &'static str,
    job: &dyn Job,
    ctx: &Context,
    input: Bytes,
    sizing: Sizing,
) -> (Result<Bytes, TaskError>, Duration) {
    let span = telemetry::execution_span(parent, name, "POOL", input.len());
    let _entered = span.enter();
    let start = Instant::now();
    let result = run_job(job, ctx, input);
    let run = start.elapsed();
    telemetry::record_run(&span, result.as_ref().map(Bytes::len));
    if result.is_ok() {
        dispatcher.pool_costs.record(name, sizing, run);
    }
    (result, run)
}

/// Counts a call whose future was dropped before it finished.
struct CallRecord<'a> {
    metrics: &'a Metrics,
    task: &'static str,
    mode: Mode,
    done: bool,
}

impl Drop for CallRecord<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.call(self.task, self.mode.as_str(), tonic::Code::Cancelled, None);
        }
    }
}

/// Waits for an executor's answer until the call's deadline.
async fn answer<T>(
    done: oneshot::Receiver<T>,
    deadline: Option<Instant>,
    started: &AtomicBool,
    task: &'static str,
) -> Result<T, CallError> {
    let finished = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), done).await.map_err(|_| {
            let stage = if started.load(Ordering::Acquire) { "running" } else { "queued" };
            CallError::DeadlineExceeded { task, stage }
        })?,
        None => done.await,
    };
    finished.map_err(|_| CallError::Internal(format!("{task}: the executor dropped the call")))
}

fn job_error(task: &'static str, err: JobError) -> CallError {
    match err {
        JobError::Task(source) => task_error(task, source),
        JobError::Died { pid, task, cause: DeathCause::MemoryLimit } => CallError::WorkerOutOfMemory { pid, task },
        JobError::Died { pid, task, cause } => CallError::WorkerDied { pid, task, cause: cause.to_string() },
        JobError::Stopped { reason: StopReason::Deadline, .. } => {
            CallError::DeadlineExceeded { task, stage: "running" }
        }
        JobError::Stopped { reason: StopReason::Cancelled, .. } => task_error(task, TaskError::Cancelled),
        JobError::Unavailable(message) => CallError::Unavailable(message),
    }
}

fn task_error(task: &'static str, source: TaskError) -> CallError {
    CallError::Task { task, source }
}

/// A progress sink feeding a watch channel: the first report marks the call
/// running, and the fraction never goes down even when parallel parts of a
/// task report out of order. A fraction outside [0, 1] is clamped into it
/// and NaN counts as no news, whoever reported it (a worker program may say
/// anything): callers always see a fraction in [0, 1].
fn progress_sink(tx: watch::Sender<ProgressState>) -> ProgressSink {
    Arc::new(move |fraction: f64, message: &str| {
        tx.send_if_modified(|state| {
            let fraction =
                if fraction.is_nan() { state.fraction } else { fraction.clamp(0.0, 1.0).max(state.fraction) };
            if state.running && fraction == state.fraction && message == state.message {
                return false;
            }
            state.running = true;
            state.fraction = fraction;
            if message != state.message {
                state.message = message.to_string();
            }
            true
        });
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_stays_in_zero_to_one_and_never_goes_down() {
        let (tx, rx) = watch::channel(ProgressState::default());
        let sink = progress_sink(tx);
        let mut seen = Vec::new();
        for fraction in [0.5, 0.2, 1.5, -1.0, f64::NAN, f64::INFINITY, 0.7] {
            sink(fraction, "");
            seen.push(rx.borrow().fraction);
        }
        assert_eq!(seen, [0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]);
        let (tx, rx) = watch::channel(ProgressState::default());
        let sink = progress_sink(tx);
        sink(f64::NAN, "starting");
        assert!(rx.borrow().running && rx.borrow().fraction == 0.0 && rx.borrow().message == "starting");
        sink(-3.0, "");
        sink(f64::NEG_INFINITY, "");
        assert_eq!(rx.borrow().fraction, 0.0);
    }
}
