//! One worker slot: keeps a worker process alive and feeds it jobs from the
//! shared queue. It replaces a worker that died (right away after a task
//! killed it; with capped exponential backoff while starts keep failing),
//! recycles one that ran enough tasks or grew too large (starting the
//! replacement first, so capacity never dips), and retires it on shutdown.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use super::{
    JobError, Shared, Slot, WorkerJob,
    death::DeathCause,
    worker::{Fate, WorkerProcess},
};

/// Why a worker is replaced when the admin API asks.
const RECYCLED_BY_ADMIN: &str = "the admin API asked";

/// First and longest waits between failed starts.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// Runs `slot` until its stop token fires.
pub(super) async fn run(slot: Arc<Slot>, shared: Arc<Shared>) {
    let options = &shared.options;
    let index = slot.index();
    let stop: &CancellationToken = &slot.stop;
    let mut backoff = BACKOFF_FIRST;
    let mut worker: Option<WorkerProcess> = None;
    loop {
        let current = match worker.as_mut() {
            Some(w) => w,
            None => match start(&shared).await {
                Ok(w) => {
                    backoff = BACKOFF_FIRST;
                    started(&slot, &w);
                    worker.insert(w)
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

        // Wait for a job while watching the idle worker.
        let mut job = None;
        let fate = current
            .idle(&options.worker, async {
                tokio::select! {
                    next = shared.queue.next() => job = Some(next),
                    () = stop.cancelled() => {}
                    () = slot.wake.notified() => {}
                }
            })
            .await;
        if let Fate::Dead(cause) = fate {
            let pid = current.pid();
            buried(&shared, &slot, &mut worker, pid, &cause, None);
            continue;
        }
        if job.is_none() && !stop.is_cancelled() {
            // Woken by the admin API.
            if slot.recycle.swap(false, Ordering::AcqRel) {
                recycle(&shared, &slot, &mut worker, RECYCLED_BY_ADMIN).await;
            }
            continue;
        }
        let Some(job) = job else {
            // Stopping (or the queue closed): retire the worker and leave.
            if let Some(w) = worker.take() {
                shared.live.fetch_sub(1, Ordering::Relaxed);
                w.retire(options.worker.kill_grace * 5).await;
            }
            return;
        };
        let mut batch = vec![job];
        shared.queue.fill_batch(pipeline_room(&shared, current), &mut batch);
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
            continue;
        }

        let pid = current.pid();
        tracing::debug!(jobs = batch.len(), "sending jobs to worker {pid}");
        let task = batch[0].task;
        slot.update(|v| (v.state, v.task) = ("busy", task));
        let end = current.run(batch, &options.worker).await;
        let done = current.tasks_done;
        slot.update(|v| (v.state, v.task, v.tasks_done) = ("idle", "", done));
        if !end.unstarted.is_empty() {
            shared.queue.requeue(end.unstarted);
        }
        match end.fate {
            Fate::Dead(cause) => buried(&shared, &slot, &mut worker, pid, &cause, Some(end.task)),
            Fate::Alive => {
                let asked = slot.recycle.swap(false, Ordering::AcqRel);
                let reason = if asked { Some(RECYCLED_BY_ADMIN.to_string()) } else { recycle_reason(&shared, current) };
                if let Some(reason) = reason {
                    recycle(&shared, &slot, &mut worker, &reason).await;
                }
            }
        }
    }
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
    let worker = WorkerProcess::spawn(&shared.options.worker).await.map_err(|e| e.to_string())?;
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

/// Records a dead worker and clears the slot so the loop starts another.
fn buried(
    shared: &Shared,
    slot: &Slot,
    worker: &mut Option<WorkerProcess>,
    pid: u32,
    cause: &DeathCause,
    task: Option<&str>,
) {
    slot.update(|v| (v.pid, v.state) = (None, "starting"));
    shared.deaths.record(cause);
    shared.live.fetch_sub(1, Ordering::Relaxed);
    *worker = None;
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
    use super::death::{Rung, StopReason};
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
