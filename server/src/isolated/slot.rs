//! One worker slot: keeps a worker process alive and feeds it jobs from the
//! shared queue. It replaces a worker that died (right away after a task
//! killed it; with capped exponential backoff while starts keep failing),
//! recycles one that ran enough tasks or grew too large (starting the
//! replacement first, so capacity never dips), and retires it on shutdown.
//!
//! While idle, its worker waits on the bench, where a caller may borrow it
//! ([`Lent`]) and give it back; the slot watches the benched worker's exit
//! (a pidfd) and heartbeats, and deals with what a caller cannot: a job
//! the caller stopped waiting for, a death, a recycle.

use std::{
    os::fd::OwnedFd,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use super::{
    Claim, Found, JobError, Shared, Slot, WorkerJob,
    death::{DeathCause, StopReason},
    worker::{Fate, StartError, Unanswered, WorkerProcess},
};

/// Why a worker is replaced when the admin API asks.
const RECYCLED_BY_ADMIN: &str = "the admin API asked";

/// First and longest waits between failed starts.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// What a caller hands back with a worker it borrowed.
pub(super) enum Returned {
    /// Its job ran (or the worker died running it); the worker is due for
    /// recycling when a reason is given.
    Ran(Fate, &'static str, Option<String>),
    /// The caller stopped waiting while the worker ran its job (deadline,
    /// or it went away): the slot stops the job.
    Interrupted(Unanswered, StopReason),
}

/// Why an idle slot woke (moved once, not stored).
#[allow(clippy::large_enum_variant)]
enum Woken {
    Claimed(Claim),
    Stop,
    Exited,
    Recycle,
    /// Its benched worker died, found at a heartbeat.
    Died(DeathCause),
}

/// Runs `slot` until its stop token fires.
pub(super) async fn run(slot: Arc<Slot>, shared: Arc<Shared>) {
    let options = &shared.options;
    let index = slot.index();
    let stop: &CancellationToken = &slot.stop;
    let mut backoff = BACKOFF_FIRST;
    let mut worker: Option<WorkerProcess> = None;
    loop {
        let current = match worker.take() {
            Some(w) => w,
            None if stop.is_cancelled() => return,
            None => match start(&shared).await {
                Ok(w) => {
                    backoff = BACKOFF_FIRST;
                    started(&slot, &w);
                    w
                }
                Err(err) => {
                    tracing::warn!(slot = index, error = %err, retry_in = ?backoff, "worker failed to start; backing off");
                    *shared.last_start_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_CAP);
                    continue;
                }
            },
        };

        // Idle: on the bench, where a caller may borrow it, until the slot
        // has something to do. Its exit is watched here; its socket at
        // heartbeats (a benched worker has nothing to say but pongs).
        let pid = current.pid();
        let exit = current.exit_watch();
        shared.queue.bench(&slot, current);
        let woken = idle(&slot, &shared, exit.as_deref()).await;
        let (stopping, exited) = (matches!(woken, Woken::Stop), matches!(woken, Woken::Exited));
        let (mut current, returned) = match woken {
            Woken::Claimed(Claim::Job(job, w)) => {
                worker = Some(w);
                run_batch(&slot, &shared, &mut worker, job).await;
                continue;
            }
            Woken::Claimed(Claim::Back(w, returned)) => (w, Some(returned)),
            Woken::Died(cause) => {
                buried(&shared, &slot, pid, &cause, None);
                continue;
            }
            Woken::Stop | Woken::Exited | Woken::Recycle => reclaim(&slot, &shared).await,
        };
        let (fate, task, due) = match returned {
            Some(Returned::Ran(fate, task, due)) => (fate, Some(task), due),
            Some(Returned::Interrupted(job, reason)) => {
                (current.stop(job.id, job.task, reason, &options.worker, &job.span).await.1, Some(job.task), None)
            }
            None if exited => (Fate::Dead(current.death().await), None, None),
            None => (Fate::Alive, None, None),
        };
        if let Fate::Dead(cause) = fate {
            buried(&shared, &slot, pid, &cause, task);
            continue;
        }
        if stopping || stop.is_cancelled() {
            // Stopping: retire the worker and leave.
            shared.live.fetch_sub(1, Ordering::Relaxed);
            current.retire(options.worker.kill_grace * 5).await;
            return;
        }
        shown_idle(&slot, &current);
        worker = Some(current);
        recycle_if_due(&shared, &slot, &mut worker, due).await;
    }
}

/// Waits, with the slot's worker on the bench, until the slot has
/// something to do; answers the benched worker's heartbeats meanwhile.
async fn idle(slot: &Arc<Slot>, shared: &Shared, exit: Option<&AsyncFd<OwnedFd>>) -> Woken {
    let mut heartbeat = super::worker::heartbeat(&shared.options.worker);
    loop {
        let woken = slot.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if let Some(claim) = shared.queue.claim(slot) {
            return Woken::Claimed(claim);
        }
        if slot.recycle.load(Ordering::Acquire) {
            return Woken::Recycle;
        }
        tokio::select! {
            () = &mut woken => {}
            () = slot.stop.cancelled() => return Woken::Stop,
            () = exited(exit) => return Woken::Exited,
            _ = heartbeat.tick() => {
                // A lent worker's heartbeats are its caller's run's.
                let Some(mut worker) = shared.queue.unbench(slot) else { continue };
                match worker.beat_idle(&shared.options.worker).await {
                    Fate::Alive => shared.queue.bench(slot, worker),
                    Fate::Dead(cause) => return Woken::Died(cause),
                }
            }
        }
    }
}

/// Resolves when the watched process exits (never without a watch).
async fn exited(exit: Option<&AsyncFd<OwnedFd>>) {
    match exit {
        Some(pidfd) => {
            let _ = pidfd.readable().await;
        }
        None => std::future::pending().await,
    }
}

/// The slot's worker, waiting for a caller that borrowed it to give it back.
async fn reclaim(slot: &Slot, shared: &Shared) -> (WorkerProcess, Option<Returned>) {
    loop {
        let back = slot.wake.notified();
        tokio::pin!(back);
        back.as_mut().enable();
        match shared.queue.reclaim(slot) {
            Found::Idle(worker) => return (worker, None),
            Found::Back(worker, returned) => return (worker, Some(returned)),
            Found::Lent => back.await,
        }
    }
}

/// Runs `first` and the jobs that may go with it on the slot's worker, then
/// buries or recycles it as its fate says.
async fn run_batch(slot: &Slot, shared: &Shared, worker: &mut Option<WorkerProcess>, first: WorkerJob) {
    let options = &shared.options;
    let current = worker.as_mut().expect("a worker");
    let mut batch = vec![first];
    shared.queue.fill_batch(pipeline_room(shared, current), &mut batch);
    let batch: Vec<WorkerJob> = batch
        .into_iter()
        .filter_map(|job| match expired(&job) {
            Some(early) => {
                let _ = job.reply.send(Err(early));
                None
            }
            None => Some(job),
        })
        .collect();
    if batch.is_empty() {
        return;
    }
    let pid = current.pid();
    tracing::debug!(jobs = batch.len(), "sending jobs to worker {pid}");
    let task = batch[0].task;
    slot.update(|v| (v.state, v.task) = ("busy", task));
    let end = current.run(batch, &options.worker).await;
    shown_idle(slot, current);
    if !end.unstarted.is_empty() {
        shared.queue.requeue(end.unstarted);
    }
    match end.fate {
        Fate::Dead(cause) => {
            *worker = None;
            buried(shared, slot, pid, &cause, Some(end.task));
        }
        Fate::Alive => recycle_if_due(shared, slot, worker, None).await,
    }
}

/// Replaces the slot's live worker if the admin API asked, if `due` gives
/// a reason, or if it ran or grew enough.
async fn recycle_if_due(shared: &Shared, slot: &Slot, worker: &mut Option<WorkerProcess>, due: Option<String>) {
    let Some(current) = worker.as_mut() else { return };
    let reason = match slot.recycle.swap(false, Ordering::AcqRel) {
        true => Some(RECYCLED_BY_ADMIN.to_string()),
        false => due.or_else(|| recycle_reason(shared, current)),
    };
    if let Some(reason) = reason {
        recycle(shared, slot, worker, &reason).await;
    }
}

/// An idle worker lent to a caller ([`super::Supervisor::lend`]), which
/// runs one job on it from its own task. Dropped, it goes back: to the
/// bench when all went well (waking no one), else to its slot, which stops
/// a job the caller gave up on (deadline, or the caller went away) with
/// the usual ladder, and buries or recycles the worker.
pub struct Lent {
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    worker: Option<WorkerProcess>,
    ran: Option<(Fate, &'static str)>,
    deadline: Option<Instant>,
}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent").field("slot", &self.slot.id).finish_non_exhaustive()
    }
}

