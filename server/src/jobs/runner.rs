//! A front's job runner. It claims a queued job only when it has room (pull,
//! not push: an idle front takes work a busy one cannot), runs it through
//! the dispatcher as a batch call, renews its lease while it runs, reports
//! its progress, and records how it ended, every write fenced by the run's
//! attempt number. It also expires other fronts' lapsed leases (their jobs
//! are queued again, or fail after `max_attempts`) and deletes jobs past
//! their retention.
//!
//! Stopping: once `stop` fires it claims nothing more; runs still going when
//! `hand_back` fires are stopped and handed back to the queue, not counted
//! as attempts.
//!
//! Room: a front has room for as many runs as it has executors (pool
//! threads and worker processes). While its runs are tiny (their tasks run
//! for under 2 ms on average), it takes up to [`AHEAD`] times that: they
//! queue in its executors for a moment, and a tiny job's time is mostly
//! waiting (for the store, for a thread), which runs side by side hide. A
//! job so claimed that has not started within [`AHEAD_HOLD`] (the work
//! changed: the runs before it are long) is handed back at once, not
//! counted, for any front with room, and the front claims only what it
//! has room for until its runs are tiny again.
//!
//! While it has room and its last claim found nothing queued, it also takes
//! jobs submitted to its own front as they are recorded (see `Direct` in
//! the parent module): they skip the queue and the claim.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{Notify, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    Jobs,
    store::{Claimant, JobFailure, JobRecord, RunResult, State},
};
use crate::{
    cache::{Directives, Lookup},
    dispatch::{Call, Dispatcher, ProgressState},
    error::CallError,
    telemetry,
};
use tracing::Instrument as _;

/// How often the runner looks for work it was not told of (jobs submitted
/// on other fronts), for cancels of its runs, and for lapsed leases.
const POLL: Duration = Duration::from_millis(500);
/// Progress is written at most this often per job.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Finished jobs past their retention are deleted this often (or as often
/// as the retention, if it is shorter).
const CLEANUP_EVERY: Duration = Duration::from_secs(60);

/// Runs this short or shorter, on average, are tiny (see the module's doc).
const TINY_RUN: Duration = Duration::from_millis(2);
/// While runs are tiny, a front runs up to this many times as many jobs as
/// it has executors.
pub const AHEAD: usize = 4;
/// A job taken beyond the front's executors that has not started within
/// this is handed back.
pub const AHEAD_HOLD: Duration = Duration::from_millis(100);

/// Cancel tokens of this runner's runs, by job id.
type Runs = Arc<Mutex<HashMap<String, CancellationToken>>>;

/// How long this front's runs take: a running average of how long their
/// tasks ran (not of their waits, which claiming ahead is there to hide),
/// forgotten when a job claimed ahead had to be handed back.
#[derive(Debug, Default)]
struct Pace(Mutex<Option<Duration>>);

impl Pace {
    fn ran(&self, took: Duration) {
        let mut average = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *average = Some(match *average {
            Some(average) => average.mul_f64(0.8) + took.mul_f64(0.2),
            None => took,
        });
    }

    fn forget(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn tiny(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|average| average <= TINY_RUN)
    }
}

