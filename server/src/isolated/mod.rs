//! The ISOLATED executor: a pool of supervised worker processes, each
//! reached over its own Unix socket and running one task at a time.
//!
//! - [`worker`]: one worker process (spawn, handshake, run, stop ladder).
//! - `slot`: the loop that keeps one worker alive and feeds it jobs, and
//!   the lending of its idle worker to a caller.
//! - `socket`: the front's end of a worker's socket.
//! - [`death`]: why workers end, for statuses, logs and counters.
//! - [`program`]: worker programs in any language, and what they declare.
//!
//! Jobs wait in one shared queue (a [`FairQueue`]: priorities, then clients
//! in turn); each slot takes the next job only when its worker is ready, so
//! a call waits for a process to start only when every worker is busy or
//! being replaced. A slot that takes a tiny job also takes
//! the tiny jobs queued right behind it, up to [`PIPELINE_DEPTH`], and sends
//! them together: the worker runs them in order and answers them together,
//! so under load the socket round trip and the thread wake-ups are paid per
//! batch rather than per call. Jobs a worker never started when it died go
//! back to the front of the queue. When no call waits, a caller borrows an
//! idle worker instead and runs its job from its own task
//! ([`Supervisor::lend`]): at low load the hop through the slot is most of
//! the front's cost.

pub mod death;
pub mod program;
pub mod sandbox;
mod slot;
mod socket;
mod stderr;
pub mod worker;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use offload_worker::{ProgressSink, TaskError};
use tokio::sync::{Notify, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admission::{Admission, Ticket},
    schedule::{Class, FairQueue},
};
pub use death::DeathCause;
use death::{DeathCounters, Rung, StopReason};
pub use slot::Lent;
use worker::WorkerProcess;
pub use worker::{Launch, WorkerOptions};

/// Settings of the ISOLATED executor.
#[derive(Debug, Clone)]
pub struct IsolatedOptions {
    /// Worker processes kept running.
    pub workers: usize,
    /// Calls that may wait for a worker.
    pub queue_capacity: usize,
    /// How each worker is started and watched.
    pub worker: WorkerOptions,
    /// Tasks after which a worker is replaced (0: never).
    pub max_tasks_per_worker: u64,
    /// Resident memory after which a worker is replaced (0: never).
    pub max_worker_rss_bytes: u64,
}

/// One task for a worker.
pub struct WorkerJob {
    /// Task name.
    pub task: &'static str,
    /// Raw params, already validated by the front.
    pub params: HashMap<String, String>,
    /// Input bytes.
    pub input: Bytes,
    /// Absolute deadline.
    pub deadline: Option<Instant>,
    /// Cancelled when the caller goes away.
    pub cancel: CancellationToken,
    /// Receives the task's progress.
    pub progress: Option<ProgressSink>,
    /// The job's place in the executor's load.
    pub ticket: Ticket,
    /// Its client and priority: when its turn comes.
    pub class: Class,
    /// Set when a worker takes the job.
    pub started: Arc<AtomicBool>,
    /// The caller's span: the execution span goes under it.
    pub span: tracing::Span,
    /// The span of the wait for a worker, ended when one takes the job.
    pub queue_span: tracing::Span,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<WorkerRun, JobError>>,
}

/// Jobs expected to take less than this are tiny: the worker may run them on
/// its frame-reading thread (the thread hop would cost more than the task,
/// and pings wait at most this long), and they may be pipelined.
const TINY_BELOW: Duration = Duration::from_micros(500);

impl WorkerJob {
    /// Whether the job is expected to take well under a millisecond (unknown
    /// work is charged a millisecond by admission, so it is not).
    fn tiny(&self) -> bool {
        self.ticket.cost() < TINY_BELOW
    }

    /// Whether the job may share a worker round trip with others.
    fn pipelinable(&self) -> bool {
        self.tiny() && self.input.len() < PIPELINE_INPUT_BELOW
    }

    fn refuse(self) {
        let _ = self.reply.send(Err(JobError::Unavailable("the worker pool has stopped".into())));
    }
}

/// A task a worker finished.
#[derive(Debug)]
pub struct WorkerRun {
    /// The output.
    pub output: Bytes,
    /// Time between admission and start.
    pub queued: Duration,
    /// Time from sending to the answer.
    pub run: Duration,
    /// Time the task itself ran inside the worker.
    pub task_run: Duration,
    /// The worker's pid.
    pub pid: u32,
}