impl Lent {
    pub(super) fn new(shared: Arc<Shared>, slot: Arc<Slot>, worker: WorkerProcess) -> Self {
        Self { shared, slot, worker: Some(worker), ran: None, deadline: None }
    }

    /// Runs `job` (answering it through its reply channel) while waiting
    /// for `answered`, the caller's wait for that answer, which ends the
    /// run: a caller that stops waiting (its deadline) leaves the job to
    /// the worker's slot.
    pub async fn run_until<T>(mut self, job: WorkerJob, answered: impl Future<Output = T>) -> T {
        self.deadline = job.deadline;
        let task = job.task;
        let running = async {
            let worker = self.worker.as_mut().expect("a lent worker");
            self.slot.update(|v| (v.state, v.task) = ("busy", task));
            let end = worker.run(vec![job], &self.shared.options.worker).await;
            self.ran = Some((end.fate, end.task));
        };
        tokio::pin!(running, answered);
        tokio::select! {
            biased;
            out = &mut answered => out,
            () = &mut running => answered.await,
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let Some(mut worker) = self.worker.take() else { return };
        let returned = match (self.ran.take(), worker.unanswered()) {
            (Some((fate @ Fate::Alive, task)), _) => {
                Returned::Ran(fate, task, recycle_reason(&self.shared, &mut worker))
            }
            (Some((fate, task)), _) => Returned::Ran(fate, task, None),
            (None, Some(job)) => {
                let late = self.deadline.is_some_and(|d| Instant::now() >= d);
                let reason = if late { StopReason::Deadline } else { StopReason::Cancelled };
                Returned::Interrupted(job, reason)
            }
            (None, None) => Returned::Ran(Fate::Alive, "", None),
        };
        let idle =
            matches!(returned, Returned::Ran(Fate::Alive, _, None)) && !self.slot.recycle.load(Ordering::Acquire);
        if idle {
            shown_idle(&self.slot, &worker);
        }
        self.shared.queue.give_back(&self.slot, worker, returned, idle);
    }
}

/// Shows the slot's worker idle, after a task.
fn shown_idle(slot: &Slot, worker: &WorkerProcess) {
    let done = worker.tasks_done;
    slot.update(|v| (v.state, v.task, v.tasks_done) = ("idle", "", done));
}

/// Shows `worker` as the slot's fresh, idle worker.
fn started(slot: &Slot, worker: &WorkerProcess) {
    let pid = worker.pid();
    let done = worker.tasks_done;
    slot.update(|v| {
        (v.pid, v.state, v.task, v.tasks_done, v.started) =
            (Some(pid), "idle", "", done, Some(std::time::Instant::now()))
    });
}

async fn start(shared: &Shared) -> Result<WorkerProcess, String> {
    let worker = WorkerProcess::spawn(&shared.options.worker).await.map_err(|err| {
        log_start_stderr(shared, &err);
        err.to_string()
    })?;
    shared.live.fetch_add(1, Ordering::Relaxed);
    *shared.last_start_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    match shared.options.worker.launch.program() {
        Some(name) => {
            tracing::info!(worker.pid = worker.pid(), worker.program = name, "worker started (program {name})")
        }
        None => tracing::info!(worker.pid = worker.pid(), "worker started"),
    }
    Ok(worker)
}

/// Logs in full what a worker that failed its start wrote to stderr, unless
/// the last failure wrote the same (retries of one failure are logged in
/// one line each, with the last line of it in their reason).
fn log_start_stderr(shared: &Shared, err: &StartError) {
    let StartError::Handshake { pid, stderr, .. } = err else { return };
    if stderr.is_empty() {
        return;
    }
    let text = stderr.join("\n");
    let same = text.replace(&pid.to_string(), "<pid>");
    let mut last = shared.last_start_stderr.lock().unwrap_or_else(|e| e.into_inner());
    if *last != same {
        tracing::warn!(worker.pid = pid, "worker {pid} failed to start; its stderr:\n{text}");
        *last = same;
    }
}

/// Records the death of the slot's worker `pid` (its handle already
/// dropped or about to be: the loop then starts another).
fn buried(shared: &Shared, slot: &Slot, pid: u32, cause: &DeathCause, task: Option<&str>) {
    slot.update(|v| (v.pid, v.state) = (None, "starting"));
    shared.deaths.record(cause);
    shared.live.fetch_sub(1, Ordering::Relaxed);
    match task {
        Some(task) => tracing::warn!(
            worker.pid = pid,
            task.name = task,
            reason = cause.label(),
            "worker {pid} {cause} while running {task}; replacing it"
        ),
        None => tracing::warn!(worker.pid = pid, reason = cause.label(), "idle worker {pid} {cause}; replacing it"),
    }
}

/// A job whose caller left or whose deadline passed while it waited is
/// answered without running.
fn expired(job: &WorkerJob) -> Option<JobError> {
    use super::death::Rung;
    if job.cancel.is_cancelled() {
        return Some(JobError::Stopped { reason: StopReason::Cancelled, rung: Rung::CancelFrame });
    }
    if job.deadline.is_some_and(|d| d <= std::time::Instant::now()) {
        return Some(JobError::Stopped { reason: StopReason::Deadline, rung: Rung::CancelFrame });
    }
    None
}

/// How many jobs the worker may take at once: a worker due for recycling
/// after N more tasks takes no more than N.
fn pipeline_room(shared: &Shared, worker: &WorkerProcess) -> usize {
    let max = shared.options.max_tasks_per_worker;
    if max == 0 {
        return super::PIPELINE_DEPTH;
    }
    (max.saturating_sub(worker.tasks_done).max(1) as usize).min(super::PIPELINE_DEPTH)
}

/// How often a busy worker's resident memory is read.
const RSS_CHECK_INTERVAL: Duration = Duration::from_millis(100);

fn recycle_reason(shared: &Shared, worker: &mut WorkerProcess) -> Option<String> {
    let options = &shared.options;
    if options.max_tasks_per_worker > 0 && worker.tasks_done >= options.max_tasks_per_worker {
        return Some(format!("it ran {} tasks", worker.tasks_done));
    }
    if options.max_worker_rss_bytes > 0
        && let Some(rss) = worker.resident_bytes_every(RSS_CHECK_INTERVAL)
        && rss > options.max_worker_rss_bytes
    {
        return Some(format!("its resident memory is {rss} bytes"));
    }
    None
}

/// Replaces the slot's worker: the new one first, then the old one retires.
async fn recycle(shared: &Shared, slot: &Slot, worker: &mut Option<WorkerProcess>, reason: &str) {
    let index = slot.index();
    match start(shared).await {
        Ok(fresh) => {
            started(slot, &fresh);
            let old = worker.replace(fresh).expect("a worker to recycle");
            let pid = old.pid();
            shared.deaths.record(&DeathCause::Recycled);
            shared.live.fetch_sub(1, Ordering::Relaxed);
            tracing::info!(slot = index, worker.pid = pid, reason = "recycle", "retiring worker {pid}: {reason}");
            old.retire(shared.options.worker.kill_grace * 5).await;
        }
        Err(err) => tracing::warn!(slot = index, error = %err, "could not start a replacement; keeping the old worker"),
    }
}