/// Runs jobs of `jobs` on `dispatcher`, at most `capacity` at once, as
/// `owner`, until `stop`; runs still going at `hand_back` are handed back.
/// Returns once every run has ended.
pub async fn run(
    jobs: Arc<Jobs>,
    dispatcher: Arc<Dispatcher>,
    owner: String,
    capacity: usize,
    stop: CancellationToken,
    hand_back: CancellationToken,
    runs_tracker: TaskTracker,
) {
    let runs: Runs = Runs::default();
    let pace = Arc::new(Pace::default());
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cleaned = Instant::now();
    // A cancel of one of its runs, asked on this front or another, stops it
    // at once rather than at the next poll.
    let mut cancels = jobs.cancels();
    // A run that ends makes room for the next job.
    let ended = Arc::new(Notify::new());
    // Counted by `runs`: a run leaves it once its work is done, before its
    // end is recorded (a slot is for running, not for waiting on the
    // store), and before it says it ended.
    let running = || runs.lock().unwrap_or_else(|e| e.into_inner()).len();
    let start = |job: JobRecord, claimed: Instant| {
        let ahead = running() >= capacity;
        let cancel = CancellationToken::new();
        runs.lock().unwrap_or_else(|e| e.into_inner()).insert(job.job.id.clone(), cancel.clone());
        let (jobs, dispatcher, runs, hand_back, ended, pace) = (
            Arc::clone(&jobs),
            Arc::clone(&dispatcher),
            Arc::clone(&runs),
            hand_back.clone(),
            Arc::clone(&ended),
            Arc::clone(&pace),
        );
        runs_tracker.spawn(async move {
            let id = job.job.id.clone();
            let done = || {
                runs.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                ended.notify_one();
            };
            let run = Run { claimed, ahead, cancel, hand_back };
            run_one(&jobs, &dispatcher, job, run, &pace, done).await;
        });
    };
    // Jobs submitted here while the runner offers room come straight here.
    let mut submitted_here = jobs.run_submitted(Claimant { owner: owner.clone(), lease: jobs.options.lease });
    loop {
        // Claim while there is room: every job there is room for, at once.
        // Jobs taken at submit meanwhile count as running.
        let in_transit = jobs.offer_room(0);
        let limit = if pace.tiny() { AHEAD * capacity } else { capacity };
        let mut nothing_queued = false;
        while !stop.is_cancelled() && running() + in_transit < limit {
            let room = limit - running() - in_transit;
            let asked = Instant::now();
            let claimed = match jobs.store.claim(&owner, jobs.options.lease, room).await {
                Ok(claimed) => claimed,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot claim jobs");
                    break;
                }
            };
            nothing_queued = claimed.len() < room;
            for job in claimed {
                jobs.changed_to(&job);
                start(job, asked);
            }
            if nothing_queued {
                break;
            }
        }
        if nothing_queued && !stop.is_cancelled() {
            jobs.offer_room(limit.saturating_sub(running() + in_transit));
        }
        tokio::select! {
            Some(job) = submitted_here.recv() => {
                jobs.arrived();
                start(job, Instant::now());
            }
            () = jobs.submitted.notified() => {}
            () = ended.notified() => {}
            _ = poll.tick() => {
                cancel_asked(&jobs, &owner, &runs).await;
                housekeeping(&jobs, &dispatcher, &mut cleaned).await;
            }
            cancelled = cancels.recv() => match cancelled {
                Ok(id) => {
                    if let Some(token) = runs.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
                        token.cancel();
                    }
                }
                // Missed some: ask the store.
                Err(_) => cancel_asked(&jobs, &owner, &runs).await,
            },
            () = stop.cancelled() => break,
        }
    }
    // Jobs taken at submit and not started go back to the queue, uncounted;
    // one whose submit is still being recorded goes back from there.
    jobs.stop_running_submitted();
    submitted_here.close();
    while let Ok(job) = submitted_here.try_recv() {
        jobs.arrived();
        match jobs.store.release(&job.job.id, job.attempts).await {
            Ok(_) => jobs.touched(&job.job.id),
            Err(err) => tracing::warn!(job.id = %job.job.id, error = %err, "cannot hand a job back"),
        }
    }
    runs_tracker.close();
    runs_tracker.wait().await;
}

/// Stops this runner's runs whose jobs were asked to cancel.
async fn cancel_asked(jobs: &Jobs, owner: &str, runs: &Runs) {
    if let Ok(cancels) = jobs.store.cancel_requests(owner).await {
        let wanted: HashSet<String> = cancels.into_iter().map(|(id, _)| id).collect();
        for (id, token) in runs.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if wanted.contains(id) {
                token.cancel();
            }
        }
    }
}

/// Lapsed leases of any front, and retention.
async fn housekeeping(jobs: &Arc<Jobs>, dispatcher: &Dispatcher, cleaned: &mut Instant) {
    match jobs.store.expire_leases(jobs.options.max_attempts).await {
        Ok(0) => {}
        Ok(queued) => {
            tracing::warn!(jobs = queued, "jobs whose front stopped renewing their lease are queued again");
            dispatcher.metrics().job_leases_expired(queued);
            jobs.touched_all();
            jobs.submitted.notify_one();
        }
        Err(err) => tracing::warn!(error = %err, "cannot expire job leases"),
    }
    if cleaned.elapsed() >= CLEANUP_EVERY.min(jobs.options.retention) {
        *cleaned = Instant::now();
        match jobs.store.delete_finished(jobs.options.retention).await {
            Ok(0) => {}
            Ok(_) => jobs.touched_all(),
            Err(err) => tracing::warn!(error = %err, "cannot delete finished jobs past their retention"),
        }
    }
}