/// Why an isolated job produced no output.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The task failed inside a healthy worker.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The worker died while running the task.
    #[error("worker {pid} {cause} while running {task}")]
    Died {
        /// The worker's pid.
        pid: u32,
        /// The task it ran.
        task: &'static str,
        /// Why it died.
        cause: DeathCause,
    },
    /// The front stopped the task (deadline or cancellation).
    #[error("stopped by {rung}")]
    Stopped {
        /// Why.
        reason: StopReason,
        /// The rung of the ladder that worked.
        rung: Rung,
    },
    /// No worker can be started.
    #[error("{0}")]
    Unavailable(String),
}

/// Tiny jobs sent to one worker at once, at most.
pub const PIPELINE_DEPTH: usize = 64;

/// Expected run time of the jobs sent to one worker at once, at most: the
/// last of them never waits longer than this behind the others, and a burst
/// of tiny jobs is shared among the free workers rather than all taken by
/// the first.
const PIPELINE_BUDGET: Duration = Duration::from_millis(1);
const _: () = assert!(PIPELINE_DEPTH <= offload_proto::framing::MAX_OUTSTANDING);

/// Inputs larger than this are never pipelined: their copy and transfer
/// would outweigh the saved round trip.
const PIPELINE_INPUT_BELOW: usize = 16 << 10;

/// The jobs waiting for a worker, and the idle workers a caller may
/// borrow (see [`Supervisor::lend`]), under one lock: a caller borrows a
/// worker only when no job waits, and a job queued while a worker is idle
/// wakes that worker's slot.
#[derive(Default)]
struct JobQueue {
    state: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    jobs: FairQueue<WorkerJob>,
    /// Set at shutdown: new jobs are refused.
    closed: bool,
    /// Idle workers, the one benched last at the end: its process is the
    /// one most likely still on a CPU and in its caches (a worker idle for
    /// a while pays tens of microseconds to wake).
    bench: Vec<(Arc<Slot>, WorkerProcess)>,
    /// Workers lent to callers, by slot id: whether their slot waits for
    /// them back.
    lent: HashMap<usize, bool>,
    /// Workers callers gave back for their slot to deal with, by slot id.
    back: HashMap<usize, (WorkerProcess, slot::Returned)>,
}

/// What a slot waiting for work finds (moved once, not stored).
#[allow(clippy::large_enum_variant)]
enum Claim {
    /// Jobs are waiting: the first of them, with the slot's worker.
    Job(WorkerJob, WorkerProcess),
    /// A caller gave the worker back for the slot to deal with.
    Back(WorkerProcess, slot::Returned),
}

/// Where a slot's idle worker is (moved once, not stored).
#[allow(clippy::large_enum_variant)]
enum Found {
    Idle(WorkerProcess),
    Back(WorkerProcess, slot::Returned),
    /// With a caller, which gives it back to the slot when done.
    Lent,
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("JobQueue").field("waiting", &state.jobs.len()).field("idle", &state.bench.len()).finish()
    }
}

impl Waiting {
    fn benched(&self, slot: &Slot) -> Option<usize> {
        self.bench.iter().position(|(s, _)| s.id == slot.id)
    }

    /// Jobs are queued: wakes the slot whose worker went idle last, after
    /// letting go of the lock.
    fn wake_idle(state: std::sync::MutexGuard<'_, Self>) {
        let slot = state.bench.last().map(|(slot, _)| Arc::clone(slot));
        drop(state);
        if let Some(slot) = slot {
            slot.wake.notify_one();
        }
    }
}