/// How a run ended, for the store.
enum Ending {
    /// Record this result.
    Result(RunResult),
    /// Hand the job back unfinished (the front is stopping, or had no room).
    HandBack,
    /// Hand back a job claimed ahead that has not started in time.
    Unstarted,
    /// The run is no longer ours (its lease lapsed): write nothing.
    Lost,
}

/// Runs one claimed job, says it is `done` running, and records how it
/// ended.
/// One run's circumstances.
struct Run {
    /// When its claim was asked (its lease counts from then).
    claimed: Instant,
    /// Whether it was claimed beyond the front's executors.
    ahead: bool,
    /// Fires when its job's cancel is asked.
    cancel: CancellationToken,
    /// Fires when the front hands back what still runs.
    hand_back: CancellationToken,
}

async fn run_one(
    jobs: &Arc<Jobs>,
    dispatcher: &Arc<Dispatcher>,
    job: JobRecord,
    run: Run,
    pace: &Pace,
    done: impl FnOnce(),
) {
    let (id, attempt) = (job.job.id.clone(), job.attempts);
    // The run's spans continue the Submit's trace.
    let span = telemetry::job_span(&id, &job.job.task, attempt, &job.job.traceparent);
    let ending = execute(jobs, dispatcher, job, run, pace).instrument(span).await;
    done();
    if let Ending::Unstarted = ending {
        pace.forget();
    }
    dispatcher.metrics().job_run(match &ending {
        Ending::Result(RunResult::Succeeded(_)) => "succeeded",
        Ending::Result(RunResult::Ended(State::Cancelled, _)) => "cancelled",
        Ending::Result(RunResult::Ended(..)) => "failed",
        Ending::HandBack | Ending::Unstarted => "handed_back",
        Ending::Lost => "lost",
    });
    let written = match ending {
        Ending::Lost => {
            tracing::warn!(job.id = %id, attempt, "job's lease lapsed while it ran; another front has it");
            return;
        }
        Ending::HandBack | Ending::Unstarted => jobs.store.release(&id, attempt).await.inspect(|&released| {
            if released {
                jobs.touched(&id);
            }
        }),
        // It tells the job's waiters itself.
        Ending::Result(result) => jobs.finish(&id, attempt, result).await,
    };
    match written {
        Ok(true) => {}
        Ok(false) => tracing::warn!(job.id = %id, attempt, "job moved on while it ran; its result is dropped"),
        Err(err) => tracing::warn!(job.id = %id, error = %err, "cannot record how a job ended"),
    }
}

async fn execute(jobs: &Arc<Jobs>, dispatcher: &Arc<Dispatcher>, job: JobRecord, run: Run, pace: &Pace) -> Ending {
    let Run { claimed, mut ahead, cancel, hand_back } = run;
    let (id, attempt, task) = (job.job.id.clone(), job.attempts, job.job.task.clone());
    let call = Call {
        task: job.job.task,
        input: job.job.input,
        params: job.job.params.into_iter().collect(),
        mode: job.job.mode,
        deadline: None,
        // Scheduled as its submitter's call (fair share, weight, priority).
        client: Some(dispatcher.clients().named(&job.job.client)),
        priority: job.job.priority,
    };
    // Identical work done meanwhile (by a call, or another job) is its
    // result; else its own is stored for the next.
    let leader = match dispatcher.cache().zip(dispatcher.cache_key(&call).await) {
        Some((cache, (key, task, _))) => match cache.lookup_stored(key, task, Directives::default()).await {
            Lookup::Hit(output, kind) if output.len() <= jobs.options.max_output_bytes => {
                drop(telemetry::cache_span(task, kind.label()));
                dispatcher.metrics().cache_lookup(task, kind.label());
                return Ending::Result(RunResult::Succeeded(output));
            }
            Lookup::Hit(..) => None,
            Lookup::Miss(leader) => {
                dispatcher.metrics().cache_lookup(task, "miss");
                Some(leader)
            }
        },
        None => None,
    };
    let admitted = match dispatcher.admit(call).await {
        Ok(admitted) => admitted,
        // No room after all (a full queue, no worker process can start), or
        // stopping: handed back for a later turn, this front's or another's.
        // The slot stays taken for a poll's time, so that a refusing executor
        // is not asked again in a tight loop.
        Err(
            CallError::QueueFull { .. }
            | CallError::Draining
            | CallError::Unavailable(_)
            | CallError::ClientLimit { .. },
        ) => {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = hand_back.cancelled() => {}
            }
            return Ending::HandBack;
        }
        Err(err) => return Ending::Result(failed(err)),
    };
    let (progress_tx, mut progress) = watch::channel(ProgressState::default());
    let running = admitted.run_job(progress_tx);
    tokio::pin!(running);
    let lease = jobs.options.lease;
    let mut renew = tokio::time::interval(lease / 3);
    renew.tick().await;
    // The run stops by itself once its lease may have lapsed unrenewed (the
    // store out of reach): another front may take the job then, and two runs
    // of one job must never overlap. Counted from before the claim (or the
    // renewal) was asked, less a margin for the stop's own time.
    let margin = lease / 6;
    let mut held_until = claimed + lease - margin;
    // Progress is written at most every PROGRESS_EVERY: a change that comes
    // sooner waits for the next turn (`unwritten`).
    let mut reported = Instant::now() - PROGRESS_EVERY;
    let mut unwritten = false;
    // What the job's record holds: a change of stage alone (queued to
    // running) is not worth a write.
    let mut written = (job.progress, job.progress_message.clone());
    loop {
        tokio::select! {
            result = &mut running => {
                if let Ok(outcome) = &result {
                    pace.ran(outcome.run);
                }
                return Ending::Result(match result {
                    Ok(outcome) if outcome.output.len() > jobs.options.max_output_bytes => RunResult::Ended(
                        State::Failed,
                        JobFailure {
                            code: tonic::Code::ResourceExhausted as i32,
                            message: format!(
                                "{task}: its output of {} bytes exceeds --max-job-output-bytes ({})",
                                outcome.output.len(),
                                jobs.options.max_output_bytes
                            ),
                        },
                    ),
                    Ok(outcome) => {
                        if let Some(leader) = leader {
                            dispatcher.metrics().cache_evicted(&leader.finish(&outcome.output).await.evicted);
                        }
                        RunResult::Succeeded(outcome.output)
                    }
                    Err(err) => failed(err),
                });
            }
            Ok(()) = progress.changed(), if !unwritten => unwritten = true,
            () = tokio::time::sleep_until((reported + PROGRESS_EVERY).into()), if unwritten => {
                (reported, unwritten) = (Instant::now(), false);
                let ProgressState { fraction, message, .. } = progress.borrow_and_update().clone();
                if (fraction, &message) == (written.0, &written.1) {
                    continue;
                }
                // Bounded like a renewal: a write the store never answers
                // must not hold the run past its lease.
                let write = jobs.store.progress(&id, attempt, fraction, &message);
                match tokio::time::timeout_at(held_until.into(), write).await {
                    Ok(Ok(true)) => {
                        jobs.touched(&id);
                        written = (fraction, message);
                    }
                    Ok(_) => {}
                    Err(_) => return unrenewed(&id),
                }
            }
            _ = renew.tick() => {
                let asked = Instant::now();
                match tokio::time::timeout_at(held_until.into(), jobs.store.renew(&id, attempt, lease)).await {
                    Ok(Ok(true)) => held_until = asked + lease - margin,
                    // Dropping the run stops its task, as a cancelled call's.
                    Ok(Ok(false)) => return Ending::Lost,
                    Ok(Err(err)) => tracing::warn!(job.id = %id, error = %err, "cannot renew a job's lease"),
                    Err(_) => return unrenewed(&id),
                }
            }
            () = tokio::time::sleep_until(held_until.into()) => return unrenewed(&id),
            () = tokio::time::sleep_until((claimed + AHEAD_HOLD).into()), if ahead => {
                if !progress.borrow().running {
                    return Ending::Unstarted;
                }
                ahead = false;
            }
            () = cancel.cancelled() => {
                let message = format!("{task}: the job was cancelled");
                return Ending::Result(RunResult::Ended(
                    State::Cancelled,
                    JobFailure { code: tonic::Code::Cancelled as i32, message },
                ));
            }
            () = hand_back.cancelled() => return Ending::HandBack,
        }
    }
}

/// A run stopped because its lease could not be renewed in time.
fn unrenewed(id: &str) -> Ending {
    tracing::warn!(job.id = %id, "stopping a job whose lease could not be renewed: the store is out of reach");
    Ending::Lost
}

/// A failed run, as its call would have failed.
fn failed(err: CallError) -> RunResult {
    let status = tonic::Status::from(err);
    let state = if status.code() == tonic::Code::Cancelled { State::Cancelled } else { State::Failed };
    RunResult::Ended(state, JobFailure { code: status.code() as i32, message: status.message().to_string() })
}