impl JobQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job` in its turn, or refuses it once the queue is closed.
    fn push(&self, job: WorkerJob) {
        let mut state = self.lock();
        if state.closed {
            drop(state);
            return job.refuse();
        }
        state.jobs.push(&job.class.clone(), job);
        Waiting::wake_idle(state);
    }

    /// Puts jobs a dead worker never started back first, in order.
    fn requeue(&self, jobs: Vec<WorkerJob>) {
        let mut state = self.lock();
        if state.closed {
            drop(state);
            return jobs.into_iter().for_each(WorkerJob::refuse);
        }
        for job in jobs.into_iter().rev() {
            state.jobs.push_front(&job.class.clone(), job);
        }
        Waiting::wake_idle(state);
    }

    /// Puts `slot`'s idle worker on the bench.
    fn bench(&self, slot: &Arc<Slot>, worker: WorkerProcess) {
        self.lock().bench.push((Arc::clone(slot), worker));
    }

    /// Takes `slot`'s worker off the bench, if it is there.
    fn unbench(&self, slot: &Slot) -> Option<WorkerProcess> {
        let mut state = self.lock();
        let at = state.benched(slot)?;
        Some(state.bench.remove(at).1)
    }

    /// Work for `slot`, whose worker is benched or lent: the next job (only
    /// while its worker is on the bench), or its worker given back.
    fn claim(&self, slot: &Slot) -> Option<Claim> {
        let mut state = self.lock();
        if let Some((worker, returned)) = state.back.remove(&slot.id) {
            return Some(Claim::Back(worker, returned));
        }
        let at = state.benched(slot)?;
        let job = state.jobs.pop()?;
        let worker = state.bench.remove(at).1;
        // More jobs than this slot's batch will take: the next idle worker's
        // slot looks too.
        if !state.jobs.is_empty() {
            Waiting::wake_idle(state);
        }
        Some(Claim::Job(job, worker))
    }

    /// `slot`'s worker, wherever it is; a lent one is marked wanted, so that
    /// its caller gives it back to the slot rather than to the bench.
    fn reclaim(&self, slot: &Slot) -> Found {
        let mut state = self.lock();
        if let Some(at) = state.benched(slot) {
            return Found::Idle(state.bench.remove(at).1);
        }
        if let Some((worker, returned)) = state.back.remove(&slot.id) {
            return Found::Back(worker, returned);
        }
        state.lent.insert(slot.id, true);
        Found::Lent
    }

    /// An idle worker for a caller, when no job waits.
    fn lend(&self) -> Option<(Arc<Slot>, WorkerProcess)> {
        let mut state = self.lock();
        if state.closed || !state.jobs.is_empty() {
            return None;
        }
        let (slot, worker) = state.bench.pop()?;
        state.lent.insert(slot.id, false);
        Some((slot, worker))
    }

    /// A caller gives back `slot`'s worker: to the bench when `idle` (it
    /// ran its job and is due for nothing) and neither its slot nor a job
    /// waits for it, which wakes no one; else to its slot.
    fn give_back(&self, slot: &Arc<Slot>, worker: WorkerProcess, returned: slot::Returned, idle: bool) {
        let mut state = self.lock();
        let wanted = state.lent.remove(&slot.id).unwrap_or(false);
        if idle && !wanted && state.jobs.is_empty() {
            state.bench.push((Arc::clone(slot), worker));
            return;
        }
        state.back.insert(slot.id, (worker, returned));
        drop(state);
        slot.wake.notify_one();
    }

    /// Adds to `batch` (whose jobs a slot just took) the jobs that go next,
    /// without waiting, while all are pipelinable, there are at most `max`,
    /// and their expected run time fits in [`PIPELINE_BUDGET`].
    fn fill_batch(&self, max: usize, batch: &mut Vec<WorkerJob>) {
        if !batch.iter().all(WorkerJob::pipelinable) {
            return;
        }
        let mut budget: Duration = batch.iter().map(|job| job.ticket.cost()).sum();
        let mut state = self.lock();
        while batch.len() < max
            && let Some(next) =
                state.jobs.pop_if(|job| job.pipelinable() && budget + job.ticket.cost() <= PIPELINE_BUDGET)
        {
            budget += next.ticket.cost();
            batch.push(next);
        }
    }

    /// Refuses new jobs and answers the waiting ones.
    fn close(&self) {
        let waiting = {
            let mut state = self.lock();
            state.closed = true;
            state.jobs.drain()
        };
        waiting.into_iter().for_each(WorkerJob::refuse);
    }
}

/// State shared by the slots and the dispatcher.
#[derive(Debug)]
struct Shared {
    options: IsolatedOptions,
    queue: JobQueue,
    live: AtomicUsize,
    last_start_error: Mutex<Option<String>>,
    /// What the last worker that failed its start wrote to stderr (its pid
    /// left out), logged in full once per distinct failure.
    last_start_stderr: Mutex<String>,
    deaths: DeathCounters,
}

/// What a slot's worker is doing, as the admin API shows it.
#[derive(Debug, Clone, Default)]
pub struct WorkerView {
    /// The slot's index in its pool.
    pub slot: usize,
    /// The process, while one runs in the slot.
    pub pid: Option<u32>,
    /// "starting", "idle", "busy" or "stopping".
    pub state: &'static str,
    /// The task it runs, when busy.
    pub task: &'static str,
    /// Tasks it finished.
    pub tasks_done: u64,
    /// When the process started.
    pub started: Option<Instant>,
}

/// One slot as the supervisor and the admin API see it.
#[derive(Debug)]
struct Slot {
    /// Unique among the slots of the process (an index is reused when the
    /// pool shrinks and grows while a stopping slot still retires its worker).
    id: usize,
    view: Mutex<WorkerView>,
    /// Asks the slot to replace its worker (set, then the slot is woken).
    recycle: AtomicBool,
    /// Wakes the slot: a job for its idle worker, its worker given back by
    /// a caller, or the admin API's recycle.
    wake: Notify,
    /// Stops this slot alone (the pool shrinking), or with the pool.
    stop: CancellationToken,
}

impl Slot {
    fn view(&self) -> std::sync::MutexGuard<'_, WorkerView> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut WorkerView)) {
        change(&mut self.view());
    }

    fn index(&self) -> usize {
        self.view().slot
    }
}

/// The pool of worker processes.
#[derive(Debug)]
pub struct Supervisor {
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    tracker: TaskTracker,
    slots: Mutex<Vec<Arc<Slot>>>,
    stop: CancellationToken,
}

impl Supervisor {
    /// Starts `options.workers` slots, each spawning its worker.
    pub fn start(options: IsolatedOptions) -> Self {
        let admission = Admission::new(options.workers, options.queue_capacity);
        let workers = options.workers;
        let shared = Arc::new(Shared {
            options,
            queue: JobQueue::default(),
            live: AtomicUsize::new(0),
            last_start_error: Mutex::new(None),
            last_start_stderr: Mutex::default(),
            deaths: DeathCounters::default(),
        });
        let tracker = TaskTracker::new();
        tracker.close();
        let supervisor =
            Self { shared, admission, tracker, slots: Mutex::new(Vec::new()), stop: CancellationToken::new() };
        supervisor.resize(workers);
        supervisor
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `workers` worker processes from now on (at least one): new
    /// slots start their worker at once; the slots beyond retire theirs
    /// after its task. Returns the number before.
    pub fn resize(&self, workers: usize) -> usize {
        let workers = workers.max(1);
        let mut slots = self.slots();
        let previous = slots.len();
        while slots.len() > workers {
            let slot = slots.pop().expect("a slot");
            slot.update(|v| v.state = "stopping");
            slot.stop.cancel();
        }
        while slots.len() < workers {
            static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
            let slot = Arc::new(Slot {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                view: Mutex::new(WorkerView { slot: slots.len(), state: "starting", ..WorkerView::default() }),
                recycle: AtomicBool::new(false),
                wake: Notify::new(),
                stop: self.stop.child_token(),
            });
            self.tracker.spawn(slot::run(Arc::clone(&slot), Arc::clone(&self.shared)));
            slots.push(slot);
        }
        self.admission.set_slots(workers);
        previous
    }

    /// Worker processes it keeps.
    pub fn size(&self) -> usize {
        self.slots().len()
    }

    /// What each slot's worker is doing now.
    pub fn workers(&self) -> Vec<WorkerView> {
        self.slots().iter().map(|slot| slot.view().clone()).collect()
    }

    /// Asks the slot running worker `pid` to replace it (the replacement
    /// first, then the worker retires after its task). False when no
    /// worker of this pool has that pid.
    pub fn recycle(&self, pid: u32) -> bool {
        let slots = self.slots();
        let Some(slot) = slots.iter().find(|s| s.view().pid == Some(pid)) else {
            return false;
        };
        slot.recycle.store(true, Ordering::Release);
        slot.wake.notify_one();
        true
    }

    /// The executor's admission control.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Worker processes alive now.
    pub fn live_workers(&self) -> usize {
        self.shared.live.load(Ordering::Relaxed)
    }

    /// Deaths by cause since start.
    pub fn deaths(&self) -> Vec<(&'static str, u64)> {
        self.shared.deaths.snapshot()
    }

    /// Fails when no worker is alive and the last start failed, so that
    /// calls are refused instead of waiting for a worker that may never come.
    pub fn check_available(&self) -> Result<(), JobError> {
        if self.live_workers() > 0 {
            return Ok(());
        }
        match self.shared.last_start_error.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(err) => {
                Err(JobError::Unavailable(format!("no worker process is running; the last start failed: {err}")))
            }
            None => Ok(()),
        }
    }

    /// Queues `job` for the next free worker.
    pub fn submit(&self, job: WorkerJob) {
        self.shared.queue.push(job);
    }

    /// An idle worker for the caller to run its job on from its own task,
    /// when no other call waits: the job then reaches the worker with no
    /// hop through the worker's slot task, and its answer wakes the caller
    /// directly (two thread wake-ups fewer, which at concurrency 1 are
    /// most of the front's share of a call; bench/PROFILING.md, item 13).
    /// Under load calls go through the queue, where a worker takes the
    /// tiny ones in batches.
    pub fn lend(&self) -> Option<Lent> {
        // The caller's own call is one of the queued.
        if self.admission.queued() > 1 {
            return None;
        }
        let (slot, worker) = self.shared.queue.lend()?;
        Some(Lent::new(Arc::clone(&self.shared), slot, worker))
    }

    /// Stops every worker (idle ones at once, busy ones after their task or
    /// at `grace`) and waits for them to be reaped.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(grace + Duration::from_secs(1), self.tracker.wait()).await.is_err() {
            tracing::warn!("worker slots did not stop in time");
        }
        self.shared.queue.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Priority;

    const US: Duration = Duration::from_micros(1);

    fn job(admission: &Arc<Admission>, cost: Duration, input: usize) -> WorkerJob {
        WorkerJob {
            task: "debug.echo",
            params: HashMap::new(),
            input: Bytes::from(vec![0u8; input]),
            deadline: None,
            cancel: CancellationToken::new(),
            progress: None,
            ticket: admission.admit(cost, None, Priority::Interactive).expect("room"),
            class: Class::anonymous(Priority::Interactive),
            started: Arc::default(),
            span: tracing::Span::none(),
            queue_span: tracing::Span::none(),
            reply: oneshot::channel().0,
        }
    }

    /// The batch a free worker takes from a queue holding `jobs`, as their costs.
    fn batch(jobs: Vec<WorkerJob>) -> Vec<Duration> {
        let queue = JobQueue::default();
        jobs.into_iter().for_each(|j| queue.push(j));
        let first = queue.lock().jobs.pop().expect("a job");
        let mut batch = vec![first];
        queue.fill_batch(PIPELINE_DEPTH, &mut batch);
        batch.iter().map(|j| j.ticket.cost()).collect()
    }

    #[tokio::test]
    async fn a_batch_takes_the_tiny_jobs_in_front_within_the_depth_and_the_time_budget() {
        let a = Admission::new(1, 1000);
        // Within the budget, up to the depth.
        let echoes = (0..100).map(|_| job(&a, 2 * US, 64)).collect();
        assert_eq!(batch(echoes).len(), PIPELINE_DEPTH);
        // 300 us each: three fit in the budget.
        let costly = (0..5).map(|_| job(&a, 300 * US, 64)).collect();
        assert_eq!(batch(costly), [300 * US; 3]);
        // A job that is not tiny (5 ms), or whose input is large, ends the batch.
        let mixed = vec![job(&a, 2 * US, 64), job(&a, 5000 * US, 64), job(&a, 2 * US, 64)];
        assert_eq!(batch(mixed), [2 * US]);
        let large = vec![job(&a, 2 * US, 64), job(&a, 2 * US, PIPELINE_INPUT_BELOW)];
        assert_eq!(batch(large), [2 * US]);
        // A job that is not tiny goes alone.
        let heavy = vec![job(&a, 5000 * US, 64), job(&a, 2 * US, 64)];
        assert_eq!(batch(heavy), [5000 * US]);
    }

    #[tokio::test]
    async fn a_closed_queue_answers_waiting_and_new_jobs_unavailable() {
        let a = Admission::new(1, 10);
        let queue = JobQueue::default();
        let (waiting, mut waiting_answer) = oneshot::channel();
        queue.push(WorkerJob { reply: waiting, ..job(&a, US, 1) });
        queue.close();
        let (late, mut late_answer) = oneshot::channel();
        queue.push(WorkerJob { reply: late, ..job(&a, US, 1) });
        for answer in [waiting_answer.try_recv(), late_answer.try_recv()] {
            assert!(matches!(answer, Ok(Err(JobError::Unavailable(_)))), "{answer:?}");
        }
    }
}
